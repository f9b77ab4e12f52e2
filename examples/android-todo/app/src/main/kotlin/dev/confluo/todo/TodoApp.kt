package dev.confluo.todo

import android.app.Application
import android.content.Context
import android.net.ConnectivityManager
import android.net.Network
import android.net.NetworkCapabilities
import androidx.datastore.preferences.core.edit
import androidx.datastore.preferences.core.stringPreferencesKey
import androidx.datastore.preferences.preferencesDataStore
import dev.confluo.Confluo
import dev.confluo.LogLevel
import dev.confluo.LogcatLogger
import dev.confluo.todo.core.SyncSettings
import dev.confluo.todo.core.TodoRepository
import kotlinx.coroutines.CoroutineScope
import kotlinx.coroutines.SupervisorJob
import kotlinx.coroutines.async
import kotlinx.coroutines.channels.Channel
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.first
import kotlinx.coroutines.flow.map
import kotlinx.coroutines.launch
import androidx.lifecycle.DefaultLifecycleObserver
import androidx.lifecycle.LifecycleOwner
import androidx.lifecycle.ProcessLifecycleOwner

private val Context.settingsStore by preferencesDataStore("sync-settings")

/** Holds the one database and repository of the app, and feeds it the network state. */
class TodoApp : Application() {
    val scope = CoroutineScope(SupervisorJob())
    val repository by lazy {
        scope.async { TodoRepository.open(Confluo.open(getDatabasePath("todo.db").path)) }
    }

    private object Keys {
        val server = stringPreferencesKey("server")
        val space = stringPreferencesKey("space")
        val token = stringPreferencesKey("token")
    }

    /**
     * Starting and stopping sync, sign-out and the network hint, applied one
     * at a time and in order (stopping takes up to a second).
     */
    private val syncCommands = Channel<suspend (TodoRepository) -> Unit>(Channel.UNLIMITED)

    fun syncCommand(command: suspend (TodoRepository) -> Unit) {
        syncCommands.trySend(command)
    }

    val settings: Flow<SyncSettings>
        get() = settingsStore.data.map { SyncSettings(it[Keys.server] ?: "", it[Keys.space] ?: "", it[Keys.token] ?: "") }

    suspend fun saveSettings(s: SyncSettings) {
        settingsStore.edit {
            it[Keys.server] = s.serverUrl
            it[Keys.space] = s.space
            it[Keys.token] = s.token
        }
    }

    override fun onCreate() {
        super.onCreate()
        // The engine's warnings and errors (a failed background sync, a failing callback) in Logcat.
        Confluo.setLogger(LogLevel.INFO, LogcatLogger())
        scope.launch {
            val repo = repository.await()
            for (command in syncCommands) command(repo)
        }
        SyncWork.schedulePeriodic(this)
        // Live sync (debounced pushes, the long poll) while the app is in the
        // foreground; WorkManager covers the background.
        ProcessLifecycleOwner.get().lifecycle.addObserver(object : DefaultLifecycleObserver {
            override fun onStart(owner: LifecycleOwner) = syncCommand { it.startSync(settings.first()) }

            override fun onStop(owner: LifecycleOwner) = syncCommand { it.stopSync() }
        })
        // The network callback is background sync's online hint.
        val connectivity = getSystemService(ConnectivityManager::class.java)
        connectivity.registerDefaultNetworkCallback(object : ConnectivityManager.NetworkCallback() {
            override fun onCapabilitiesChanged(network: Network, caps: NetworkCapabilities) {
                val online = caps.hasCapability(NetworkCapabilities.NET_CAPABILITY_VALIDATED)
                syncCommand { it.setOnline(online) }
            }

            override fun onLost(network: Network) {
                syncCommand { it.setOnline(false) }
            }
        })
    }
}
