//! Where a row's metadata is kept. Each synced table's metadata table
//! (`confluo_meta_<table>`) is keyed by an integer id derived from the
//! row's key, and keeps the key itself in a column.
//!
//! Keyed by the key itself (up to metadata format 2, `confluo_rows_<table>`),
//! the table and its `dbv` index each held a copy of the key (36 bytes for
//! a UUID as text), and every lookup compared strings. With an integer id
//! an index entry is about 10 bytes, and every seek compares integers.
//!
//! The id is SipHash-1-3 of the key under a secret of this database
//! (`confluo_state.row_ids`), cut to 47 bits: what SQLite stores in 6 bytes
//! in a record and 7 in a rowid, against 8 and 9 for 64 bits (0.4 MB less
//! per 100,000 rows). Two keys with the same id are rare (about n²/2^48
//! pairs for n rows: one in 30,000 databases of 100,000 rows) but handled:
//! the second key takes the next free id (linear probing). Metadata rows
//! are never deleted one by one (a deleted row keeps its tombstone; only
//! signing out clears a table, and a dropped table loses all of it), so a
//! key is found by walking the ids from its own up to the first free one.
//! The secret keeps a peer from choosing keys that pile up on a stretch of
//! ids: with a known hash, about 2^47 hashes would buy a run of any length.

use rusqlite::functions::FunctionFlags;
use rusqlite::types::ValueRef;
use rusqlite::{params, CachedStatement, Connection, OptionalExtension};
use siphasher::sip::SipHasher13;
use std::cmp::Ordering;
use std::hash::Hasher;

use crate::bulk::Overlay;
use crate::clocks::RowClocks;
use crate::error::{Error, Result};
use crate::schema::{self, quote, TableInfo};
use crate::value::Value;

/// Turns row keys into metadata ids (see the module's documentation).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowIds {
    k0: u64,
    k1: u64,
}

/// The `confluo_state` entry that holds the secret.
const SECRET: &str = "row_ids";

impl RowIds {
    /// The secret of the database open on `conn`, if it has one.
    pub fn load(conn: &Connection) -> Result<Option<RowIds>> {
        let stored: Option<Vec<u8>> = conn
            .query_row(
                "SELECT value FROM confluo_state WHERE key = ?1",
                [SECRET],
                |r| r.get(0),
            )
            .optional()?;
        stored
            .map(|secret| {
                let secret: [u8; 16] = secret.try_into().map_err(|_| Error::Sqlite {
                    message: "corrupt confluo metadata: the row id secret is not 16 bytes".into(),
                    code: None,
                })?;
                let (k0, k1) = secret.split_at(8);
                Ok(RowIds {
                    k0: u64::from_le_bytes(k0.try_into().expect("8 bytes")),
                    k1: u64::from_le_bytes(k1.try_into().expect("8 bytes")),
                })
            })
            .transpose()
    }

    /// Makes and stores a new secret: for a database without row metadata.
    pub fn create(conn: &Connection) -> Result<RowIds> {
        conn.execute(
            "INSERT INTO confluo_state(key, value) VALUES (?1, ?2)",
            params![SECRET, &uuid::Uuid::new_v4().as_bytes()[..]],
        )?;
        Ok(Self::load(conn)?.expect("just stored"))
    }

    /// Ids under a fixed secret, for tests.
    #[cfg(test)]
    pub fn fixed() -> RowIds {
        RowIds { k0: 1, k1: 2 }
    }

    /// Defines `confluo_row_id(key)` on `conn`, and `confluo_key(key)`: the
    /// key as the engine reads it everywhere else (text that is not UTF-8
    /// made valid), so that keys stored by SQL are found again.
    pub fn register(self, conn: &Connection) -> Result<()> {
        let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC;
        conn.create_scalar_function("confluo_row_id", 1, flags, move |ctx| {
            Ok(self.id(&Value::from_ref(ctx.get_raw(0))))
        })?;
        conn.create_scalar_function("confluo_key", 1, flags, |ctx| {
            Ok(Value::from_ref(ctx.get_raw(0)))
        })?;
        Ok(())
    }

