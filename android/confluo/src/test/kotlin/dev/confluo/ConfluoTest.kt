package dev.confluo

import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.CompletableDeferred
import kotlinx.coroutines.async
import kotlinx.coroutines.flow.onEach
import kotlinx.coroutines.awaitAll
import kotlinx.coroutines.flow.toList
import kotlinx.coroutines.flow.first
import kotlinx.coroutines.launch
import kotlinx.coroutines.flow.filter
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.test.runTest
import kotlinx.coroutines.withTimeout
import org.junit.jupiter.api.Assertions.assertArrayEquals
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertFalse
import org.junit.jupiter.api.Assertions.assertNull
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.assertThrows
import org.junit.jupiter.api.assertTimeoutPreemptively
import java.net.URI
import java.nio.file.Files
import java.time.Duration
import kotlin.time.Duration.Companion.milliseconds
import kotlin.time.Duration.Companion.seconds

private const val TODO = "CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, title TEXT, status TEXT)"

private suspend fun todoDb(): Confluo = Confluo.openInMemory().also {
    it.executeBatch(TODO)
    it.enableSync("todo")
}

class ConfluoTest {
    @Test
    fun `CRUD with typed values`() = runTest {
        todoDb().use { db ->
            db.executeBatch("CREATE TABLE vals(id INTEGER PRIMARY KEY, v)")
            val values = listOf(
                Long.MIN_VALUE, Long.MAX_VALUE, -0.5, 1e308,
                "naïve café 日本語 🚀", "", byteArrayOf(0, -1, 127), byteArrayOf(), null,
            )
            values.forEachIndexed { i, v -> db.execute("INSERT INTO vals VALUES (?, ?)", i, v) }
            val rows = db.query("SELECT v FROM vals ORDER BY id")
            assertEquals(Long.MIN_VALUE, rows[0].long("v"))
            assertEquals(Long.MAX_VALUE, rows[1].long("v"))
            assertEquals(-0.5, rows[2].double("v"))
            assertEquals(1e308, rows[3].double("v"))
            assertEquals("naïve café 日本語 🚀", rows[4].string("v"))
            assertEquals("", rows[5].string("v"))
            assertArrayEquals(byteArrayOf(0, -1, 127), rows[6].bytes("v"))
            assertArrayEquals(byteArrayOf(), rows[7].bytes("v"))
            assertTrue(rows[8].isNull("v"))
            assertNull(rows[8].stringOrNull("v"))
            assertThrows<ConfluoException.InvalidInput> { rows[8].string("v") }

            assertEquals(1L, db.execute("INSERT INTO todo VALUES (?, ?, ?)", "t1", "Buy milk", "open"))
            assertEquals(1L, db.execute("UPDATE todo SET status = ? WHERE id = ?", "done", "t1"))
            val todo = db.query("SELECT * FROM todo").single()
            assertEquals("done", todo.string("status"))
            assertEquals(listOf("id", "title", "status"), todo.columns)
            assertEquals(1L, db.execute("DELETE FROM todo WHERE id = ?", "t1"))
            assertTrue(db.query("SELECT * FROM todo").isEmpty())
            assertTrue(db.query("SELECT 1 AS yes").single().boolean("yes"))
        }
    }

    @Test
    fun `bad SQL throws with SQLite's message`() = runTest {
        todoDb().use { db ->
            val e = assertThrows<ConfluoException> { db.query("SELECT * FROM nope") }
            assertTrue(e.message!!.contains("no such table: nope"), e.message)
            val dup = assertThrows<ConfluoException> {
                db.execute("INSERT INTO todo VALUES ('a', 'x', 'y')")
                db.execute("INSERT INTO todo VALUES ('a', 'x', 'y')")
            }
            assertTrue(dup.message!!.contains("UNIQUE constraint failed"), dup.message)
            val unbindable = assertThrows<ConfluoException.InvalidInput> { db.execute("INSERT INTO todo VALUES (?, ?, ?)", "b", Any(), "y") }
            assertTrue(unbindable.message!!.contains("cannot bind a kotlin.Any"), unbindable.message)
        }
    }

    @Test
    fun `write commits, or rolls back and rethrows`() = runTest {
        todoDb().use { db ->
            val n = db.write { tx ->
                tx.execute("INSERT INTO todo VALUES ('a', 'first', 'open')")
                tx.execute("INSERT INTO todo VALUES ('b', 'second', 'open')")
                tx.query("SELECT count(*) AS n FROM todo").single().long("n")
            }
            assertEquals(2L, n)
            class Oops : RuntimeException("changed my mind")
            assertThrows<Oops> {
                db.write { tx ->
                    tx.execute("DELETE FROM todo")
                    throw Oops()
                }
            }
            assertEquals(2, db.query("SELECT * FROM todo").size)
            // A transaction kept past its block is dead.
            var kept: WriteScope? = null
            db.write { tx -> kept = tx }
            assertThrows<ConfluoException> { kept!!.execute("DELETE FROM todo") }
            assertEquals(2, db.query("SELECT * FROM todo").size)
        }
    }

