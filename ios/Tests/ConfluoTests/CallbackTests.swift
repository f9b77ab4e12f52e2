// Foreign callbacks that throw: reported and survived, never a lost write
// or a dead background sync.
import ConfluoFFI
import Foundation
import XCTest
@testable import Confluo

private struct ListenerBug: Error {}

private final class ThrowingListener: ChangeListener, @unchecked Sendable {
    func onChange(tables: [String]) throws { throw ListenerBug() }
}

/// Counts its calls; the first `failing` of them throw.
private final class Counter: ChangeListener, SyncStatusListener, @unchecked Sendable {
    private let lock = NSLock()
    private var calls = 0
    private let failing: Int
    init(failing: Int = 0) { self.failing = failing }

    var count: Int {
        lock.lock()
        defer { lock.unlock() }
        return calls
    }

    private func call() throws {
        lock.lock()
        calls += 1
        let fail = calls <= failing
        lock.unlock()
        if fail { throw ListenerBug() }
    }

    func onChange(tables: [String]) throws { try call() }
    func onStatus(status: ConfluoFFI.SyncStatus) throws { try call() }
}

private final class DevToken: ConfluoFFI.TokenProvider, @unchecked Sendable {
    func token(invalidate: Bool) throws -> String { "dev-token" }
}

/// The generated API's database, for implementing its callback protocols directly.
private func ffiTodoDb() throws -> Database {
    let db = try Database.openInMemory()
    try db.executeBatch(sql: "CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, title TEXT, status TEXT)")
    try db.enableSync(table: "todo")
    return db
}

private func waitUntil(_ what: String, _ condition: () throws -> Bool) throws {
    let deadline = Date().addingTimeInterval(20)
    while try !condition() {
        guard Date() < deadline else { throw ConfluoError.InvalidInput(detail: "timed out waiting for \(what)") }
        Thread.sleep(forTimeInterval: 0.02)
    }
}

final class CallbackTests: XCTestCase {
    func testAChangeListenerThatThrowsNeitherFailsTheWriteNorSilencesTheOthers() throws {
        let db = try ffiTodoDb()
        let throwing = db.observe(tables: [], listener: ThrowingListener())
        let counter = Counter()
        let counting = db.observe(tables: ["todo"], listener: counter)
        XCTAssertEqual(try db.execute(sql: "INSERT INTO todo VALUES ('k', 'x', 'y')", params: []), 1)
        XCTAssertEqual(try db.query(sql: "SELECT * FROM todo", params: []).rows.count, 1)
        XCTAssertEqual(counter.count, 1)
        throwing.cancel()
        counting.cancel()
        try db.closeDatabase()
    }

    func testAStatusListenerThatThrowsDoesNotStopBackgroundSync() throws {
        let server = try TestServer()
        var options = SyncOptions(serverURL: server.url, space: "resilient")
        options.requestTimeout = .seconds(5)
        options.minBackoff = .milliseconds(100)
        options.maxBackoff = .milliseconds(800)
        let a = try ffiTodoDb()
        let listener = Counter(failing: 1)
        let sync = try a.startSync(config: try options.ffi(), token: DevToken(), listener: listener)
        try waitUntil("the first status") { listener.count > 0 }
        _ = try a.execute(sql: "INSERT INTO todo VALUES ('k', 'after the error', 'open')", params: [])
        let b = try ffiTodoDb()
        try waitUntil("the write on the server") {
            _ = try b.syncNow(config: try options.ffi(), token: DevToken(), cancellation: nil)
            return try b.query(sql: "SELECT * FROM todo", params: []).rows.count == 1
        }
        // The status that ends the sync may come a moment after the server
        // has the write (b can pull it first): waited for.
        try waitUntil("the listener to hear again after it threw") { listener.count > 1 }
        sync.stop()
        try a.closeDatabase()
        try b.closeDatabase()
    }
}
