//! The per-connection state behind the capture triggers: the SQL functions
//! they call and the commit/rollback/update hooks that close a transaction.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::functions::{Context, FunctionFlags};
use rusqlite::hooks::Action;
use rusqlite::types::ValueRef;
use rusqlite::Connection;

use crate::codec::{pack_values, unpack_values};
use crate::hlc::{Hlc, HlcState, TimeSource};
use crate::row_ids::same_key;
use crate::value::Value;

/// This database's own site ordinal in `confluo_sites`.
pub(crate) const LOCAL_SITE: u32 = 0;

/// One captured write to a synced table, by metadata key.
#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub table: i64,
    pub key: Value,
    pub kind: EventKind,
    /// Captured by a statement that then failed: the write may or may not
    /// have stayed, so the table is asked at commit.
    pub uncertain: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum EventKind {
    Inserted,
    Updated(Masks),
    Deleted,
}

/// Bitmasks of the changed column slots, 62 slots per word. A table of up
/// to 62 columns needs one word, kept inline: an UPDATE of many rows
/// captures one event per row, and an allocation each cost as much as the
/// rest of the event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Masks {
    One(u64),
    Many(Box<[u64]>),
}

impl std::ops::Deref for Masks {
    type Target = [u64];

    fn deref(&self) -> &[u64] {
        match self {
            Masks::One(word) => std::slice::from_ref(word),
            Masks::Many(words) => words,
        }
    }
}

impl From<Vec<u64>> for Masks {
    fn from(words: Vec<u64>) -> Self {
        match words[..] {
            [word] => Masks::One(word),
            _ => Masks::Many(words.into()),
        }
    }
}

/// What the writer connection's functions and hooks share.
pub(crate) struct TxState {
    /// False while remote changes are applied: those writes are not local.
    pub tracking: bool,
    pub hlc: HlcState,
    /// The clock last written to `confluo_state`, so a restart never
    /// issues clocks older than ones already handed out.
    pub persisted_hlc: Hlc,
    pub time: Arc<dyn TimeSource>,
    /// The newest committed db_version.
    pub committed_dbv: u64,
    /// The open transaction's db_version and clock, once it wrote.
    pub tx_dbv: Option<u64>,
    pub tx_hlc: Option<Hlc>,
    /// Set by Confluo right before it commits. A commit of tracked writes
    /// without it (a COMMIT inside app SQL) is refused.
    pub committing: bool,
    /// Writes to synced tables captured in the open transaction, in order.
    pub events: Vec<Event>,
    /// Tables changed by the open transaction, and by committed ones not
    /// yet reported to observers.
    pub changed: BTreeSet<String>,
    pub committed_changes: BTreeSet<String>,
}

impl TxState {
    pub fn new(time: Arc<dyn TimeSource>, last_hlc: Hlc, committed_dbv: u64) -> Self {
        TxState {
            tracking: true,
            hlc: HlcState::new(last_hlc),
            persisted_hlc: last_hlc,
            time,
            committed_dbv,
            tx_dbv: None,
            tx_hlc: None,
            committing: false,
            events: Vec::new(),
            changed: BTreeSet::new(),
            committed_changes: BTreeSet::new(),
        }
    }

    /// The open transaction's db_version: one per transaction.
    pub fn db_version(&mut self) -> u64 {
        *self.tx_dbv.get_or_insert(self.committed_dbv + 1)
    }

    /// The open transaction's clock: one per transaction, so every cell a
    /// transaction writes carries the same clock.
    pub fn tx_hlc(&mut self) -> Hlc {
        if let Some(h) = self.tx_hlc {
            return h;
        }
        let h = self.hlc.tick(self.time.now_ms());
        self.tx_hlc = Some(h);
        h
    }

    /// Notes a write the capture triggers reported.
    fn capture(&mut self, table: i64, key: Value, kind: EventKind) {
        self.events.push(Event {
            table,
            key,
            kind,
            uncertain: false,
        });
    }

    pub fn mark_changed(&mut self, table: &str) {
        if !self.changed.contains(table) {
            self.changed.insert(table.to_owned());
        }
    }
}

pub(crate) type SharedState = Arc<Mutex<TxState>>;

