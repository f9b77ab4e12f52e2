package dev.confluo.todo

import android.app.Application
import androidx.lifecycle.AndroidViewModel
import androidx.lifecycle.viewModelScope
import dev.confluo.todo.core.SyncChip
import dev.confluo.todo.core.SyncSettings
import dev.confluo.todo.core.TodoItem
import kotlinx.coroutines.ExperimentalCoroutinesApi
import kotlinx.coroutines.flow.SharingStarted
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.flatMapLatest
import kotlinx.coroutines.flow.flow
import kotlinx.coroutines.flow.map
import kotlinx.coroutines.flow.stateIn
import kotlinx.coroutines.launch

/** The list screen's state and actions; all logic is in TodoRepository. */
@OptIn(ExperimentalCoroutinesApi::class)
class TodoViewModel(application: Application) : AndroidViewModel(application) {
    private val app = application as TodoApp
    private val repository = flow { emit(app.repository.await()) }

    val todos: StateFlow<List<TodoItem>> = repository.flatMapLatest { it.todos }
        .stateIn(viewModelScope, SharingStarted.WhileSubscribed(5_000), emptyList())

    val chip: StateFlow<SyncChip?> = repository.flatMapLatest { repo -> repo.syncStatus.map { SyncChip.of(it) } }
        .stateIn(viewModelScope, SharingStarted.WhileSubscribed(5_000), null)

    val settings: StateFlow<SyncSettings> = app.settings
        .stateIn(viewModelScope, SharingStarted.Eagerly, SyncSettings("", "", ""))

    fun add(title: String) = change { it.add(title) }
    fun toggle(item: TodoItem) = change { it.toggle(item.id) }
    fun rename(item: TodoItem, title: String) = change { it.rename(item.id, title) }
    fun delete(item: TodoItem) = change { it.delete(item.id) }

    /** Stops sync, deletes this account's todos from the device and forgets the token. */
    fun signOut() {
        // In the sync command queue, so it runs in order with starts and stops.
        app.syncCommand { app.saveSettings(it.signOut(settings.value)) }
    }

    fun saveSettings(s: SyncSettings) = viewModelScope.launch {
        app.saveSettings(s)
        app.syncCommand { it.startSync(s) }
    }

    /** A local change, then expedited background work so it is sent even if the app closes. */
    private fun change(block: suspend (dev.confluo.todo.core.TodoRepository) -> Unit) = viewModelScope.launch {
        block(app.repository.await())
        SyncWork.scheduleExpedited(app)
    }
}
