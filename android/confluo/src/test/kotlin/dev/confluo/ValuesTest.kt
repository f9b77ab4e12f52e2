// Values in and out of SQL: typed row mapping, the shared text forms of
// instants and UUIDs, row equality, misspelled columns, sync options.
package dev.confluo

import kotlinx.coroutines.flow.first
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertNotEquals
import org.junit.jupiter.api.Assertions.assertNull
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.assertThrows
import java.net.URI
import java.time.Instant
import java.util.Date
import java.util.UUID
import kotlin.time.Duration.Companion.milliseconds

private data class Todo(val id: String, val title: String, val done: Boolean)

class ValuesTest {
    @Test
    fun `query and watch map rows to the app's types`() = runBlocking<Unit> {
        Confluo.openInMemory().use { db ->
            db.executeBatch("CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, title TEXT, done INTEGER)")
            db.execute("INSERT INTO todo VALUES (?, ?, ?)", "a", "Buy milk", true)
            db.execute("INSERT INTO todo VALUES (?, ?, ?)", "b", "Call mom", false)
            val toTodo = { row: Row -> Todo(row.string("id"), row.string("title"), row.boolean("done")) }
            assertEquals(
                listOf(Todo("a", "Buy milk", true), Todo("b", "Call mom", false)),
                db.query("SELECT * FROM todo ORDER BY id", map = toTodo),
            )
            assertEquals(listOf("Call mom"), db.query("SELECT title FROM todo WHERE done = ?", false) { it.string("title") })
            val inWrite = db.write { tx -> tx.query("SELECT id FROM todo WHERE done = ?", 1) { it.string("id") } }
            assertEquals(listOf("a"), inWrite)
            val watched = db.watch("SELECT * FROM todo WHERE done = 0 ORDER BY id", tables = listOf("todo"), map = toTodo)
            withTimeout(10_000) {
                assertEquals(listOf(Todo("b", "Call mom", false)), watched.first())
            }
        }
    }

    @Test
    fun `a misspelled column fails with the row's columns`() = runBlocking<Unit> {
        Confluo.openInMemory().use { db ->
            val row = db.query("SELECT 1 AS id, 'x' AS title").single()
            val e = assertThrows<ConfluoException.InvalidInput> { row.string("titel") }
            assertEquals("no column \"titel\" in this row (columns: id, title)", e.message)
            assertThrows<ConfluoException.InvalidInput> { row.instant("id") }
        }
    }

    @Test
    fun `rows are equal by columns and values, bytes by content`() = runBlocking<Unit> {
        Confluo.openInMemory().use { db ->
            val sql = "SELECT ? AS name, ? AS data, ? AS n"
            val first = db.query(sql, "a", byteArrayOf(1, 2, 3), 7).single()
            val same = db.query(sql, "a", byteArrayOf(1, 2, 3), 7).single()
            assertEquals(first, same)
            assertEquals(first.hashCode(), same.hashCode())
            assertNotEquals(first, db.query(sql, "a", byteArrayOf(1, 2, 4), 7).single())
            assertNotEquals(first, db.query(sql, "a", byteArrayOf(1, 2, 3), 8).single())
            assertNotEquals(first, db.query("SELECT ? AS other, ? AS data, ? AS n", "a", byteArrayOf(1, 2, 3), 7).single())
        }
    }

    @Test
    fun `instants, dates and UUIDs are stored in the shared text forms and read back`() = runBlocking<Unit> {
        Confluo.openInMemory().use { db ->
            db.executeBatch("CREATE TABLE event(id TEXT PRIMARY KEY NOT NULL, at TEXT, on_day TEXT)")
            val id = UUID.fromString("0F8FAD5B-D9CB-469F-A165-70867728950E")
            // Nanoseconds beyond the millisecond are dropped: three fractional digits, always.
            val at = Instant.parse("2026-11-26T17:05:09.120456789Z")
            val onDay = Date.from(Instant.parse("2026-01-02T03:04:05Z"))
            db.execute("INSERT INTO event VALUES (?, ?, ?)", id, at, onDay)
            val stored = db.query("SELECT id, at, on_day, typeof(at) AS kind FROM event").single()
            assertEquals("0f8fad5b-d9cb-469f-a165-70867728950e", stored.string("id"))
            assertEquals("2026-11-26T17:05:09.120Z", stored.string("at"))
            assertEquals("2026-01-02T03:04:05.000Z", stored.string("on_day"))
            assertEquals("text", stored.string("kind"))
            assertEquals(id, stored.uuid("id"))
            assertEquals(Instant.parse("2026-11-26T17:05:09.120Z"), stored.instant("at"))
            assertEquals(onDay, stored.date("on_day"))
            // Bound back as parameters, they match the stored text.
            assertEquals(1, db.query("SELECT * FROM event WHERE id = ? AND at = ?", id, at).size)
            val empty = db.query("SELECT NULL AS at").single()
            assertNull(empty.instantOrNull("at"))
            assertThrows<ConfluoException.InvalidInput> { empty.uuid("at") }
        }
    }

    @Test
    fun `sync options refuse what cannot be a sync server`() {
        val ftp = assertThrows<ConfluoException.InvalidInput> { SyncOptions(URI("ftp://example.com"), "s") }
        assertEquals("the server URL must be http or https, not \"ftp://example.com\"", ftp.message)
        assertThrows<ConfluoException.InvalidInput> { SyncOptions(URI("relative/path"), "s") }
        assertThrows<ConfluoException.InvalidInput> { SyncOptions(URI("https://example.com"), " ") }
        assertThrows<ConfluoException.InvalidInput> {
            SyncOptions(URI("https://example.com"), "s", debounce = (-1).milliseconds)
        }
        val ok = SyncOptions(URI("https://sync.example.com"), "family", requestTimeout = 1500.milliseconds).toFfi()
        assertEquals(1500UL, ok.requestTimeoutMs)
        assertEquals(0UL, ok.longPollMs) // the engine's default
    }
}