pub(crate) fn lock(state: &SharedState) -> MutexGuard<'_, TxState> {
    // A panic while holding this lock cannot leave it half-updated in a way
    // that matters more than refusing every later write would.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn user_err(msg: impl Into<String>) -> rusqlite::Error {
    rusqlite::Error::UserFunctionError(msg.into().into())
}

/// `confluo_pack(a, b, ...)`: a composite primary key as one blob;
/// `confluo_unpack(blob, i)`: its `i`-th value.
pub(crate) fn register_pure_functions(conn: &Connection) -> rusqlite::Result<()> {
    conn.create_scalar_function(
        "confluo_unpack",
        2,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx: &mut Context<'_>| {
            let ValueRef::Blob(blob) = ctx.get_raw(0) else {
                return Ok(Value::Null);
            };
            let index: i64 = ctx.get(1)?;
            let values = unpack_values(blob).map_err(|e| user_err(e.to_string()))?;
            Ok(usize::try_from(index)
                .ok()
                .and_then(|i| values.into_iter().nth(i))
                .unwrap_or(Value::Null))
        },
    )?;
    conn.create_scalar_function(
        "confluo_pack",
        -1,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx: &mut Context<'_>| {
            let values: Vec<Value> = (0..ctx.len())
                .map(|i| Value::from_ref(ctx.get_raw(i)))
                .collect();
            if values.iter().any(Value::is_null) {
                return Err(user_err("a primary key column of a synced table is NULL"));
            }
            Ok(pack_values(&values))
        },
    )
}

fn check_fits(
    ctx: &Context<'_>,
    args: impl Iterator<Item = usize>,
    max_value_bytes: usize,
) -> rusqlite::Result<()> {
    args.into_iter()
        .try_for_each(|i| fits(ctx.get_raw(i), max_value_bytes))
}

/// Refuses a text or blob larger than `max_value_bytes`.
fn fits(value: ValueRef<'_>, max_value_bytes: usize) -> rusqlite::Result<()> {
    let len = match value {
        ValueRef::Text(b) | ValueRef::Blob(b) => b.len(),
        _ => 0,
    };
    if len > max_value_bytes {
        return Err(user_err(format!(
            "a value of {len} bytes is larger than sync carries ({max_value_bytes} bytes, Options::max_value_bytes); \
             store it elsewhere (a file, or a table that is not synced) and sync a reference"
        )));
    }
    Ok(())
}

/// Whether a column's new value is its old one: the same type and the same
/// value, whatever the column's collation says (text compared byte for
/// byte; 1 and 1.0 differ, as their stored types do).
fn same_value(a: ValueRef<'_>, b: ValueRef<'_>) -> bool {
    match (a, b) {
        (ValueRef::Null, ValueRef::Null) => true,
        (ValueRef::Integer(x), ValueRef::Integer(y)) => x == y,
        // As SQL compares them: 0.0 is -0.0 (SQLite stores no NaN).
        (ValueRef::Real(x), ValueRef::Real(y)) => x == y,
        (ValueRef::Text(x), ValueRef::Text(y)) | (ValueRef::Blob(x), ValueRef::Blob(y)) => x == y,
        _ => false,
    }
}

/// The metadata key of the row whose key columns are arguments
/// `first..first + n`: one column's value as it is, several packed.
fn key_arg(ctx: &Context<'_>, first: usize, n: usize) -> rusqlite::Result<Value> {
    if n == 1 {
        return Ok(Value::from_ref(ctx.get_raw(first)));
    }
    let values: Vec<Value> = (first..first + n)
        .map(|i| Value::from_ref(ctx.get_raw(i)))
        .collect();
    if values.iter().any(Value::is_null) {
        return Err(user_err("a primary key column of a synced table is NULL"));
    }
    Ok(Value::Blob(pack_values(&values)))
}

fn count_arg(ctx: &Context<'_>, i: usize) -> rusqlite::Result<usize> {
    usize::try_from(ctx.get::<i64>(i)?).map_err(|_| user_err("confluo: bad argument count"))
}

/// The metadata key of a captured write whose key columns are arguments
/// `first..first + n`. Writes made while remote changes are applied are
/// only counted, never recorded (see `Database::check_no_trigger_writes`),
/// so their keys are not copied. Their values are still checked against
/// the size limit: a column default or an affinity conversion can make a
/// value the changes did not carry.
fn captured_key(
    st: &TxState,
    ctx: &Context<'_>,
    first: usize,
    n: usize,
) -> rusqlite::Result<Value> {
    if st.tracking {
        key_arg(ctx, first, n)
    } else {
        Ok(Value::Null)
    }
}

