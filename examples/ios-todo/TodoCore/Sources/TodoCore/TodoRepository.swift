import Foundation
import Confluo

/// One todo as the app shows it.
public struct TodoItem: Sendable, Equatable, Identifiable, Decodable {
    public let id: String
    public let title: String
    public let done: Bool

    public init(id: String, title: String, done: Bool) {
        self.id = id
        self.title = title
        self.done = done
    }
}

/// Where to sync, as the settings screen stores it.
public struct SyncSettings: Sendable, Equatable, Codable {
    public var serverURL: String
    public var space: String
    public var token: String

    public init(serverURL: String, space: String, token: String) {
        self.serverURL = serverURL
        self.space = space
        self.token = token
    }

    public var isComplete: Bool { !serverURL.isEmpty && !space.isEmpty && !token.isEmpty }

    /// The options to sync with; a server address that is not an http(s)
    /// URL is refused with the SDK's clear error.
    func options() throws -> SyncOptions {
        guard let url = URL(string: serverURL) else {
            throw ConfluoError.InvalidInput(detail: "\(serverURL.debugDescription) is not a URL")
        }
        return SyncOptions(serverURL: url, space: space)
    }
}

/// The todo list's logic: the SwiftUI app's model and the tests both use it.
public final class TodoRepository: Sendable {
    public static let schema = """
        CREATE TABLE IF NOT EXISTS todo(
            id TEXT PRIMARY KEY NOT NULL,
            title TEXT NOT NULL DEFAULT '',
            done INTEGER NOT NULL DEFAULT 0,
            created_at INTEGER NOT NULL DEFAULT 0
        )
        """

    private let db: Confluo

    private init(_ db: Confluo) {
        self.db = db
    }

    /// Each later change of the table, in order, for ever (every install runs
    /// the same list, so columns keep their identities across renames).
    /// Append; never edit or remove an entry.
    public static let migrations: [String] = []

    /// Opens the list in `db`, creating (or migrating) and syncing the table.
    public static func open(_ db: Confluo) async throws -> TodoRepository {
        try await db.enableSyncWithHistory("todo", create: schema, migrations: migrations)
        return TodoRepository(db)
    }

    /// The list, oldest first, now and after every local or synced change.
    public func todos() -> AsyncThrowingStream<[TodoItem], Error> {
        db.watch("SELECT id, title, done FROM todo ORDER BY created_at, id", tables: ["todo"], as: TodoItem.self)
    }

    /// Background sync's status, for the status chip.
    public var syncStatus: AsyncStream<SyncStatus> { db.syncStatus }

    @discardableResult
    public func add(_ title: String) async throws -> String {
        let id = UUID().uuidString.lowercased()
        let now = Int64(Date().timeIntervalSince1970 * 1000)
        try await db.execute("INSERT INTO todo(id, title, done, created_at) VALUES (?, ?, 0, ?)",
                             id, title.trimmingCharacters(in: .whitespaces), now)
        return id
    }

    public func toggle(_ id: String) async throws {
        try await db.execute("UPDATE todo SET done = 1 - done WHERE id = ?", id)
    }

    public func rename(_ id: String, to title: String) async throws {
        try await db.execute("UPDATE todo SET title = ? WHERE id = ?", title.trimmingCharacters(in: .whitespaces), id)
    }

    public func delete(_ id: String) async throws {
        try await db.execute("DELETE FROM todo WHERE id = ?", id)
    }

    /// Starts (or restarts) background sync; nothing until the settings are
    /// complete. `token` is asked again with `invalidate` after a refusal.
    public func startSync(_ settings: SyncSettings, token: @escaping TokenProvider) async throws {
        guard settings.isComplete else { return }
        try await db.startSync(try settings.options(), token: token)
    }

    /// `startSync` with the settings' own token (a dev server's fixed token).
    public func startSync(_ settings: SyncSettings) async throws {
        let token = settings.token
        try await startSync(settings) { _ in token }
    }

    public func stopSync() async { await db.stopSync() }

    /// Tries again now (after "Sign in again", once the user has).
    public func syncSoon() { db.syncSoon() }

    /// The platform's network hint (NWPathMonitor).
    public func setOnline(_ online: Bool) { db.setOnline(online) }

    /// One sync, e.g. from a BGAppRefreshTask. Cancelling the calling Task
    /// (the task's expiration handler does) stops it with CancellationError.
    public func syncOnce(_ settings: SyncSettings) async throws {
        guard settings.isComplete else { return }
        let token = settings.token
        _ = try await db.syncNow(try settings.options()) { _ in token }
    }

    /// Signs out: stops syncing and deletes the synced list from this device
    /// (nothing is deleted on the server); the returned settings keep the
    /// server but drop the space and token, ready for the next sign-in.
    public func signOut(_ settings: SyncSettings) async throws -> SyncSettings {
        try await db.signOutAndClear()
        return SyncSettings(serverURL: settings.serverURL, space: "", token: "")
    }
}

/// What the sync status chip shows.
public struct SyncChip: Equatable, Sendable {
    public enum Kind: Sendable { case synced, syncing, offline, stopped, error, signInNeeded }
    public let label: String
    public let kind: Kind

    public init(_ status: SyncStatus) {
        let pending = status.pending > 0 ? " · \(status.pending) pending" : ""
        switch status.state {
        case .idle: (label, kind) = ("Synced" + pending, .synced)
        case .syncing: (label, kind) = ("Syncing…" + pending, .syncing)
        case .offline: (label, kind) = ("Offline" + pending, .offline)
        case .error(_, _, let retryIn):
            let seconds = Int((Double(retryIn.components.seconds) + Double(retryIn.components.attoseconds) / 1e18).rounded(.up))
            (label, kind) = ("Sync error, retrying in \(seconds) s" + pending, .error)
        case .stopped: (label, kind) = ("Not syncing" + pending, .stopped)
        case .authRequired: (label, kind) = ("Sign in again" + pending, .signInNeeded)
        }
    }
}
