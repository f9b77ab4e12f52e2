package dev.confluo

import kotlinx.coroutines.flow.first
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import java.io.File

/** Resident memory of this process, in MB. */
private fun rssMb(): Double =
    File("/proc/self/status").readLines().first { it.startsWith("VmRSS:") }
        .filter { it.isDigit() }.toLong() / 1024.0

/** Opens and closes [databases] databases, and runs [queries] queries each with an observer attached and dropped. */
private suspend fun churn(databases: Int, queries: Int) {
    repeat(databases) { i ->
        Confluo.openInMemory().use { db ->
            db.executeBatch("CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, v TEXT)")
            db.enableSync("t")
            db.execute("INSERT INTO t VALUES (?, ?)", i, "row $i")
        }
    }
    Confluo.openInMemory().use { db ->
        db.executeBatch("CREATE TABLE t(id INTEGER PRIMARY KEY NOT NULL, v TEXT)")
        db.enableSync("t")
        repeat(queries) { i ->
            val rows = db.watch("SELECT count(*) AS n FROM t", tables = listOf("t"))
            db.execute("INSERT INTO t VALUES (?, ?)", i, "v")
            withTimeout(5_000) { rows.first() }
        }
    }
}

class LeakTest {
    /**
     * 1,000 databases opened and closed and 10,000 observed queries through
     * the FFI, in two halves: once the JIT has warmed up in the first half,
     * the second half may not grow resident memory by more than 16 MB. The
     * test script makes the JVM's heap (128 MB) resident from the start,
     * so heap pages used for the first time do not count as growth (they
     * did: 34 MB once, in a full run without a leak).
     */
    @Test
    fun `opening databases and observing queries does not leak`() = runBlocking<Unit> {
        churn(500, 5_000)
        System.gc()
        val warm = rssMb()
        churn(500, 5_000)
        System.gc()
        val after = rssMb()
        println("leak check: RSS %.1f MB after the first half, %.1f MB after the second".format(warm, after))
        assertTrue(after - warm < 16.0, "RSS grew from $warm MB to $after MB in the second half")
    }
}
