package dev.confluo.todo

import android.os.Bundle
import androidx.activity.ComponentActivity
import androidx.activity.compose.setContent
import androidx.activity.viewModels
import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.lazy.LazyColumn
import androidx.compose.foundation.lazy.items
import androidx.compose.material.icons.Icons
import androidx.compose.material.icons.filled.Settings
import androidx.compose.material3.AlertDialog
import androidx.compose.material3.AssistChip
import androidx.compose.material3.Button
import androidx.compose.material3.Checkbox
import androidx.compose.material3.ExperimentalMaterial3Api
import androidx.compose.material3.Icon
import androidx.compose.material3.IconButton
import androidx.compose.material3.ListItem
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedTextField
import androidx.compose.material3.Scaffold
import androidx.compose.material3.SwipeToDismissBox
import androidx.compose.material3.SwipeToDismissBoxValue
import androidx.compose.material3.Text
import androidx.compose.material3.TextButton
import androidx.compose.material3.TopAppBar
import androidx.compose.material3.rememberSwipeToDismissBoxState
import androidx.compose.runtime.Composable
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.remember
import androidx.compose.runtime.setValue
import androidx.compose.ui.Alignment
import androidx.compose.ui.Modifier
import androidx.compose.ui.unit.dp
import androidx.lifecycle.compose.collectAsStateWithLifecycle
import dev.confluo.todo.core.SyncChip
import dev.confluo.todo.core.SyncSettings
import dev.confluo.todo.core.TodoItem

/** The one Activity: the list, the status chip, and the settings dialog. */
class MainActivity : ComponentActivity() {
    private val model: TodoViewModel by viewModels()

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContent { MaterialTheme { TodoScreen(model) } }
    }
}

@OptIn(ExperimentalMaterial3Api::class)
@Composable
fun TodoScreen(model: TodoViewModel) {
    val todos by model.todos.collectAsStateWithLifecycle()
    val chip by model.chip.collectAsStateWithLifecycle()
    val settings by model.settings.collectAsStateWithLifecycle()
    var editing by remember { mutableStateOf<TodoItem?>(null) }
    var showSettings by remember { mutableStateOf(false) }
    var draft by remember { mutableStateOf("") }

    Scaffold(topBar = {
        TopAppBar(
            title = { Text("Todo") },
            actions = {
                chip?.let { StatusChip(it, onSignIn = { showSettings = true }) }
                if (settings.complete) TextButton(onClick = model::signOut) { Text("Sign out") }
                IconButton(onClick = { showSettings = true }) { Icon(Icons.Filled.Settings, "Sync settings") }
            },
        )
    }) { padding ->
        Column(Modifier.padding(padding).fillMaxSize()) {
            Row(Modifier.fillMaxWidth().padding(8.dp), verticalAlignment = Alignment.CenterVertically) {
                OutlinedTextField(draft, { draft = it }, Modifier.weight(1f), label = { Text("New todo") })
                Button(
                    onClick = { model.add(draft); draft = "" },
                    enabled = draft.isNotBlank(),
                    modifier = Modifier.padding(start = 8.dp),
                ) { Text("Add") }
            }
            LazyColumn(Modifier.fillMaxSize()) {
                items(todos, key = { it.id }) { item ->
                    val dismiss = rememberSwipeToDismissBoxState(confirmValueChange = {
                        if (it != SwipeToDismissBoxValue.Settled) model.delete(item)
                        it != SwipeToDismissBoxValue.Settled
                    })
                    SwipeToDismissBox(dismiss, backgroundContent = {}) {
                        ListItem(
                            headlineContent = { Text(item.title) },
                            leadingContent = { Checkbox(item.done, { model.toggle(item) }) },
                            trailingContent = { TextButton({ editing = item }) { Text("Rename") } },
                        )
                    }
                }
            }
        }
    }
    editing?.let { item -> RenameDialog(item, onDone = { title -> title?.let { model.rename(item, it) }; editing = null }) }
    if (showSettings) SettingsDialog(settings, onDone = { s -> s?.let(model::saveSettings); showSettings = false })
}

@Composable
private fun StatusChip(chip: SyncChip, onSignIn: () -> Unit) {
    // "Sign in again" opens the settings, where a new token goes.
    AssistChip(onClick = { if (chip.kind == SyncChip.Kind.SIGN_IN) onSignIn() }, label = { Text(chip.label) })
}

@Composable
private fun RenameDialog(item: TodoItem, onDone: (String?) -> Unit) {
    var title by remember { mutableStateOf(item.title) }
    AlertDialog(
        onDismissRequest = { onDone(null) },
        title = { Text("Rename") },
        text = { OutlinedTextField(title, { title = it }) },
        confirmButton = { TextButton({ onDone(title) }, enabled = title.isNotBlank()) { Text("Save") } },
        dismissButton = { TextButton({ onDone(null) }) { Text("Cancel") } },
    )
}

@Composable
private fun SettingsDialog(current: SyncSettings, onDone: (SyncSettings?) -> Unit) {
    var server by remember { mutableStateOf(current.serverUrl) }
    var space by remember { mutableStateOf(current.space) }
    var token by remember { mutableStateOf(current.token) }
    AlertDialog(
        onDismissRequest = { onDone(null) },
        title = { Text("Sync settings") },
        text = {
            Column(verticalArrangement = Arrangement.spacedBy(8.dp)) {
                OutlinedTextField(server, { server = it }, label = { Text("Server URL") })
                OutlinedTextField(space, { space = it }, label = { Text("Space") })
                OutlinedTextField(token, { token = it }, label = { Text("Token") })
            }
        },
        confirmButton = { TextButton({ onDone(SyncSettings(server.trim(), space.trim(), token.trim())) }) { Text("Save") } },
        dismissButton = { TextButton({ onDone(null) }) { Text("Cancel") } },
    )
}
