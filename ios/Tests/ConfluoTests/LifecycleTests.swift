// The app lifecycle through the Swift API: close, cancellation, concurrent
// use, sign-out, token refresh, honest statuses, logging, typed rows.
import Foundation
import XCTest
@testable import Confluo

struct TimedOut: Error, CustomStringConvertible {
    let description: String
}

/// `body`'s result, or `TimedOut` after `seconds`: a wait that cannot hang.
func within<T: Sendable>(_ seconds: Double, _ what: String,
                         _ body: @escaping @Sendable () async throws -> T) async throws -> T {
    try await withThrowingTaskGroup(of: T?.self) { group in
        group.addTask { try await body() }
        group.addTask {
            try await Task.sleep(for: .seconds(seconds))
            return nil
        }
        defer { group.cancelAll() }
        guard let first = try await group.next(), let value = first else {
            throw TimedOut(description: "timed out after \(seconds) s waiting for \(what)")
        }
        return value
    }
}

func syncOptions(_ server: TestServer, _ space: String) -> SyncOptions {
    syncOptions(server.url, space)
}

func syncOptions(_ url: URL, _ space: String) -> SyncOptions {
    var o = SyncOptions(serverURL: url, space: space)
    o.requestTimeout = .seconds(5)
    o.minBackoff = .milliseconds(100)
    o.maxBackoff = .milliseconds(800)
    return o
}

/// A token provider that records how it is called; it hands out `current`
/// (or `refreshed`, when asked to invalidate and one is set).
final class RecordingTokens: @unchecked Sendable {
    private let lock = NSLock()
    private var current: String
    private var refreshed: String?
    private var log: [Bool] = []

    init(_ current: String, refreshed: String? = nil) {
        self.current = current
        self.refreshed = refreshed
    }

    var calls: [Bool] {
        lock.lock()
        defer { lock.unlock() }
        return log
    }

    func set(_ token: String) {
        lock.lock()
        current = token
        refreshed = nil
        lock.unlock()
    }

    private func hand(_ invalidate: Bool) -> String {
        lock.lock()
        defer { lock.unlock() }
        log.append(invalidate)
        return invalidate ? (refreshed ?? current) : current
    }

    var provider: TokenProvider {
        { [self] invalidate in hand(invalidate) }
    }
}

/// A TCP port that accepts connections (the kernel completes the
/// handshake) and never answers: a server stuck for ever.
final class SilentServer {
    private let fd: Int32
    let url: URL

    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        self.fd = fd
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = 0
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, length) == 0 && listen(fd, 16) == 0 && getsockname(fd, $0, &length) == 0
            }
        }
        guard bound else { throw TimedOut(description: "could not listen on a loopback port") }
        url = URL(string: "http://127.0.0.1:\(UInt16(bigEndian: addr.sin_port))")!
    }

    deinit { close(fd) }
}

struct Todo: Decodable, Equatable {
    enum Status: String, Decodable { case open, done }
    let id: UUID
    let title: String
    let status: Status
    let due: Date?
    let done: Bool
}

final class LifecycleTests: XCTestCase {
    override func tearDown() {
        Confluo.setLogger(nil)
    }

    func testEveryCallAfterCloseThrowsClosed() async throws {
        let server = try TestServer()
        let db = try await todoDb()
        try db.close()
        func expectClosed(_ what: String, _ call: () async throws -> Void) async {
            do {
                try await call()
                XCTFail("\(what) worked on a closed database")
            } catch ConfluoError.Closed {
            } catch {
                XCTFail("\(what) threw \(error), not Closed")
            }
        }
        await expectClosed("query") { _ = try await db.query("SELECT 1") }
        await expectClosed("execute") { try await db.execute("INSERT INTO todo VALUES ('a', 'b', 'c')") }
        await expectClosed("write") { _ = try await db.write { try $0.execute("DELETE FROM todo") } }
        await expectClosed("siteId") { _ = try await db.siteId }
        await expectClosed("startSync") { try await db.startSync(syncOptions(server, "closed")) { _ in "dev-token" } }
        await expectClosed("syncNow") { _ = try await db.syncNow(syncOptions(server, "closed")) { _ in "dev-token" } }
        await expectClosed("signOutAndClear") { try await db.signOutAndClear() }
        await expectClosed("watch") {
            for try await _ in db.watch("SELECT 1") { XCTFail("a closed database's watch emitted") }
        }
    }

