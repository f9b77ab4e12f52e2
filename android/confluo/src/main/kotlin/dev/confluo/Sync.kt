package dev.confluo

/** Where and how to sync. Zero durations mean the engine's defaults. */
data class SyncOptions(
    val serverUrl: String,
    val space: String,
    val requestTimeoutMs: Long = 0,
    val longPollMs: Long = 0,
    val debounceMs: Long = 0,
    val minBackoffMs: Long = 0,
    val maxBackoffMs: Long = 0,
) {
    internal fun toFfi() = dev.confluo.ffi.SyncConfig(
        serverUrl, space, requestTimeoutMs.toULong(), longPollMs.toULong(), debounceMs.toULong(),
        minBackoffMs.toULong(), maxBackoffMs.toULong(),
    )
}

/** What one sync did. */
data class SyncReport(
    val pushed: Long,
    val pulled: Long,
    val applied: Long,
    val bytesSent: Long,
    val bytesReceived: Long,
    val durationMs: Long,
) {
    internal companion object {
        fun from(r: dev.confluo.ffi.SyncReport) = SyncReport(
            r.pushed.toLong(), r.pulled.toLong(), r.applied.toLong(),
            r.bytesSent.toLong(), r.bytesReceived.toLong(), r.durationMs.toLong(),
        )
    }
}

/** What background sync is doing. */
sealed interface SyncState {
    /** Caught up. */
    data object Idle : SyncState

    data object Syncing : SyncState

    /**
     * No network: the platform said so ([retryInMs] null), or the server is
     * unreachable (the next attempt is in [retryInMs]).
     */
    data class Offline(val retryInMs: Long?) : SyncState

    /** The last attempt failed; the next is in [retryInMs]. */
    data class Error(val message: String, val retryInMs: Long) : SyncState
}

/** Background sync's status, as [Confluo.syncStatus] emits it. */
data class SyncStatus(
    val state: SyncState,
    /** Rows with local changes the server has not accepted yet. */
    val pending: Long,
    /** When the last sync succeeded (milliseconds since the epoch), if ever. */
    val lastSyncedMs: Long?,
) {
    internal companion object {
        val INITIAL = SyncStatus(SyncState.Idle, 0, null)

        fun from(s: dev.confluo.ffi.SyncStatus) = SyncStatus(
            when (val st = s.state) {
                is dev.confluo.ffi.SyncState.Idle -> SyncState.Idle
                is dev.confluo.ffi.SyncState.Syncing -> SyncState.Syncing
                is dev.confluo.ffi.SyncState.Offline -> SyncState.Offline(st.retryInMs?.toLong())
                is dev.confluo.ffi.SyncState.Error -> SyncState.Error(st.message, st.retryInMs.toLong())
            },
            s.pending.toLong(),
            s.lastSyncedMs?.toLong(),
        )
    }
}