    /// The id where `key`'s metadata goes, unless another key took it.
    /// Keys SQLite calls equal (an integer and the same number as a real)
    /// get the same id.
    pub fn id(&self, key: &Value) -> i64 {
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
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

/// Whether two keys are one row: the same to SQL's `IS` under BINARY
/// collation (numbers by value, exactly, so 1 and 1.0 are one key; text
/// and blobs byte for byte), as the metadata's `pk = excluded.pk` says.
pub(crate) fn same_key(a: ValueRef<'_>, b: ValueRef<'_>) -> bool {
    match (a, b) {
        (ValueRef::Null, ValueRef::Null) => true,
        (ValueRef::Integer(x), ValueRef::Integer(y)) => x == y,
        // SQLite stores no NaN; 0.0 is -0.0.
        (ValueRef::Real(x), ValueRef::Real(y)) => x == y,
        (ValueRef::Integer(i), ValueRef::Real(r)) | (ValueRef::Real(r), ValueRef::Integer(i)) => {
            exact_integer(r) == Some(i)
        }
        (ValueRef::Text(x), ValueRef::Text(y)) | (ValueRef::Blob(x), ValueRef::Blob(y)) => x == y,
        _ => false,
    }
}

/// A total order of keys that calls two keys equal exactly when
/// `same_key` does, and otherwise orders them as SQLite does (NULL,
/// numbers by value, text, blobs; text and blobs byte by byte).
pub(crate) fn key_order(a: ValueRef<'_>, b: ValueRef<'_>) -> Ordering {
    fn rank(v: ValueRef<'_>) -> u8 {
        match v {
            ValueRef::Null => 0,
            ValueRef::Integer(_) | ValueRef::Real(_) => 1,
            ValueRef::Text(_) => 2,
            ValueRef::Blob(_) => 3,
        }
    }
    // An integer against a real, exactly (no rounding through f64).
    fn int_real(i: i64, r: f64) -> Ordering {
        match exact_integer(r) {
            Some(r) => i.cmp(&r),
            None if r.is_nan() => Ordering::Greater,
            None if r < i64::MIN as f64 => Ordering::Greater,
            None if r >= -(i64::MIN as f64) => Ordering::Less,
            // Not integral: i is below r exactly when it is at most r's floor.
            None if i <= r.floor() as i64 => Ordering::Less,
            None => Ordering::Greater,
        }
    }
    match (a, b) {
        (ValueRef::Integer(x), ValueRef::Integer(y)) => x.cmp(&y),
        (ValueRef::Real(x), ValueRef::Real(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
        (ValueRef::Integer(x), ValueRef::Real(y)) => int_real(x, y),
        (ValueRef::Real(x), ValueRef::Integer(y)) => int_real(y, x).reverse(),
        (ValueRef::Text(x), ValueRef::Text(y)) | (ValueRef::Blob(x), ValueRef::Blob(y)) => x.cmp(y),
        _ => rank(a).cmp(&rank(b)),
    }
}

/// The first bytes of a key as an integer that orders as `key_order` does
/// where they differ: sorts compare these first, and the keys themselves
/// only on a tie (numbers always tie).
fn order_prefix(v: ValueRef<'_>) -> u64 {
    let bytes = |rank: u8, b: &[u8]| {
        let mut word = [0u8; 8];
        word[0] = rank;
        let n = b.len().min(7);
        word[1..1 + n].copy_from_slice(&b[..n]);
        u64::from_be_bytes(word)
    };
    match v {
        ValueRef::Null => 0,
        ValueRef::Integer(_) | ValueRef::Real(_) => 1 << 56,
        ValueRef::Text(s) => bytes(2, s),
        ValueRef::Blob(b) => bytes(3, b),
    }
}

/// The positions `0..len` in the `key_order` of their keys, `key(i)`.
pub(crate) fn key_sorted<'k>(len: usize, key: impl Fn(usize) -> ValueRef<'k>) -> Vec<usize> {
    let mut order: Vec<(u64, usize)> = (0..len).map(|i| (order_prefix(key(i)), i)).collect();
    order.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| key_order(key(a.1), key(b.1))));
    order.into_iter().map(|(_, i)| i).collect()
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
    /// The row's causal length and clocks, with the bulk entries of
    /// `overlay` laid over them (`slots`: the table's slot count); a row
    /// without metadata has neither (causal length 0).
    pub fn clocks(&self, overlay: &Overlay, slots: usize) -> Result<(u64, RowClocks)> {
        Ok(match &self.stored {
            Some(row) => {
                let stored = (row.cl as u64, row.dbv as u64);
                let (cl, clocks, _) = overlay.read(self.id, stored, &row.clocks, slots)?;
                (cl, clocks)
            }
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
            if same_key(key.as_sql(), r.get_ref(1)?) {
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
        self.write(at.id, at.stored.is_some(), key, cl, dbv, clocks)
    }

    /// Writes a row's metadata at `id`, where a row of the same key is
    /// (`exists`) or none is.
    pub fn write(
        &mut self,
        id: i64,
        exists: bool,
        key: &Value,
        cl: u64,
        dbv: u64,
        clocks: &[u8],
    ) -> Result<()> {
        // Known to exist or not in this transaction: an upsert would make
        // SQLite journal the statement.
        if exists {
            self.update
                .execute(params![id, cl as i64, dbv as i64, clocks])?;
        } else {
            self.insert
                .execute(params![id, key, cl as i64, dbv as i64, clocks])?;
        }
        Ok(())
    }
}

/// Gives metadata to every key that `source` (SQL selecting `k, cl, dbv,
/// clocks`, with `params`) yields and `t`'s metadata table lacks. One
/// statement puts each key at its own id; keys it could not place there
/// (another key holds the id, which is rare) are then placed one by one.
/// Needs `confluo_row_id` (see `RowIds::register`).
pub(crate) fn fill(
    conn: &Connection,
    ids: &RowIds,
    t: &TableInfo,
    source: &str,
    params: impl rusqlite::Params + Copy,
) -> Result<()> {
    let meta = t.meta_table();
    let empty: bool = conn.query_row(
        &format!("SELECT NOT EXISTS (SELECT 1 FROM {meta})"),
        [],
        |r| r.get(0),
    )?;
    let placed = conn.execute(
        &format!(
            "INSERT OR IGNORE INTO {meta}(id, pk, cl, dbv, clocks) \
             SELECT confluo_row_id(k), confluo_key(k), cl, dbv, clocks FROM ({source})"
        ),
        params,
    )?;
    let wanted: i64 = conn.query_row(&format!("SELECT count(*) FROM ({source})"), params, |r| {
        r.get(0)
    })?;
    if empty && placed as i64 == wanted {
        return Ok(());
    }
    let mut rows = MetaRows::new(conn, t)?;
    let mut read = conn.prepare(source)?;
    let mut read = read.query(params)?;
    while let Some(r) = read.next()? {
        let key = Value::from_ref(r.get_ref(0)?);
        let at = rows.locate(ids.id(&key), &key)?;
        if at.stored.is_none() {
            let (cl, dbv) = (r.get::<_, i64>(1)?, r.get::<_, i64>(2)?);
            rows.save(&at, &key, cl as u64, dbv as u64, r.get_ref(3)?.as_blob()?)?;
        }
    }
    Ok(())
}

/// Moves `t`'s metadata from the table keyed by the key itself (format 2
/// and before: `confluo_rows_<table>`), if there is one, to the one keyed
/// by id. Nothing is renamed: a rename would check the app's whole schema
/// again, and fail on any view the app left broken.
pub(crate) fn migrate_table(conn: &Connection, ids: &RowIds, t: &TableInfo) -> Result<()> {
    let old = format!("confluo_rows_{}", t.name);
    let exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1)",
        [&old],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(());
    }
    let old = quote(&old);
    schema::create_meta_table(conn, t)?;
    fill(
        conn,
        ids,
        t,
        &format!("SELECT pk AS k, cl, dbv, clocks FROM {old}"),
        [],
    )?;
    // Its index goes with it.
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
            "[ab]{0,9}".prop_map(Value::Text),
            prop::collection::vec(97u8..99, 0..10).prop_map(Value::Blob),
        ]
    }