    func testAStatusAndAWatchStreamEndWhenTheDatabaseCloses() async throws {
        let db = try await todoDb()
        var rows = db.watch("SELECT * FROM todo", tables: ["todo"]).makeAsyncIterator()
        let first = try await rows.next()
        XCTAssertEqual(first?.count, 0)
        let statuses = db.syncStatus
        try db.close()
        let next = try await within(5, "the watch stream to end") { [rows] in
            var rows = rows
            return try await rows.next() == nil
        }
        XCTAssertTrue(next, "the watch stream ended")
        let count = try await within(5, "the status stream to end") {
            var n = 0
            for await _ in statuses { n += 1 }
            return n
        }
        XCTAssertLessThanOrEqual(count, 1, "at most the status it had")
    }

    func testAWatchReRunsOnlyForTheTablesItWatches() async throws {
        let db = try await todoDb()
        try await db.executeBatch("CREATE TABLE other(id INTEGER PRIMARY KEY, v TEXT)")
        let runs = StateLog()
        let watcher = Task {
            for try await rows in db.watch("SELECT count(*) AS n FROM todo", tables: ["todo"]) {
                await runs.add(.idle, pending: try rows[0].int("n") ?? -1)
            }
        }
        defer { watcher.cancel() }
        _ = try await within(10, "the first result") { while await runs.described.isEmpty { try await Task.sleep(for: .milliseconds(10)) } }
        for i in 0..<5 { try await db.execute("INSERT INTO other(v) VALUES (?)", "\(i)") }
        try await db.execute("INSERT INTO todo VALUES ('t', 'watched', 'open')")
        _ = try await within(10, "the run after the watched write") {
            while await !runs.described.contains(where: { $0.contains("(1 pending)") }) { try await Task.sleep(for: .milliseconds(10)) }
        }
        let seen = await runs.described
        XCTAssertEqual(seen.count, 2, "one run at the start, one for the watched table: \(seen)")
    }

