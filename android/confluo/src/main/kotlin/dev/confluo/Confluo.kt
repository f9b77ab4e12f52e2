package dev.confluo

import dev.confluo.ffi.ChangeListener
import dev.confluo.ffi.ConfluoException
import dev.confluo.ffi.Database
import dev.confluo.ffi.TransactionBody
import dev.confluo.ffi.WriteTransaction
import kotlinx.coroutines.CoroutineDispatcher
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.channels.awaitClose
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.asStateFlow
import kotlinx.coroutines.flow.callbackFlow
import kotlinx.coroutines.flow.conflate
import kotlinx.coroutines.flow.flowOn
import kotlinx.coroutines.flow.map
import kotlinx.coroutines.sync.Mutex
import kotlinx.coroutines.sync.withLock
import kotlinx.coroutines.withContext

/**
 * A Confluo database: an ordinary SQLite database whose synced tables
 * converge across devices.
 *
 * Every method that touches the database is `suspend` and runs on
 * [dispatcher] (by default [Dispatchers.IO]), so it is safe to call from
 * the main thread. Failures are thrown as [ConfluoException] (SQL errors
 * carry SQLite's message). Close it when done: it is [AutoCloseable].
 */
class Confluo private constructor(
    private val db: Database,
    private val dispatcher: CoroutineDispatcher,
) : AutoCloseable {

    companion object {
        /** Opens (creating if needed) the database file at [path]. */
        fun open(path: String, dispatcher: CoroutineDispatcher = Dispatchers.IO): Confluo =
            Confluo(Database.open(path), dispatcher)

        /** Opens a private in-memory database (for tests and previews). */
        fun openInMemory(dispatcher: CoroutineDispatcher = Dispatchers.IO): Confluo =
            Confluo(Database.openInMemory(), dispatcher)
    }

    private val status = MutableStateFlow(SyncStatus.INITIAL)
    /** Background sync, changed only under [syncLock], one change at a time. */
    private val syncLock = Mutex()
    @Volatile
    private var sync: dev.confluo.ffi.BackgroundSync? = null
    /** The thread running a [write] body, while one runs (see [io]). */
    @Volatile
    private var writing: Thread? = null

    /** This database's site id (a UUID), created once and kept in the file. */
    val siteId: String get() = db.siteId()

    /** Background sync's status: idle, syncing, offline or error; pending and rejected counts; last sync time; clock offset. */
    val syncStatus: StateFlow<SyncStatus> = status.asStateFlow()

    /** Runs one statement in its own transaction; returns the number of rows it changed. */
    suspend fun execute(sql: String, vararg args: Any?): Long = io { db.execute(sql, toSql(args)).toLong() }

    /** Runs several statements (a migration, say) in one transaction. */
    suspend fun executeBatch(sql: String): Unit = io { db.executeBatch(sql) }

    /** Runs a query; read-only queries never wait behind a write. */
    suspend fun query(sql: String, vararg args: Any?): List<Row> = io { rowsOf(db.query(sql, toSql(args))) }

    /**
     * Runs [block] in one write transaction: committed when it returns,
     * rolled back when it throws (the exception is rethrown). [block] runs on
     * the database's thread and must not suspend or keep [Transaction]. Run
     * its statements on [Transaction]: a call on this database from [block]
     * that needs the writer throws [ConfluoException.InvalidInput] at once.
     */
    suspend fun <T> write(block: (Transaction) -> T): T = io {
        var result: Result<T>? = null
        try {
            db.write(object : TransactionBody {
                override fun run(tx: WriteTransaction) {
                    writing = Thread.currentThread()
                    try {
                        result = runCatching { block(Transaction(tx)) }
                    } finally {
                        writing = null
                    }
                    result!!.exceptionOrNull()?.let { throw ConfluoException.InvalidInput(it.message ?: it.toString()) }
                }
            })
        } catch (e: ConfluoException) {
            // The block's own exception beats the rollback's report of it.
            result?.exceptionOrNull()?.let { throw it }
            throw e
        }
        result!!.getOrThrow()
    }

    /** Makes [table] a synced table (see the engine's rules on what it refuses). */
    suspend fun enableSync(table: String): Unit = io { db.enableSync(table) }

    /** Runs a migration of a synced table and re-installs its change tracking. */
    suspend fun alterSyncedTable(table: String, sql: String): Unit = io { db.alterSyncedTable(table, sql) }

    /**
     * Makes [table] synced and brings it to the end of its history: [create]
     * is the statement that first made it, [migrations] every later change of
     * it in order (the same lists on every install). Whether the table is
     * missing, older, or made directly in its latest shape by a new install,
     * it ends with the columns (and column identities) the whole history
     * gives; only the migrations it lacks run, so call it at every start.
     */
    suspend fun enableSyncWithHistory(table: String, create: String, migrations: List<String>): Unit =
        io { db.enableSyncWithHistory(table, create, migrations) }

    /** Rows with local changes the sync server has not accepted yet. */
    suspend fun pendingChanges(): Long = io { db.pendingChanges().toLong() }

    /** The changes from the server kept aside because this database could not apply them. */
    suspend fun rejectedChanges(): List<RejectedChange> = io { db.rejectedChanges().map(RejectedChange::from) }

    /** How many changes are kept aside (see [rejectedChanges]). */
    suspend fun rejectedCount(): Long = io { db.rejectedCount().toLong() }

    /**
     * Emits the result of [sql] now and again after every commit (local or
     * synced) that changes any of [tables] (every table when empty). Slow
     * collectors see the latest result, not every intermediate one.
     */
    fun watch(sql: String, vararg args: Any?, tables: List<String> = emptyList()): Flow<List<Row>> {
        val params = toSql(args)
        return callbackFlow {
            val observer = db.observe(tables, object : ChangeListener {
                override fun onChange(tables: List<String>) {
                    trySend(Unit)
                }
            })
            send(Unit)
            awaitClose {
                observer.cancel()
                observer.close()
            }
        }.conflate()
            .map { rowsOf(db.query(sql, params)) }
            .flowOn(dispatcher)
    }

    /** Syncs once with the server: pushes, then pulls until caught up. */
    suspend fun syncNow(options: SyncOptions, token: () -> String): SyncReport =
        io { SyncReport.from(db.syncNow(options.toFfi(), tokenProvider(token), null)) }

    /**
     * Starts background sync (replacing one already running): a sync shortly
     * after local commits, a long poll for changes from other devices, and
     * retries with backoff. Its status flows into [syncStatus].
     */
    suspend fun startSync(options: SyncOptions, token: () -> String) = syncLock.withLock {
        io {
            stopSyncLocked()
            sync = db.startSync(options.toFfi(), tokenProvider(token), object : dev.confluo.ffi.SyncStatusListener {
                override fun onStatus(status: dev.confluo.ffi.SyncStatus) {
                    this@Confluo.status.value = SyncStatus.from(status)
                }
            })
        }
    }

    /** The platform's network hint: offline pauses background sync, online resumes it at once. */
    fun setOnline(online: Boolean) {
        sync?.setOnline(online)
    }

    /** Asks background sync to sync now, skipping any backoff. */
    fun syncSoon() {
        sync?.syncSoon()
    }

    /** Stops background sync (returns within about a second, off the caller's thread). */
    suspend fun stopSync() = syncLock.withLock { io { stopSyncLocked() } }

    private fun stopSyncLocked() {
        sync?.let {
            it.stop()
            it.close()
        }
        sync = null
    }

    /** Everything recorded after [since], encoded (peer-to-peer sync). */
    suspend fun changesSince(since: Long): ByteArray = io { db.changesSince(since.toULong()) }

    /** What peer [peerSiteId] misses, given what it has seen from us. */
    suspend fun changesForPeer(peerSiteId: String, seenByPeer: Long): ByteArray =
        io { db.changesForPeer(peerSiteId, seenByPeer.toULong()) }

    /** How much of [peerSiteId]'s history this database has received. */
    suspend fun seenVersion(peerSiteId: String): Long = io { db.seenVersion(peerSiteId).toLong() }

    /** Merges an encoded change set atomically; returns how many changes won. */
    suspend fun applyChanges(changeset: ByteArray): Long = io { db.applyChanges(changeset).applied.toLong() }

    /** Stops sync and closes the database; the file can be opened again afterwards. */
    override fun close() {
        stopSyncLocked()
        try {
            db.closeDatabase()
        } finally {
            db.destroy()
        }
    }

    /**
     * Runs [block] on [dispatcher]; but a call from inside a [write] body stays
     * on the body's thread, where the engine refuses what needs the writer at
     * once (on another thread it would wait for that write for ever).
     */
    private suspend fun <T> io(block: () -> T): T =
        if (writing === Thread.currentThread()) block() else withContext(dispatcher) { block() }

    private fun tokenProvider(token: () -> String) = object : dev.confluo.ffi.TokenProvider {
        override fun token(invalidate: Boolean): String = try {
            token()
        } catch (e: Exception) {
            throw ConfluoException.Auth(e.message ?: e.toString())
        }
    }
}

/** The statements of a write transaction. Valid only inside [Confluo.write]. */
class Transaction internal constructor(private val tx: WriteTransaction) {
    fun execute(sql: String, vararg args: Any?): Long = tx.execute(sql, toSql(args)).toLong()

    fun executeBatch(sql: String) = tx.executeBatch(sql)

    fun query(sql: String, vararg args: Any?): List<Row> = rowsOf(tx.query(sql, toSql(args)))
}
