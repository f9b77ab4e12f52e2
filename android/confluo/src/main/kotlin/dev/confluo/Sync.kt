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
    /** Received changes this database could not apply, kept aside (see [Confluo.rejectedChanges]). */
    val rejected: Long = 0,
    /**
     * The server's clock minus this device's, in milliseconds, from its last
     * answer; far from zero means this device's clock is wrong.
     */
    val clockOffsetMs: Long? = null,
) {
    internal companion object {
        fun from(r: dev.confluo.ffi.SyncReport) = SyncReport(
            r.pushed.toLong(), r.pulled.toLong(), r.applied.toLong(),
            r.bytesSent.toLong(), r.bytesReceived.toLong(), r.durationMs.toLong(),
            r.rejected.toLong(), r.clockOffsetMs,
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

    /** Background sync is not running. */
    data object Stopped : SyncState

    /** The server refused the token, a refreshed one too: sign in again. */
    data class AuthRequired(val message: String) : SyncState
}

/** Background sync's status, as [Confluo.syncStatus] emits it. */
data class SyncStatus(
    val state: SyncState,
    /** Rows with local changes the server has not accepted yet. */
    val pending: Long,
    /** When the last sync succeeded (milliseconds since the epoch), if ever. */
    val lastSyncedMs: Long?,
    /** Changes from the server this database could not apply, kept aside (see [Confluo.rejectedChanges]). */
    val rejected: Long = 0,
    /** The server's clock minus this device's, in milliseconds, as of the last sync. */
    val clockOffsetMs: Long? = null,
) {
    internal companion object {
        val INITIAL = SyncStatus(SyncState.Idle, 0, null)

        fun from(s: dev.confluo.ffi.SyncStatus) = SyncStatus(
            when (val st = s.state) {
                is dev.confluo.ffi.SyncState.Idle -> SyncState.Idle
                is dev.confluo.ffi.SyncState.Syncing -> SyncState.Syncing
                is dev.confluo.ffi.SyncState.Offline -> SyncState.Offline(st.retryInMs?.toLong())
                is dev.confluo.ffi.SyncState.Error -> SyncState.Error(st.message, st.retryInMs.toLong())
                is dev.confluo.ffi.SyncState.Stopped -> SyncState.Stopped
                is dev.confluo.ffi.SyncState.AuthRequired -> SyncState.AuthRequired(st.message)
            },
            s.pending.toLong(),
            s.lastSyncedMs?.toLong(),
            s.rejected.toLong(),
            s.clockOffsetMs,
        )
    }
}

/**
 * A change from the server this database could not apply (its schema or a
 * trigger refused it), kept aside with the [reason] and tried again after
 * each migration of its table. [table] and [column] (null for the row
 * itself) are their names in this database (for a column it does not have,
 * the name the column was made with).
 * [key] holds the row's primary key as plain values (null, Long, Double,
 * String or ByteArray).
 */
data class RejectedChange(
    val table: String,
    val key: List<Any?>,
    val column: String?,
    val reason: String,
) {
    internal companion object {
        fun from(r: dev.confluo.ffi.RejectedChange) = RejectedChange(r.table, r.key.map(::fromSql), r.column, r.reason)
    }
}
