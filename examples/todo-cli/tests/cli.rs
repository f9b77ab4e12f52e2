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

/// A fresh database file in its own directory.
fn fresh_db() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("todo.db").to_str().unwrap().to_owned();
    (dir, db)
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn add(db: &str, title: &str) -> String {
    stdout(&todo(&["--db", db, "add", title])).trim().to_owned()
}

fn ids_in_list(db: &str) -> Vec<String> {
    let list: serde_json::Value =
        serde_json::from_slice(&todo(&["--db", db, "list", "--json"]).stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn an_empty_or_ambiguous_id_is_refused_and_nothing_changes() {
    let (_dir, db) = fresh_db();
    let only = add(&db, "Buy milk");
    for command in [
        vec!["rm", ""],
        vec!["done", ""],
        vec!["undone", " "],
        vec!["rename", "", "x"],
    ] {
        let mut args = vec!["--db", db.as_str()];
        args.extend(command.iter().copied());
        let out = todo(&args);
        assert!(!out.status.success(), "{command:?}: {}", stdout(&out));
    }
    assert_eq!(ids_in_list(&db), [only.clone()]);
    // Made within the same millisecond or so, two ids share a long prefix.
    let other = add(&db, "Call mom");
    let shared = only
        .chars()
        .zip(other.chars())
        .take_while(|(a, b)| a == b)
        .count();
    assert!(shared >= 4, "{only} {other}");
    let out = todo(&["--db", &db, "rm", &only[..shared]]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("Buy milk") && err.contains("Call mom") && err.contains(&only[28..]),
        "{err}"
    );
    assert_eq!(ids_in_list(&db).len(), 2);
}

#[test]
fn list_shows_short_ids_that_tell_todos_apart_and_commands_take_them() {
    let (_dir, db) = fresh_db();
    let ids: Vec<String> = ["a", "b", "c"].iter().map(|t| add(&db, t)).collect();
    let listed = stdout(&todo(&["--db", &db, "list"]));
    let shorts: Vec<String> = listed
        .lines()
        .map(|l| l.split_whitespace().nth(2).unwrap().to_owned())
        .collect();
    assert_eq!(shorts.len(), 3, "{listed}");
    for (short, id) in shorts.iter().zip(&ids) {
        assert!(short.len() < 13 && id.ends_with(short.as_str()), "{listed}");
    }
    let unique: std::collections::HashSet<_> = shorts.iter().collect();
    assert_eq!(unique.len(), 3, "{listed}");
    // The short id, a full id and a unique prefix all name a todo.
    assert!(todo(&["--db", &db, "done", &shorts[1]]).status.success());
    assert!(todo(&["--db", &db, "rename", &ids[2], "C"])
        .status
        .success());
    assert!(todo(&["--db", &db, "undone", &ids[1][..30]])
        .status
        .success());
    assert!(todo(&["--db", &db, "done", &shorts[0]]).status.success());
    assert!(todo(&["--db", &db, "rm", &shorts[1]]).status.success());
    let list: serde_json::Value =
        serde_json::from_slice(&todo(&["--db", &db, "list", "--json"]).stdout).unwrap();
    assert_eq!(
        list,
        serde_json::json!([
            {"id": ids[0], "title": "a", "done": true},
            {"id": ids[2], "title": "C", "done": false},
        ])
    );
}
