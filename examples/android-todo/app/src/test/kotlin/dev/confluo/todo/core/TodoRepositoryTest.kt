package dev.confluo.todo.core

import dev.confluo.Confluo
import dev.confluo.SyncState
import dev.confluo.SyncStatus
import kotlinx.coroutines.flow.filter
import kotlinx.coroutines.flow.first
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test

class TodoRepositoryTest {
    private suspend fun app(server: TestServer, space: String): TodoRepository =
        TodoRepository.open(Confluo.openInMemory()).also {
            it.startSync(SyncSettings(server.url, space, "dev-token"))
        }

    private suspend fun TodoRepository.waitFor(what: (List<TodoItem>) -> Boolean): List<TodoItem> =
        withTimeout(15_000) { todos.filter(what).first() }

    @Test
    fun `two app instances converge through the server`() = runBlocking {
        TestServer.start().use { server ->
            val alice = app(server, "family")
            val bob = app(server, "family")
            val milk = alice.add("Buy milk")
            alice.add("Call mom")
            bob.waitFor { it.size == 2 }
            bob.toggle(milk)
            alice.rename(milk, "Buy oat milk")
            val expected = listOf(TodoItem(milk, "Buy oat milk", true))
            val onAlice = alice.waitFor { list -> list.any { it == expected[0] } }
            val onBob = bob.waitFor { list -> list.any { it == expected[0] } }
            assertEquals(onAlice, onBob)
            alice.stopSync()
            bob.stopSync()
        }
    }

    @Test
    fun `a deleted item stays deleted on both`() = runBlocking {
        TestServer.start().use { server ->
            val alice = app(server, "deletes")
            val bob = app(server, "deletes")
            val id = alice.add("Water the plants")
            bob.waitFor { it.size == 1 }
            alice.delete(id)
            bob.toggle(id)
            alice.waitFor { it.isEmpty() }
            bob.waitFor { it.isEmpty() }
            // Still gone after more syncing on both sides.
            alice.add("Something else")
            assertTrue(bob.waitFor { it.size == 1 }.none { it.id == id })
            alice.stopSync()
            bob.stopSync()
        }
    }

    @Test
    fun `the status chip follows background sync`() = runBlocking {
        TestServer.start().use { server ->
            val repo = TodoRepository.open(Confluo.openInMemory())
            assertEquals(SyncChip.Kind.SYNCED, SyncChip.of(repo.syncStatus.value).kind)
            repo.add("offline write")
            repo.startSync(SyncSettings(server.url, "chip", "dev-token"))
            withTimeout(15_000) { repo.syncStatus.filter { it.state == SyncState.Idle && it.pending == 0L && it.lastSyncedMs != null }.first() }
            repo.setOnline(false)
            val offline = withTimeout(15_000) { repo.syncStatus.filter { it.state is SyncState.Offline }.first() }
            assertEquals(SyncChip("Offline", SyncChip.Kind.OFFLINE), SyncChip.of(offline))
            repo.stopSync()
            assertEquals("Syncing… · 3 pending", SyncChip.of(SyncStatus(SyncState.Syncing, 3, null)).label)
            assertEquals("Sync error, retrying in 2 s", SyncChip.of(SyncStatus(SyncState.Error("boom", 1_500), 0, null)).label)
            // Incomplete settings start nothing.
            repo.startSync(SyncSettings("", "chip", "dev-token"))
        }
    }
}
