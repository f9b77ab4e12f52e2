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
    assert_eq!(ids_in_list(&db), std::slice::from_ref(&only));
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

/// A sync server in this process, accepting the dev token.
fn server() -> confluo_server::BackgroundServer {
    confluo_server::BackgroundServer::start(
        std::sync::Arc::new(confluo_server::SqliteStore::open_in_memory().unwrap()),
        confluo_server::Auth::default().with_dev_token(),
        confluo_server::Config::default(),
    )
    .unwrap()
}

/// `todo` with the sync settings in the environment only.
fn todo_with_env(args: &[&str], url: &str, space: &str, token: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_todo"))
        .args(args)
        .env("CONFLUO_SERVER", url)
        .env("CONFLUO_SPACE", space)
        .env("CONFLUO_TOKEN", token)
        .output()
        .unwrap()
}

#[test]
fn a_database_bound_by_a_failed_first_sync_can_be_unbound() {
    let server = server();
    let url = server.url();
    let (_dir, db) = fresh_db();
    add(&db, "Buy milk");
    let sync = |space: &str, url: &str| {
        todo(&[
            "--db",
            &db,
            "sync",
            "--server",
            url,
            "--space",
            space,
            "--token",
            confluo_server::DEV_TOKEN,
        ])
    };
    // A typo, while the server is down.
    assert!(!sync("alice-lsts", "http://127.0.0.1:1").status.success());
    let refused = sync("alice-lists", &url);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("todo unbind"),
        "{}",
        stderr(&refused)
    );
    let unbind = todo(&["--db", &db, "unbind"]);
    assert!(unbind.status.success(), "{}", stderr(&unbind));
    let synced = sync("alice-lists", &url);
    assert!(synced.status.success(), "{}", stderr(&synced));
    // The todo reached the right space.
    let (_other_dir, other) = fresh_db();
    let out = todo_with_env(
        &["--db", &other, "sync"],
        &url,
        "alice-lists",
        confluo_server::DEV_TOKEN,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&todo(&["--db", &other, "list"])).contains("Buy milk"));
}

#[test]
fn sync_settings_come_from_the_environment_and_help_hides_the_token() {
    let server = server();
    let (_dir, db) = fresh_db();
    add(&db, "Buy milk");
    let out = todo_with_env(
        &["--db", &db, "sync"],
        &server.url(),
        "family",
        confluo_server::DEV_TOKEN,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let help = todo_with_env(&["sync", "--help"], &server.url(), "family", "s3cret");
    assert!(help.status.success());
    assert!(stdout(&help).contains("CONFLUO_TOKEN"), "{}", stdout(&help));
    assert!(!stdout(&help).contains("s3cret"), "{}", stdout(&help));
}

#[test]
fn watch_ends_with_a_refused_token() {
    let server = server();
    let (_dir, db) = fresh_db();
    let started = std::time::Instant::now();
    let out = todo_with_env(
        &["--db", &db, "watch", "--for", "8"],
        &server.url(),
        "family",
        "wrong-token",
    );
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("token"), "{}", stderr(&out));
    assert!(started.elapsed() < std::time::Duration::from_secs(8));
}

#[test]
fn failures_have_their_own_exit_codes_and_say_what_to_do() {
    let server = server();
    let (_dir, db) = fresh_db();
    let sync = |url: &str, token: &str| todo_with_env(&["--db", &db, "sync"], url, "family", token);
    let no_scheme = sync("127.0.0.1:7878", confluo_server::DEV_TOKEN);
    assert_eq!(no_scheme.status.code(), Some(2));
    assert!(
        stderr(&no_scheme).contains("needs a scheme, like http://"),
        "{}",
        stderr(&no_scheme)
    );
    let down = sync("http://127.0.0.1:1", confluo_server::DEV_TOKEN);
    assert_eq!(down.status.code(), Some(3), "{}", stderr(&down));
    assert!(stderr(&down).contains("is it running"), "{}", stderr(&down));
    let refused = sync(&server.url(), "wrong-token");
    assert_eq!(refused.status.code(), Some(4), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("CONFLUO_TOKEN"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(todo(&["--db", &db, "rm", "zzz"]).status.code(), Some(1));
    assert_eq!(todo(&["--db", &db, "frobnicate"]).status.code(), Some(2));
    let help = stdout(&todo(&["--help"]));
    assert!(
        help.contains("Exit codes") && help.contains("4  auth"),
        "{help}"
    );
}

#[test]
fn sync_reports_todos_and_a_readable_duration() {
    let server = server();
    let (_dir, db) = fresh_db();
    add(&db, "Buy milk");
    let out = todo_with_env(
        &["--db", &db, "sync"],
        &server.url(),
        "family",
        confluo_server::DEV_TOKEN,
    );
    let said = stdout(&out);
    assert!(said.contains("sent 1 todo,"), "{said}");
    let ms = said.split(" in ").nth(1).unwrap_or_default();
    let (number, unit) = ms.split_once(' ').unwrap_or_default();
    assert!(number.parse::<u64>().is_ok(), "{said}");
    assert!(unit.starts_with("ms:"), "{said}");
    // Another device receives that one todo.
    let (_other_dir, other) = fresh_db();
    let out = todo_with_env(
        &["--db", &other, "sync"],
        &server.url(),
        "family",
        confluo_server::DEV_TOKEN,
    );
    let said = stdout(&out);
    assert!(said.contains("sent 0 todos, 1 todo changed here"), "{said}");
    // Not a terminal: one line, no progress display.
    assert!(
        !said.contains('\r') && said.lines().count() == 1,
        "{said:?}"
    );
}
