import Foundation
import XCTest
@testable import Confluo

let todo = "CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, title TEXT, status TEXT)"

func todoDb() async throws -> Confluo {
    let db = try await Confluo.openInMemory()
    try await db.executeBatch(todo)
    try await db.enableSync("todo")
    return db
}

final class ConfluoTests: XCTestCase {
    func testCrudWithTypedValues() async throws {
        let db = try await todoDb()
        try await db.executeBatch("CREATE TABLE vals(id INTEGER PRIMARY KEY, v)")
        let values: [Any?] = [Int64.min, Int64.max, -0.5, "naïve café 日本語 🚀", "", Data([0, 255, 127]), Data(), nil]
        for (i, v) in values.enumerated() {
            try await db.execute("INSERT INTO vals VALUES (?, ?)", i, v)
        }
        let rows = try await db.query("SELECT v FROM vals ORDER BY id")
        XCTAssertEqual(try rows[0].int64("v"), Int64.min)
        XCTAssertEqual(try rows[1].int64("v"), Int64.max)
        XCTAssertEqual(try rows[2].double("v"), -0.5)
        XCTAssertEqual(try rows[3].string("v"), "naïve café 日本語 🚀")
        XCTAssertEqual(try rows[4].string("v"), "")
        XCTAssertEqual(try rows[5].data("v"), Data([0, 255, 127]))
        XCTAssertEqual(try rows[6].data("v"), Data())
        XCTAssertTrue(try rows[7].isNull("v"))
        XCTAssertNil(try rows[7].string("v"))

        let inserted = try await db.execute("INSERT INTO todo VALUES (?, ?, ?)", "t1", "Buy milk", "open")
        XCTAssertEqual(inserted, 1)
        try await db.execute("UPDATE todo SET status = ? WHERE id = ?", "done", "t1")
        let row = try await db.query("SELECT * FROM todo").first!
        XCTAssertEqual(try row.string("status"), "done")
        XCTAssertEqual(row.columns, ["id", "title", "status"])
        try await db.execute("DELETE FROM todo WHERE id = ?", "t1")
        let left = try await db.query("SELECT * FROM todo")
        XCTAssertTrue(left.isEmpty)
        try db.close()
    }

    func testBadSqlThrowsWithSqlitesMessage() async throws {
        let db = try await todoDb()
        do {
            _ = try await db.query("SELECT * FROM nope")
            XCTFail("expected an error")
        } catch let error as ConfluoError {
            XCTAssertTrue("\(error)".contains("no such table: nope"), "\(error)")
        }
        do {
            try await db.execute("INSERT INTO todo VALUES (?, ?, ?)", "a", NSObject(), "y")
            XCTFail("expected an error")
        } catch ConfluoError.InvalidInput(let detail) {
            XCTAssertTrue(detail.contains("cannot bind"), detail)
        }
    }

    func testWriteCommitsOrRollsBack() async throws {
        let db = try await todoDb()
        let count = try await db.write { tx -> Int in
            try tx.execute("INSERT INTO todo VALUES ('a', 'first', 'open')")
            try tx.execute("INSERT INTO todo VALUES ('b', 'second', 'open')")
            return try tx.query("SELECT count(*) AS n FROM todo").first!.int("n")!
        }
        XCTAssertEqual(count, 2)
        struct Oops: Error {}
        do {
            _ = try await db.write { tx in
                try tx.execute("DELETE FROM todo")
                throw Oops()
            }
            XCTFail("expected Oops")
        } catch is Oops {}
        let rows = try await db.query("SELECT * FROM todo")
        XCTAssertEqual(rows.count, 2)
    }

