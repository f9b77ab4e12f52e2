package dev.confluo

import android.content.Context
import androidx.startup.Initializer

/**
 * Lets the engine check https sync servers against Android's own trust store, so the
 * certificate authorities a user or an enterprise installed work as they do for the
 * platform's HTTP stack (as far as the app's network security config allows them).
 *
 * [ConfluoInitializer] runs this at app startup. An app that turns androidx.startup's
 * automatic initialization off calls [initialize] itself before its first sync; until
 * then an https sync fails with [ConfluoException.InvalidInput] saying so.
 */
object PlatformTrust {
    @Volatile private var initialized = false

    /** Hands the application [Context] to the engine's certificate verifier. Idempotent. */
    @Synchronized
    fun initialize(context: Context) {
        if (initialized) return
        // The same library JNA opens for the bindings; loading it here is what makes
        // the JVM find the native method below.
        System.loadLibrary("confluo_ffi")
        nativeInitialize(context.applicationContext)
        initialized = true
    }

    // bindings/src/android.rs
    @JvmStatic private external fun nativeInitialize(context: Context)
}

/** Runs [PlatformTrust.initialize] at app startup (declared in the library's manifest). */
class ConfluoInitializer : Initializer<PlatformTrust> {
    override fun create(context: Context): PlatformTrust {
        PlatformTrust.initialize(context)
        return PlatformTrust
    }

    override fun dependencies(): List<Class<out Initializer<*>>> = emptyList()
}
