//! The README's commands, run as printed: the demo, the server, and the
//! two-terminal flow. Only what a reader would fill in is filled in: a free
//! port for 7878 (the README says any port does), and the ids the list shows.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The README's shell commands: indented lines that start with `cargo run`.
fn readme_commands() -> Vec<String> {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    std::fs::read_to_string(readme)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("    "))
        .filter(|l| l.starts_with("cargo run -p "))
        .map(str::to_owned)
        .collect()
}

/// The README's sample `auth.toml`.
fn readme_auth_toml() -> String {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let text = std::fs::read_to_string(readme).unwrap();
    let start = text.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let end = start + text[start..].find("```").unwrap();
    text[start..end].to_owned()
}

/// The binaries `cargo run -p todo-cli --` and `cargo run -p confluo-server
/// --` run (the server is built here if this crate's tests ran alone).
fn binaries() -> (PathBuf, PathBuf) {
    let todo = PathBuf::from(env!("CARGO_BIN_EXE_todo"));
    let server = todo.with_file_name(format!("confluo-server{}", std::env::consts::EXE_SUFFIX));
    if !server.exists() {
        let built = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "confluo-server"])
            .status()
            .unwrap();
        assert!(built.success(), "building confluo-server");
    }
    (todo, server)
}

/// Splits a printed command into words (the README quotes with "...").
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

/// A README command as a process: the binary for its `cargo run -p`, its
/// arguments with `7878` as `port` and placeholders from `fill`.
fn command(line: &str, port: u16, fill: &dyn Fn(&str) -> Option<String>, dir: &Path) -> Command {
    let (todo, server) = binaries();
    let line = line.replace("7878", &port.to_string());
    let words = words(&line);
    assert_eq!(&words[..3], ["cargo", "run", "-p"], "{line}");
    let program = match words[3].as_str() {
        "todo-cli" => todo,
        "confluo-server" => server,
        other => panic!("unknown package {other}"),
    };
    assert_eq!(words[4], "--", "{line}");
    let mut cmd = Command::new(program);
    cmd.current_dir(dir);
    let mut args = words[5..].iter().peekable();
    while let Some(a) = args.next() {
        if a.starts_with('<') {
            // A placeholder such as <short id from the list>: it ran to '>'.
            let mut text = a.clone();
            while !text.ends_with('>') {
                text.push(' ');
                text.push_str(args.next().expect("a closed placeholder"));
            }
            cmd.arg(fill(&text).unwrap_or_else(|| panic!("nothing fills {text}")));
        } else {
            cmd.arg(a);
        }
    }
    cmd
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs a command to its end within `deadline`; its stdout.
fn run(mut cmd: Command, deadline: Duration) -> String {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            assert!(
                status.success(),
                "{cmd:?}: {status}\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return String::from_utf8(out.stdout).unwrap();
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} did not end within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts a long-running command; the lines it prints come on the channel.
fn start(mut cmd: Command) -> (Child, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn wait_for_line(rx: &mpsc::Receiver<String>, what: &str, pattern: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(pattern) => return,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    panic!("timed out waiting for {what} ({pattern:?})");
}

fn wait_for_health(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_readme_commands_work_as_printed() {
    let commands = readme_commands();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let no_fill = |_: &str| None;

    // The demo.
    let demo = commands
        .iter()
        .find(|c| c.ends_with(" demo"))
        .expect("the demo");
    let out = run(
        command(demo, port, &no_fill, dir.path()),
        Duration::from_secs(120),
    );
    assert!(out.contains("Converged: yes"), "{out}");

    // The development server, then the two terminals.
    let server_line = commands
        .iter()
        .find(|c| c.contains("confluo-server") && c.contains("--dev"))
        .expect("the dev server");
    let (mut server, _) = start(command(server_line, port, &no_fill, dir.path()));
    wait_for_health(port);
    let flow: Vec<&String> = commands
        .iter()
        .filter(|c| c.starts_with("cargo run -p todo-cli -- --db"))
        .collect();
    assert!(flow.len() >= 10, "{flow:?}");
    let mut watchers = Vec::new();
    for (i, line) in flow.iter().enumerate() {
        let short_id = || -> Option<String> {
            let list = run(
                command(
                    "cargo run -p todo-cli -- --db alice.db list",
                    port,
                    &no_fill,
                    dir.path(),
                ),
                Duration::from_secs(30),
            );
            // The first todo's short id: the first word of its line after
            // the checkbox.
            list.lines()
                .find_map(|l| l.split("] ").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_owned)
        };
        let fill = |placeholder: &str| placeholder.contains("id").then(short_id).flatten();
        if line.contains("bob.db list --json") {
            // Bob's watch brings Alice's removal on its own, soon.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let out = run(
                    command(line, port, &fill, dir.path()),
                    Duration::from_secs(30),
                );
                let list: serde_json::Value = serde_json::from_str(&out).unwrap();
                if list == serde_json::json!([]) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "Alice's rm never reached Bob: {out}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        let cmd = command(line, port, &fill, dir.path());
        if line.contains(" watch ") && !line.contains("--for") {
            // Bob's watch runs until stopped: it must show Alice's todo.
            let (child, rx) = start(cmd);
            wait_for_line(&rx, &format!("line {i}: Bob's list"), "Buy milk");
            watchers.push(child);
        } else {
            run(cmd, Duration::from_secs(60));
        }
    }
    for mut w in watchers {
        let _ = w.kill();
        let _ = w.wait();
    }
    let _ = server.kill();
    let _ = server.wait();

    // The server with the sample auth.toml starts and answers.
    std::fs::write(dir.path().join("auth.toml"), readme_auth_toml()).unwrap();
    let auth_line = commands
        .iter()
        .find(|c| c.contains("confluo-server") && c.contains("--auth auth.toml"))
        .expect("the server with an auth file");
    let port = free_port();
    let (mut server, _) = start(command(auth_line, port, &no_fill, dir.path()));
    wait_for_health(port);
    let _ = server.kill();
    let _ = server.wait();
}
