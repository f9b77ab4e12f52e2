//! Confluo's engine: an ordinary SQLite database whose synced tables record
//! per-column CRDT metadata (hybrid logical clocks, last-writer-wins per
//! column, causal-length deletes), export only what a peer misses, and merge
//! what comes back so every replica converges.
//!
//! ```
//! use confluo_core::{Database, Value};
//!
//! let alice = Database::open_in_memory()?;
//! let bob = Database::open_in_memory()?;
//! for db in [&alice, &bob] {
//!     db.execute_batch("CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, title TEXT, status TEXT)")?;
//!     db.enable_sync("todo")?;
//! }
//! alice.execute("INSERT INTO todo VALUES (?1, ?2, ?3)", &["t1".into(), "Buy milk".into(), "open".into()])?;
//! let seen = bob.seen_version(alice.site_id())?;
//! bob.apply(&alice.changes_for_peer(bob.site_id(), seen)?)?;
//! let rows = bob.query("SELECT title FROM todo", &[])?;
//! assert_eq!(rows.rows[0][0], Value::Text("Buy milk".into()));
//! # Ok::<(), confluo_core::Error>(())
//! ```

mod background;
mod bulk;
mod callbacks;
mod capture;
mod changeset;
mod client;
mod clocks;
mod codec;
pub mod coding;
mod db;
mod error;
mod evolution;
mod hlc;
mod local;
pub mod merge;
mod observe;
mod rejected;
mod replication;
mod resolve;
mod row_ids;
mod schema;
mod server_state;
mod site;
mod tables;
mod thread_lock;
pub mod trust;
mod validate;
mod value;

pub use changeset::{Change, ChangeSet, FORMAT_VERSION};

pub use background::{BackgroundSync, SyncState, SyncStatus, SyncStatusListener};
pub use callbacks::report_callback_failure;
pub use client::{ProgressListener, StaticToken, SyncConfig, SyncReport, TokenProvider};
/// Packs a primary key (one or more values) into bytes, and back: how keys
/// are stored where the schema is not known (the sync server).
pub use codec::{pack_values as pack_key, unpack_values as unpack_key};
pub use db::{Database, Options, Rows, Statement, Transaction};
pub use error::{Error, ErrorKind, Result};
pub use hlc::{Hlc, ManualTimeSource, SystemTimeSource, TimeSource};
pub use observe::{ChangeListener, Observation};
pub use rejected::RejectedChange;
pub use replication::ApplyReport;
pub use site::SiteId;
pub use validate::{check_change, Limits};
pub use value::{Value, ValueRef};
