// Sync options, reports and statuses, and the token provider, in Kotlin's terms.
package dev.confluo

import java.net.URI
import kotlin.time.Duration
import kotlin.time.Duration.Companion.milliseconds

/**
 * Where and how to sync. [serverUrl] must be an http or https URL with a
 * host. A duration left null (or zero) means the engine's default: request
 * timeout 30 s, long poll 25 s, debounce after local commits 200 ms,
 * backoff from 1 s up to 5 min.
 */
data class SyncOptions(
    val serverUrl: URI,
    val space: String,
    val requestTimeout: Duration? = null,
    val longPoll: Duration? = null,
    val debounce: Duration? = null,
    val minBackoff: Duration? = null,
    val maxBackoff: Duration? = null,
) {
    init {
        val scheme = serverUrl.scheme?.lowercase()
        if (scheme != "http" && scheme != "https") {
            throw ConfluoException.InvalidInput("the server URL must be http or https, not \"$serverUrl\"")
        }
        if (serverUrl.host.isNullOrEmpty()) {
            throw ConfluoException.InvalidInput("the server URL \"$serverUrl\" has no host")
        }
        if (space.isBlank()) throw ConfluoException.InvalidInput("the space name is empty")
        listOf(
            "requestTimeout" to requestTimeout, "longPoll" to longPoll, "debounce" to debounce,
            "minBackoff" to minBackoff, "maxBackoff" to maxBackoff,
        ).forEach { (name, d) ->
            if (d != null && d.isNegative()) throw ConfluoException.InvalidInput("$name is negative ($d)")
        }
    }

    internal fun toFfi() = dev.confluo.ffi.SyncConfig(
        serverUrl.toString(), space, requestTimeout.ms(), longPoll.ms(), debounce.ms(),
        minBackoff.ms(), maxBackoff.ms(),
    )

    // The engine reads 0 as "use the default".
    private fun Duration?.ms(): ULong = (this?.inWholeMilliseconds ?: 0L).toULong()
}

/**
 * Supplies the bearer token for sync requests. [token] is called with
 * `invalidate = false` before requests, and once with `invalidate = true`
 * after the server refused the token it gave: fetch a fresh one then (a
 * refresh). It runs on a sync thread, never the caller's, and may suspend
 * on the network. Throwing makes the sync fail with [ConfluoException.Auth].
 */
fun interface TokenProvider {
    suspend fun token(invalidate: Boolean): String
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
    /** Background sync is not running (not started yet, stopped, or signed out). */
    data object Stopped : SyncState

    /** Caught up. */
    data object Idle : SyncState

    data object Syncing : SyncState

    /**
     * No network: the platform said so ([retryIn] null), or the server is
     * unreachable (the next attempt is in [retryIn]).
     */
    data class Offline(val retryIn: Duration?) : SyncState

    /** The last attempt failed with a [kind] of error; the next is in [retryIn]. */
    data class Error(val kind: ErrorKind, val message: String, val retryIn: Duration) : SyncState

    /**
     * The server refused the token, a refreshed one too: the user must sign
     * in again. No more attempts until [Confluo.syncSoon] (or a new start).
     */
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
        fun from(s: dev.confluo.ffi.SyncStatus) = SyncStatus(
            when (val st = s.state) {
                is dev.confluo.ffi.SyncState.Stopped -> SyncState.Stopped
                is dev.confluo.ffi.SyncState.Idle -> SyncState.Idle
                is dev.confluo.ffi.SyncState.Syncing -> SyncState.Syncing
                is dev.confluo.ffi.SyncState.Offline -> SyncState.Offline(st.retryInMs?.toLong()?.milliseconds)
                is dev.confluo.ffi.SyncState.Error ->
                    SyncState.Error(st.kind.toPublic(), st.message, st.retryInMs.toLong().milliseconds)
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
