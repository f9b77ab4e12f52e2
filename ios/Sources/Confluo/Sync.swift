import Foundation
import ConfluoFFI

/// Supplies the bearer token. `invalidate` is true when the server refused
/// the last one: return a fresh token (refresh it), not a cached copy.
/// Throwing means no token: the sync fails with `ConfluoError.Auth`.
public typealias TokenProvider = @Sendable (_ invalidate: Bool) async throws -> String

/// Where and how to sync. `nil` durations mean the engine's defaults.
public struct SyncOptions: Sendable {
    /// The sync server, `http` or `https`.
    public var serverURL: URL
    public var space: String
    public var requestTimeout: Duration?
    public var longPoll: Duration?
    /// How long local commits gather before background sync pushes them.
    public var debounce: Duration?
    public var minBackoff: Duration?
    public var maxBackoff: Duration?

    public init(serverURL: URL, space: String) {
        self.serverURL = serverURL
        self.space = space
    }

    func ffi() throws -> SyncConfig {
        let scheme = serverURL.scheme?.lowercased()
        guard scheme == "http" || scheme == "https", serverURL.host != nil else {
            throw ConfluoError.InvalidInput(
                detail: "the server URL must be an http or https URL with a host, not \(serverURL.absoluteString.debugDescription)")
        }
        return SyncConfig(serverUrl: serverURL.absoluteString, space: space,
                          requestTimeoutMs: try millis(requestTimeout, "requestTimeout"),
                          longPollMs: try millis(longPoll, "longPoll"), debounceMs: try millis(debounce, "debounce"),
                          minBackoffMs: try millis(minBackoff, "minBackoff"), maxBackoffMs: try millis(maxBackoff, "maxBackoff"))
    }

    /// The FFI's milliseconds, where 0 means the default.
    private func millis(_ duration: Duration?, _ name: String) throws -> UInt64 {
        guard let duration else { return 0 }
        let (seconds, attoseconds) = duration.components
        let ms = seconds * 1000 + attoseconds / 1_000_000_000_000_000
        guard ms > 0 else {
            throw ConfluoError.InvalidInput(detail: "\(name) must be at least a millisecond (nil for the default), not \(duration)")
        }
        return UInt64(ms)
    }
}

/// What one sync did.
public struct SyncReport: Sendable, Equatable {
    public let pushed: Int
    public let pulled: Int
    public let applied: Int
    /// Received changes this database could not apply, kept aside (see
    /// `Confluo.rejectedChanges()`).
    public let rejected: Int
    public let bytesSent: Int
    public let bytesReceived: Int
    public let duration: Duration
    /// The server's clock minus this device's, from its last answer; far
    /// from zero means this device's clock is wrong.
    public let clockOffset: Duration?

    init(_ r: ConfluoFFI.SyncReport) {
        pushed = Int(r.pushed)
        pulled = Int(r.pulled)
        applied = Int(r.applied)
        rejected = Int(r.rejected)
        bytesSent = Int(r.bytesSent)
        bytesReceived = Int(r.bytesReceived)
        duration = .milliseconds(Int64(r.durationMs))
        clockOffset = r.clockOffsetMs.map { .milliseconds($0) }
    }
}

/// The kind of failure a status reports: the `ConfluoError` case it would be.
public enum ErrorKind: Sendable, Equatable {
    case invalidInput, schema, storage, network, auth, closed, cancelled

    init(_ kind: ConfluoFFI.ErrorKind) {
        switch kind {
        case .invalidInput: self = .invalidInput
        case .schema: self = .schema
        case .storage: self = .storage
        case .network: self = .network
        case .auth: self = .auth
        case .closed: self = .closed
        case .cancelled: self = .cancelled
        }
    }
}

