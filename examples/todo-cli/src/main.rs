//! `todo`: a todo list in a terminal, kept in a Confluo database.

mod store;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::sync::Arc;
use std::time::Duration;

use confluo_core::{SyncConfig, SyncState, SyncStatus};

use store::{Todo, TodoStore};

#[derive(Parser)]
#[command(
    name = "todo",
    about = "A todo list that syncs, kept in a Confluo database"
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
    /// Play the story of Alice and Bob editing one list offline, syncing
    /// through a server started in this process.
    Demo,
}

#[derive(clap::Args, Clone)]
struct ServerArgs {
    /// The sync server's URL.
    #[arg(long)]
    server: String,
    /// The space to sync with.
    #[arg(long)]
    space: String,
    /// The bearer token.
    #[arg(long)]
    token: String,
}

impl ServerArgs {
    fn config(&self) -> SyncConfig {
        SyncConfig::new(&self.server, &self.space, &self.token)
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
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
        Command::Sync(server) => {
            let r = store.db.sync_now(&server.config())?;
            println!(
                "pushed {} changes, pulled {} ({} applied), {} bytes up, {} bytes down, in {:?}",
                r.pushed, r.pulled, r.applied, r.bytes_sent, r.bytes_received, r.duration
            );
        }
        Command::Watch { server, seconds } => watch(store, server, seconds)?,
        Command::Demo => unreachable!("handled above"),
    }
    Ok(())
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
    let sync = db.start_sync(server.config(), |s: &SyncStatus| {
        println!("[sync] {}", describe(s))
    })?;
    print_list(&TodoStore::list_of(&db)?);
    match seconds {
        Some(s) => std::thread::sleep(Duration::from_secs(s)),
        None => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
    }
    sync.stop();
    Ok(())
}

fn describe(s: &SyncStatus) -> String {
    let state = match &s.state {
        SyncState::Idle => "synced".to_owned(),
        SyncState::Syncing => "syncing".to_owned(),
        SyncState::Offline { retry_in: None } => "offline".to_owned(),
        SyncState::Offline { retry_in: Some(r) } => {
            format!("server unreachable (retry in {r:.1?})")
        }
        SyncState::Error { message, retry_in } => {
            format!("error: {message} (retry in {retry_in:.1?})")
        }
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
