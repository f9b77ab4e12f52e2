// The app lifecycle around sync: token refresh, sign-in required, sign-out
// and another space, honest statuses, the network hint, stop, close and
// cancellation, and the engine's log reaching the app's logger.
package dev.confluo

import kotlinx.coroutines.CompletableDeferred
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.delay
import kotlinx.coroutines.flow.first
import kotlinx.coroutines.launch
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertNotNull
import org.junit.jupiter.api.Assertions.assertNull
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.assertThrows
import java.io.IOException
import java.net.URI
import java.nio.file.Files
import java.util.concurrent.CopyOnWriteArrayList
import java.util.concurrent.atomic.AtomicBoolean
import java.util.concurrent.atomic.AtomicInteger
import java.util.concurrent.atomic.AtomicReference
import kotlin.random.Random
import kotlin.time.Duration.Companion.milliseconds
import kotlin.time.Duration.Companion.seconds

private const val TODO_SCHEMA = "CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, title TEXT, status TEXT)"

private suspend fun todoDatabase(): Confluo = Confluo.openInMemory().also {
    it.executeBatch(TODO_SCHEMA)
    it.enableSync("todo")
}

private fun options(url: URI, space: String) =
    SyncOptions(url, space, requestTimeout = 5.seconds, minBackoff = 100.milliseconds, maxBackoff = 800.milliseconds)

private val devToken = TokenProvider { "dev-token" }

private suspend fun Confluo.todoIds(): List<String> = query("SELECT id FROM todo ORDER BY id") { it.string("id") }

private suspend fun Confluo.awaitStatus(what: String, condition: (SyncStatus) -> Boolean): SyncStatus =
    try {
        withTimeout(15_000) { syncStatus.first(condition) }
    } catch (e: kotlinx.coroutines.TimeoutCancellationException) {
        throw AssertionError("no status with $what; the last was ${syncStatus.value}", e)
    }

class LifecycleTest {
    @Test
    fun `a refused token is refreshed once and the fresh one accepted`() = runBlocking<Unit> {
        TestServer.start().use { server ->
            todoDatabase().use { db ->
                db.execute("INSERT INTO todo VALUES ('t1', 'x', 'open')")
                val current = AtomicReference("expired-token")
                val refreshes = AtomicInteger()
                val report = db.syncNow(options(server.url, "refresh")) { invalidate ->
                    if (invalidate) {
                        refreshes.incrementAndGet()
                        current.set("dev-token")
                    }
                    current.get()
                }
                assertEquals(3L, report.pushed)
                assertEquals(1, refreshes.get())
                // A provider that fails is an auth failure with its reason.
                val failed = assertThrows<ConfluoException.Auth> {
                    runBlocking { db.syncNow(options(server.url, "refresh")) { throw IOException("the refresh endpoint is down") } }
                }
                assertTrue(failed.message!!.contains("the refresh endpoint is down"), failed.message)
            }
        }
    }

    @Test
    fun `a 401 during background sync asks for sign-in and stops trying until syncSoon`() = runBlocking<Unit> {
        TestServer.start().use { server ->
            todoDatabase().use { db ->
                val signedIn = AtomicBoolean(false)
                val asked = AtomicInteger()
                db.startSync(options(server.url, "revoked")) {
                    asked.incrementAndGet()
                    if (signedIn.get()) "dev-token" else "revoked-token"
                }
                db.awaitStatus("AuthRequired") { it.state is SyncState.AuthRequired }
                val askedBefore = asked.get()
                // A local commit and several backoff periods: no attempt, so no token asked for.
                db.execute("INSERT INTO todo VALUES ('t1', 'written while signed out', 'open')")
                delay(1_500)
                assertEquals(askedBefore, asked.get())
                assertTrue(db.syncStatus.value.state is SyncState.AuthRequired, db.syncStatus.value.toString())
                signedIn.set(true)
                db.syncSoon()
                db.awaitStatus("Idle with the write sent") { it.state == SyncState.Idle && it.pending == 0L && it.lastSyncedMs != null }
                db.stopSync()
            }
        }
    }

