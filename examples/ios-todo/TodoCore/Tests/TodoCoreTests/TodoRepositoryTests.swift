import Foundation
import XCTest
import Confluo
@testable import TodoCore

/// A real `confluo-server` process on a free loopback port.
final class Server {
    private(set) var port = 0
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent(UUID().uuidString)
    private var process = Process()
    var url: String { "http://127.0.0.1:\(port)" }

    /// Starts on a random port, trying another if that one was taken.
    init() throws {
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        guard let bin = ProcessInfo.processInfo.environment["CONFLUO_SERVER_BIN"] else {
            throw ConfluoError.InvalidInput(detail: "CONFLUO_SERVER_BIN is not set")
        }
        for _ in 0..<5 {
            port = Int.random(in: 20000...60000)
            process = Process()
            process.executableURL = URL(fileURLWithPath: bin)
            process.arguments = ["--dev", "--listen", "127.0.0.1:\(port)", "--db", dir.appendingPathComponent("s.db").path]
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            // Ready once a sync answers; gone at once if the port was taken.
            let probe = try Confluo.openInMemory()
            let deadline = Date().addingTimeInterval(20)
            while process.isRunning && Date() < deadline {
                if (try? blockingSync(probe)) != nil { return }
                Thread.sleep(forTimeInterval: 0.05)
            }
            kill(process.processIdentifier, SIGKILL)
        }
        throw ConfluoError.InvalidInput(detail: "the server did not start")
    }

    private func blockingSync(_ db: Confluo) throws {
        let done = DispatchSemaphore(value: 0)
        var failure: Error?
        let options = SyncOptions(serverURL: url, space: "probe")
        Task {
            do { _ = try await db.syncNow(options) { "dev-token" } } catch { failure = error }
            done.signal()
        }
        done.wait()
        if let failure { throw failure }
    }

    deinit {
        kill(process.processIdentifier, SIGKILL)
        try? FileManager.default.removeItem(at: dir)
    }
}

final class TodoRepositoryTests: XCTestCase {
    private func app(_ server: Server, _ space: String) async throws -> TodoRepository {
        let repo = try await TodoRepository.open(try Confluo.openInMemory())
        try await repo.startSync(SyncSettings(serverURL: server.url, space: space, token: "dev-token"))
        return repo
    }

    private func waitFor(_ repo: TodoRepository, _ what: ([TodoItem]) -> Bool) async throws -> [TodoItem] {
        let deadline = Date().addingTimeInterval(15)
        for try await list in repo.todos() {
            if what(list) { return list }
            if Date() > deadline { break }
        }
        XCTFail("timed out")
        return []
    }

    func testTwoAppInstancesConverge() async throws {
        let server = try Server()
        let alice = try await app(server, "family")
        let bob = try await app(server, "family")
        let milk = try await alice.add("Buy milk")
        try await alice.add("Call mom")
        _ = try await waitFor(bob) { $0.count == 2 }
        try await bob.toggle(milk)
        try await alice.rename(milk, to: "Buy oat milk")
        let expected = TodoItem(id: milk, title: "Buy oat milk", done: true)
        let onAlice = try await waitFor(alice) { $0.contains(expected) }
        let onBob = try await waitFor(bob) { $0.contains(expected) }
        XCTAssertEqual(onAlice, onBob)
        await alice.stopSync()
        await bob.stopSync()
        _ = server
    }

    func testADeletedItemStaysDeletedOnBoth() async throws {
        let server = try Server()
        let alice = try await app(server, "deletes")
        let bob = try await app(server, "deletes")
        let id = try await alice.add("Water the plants")
        _ = try await waitFor(bob) { $0.count == 1 }
        try await alice.delete(id)
        try await bob.toggle(id)
        _ = try await waitFor(alice) { $0.isEmpty }
        _ = try await waitFor(bob) { $0.isEmpty }
        try await alice.add("Something else")
        let later = try await waitFor(bob) { $0.count == 1 }
        XCTAssertFalse(later.contains { $0.id == id })
        await alice.stopSync()
        await bob.stopSync()
        _ = server
    }

    func testTheStatusChipFollowsBackgroundSync() async throws {
        let server = try Server()
        let repo = try await TodoRepository.open(try Confluo.openInMemory())
        try await repo.add("offline write")
        var statuses = repo.syncStatus.makeAsyncIterator()
        try await repo.startSync(SyncSettings(serverURL: server.url, space: "chip", token: "dev-token"))
        var seen: [SyncStatus] = []
        while let s = await statuses.next() {
            seen.append(s)
            if s.state == .idle && s.pending == 0 && s.lastSynced != nil { break }
        }
        XCTAssertTrue(seen.contains { $0.state == .syncing }, "\(seen)")
        repo.setOnline(false)
        while let s = await statuses.next() {
            if case .offline = s.state {
                XCTAssertEqual(SyncChip(s), SyncChip(SyncStatus(state: .offline(retryIn: nil), pending: 0, lastSynced: nil)))
                break
            }
        }
        await repo.stopSync()
        XCTAssertEqual(SyncChip(SyncStatus(state: .syncing, pending: 3, lastSynced: nil)).label, "Syncing… · 3 pending")
        XCTAssertEqual(SyncChip(SyncStatus(state: .error(message: "boom", retryIn: 1.5), pending: 0, lastSynced: nil)).label,
                       "Sync error, retrying in 2 s")
        _ = server
    }
}