/// The functions the capture triggers of `schema::row_triggers` call, one
/// per written row (the table's id and key column count first):
/// - `confluo_insert_row(table, npk, key..., values...)`
/// - `confluo_update_row(table, npk, slots, new key..., old key...,
///   new value, old value, ...)`, `slots` being the slot of each value
///   pair, two bytes each (little-endian)
/// - `confluo_delete_row(table, npk, key...)`
///
/// Every value a write puts in a row is checked against the size sync
/// carries (`Options::max_value_bytes`).
fn install_row_functions(
    conn: &Connection,
    state: &SharedState,
    max_value_bytes: usize,
) -> rusqlite::Result<()> {
    let volatile = FunctionFlags::SQLITE_UTF8;
    let s = state.clone();
    conn.create_scalar_function("confluo_insert_row", -1, volatile, move |ctx| {
        let table: i64 = ctx.get(0)?;
        let npk = count_arg(ctx, 1)?;
        if ctx.len() < 2 + npk {
            return Err(user_err("confluo_insert_row: too few arguments"));
        }
        check_fits(ctx, 2..ctx.len(), max_value_bytes)?;
        let mut st = lock(&s);
        let key = captured_key(&st, ctx, 2, npk)?;
        st.capture(table, key, EventKind::Inserted);
        Ok(true)
    })?;

    let s = state.clone();
    conn.create_scalar_function("confluo_delete_row", -1, volatile, move |ctx| {
        let table: i64 = ctx.get(0)?;
        let npk = count_arg(ctx, 1)?;
        if ctx.len() != 2 + npk {
            return Err(user_err("confluo_delete_row: wrong number of arguments"));
        }
        let mut st = lock(&s);
        let key = captured_key(&st, ctx, 2, npk)?;
        st.capture(table, key, EventKind::Deleted);
        Ok(true)
    })?;

    let s = state.clone();
    conn.create_scalar_function("confluo_update_row", -1, volatile, move |ctx| {
        let table: i64 = ctx.get(0)?;
        let npk = count_arg(ctx, 1)?;
        let ValueRef::Blob(slots) = ctx.get_raw(2) else {
            return Err(user_err("confluo_update_row: slots are not a blob"));
        };
        let (new_key, old_key, first_pair) = (3, 3 + npk, 3 + 2 * npk);
        if slots.len() % 2 != 0 || ctx.len() != first_pair + slots.len() {
            return Err(user_err("confluo_update_row: wrong number of arguments"));
        }
        let new_values = (new_key..old_key).chain((first_pair..ctx.len()).step_by(2));
        let key_changed =
            (0..npk).any(|i| !same_key(ctx.get_raw(new_key + i), ctx.get_raw(old_key + i)));
        let mut st = lock(&s);
        if key_changed {
            // A delete of the old key and an insert of the new.
            check_fits(ctx, new_values, max_value_bytes)?;
            let old = captured_key(&st, ctx, old_key, npk)?;
            let new = captured_key(&st, ctx, new_key, npk)?;
            st.capture(table, old, EventKind::Deleted);
            st.capture(table, new, EventKind::Inserted);
            return Ok(true);
        }
        // The first word of the masks, then the others (tables of more
        // than 62 columns).
        let (mut first, mut more): (u64, Vec<u64>) = (0, Vec::new());
        for (pair, slot) in slots.chunks_exact(2).enumerate() {
            let at = first_pair + 2 * pair;
            let new = ctx.get_raw(at);
            if same_value(new, ctx.get_raw(at + 1)) {
                continue;
            }
            // Only what is written: the key and the other values stay.
            fits(new, max_value_bytes)?;
            let slot = usize::from(u16::from_le_bytes([slot[0], slot[1]]));
            let (word, bit) = (slot / 62, slot % 62);
            if word == 0 {
                first |= 1 << bit;
                continue;
            }
            if more.len() < word {
                more.resize(word, 0);
            }
            more[word - 1] |= 1 << bit;
        }
        if first == 0 && more.is_empty() {
            // Every value stayed what it was: no write to record.
            return Ok(false);
        }
        let masks = if more.is_empty() {
            Masks::One(first)
        } else {
            more.insert(0, first);
            Masks::Many(more.into())
        };
        let key = captured_key(&st, ctx, new_key, npk)?;
        st.capture(table, key, EventKind::Updated(masks));
        Ok(true)
    })?;
    Ok(())
}