    func testPeerToPeerChangeSetsConverge() async throws {
        let a = try await todoDb()
        let b = try await todoDb()
        try await a.execute("INSERT INTO todo VALUES ('t1', 'from A', 'open')")
        let seen = try await b.seenVersion(try await a.siteId)
        let applied = try await b.applyChanges(try await a.changesForPeer(try await b.siteId, seenByPeer: seen))
        XCTAssertEqual(applied, 3)
        let ra = try await a.query("SELECT * FROM todo").map(\.description)
        let rb = try await b.query("SELECT * FROM todo").map(\.description)
        XCTAssertEqual(ra, rb)
    }

    func testCloseReleasesTheFile() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(UUID().uuidString)
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("app.db").path
        let first = try await Confluo.open(path: path)
        try await first.executeBatch(todo)
        try await first.enableSync("todo")
        try await first.execute("INSERT INTO todo VALUES ('k', 'kept', 'open')")
        try first.close()
        do {
            _ = try await first.query("SELECT 1")
            XCTFail("a closed database must refuse queries")
        } catch ConfluoError.Closed {}
        let again = try await Confluo.open(path: path)
        let rows = try await again.query("SELECT title FROM todo")
        XCTAssertEqual(try rows.first?.string("title"), "kept")
        try await again.execute("UPDATE todo SET title = 'again'")
        try again.close()
    }
}

/// A real `confluo-server` process on a free loopback port.
final class TestServer {
    private(set) var port = 0
    let dir: URL
    private var process: Process?
    var url: URL { URL(string: "http://127.0.0.1:\(port)")! }

    /// Starts on a random port, trying another if that one was taken.
    init() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent(UUID().uuidString)
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        var lastError: Error?
        for _ in 0..<5 {
            port = Int.random(in: 20000...60000)
            do {
                try start()
                return
            } catch {
                lastError = error
            }
        }
        throw lastError!
    }

    func start() throws {
        guard let bin = ProcessInfo.processInfo.environment["CONFLUO_SERVER_BIN"] else {
            throw ConfluoError.InvalidInput(detail: "CONFLUO_SERVER_BIN is not set")
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: bin)
        p.arguments = ["--dev", "--listen", "127.0.0.1:\(port)", "--db", dir.appendingPathComponent("server.db").path]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        process = p
        let deadline = Date().addingTimeInterval(20)
        while !healthy() {
            guard p.isRunning, Date() < deadline else { throw ConfluoError.InvalidInput(detail: "the server did not start") }
            Thread.sleep(forTimeInterval: 0.02)
        }
    }

    /// SIGTERM, then wait for the exit with waitpid (Foundation's
    /// `waitUntilExit` relies on a run loop that async tests do not spin).
    func stop() {
        guard let p = process else { return }
        process = nil
        let pid = p.processIdentifier
        kill(pid, SIGTERM)
        let deadline = Date().addingTimeInterval(10)
        var status: Int32 = 0
        while Date() < deadline {
            let r = waitpid(pid, &status, WNOHANG)
            if r == pid || (r == -1 && errno == ECHILD) { return }
            Thread.sleep(forTimeInterval: 0.02)
        }
        kill(pid, SIGKILL)
    }

    private func healthy() -> Bool {
        // A plain TCP connect is enough: the server answers as soon as it listens.
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
            }
        }
    }

    deinit {
        stop()
        try? FileManager.default.removeItem(at: dir)
    }
}

/// The states a status stream went through.
actor StateLog {
    var states: [SyncState] = []
    var described: [String] = []
    func add(_ state: SyncState, pending: Int = 0) {
        states.append(state)
        described.append("\(state) (\(pending) pending)")
    }
}

/// The first status of `db`'s background sync that satisfies `predicate`;
/// throws after `seconds` instead of waiting for ever on a quiet stream.
func firstStatus(of db: Confluo, _ what: String, within seconds: Double = 15,
                         where predicate: @escaping @Sendable (SyncStatus) -> Bool) async throws -> SyncStatus {
    let seen = StateLog()
    let found = try await withThrowingTaskGroup(of: SyncStatus?.self) { group in
        group.addTask {
            for await s in db.syncStatus {
                await seen.add(s.state, pending: s.pending)
                if predicate(s) { return s }
            }
            return nil
        }
        group.addTask {
            try await Task.sleep(nanoseconds: UInt64(seconds * 1_000_000_000))
            return nil
        }
        let first = try await group.next() ?? nil
        group.cancelAll()
        return first
    }
    guard let status = found else {
        let states = await seen.described
        throw ConfluoError.InvalidInput(detail: "timed out waiting for \(what); saw \(states)")
    }
    return status
}

