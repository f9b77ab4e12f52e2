//! `todo`: a todo list in a terminal, kept in a Confluo database.

mod store;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use confluo_core::{Database, SyncConfig, SyncState, SyncStatus};

use store::{Todo, TodoStore};

/// Exit codes, so that scripts can tell failures apart (2 is clap's).
const DATA: u8 = 1;
const NETWORK: u8 = 3;
const AUTH: u8 = 4;

const EXIT_CODES: &str = "\
Exit codes:
  0  done
  1  data: no such todo, an ambiguous id, an unreadable database, a space
     this database is not bound to
  2  usage: a wrong command line (a server URL without a scheme, say)
  3  network: the sync server cannot be reached, or failed
  4  auth: the sync server refused the token";

#[derive(Parser)]
#[command(
    name = "todo",
    about = "A todo list that syncs, kept in a Confluo database",
    after_help = EXIT_CODES
)]
struct Cli {
    /// The database file.
    #[arg(long, global = true, default_value = "todo.db")]
    db: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Add a todo.
    Add { title: String },
    /// List the todos.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Mark a todo done (its short id from `list`, its full id, or a unique
    /// prefix of it).
    Done { id: String },
    /// Mark a todo not done.
    Undone { id: String },
    /// Rename a todo.
    Rename { id: String, title: String },
    /// Remove a todo.
    Rm { id: String },
    /// Push local changes to a sync server and pull everyone else's.
    Sync(ServerArgs),
    /// Sync in the background and print the list whenever it changes.
    Watch {
        #[command(flatten)]
        server: ServerArgs,
        /// Stop after this many seconds (default: run until interrupted).
        #[arg(long = "for")]
        seconds: Option<u64>,
    },
    /// Forget the space this database syncs with (it is bound to the first
    /// one it tries), so that the next sync may name another; everything in
    /// the database is then pushed to that one.
    Unbind,
    /// Play the story of Alice and Bob editing one list offline, syncing
    /// through a server started in this process.
    Demo,
}

#[derive(clap::Args, Clone)]
struct ServerArgs {
    /// The sync server's URL, like http://127.0.0.1:7878.
    #[arg(long, env = "CONFLUO_SERVER", value_parser = server_url)]
    server: String,
    /// The space to sync with.
    #[arg(long, env = "CONFLUO_SPACE")]
    space: String,
    /// The bearer token. Prefer the environment variable: a --token shows
    /// in `ps` and in the shell's history.
    #[arg(long, env = "CONFLUO_TOKEN", hide_env_values = true)]
    token: String,
}

impl ServerArgs {
    fn config(&self) -> SyncConfig {
        SyncConfig::new(&self.server, &self.space, &self.token)
    }
}

/// Refuses a URL the HTTP client would reject with a cryptic message.
fn server_url(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(host) if !host.is_empty() => Ok(url.to_owned()),
        _ => Err(format!(
            "the server URL needs a scheme, like http://127.0.0.1:7878 (got {url:?})"
        )),
    }
}

/// A failure as the user sees it: what to do about it, and the exit code
/// that tells which kind it was.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

fn fail(code: u8, message: String) -> anyhow::Error {
    Failure { code, message }.into()
}

/// A sync failure, with what to do about it.
fn sync_failure(err: confluo_core::Error, server: &ServerArgs) -> anyhow::Error {
    use confluo_core::Error::*;
    match err {
        Auth(why) => fail(
            AUTH,
            format!("the sync server refused the token ({why}); check --token or CONFLUO_TOKEN"),
        ),
        Unreachable(why) => fail(
            NETWORK,
            format!(
                "cannot reach the sync server at {} ({why}); is it running, and is --server \
                 (or CONFLUO_SERVER) right?",
                server.server
            ),
        ),
        Network {
            message, retryable, ..
        } => fail(
            NETWORK,
            format!(
                "the sync server failed: {message}{}",
                if retryable { "; try again later" } else { "" }
            ),
        ),
        other => other.into(),
    }
}

/// A database stays with the first space it syncs with; say how to leave
/// it before the engine refuses.
fn check_space(db: &Database, space: &str) -> Result<()> {
    match db.bound_space()? {
        Some(bound) if bound != space => Err(fail(
            DATA,
            format!(
                "this database syncs with space {bound:?}, not {space:?}; to sync it with \
                 {space:?} instead, run `todo unbind` first (everything in it then goes to \
                 {space:?})"
            ),
        )),
        _ => Ok(()),
    }
}

