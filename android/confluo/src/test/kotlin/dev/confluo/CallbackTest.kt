// Foreign callbacks that throw: reported and survived, never a lost write
// or a dead background sync.
package dev.confluo

import dev.confluo.ffi.ChangeListener
import dev.confluo.ffi.Database
import dev.confluo.ffi.SyncStatusListener
import dev.confluo.ffi.TokenProvider
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Test
import java.util.concurrent.atomic.AtomicInteger
import kotlin.time.Duration.Companion.milliseconds
import kotlin.time.Duration.Companion.seconds

private const val TODO_TABLE = "CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, title TEXT, status TEXT)"

/** The generated API's database, for implementing its callback interfaces directly. */
private fun ffiTodoDb(): Database = Database.openInMemory().also {
    it.executeBatch(TODO_TABLE)
    it.enableSync("todo")
}

private fun waitUntil(what: String, condition: () -> Boolean) {
    val deadline = System.nanoTime() + 20_000_000_000L
    while (!condition()) {
        check(System.nanoTime() < deadline) { "timed out waiting for $what" }
        Thread.sleep(20)
    }
}

class CallbackTest {
    @Test
    fun `a change listener that throws neither fails the write nor silences the others`() {
        ffiTodoDb().use { db ->
            val heard = AtomicInteger()
            val throwing = db.observe(listOf(), object : ChangeListener {
                override fun onChange(tables: List<String>) = throw IllegalStateException("a listener bug")
            })
            val counting = db.observe(listOf("todo"), object : ChangeListener {
                override fun onChange(tables: List<String>) {
                    heard.incrementAndGet()
                }
            })
            assertEquals(1UL, db.execute("INSERT INTO todo VALUES ('k', 'x', 'y')", listOf()))
            assertEquals(1, db.query("SELECT * FROM todo", listOf()).rows.size)
            assertEquals(1, heard.get())
            throwing.cancel()
            counting.cancel()
        }
    }

    @Test
    fun `a status listener that throws does not stop background sync`() {
        TestServer.start().use { server ->
            val config = SyncOptions(server.url, "resilient", requestTimeout = 5.seconds, minBackoff = 100.milliseconds, maxBackoff = 800.milliseconds).toFfi()
            val token = object : TokenProvider {
                override fun token(invalidate: Boolean) = "dev-token"
            }
            val calls = AtomicInteger()
            ffiTodoDb().use { a ->
                val sync = a.startSync(config, token, object : SyncStatusListener {
                    override fun onStatus(status: dev.confluo.ffi.SyncStatus) {
                        if (calls.getAndIncrement() == 0) throw IllegalStateException("a status listener bug")
                    }
                })
                waitUntil("the first status") { calls.get() > 0 }
                a.execute("INSERT INTO todo VALUES ('k', 'after the exception', 'open')", listOf())
                ffiTodoDb().use { b ->
                    waitUntil("the write on the server") {
                        b.syncNow(config, token, null)
                        b.query("SELECT * FROM todo", listOf()).rows.size == 1
                    }
                }
                // The status that ends the sync may come a moment after the
                // server has the write (b can pull it first): waited for.
                waitUntil("the listener to hear again after it threw") { calls.get() > 1 }
                sync.stop()
                sync.close()
            }
        }
    }
}
