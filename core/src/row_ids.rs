//! Where a row's metadata is kept. Each synced table's metadata table
//! (`confluo_rows_<table>`) is keyed by an integer id derived from the
//! row's key, and keeps the key itself in a column.
//!
//! Keyed by the key itself, the table and its `dbv` index each held a copy
//! of the key (36 bytes for a UUID as text), and every lookup compared
//! strings. With an integer id an index entry is about 10 bytes, and every
//! seek compares integers.
//!
//! The id is SipHash-1-3 of the key, cut to 47 bits, under a fixed key:
//! every replica gives a row the same id, so the rows of a change set
//! arrive in the order the receiver stores them. 47 bits is what SQLite
//! stores in 6 bytes in a record and 7 in a rowid, against 8 and 9 for a
//! full 64-bit hash: 0.4 MB less per 100,000 rows. Two keys with the same
//! id are rare (about n²/2^48 pairs for n rows: one in 30,000 databases of
//! 100,000 rows) but handled: the second key takes the next free id
//! (linear probing). Metadata rows are never deleted one by one (a deleted
//! row keeps its tombstone; only signing out clears a table, and a dropped
//! table loses all of it), so a key is found by walking the ids from its
//! own up to the first free one. A peer cannot pile keys up on a stretch
//! of ids to slow that walk down: each key it wants within L ids of a
//! chosen one costs it about 2^47 / L hashes.

use rusqlite::types::ValueRef;
use rusqlite::{params, CachedStatement, Connection};
use siphasher::sip::SipHasher13;
use std::hash::Hasher;

use crate::clocks::RowClocks;
use crate::error::Result;
use crate::schema::{self, quote, TableInfo};
use crate::value::Value;

/// SipHash's key for row ids: the first 16 bytes of SHA-256("confluo row
/// ids"), as two little-endian words. Changing it changes every id: it is
/// part of the metadata format.
const SIP_KEY: (u64, u64) = (0xf0db_8150_4e4f_bd26, 0x3bd3_d274_12c1_2aa9);

/// The id where `key`'s metadata goes, unless another key took it. Keys
/// SQLite calls equal (an integer and the same number as a real) get the
/// same id.
pub(crate) fn row_id(key: &Value) -> i64 {
    let mut h = SipHasher13::new_with_keys(SIP_KEY.0, SIP_KEY.1);
    let integer = |h: &mut SipHasher13, i: i64| {
        h.write_u8(1);
        h.write(&i.to_le_bytes());
    };
    match key {
        Value::Null => h.write_u8(0),
        Value::Integer(i) => integer(&mut h, *i),
        Value::Real(r) => match exact_integer(*r) {
            Some(i) => integer(&mut h, i),
            None => {
                h.write_u8(2);
                h.write(&r.to_bits().to_le_bytes());
            }
        },
        Value::Text(s) => {
            h.write_u8(3);
            h.write(s.as_bytes());
        }
        Value::Blob(b) => {
            h.write_u8(4);
            h.write(b);
        }
    }
    (h.finish() >> (64 - id_bits())) as i64
}

/// How many bits an id has (see the module's documentation). Tests make it
/// small, so that keys collide.
#[cfg(not(test))]
fn id_bits() -> u32 {
    47
}

#[cfg(test)]
thread_local! {
    static ID_BITS: std::cell::Cell<u32> = const { std::cell::Cell::new(47) };
}

#[cfg(test)]
fn id_bits() -> u32 {
    ID_BITS.with(|b| b.get())
}

/// The integer a real is exactly equal to, if any.
fn exact_integer(r: f64) -> Option<i64> {
    // -2^63 is exactly a real; 2^63 is the first real beyond i64.
    let min = i64::MIN as f64;
    (r.fract() == 0.0 && (min..-min).contains(&r)).then_some(r as i64)
}

/// Whether SQLite calls two keys equal (as the metadata's `pk = ?`
/// does: numbers by value, exactly; text and blobs byte for byte).
pub(crate) fn same_key(a: &Value, b: ValueRef<'_>) -> bool {
    match (a, b) {
        (Value::Integer(x), ValueRef::Integer(y)) => *x == y,
        (Value::Real(x), ValueRef::Real(y)) => *x == y,
        (Value::Integer(x), ValueRef::Real(y)) => exact_integer(y) == Some(*x),
        (Value::Real(x), ValueRef::Integer(y)) => exact_integer(*x) == Some(y),
        (Value::Text(x), ValueRef::Text(y)) => x.as_bytes() == y,
        (Value::Blob(x), ValueRef::Blob(y)) => x.as_slice() == y,
        _ => false,
    }
}

/// A row's metadata as stored.
#[derive(Debug)]
pub(crate) struct StoredRow {
    pub cl: i64,
    pub dbv: i64,
    pub clocks: Vec<u8>,
}

