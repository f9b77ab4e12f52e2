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
            // Ready once it accepts connections; gone at once if the port was
            // taken. A plain connect: nothing here waits on async work.
            let deadline = Date().addingTimeInterval(20)
            while process.isRunning && Date() < deadline {
                if listening() { return }
                Thread.sleep(forTimeInterval: 0.05)
            }
            kill(process.processIdentifier, SIGKILL)
        }
        throw ConfluoError.InvalidInput(detail: "the server did not start")
    }

    private func listening() -> Bool {
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
        kill(process.processIdentifier, SIGKILL)
        try? FileManager.default.removeItem(at: dir)
    }
}

struct TimedOut: Error, CustomStringConvertible {
    let description: String
}

/// The first value of `stream` that satisfies `wanted`; throws `TimedOut`
/// at the deadline even when the stream stays quiet (the wait races a
/// sleeping task, so it never depends on a value arriving).
func first<S: AsyncSequence & Sendable>(_ stream: S, _ what: String, within seconds: Double = 15,
                                       where wanted: @escaping @Sendable (S.Element) -> Bool) async throws -> S.Element
    where S.Element: Sendable {
    try await withThrowingTaskGroup(of: S.Element?.self) { group in
        group.addTask {
            for try await value in stream where wanted(value) { return value }
            return nil
        }
        group.addTask {
            try await Task.sleep(for: .seconds(seconds))
            return nil
        }
        defer { group.cancelAll() }
        guard let found = try await group.next() ?? nil else {
            throw TimedOut(description: "timed out after \(seconds) s (or the stream ended) waiting for \(what)")
        }
        return found
    }
}

final class TodoRepositoryTests: XCTestCase {
    private func app(_ server: Server, _ space: String) async throws -> TodoRepository {
        let repo = try await TodoRepository.open(try await Confluo.openInMemory())
        try await repo.startSync(SyncSettings(serverURL: server.url, space: space, token: "dev-token"))
        return repo
    }

    private func waitFor(_ repo: TodoRepository, _ what: String = "the list",
                         _ wanted: @escaping @Sendable ([TodoItem]) -> Bool) async throws -> [TodoItem] {
        try await first(repo.todos(), what, where: wanted)
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
        let repo = try await TodoRepository.open(try await Confluo.openInMemory())
        try await repo.add("offline write")
        // The stopped status follows commits a moment after them.
        let before = try await first(repo.syncStatus, "the write pending before sync") { $0.pending == 1 }
        XCTAssertEqual(SyncChip(before), SyncChip(SyncStatus(state: .stopped, pending: 1, lastSynced: nil)))
        XCTAssertEqual(SyncChip(before).label, "Not syncing · 1 pending")
        try await repo.startSync(SyncSettings(serverURL: server.url, space: "chip", token: "dev-token"))
        let synced = try await first(repo.syncStatus, "synced") { $0.state == .idle && $0.pending == 0 && $0.lastSynced != nil }
        XCTAssertEqual(SyncChip(synced).label, "Synced")
        repo.setOnline(false)
        let offline = try await first(repo.syncStatus, "offline") { $0.state == .offline(retryIn: nil) }
        XCTAssertEqual(SyncChip(offline), SyncChip(SyncStatus(state: .offline(retryIn: nil), pending: 0, lastSynced: nil)))
        await repo.stopSync()
        let stopped = try await first(repo.syncStatus, "stopped") { _ in true }
        XCTAssertEqual(SyncChip(stopped).kind, .stopped)
        XCTAssertEqual(SyncChip(SyncStatus(state: .syncing, pending: 3, lastSynced: nil)).label, "Syncing… · 3 pending")
        XCTAssertEqual(SyncChip(SyncStatus(state: .error(kind: .network, message: "boom", retryIn: .milliseconds(1500)),
                                           pending: 0, lastSynced: nil)).label,
                       "Sync error, retrying in 2 s")
        _ = server
    }

    func testARefusedTokenShowsSignInAgainUntilANewTokenWorks() async throws {
        let server = try Server()
        let repo = try await TodoRepository.open(try await Confluo.openInMemory())
        try await repo.add("needs a token")
        let token = TokenBox("expired")
        try await repo.startSync(SyncSettings(serverURL: server.url, space: "auth", token: "unused")) { _ in token.value }
        let refused = try await first(repo.syncStatus, "auth required") {
            if case .authRequired = $0.state { return true }
            return false
        }
        XCTAssertEqual(SyncChip(refused).label, "Sign in again · 1 pending")
        XCTAssertEqual(SyncChip(refused).kind, .signInNeeded)
        token.value = "dev-token"
        repo.syncSoon()
        let synced = try await first(repo.syncStatus, "synced after signing in") { $0.state == .idle && $0.pending == 0 }
        XCTAssertEqual(SyncChip(synced).label, "Synced")
        await repo.stopSync()
        _ = server
    }

    func testSignOutClearsTheListAndTheNextUserSyncsTheirOwn() async throws {
        let server = try Server()
        let alice = try await app(server, "alice")
        try await alice.add("Alice's secret")
        _ = try await first(alice.syncStatus, "alice synced") { $0.state == .idle && $0.pending == 0 && $0.lastSynced != nil }
        let bob = try await app(server, "bob")
        try await bob.add("Bob's plan")
        _ = try await first(bob.syncStatus, "bob synced") { $0.state == .idle && $0.pending == 0 && $0.lastSynced != nil }

        let settings = SyncSettings(serverURL: server.url, space: "alice", token: "dev-token")
        let signedOut = try await alice.signOut(settings)
        XCTAssertEqual(signedOut, SyncSettings(serverURL: server.url, space: "", token: ""))
        XCTAssertFalse(signedOut.isComplete, "nothing syncs until the next sign-in")
        _ = try await waitFor(alice, "an empty list after sign-out") { $0.isEmpty }
        let status = try await first(alice.syncStatus, "stopped") { _ in true }
        XCTAssertEqual(SyncChip(status).label, "Not syncing")

        try await alice.startSync(SyncSettings(serverURL: server.url, space: "bob", token: "dev-token"))
        let onDevice = try await waitFor(alice, "bob's list") { $0.map(\.title) == ["Bob's plan"] }
        XCTAssertEqual(onDevice.count, 1)
        try await Task.sleep(for: .milliseconds(300))
        let onBob = try await waitFor(bob, "bob's own list") { _ in true }
        XCTAssertEqual(onBob.map(\.title), ["Bob's plan"], "nothing of alice's reached bob's space")
        await alice.stopSync()
        await bob.stopSync()
        _ = server
    }

    func testCancellingTheRefreshTaskStopsItsSync() async throws {
        let repo = try await TodoRepository.open(try await Confluo.openInMemory())
        let settings = SyncSettings(serverURL: "http://127.0.0.1:9", space: "never", token: "dev-token")
        let refresh = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            try await repo.syncOnce(settings)
        }
        do {
            try await refresh.value
            XCTFail("a cancelled refresh synced")
        } catch is CancellationError {}
    }
}

/// A token the test changes while sync runs.
final class TokenBox: @unchecked Sendable {
    private let lock = NSLock()
    private var token: String
    init(_ token: String) { self.token = token }
    var value: String {
        get { lock.lock(); defer { lock.unlock() }; return token }
        set { lock.lock(); token = newValue; lock.unlock() }
    }
}