final class SyncTests: XCTestCase {
    private func options(_ server: TestServer, _ space: String) -> SyncOptions {
        var o = SyncOptions(serverURL: server.url, space: space)
        o.requestTimeout = .seconds(5)
        o.minBackoff = .milliseconds(100)
        o.maxBackoff = .milliseconds(800)
        return o
    }

    func testTwoDatabasesSyncThroughARealServer() async throws {
        let server = try TestServer()
        let a = try await todoDb()
        let b = try await todoDb()
        let opts = options(server, "lists")
        try await a.execute("INSERT INTO todo VALUES ('t1', 'Buy groceries', 'in_progress')")
        let pushed = try await a.syncNow(opts) { _ in "dev-token" }
        XCTAssertEqual(pushed.pushed, 3)
        let pulled = try await b.syncNow(opts) { _ in "dev-token" }
        XCTAssertEqual(pulled.applied, 3)
        let title = try await b.query("SELECT title FROM todo").first?.string("title")
        XCTAssertEqual(title, "Buy groceries")
        do {
            _ = try await b.syncNow(opts) { _ in "wrong-token" }
            XCTFail("expected an auth error")
        } catch ConfluoError.Auth(let detail) {
            XCTAssertTrue(detail.contains("401"), detail)
        }
    }

    func testWatchEmitsAfterALocalWriteAndAfterASync() async throws {
        let server = try TestServer()
        let a = try await todoDb()
        let b = try await todoDb()
        let opts = options(server, "watched")
        var updates = b.watch("SELECT title FROM todo ORDER BY id", tables: ["todo"]).makeAsyncIterator()
        let initial = try await updates.next()
        XCTAssertEqual(initial?.count, 0)
        try await b.execute("INSERT INTO todo VALUES ('b1', 'local', 'open')")
        var latest = try await updates.next()
        XCTAssertEqual(latest?.count, 1)
        try await a.execute("INSERT INTO todo VALUES ('a1', 'remote', 'open')")
        _ = try await a.syncNow(opts) { _ in "dev-token" }
        _ = try await b.syncNow(opts) { _ in "dev-token" }
        while latest?.count != 2 {
            latest = try await updates.next()
        }
        XCTAssertEqual(try latest?.compactMap { try $0.string("title") }, ["remote", "local"])
    }

    func testATableANewInstallMadeInItsLatestShapeGetsTheHistorysIdentities() async throws {
        let create = "CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, name TEXT)"
        let rename = "ALTER TABLE todo RENAME COLUMN name TO task"
        let server = try TestServer()
        let opts = options(server, "history")
        // An install that ran the whole history: a row written before the rename.
        let old = try await Confluo.openInMemory()
        try await old.enableSyncWithHistory("todo", create: create, migrations: [])
        try await old.execute("INSERT INTO todo VALUES ('t1', 'Buy milk')")
        _ = try await old.syncNow(opts) { _ in "dev-token" }
        try await old.enableSyncWithHistory("todo", create: create, migrations: [rename])
        // A new install that made the table directly in its latest shape.
        let fresh = try await Confluo.openInMemory()
        try await fresh.executeBatch("CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, task TEXT)")
        try await fresh.enableSyncWithHistory("todo", create: create, migrations: [rename])
        _ = try await fresh.syncNow(opts) { _ in "dev-token" }
        let task = try await fresh.query("SELECT task FROM todo WHERE id = 't1'").first?.string("task")
        XCTAssertEqual(task, "Buy milk")
        // Calling it again at the next start changes nothing.
        try await fresh.enableSyncWithHistory("todo", create: create, migrations: [rename])
        let columns = try await fresh.query("SELECT * FROM todo").first?.columns
        XCTAssertEqual(columns, ["id", "task"])
    }

