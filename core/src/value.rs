//! Typed SQLite values, as the app reads and writes them and as they travel
//! in change sets.

use rusqlite::types::{FromSql, FromSqlResult, ToSql, ToSqlOutput, ValueRef as SqlRef};
use serde::{Deserialize, Serialize};

/// One SQLite value. `Real` compares by bit pattern, so equality means
/// "round-trips exactly" (-0.0 differs from 0.0).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Value {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::Null, Value::Null) => true,
            (Value::Integer(a), Value::Integer(b)) => a == b,
            (Value::Real(a), Value::Real(b)) => a.to_bits() == b.to_bits(),
            (Value::Text(a), Value::Text(b)) => a == b,
            (Value::Blob(a), Value::Blob(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Value {}

impl std::hash::Hash for Value {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::mem::discriminant(self).hash(state);
        match self {
            Value::Null => {}
            Value::Integer(i) => i.hash(state),
            Value::Real(f) => f.to_bits().hash(state),
            Value::Text(s) => s.hash(state),
            Value::Blob(b) => b.hash(state),
        }
    }
}

impl Value {
    /// Size of the payload in bytes (text and blob length, 8 for numbers).
    pub fn payload_len(&self) -> usize {
        match self {
            Value::Null => 0,
            Value::Integer(_) | Value::Real(_) => 8,
            Value::Text(s) => s.len(),
            Value::Blob(b) => b.len(),
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Integer(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Real(f) => Some(*f),
            Value::Integer(i) => Some(*i as f64),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Blob(b) => Some(b),
            _ => None,
        }
    }

    /// The value as SQLite's borrowed form.
    pub(crate) fn as_sql(&self) -> SqlRef<'_> {
        match self {
            Value::Null => SqlRef::Null,
            Value::Integer(i) => SqlRef::Integer(*i),
            Value::Real(r) => SqlRef::Real(*r),
            Value::Text(s) => SqlRef::Text(s.as_bytes()),
            Value::Blob(b) => SqlRef::Blob(b),
        }
    }

    pub(crate) fn from_ref(v: SqlRef<'_>) -> Value {
        match v {
            SqlRef::Null => Value::Null,
            SqlRef::Integer(i) => Value::Integer(i),
            SqlRef::Real(f) => Value::Real(f),
            // SQLite text is UTF-8 unless the app stored invalid bytes;
            // keep them readable rather than failing the whole read.
            // (`from_utf8` first: its check is several times faster than
            // the lossy one's, and valid text is the rule.)
            SqlRef::Text(t) => Value::Text(match std::str::from_utf8(t) {
                Ok(s) => s.to_owned(),
                Err(_) => String::from_utf8_lossy(t).into_owned(),
            }),
            SqlRef::Blob(b) => Value::Blob(b.to_vec()),
        }
    }
}

impl ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(self.as_sql()))
    }
}

impl FromSql for Value {
    fn column_result(value: SqlRef<'_>) -> FromSqlResult<Self> {
        Ok(Value::from_ref(value))
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Integer(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::Integer(v.into())
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Integer(v.into())
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Real(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Blob(v)
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Blob(v.to_vec())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// A borrowed `Value`: a parameter of a prepared `Statement`, bound without
/// copying the caller's text or bytes into a `Value` first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ValueRef<'a> {
    Null,
    Integer(i64),
    Real(f64),
    Text(&'a str),
    Blob(&'a [u8]),
}

impl ToSql for ValueRef<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            ValueRef::Null => SqlRef::Null,
            ValueRef::Integer(i) => SqlRef::Integer(i),
            ValueRef::Real(f) => SqlRef::Real(f),
            ValueRef::Text(s) => SqlRef::Text(s.as_bytes()),
            ValueRef::Blob(b) => SqlRef::Blob(b),
        }))
    }
}

impl<'a> From<&'a Value> for ValueRef<'a> {
    fn from(v: &'a Value) -> Self {
        match v {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Real(f) => ValueRef::Real(*f),
            Value::Text(s) => ValueRef::Text(s),
            Value::Blob(b) => ValueRef::Blob(b),
        }
    }
}

impl From<ValueRef<'_>> for Value {
    fn from(v: ValueRef<'_>) -> Self {
        match v {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Integer(i),
            ValueRef::Real(f) => Value::Real(f),
            ValueRef::Text(s) => Value::Text(s.to_owned()),
            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        }
    }
}

impl From<i64> for ValueRef<'_> {
    fn from(v: i64) -> Self {
        ValueRef::Integer(v)
    }
}
impl From<i32> for ValueRef<'_> {
    fn from(v: i32) -> Self {
        ValueRef::Integer(v.into())
    }
}
impl From<bool> for ValueRef<'_> {
    fn from(v: bool) -> Self {
        ValueRef::Integer(v.into())
    }
}
impl From<f64> for ValueRef<'_> {
    fn from(v: f64) -> Self {
        ValueRef::Real(v)
    }
}
impl<'a> From<&'a str> for ValueRef<'a> {
    fn from(v: &'a str) -> Self {
        ValueRef::Text(v)
    }
}
impl<'a> From<&'a String> for ValueRef<'a> {
    fn from(v: &'a String) -> Self {
        ValueRef::Text(v)
    }
}
impl<'a> From<&'a [u8]> for ValueRef<'a> {
    fn from(v: &'a [u8]) -> Self {
        ValueRef::Blob(v)
    }
}
impl<'a> From<&'a Vec<u8>> for ValueRef<'a> {
    fn from(v: &'a Vec<u8>) -> Self {
        ValueRef::Blob(v)
    }
}
impl<'a, T: Into<ValueRef<'a>>> From<Option<T>> for ValueRef<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(ValueRef::Null, Into::into)
    }
}