    @Test
    fun `calling the database from inside a write body fails at once instead of hanging`() {
        // A regression would hang: the deadline turns it into a failure.
        assertTimeoutPreemptively(Duration.ofSeconds(30)) {
            runBlocking {
                val dir = Files.createTempDirectory("confluo").toFile()
                for (db in listOf(Confluo.openInMemory(), Confluo.open(dir.resolve("app.db").path))) {
                    db.use {
                        db.executeBatch(TODO)
                        db.enableSync("todo")
                        val nested = db.write { tx ->
                            tx.execute("INSERT INTO todo VALUES ('a', 'through the transaction', 'open')")
                            runCatching { runBlocking { db.execute("INSERT INTO todo VALUES ('b', 'beside it', 'open')") } }
                                .exceptionOrNull()
                        }
                        assertTrue(nested is ConfluoException.InvalidInput, "$nested")
                        assertTrue(nested!!.message!!.contains("transaction handle"), nested.message)
                        assertEquals(listOf("a"), db.query("SELECT id FROM todo").map { it.string("id") })
                    }
                }
                dir.deleteRecursively()
            }
        }
    }

    @Test
    fun `a file database answers queries from inside a write body`() {
        assertTimeoutPreemptively(Duration.ofSeconds(30)) {
            runBlocking {
                val dir = Files.createTempDirectory("confluo").toFile()
                Confluo.open(dir.resolve("app.db").path).use { db ->
                    db.executeBatch(TODO)
                    db.enableSync("todo")
                    db.execute("INSERT INTO todo VALUES ('a', 'committed', 'open')")
                    val seen = db.write { tx ->
                        tx.execute("INSERT INTO todo VALUES ('b', 'not yet', 'open')")
                        // A reader's snapshot: the committed row, not the open write's.
                        runBlocking { db.query("SELECT id FROM todo") }.map { it.string("id") }
                    }
                    assertEquals(listOf("a"), seen)
                }
                dir.deleteRecursively()
            }
        }
    }

    @Test
    fun `peer-to-peer change sets converge`() = runTest {
        todoDb().use { a ->
            todoDb().use { b ->
                a.execute("INSERT INTO todo VALUES ('t1', 'from A', 'open')")
                val applied = b.applyChanges(a.changesForPeer(b.siteId(), b.seenVersion(a.siteId())))
                assertEquals(3L, applied)
                assertEquals(a.query("SELECT * FROM todo").map { it.toString() }, b.query("SELECT * FROM todo").map { it.toString() })
            }
        }
    }

    @Test
    fun `every use after close throws Closed, and watch flows end`() = runBlocking<Unit> {
        val db = todoDb()
        db.execute("INSERT INTO todo VALUES ('a', 'x', 'open')")
        val watched = db.watch("SELECT * FROM todo", tables = listOf("todo"))
        val firstSeen = CompletableDeferred<Unit>()
        val collected = async(Dispatchers.Default) {
            withTimeout(10_000) { watched.onEach { firstSeen.complete(Unit) }.toList() }
        }
        withTimeout(10_000) { firstSeen.await() }
        db.close()
        db.close() // twice is harmless
        // The collection ends (instead of waiting for ever) with what it had.
        assertEquals(1, collected.await().size)
        val calls: List<suspend () -> Unit> = listOf(
            { db.query("SELECT * FROM todo") },
            { db.execute("DELETE FROM todo") },
            { db.write { tx -> tx.execute("DELETE FROM todo") } },
            { db.siteId() },
            { db.pendingChanges() },
            { db.setOnline(false) },
            { db.syncNow(SyncOptions(URI("http://127.0.0.1:9"), "s")) { "dev-token" } },
            { db.startSync(SyncOptions(URI("http://127.0.0.1:9"), "s")) { "dev-token" } },
            { db.signOutAndClear() },
            { db.watch("SELECT 1").first() },
            { db.syncSoon() },
        )
        calls.forEachIndexed { i, call -> assertThrows<ConfluoException.Closed>("call $i") { runBlocking { call() } } }
    }