    func testAChangeATriggerRefusesIsKeptAsideAndReportedAndTheClockOffsetIsKnown() async throws {
        let server = try TestServer()
        let opts = options(server, "refused")
        let a = try await todoDb()
        let b = try await Confluo.openInMemory()
        try await b.executeBatch(todo + """
            ;
            CREATE TRIGGER no_bad BEFORE INSERT ON todo WHEN NEW.title = 'bad'
            BEGIN SELECT RAISE(ABORT, 'no bad titles'); END
            """)
        try await b.enableSync("todo")
        try await a.execute("INSERT INTO todo VALUES ('t1', 'bad', 'open')")
        try await a.execute("INSERT INTO todo VALUES ('t2', 'good', 'open')")
        _ = try await a.syncNow(opts) { _ in "dev-token" }
        let report = try await b.syncNow(opts) { _ in "dev-token" }
        XCTAssertGreaterThanOrEqual(report.rejected, 1, "\(report)")
        let offset = try XCTUnwrap(report.clockOffset, "\(report)")
        XCTAssertLessThan(abs(offset.components.seconds), 60, "\(report)")
        // The rest of the page went in.
        let ids = try await b.query("SELECT id FROM todo").compactMap { try $0.string("id") }
        XCTAssertEqual(ids, ["t2"])
        let kept = try await b.rejectedChanges()
        let count = try await b.rejectedCount()
        XCTAssertEqual(count, report.rejected)
        XCTAssertFalse(kept.isEmpty)
        for change in kept {
            XCTAssertTrue(change.reason.contains("no bad titles"), "\(change)")
            XCTAssertEqual(change.table, "todo")
            XCTAssertEqual(change.key, [.text(value: "t1")])
        }
        // Background sync reports them too.
        try await b.startSync(opts) { _ in "dev-token" }
        let status = try await firstStatus(of: b, "rejected changes and a clock offset") {
            $0.rejected > 0 && $0.clockOffset != nil
        }
        XCTAssertEqual(status.rejected, report.rejected)
        await b.stopSync()
    }

    func testBackgroundSyncGoesSyncingToIdleAndOfflineWhenTheServerStops() async throws {
        let server = try TestServer()
        let db = try await todoDb()
        // Every state, from before sync starts (the stream buffers).
        let log = StateLog()
        let stream = db.syncStatus
        let collector = Task { for await s in stream { await log.add(s.state) } }
        try await db.startSync(options(server, "bg")) { _ in "dev-token" }
        // Each wait has a deadline that fails the test; none can hang.
        _ = try await firstStatus(of: db, "idle") { $0.state == .idle && $0.lastSynced != nil }
        // A wait sees the current status first: only a sync that ended
        // after the write counts.
        let beforeWrite = Date()
        try await db.execute("INSERT INTO todo VALUES ('k', 'x', 'y')")
        _ = try await firstStatus(of: db, "the write synced") {
            $0.state == .idle && $0.pending == 0 && ($0.lastSynced ?? .distantPast) > beforeWrite
        }
        server.stop()
        try await db.execute("INSERT INTO todo VALUES ('k2', 'while the server is down', 'y')")
        _ = try await firstStatus(of: db, "offline with the write pending") {
            if case .offline = $0.state { return $0.pending == 1 }
            return false
        }
        try server.start()
        db.syncSoon()
        _ = try await firstStatus(of: db, "back in sync") { $0.state == .idle && $0.pending == 0 }
        await db.stopSync()
        collector.cancel()
        let seen = await log.states
        XCTAssertTrue(seen.contains(.syncing), "\(seen)")
    }
}
