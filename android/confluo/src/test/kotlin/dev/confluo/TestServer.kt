package dev.confluo

import java.io.File
import java.net.HttpURLConnection
import java.net.ServerSocket
import java.net.URI
import java.nio.file.Files

/** A real `confluo-server` process on a free loopback port (binary from CONFLUO_SERVER_BIN). */
class TestServer private constructor(private val dir: File, val port: Int) : AutoCloseable {
    private var process: Process? = null
    val url: URI get() = URI("http://127.0.0.1:$port")

    companion object {
        fun start(): TestServer {
            val dir = Files.createTempDirectory("confluo-server").toFile()
            val port = ServerSocket(0).use { it.localPort }
            return TestServer(dir, port).also { it.restart() }
        }
    }

    /** Starts (again) on the same port and database. */
    fun restart() {
        val bin = System.getenv("CONFLUO_SERVER_BIN") ?: error("CONFLUO_SERVER_BIN is not set")
        process = ProcessBuilder(bin, "--dev", "--listen", "127.0.0.1:$port", "--db", File(dir, "server.db").path)
            .redirectErrorStream(true)
            .redirectOutput(File(dir, "server.log"))
            .start()
        val deadline = System.nanoTime() + 20_000_000_000L
        while (!healthy()) {
            check(process!!.isAlive) { "the server exited: " + File(dir, "server.log").readText() }
            check(System.nanoTime() < deadline) { "the server did not start" }
            Thread.sleep(20)
        }
    }

    fun stop() {
        process?.destroy()
        process?.waitFor()
        process = null
    }

    private fun healthy(): Boolean = try {
        val c = URI("$url/healthz").toURL().openConnection() as HttpURLConnection
        c.connectTimeout = 500
        c.readTimeout = 500
        c.responseCode == 200
    } catch (e: Exception) {
        false
    }

    override fun close() {
        stop()
        dir.deleteRecursively()
    }
}