    @Test
    fun `many coroutines use one database at once`() = runBlocking<Unit> {
        todoDb().use { db ->
            val writers = 16
            val each = 25
            withTimeout(60_000) {
                (0 until writers).map { w ->
                    async(Dispatchers.Default) {
                        repeat(each) { i ->
                            if (i % 2 == 0) {
                                db.execute("INSERT INTO todo VALUES (?, ?, 'open')", "$w-$i", "by $w")
                            } else {
                                db.write { tx -> tx.execute("INSERT INTO todo VALUES (?, ?, 'open')", "$w-$i", "by $w") }
                            }
                            val mine = db.query("SELECT count(*) AS n FROM todo WHERE title = ?", "by $w").single().long("n")
                            assertEquals(i + 1L, mine)
                        }
                    }
                }.awaitAll()
            }
            assertEquals(writers * each.toLong(), db.query("SELECT count(*) AS n FROM todo").single().long("n"))
            assertEquals(writers * each.toLong(), db.pendingChanges())
        }
    }

    @Test
    fun `alterSyncedTable keeps tracking the new column`() = runBlocking<Unit> {
        todoDb().use { a ->
            todoDb().use { b ->
                for (db in listOf(a, b)) db.alterSyncedTable("todo", "ALTER TABLE todo ADD COLUMN due TEXT")
                a.execute("INSERT INTO todo(id, title, status, due) VALUES ('t1', 'x', 'open', '2026-12-01')")
                b.applyChanges(a.changesForPeer(b.siteId(), b.seenVersion(a.siteId())))
                assertEquals("2026-12-01", b.query("SELECT due FROM todo WHERE id = 't1'").single().string("due"))
                // An edit of the new column alone is tracked too.
                a.execute("UPDATE todo SET due = '2027-01-01' WHERE id = 't1'")
                b.applyChanges(a.changesForPeer(b.siteId(), b.seenVersion(a.siteId())))
                assertEquals("2027-01-01", b.query("SELECT due FROM todo WHERE id = 't1'").single().string("due"))
                assertThrows<ConfluoException> { runBlocking { a.alterSyncedTable("todo", "ALTER TABLE nope ADD COLUMN x") } }
            }
        }
    }

    @Test
    fun `close releases the database file`() = runTest {
        val dir = Files.createTempDirectory("confluo").toFile()
        val path = dir.resolve("app.db").path
        Confluo.open(path).use { db ->
            db.executeBatch(TODO)
            db.enableSync("todo")
            db.execute("INSERT INTO todo VALUES ('k', 'kept', 'open')")
        }
        // Reopening works, the data is there, and writes are not locked out.
        Confluo.open(path).use { db ->
            assertEquals("kept", db.query("SELECT title FROM todo").single().string("title"))
            db.execute("UPDATE todo SET title = 'again'")
        }
        dir.deleteRecursively()
    }
}

class SyncTest {
    private val options = { server: TestServer, space: String ->
        SyncOptions(server.url, space, requestTimeout = 5.seconds, minBackoff = 100.milliseconds, maxBackoff = 800.milliseconds)
    }

    @Test
    fun `two databases sync through a real server`() = runBlocking<Unit> {
        TestServer.start().use { server ->
            todoDb().use { a ->
                todoDb().use { b ->
                    val opts = options(server, "lists")
                    a.execute("INSERT INTO todo VALUES ('t1', 'Buy groceries', 'in_progress')")
                    assertEquals(3L, a.syncNow(opts) { "dev-token" }.pushed)
                    assertEquals(3L, b.syncNow(opts) { "dev-token" }.applied)
                    assertEquals("Buy groceries", b.query("SELECT title FROM todo").single().string("title"))
                    val denied = assertThrows<ConfluoException.Auth> { runBlocking { b.syncNow(opts) { "wrong-token" } } }
                    assertTrue(denied.message!!.contains("401"), denied.message)
                }
            }
        }
    }

    @Test
    fun `watch emits after a local write and after a sync`() = runBlocking<Unit> {
        TestServer.start().use { server ->
            todoDb().use { a ->
                todoDb().use { b ->
                    val opts = options(server, "watched")
                    val titles = b.watch("SELECT title FROM todo ORDER BY id", tables = listOf("todo"))
                    withTimeout(10_000) {
                        assertEquals(emptyList<Row>(), titles.first())
                        b.execute("INSERT INTO todo VALUES ('b1', 'local', 'open')")
                        titles.filter { it.size == 1 }.first()
                        a.execute("INSERT INTO todo VALUES ('a1', 'remote', 'open')")
                        a.syncNow(opts) { "dev-token" }
                        b.syncNow(opts) { "dev-token" }
                        val both = titles.filter { it.size == 2 }.first()
                        assertEquals(listOf("remote", "local"), both.map { it.string("title") })
                    }
                }
            }
        }
    }