fn exit_code(err: &anyhow::Error) -> u8 {
    err.downcast_ref::<Failure>().map_or(DATA, |f| f.code)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("todo: {err:#}");
            ExitCode::from(exit_code(&err))
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Command::Demo = cli.command {
        return demo();
    }
    let store = TodoStore::open(&cli.db)?;
    match cli.command {
        Command::Add { title } => println!("{}", store.add(&title)?),
        Command::List { json } => {
            let todos = store.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&todos)?);
            } else {
                print_list(&todos);
            }
        }
        Command::Done { id } => store.set_done(&id, true)?,
        Command::Undone { id } => store.set_done(&id, false)?,
        Command::Rename { id, title } => store.rename(&id, &title)?,
        Command::Rm { id } => store.remove(&id)?,
        Command::Sync(server) => sync(&store, &server)?,
        Command::Watch { server, seconds } => watch(store, server, seconds)?,
        Command::Unbind => match store.db.bound_space()? {
            Some(space) => {
                store.db.unbind_space()?;
                println!(
                    "this database no longer syncs with space {space:?}; the next sync binds \
                     it to the space it names and pushes everything to it"
                );
            }
            None => println!("this database syncs with no space yet"),
        },
        Command::Demo => unreachable!("handled above"),
    }
    Ok(())
}

/// One sync, reported in todos (the engine counts cells) and plain units.
fn sync(store: &TodoStore, server: &ServerArgs) -> Result<()> {
    check_space(&store.db, &server.space)?;
    let before = store.list()?;
    let unsent = store.db.pending_changes()?;
    let mut config = server.config();
    // On a terminal, a sync that takes a while shows how far it is.
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        let started = std::time::Instant::now();
        config.progress = Some(Arc::new(move |r: &confluo_core::SyncReport| {
            let secs = started.elapsed().as_secs_f64();
            if secs >= 1.0 {
                let moved = r.bytes_sent + r.bytes_received;
                print!(
                    "\r  {} changes sent, {} received, {} ({}/s)   ",
                    r.pushed,
                    r.pulled,
                    human_bytes(moved),
                    human_bytes((moved as f64 / secs) as u64)
                );
                let _ = std::io::Write::flush(&mut std::io::stdout());
            }
        }));
    }
    let r = store
        .db
        .sync_now(&config)
        .map_err(|e| sync_failure(e, server))?;
    if config.progress.is_some() && r.duration.as_secs_f64() >= 1.0 {
        println!();
    }
    let sent = unsent.saturating_sub(store.db.pending_changes()?);
    let changed = changed_todos(&before, &store.list()?);
    println!(
        "synced with space {:?} in {}: sent {}, {} changed here ({} up, {} down)",
        server.space,
        human_duration(r.duration),
        todos(sent as usize),
        todos(changed),
        human_bytes(r.bytes_sent),
        human_bytes(r.bytes_received)
    );
    Ok(())
}

/// How many todos differ between two lists (added, edited or removed).
fn changed_todos(before: &[Todo], after: &[Todo]) -> usize {
    let old: HashMap<&str, &Todo> = before.iter().map(|t| (t.id.as_str(), t)).collect();
    let new: HashMap<&str, &Todo> = after.iter().map(|t| (t.id.as_str(), t)).collect();
    let edited = after
        .iter()
        .filter(|t| old.get(t.id.as_str()) != Some(t))
        .count();
    edited
        + before
            .iter()
            .filter(|t| !new.contains_key(t.id.as_str()))
            .count()
}

fn todos(n: usize) -> String {
    format!("{n} todo{}", if n == 1 { "" } else { "s" })
}

fn human_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

fn human_bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        _ => format!("{:.1} MB", n as f64 / 1e6),
    }
}

fn print_list(todos: &[Todo]) {
    if todos.is_empty() {
        println!("  (nothing to do)");
    }
    for (t, short) in todos.iter().zip(store::short_ids(todos)) {
        println!(
            "  [{}] {short}  {}",
            if t.done { "x" } else { " " },
            t.title
        );
    }
}

