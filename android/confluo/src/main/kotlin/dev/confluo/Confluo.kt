// The Kotlin API of a Confluo database: suspend calls off the caller's
// thread, Flows for queries and sync status, ConfluoException for failures.
package dev.confluo

import dev.confluo.ffi.BackgroundSync
import dev.confluo.ffi.ChangeListener
import dev.confluo.ffi.Database
import dev.confluo.ffi.SyncCancellation
import dev.confluo.ffi.SyncStatusListener
import dev.confluo.ffi.TransactionBody
import dev.confluo.ffi.WriteTransaction
import kotlinx.coroutines.CancellationException
import kotlinx.coroutines.CompletableDeferred
import kotlinx.coroutines.CoroutineDispatcher
import kotlinx.coroutines.CoroutineScope
import kotlinx.coroutines.CoroutineStart
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.SupervisorJob
import kotlinx.coroutines.awaitCancellation
import kotlinx.coroutines.cancel
import kotlinx.coroutines.channels.Channel
import kotlinx.coroutines.channels.awaitClose
import kotlinx.coroutines.coroutineScope
import kotlinx.coroutines.ensureActive
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.asStateFlow
import kotlinx.coroutines.flow.callbackFlow
import kotlinx.coroutines.flow.conflate
import kotlinx.coroutines.flow.flowOn
import kotlinx.coroutines.flow.transform
import kotlinx.coroutines.launch
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.sync.Mutex
import kotlinx.coroutines.sync.withLock
import kotlinx.coroutines.withContext
import java.util.concurrent.atomic.AtomicBoolean
import dev.confluo.ffi.ConfluoException as FfiException

/**
 * A Confluo database: an ordinary SQLite database whose synced tables
 * converge across devices.
 *
 * Every method that touches the database is `suspend` and runs on the
 * dispatcher given at open (by default [Dispatchers.IO]), so it is safe to
 * call from the main thread. Failures are thrown as [ConfluoException] (SQL
 * errors carry SQLite's message); after [close], every call throws
 * [ConfluoException.Closed].
 */