    proptest! {
        /// Keys are one row exactly when SQLite calls them equal (the
        /// metadata's `pk = excluded.pk`), equal keys share an id, and
        /// keys are ordered as SQLite orders them.
        #[test]
        fn keys_are_the_same_row_exactly_when_sqlite_says_so(a in key(), b in key()) {
            let conn = Connection::open_in_memory().unwrap();
            let sqlite_equal: bool = conn
                .query_row("SELECT ?1 = ?2", params![a, b], |r| r.get(0))
                .unwrap();
            let same = same_key(a.as_sql(), b.as_sql());
            prop_assert_eq!(same, sqlite_equal, "{:?} and {:?}", a, b);
            if same {
                let ids = RowIds::fixed();
                prop_assert_eq!(ids.id(&a), ids.id(&b));
            }
            let sqlite_order: i64 = conn
                .query_row(
                    "SELECT CASE WHEN ?1 < ?2 THEN -1 WHEN ?1 > ?2 THEN 1 ELSE 0 END",
                    params![a, b],
                    |r| r.get(0),
                )
                .unwrap();
            let order = key_order(a.as_sql(), b.as_sql());
            prop_assert_eq!(order as i64, sqlite_order, "{:?} and {:?}", a, b);
            let by_prefix = order_prefix(a.as_sql()).cmp(&order_prefix(b.as_sql()));
            prop_assert!(by_prefix.is_eq() || by_prefix == order, "{:?} and {:?}", a, b);
        }
    }

