//! The todo list on top of a Confluo database: what the app does, apart
//! from how it talks to the user.

use anyhow::{bail, Context, Result};
use confluo_core::{Database, Value};
use serde::Serialize;

pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS todo(
    id TEXT PRIMARY KEY NOT NULL,
    title TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT 'open'
)";

/// Each later change of the table, in order, for ever: every install runs
/// the same list, so columns keep their identities across renames. Append;
/// never edit or remove an entry.
pub const MIGRATIONS: &[&str] = &[];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Todo {
    pub id: String,
    pub title: String,
    pub done: bool,
}

pub struct TodoStore {
    pub db: Database,
}

/// The shortest id tails, at least `SHORT_ID` characters long, that tell
/// `todos` apart. Tails, not heads: a UUIDv7 starts with its creation time,
/// so todos made close together share their first characters, while the
/// last ones are random.
pub fn short_ids(todos: &[Todo]) -> Vec<String> {
    let tail = |id: &str, n: usize| id[id.len().saturating_sub(n)..].to_owned();
    let mut n = SHORT_ID;
    while n < 36 {
        let tails: std::collections::HashSet<String> =
            todos.iter().map(|t| tail(&t.id, n)).collect();
        if tails.len() == todos.len() {
            break;
        }
        n += 1;
    }
    todos.iter().map(|t| tail(&t.id, n)).collect()
}

/// Eight hex characters of the random tail: 32 bits, so two todos share
/// one only in lists of tens of thousands.
const SHORT_ID: usize = 8;

impl TodoStore {
    pub fn new(db: Database) -> Result<Self> {
        db.enable_sync_with_history("todo", SCHEMA, MIGRATIONS)?;
        Ok(TodoStore { db })
    }

    pub fn open(path: &str) -> Result<Self> {
        let db = Database::open(path).with_context(|| format!("opening {path}"))?;
        Self::new(db)
    }

    pub fn in_memory() -> Result<Self> {
        Self::new(Database::open_in_memory()?)
    }

    /// Adds a todo; ids are UUIDv7, so they sort by creation time.
    pub fn add(&self, title: &str) -> Result<String> {
        let id = uuid::Uuid::now_v7().to_string();
        self.db.execute(
            "INSERT INTO todo(id, title, status) VALUES (?1, ?2, 'open')",
            &[id.clone().into(), title.into()],
        )?;
        Ok(id)
    }

    pub fn list(&self) -> Result<Vec<Todo>> {
        Self::list_of(&self.db)
    }

    /// The todos of any database holding the todo table.
    pub fn list_of(db: &Database) -> Result<Vec<Todo>> {
        let rows = db.query("SELECT id, title, status FROM todo ORDER BY id", &[])?;
        Ok(rows
            .rows
            .into_iter()
            .map(|r| Todo {
                id: r[0].as_str().unwrap_or_default().to_owned(),
                title: r[1].as_str().unwrap_or_default().to_owned(),
                done: r[2].as_str() == Some("done"),
            })
            .collect())
    }

    /// The one todo `key` names: its full id, a unique prefix of it, or a
    /// unique tail of it (the short ids `list` shows). An empty or
    /// ambiguous key is refused with the candidates listed, so that a typo
    /// never edits or deletes a todo the user did not mean.
    pub fn resolve(&self, key: &str) -> Result<String> {
        let key = key.trim().to_ascii_lowercase();
        if key.is_empty() {
            bail!("give the id of a todo (the short id `todo list` shows is enough)");
        }
        let todos = self.list()?;
        if let Some(exact) = todos.iter().find(|t| t.id == key) {
            return Ok(exact.id.clone());
        }
        let matches: Vec<&Todo> = todos
            .iter()
            .filter(|t| t.id.starts_with(&key) || t.id.ends_with(&key))
            .collect();
        match matches.as_slice() {
            [] => bail!("no todo with an id starting or ending with {key:?} (see `todo list`)"),
            [one] => Ok(one.id.clone()),
            many => {
                let shorts = short_ids(&todos);
                let listed: Vec<String> = many
                    .iter()
                    .map(|t| {
                        let i = todos.iter().position(|o| o.id == t.id).unwrap_or(0);
                        format!("\n  {}  {}", shorts[i], t.title)
                    })
                    .collect();
                bail!(
                    "{key:?} matches {} todos; give one of these short ids:{}",
                    many.len(),
                    listed.concat()
                )
            }
        }
    }

    pub fn set_done(&self, prefix: &str, done: bool) -> Result<()> {
        let id = self.resolve(prefix)?;
        let status = if done { "done" } else { "open" };
        self.db.execute(
            "UPDATE todo SET status = ?1 WHERE id = ?2",
            &[status.into(), id.into()],
        )?;
        Ok(())
    }

    pub fn rename(&self, prefix: &str, title: &str) -> Result<()> {
        let id = self.resolve(prefix)?;
        self.db.execute(
            "UPDATE todo SET title = ?1 WHERE id = ?2",
            &[title.into(), id.into()],
        )?;
        Ok(())
    }

    pub fn remove(&self, prefix: &str) -> Result<()> {
        let id = self.resolve(prefix)?;
        self.db
            .execute("DELETE FROM todo WHERE id = ?1", &[Value::from(id)])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crud_through_id_prefixes() {
        let store = TodoStore::in_memory().unwrap();
        let a = store.add("Buy groceries").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = store.add("Call mom").unwrap();
        assert_eq!(store.list().unwrap().len(), 2);
        store.set_done(&b, true).unwrap();
        store.rename(&a, "Buy milk").unwrap();
        let list = store.list().unwrap();
        assert_eq!(list[0].title, "Buy milk");
        assert!(list[1].done);
        store.remove(&a[..20]).unwrap();
        assert_eq!(store.list().unwrap().len(), 1);
        assert!(store.resolve("zzz").is_err());
        // UUIDv7 ids made in the same process share a prefix.
        store.add("x").unwrap();
        assert!(store
            .resolve(&b[..4])
            .unwrap_err()
            .to_string()
            .contains("matches 2 todos"));
        assert_eq!(store.resolve(&b[28..]).unwrap(), b);
        assert!(store.resolve("").is_err());
    }
}
