import BackgroundTasks
import SwiftUI

/// The app: one list screen; background sync while running, and a
/// BGAppRefreshTask for syncs while in the background.
@main
struct TodoApp: App {
    @State private var model = TodoModel()
    @Environment(\.scenePhase) private var phase

    init() {
        BGTaskScheduler.shared.register(forTaskWithIdentifier: TodoModel.refreshTask, using: nil) { task in
            TodoModel.handleRefresh(task as! BGAppRefreshTask)
        }
    }

    var body: some Scene {
        WindowGroup {
            TodoListView(model: model)
        }
        .onChange(of: phase) { _, phase in
            switch phase {
            case .active: model.enterForeground()
            case .background: model.enterBackground()
            default: break
            }
        }
    }
}
