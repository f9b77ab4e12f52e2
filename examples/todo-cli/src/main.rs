//! `todo`: a todo list in a terminal, kept in a Confluo database.

mod store;

use anyhow::Result;
use clap::{Parser, Subcommand};
use confluo_core::Database;

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
    /// Mark a todo done (an id or a unique prefix of one).
    Done { id: String },
    /// Mark a todo not done.
    Undone { id: String },
    /// Rename a todo.
    Rename { id: String, title: String },
    /// Remove a todo.
    Rm { id: String },
    /// Play the story of Alice and Bob editing one list offline.
    Demo,
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
        Command::Demo => unreachable!("handled above"),
    }
    Ok(())
}

fn print_list(todos: &[Todo]) {
    if todos.is_empty() {
        println!("  (nothing to do)");
    }
    for t in todos {
        println!(
            "  [{}] {}  {}",
            if t.done { "x" } else { " " },
            t.id,
            t.title
        );
    }
}

/// Both devices send each other what the other misses.
fn exchange(a: &Database, b: &Database) -> Result<()> {
    for (to, from) in [(a, b), (b, a)] {
        let seen = to.seen_version(from.site_id())?;
        let bytes = from.changes_for_peer(to.site_id(), seen)?.encode();
        let report = to.apply(&confluo_core::ChangeSet::decode(&bytes)?)?;
        println!(
            "    {} bytes -> {} changes applied, {} already known",
            bytes.len(),
            report.applied,
            report.stale
        );
    }
    Ok(())
}

fn demo() -> Result<()> {
    let alice = TodoStore::in_memory()?;
    let bob = TodoStore::in_memory()?;
    let show = |who: &str, s: &TodoStore| -> Result<()> {
        println!("  {who}:");
        print_list(&s.list()?);
        Ok(())
    };

    println!("Alice adds three todos and syncs with Bob.");
    let groceries = alice.add("Buy groceries")?;
    let plants = alice.add("Water the plants")?;
    let call = alice.add("Call mom")?;
    exchange(&alice.db, &bob.db)?;
    show("Bob", &bob)?;

    println!("\nBoth go offline and edit the same list:");
    println!("  Alice marks \"Buy groceries\" done; Bob renames it (different columns).");
    alice.set_done(&groceries, true)?;
    bob.rename(&groceries, "Buy groceries and milk")?;
    println!("  Bob renames \"Call mom\", then Alice renames it too (same column: the later write wins).");
    bob.rename(&call, "Call dad")?;
    std::thread::sleep(std::time::Duration::from_millis(5));
    alice.rename(&call, "Call mom and dad")?;
    println!("  Alice deletes \"Water the plants\" while Bob marks it done (the delete wins).");
    alice.remove(&plants)?;
    bob.set_done(&plants, true)?;

    println!("\nBack online, they sync:");
    exchange(&alice.db, &bob.db)?;
    show("Alice", &alice)?;
    show("Bob", &bob)?;
    let converged = alice.list()? == bob.list()?;
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
