package dev.confluo.todo.core

import dev.confluo.Confluo
import dev.confluo.ConfluoException
import dev.confluo.SyncOptions
import dev.confluo.SyncState
import dev.confluo.SyncStatus
import dev.confluo.TokenProvider
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.StateFlow
import java.net.URI
import java.net.URISyntaxException
import java.util.UUID

/** One todo as the app shows it. */
data class TodoItem(val id: String, val title: String, val done: Boolean)

/** Where to sync, as the settings screen stores it. */
data class SyncSettings(val serverUrl: String, val space: String, val token: String) {
    val complete: Boolean get() = serverUrl.isNotBlank() && space.isNotBlank() && token.isNotBlank()

    /** The options for Confluo; throws [ConfluoException.InvalidInput] for a URL that is not http(s). */
    fun options(): SyncOptions = try {
        SyncOptions(URI(serverUrl.trim()), space.trim())
    } catch (e: URISyntaxException) {
        throw ConfluoException.InvalidInput("\"$serverUrl\" is not a URL: ${e.reason}")
    }

    /**
     * This demo's token is typed in the settings, so there is nothing to
     * refresh: a refused token ends in "Sign in again". A real app fetches
     * a new one from its auth server when [TokenProvider.token] is asked to
     * invalidate.
     */
    fun tokens(): TokenProvider = TokenProvider { token }
}

/** How one sync went, as the background worker needs to know it. */
enum class SyncOutcome {
    SYNCED,
    /** No settings yet: nothing to do. */
    NOT_CONFIGURED,
    /** The server was unreachable or busy: try again later. */
    RETRY_LATER,
    /** The token was refused: retrying cannot help until the user signs in again. */
    SIGN_IN_REQUIRED,
    /** Anything else (bad settings, storage): retrying the same sync would fail the same way. */
    FAILED,
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
        db.watch("SELECT id, title, done FROM todo ORDER BY created_at, id", tables = listOf("todo")) {
            TodoItem(it.string("id"), it.string("title"), it.boolean("done"))
        }

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
        if (settings.complete) db.startSync(settings.options(), settings.tokens())
    }

    suspend fun stopSync() = db.stopSync()

    /** The platform's network hint (remembered while sync is stopped). */
    suspend fun setOnline(online: Boolean) = db.setOnline(online)

    /** A sync now, e.g. from WorkManager's periodic or expedited work. */
    suspend fun syncOnce(settings: SyncSettings): SyncOutcome {
        if (!settings.complete) return SyncOutcome.NOT_CONFIGURED
        return try {
            db.syncNow(settings.options(), settings.tokens())
            SyncOutcome.SYNCED
        } catch (e: ConfluoException.Auth) {
            SyncOutcome.SIGN_IN_REQUIRED
        } catch (e: ConfluoException.Network) {
            if (e.retryable) SyncOutcome.RETRY_LATER else SyncOutcome.FAILED
        } catch (e: ConfluoException) {
            SyncOutcome.FAILED
        }
    }

    /**
     * Signs out: stops sync, deletes this account's todos from the device
     * (unsent edits too: they belong to the account), and returns the
     * settings to save, without the token, so nothing syncs until the user
     * signs in again (to this space or another).
     */
    suspend fun signOut(settings: SyncSettings): SyncSettings {
        db.signOutAndClear()
        return settings.copy(token = "")
    }
}

/** What the sync status chip shows. */
data class SyncChip(val label: String, val kind: Kind) {
    enum class Kind { SYNCED, SYNCING, OFFLINE, ERROR, STOPPED, SIGN_IN }

    companion object {
        fun of(status: SyncStatus): SyncChip {
            val pending = if (status.pending > 0) " · ${status.pending} pending" else ""
            return when (val s = status.state) {
                SyncState.Idle -> SyncChip("Synced$pending", Kind.SYNCED)
                SyncState.Syncing -> SyncChip("Syncing…$pending", Kind.SYNCING)
                is SyncState.Offline -> SyncChip("Offline$pending", Kind.OFFLINE)
                is SyncState.Error -> {
                    val seconds = (s.retryIn.inWholeMilliseconds + 999) / 1000
                    SyncChip("Sync error, retrying in $seconds s$pending", Kind.ERROR)
                }
                SyncState.Stopped -> SyncChip("Not syncing$pending", Kind.STOPPED)
                is SyncState.AuthRequired -> SyncChip("Sign in again$pending", Kind.SIGN_IN)
            }
        }
    }
}