    func testCancellingATaskBeforeSyncNowStartsMakesNoRequest() async throws {
        let server = try TestServer()
        let db = try await todoDb()
        let tokens = RecordingTokens("dev-token")
        let task = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            return try await db.syncNow(syncOptions(server, "never")) { try await tokens.provider($0) }
        }
        do {
            _ = try await task.value
            XCTFail("a cancelled task synced")
        } catch is CancellationError {}
        XCTAssertEqual(tokens.calls, [], "no token was asked for")
    }

    func testCancellingSyncNowInFlightStopsItWithCancellationError() async throws {
        let silent = try SilentServer()
        let db = try await todoDb()
        try await db.execute("INSERT INTO todo VALUES ('k', 'waiting', 'open')")
        var options = syncOptions(silent.url, "stuck")
        options.requestTimeout = .seconds(2)
        let started = Date()
        let sync = Task { try await db.syncNow(options) { _ in "dev-token" } }
        try await Task.sleep(for: .milliseconds(300))
        sync.cancel()
        let outcome = try await within(15, "the cancelled sync to end") { await sync.result }
        XCTAssertThrowsError(try outcome.get()) { XCTAssertTrue($0 is CancellationError, "\($0)") }
        XCTAssertLessThan(Date().timeIntervalSince(started), 10, "the sync did not run on after cancel")
        let pending = try await db.pendingChanges()
        XCTAssertEqual(pending, 1, "the write is still waiting to be sent")
        try db.close()
    }

    func testManyTasksWriteAndReadConcurrently() async throws {
        let db = try await todoDb()
        let total = 64
        try await withThrowingTaskGroup(of: Void.self) { group in
            for i in 0..<total {
                group.addTask {
                    try await db.execute("INSERT INTO todo VALUES (?, ?, 'open')", "id\(i)", "task \(i)")
                    let mine = try await db.query("SELECT title FROM todo WHERE id = ?", "id\(i)")
                    XCTAssertEqual(try mine.first?.string("title"), "task \(i)")
                }
            }
            try await group.waitForAll()
        }
        let count = try await db.query("SELECT count(*) AS n FROM todo").first?.int("n")
        XCTAssertEqual(count, total)
        let pending = try await db.pendingChanges()
        XCTAssertEqual(pending, total)
    }

    func testAlterSyncedTableThroughTheWrapperSyncsTheNewColumn() async throws {
        let server = try TestServer()
        let options = syncOptions(server, "altered")
        let a = try await todoDb()
        let b = try await todoDb()
        for db in [a, b] {
            try await db.alterSyncedTable("todo", "ALTER TABLE todo ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")
        }
        try await a.execute("INSERT INTO todo(id, title, status, priority) VALUES ('t', 'urgent', 'open', 3)")
        _ = try await a.syncNow(options) { _ in "dev-token" }
        _ = try await b.syncNow(options) { _ in "dev-token" }
        let priority = try await b.query("SELECT priority FROM todo WHERE id = 't'").first?.int("priority")
        XCTAssertEqual(priority, 3)
    }

    func testARefusedTokenIsRefreshedOnceAndTheRefreshedOneIsUsed() async throws {
        let server = try TestServer()
        let db = try await todoDb()
        try await db.execute("INSERT INTO todo VALUES ('k', 'x', 'y')")
        let tokens = RecordingTokens("expired-token", refreshed: "dev-token")
        let report = try await db.syncNow(syncOptions(server, "refresh"), token: tokens.provider)
        XCTAssertEqual(report.pushed, 3)
        XCTAssertEqual(tokens.calls, [false, true], "asked once, then once more to invalidate")
    }

    func testA401DuringBackgroundSyncLeadsToAuthRequiredUntilSyncSoon() async throws {
        let server = try TestServer()
        let db = try await todoDb()
        try await db.execute("INSERT INTO todo VALUES ('k', 'x', 'y')")
        let tokens = RecordingTokens("revoked-token")
        try await db.startSync(syncOptions(server, "auth"), token: tokens.provider)
        let refused = try await firstStatus(of: db, "auth required") {
            if case .authRequired = $0.state { return true }
            return false
        }
        XCTAssertEqual(refused.pending, 1)
        // The sync and the long poll each ask, and each asks once more with
        // invalidate after its 401; a request in flight may still finish.
        try await Task.sleep(for: .milliseconds(500))
        let asked = tokens.calls
        XCTAssertEqual(asked.first, false)
        XCTAssertTrue(asked.contains(true), "a refreshed token was asked for: \(asked)")
        // Backoff is 100-800 ms: a sync that kept retrying would ask again.
        try await Task.sleep(for: .milliseconds(1500))
        XCTAssertEqual(tokens.calls, asked, "no retries while the user must sign in")
        tokens.set("dev-token")
        db.syncSoon()
        _ = try await firstStatus(of: db, "synced with the new token") { $0.state == .idle && $0.pending == 0 && $0.lastSynced != nil }
        await db.stopSync()
    }

    func testSignOutThenSignInToAnotherSpace() async throws {
        let server = try TestServer()
        let first = syncOptions(server, "alice")
        let second = syncOptions(server, "bob")
        let device = try await todoDb()
        try await device.executeBatch("CREATE TABLE drafts(id INTEGER PRIMARY KEY, text TEXT)")
        try await device.execute("INSERT INTO drafts(text) VALUES ('local only')")
        try await device.execute("INSERT INTO todo VALUES ('a1', 'alice''s', 'open')")
        _ = try await device.syncNow(first) { _ in "dev-token" }
        try await device.startSync(first) { _ in "dev-token" }
        _ = try await firstStatus(of: device, "syncing with alice's space") { $0.state == .idle }
        // Bob's space already holds a row from his other device.
        let bobsPhone = try await todoDb()
        try await bobsPhone.execute("INSERT INTO todo VALUES ('b1', 'bob''s', 'open')")
        _ = try await bobsPhone.syncNow(second) { _ in "dev-token" }

        try await device.signOutAndClear()
        let status = try await firstStatus(of: device, "stopped after sign-out") { $0.state == .stopped }
        XCTAssertEqual(status.pending, 0)
        let left = try await device.query("SELECT id FROM todo")
        XCTAssertEqual(left, [], "alice's rows are gone")
        let bound = try await device.boundSpace()
        XCTAssertNil(bound)
        let drafts = try await device.query("SELECT text FROM drafts").first?.string("text")
        XCTAssertEqual(drafts, "local only", "local tables stay")

        let report = try await device.syncNow(second) { _ in "dev-token" }
        XCTAssertEqual(report.pushed, 0, "nothing of alice's goes to bob's space")
        let ids = try await device.query("SELECT id FROM todo ORDER BY id").compactMap { try $0.string("id") }
        XCTAssertEqual(ids, ["b1"])
        _ = try await bobsPhone.syncNow(second) { _ in "dev-token" }
        let onBob = try await bobsPhone.query("SELECT id FROM todo ORDER BY id").compactMap { try $0.string("id") }
        XCTAssertEqual(onBob, ["b1"])
        let again = try await device.boundSpace()
        XCTAssertEqual(again, "bob")
    }

    func testTheFirstStatusIsStoppedWithTheRealPendingCountAndFollowsCommits() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(UUID().uuidString)
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("app.db").path
        let before = try await Confluo.open(path: path)
        try await before.executeBatch(todo)
        try await before.enableSync("todo")
        try await before.execute("INSERT INTO todo VALUES ('a', 'unsent', 'open')")
        try await before.execute("INSERT INTO todo VALUES ('b', 'unsent', 'open')")
        try before.close()

        let db = try await Confluo.open(path: path)
        var statuses = db.syncStatus.makeAsyncIterator()
        let first = await statuses.next()
        XCTAssertEqual(first?.state, .stopped)
        XCTAssertEqual(first?.pending, 2, "unsent writes show before any sync")
        try await db.execute("INSERT INTO todo VALUES ('c', 'unsent', 'open')")
        _ = try await firstStatus(of: db, "the new write counted") { $0.state == .stopped && $0.pending == 3 }
        try db.close()
    }

    func testSetOnlineFalseBeforeStartIsRemembered() async throws {
        let server = try TestServer()
        let db = try await todoDb()
        try await db.execute("INSERT INTO todo VALUES ('k', 'x', 'y')")
        let log = StateLog()
        let stream = db.syncStatus
        let collector = Task { for await s in stream { await log.add(s.state, pending: s.pending) } }
        defer { collector.cancel() }
        db.setOnline(false)
        try await db.startSync(syncOptions(server, "offline-start")) { _ in "dev-token" }
        _ = try await firstStatus(of: db, "offline") { $0.state == .offline(retryIn: nil) }
        try await Task.sleep(for: .milliseconds(500))
        let states = await log.states
        XCTAssertFalse(states.contains(.syncing), "no sync while the platform says offline: \(states)")
        let pending = try await db.pendingChanges()
        XCTAssertEqual(pending, 1)
        db.setOnline(true)
        _ = try await firstStatus(of: db, "synced once online") { $0.state == .idle && $0.pending == 0 }
        await db.stopSync()
    }

    func testNoStatusAfterStopSyncReturnsButStopped() async throws {
        let server = try TestServer()
        let db = try await todoDb()
        try await db.startSync(syncOptions(server, "stopping")) { _ in "dev-token" }
        _ = try await firstStatus(of: db, "idle") { $0.state == .idle && $0.lastSynced != nil }
        let log = StateLog()
        let stream = db.syncStatus
        let collector = Task { for await s in stream { await log.add(s.state, pending: s.pending) } }
        defer { collector.cancel() }
        // Writes just before the stop give the sync something to report.
        try await db.execute("INSERT INTO todo VALUES ('k1', 'x', 'y')")
        let before = await log.states.count
        await db.stopSync()
        try await db.execute("INSERT INTO todo VALUES ('k2', 'x', 'y')")
        try await Task.sleep(for: .milliseconds(800))
        // The log hears a status some time after it was sent, so statuses
        // the sync sent before stopSync returned may still come in after
        // it; the stream keeps their order, and stopSync sends `stopped`
        // before it returns: nothing but `stopped` may follow it.
        let since = await log.states.dropFirst(before)
        let stopped = since.firstIndex(of: .stopped)
        XCTAssertNotNil(stopped, "stopSync reported no stopped status: \(since)")
        let after = since[(stopped ?? since.endIndex)...]
        XCTAssertTrue(after.allSatisfy { $0 == .stopped }, "only stopped statuses after stopSync: \(since)")
        let last = try await firstStatus(of: db, "stopped") { _ in true }
        XCTAssertEqual(last.state, .stopped)
        XCTAssertGreaterThanOrEqual(last.pending, 1)
    }

    func testCloseReturnsAtOnceWhileASyncIsStuckOnAServerThatNeverAnswers() async throws {
        let silent = try SilentServer()
        let db = try await todoDb()
        try await db.execute("INSERT INTO todo VALUES ('k', 'x', 'y')")
        var options = syncOptions(silent.url, "stuck")
        options.requestTimeout = .seconds(30)
        try await db.startSync(options) { _ in "dev-token" }
        _ = try await firstStatus(of: db, "syncing") { $0.state == .syncing }
        let started = Date()
        try db.close()
        XCTAssertLessThan(Date().timeIntervalSince(started), 0.5, "close waited for the stuck sync")
        do {
            try await db.startSync(options) { _ in "dev-token" }
            XCTFail("a closed database started syncing")
        } catch ConfluoError.Closed {}
    }

    func testTheLoggerReceivesTheEnginesDebugLines() async throws {
        final class Lines: ConfluoLogger, @unchecked Sendable {
            private let lock = NSLock()
            private var lines: [(LogLevel, String)] = []
            func log(level: LogLevel, target: String, message: String) {
                lock.lock()
                lines.append((level, message))
                lock.unlock()
            }
            var all: [(LogLevel, String)] {
                lock.lock()
                defer { lock.unlock() }
                return lines
            }
        }
        let server = try TestServer()
        let lines = Lines()
        Confluo.setLogger(lines, level: .debug)
        let db = try await todoDb()
        _ = try await db.syncNow(syncOptions(server, "logged")) { _ in "dev-token" }
        let synced = lines.all.filter { $0.1.contains("synced with space \"logged\"") }
        XCTAssertEqual(synced.count, 1, "\(lines.all)")
        XCTAssertEqual(synced.first?.0, .debug)
        Confluo.setLogger(lines, level: .info)
        _ = try await db.syncNow(syncOptions(server, "logged")) { _ in "dev-token" }
        XCTAssertEqual(lines.all.filter { $0.1.contains("synced with space") }.count, 1, "debug lines filtered out at info")
    }

    func testRowsDecodeIntoDecodableTypes() async throws {
        let db = try await todoDb()
        try await db.alterSyncedTable("todo", "ALTER TABLE todo ADD COLUMN due TEXT")
        try await db.alterSyncedTable("todo", "ALTER TABLE todo ADD COLUMN done INTEGER NOT NULL DEFAULT 0")
        let id = UUID()
        let due = Date(timeIntervalSince1970: 1_795_712_709_120 / 1000)
        try await db.execute("INSERT INTO todo VALUES (?, 'with a date', 'open', ?, 1)", id, due)
        try await db.execute("INSERT INTO todo VALUES (?, 'no date', 'done', NULL, 0)", UUID())
        let todos = try await db.query("SELECT * FROM todo ORDER BY title DESC", as: Todo.self)
        XCTAssertEqual(todos.first, Todo(id: id, title: "with a date", status: .open, due: due, done: true))
        XCTAssertEqual(todos.last?.due, nil)
        XCTAssertEqual(todos.last?.status, .done)
        var watched = db.watch("SELECT * FROM todo WHERE done = 1", tables: ["todo"], as: Todo.self).makeAsyncIterator()
        let first = try await watched.next()
        XCTAssertEqual(first?.map(\.id), [id])
    }

    func testAMisspelledColumnFailsWithTheSameMessageFromGettersAndDecodable() async throws {
        let db = try await todoDb()
        try await db.execute("INSERT INTO todo VALUES ('k', 'x', 'open')")
        let expected = #"no column "titel" in this row (columns: id, title, status)"#
        let row = try await db.query("SELECT * FROM todo")[0]
        XCTAssertThrowsError(try row.string("titel")) {
            guard case ConfluoError.InvalidInput(let detail) = $0 else { return XCTFail("\($0)") }
            XCTAssertEqual(detail, expected)
        }
        struct Misspelled: Decodable { let titel: String? }
        do {
            _ = try await db.query("SELECT * FROM todo", as: Misspelled.self)
            XCTFail("a missing column decoded")
        } catch ConfluoError.InvalidInput(let detail) {
            XCTAssertEqual(detail, expected)
        }
    }

    func testRowsAreEqualWhenColumnsAndValuesAre() async throws {
        let db = try await todoDb()
        try await db.execute("INSERT INTO todo VALUES ('a', 'same', 'open')")
        try await db.execute("INSERT INTO todo VALUES ('b', 'same', 'open')")
        let titles = try await db.query("SELECT title, status FROM todo ORDER BY id")
        XCTAssertEqual(titles[0], titles[1])
        let whole = try await db.query("SELECT * FROM todo ORDER BY id")
        XCTAssertNotEqual(whole[0], whole[1])
        let renamed = try await db.query("SELECT title AS name, status FROM todo WHERE id = 'a'")
        XCTAssertNotEqual(renamed[0], titles[0], "column names count")
    }

    func testDatesAndUUIDsAreStoredInTheSharedTextForms() async throws {
        let db = try await todoDb()
        let date = Date(timeIntervalSince1970: 1_795_712_709_120 / 1000)
        let id = UUID(uuidString: "7A0C59E2-4C7B-4D0B-9C1E-0F3D2B1A6E55")!
        try await db.execute("INSERT INTO todo VALUES (?, ?, 'open')", id, date)
        let raw = try await db.query("SELECT id, title, typeof(title) AS kind FROM todo")[0]
        XCTAssertEqual(try raw.string("id"), "7a0c59e2-4c7b-4d0b-9c1e-0f3d2b1a6e55")
        XCTAssertEqual(try raw.string("title"), "2026-11-26T17:05:09.120Z")
        XCTAssertEqual(try raw.string("kind"), "text")
        XCTAssertEqual(try raw.uuid("id"), id)
        XCTAssertEqual(try raw.date("title"), date)
        let found = try await db.query("SELECT id FROM todo WHERE id = ?", id)
        XCTAssertEqual(found.count, 1, "a UUID parameter finds the row it wrote")
        // Dates before 1970 and on a second's boundary keep their form too.
        try await db.execute("INSERT INTO todo VALUES ('old', ?, 'open')", Date(timeIntervalSince1970: -1.5))
        let old = try await db.query("SELECT title FROM todo WHERE id = 'old'")[0]
        XCTAssertEqual(try old.string("title"), "1969-12-31T23:59:58.500Z")
        XCTAssertEqual(try old.date("title"), Date(timeIntervalSince1970: -1.5))
    }

    func testAServerURLThatIsNotHttpIsRefusedClearly() async throws {
        let db = try await todoDb()
        do {
            _ = try await db.syncNow(SyncOptions(serverURL: URL(string: "ftp://example.com")!, space: "s")) { _ in "t" }
            XCTFail("an ftp URL was accepted")
        } catch ConfluoError.InvalidInput(let detail) {
            XCTAssertTrue(detail.contains("http or https"), detail)
        }
    }
}
