package dev.confluo

import java.io.IOException
import java.net.InetAddress
import java.net.ServerSocket
import java.net.Socket
import java.net.URI
import java.util.concurrent.CopyOnWriteArrayList
import java.util.concurrent.atomic.AtomicInteger

/** A server that accepts connections and never answers: a sync stuck in the middle of a request. */
class SilentServer : AutoCloseable {
    private val socket = ServerSocket(0, 50, InetAddress.getLoopbackAddress())
    private val accepted = CopyOnWriteArrayList<Socket>()
    val connections = AtomicInteger()
    val url: URI = URI("http://127.0.0.1:${socket.localPort}")

    init {
        Thread {
            try {
                while (true) {
                    accepted += socket.accept()
                    connections.incrementAndGet()
                }
            } catch (e: IOException) {
                // closed
            }
        }.apply { isDaemon = true }.start()
    }

    override fun close() {
        socket.close()
        accepted.forEach { it.close() }
    }
}