    fn count(db: &Database, sql: &str) -> i64 {
        db.read_snapshot(|c| Ok(c.query_row(sql, [], |r| r.get(0))?))
            .unwrap()
    }

    fn dump(db: &Database) -> Vec<Vec<Value>> {
        db.query("SELECT * FROM t ORDER BY k", &[]).unwrap().rows
    }

    /// A row's changes split within one change set: the second part finds
    /// the metadata the first part merged (held until the end of the merge).
    #[test]
    fn a_row_whose_changes_are_split_in_a_change_set_merges_whole() {
        let open = || {
            let db = Database::open_in_memory().unwrap();
            db.execute_batch("CREATE TABLE t(k TEXT PRIMARY KEY NOT NULL, a TEXT, b TEXT)")
                .unwrap();
            db.enable_sync("t").unwrap();
            db
        };
        let a = open();
        a.execute("INSERT INTO t VALUES ('x', '1', '2'), ('y', '3', '4')", &[])
            .unwrap();
        let mut cs = a.changes_since(0, None).unwrap();
        // x's last change after y's.
        let last_x = cs
            .changes
            .iter()
            .rposition(|c| c.pk[0] == Value::Text("x".into()))
            .unwrap();
        let moved = cs.changes.remove(last_x);
        cs.changes.push(moved);
        let b = open();
        b.apply(&cs).unwrap();
        assert_eq!(dump(&b), dump(&a));
        assert_eq!(count(&b, "SELECT count(*) FROM confluo_meta_t"), 2);
        assert_eq!(
            b.changes_since(0, None).unwrap().changes.len(),
            cs.changes.len()
        );
    }

