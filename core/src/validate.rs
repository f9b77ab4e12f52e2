//! The checks every receiver of changes makes, device and server alike:
//! nothing a correct peer never sends gets near the database.

use std::time::Duration;

use crate::changeset::Change;
use crate::error::{Error, Result};
use crate::evolution::plausible_identity;
use crate::hlc::check_drift;
use crate::schema::plausible_name;
use crate::value::Value;

/// The largest causal length accepted. A row gains 2 per delete and
/// re-insert, so no real row gets near it; the bound keeps the arithmetic
/// on causal lengths (stored as SQLite integers) far from overflow.
pub const MAX_CAUSAL_LENGTH: u64 = 1 << 53;

/// What a receiver accepts.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_value_bytes: usize,
    pub max_clock_drift: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_value_bytes: 1 << 20,
            max_clock_drift: Duration::from_secs(3600),
        }
    }
}

/// Checks one change (number `index` of its set). `known_table` and
/// `known_column` say which names the receiver already has; names it does
/// not have must look like plain identifiers.
pub fn check_change(
    index: usize,
    c: &Change,
    limits: &Limits,
    now_ms: u64,
    known_table: bool,
    known_column: impl Fn(&str) -> bool,
) -> Result<()> {
    let bad = |msg: String| {
        Err(Error::invalid(format!(
            "change {index} (table {:?}): {msg}",
            c.table
        )))
    };
    if !known_table && !plausible_identity(&c.table, plausible_name) {
        return bad("table name is not acceptable".into());
    }
    if let Some(col) = c.column.as_deref() {
        if !known_column(col) && !plausible_identity(col, plausible_name) {
            return bad(format!("column name {col:?} is not acceptable"));
        }
    }
    if c.pk.is_empty() {
        return bad("the key is empty".into());
    }
    if c.pk.iter().any(Value::is_null) {
        return bad("a key value is NULL".into());
    }
    for v in c.pk.iter().chain(std::iter::once(&c.value)) {
        if v.payload_len() > limits.max_value_bytes {
            return bad(format!(
                "a value of {} bytes exceeds the limit of {}",
                v.payload_len(),
                limits.max_value_bytes
            ));
        }
        if matches!(v, Value::Real(f) if f.is_nan()) {
            return bad("NaN is not a value SQLite keeps".into());
        }
    }
    if c.cl == 0 || c.cl > MAX_CAUSAL_LENGTH {
        return bad(format!("causal length {} is out of range", c.cl));
    }
    match &c.column {
        None if !c.value.is_null() => return bad("a row marker carries a value".into()),
        Some(_) if c.cl % 2 == 0 => return bad("a column change for a deleted row".into()),
        _ => {}
    }
    if c.hlc.0 == 0 {
        return bad("clock 0".into());
    }
    check_drift(c.hlc, now_ms, limits.max_clock_drift)
}