    @Test
    fun `a table a new install made in its latest shape gets the history's identities`() = runBlocking<Unit> {
        val create = "CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, name TEXT)"
        val rename = "ALTER TABLE todo RENAME COLUMN name TO task"
        TestServer.start().use { server ->
            Confluo.openInMemory().use { old ->
                Confluo.openInMemory().use { fresh ->
                    val opts = options(server, "history")
                    // An install that ran the whole history: a row written before the rename.
                    old.enableSyncWithHistory("todo", create, emptyList())
                    old.execute("INSERT INTO todo VALUES ('t1', 'Buy milk')")
                    old.syncNow(opts) { "dev-token" }
                    old.enableSyncWithHistory("todo", create, listOf(rename))
                    // A new install that made the table directly in its latest shape.
                    fresh.executeBatch("CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, task TEXT)")
                    fresh.enableSyncWithHistory("todo", create, listOf(rename))
                    fresh.syncNow(opts) { "dev-token" }
                    assertEquals("Buy milk", fresh.query("SELECT task FROM todo WHERE id = 't1'").single().stringOrNull("task"))
                    // Calling it again at the next start changes nothing.
                    fresh.enableSyncWithHistory("todo", create, listOf(rename))
                    assertEquals(listOf("id", "task"), fresh.query("SELECT * FROM todo").single().columns)
                }
            }
        }
    }

    @Test
    fun `a change a trigger refuses is kept aside and reported, and the clock offset is known`() = runBlocking<Unit> {
        TestServer.start().use { server ->
            todoDb().use { a ->
                Confluo.openInMemory().use { b ->
                    b.executeBatch(
                        TODO + ";\n" +
                            "CREATE TRIGGER no_bad BEFORE INSERT ON todo WHEN NEW.title = 'bad' " +
                            "BEGIN SELECT RAISE(ABORT, 'no bad titles'); END",
                    )
                    b.enableSync("todo")
                    val opts = options(server, "refused")
                    a.execute("INSERT INTO todo VALUES ('t1', 'bad', 'open')")
                    a.execute("INSERT INTO todo VALUES ('t2', 'good', 'open')")
                    a.syncNow(opts) { "dev-token" }
                    val report = b.syncNow(opts) { "dev-token" }
                    assertTrue(report.rejected >= 1, report.toString())
                    val offset = report.clockOffsetMs
                    assertTrue(offset != null && kotlin.math.abs(offset) < 60_000, report.toString())
                    // The rest of the page went in.
                    assertEquals(listOf("t2"), b.query("SELECT id FROM todo").map { it.string("id") })
                    val kept = b.rejectedChanges()
                    assertEquals(report.rejected, b.rejectedCount())
                    assertTrue(kept.isNotEmpty() && kept.all { it.reason.contains("no bad titles") }, kept.toString())
                    assertTrue(kept.all { it.table == "todo" && it.key == listOf("t1") }, kept.toString())
                    // Background sync reports them too.
                    b.startSync(opts) { "dev-token" }
                    val status = withTimeout(15_000) { b.syncStatus.filter { it.rejected > 0 && it.clockOffsetMs != null }.first() }
                    assertEquals(report.rejected, status.rejected)
                    b.stopSync()
                }
            }
        }
    }

    @Test
    fun `background sync goes syncing to idle, and offline when the server stops`() = runBlocking<Unit> {
        TestServer.start().use { server ->
            todoDb().use { db ->
                val seen = mutableListOf<SyncState>()
                val recorder = launch(Dispatchers.Default) { db.syncStatus.collect { synchronized(seen) { seen.add(it.state) } } }
                db.startSync(options(server, "bg")) { "dev-token" }
                withTimeout(15_000) { db.syncStatus.filter { it.state == SyncState.Idle && it.lastSyncedMs != null }.first() }
                db.execute("INSERT INTO todo VALUES ('k', 'x', 'y')")
                withTimeout(15_000) {
                    db.syncStatus.filter { it.state == SyncState.Idle && it.pending == 0L && db.pendingChanges() == 0L }.first()
                }
                server.stop()
                db.execute("INSERT INTO todo VALUES ('k2', 'while the server is down', 'y')")
                // The server is gone: offline, with the new write pending.
                withTimeout(15_000) { db.syncStatus.filter { it.state is SyncState.Offline && it.pending == 1L }.first() }
                server.restart()
                db.syncSoon()
                withTimeout(15_000) { db.syncStatus.filter { it.state == SyncState.Idle && it.pending == 0L }.first() }
                db.stopSync()
                recorder.cancel()
                assertTrue(seen.contains(SyncState.Syncing), seen.toString())
                assertTrue(seen.any { it is SyncState.Offline }, seen.toString())
                assertFalse(seen.any { it is SyncState.Error }, seen.toString())
            }
        }
    }
}