fn watch(store: TodoStore, server: ServerArgs, seconds: Option<u64>) -> Result<()> {
    check_space(&store.db, &server.space)?;
    let db = Arc::new(store.db);
    let lister = Arc::downgrade(&db);
    let _watch = db.observe(&["todo"], move |_: &[String]| {
        if let Some(db) = lister.upgrade() {
            if let Ok(todos) = TodoStore::list_of(&db) {
                println!("-- list changed --");
                print_list(&todos);
            }
        }
    });
    // A refused token stays refused (background sync waits for the app):
    // the command ends and says so.
    let (refused, refusal) = mpsc::channel::<String>();
    let sync = db.start_sync(server.config(), move |s: &SyncStatus| {
        println!("[sync] {}", describe(s));
        if let SyncState::AuthRequired { message } = &s.state {
            let _ = refused.send(message.clone());
        }
    })?;
    print_list(&TodoStore::list_of(&db)?);
    let refusal = match seconds {
        Some(s) => refusal.recv_timeout(Duration::from_secs(s)).ok(),
        None => refusal.recv().ok(),
    };
    sync.stop();
    match refusal {
        Some(message) => Err(sync_failure(confluo_core::Error::Auth(message), &server)),
        None => Ok(()),
    }
}

fn describe(s: &SyncStatus) -> String {
    let state = match &s.state {
        SyncState::Stopped => "not syncing".to_owned(),
        SyncState::Idle => "synced".to_owned(),
        SyncState::Syncing => "syncing".to_owned(),
        SyncState::Offline { retry_in: None } => "offline".to_owned(),
        SyncState::Offline { retry_in: Some(r) } => {
            format!("server unreachable (retry in {r:.1?})")
        }
        SyncState::Error {
            message, retry_in, ..
        } => {
            format!("error: {message} (retry in {retry_in:.1?})")
        }
        SyncState::AuthRequired { message } => format!("sign in again: {message}"),
    };
    format!("{state}, {} pending", s.pending)
}

fn demo() -> Result<()> {
    let server = confluo_server::BackgroundServer::start(
        Arc::new(confluo_server::SqliteStore::open_in_memory()?),
        confluo_server::Auth::default().with_dev_token(),
        confluo_server::Config::default(),
    )?;
    println!(
        "A sync server is listening on {} (space \"family\").\n",
        server.url()
    );
    let config = SyncConfig::new(server.url(), "family", confluo_server::DEV_TOKEN);
    let alice = TodoStore::in_memory()?;
    let bob = TodoStore::in_memory()?;
    let show = |who: &str, s: &TodoStore| -> Result<()> {
        println!("  {who}:");
        print_list(&s.list()?);
        Ok(())
    };
    let sync = |who: &str, s: &TodoStore| -> Result<()> {
        let r = s.db.sync_now(&config)?;
        println!(
            "  {who} syncs: pushed {}, pulled {} ({} applied), {} bytes up, {} down",
            r.pushed, r.pulled, r.applied, r.bytes_sent, r.bytes_received
        );
        Ok(())
    };

    println!("Alice adds three todos and syncs; Bob syncs.");
    let groceries = alice.add("Buy groceries")?;
    let plants = alice.add("Water the plants")?;
    let call = alice.add("Call mom")?;
    sync("Alice", &alice)?;
    sync("Bob", &bob)?;
    show("Bob", &bob)?;

    println!("\nBoth go offline and edit the same list:");
    println!(
        "  Alice marks \"Buy groceries\" done; Bob renames it (different columns: both survive)."
    );
    alice.set_done(&groceries, true)?;
    bob.rename(&groceries, "Buy groceries and milk")?;
    println!("  Bob renames \"Call mom\", then Alice renames it too (same column: the later write wins).");
    bob.rename(&call, "Call dad")?;
    std::thread::sleep(Duration::from_millis(5));
    alice.rename(&call, "Call mom and dad")?;
    println!("  Alice deletes \"Water the plants\" while Bob marks it done (the delete wins).");
    alice.remove(&plants)?;
    bob.set_done(&plants, true)?;

    println!("\nBack online, they sync:");
    sync("Bob", &bob)?;
    sync("Alice", &alice)?;
    sync("Bob", &bob)?;
    show("Alice", &alice)?;
    show("Bob", &bob)?;
    let converged = alice.list()? == bob.list()?;

    println!("\nBob turns on background sync; Alice adds a todo and syncs:");
    let bob_db = Arc::new(bob.db);
    let live = bob_db.start_sync(config.clone(), |_: &SyncStatus| {})?;
    std::thread::sleep(Duration::from_millis(300));
    let added = alice.add("Book flights")?;
    sync("Alice", &alice)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !TodoStore::list_of(&bob_db)?.iter().any(|t| t.id == added) {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "Bob did not receive the new todo"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    live.stop();
    println!("  Bob's list, updated by the long poll without him asking:");
    print_list(&TodoStore::list_of(&bob_db)?);

    println!(
        "\nConverged: {}",
        if converged {
            "yes, both lists are identical"
        } else {
            "NO"
        }
    );
    anyhow::ensure!(converged, "the two lists differ");
    Ok(())
}