/// What background sync is doing.
public enum SyncState: Sendable, Equatable {
    /// Background sync is not running (not started, stopped, signed out).
    case stopped
    /// Caught up.
    case idle
    case syncing
    /// No network (`retryIn` nil: the platform said so), or the server is
    /// unreachable (the next attempt is in `retryIn`).
    case offline(retryIn: Duration?)
    /// The last attempt failed; the next is in `retryIn`.
    case error(kind: ErrorKind, message: String, retryIn: Duration)
    /// The server refused the token, a refreshed one too: the user must sign
    /// in again. No retries until `Confluo.syncSoon()` (or a new `startSync`).
    case authRequired(message: String)
}

/// Background sync's status, as `Confluo.syncStatus` streams it.
public struct SyncStatus: Sendable, Equatable {
    public let state: SyncState
    /// Rows with local changes the server has not accepted yet.
    public let pending: Int
    /// When the last sync succeeded, if ever.
    public let lastSynced: Date?
    /// Changes from the server this database could not apply, kept aside
    /// (see `Confluo.rejectedChanges()`).
    public let rejected: Int
    /// The server's clock minus this device's, as of the last sync.
    public let clockOffset: Duration?

    public init(state: SyncState, pending: Int, lastSynced: Date?, rejected: Int = 0, clockOffset: Duration? = nil) {
        self.state = state
        self.pending = pending
        self.lastSynced = lastSynced
        self.rejected = rejected
        self.clockOffset = clockOffset
    }

    init(_ s: ConfluoFFI.SyncStatus) {
        switch s.state {
        case .stopped: state = .stopped
        case .idle: state = .idle
        case .syncing: state = .syncing
        case .offline(let retryInMs): state = .offline(retryIn: retryInMs.map { .milliseconds(Int64($0)) })
        case .error(let kind, let message, let retryInMs):
            state = .error(kind: ErrorKind(kind), message: message, retryIn: .milliseconds(Int64(retryInMs)))
        case .authRequired(let message): state = .authRequired(message: message)
        }
        pending = Int(s.pending)
        lastSynced = s.lastSyncedMs.map { Date(timeIntervalSince1970: TimeInterval($0) / 1000) }
        rejected = Int(s.rejected)
        clockOffset = s.clockOffsetMs.map { .milliseconds($0) }
    }
}

/// A change from the server this database could not apply (its schema or a
/// trigger refused it), kept aside with the `reason` and tried again after
/// each migration of its table. `table` and `column` (nil for the row
/// itself) are their names in this database (for a column it does not
/// have, the name the column was made with).
public struct RejectedChange: Sendable, Equatable {
    public let table: String
    /// The row's primary key.
    public let key: [SqlValue]
    public let column: String?
    public let reason: String

    init(_ r: ConfluoFFI.RejectedChange) {
        table = r.table
        key = r.key
        column = r.column
        reason = r.reason
    }
}

/// Bridges the async token provider to the engine's blocking callback. The
/// engine calls it on its own sync thread (never the cooperative pool), so
/// blocking that thread until the provider's task finishes is safe.
final class TokenRelay: ConfluoFFI.TokenProvider, @unchecked Sendable {
    private let provider: TokenProvider
    init(_ provider: @escaping TokenProvider) { self.provider = provider }

    func token(invalidate: Bool) throws -> String {
        let done = DispatchSemaphore(value: 0)
        let outcome = Outcome()
        let provider = self.provider
        Task.detached {
            do {
                outcome.set(.success(try await provider(invalidate)))
            } catch {
                outcome.set(.failure(error))
            }
            done.signal()
        }
        done.wait()
        switch outcome.get() {
        case .success(let token): return token
        case .failure(let error as ConfluoError): throw error
        case .failure(let error): throw ConfluoError.Auth(detail: "no token: \(error)")
        }
    }

    private final class Outcome: @unchecked Sendable {
        private let lock = NSLock()
        private var result: Result<String, Error> = .failure(CancellationError())
        func set(_ r: Result<String, Error>) { lock.lock(); result = r; lock.unlock() }
        func get() -> Result<String, Error> { lock.lock(); defer { lock.unlock() }; return result }
    }
}