/// Where a key's metadata is: its id, and what is stored there (`None`:
/// the key has no metadata, and `id` is the free id it would take).
#[derive(Debug)]
pub(crate) struct Located {
    pub id: i64,
    pub stored: Option<StoredRow>,
}

impl Located {
    /// The row's causal length and clocks; a row without metadata has
    /// neither (causal length 0).
    pub fn clocks(&self) -> Result<(u64, RowClocks)> {
        Ok(match &self.stored {
            Some(row) => (
                row.cl as u64,
                RowClocks::decode(&row.clocks, row.dbv as u64)?,
            ),
            None => (0, RowClocks::default()),
        })
    }
}

/// The statements that find and write rows of one metadata table.
pub(crate) struct MetaRows<'c> {
    probe: CachedStatement<'c>,
    insert: CachedStatement<'c>,
    update: CachedStatement<'c>,
}

impl<'c> MetaRows<'c> {
    pub fn new(conn: &'c Connection, t: &TableInfo) -> Result<Self> {
        let meta = t.meta_table();
        Ok(MetaRows {
            probe: conn.prepare_cached(&format!(
                "SELECT id, pk, cl, dbv, clocks FROM {meta} WHERE id >= ?1 ORDER BY id"
            ))?,
            insert: conn.prepare_cached(&format!(
                "INSERT INTO {meta}(id, pk, cl, dbv, clocks) VALUES (?1, ?2, ?3, ?4, ?5)"
            ))?,
            update: conn.prepare_cached(&format!(
                "UPDATE {meta} SET cl = ?2, dbv = ?3, clocks = ?4 WHERE id = ?1"
            ))?,
        })
    }

    /// Finds `key`, whose own id is `id`: walks from there to the key or
    /// to the first free id.
    pub fn locate(&mut self, id: i64, key: &Value) -> Result<Located> {
        let mut rows = self.probe.query([id])?;
        let mut next = id;
        while let Some(r) = rows.next()? {
            if r.get::<_, i64>(0)? != next {
                break;
            }
            if same_key(key, r.get_ref(1)?) {
                return Ok(Located {
                    id: next,
                    stored: Some(StoredRow {
                        cl: r.get(2)?,
                        dbv: r.get(3)?,
                        clocks: r.get(4)?,
                    }),
                });
            }
            next += 1;
        }
        Ok(Located {
            id: next,
            stored: None,
        })
    }

    /// Writes a row's metadata where `locate` found its place.
    pub fn save(
        &mut self,
        at: &Located,
        key: &Value,
        cl: u64,
        dbv: u64,
        clocks: &[u8],
    ) -> Result<()> {
        // Known to exist or not in this transaction: an upsert would make
        // SQLite journal the statement.
        if at.stored.is_some() {
            self.update
                .execute(params![at.id, cl as i64, dbv as i64, clocks])?;
        } else {
            self.insert
                .execute(params![at.id, key, cl as i64, dbv as i64, clocks])?;
        }
        Ok(())
    }
}

