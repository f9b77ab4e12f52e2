// A ready-made logger that sends the engine's messages to Logcat. It lives
// in a source folder only the Android build compiles (android.util.Log is
// not on the JVM test classpath).
package dev.confluo

import android.util.Log

/**
 * Writes each engine message to Logcat under [tag] (the engine's part that
 * logged starts the message). Install it with
 * `Confluo.setLogger(LogLevel.INFO, LogcatLogger())`.
 */
class LogcatLogger(private val tag: String = "Confluo") : ConfluoLogger {
    override fun log(level: LogLevel, tag: String, message: String) {
        val priority = when (level) {
            LogLevel.ERROR -> Log.ERROR
            LogLevel.WARN -> Log.WARN
            LogLevel.INFO -> Log.INFO
            LogLevel.DEBUG -> Log.DEBUG
            LogLevel.TRACE -> Log.VERBOSE
        }
        Log.println(priority, this.tag, "$tag: $message")
    }
}