    /// Metadata of format 2 moves to ids even when every key collides, and
    /// the rows keep their metadata: one row each, found again by writes.
    #[test]
    fn metadata_moves_to_ids_when_keys_collide() {
        ID_BITS.with(|b| b.set(2));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f2.db");
        let db = Database::open(&path).unwrap();
        db.execute_batch("CREATE TABLE t(k PRIMARY KEY NOT NULL, v TEXT)")
            .unwrap();
        db.enable_sync("t").unwrap();
        db.write(|tx| {
            for i in 0..30 {
                tx.execute("INSERT INTO t VALUES (?1, 'x')", &[Value::Integer(i)])?;
            }
            Ok(())
        })
        .unwrap();
        db.execute("DELETE FROM t WHERE k < 5", &[]).unwrap();
        let before = db.changes_since(0, None).unwrap().changes.len();
        db.close().unwrap();
        let raw = Connection::open(&path).unwrap();
        raw.execute_batch(
            "CREATE TABLE confluo_rows_t(pk PRIMARY KEY, cl INTEGER NOT NULL, dbv INTEGER NOT NULL, clocks BLOB NOT NULL) WITHOUT ROWID;
             INSERT INTO confluo_rows_t SELECT pk, cl, dbv, clocks FROM confluo_meta_t;
             DROP TABLE confluo_meta_t;
             DELETE FROM confluo_state WHERE key = 'row_ids';
             UPDATE confluo_state SET value = 2 WHERE key = 'format';",
        )
        .unwrap();
        drop(raw);
        let db = Database::open(&path).unwrap();
        assert_eq!(db.changes_since(0, None).unwrap().changes.len(), before);
        db.execute("UPDATE t SET v = 'y'", &[]).unwrap();
        db.execute("INSERT INTO t VALUES (3, 'back')", &[]).unwrap();
        assert_eq!(count(&db, "SELECT count(*) FROM confluo_meta_t"), 30);
        assert_eq!(
            count(&db, "SELECT count(DISTINCT pk) FROM confluo_meta_t"),
            30
        );
        assert_eq!(
            count(&db, "SELECT count(*) FROM confluo_meta_t WHERE cl % 2 = 0"),
            4
        );
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
        a.execute_batch(
            "INSERT INTO t VALUES (1, 'one'), ('two', 'two'), (x'03', 'three');
             WITH RECURSIVE n(i) AS (SELECT 100 UNION ALL SELECT i + 1 FROM n WHERE i < 106)
             INSERT INTO t SELECT i, 'old' FROM n;",
        )
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

        // One metadata row per key ever written: 10 + 60.
        assert_eq!(count(&a, "SELECT count(*) FROM confluo_meta_t"), 70);
        assert_eq!(
            count(&a, "SELECT count(DISTINCT id) FROM confluo_meta_t"),
            70
        );
        assert_eq!(
            count(&a, "SELECT count(*) FROM confluo_meta_t WHERE cl % 2 = 0"),
            9,
            "1, 10, 11 and 14..=19 are deleted"
        );
        assert_eq!(count(&a, "SELECT max(cl) FROM confluo_meta_t"), 3);

        let b = open();
        b.enable_sync("t").unwrap();
        b.apply(&a.changes_since(0, None).unwrap()).unwrap();
        assert_eq!(dump(&b), dump(&a));
        b.apply(&a.changes_since(0, None).unwrap()).unwrap();
        assert_eq!(count(&b, "SELECT count(*) FROM confluo_meta_t"), 70);
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
        assert_eq!(count(&a, "SELECT count(*) FROM confluo_meta_t"), 70);
    }

    /// Bulk entries name rows by id: a row whose metadata is not at its
    /// own id (another key took it) must be stamped one by one, and one at
    /// its own id must not take the stamps meant for a key that collides
    /// with it. Every export reads as on a database without bulk entries.
    #[test]
    fn bulk_updates_of_keys_that_collide_read_like_rows_stamped_one_by_one() {
        ID_BITS.with(|b| b.set(2));
        let clock = std::sync::Arc::new(crate::hlc::ManualTimeSource::new(1_700_000_000_000));
        let open = |bulk_update_rows| {
            let db = Database::open_in_memory_with(crate::db::Options {
                time: clock.clone(),
                bulk_update_rows,
                ..Default::default()
            })
            .unwrap();
            db.execute_batch("CREATE TABLE t(k PRIMARY KEY NOT NULL, a TEXT, b TEXT)")
                .unwrap();
            db.enable_sync("t").unwrap();
            db
        };
        let (bulk, plain) = (open(1), open(usize::MAX));
        let statements = [
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 29) \
             INSERT INTO t SELECT i, 'a', 'b' FROM n",
            "UPDATE t SET a = 'x'",
            "UPDATE t SET b = 'y' WHERE k % 3 = 0",
            "UPDATE t SET a = 'z' WHERE k = 7",
            "UPDATE t SET a = 'w', b = 'w' WHERE k > 20",
            "DELETE FROM t WHERE k % 5 = 0",
            "UPDATE t SET b = 'v'",
        ];
        let cells = |db: &Database, since: u64| {
            let mut out: Vec<String> = db
                .changes_since(since, None)
                .unwrap()
                .changes
                .iter()
                .map(|c| {
                    format!(
                        "{:?} {:?} {:?} {} {} {}",
                        c.pk, c.column, c.value, c.hlc.0, c.cl, c.db_version
                    )
                })
                .collect();
            out.sort();
            out
        };
        for sql in statements {
            bulk.execute_batch(sql).unwrap();
            plain.execute_batch(sql).unwrap();
            clock.advance(1);
            for since in 0..=bulk.db_version() {
                assert_eq!(
                    cells(&bulk, since),
                    cells(&plain, since),
                    "{sql}, since {since}"
                );
            }
        }
        assert!(count(&bulk, "SELECT count(*) FROM confluo_bulk") > 0);
    }
}
