import BackgroundTasks
import Confluo
import Foundation
import Network
import Observation
import TodoCore

/// The app's one database and repository, opened once and shared by the UI
/// model and background refreshes.
actor RepositoryStore {
    static let shared = RepositoryStore()
    private var opened: TodoRepository?

    func repository() async throws -> TodoRepository {
        if let opened { return opened }
        let url = try FileManager.default.url(for: .applicationSupportDirectory, in: .userDomainMask,
                                              appropriateFor: nil, create: true)
        let repo = try await TodoRepository.open(try await Confluo.open(path: url.appendingPathComponent("todo.db").path))
        opened = repo
        return repo
    }
}

/// The list screen's state and actions; all logic is in TodoRepository.
@MainActor
@Observable
final class TodoModel {
    static let refreshTask = "dev.confluo.todo.sync"

    var todos: [TodoItem] = []
    var chip: SyncChip?
    var settings: SyncSettings {
        didSet { saveSettings() }
    }

    private var repository: TodoRepository?
    private let monitor = NWPathMonitor()

    init() {
        settings = Self.loadSettings()
        Task { await open() }
    }

    private func open() async {
        do {
            let repo = try await RepositoryStore.shared.repository()
            repository = repo
            Task { for try await list in repo.todos() { todos = list } }
            Task { for await status in repo.syncStatus { chip = SyncChip(status) } }
            // NWPathMonitor is background sync's online hint.
            monitor.pathUpdateHandler = { path in repo.setOnline(path.status == .satisfied) }
            monitor.start(queue: DispatchQueue(label: "dev.confluo.todo.network"))
            enterForeground()
        } catch {
            chip = nil
        }
    }

    func enterForeground() {
        guard let repository else { return }
        let settings = settings
        Task { try? await repository.startSync(settings) }
    }

    func enterBackground() {
        guard let repository else { return }
        Task { await repository.stopSync() }
        Self.scheduleRefresh()
    }

    /// Clears this device's list and forgets the space and token; the
    /// settings sheet then asks for the next account.
    func signOut() {
        guard let repository else { return }
        let current = settings
        Task {
            guard let cleared = try? await repository.signOut(current) else { return }
            settings = cleared
        }
    }

    /// "Sign in again": after new settings (a fresh token), sync at once.
    func retrySync() { repository?.syncSoon() }

    func add(_ title: String) { change { try await $0.add(title) } }
    func toggle(_ item: TodoItem) { change { try await $0.toggle(item.id) } }
    func rename(_ item: TodoItem, to title: String) { change { try await $0.rename(item.id, to: title) } }
    func delete(_ item: TodoItem) { change { try await $0.delete(item.id) } }

    private func change(_ body: @escaping (TodoRepository) async throws -> Void) {
        guard let repository else { return }
        Task { try? await body(repository) }
    }

    private func saveSettings() {
        UserDefaults.standard.set(try? JSONEncoder().encode(settings), forKey: "sync-settings")
        enterForeground()
    }

    private static func loadSettings() -> SyncSettings {
        guard let data = UserDefaults.standard.data(forKey: "sync-settings"),
              let s = try? JSONDecoder().decode(SyncSettings.self, from: data) else {
            return SyncSettings(serverURL: "", space: "", token: "")
        }
        return s
    }

    static func scheduleRefresh() {
        let request = BGAppRefreshTaskRequest(identifier: refreshTask)
        request.earliestBeginDate = Date(timeIntervalSinceNow: 15 * 60)
        try? BGTaskScheduler.shared.submit(request)
    }

    /// A background refresh: one sync with the app's shared repository,
    /// then the next refresh is scheduled. The task is completed exactly
    /// once: when the sync ends, or when iOS says time is up.
    nonisolated static func handleRefresh(_ task: BGAppRefreshTask) {
        scheduleRefreshLater()
        let completion = Completion(task)
        let work = Task {
            let repo = try await RepositoryStore.shared.repository()
            try await repo.syncOnce(loadSettings())
        }
        task.expirationHandler = {
            // Cancelling the task stops its syncNow before the next request.
            work.cancel()
            completion.finish(success: false)
        }
        Task {
            let ok = (try? await work.value) != nil
            completion.finish(success: ok)
        }
    }

    nonisolated private static func scheduleRefreshLater() {
        Task { @MainActor in scheduleRefresh() }
    }
}

/// Completes a background task once, whichever of its ends comes first.
private final class Completion: @unchecked Sendable {
    private let task: BGAppRefreshTask
    private let lock = NSLock()
    private var done = false

    init(_ task: BGAppRefreshTask) { self.task = task }

    func finish(success: Bool) {
        lock.lock()
        defer { lock.unlock() }
        guard !done else { return }
        done = true
        task.setTaskCompleted(success: success)
    }
}
