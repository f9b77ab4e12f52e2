import Foundation
import ConfluoFFI

/// Where and how to sync. Zero durations mean the engine's defaults.
public struct SyncOptions: Sendable {
    public var serverURL: String
    public var space: String
    public var requestTimeoutMs: UInt64 = 0
    public var longPollMs: UInt64 = 0
    public var debounceMs: UInt64 = 0
    public var minBackoffMs: UInt64 = 0
    public var maxBackoffMs: UInt64 = 0

    public init(serverURL: String, space: String) {
        self.serverURL = serverURL
        self.space = space
    }

    var ffi: SyncConfig {
        SyncConfig(serverUrl: serverURL, space: space, requestTimeoutMs: requestTimeoutMs, longPollMs: longPollMs,
                   debounceMs: debounceMs, minBackoffMs: minBackoffMs, maxBackoffMs: maxBackoffMs)
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
    public let duration: TimeInterval
    /// The server's clock minus this device's, in seconds, from its last
    /// answer; far from zero means this device's clock is wrong.
    public let clockOffset: TimeInterval?

    init(_ r: ConfluoFFI.SyncReport) {
        pushed = Int(r.pushed)
        pulled = Int(r.pulled)
        applied = Int(r.applied)
        rejected = Int(r.rejected)
        bytesSent = Int(r.bytesSent)
        bytesReceived = Int(r.bytesReceived)
        duration = TimeInterval(r.durationMs) / 1000
        clockOffset = r.clockOffsetMs.map { TimeInterval($0) / 1000 }
    }
}

/// What background sync is doing.
public enum SyncState: Sendable, Equatable {
    /// Caught up.
    case idle
    case syncing
    /// No network (`retryIn` nil: the platform said so), or the server is
    /// unreachable (the next attempt is in `retryIn` seconds).
    case offline(retryIn: TimeInterval?)
    /// The last attempt failed; the next is in `retryIn` seconds.
    case error(message: String, retryIn: TimeInterval)
    /// Background sync is not running.
    case stopped
    /// The server refused the token, a refreshed one too: sign in again.
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
    /// The server's clock minus this device's, in seconds, as of the last sync.
    public let clockOffset: TimeInterval?

    public init(state: SyncState, pending: Int, lastSynced: Date?, rejected: Int = 0, clockOffset: TimeInterval? = nil) {
        self.state = state
        self.pending = pending
        self.lastSynced = lastSynced
        self.rejected = rejected
        self.clockOffset = clockOffset
    }

    init(_ s: ConfluoFFI.SyncStatus) {
        switch s.state {
        case .idle: state = .idle
        case .syncing: state = .syncing
        case .offline(let retryInMs): state = .offline(retryIn: retryInMs.map { TimeInterval($0) / 1000 })
        case .error(_, let message, let retryInMs): state = .error(message: message, retryIn: TimeInterval(retryInMs) / 1000)
        case .stopped: state = .stopped
        case .authRequired(let message): state = .authRequired(message: message)
        }
        pending = Int(s.pending)
        lastSynced = s.lastSyncedMs.map { Date(timeIntervalSince1970: TimeInterval($0) / 1000) }
        rejected = Int(s.rejected)
        clockOffset = s.clockOffsetMs.map { TimeInterval($0) / 1000 }
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