/// Brings the metadata table of `t`, if keyed by the key itself (format 2
/// and before), to the layout keyed by id.
pub(crate) fn migrate_table(conn: &Connection, t: &TableInfo) -> Result<()> {
    let name = t.meta_table_name();
    let columns: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info(?1)")?
        .query_map([&name], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    if columns.is_empty() || columns.iter().any(|c| c == "id") {
        return Ok(());
    }
    let (meta, old) = (t.meta_table(), quote(&format!("{name}_by_key")));
    conn.execute_batch(&format!(
        "ALTER TABLE {meta} RENAME TO {old}; DROP INDEX IF EXISTS {index};",
        index = schema::dbv_index(t)
    ))?;
    schema::create_meta_table(conn, t)?;
    {
        let mut rows = MetaRows::new(conn, t)?;
        let mut read = conn.prepare(&format!("SELECT pk, cl, dbv, clocks FROM {old}"))?;
        let mut read = read.query([])?;
        while let Some(r) = read.next()? {
            let key = Value::from_ref(r.get_ref(0)?);
            let at = rows.locate(row_id(&key), &key)?;
            let (cl, dbv) = (r.get::<_, i64>(1)?, r.get::<_, i64>(2)?);
            rows.save(&at, &key, cl as u64, dbv as u64, r.get_ref(3)?.as_blob()?)?;
        }
    }
    conn.execute_batch(&format!("DROP TABLE {old};"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Database;
    use proptest::prelude::*;

    fn key() -> impl Strategy<Value = Value> {
        let near_2_pow_53 = (-3i64..3).prop_map(|d| (1i64 << 53) + d);
        prop_oneof![
            (-3i64..3).prop_map(Value::Integer),
            near_2_pow_53.clone().prop_map(Value::Integer),
            near_2_pow_53.prop_map(|i| Value::Real(i as f64)),
            prop::sample::select(vec![-1.5, -0.0, 0.0, 1.0, 2.0, 0.5, 9.3e18, -9.3e18])
                .prop_map(Value::Real),
            Just(Value::Integer(i64::MIN)),
            Just(Value::Real(i64::MIN as f64)),
            "[ab]{0,2}".prop_map(Value::Text),
            prop::collection::vec(97u8..99, 0..3).prop_map(Value::Blob),
        ]
    }

    proptest! {
        /// Keys are one row exactly when SQLite calls them equal (the
        /// metadata's `pk = excluded.pk`), and equal keys share an id.
        #[test]
        fn keys_are_the_same_row_exactly_when_sqlite_says_so(a in key(), b in key()) {
            let conn = Connection::open_in_memory().unwrap();
            let sqlite_equal: bool = conn
                .query_row("SELECT ?1 = ?2", params![a, b], |r| r.get(0))
                .unwrap();
            let same = same_key(&a, b.as_sql());
            prop_assert_eq!(same, sqlite_equal, "{:?} and {:?}", a, b);
            if same {
                prop_assert_eq!(row_id(&a), row_id(&b));
            }
        }
    }

    fn count(db: &Database, sql: &str) -> i64 {
        db.read_snapshot(|c| Ok(c.query_row(sql, [], |r| r.get(0))?))
            .unwrap()
    }

    fn dump(db: &Database) -> Vec<Vec<Value>> {
        db.query("SELECT * FROM t ORDER BY k", &[]).unwrap().rows
    }

    /// With ids two bits wide, every key shares its id with others: each
    /// write goes through probing, and every key still gets a metadata
    /// row of its own that a peer can rebuild the table from.
    #[test]
    fn keys_that_share_an_id_each_keep_their_own_metadata() {
        ID_BITS.with(|b| b.set(2));
        let open = || {
            let db = Database::open_in_memory().unwrap();
            db.execute_batch("CREATE TABLE t(k PRIMARY KEY NOT NULL, v TEXT)")
                .unwrap();
            db
        };
        let a = open();
        // Rows present when the table becomes synced.
        a.execute_batch("INSERT INTO t VALUES (1, 'one'), ('two', 'two'), (x'03', 'three')")
            .unwrap();
        a.enable_sync("t").unwrap();
        a.write(|tx| {
            for i in 10..40 {
                tx.execute("INSERT INTO t VALUES (?1, 'new')", &[Value::Integer(i)])?;
                tx.execute(
                    "INSERT INTO t VALUES (?1, 'new')",
                    &[Value::Text(format!("key {i}"))],
                )?;
            }
            Ok(())
        })
        .unwrap();
        a.execute("UPDATE t SET v = 'edited' WHERE k > 30 AND k < 36", &[])
            .unwrap();
        a.execute("DELETE FROM t WHERE k < 20", &[]).unwrap();
        a.execute("INSERT INTO t VALUES (12, 'back'), (13, 'back')", &[])
            .unwrap();
        // Several writes to one row in one transaction, and a statement
        // that fails half-way (its rows are reconciled).
        a.write(|tx| {
            tx.execute("UPDATE t SET v = 'twice' WHERE k = 'key 11'", &[])?;
            tx.execute("DELETE FROM t WHERE k = 'key 11'", &[])?;
            tx.execute("INSERT INTO t VALUES ('key 11', 'again')", &[])?;
            Ok(())
        })
        .unwrap();
        assert!(a
            .execute(
                "INSERT INTO t SELECT 'key ' || k, 'x' FROM t WHERE typeof(k) = 'integer'",
                &[]
            )
            .is_err());

        // One metadata row per key ever written: 3 + 60.
        assert_eq!(count(&a, "SELECT count(*) FROM confluo_rows_t"), 63);
        assert_eq!(
            count(&a, "SELECT count(DISTINCT id) FROM confluo_rows_t"),
            63
        );
        assert_eq!(
            count(&a, "SELECT count(*) FROM confluo_rows_t WHERE cl % 2 = 0"),
            9,
            "1, 10, 11 and 14..=19 are deleted"
        );
        assert_eq!(count(&a, "SELECT max(cl) FROM confluo_rows_t"), 3);

        let b = open();
        b.enable_sync("t").unwrap();
        b.apply(&a.changes_since(0, None).unwrap()).unwrap();
        assert_eq!(dump(&b), dump(&a));
        b.apply(&a.changes_since(0, None).unwrap()).unwrap();
        assert_eq!(count(&b, "SELECT count(*) FROM confluo_rows_t"), 63);
        // And back: an edit on the replica reaches the first database.
        b.execute(
            "UPDATE t SET v = 'from b' WHERE k IN (2, 12, 'key 39')",
            &[],
        )
        .unwrap();
        let seen = a.seen_version(b.site_id()).unwrap();
        a.apply(&b.changes_for_peer(a.site_id(), seen).unwrap())
            .unwrap();
        assert_eq!(dump(&a), dump(&b));
        assert_eq!(count(&a, "SELECT count(*) FROM confluo_rows_t"), 63);
    }
}
