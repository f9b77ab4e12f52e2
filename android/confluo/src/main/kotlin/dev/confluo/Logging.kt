// The engine's log messages handed to the app's logger (Logcat, or its own).
package dev.confluo

/** How much a log message matters, most severe first. */
enum class LogLevel { ERROR, WARN, INFO, DEBUG, TRACE }

/**
 * Receives the engine's log messages. Called on whatever thread logged
 * (often a sync thread), so it must be quick and thread-safe; what it
 * throws is ignored. [tag] names the part of the engine that logged.
 */
fun interface ConfluoLogger {
    fun log(level: LogLevel, tag: String, message: String)
}

internal fun installLogger(level: LogLevel, logger: ConfluoLogger?) {
    val bridge = logger?.let {
        object : dev.confluo.ffi.Logger {
            override fun log(level: dev.confluo.ffi.LogLevel, target: String, message: String) {
                // A logger that fails has nowhere to report it: dropped, never a crash on a sync thread.
                runCatching { it.log(level.toPublic(), target, message) }
            }
        }
    }
    dev.confluo.ffi.setLogger(bridge, level.toFfi())
}

private fun dev.confluo.ffi.LogLevel.toPublic(): LogLevel = when (this) {
    dev.confluo.ffi.LogLevel.ERROR -> LogLevel.ERROR
    dev.confluo.ffi.LogLevel.WARN -> LogLevel.WARN
    dev.confluo.ffi.LogLevel.INFO -> LogLevel.INFO
    dev.confluo.ffi.LogLevel.DEBUG -> LogLevel.DEBUG
    dev.confluo.ffi.LogLevel.TRACE -> LogLevel.TRACE
}

private fun LogLevel.toFfi(): dev.confluo.ffi.LogLevel = when (this) {
    LogLevel.ERROR -> dev.confluo.ffi.LogLevel.ERROR
    LogLevel.WARN -> dev.confluo.ffi.LogLevel.WARN
    LogLevel.INFO -> dev.confluo.ffi.LogLevel.INFO
    LogLevel.DEBUG -> dev.confluo.ffi.LogLevel.DEBUG
    LogLevel.TRACE -> dev.confluo.ffi.LogLevel.TRACE
}
