//! The `todo` command as a user runs it.

use std::process::Command;

fn todo(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_todo"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_demo_converges() {
    let out = todo(&["demo"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Converged: yes"), "{stdout}");
    assert!(
        stdout.contains("Buy groceries and milk") && stdout.contains("Call mom and dad"),
        "{stdout}"
    );
    assert!(!stdout.contains("Water the plants\n  Bob"), "{stdout}");
}

#[test]
fn local_commands_edit_a_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("todo.db");
    let db = db.to_str().unwrap();
    let id = String::from_utf8(todo(&["--db", db, "add", "Buy milk"]).stdout).unwrap();
    let id = id.trim();
    assert_eq!(id.len(), 36, "{id}");
    assert!(todo(&["--db", db, "done", &id[..30]]).status.success());
    assert!(todo(&["--db", db, "rename", id, "Buy oat milk"])
        .status
        .success());
    let list: serde_json::Value =
        serde_json::from_slice(&todo(&["--db", db, "list", "--json"]).stdout).unwrap();
    assert_eq!(
        list,
        serde_json::json!([{"id": id, "title": "Buy oat milk", "done": true}])
    );
    let missing = todo(&["--db", db, "rm", "zzz"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no todo"));
    assert!(todo(&["--db", db, "rm", id]).status.success());
    assert_eq!(
        String::from_utf8_lossy(&todo(&["--db", db, "list"]).stdout).trim(),
        "(nothing to do)"
    );
}
