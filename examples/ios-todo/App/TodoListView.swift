import SwiftUI
import TodoCore

/// The list, the status chip, and the settings sheet.
struct TodoListView: View {
    @Bindable var model: TodoModel
    @State private var draft = ""
    @State private var renaming: TodoItem?
    @State private var newTitle = ""
    @State private var showSettings = false

    var body: some View {
        NavigationStack {
            List {
                HStack {
                    TextField("New todo", text: $draft)
                        .onSubmit(add)
                    Button("Add", action: add).disabled(draft.trimmingCharacters(in: .whitespaces).isEmpty)
                }
                ForEach(model.todos) { item in
                    HStack {
                        Button { model.toggle(item) } label: {
                            Image(systemName: item.done ? "checkmark.circle.fill" : "circle")
                        }
                        .buttonStyle(.plain)
                        Text(item.title).strikethrough(item.done)
                        Spacer()
                        Button("Rename") {
                            newTitle = item.title
                            renaming = item
                        }
                        .buttonStyle(.borderless)
                    }
                }
                .onDelete { offsets in offsets.map { model.todos[$0] }.forEach(model.delete) }
            }
            .navigationTitle("Todo")
            .toolbar {
                ToolbarItem(placement: .topBarLeading) {
                    if let chip = model.chip { StatusChip(chip: chip) }
                }
                ToolbarItem(placement: .topBarTrailing) {
                    Button { showSettings = true } label: { Image(systemName: "gearshape") }
                }
            }
            .alert("Rename", isPresented: Binding(get: { renaming != nil }, set: { if !$0 { renaming = nil } })) {
                TextField("Title", text: $newTitle)
                Button("Save") { if let item = renaming { model.rename(item, to: newTitle) } }
                Button("Cancel", role: .cancel) {}
            }
            .sheet(isPresented: $showSettings) {
                SettingsView(settings: $model.settings, signOut: model.signOut)
            }
        }
    }

    private func add() {
        let title = draft.trimmingCharacters(in: .whitespaces)
        guard !title.isEmpty else { return }
        model.add(title)
        draft = ""
    }
}

struct StatusChip: View {
    let chip: SyncChip

    var body: some View {
        Text(chip.label)
            .font(.caption)
            .padding(.horizontal, 8)
            .padding(.vertical, 4)
            .background(color.opacity(0.15), in: Capsule())
            .foregroundStyle(color)
    }

    private var color: Color {
        switch chip.kind {
        case .synced: .green
        case .syncing: .blue
        case .offline, .stopped: .gray
        case .error: .red
        case .signInNeeded: .orange
        }
    }
}

struct SettingsView: View {
    @Binding var settings: SyncSettings
    let signOut: () -> Void
    @Environment(\.dismiss) private var dismiss
    @State private var draft = SyncSettings(serverURL: "", space: "", token: "")

    var body: some View {
        NavigationStack {
            Form {
                TextField("Server URL", text: $draft.serverURL).textInputAutocapitalization(.never)
                TextField("Space", text: $draft.space).textInputAutocapitalization(.never)
                SecureField("Token", text: $draft.token)
                Section {
                    Button("Sign out and clear this device", role: .destructive) {
                        signOut()
                        dismiss()
                    }
                    .disabled(!settings.isComplete)
                }
            }
            .navigationTitle("Sync settings")
            .toolbar {
                ToolbarItem(placement: .confirmationAction) {
                    Button("Save") {
                        settings = draft
                        dismiss()
                    }
                }
                ToolbarItem(placement: .cancellationAction) { Button("Cancel") { dismiss() } }
            }
            .onAppear { draft = settings }
        }
    }
}
