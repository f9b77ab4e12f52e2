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
    public let bytesSent: Int
    public let bytesReceived: Int
    public let duration: TimeInterval

    init(_ r: ConfluoFFI.SyncReport) {
        pushed = Int(r.pushed)
        pulled = Int(r.pulled)
        applied = Int(r.applied)
        bytesSent = Int(r.bytesSent)
        bytesReceived = Int(r.bytesReceived)
        duration = TimeInterval(r.durationMs) / 1000
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
}

/// Background sync's status, as `Confluo.syncStatus` streams it.
public struct SyncStatus: Sendable, Equatable {
    public let state: SyncState
    /// Rows with local changes the server has not accepted yet.
    public let pending: Int
    /// When the last sync succeeded, if ever.
    public let lastSynced: Date?

    public init(state: SyncState, pending: Int, lastSynced: Date?) {
        self.state = state
        self.pending = pending
        self.lastSynced = lastSynced
    }

    init(_ s: ConfluoFFI.SyncStatus) {
        switch s.state {
        case .idle: state = .idle
        case .syncing: state = .syncing
        case .offline(let retryInMs): state = .offline(retryIn: retryInMs.map { TimeInterval($0) / 1000 })
        case .error(let message, let retryInMs): state = .error(message: message, retryIn: TimeInterval(retryInMs) / 1000)
        }
        pending = Int(s.pending)
        lastSynced = s.lastSyncedMs.map { Date(timeIntervalSince1970: TimeInterval($0) / 1000) }
    }
}