    @Test
    fun `sign out clears the first space's rows, and the next space gets nothing of them`() = runBlocking<Unit> {
        TestServer.start().use { server ->
            val alice = options(server.url, "alice")
            val bob = options(server.url, "bob")
            todoDatabase().use { writer ->
                writer.execute("INSERT INTO todo VALUES ('a1', 'alice''s', 'open')")
                writer.syncNow(alice, devToken)
            }
            todoDatabase().use { writer ->
                writer.execute("INSERT INTO todo VALUES ('b1', 'bob''s', 'open')")
                writer.syncNow(bob, devToken)
            }
            todoDatabase().use { device ->
                device.executeBatch("CREATE TABLE drafts(id INTEGER PRIMARY KEY, text TEXT)")
                device.execute("INSERT INTO drafts(text) VALUES ('a local table stays')")
                device.syncNow(alice, devToken)
                assertEquals(listOf("a1"), device.todoIds())
                assertEquals("alice", device.boundSpace())
                // A running sync (held offline) and a write it never sent.
                device.setOnline(false)
                device.startSync(alice, devToken)
                device.execute("INSERT INTO todo VALUES ('unsent', 'never leaves', 'open')")

                device.signOutAndClear()
                assertEquals(SyncState.Stopped, device.syncStatus.value.state)
                assertEquals(0L, device.syncStatus.value.pending)
                assertEquals(emptyList<String>(), device.todoIds())
                assertEquals(1, device.query("SELECT * FROM drafts").size)
                assertNull(device.boundSpace())

                device.setOnline(true)
                device.syncNow(bob, devToken)
                assertEquals(listOf("b1"), device.todoIds())
                assertEquals("bob", device.boundSpace())
            }
            for ((space, expected) in listOf(bob to listOf("b1"), alice to listOf("a1"))) {
                todoDatabase().use { fresh ->
                    fresh.syncNow(space, devToken)
                    assertEquals(expected, fresh.todoIds(), space.space)
                }
            }
        }
    }

    @Test
    fun `the first status is the real one, and its pending count follows commits while stopped`() = runBlocking<Unit> {
        val dir = Files.createTempDirectory("confluo").toFile()
        val path = dir.resolve("app.db").path
        Confluo.open(path).use { db ->
            db.executeBatch(TODO_SCHEMA)
            db.enableSync("todo")
            db.execute("INSERT INTO todo VALUES ('t1', 'unsent', 'open')")
            db.execute("INSERT INTO todo VALUES ('t2', 'unsent', 'open')")
        }
        Confluo.open(path).use { db ->
            val first = db.syncStatus.value
            assertEquals(SyncState.Stopped, first.state)
            assertEquals(2L, first.pending)
            db.execute("INSERT INTO todo VALUES ('t3', 'unsent', 'open')")
            db.awaitStatus("3 pending") { it.pending == 3L && it.state == SyncState.Stopped }
        }
        dir.deleteRecursively()
    }

    @Test
    fun `an offline hint given before startSync is remembered`() = runBlocking<Unit> {
        TestServer.start().use { server ->
            val opts = options(server.url, "offline-first")
            todoDatabase().use { db ->
                todoDatabase().use { other ->
                    db.setOnline(false)
                    db.execute("INSERT INTO todo VALUES ('t1', 'while offline', 'open')")
                    db.startSync(opts, devToken)
                    val offline = db.awaitStatus("Offline") { it.state is SyncState.Offline }
                    assertEquals(SyncState.Offline(null), offline.state)
                    delay(1_000)
                    assertEquals(1L, db.pendingChanges())
                    assertEquals(0L, other.syncNow(opts, devToken).pulled)
                    db.setOnline(true)
                    db.awaitStatus("Idle with nothing pending") { it.state == SyncState.Idle && it.pending == 0L }
                    other.syncNow(opts, devToken)
                    assertEquals(listOf("t1"), other.todoIds())
                    db.stopSync()
                }
            }
        }
    }

    @Test
    fun `once stopSync returns, background sync emits nothing`() = runBlocking<Unit> {
        TestServer.start().use { server ->
            val opts = options(server.url, "stopped")
            todoDatabase().use { db ->
                todoDatabase().use { other ->
                    db.startSync(opts, devToken)
                    db.awaitStatus("Idle after a sync") { it.state == SyncState.Idle && it.lastSyncedMs != null }
                    db.stopSync()
                    assertEquals(SyncState.Stopped, db.syncStatus.value.state)
                    val after = CopyOnWriteArrayList<SyncStatus>()
                    val recorder = launch(Dispatchers.Default) { db.syncStatus.collect { after += it } }
                    // What a running sync would react to: a change on the server, a local commit.
                    other.execute("INSERT INTO todo VALUES ('remote', 'x', 'open')")
                    other.syncNow(opts, devToken)
                    db.execute("INSERT INTO todo VALUES ('local', 'x', 'open')")
                    db.awaitStatus("the local write pending") { it.pending == 1L }
                    delay(1_500)
                    recorder.cancel()
                    assertTrue(after.all { it.state == SyncState.Stopped }, after.toString())
                    assertEquals(listOf("local"), db.todoIds())
                }
            }
        }
    }

