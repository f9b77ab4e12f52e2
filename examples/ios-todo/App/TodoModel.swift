import BackgroundTasks
import Confluo
import Foundation
import Network
import Observation
import TodoCore

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
            let url = try FileManager.default.url(for: .applicationSupportDirectory, in: .userDomainMask,
                                                  appropriateFor: nil, create: true)
            let repo = try await TodoRepository.open(try Confluo.open(path: url.appendingPathComponent("todo.db").path))
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
        try? repository?.startSync(settings)
    }

    func enterBackground() {
        repository?.stopSync()
        Self.scheduleRefresh()
    }

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
        try? repository?.startSync(settings)
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

    /// A background refresh: one sync, then the next refresh is scheduled.
    nonisolated static func handleRefresh(_ task: BGAppRefreshTask) {
        scheduleRefreshLater()
        let work = Task {
            let url = try FileManager.default.url(for: .applicationSupportDirectory, in: .userDomainMask,
                                                  appropriateFor: nil, create: true)
            let repo = try await TodoRepository.open(try Confluo.open(path: url.appendingPathComponent("todo.db").path))
            try await repo.syncOnce(loadSettings())
        }
        task.expirationHandler = { work.cancel() }
        Task {
            let ok = (try? await work.value) != nil
            task.setTaskCompleted(success: ok)
        }
    }

    nonisolated private static func scheduleRefreshLater() {
        Task { @MainActor in scheduleRefresh() }
    }
}
