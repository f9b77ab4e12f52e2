package dev.confluo.todo.core

import dev.confluo.Confluo
import dev.confluo.SyncState
import dev.confluo.SyncStatus
import kotlinx.coroutines.flow.filter
import kotlinx.coroutines.flow.first
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertFalse
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
    fun `two app instances converge through the server`() = runBlocking<Unit> {
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
    fun `a deleted item stays deleted on both`() = runBlocking<Unit> {
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
    fun `the status chip follows background sync`() = runBlocking<Unit> {
        TestServer.start().use { server ->
            val repo = TodoRepository.open(Confluo.openInMemory())
            // Before any sync, an unsent write is not "Synced".
            repo.add("offline write")
            val first = withTimeout(15_000) { repo.syncStatus.filter { it.pending == 1L }.first() }
            assertEquals(SyncChip("Not syncing · 1 pending", SyncChip.Kind.STOPPED), SyncChip.of(first))
            // Incomplete settings start nothing: still stopped, still pending.
            repo.startSync(SyncSettings(server.url, "chip", ""))
            assertEquals(SyncState.Stopped, repo.syncStatus.value.state)
            repo.startSync(SyncSettings(server.url, "chip", "dev-token"))
            val synced = withTimeout(15_000) {
                repo.syncStatus.filter { it.state == SyncState.Idle && it.pending == 0L && it.lastSyncedMs != null }.first()
            }
            assertEquals(SyncChip("Synced", SyncChip.Kind.SYNCED), SyncChip.of(synced))
            repo.setOnline(false)
            val offline = withTimeout(15_000) { repo.syncStatus.filter { it.state is SyncState.Offline }.first() }
            assertEquals(SyncChip("Offline", SyncChip.Kind.OFFLINE), SyncChip.of(offline))
            repo.stopSync()
            assertEquals(SyncChip("Not syncing", SyncChip.Kind.STOPPED), SyncChip.of(repo.syncStatus.value))
        }
    }

    @Test
    fun `a refused token shows Sign in again, and the worker does not retry it`() = runBlocking<Unit> {
        TestServer.start().use { server ->
            val repo = TodoRepository.open(Confluo.openInMemory())
            repo.add("needs an account")
            val revoked = SyncSettings(server.url, "auth", "revoked-token")
            assertEquals(SyncOutcome.SIGN_IN_REQUIRED, repo.syncOnce(revoked))
            repo.startSync(revoked)
            val required = withTimeout(15_000) { repo.syncStatus.filter { it.state is SyncState.AuthRequired }.first() }
            assertEquals(SyncChip("Sign in again · 1 pending", SyncChip.Kind.SIGN_IN), SyncChip.of(required))
            repo.stopSync()
            assertEquals(SyncOutcome.SYNCED, repo.syncOnce(revoked.copy(token = "dev-token")))
            assertEquals(SyncOutcome.NOT_CONFIGURED, repo.syncOnce(revoked.copy(token = "")))
            // Nothing listens on port 9: unreachable, worth a retry later.
            assertEquals(SyncOutcome.RETRY_LATER, repo.syncOnce(SyncSettings("http://127.0.0.1:9", "auth", "dev-token")))
            assertEquals(SyncOutcome.FAILED, repo.syncOnce(SyncSettings("ftp://example.com", "auth", "dev-token")))
        }
    }

    @Test
    fun `signing out clears the list and the token, and another account's list arrives`() = runBlocking<Unit> {
        TestServer.start().use { server ->
            val alice = app(server, "alice-list")
            alice.add("Alice's todo")
            alice.waitFor { it.size == 1 }
            val bob = app(server, "bob-list")
            bob.add("Bob's todo")
            val device = TodoRepository.open(Confluo.openInMemory())
            val aliceSettings = SyncSettings(server.url, "alice-list", "dev-token")
            device.startSync(aliceSettings)
            device.waitFor { list -> list.map { it.title } == listOf("Alice's todo") }

            val saved = device.signOut(aliceSettings)
            assertEquals(SyncSettings(server.url, "alice-list", ""), saved)
            assertFalse(saved.complete)
            device.waitFor { it.isEmpty() }
            assertEquals(SyncChip("Not syncing", SyncChip.Kind.STOPPED), SyncChip.of(device.syncStatus.value))

            device.startSync(SyncSettings(server.url, "bob-list", "dev-token"))
            device.waitFor { list -> list.map { it.title } == listOf("Bob's todo") }
            device.add("Bob's second")
            // Bob's own device gets the new todo and never Alice's.
            val onBob = bob.waitFor { it.size == 2 }
            assertEquals(listOf("Bob's todo", "Bob's second"), onBob.map { it.title })
            for (repo in listOf(alice, bob, device)) repo.stopSync()
        }
    }
}