class Confluo private constructor(
    private val db: Database,
    private val dispatcher: CoroutineDispatcher,
    firstStatus: SyncStatus,
) : AutoCloseable {

    companion object {
        /** Opens (creating if needed) the database file at [path]. */
        suspend fun open(path: String, dispatcher: CoroutineDispatcher = Dispatchers.IO): Confluo =
            withContext(dispatcher) { wrap(ffiCall { Database.open(path) }, dispatcher) }

        /** Opens a private in-memory database (for tests and previews). */
        suspend fun openInMemory(dispatcher: CoroutineDispatcher = Dispatchers.IO): Confluo =
            withContext(dispatcher) { wrap(ffiCall { Database.openInMemory() }, dispatcher) }

        /**
         * Sends the engine's messages of [level] and more severe to [logger]
         * (replacing the logger set before, for every database of the
         * process); null turns logging off. On Android, `LogcatLogger()`.
         */
        fun setLogger(level: LogLevel, logger: ConfluoLogger?) = installLogger(level, logger)

        private fun wrap(db: Database, dispatcher: CoroutineDispatcher): Confluo = try {
            Confluo(db, dispatcher, SyncStatus.from(ffiCall { db.stoppedStatus() }))
        } catch (e: Throwable) {
            db.destroy()
            throw e
        }
    }

    private val closed = AtomicBoolean(false)
    /** Completed by [close]: ends [watch] flows. */
    private val closing = CompletableDeferred<Unit>()
    private val status = MutableStateFlow(firstStatus)

    /** Starts, stops and sign-outs, one at a time. */
    private val syncLock = Mutex()
    /** Guards [running] and [publisher], so a stopped sync can never publish again. */
    private val statusLock = Any()
    private var running: BackgroundSync? = null
    private var publisher: StatusPublisher? = null

    /** The thread running a [write] body, while one runs (see [io]). */
    @Volatile
    private var writing: Thread? = null

    /** Work of this database's own (refreshing the stopped status); cancelled by [close]. */
    private val scope = CoroutineScope(SupervisorJob() + dispatcher)
    private val commits = Channel<Unit>(Channel.CONFLATED)
    /** While no sync runs, commits change the pending count: this keeps the status honest. */
    private val commitObserver = db.observe(emptyList(), object : ChangeListener {
        override fun onChange(tables: List<String>) {
            commits.trySend(Unit)
        }
    })

    init {
        scope.launch {
            for (commit in commits) refreshStoppedStatus()
        }
    }

    /**
     * Background sync's status: stopped, idle, syncing, offline, error or
     * auth required; pending and rejected counts; last sync time; clock
     * offset. It starts as the real stopped status (unsent writes count as
     * pending).
     */
    val syncStatus: StateFlow<SyncStatus> = status.asStateFlow()

    /** This database's site id (a UUID), created once and kept in the file. */
    suspend fun siteId(): String = io { db.siteId() }

    /** The space this database syncs with, once it has tried to; null before, and after [signOutAndClear]. */
    suspend fun boundSpace(): String? = io { db.boundSpace() }

    /** Runs one statement in its own transaction; returns the number of rows it changed. */
    suspend fun execute(sql: String, vararg args: Any?): Long = io { db.execute(sql, toSql(args)).toLong() }

    /** Runs several statements (a migration, say) in one transaction. */
    suspend fun executeBatch(sql: String): Unit = io { db.executeBatch(sql) }

    /** Runs a query; read-only queries never wait behind a write. */
    suspend fun query(sql: String, vararg args: Any?): List<Row> = io { rowsOf(db.query(sql, toSql(args))) }

    /** Runs a query and maps each row with [map] (e.g. `{ Todo(it.string("id"), it.string("title")) }`). */
    suspend fun <T> query(sql: String, vararg args: Any?, map: (Row) -> T): List<T> = query(sql, *args).map(map)

    /**
     * Runs [block] in one write transaction: committed when it returns,
     * rolled back when it throws (the exception is rethrown). [block] runs on
     * the database's thread and must not suspend or keep [WriteScope]. Run
     * its statements on [WriteScope]: a call on this database from [block]
     * that needs the writer throws [ConfluoException.InvalidInput] at once.
     */
    suspend fun <T> write(block: (WriteScope) -> T): T = io {
        var outcome: Result<T>? = null
        try {
            db.write(object : TransactionBody {
                override fun run(tx: WriteTransaction) {
                    writing = Thread.currentThread()
                    try {
                        outcome = runCatching { block(WriteScope(tx)) }
                    } finally {
                        writing = null
                    }
                    outcome!!.exceptionOrNull()?.let { throw FfiException.InvalidInput(it.message ?: it.toString()) }
                }
            })
        } catch (e: FfiException) {
            // The block's own exception beats the rollback's report of it.
            outcome?.exceptionOrNull()?.let { throw it }
            throw e
        }
        outcome!!.getOrThrow()
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
     * collectors see the latest result, not every intermediate one. The
     * flow completes when the database closes.
     */
    fun watch(sql: String, vararg args: Any?, tables: List<String> = emptyList()): Flow<List<Row>> =
        watch(sql, *args, tables = tables) { it }

    /** [watch] with each row mapped by [map]. */
    fun <T> watch(sql: String, vararg args: Any?, tables: List<String> = emptyList(), map: (Row) -> T): Flow<List<T>> {
        val params = toSql(args)
        return callbackFlow {
            val observer = engine {
                db.observe(tables, object : ChangeListener {
                    override fun onChange(tables: List<String>) {
                        trySend(Unit)
                    }
                })
            }
            launch {
                closing.await()
                channel.close()
            }
            send(Unit)
            awaitClose {
                observer.cancel()
                observer.close()
            }
        }.conflate()
            .transform {
                val rows = try {
                    engine { rowsOf(db.query(sql, params)) }
                } catch (e: ConfluoException.Closed) {
                    return@transform // closed while a commit was being answered: the flow is ending
                }
                emit(rows.map(map))
            }
            .flowOn(dispatcher)
    }

    /**
     * Syncs once with the server: pushes, then pulls until caught up.
     * Cancelling the calling coroutine stops the sync before its next
     * request, and this throws [CancellationException].
     */
    suspend fun syncNow(options: SyncOptions, tokens: TokenProvider): SyncReport = coroutineScope {
        val cancellation = SyncCancellation()
        // Unconfined and undispatched, so the engine hears of a cancellation
        // while cancel() runs, not later from some other thread.
        val relay = launch(Dispatchers.Unconfined, start = CoroutineStart.UNDISPATCHED) {
            try {
                awaitCancellation()
            } finally {
                cancellation.cancel()
            }
        }
        try {
            io { SyncReport.from(db.syncNow(options.toFfi(), tokens.toFfi(), cancellation)) }
        } catch (e: ConfluoException) {
            // A request cut short by the cancellation fails however it fails: report the cancellation.
            ensureActive()
            if (e is ConfluoException.Cancelled) throw CancellationException("syncNow was cancelled").apply { initCause(e) }
            throw e
        } finally {
            relay.cancel()
        }
    }

    /**
     * Starts background sync (replacing one already running): a sync shortly
     * after local commits, a long poll for changes from other devices, and
     * retries with backoff. Its status flows into [syncStatus]. It starts
     * with the last [setOnline] hint.
     */
    suspend fun startSync(options: SyncOptions, tokens: TokenProvider): Unit = syncLock.withLock {
        io {
            detachSync()?.let { it.stop(); it.close() }
            val next = StatusPublisher()
            synchronized(statusLock) { publisher = next }
            try {
                val handle = db.startSync(options.toFfi(), tokens.toFfi(), next)
                synchronized(statusLock) { running = handle }
            } catch (e: Throwable) {
                detachSync()
                publishStoppedStatus()
                throw e
            }
        }
    }

    /**
     * The platform's network hint: offline pauses background sync, online
     * resumes it at once. Remembered while no sync runs: the next
     * [startSync] starts with it.
     */
    suspend fun setOnline(online: Boolean): Unit = io { db.setOnline(online) }

    /** Asks background sync to sync now, skipping any backoff (and retrying after [SyncState.AuthRequired]). */
    fun syncSoon() {
        if (closed.get()) throw ConfluoException.Closed()
        val handle = synchronized(statusLock) { running } ?: return
        try {
            handle.syncSoon()
        } catch (e: IllegalStateException) {
            // Released by a stop that ran meanwhile: there is no sync to hurry.
        }
    }

    /**
     * Stops background sync (it returns within about a second, off the
     * caller's thread). Once it returns the status is the stopped status
     * and background sync emits nothing more.
     */
    suspend fun stopSync(): Unit = syncLock.withLock {
        io {
            detachSync()?.let { it.stop(); it.close() }
            publishStoppedStatus()
        }
    }

    /**
     * Signs out: stops background sync, forgets the space, its cursor and
     * the token provider, and deletes every synced row with its metadata,
     * in one transaction (nothing of it is sent). Local, unsynced tables
     * stay. Afterwards the database can sync with another space.
     */
    suspend fun signOutAndClear(): Unit = syncLock.withLock {
        io {
            // The engine stops the sync itself; the handle only has to go.
            val handle = detachSync()
            db.signOutAndClear()
            handle?.close()
            publishStoppedStatus()
        }
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

    /**
     * Closes the database; the file can be opened again afterwards. It does
     * not wait for background sync (which halts and emits nothing more),
     * and every later call throws [ConfluoException.Closed]. Closing twice
     * does nothing.
     */
    override fun close() {
        if (!closed.compareAndSet(false, true)) return
        synchronized(statusLock) {
            publisher?.active = false
            publisher = null
            running = null
            status.value = status.value.copy(state = SyncState.Stopped)
        }
        closing.complete(Unit)
        scope.cancel()
        commitObserver.cancel()
        commitObserver.close()
        try {
            ffiCall { db.closeDatabase() }
        } finally {
            db.destroy()
        }
    }

    /** Forwards one background sync's statuses until it is detached. */
    private inner class StatusPublisher : SyncStatusListener {
        /** Read and written under [statusLock]. */
        var active = true

        override fun onStatus(status: dev.confluo.ffi.SyncStatus) {
            val next = SyncStatus.from(status)
            synchronized(statusLock) {
                if (active) this@Confluo.status.value = next
            }
        }
    }

    /** Silences the running sync's publisher and hands over its handle (to stop it, or not). */
    private fun detachSync(): BackgroundSync? = synchronized(statusLock) {
        publisher?.active = false
        publisher = null
        running.also { running = null }
    }

    private fun publishStoppedStatus() {
        val stopped = try {
            SyncStatus.from(db.stoppedStatus())
        } catch (e: Exception) {
            // Closed meanwhile (a released handle throws IllegalStateException): keep the counts we had.
            status.value.copy(state = SyncState.Stopped)
        }
        synchronized(statusLock) {
            if (publisher == null) status.value = stopped
        }
    }

    private fun refreshStoppedStatus() {
        if (closed.get() || synchronized(statusLock) { publisher != null }) return
        val stopped = try {
            SyncStatus.from(engine { db.stoppedStatus() })
        } catch (e: ConfluoException) {
            return // closed meanwhile, or the next commit will tell
        }
        synchronized(statusLock) {
            // A sync started meanwhile reports its own counts.
            if (publisher == null && !closed.get()) status.value = stopped
        }
    }

    /**
     * Runs a call into the engine: [ConfluoException.Closed] once closed
     * (the generated object reports a released handle as
     * IllegalStateException), the engine's errors as [ConfluoException].
     */
    private inline fun <T> engine(block: () -> T): T {
        if (closed.get()) throw ConfluoException.Closed()
        return try {
            ffiCall(block)
        } catch (e: IllegalStateException) {
            if (closed.get()) throw ConfluoException.Closed(e)
            throw e
        }
    }

    /**
     * Runs [block] on the dispatcher; but a call from inside a [write] body
     * stays on the body's thread, where the engine refuses what needs the
     * writer at once (on another thread it would wait for that write for ever).
     */
    private suspend fun <T> io(block: () -> T): T =
        if (writing === Thread.currentThread()) engine(block) else withContext(dispatcher) { engine(block) }
}

/** The statements of a write transaction. Valid only inside [Confluo.write], on its thread. */
class WriteScope internal constructor(private val tx: WriteTransaction) {
    fun execute(sql: String, vararg args: Any?): Long = ffiCall { tx.execute(sql, toSql(args)).toLong() }

    fun executeBatch(sql: String): Unit = ffiCall { tx.executeBatch(sql) }

    fun query(sql: String, vararg args: Any?): List<Row> = ffiCall { rowsOf(tx.query(sql, toSql(args))) }

    fun <T> query(sql: String, vararg args: Any?, map: (Row) -> T): List<T> = query(sql, *args).map(map)
}

/** The engine calls the provider on a sync thread, where blocking for a suspending provider is fine. */
private fun TokenProvider.toFfi(): dev.confluo.ffi.TokenProvider {
    val provider = this
    return object : dev.confluo.ffi.TokenProvider {
        override fun token(invalidate: Boolean): String = try {
            runBlocking { provider.token(invalidate) }
        } catch (e: Exception) {
            throw FfiException.Auth("the token provider failed: ${e.message ?: e}")
        }
    }
}