    @Test
    fun `close returns at once while a sync is stuck on a server that never answers`() = runBlocking<Unit> {
        SilentServer().use { silent ->
            val db = todoDatabase()
            db.execute("INSERT INTO todo VALUES ('t1', 'x', 'open')")
            db.startSync(SyncOptions(silent.url, "stuck", requestTimeout = 60.seconds), devToken)
            withTimeout(15_000) { while (silent.connections.get() == 0) delay(20) }
            val started = System.nanoTime()
            db.close()
            val tookMs = (System.nanoTime() - started) / 1_000_000
            assertTrue(tookMs < 500, "close took $tookMs ms")
            assertEquals(SyncState.Stopped, db.syncStatus.value.state)
            assertThrows<ConfluoException.Closed> { runBlocking { db.startSync(options(silent.url, "stuck"), devToken) } }
        }
    }

    @Test
    fun `cancelling syncNow stops it before its next request`() = runBlocking<Unit> {
        TestServer.start().use { server ->
            val opts = options(server.url, "cancelled")
            val rows = 12
            todoDatabase().use { writer ->
                writer.executeBatch("CREATE TABLE files(id INTEGER PRIMARY KEY NOT NULL, data BLOB)")
                writer.enableSync("files")
                // 6 MB: more than one page (4 MB) of the server's answers.
                repeat(rows) { writer.execute("INSERT INTO files VALUES (?, ?)", it, Random(it).nextBytes(512 * 1024)) }
                writer.syncNow(opts, devToken)
            }
            todoDatabase().use { reader ->
                reader.executeBatch("CREATE TABLE files(id INTEGER PRIMARY KEY NOT NULL, data BLOB)")
                reader.enableSync("files")
                val asked = AtomicInteger()
                val firstAsk = CompletableDeferred<Unit>()
                val cancelled = CompletableDeferred<Unit>()
                val outcome = AtomicReference<Throwable?>()
                val sync = launch(Dispatchers.Default) {
                    try {
                        reader.syncNow(opts) {
                            asked.incrementAndGet()
                            firstAsk.complete(Unit)
                            cancelled.await()
                            "dev-token"
                        }
                    } catch (e: Throwable) {
                        outcome.set(e)
                        throw e
                    }
                }
                withTimeout(15_000) { firstAsk.await() }
                sync.cancel()
                cancelled.complete(Unit)
                withTimeout(15_000) { sync.join() }
                assertTrue(outcome.get() is kotlinx.coroutines.CancellationException, outcome.get().toString())
                // Cancelled while its token was fetched: no request went out.
                assertEquals(1, asked.get())
                assertEquals(0L, reader.query("SELECT count(*) AS n FROM files").single().long("n"))
                // Not cancelled, the same sync completes.
                reader.syncNow(opts, devToken)
                assertEquals(rows.toLong(), reader.query("SELECT count(*) AS n FROM files").single().long("n"))
            }
        }
    }

    @Test
    fun `the logger hears the engine's sync line at debug level`() = runBlocking<Unit> {
        val heard = CopyOnWriteArrayList<Triple<LogLevel, String, String>>()
        Confluo.setLogger(LogLevel.DEBUG) { level, tag, message -> heard += Triple(level, tag, message) }
        try {
            TestServer.start().use { server ->
                todoDatabase().use { db ->
                    db.execute("INSERT INTO todo VALUES ('t1', 'x', 'open')")
                    db.syncNow(options(server.url, "logged"), devToken)
                    val line = heard.firstOrNull { it.third.contains("synced with space \"logged\"") }
                    assertNotNull(line, heard.toString())
                    assertEquals(LogLevel.DEBUG, line!!.first)
                    assertTrue(line.third.contains("pushed 3"), line.third)
                    // Above the level, nothing.
                    Confluo.setLogger(LogLevel.INFO) { level, tag, message -> heard += Triple(level, tag, message) }
                    heard.clear()
                    db.syncNow(options(server.url, "logged"), devToken)
                    assertTrue(heard.none { it.first == LogLevel.DEBUG }, heard.toString())
                }
            }
        } finally {
            Confluo.setLogger(LogLevel.ERROR, null)
        }
    }
}
