package dev.confluo.todo.core

import dev.confluo.Confluo
import dev.confluo.SyncOptions
import dev.confluo.SyncState
import dev.confluo.SyncStatus
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.map
import java.util.UUID

/** One todo as the app shows it. */
data class TodoItem(val id: String, val title: String, val done: Boolean)

/** Where to sync, as the settings screen stores it. */
data class SyncSettings(val serverUrl: String, val space: String, val token: String) {
    val complete: Boolean get() = serverUrl.isNotBlank() && space.isNotBlank() && token.isNotBlank()
}

/**
 * The todo list's logic, free of Android: the app's ViewModel and the JVM
 * tests both use it.
 */
class TodoRepository private constructor(private val db: Confluo) {
    companion object {
        const val SCHEMA = """
            CREATE TABLE IF NOT EXISTS todo(
                id TEXT PRIMARY KEY NOT NULL,
                title TEXT NOT NULL DEFAULT '',
                done INTEGER NOT NULL DEFAULT 0,
                created_at INTEGER NOT NULL DEFAULT 0
            )"""

        /**
         * Each later change of the table, in order, for ever (every install
         * runs the same list, so columns keep their identities across
         * renames). Append; never edit or remove an entry.
         */
        val MIGRATIONS: List<String> = emptyList()

        /** Opens the list in [db], creating (or migrating) and syncing the table. */
        suspend fun open(db: Confluo): TodoRepository {
            db.enableSyncWithHistory("todo", SCHEMA, MIGRATIONS)
            return TodoRepository(db)
        }
    }

    /** The list, oldest first, updated after every local or synced change. */
    val todos: Flow<List<TodoItem>> =
        db.watch("SELECT id, title, done FROM todo ORDER BY created_at, id", tables = listOf("todo"))
            .map { rows -> rows.map { TodoItem(it.string("id"), it.string("title"), it.boolean("done")) } }

    /** Background sync's status, for the status chip. */
    val syncStatus: StateFlow<SyncStatus> get() = db.syncStatus

    suspend fun add(title: String): String {
        val id = UUID.randomUUID().toString()
        db.execute(
            "INSERT INTO todo(id, title, done, created_at) VALUES (?, ?, 0, ?)",
            id, title.trim(), System.currentTimeMillis(),
        )
        return id
    }

    suspend fun toggle(id: String) {
        db.execute("UPDATE todo SET done = 1 - done WHERE id = ?", id)
    }

    suspend fun rename(id: String, title: String) {
        db.execute("UPDATE todo SET title = ? WHERE id = ?", title.trim(), id)
    }

    suspend fun delete(id: String) {
        db.execute("DELETE FROM todo WHERE id = ?", id)
    }

    /** Starts (or restarts) background sync with [settings]; does nothing until they are complete. */
    suspend fun startSync(settings: SyncSettings) {
        if (settings.complete) db.startSync(SyncOptions(settings.serverUrl, settings.space)) { settings.token }
    }

    suspend fun stopSync() = db.stopSync()

    /** The platform's network hint. */
    fun setOnline(online: Boolean) = db.setOnline(online)

    /** A sync now, e.g. from WorkManager's periodic or expedited work. */
    suspend fun syncOnce(settings: SyncSettings) {
        if (settings.complete) db.syncNow(SyncOptions(settings.serverUrl, settings.space)) { settings.token }
    }
}

/** What the sync status chip shows. */
data class SyncChip(val label: String, val kind: Kind) {
    enum class Kind { SYNCED, SYNCING, OFFLINE, ERROR }

    companion object {
        fun of(status: SyncStatus): SyncChip {
            val pending = if (status.pending > 0) " · ${status.pending} pending" else ""
            return when (val s = status.state) {
                SyncState.Idle -> SyncChip("Synced$pending", Kind.SYNCED)
                SyncState.Syncing -> SyncChip("Syncing…$pending", Kind.SYNCING)
                is SyncState.Offline -> SyncChip("Offline$pending", Kind.OFFLINE)
                is SyncState.Error -> SyncChip("Sync error, retrying in ${(s.retryInMs + 999) / 1000} s$pending", Kind.ERROR)
                SyncState.Stopped -> SyncChip("Not syncing$pending", Kind.OFFLINE)
                is SyncState.AuthRequired -> SyncChip("Sign in again$pending", Kind.ERROR)
            }
        }
    }
}