/// Registers the capture functions and hooks on the writer connection.
///
/// The triggers only call these functions, which note the write in
/// memory; the metadata rows are written in one sorted pass right before
/// commit (`Database::flush_captured`). Writing them from the triggers
/// would make SQLite keep a statement journal for every app statement,
/// which costs several times the write itself.
pub(crate) fn install(
    conn: &mut Connection,
    state: &SharedState,
    max_value_bytes: usize,
) -> rusqlite::Result<()> {
    register_pure_functions(conn)?;
    let volatile = FunctionFlags::SQLITE_UTF8;

    // The guard for app triggers: false while remote changes are applied,
    // so that what a trigger derives from a write is made once, where the
    // write was made, and syncs from there.
    let s = state.clone();
    conn.create_scalar_function("confluo_tracking", 0, volatile, move |_| {
        Ok(lock(&s).tracking)
    })?;
    // The guard of the capture triggers: defined only on Confluo's writer.
    conn.create_scalar_function("confluo_capturing", 0, volatile, |_| Ok(true))?;

    // confluo_fits(values...): refuses a text or blob larger than sync
    // carries (`Options::max_value_bytes`, as a server's limit).
    conn.create_scalar_function(
        "confluo_fits",
        -1,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        move |ctx| {
            check_fits(ctx, 0..ctx.len(), max_value_bytes)?;
            Ok(true)
        },
    )?;

    install_row_functions(conn, state, max_value_bytes)?;
    conn.create_scalar_function(
        "confluo_restamp",
        7,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| crate::local::restamp_function(ctx).map_err(|e| user_err(e.to_string())),
    )?;

    // confluo_inserted(table_id, key) / confluo_deleted(table_id, key)
    for (name, kind) in [
        ("confluo_inserted", EventKind::Inserted),
        ("confluo_deleted", EventKind::Deleted),
    ] {
        let s = state.clone();
        conn.create_scalar_function(name, 2, volatile, move |ctx| {
            let table: i64 = ctx.get(0)?;
            let key = Value::from_ref(ctx.get_raw(1));
            lock(&s).capture(table, key, kind.clone());
            Ok(true)
        })?;
    }

    // confluo_updated(table_id, key, mask0, mask1...): 62 column slots per mask.
    let s = state.clone();
    conn.create_scalar_function("confluo_updated", -1, volatile, move |ctx| {
        if ctx.len() < 3 {
            return Err(user_err("confluo_updated: too few arguments"));
        }
        let table: i64 = ctx.get(0)?;
        let key = Value::from_ref(ctx.get_raw(1));
        let masks = (2..ctx.len())
            .map(|i| ctx.get::<i64>(i).map(|m| m as u64))
            .collect::<rusqlite::Result<Vec<u64>>>()?;
        lock(&s).capture(table, key, EventKind::Updated(masks.into()));
        Ok(true)
    })?;

    let s = state.clone();
    conn.commit_hook(Some(move || {
        let mut st = lock(&s);
        if !st.events.is_empty() && !st.committing {
            // Tracked writes committed by app SQL (a COMMIT inside it) would
            // skip Confluo's bookkeeping: turn the commit into a rollback.
            return true;
        }
        if let Some(dbv) = st.tx_dbv.take() {
            st.committed_dbv = dbv;
        }
        st.tx_hlc = None;
        let changed = std::mem::take(&mut st.changed);
        st.committed_changes.extend(changed);
        false
    }))?;

    let s = state.clone();
    conn.rollback_hook(Some(move || {
        let mut st = lock(&s);
        st.tx_dbv = None;
        st.tx_hlc = None;
        st.events.clear();
        st.changed.clear();
    }))?;

    let s = state.clone();
    conn.update_hook(Some(
        move |_: Action, _db: &str, table: &str, _rowid: i64| {
            if !table.starts_with("confluo_") && !table.starts_with("sqlite_") {
                lock(&s).mark_changed(table);
            }
        },
    ))?;
    Ok(())
}
