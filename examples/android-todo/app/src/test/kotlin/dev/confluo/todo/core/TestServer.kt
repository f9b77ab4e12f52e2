package dev.confluo.todo.core

import java.io.File
import java.net.HttpURLConnection
import java.net.ServerSocket
import java.net.URI
import java.nio.file.Files

/** The app tests' own `confluo-server` on a free loopback port (binary from CONFLUO_SERVER_BIN). */
class TestServer private constructor(private val dir: File, private val process: Process, port: Int) : AutoCloseable {
    val url = "http://127.0.0.1:$port"

    companion object {
        fun start(): TestServer {
            val bin = System.getenv("CONFLUO_SERVER_BIN") ?: error("CONFLUO_SERVER_BIN is not set")
            val dir = Files.createTempDirectory("confluo-todo-server").toFile()
            val port = ServerSocket(0).use { it.localPort }
            val process = ProcessBuilder(bin, "--dev", "--listen", "127.0.0.1:$port", "--db", File(dir, "server.db").path)
                .redirectErrorStream(true)
                .redirectOutput(File(dir, "server.log"))
                .start()
            val server = TestServer(dir, process, port)
            val deadline = System.nanoTime() + 20_000_000_000L
            while (!server.healthy()) {
                check(process.isAlive) { "the server exited: " + File(dir, "server.log").readText() }
                check(System.nanoTime() < deadline) { "the server did not start" }
                Thread.sleep(20)
            }
            return server
        }
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
        process.destroy()
        process.waitFor()
        dir.deleteRecursively()
    }
}
