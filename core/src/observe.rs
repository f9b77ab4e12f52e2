//! Observers: listeners called after commits that changed the tables they
//! watch, for local writes and applied remote changes alike.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, Weak};

use crate::callbacks::guarded;

/// Receives the names of the watched tables a commit changed.
pub trait ChangeListener: Send + Sync + 'static {
    fn on_change(&self, tables: &[String]);
}

impl<F: Fn(&[String]) + Send + Sync + 'static> ChangeListener for F {
    fn on_change(&self, tables: &[String]) {
        self(tables)
    }
}

struct Entry {
    id: u64,
    /// Empty: every table.
    tables: BTreeSet<String>,
    listener: Arc<dyn ChangeListener>,
}

#[derive(Default)]
pub(crate) struct Observers {
    entries: Mutex<(u64, Vec<Entry>)>,
}

impl Observers {
    pub(crate) fn add(
        self: &Arc<Self>,
        tables: &[&str],
        listener: Arc<dyn ChangeListener>,
    ) -> Observation {
        let mut guard = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        guard.0 += 1;
        let id = guard.0;
        guard.1.push(Entry {
            id,
            tables: tables.iter().map(|t| t.to_string()).collect(),
            listener,
        });
        Observation {
            id,
            observers: Arc::downgrade(self),
        }
    }

    /// Calls each interested listener once. Listeners run outside every
    /// lock, so they may query, write or drop their own handle. One that
    /// panics is reported and skipped: the commit it hears about stands,
    /// and the other listeners still hear about it.
    pub(crate) fn notify(&self, changed: &BTreeSet<String>) {
        let calls: Vec<(Arc<dyn ChangeListener>, Vec<String>)> = {
            let guard = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            guard
                .1
                .iter()
                .filter_map(|e| {
                    let hits: Vec<String> = if e.tables.is_empty() {
                        changed.iter().cloned().collect()
                    } else {
                        changed.intersection(&e.tables).cloned().collect()
                    };
                    (!hits.is_empty()).then(|| (e.listener.clone(), hits))
                })
                .collect()
        };
        for (listener, tables) in calls {
            guarded("a change listener", || listener.on_change(&tables));
        }
    }

    fn remove(&self, id: u64) {
        let mut guard = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        guard.1.retain(|e| e.id != id);
    }
}

/// Keeps an observer registered; dropping it stops the observer.
#[must_use = "the observer stops when this handle is dropped"]
pub struct Observation {
    id: u64,
    observers: Weak<Observers>,
}

impl Drop for Observation {
    fn drop(&mut self) {
        if let Some(o) = self.observers.upgrade() {
            o.remove(self.id);
        }
    }
}

impl std::fmt::Debug for Observation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observation").field("id", &self.id).finish()
    }
}
