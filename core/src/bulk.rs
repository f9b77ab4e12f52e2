//! Bulk stamps: one record for a transaction that updated or deleted many
//! rows alike.
//!
//! `UPDATE todo SET done = 1` over 100,000 rows would otherwise rewrite
//! 100,000 metadata rows at commit (read, decode, re-encode, write, and move
//! each row's `dbv` index entry), several times what SQLite spends on the
//! update itself; a `DELETE` of many rows, likewise. Instead, when a
//! transaction updated at least `Options::bulk_update_rows` rows of a table
//! the same way (the same columns), or deleted as many, each row alive and
//! its metadata at its own id, commit writes one entry to `confluo_bulk`:
//! the table, the transaction's db_version and clock, the columns (or that
//! the rows were deleted), and the rows' ids.
//!
//! A row's causal length and clocks are its metadata's with the entries
//! laid over them: an entry that holds the row's id and is newer than the
//! row's `dbv` (so the row's metadata was not written since) stamps its
//! columns, or deletes the row. Whatever writes a row's metadata reads it
//! through the entries first, so the written row carries their stamps, and
//! its new `dbv` ends their hold on it. (A transaction's entries and the
//! rows it writes one by one are never the same rows.) An export after
//! `since` reads, beside the rows whose `dbv` is newer, the rows of the
//! entries newer than `since`.
//!
//! A table keeps at most `MAX_ENTRIES`; one more first folds the oldest into
//! its rows (what commit would have done), and an entry whose rows and
//! columns a newer one covers goes without a fold: nothing of it shows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use crate::capture::{EventKind, LOCAL_SITE};
use crate::clocks::{RowClocks, Stamp};
use crate::codec::{put_varint, Reader};
use crate::error::{Error, Result};
use crate::hlc::Hlc;
use crate::schema::TableInfo;

/// The fewest rows a transaction updates alike (or deletes) in one table
/// for them to be recorded as one entry instead of one by one (the default of
/// `Options::bulk_update_rows`): below it, the entry would cost every later
/// read of the table more than it saves.
pub(crate) const BULK_UPDATE_ROWS: usize = 1024;

/// The most entries a table keeps before the oldest is folded into its rows.
const MAX_ENTRIES: usize = 4;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS confluo_bulk(
  id INTEGER PRIMARY KEY, tbl INTEGER NOT NULL, tag INTEGER NOT NULL, dbv INTEGER NOT NULL,
  hlc INTEGER NOT NULL, deletes INTEGER NOT NULL, masks BLOB NOT NULL, ids BLOB NOT NULL);
";

/// One transaction's update, or delete, of many rows of a table.
#[derive(Debug)]
pub(crate) struct BulkEntry {
    /// Its row in `confluo_bulk`.
    pub entry: i64,
    pub dbv: u64,
    pub hlc: Hlc,
    /// The rows were deleted (and `masks` is empty).
    pub deletes: bool,
    /// The updated column slots, 62 per word (as `EventKind::Updated`).
    pub masks: Box<[u64]>,
    /// The rows' metadata ids.
    pub ids: SortedIds,
}

/// Ids, sorted, with an index of where each stretch of ids starts: ids are
/// spread evenly (hashes), so an id's stretch holds one or two, and a
/// lookup reads two index slots and an id or two instead of a binary
/// search's dozen and a half ids spread over the array (read for every row
/// of every export).
#[derive(Debug)]
pub(crate) struct SortedIds {
    ids: Box<[i64]>,
    /// `starts[s]`: the first id of stretch `s` (`id >> shift`).
    starts: Box<[u32]>,
    shift: u32,
}

impl SortedIds {
    pub fn new(ids: Vec<i64>) -> SortedIds {
        debug_assert!(ids.is_sorted());
        let max = ids.last().copied().unwrap_or(0).max(0) as u64;
        let id_bits = 64 - max.leading_zeros();
        let stretch_bits = (ids.len().max(1).next_power_of_two().trailing_zeros()).min(id_bits);
        let shift = id_bits - stretch_bits;
        let mut starts = vec![0u32; (1 << stretch_bits) + 1];
        let mut at = 0usize;
        for (s, start) in starts.iter_mut().enumerate() {
            while at < ids.len() && ((ids[at].max(0) as u64) >> shift) < s as u64 {
                at += 1;
            }
            *start = at as u32;
        }
        SortedIds {
            ids: ids.into(),
            starts: starts.into(),
            shift,
        }
    }

    pub fn contains(&self, id: i64) -> bool {
        let Ok(id_u) = u64::try_from(id) else {
            return false;
        };
        let s = (id_u >> self.shift) as usize;
        if s + 1 >= self.starts.len() {
            return false;
        }
        let (from, to) = (self.starts[s] as usize, self.starts[s + 1] as usize);
        self.ids[from..to].contains(&id)
    }

    pub fn as_slice(&self) -> &[i64] {
        &self.ids
    }
}

impl BulkEntry {
    fn holds(&self, id: i64) -> bool {
        self.ids.contains(id)
    }

    fn stamp(&self) -> Stamp {
        Stamp {
            hlc: self.hlc,
            site: LOCAL_SITE,
            dbv: self.dbv,
        }
    }

    /// Whether nothing of `older` shows under this entry: it deletes or
    /// stamps every row and column `older` stamps.
    fn covers(&self, older: &BulkEntry) -> bool {
        let masks_cover = self.deletes
            || (!older.deletes
                && older.masks.iter().enumerate().all(|(w, &m)| {
                    let mine = self.masks.get(w).copied().unwrap_or(0);
                    m & !mine == 0
                }));
        masks_cover && older.ids.as_slice().iter().all(|&id| self.holds(id))
    }

    fn encode_ids(ids: &[i64]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ids.len() * 7);
        let mut last = 0i64;
        for &id in ids {
            put_varint(&mut out, (id - last) as u64);
            last = id;
        }
        out
    }

    fn decode(
        entry: i64,
        (dbv, hlc, deletes): (i64, i64, bool),
        masks: &[u8],
        ids: &[u8],
    ) -> Result<BulkEntry> {
        let corrupt = || Error::Sqlite {
            message: "corrupt confluo metadata: a bulk stamp entry".into(),
            code: None,
        };
        // A delete names no column; an update, some.
        if masks.len() % 8 != 0 || deletes != masks.is_empty() {
            return Err(corrupt());
        }
        let masks = masks
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
            .collect();
        let mut r = Reader::new(ids);
        let mut out = Vec::new();
        let mut last = 0i64;
        while !r.is_empty() {
            let delta = r.varint().map_err(|_| corrupt())?;
            last = i64::try_from(delta)
                .ok()
                .and_then(|d| last.checked_add(d))
                .ok_or_else(corrupt)?;
            if out.last().is_some_and(|&prev| prev >= last) {
                return Err(corrupt());
            }
            out.push(last);
        }
        Ok(BulkEntry {
            entry,
            dbv: dbv as u64,
            hlc: Hlc(hlc as u64),
            deletes,
            masks,
            ids: SortedIds::new(out),
        })
    }
}

/// The entries of one table, oldest first, as laid over its rows.
#[derive(Clone, Default, Debug)]
pub(crate) struct Overlay {
    entries: Vec<Arc<BulkEntry>>,
}

impl Overlay {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether any entry holds the row `id` (then its clocks need the
    /// overlay, whatever its `dbv`).
    pub fn holds(&self, id: i64) -> bool {
        self.entries.iter().any(|e| e.holds(id))
    }

    /// The row at `id` as its metadata stores it (causal length `cl`,
    /// `dbv`, the clocks `blob`) with the entries laid over it: its causal
    /// length, clocks, and newest db_version.
    pub fn read(
        &self,
        id: i64,
        (mut cl, dbv): (u64, u64),
        blob: &[u8],
        slots: usize,
    ) -> Result<(u64, RowClocks, u64)> {
        let mut clocks = RowClocks::decode(blob, dbv)?;
        let newest = self.apply(id, &mut cl, dbv, &mut clocks, slots);
        Ok((cl, clocks, newest))
    }

    /// Lays the entries over the causal length and clocks of the row at
    /// `id`, whose metadata's `dbv` is `row_dbv`; returns the row's newest
    /// db_version with them.
    fn apply(
        &self,
        id: i64,
        cl: &mut u64,
        row_dbv: u64,
        clocks: &mut RowClocks,
        slots: usize,
    ) -> u64 {
        let mut newest = row_dbv;
        for e in &self.entries {
            // Entries only hold rows that were alive; one deleted since (by
            // its own metadata or by an older entry) has nothing newer.
            if *cl % 2 == 0 {
                break;
            }
            if e.dbv > row_dbv && e.holds(id) {
                if e.deletes {
                    crate::local::apply_local(cl, clocks, &EventKind::Deleted, e.stamp(), slots);
                } else {
                    crate::local::stamp_columns(clocks, &e.masks, e.stamp(), slots);
                }
                newest = e.dbv;
            }
        }
        newest
    }

    /// The newest db_version of an entry.
    pub fn max_dbv(&self) -> u64 {
        self.entries.iter().map(|e| e.dbv).max().unwrap_or(0)
    }

    /// The ids of the rows held by entries newer than `since`, sorted, each
    /// once.
    pub fn ids_after(&self, since: u64) -> Vec<i64> {
        let mut newer = self.entries.iter().filter(|e| e.dbv > since);
        let mut ids: Vec<i64> = newer
            .next()
            .map(|e| e.ids.as_slice().to_vec())
            .unwrap_or_default();
        for e in newer {
            ids.extend_from_slice(e.ids.as_slice());
            ids.sort_unstable();
            ids.dedup();
        }
        ids
    }
}

/// Decoded entries by (table, row in `confluo_bulk`, tag), so that reads
/// decode an entry once. An entry's row never changes while it exists;
/// the tag, random, tells it from an entry of the same row number written
/// before (one of a transaction that rolled back, perhaps by another
/// handle on the same file, in the same millisecond).
#[derive(Default)]
pub(crate) struct BulkCache(Mutex<HashMap<(i64, i64, i64), Arc<BulkEntry>>>);

impl BulkCache {
    /// The entries of table `table` as `conn` sees them.
    pub fn overlay(&self, conn: &Connection, table: i64) -> Result<Overlay> {
        // Every table's entries (a few), and no parameter: bound to
        // `tbl = ?`, SQLite (built with STAT4) prepares the statement anew at
        // each run, which cost more than the rest of a small sync's export.
        let mut listed: Vec<(i64, i64)> = Vec::new();
        let mut stmt = conn.prepare_cached("SELECT tbl, id, tag FROM confluo_bulk")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            if r.get::<_, i64>(0)? == table {
                listed.push((r.get(1)?, r.get(2)?));
            }
        }
        // Oldest first: rows are numbered in the order they were written.
        listed.sort_unstable();
        let mut cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // What another handle folded, or a transaction rolled back, goes.
        cache.retain(|&(t, entry, tag), _| t != table || listed.contains(&(entry, tag)));
        let mut entries = Vec::with_capacity(listed.len());
        for (entry, tag) in listed {
            if let Some(e) = cache.get(&(table, entry, tag)) {
                entries.push(e.clone());
                continue;
            }
            let (stamp, masks, ids): (_, Vec<u8>, Vec<u8>) = conn
                .prepare_cached(
                    "SELECT dbv, hlc, deletes, masks, ids FROM confluo_bulk WHERE id = ?1",
                )?
                .query_row([entry], |r| {
                    Ok(((r.get(0)?, r.get(1)?, r.get(2)?), r.get(3)?, r.get(4)?))
                })?;
            let e = Arc::new(BulkEntry::decode(entry, stamp, &masks, &ids)?);
            cache.insert((table, entry, tag), e.clone());
            entries.push(e);
        }
        Ok(Overlay { entries })
    }
}

/// What an entry records of its rows.
#[derive(Clone, Copy, Debug)]
pub(crate) enum BulkWrite<'a> {
    /// The columns in these masks (62 slots per word) were updated.
    Updated(&'a [u64]),
    Deleted,
}

/// Records the entry of a transaction at `stamp` that wrote the rows `ids`
/// (sorted) of `t` alike, making room for it.
pub(crate) fn record(
    conn: &Connection,
    cache: &BulkCache,
    t: &TableInfo,
    stamp: Stamp,
    write: BulkWrite<'_>,
    ids: &[i64],
) -> Result<()> {
    let (deletes, masks) = match write {
        BulkWrite::Updated(masks) => (false, masks),
        BulkWrite::Deleted => (true, &[][..]),
    };
    let entry = BulkEntry {
        entry: 0,
        dbv: stamp.dbv,
        hlc: stamp.hlc,
        deletes,
        masks: masks.into(),
        ids: SortedIds::new(ids.to_vec()),
    };
    let overlay = cache.overlay(conn, t.id)?;
    let mut kept = overlay.entries.len();
    for old in &overlay.entries {
        if entry.covers(old) {
            delete(conn, old)?;
            kept -= 1;
        }
    }
    if kept >= MAX_ENTRIES {
        let oldest = overlay
            .entries
            .iter()
            .find(|e| !entry.covers(e))
            .expect("kept entries remain");
        fold(conn, t, oldest)?;
    }
    conn.prepare_cached(
        "INSERT INTO confluo_bulk(tbl, tag, dbv, hlc, deletes, masks, ids) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        t.id,
        uuid::Uuid::new_v4().as_u64_pair().0 as i64,
        stamp.dbv as i64,
        stamp.hlc.0 as i64,
        entry.deletes,
        masks
            .iter()
            .flat_map(|m| m.to_le_bytes())
            .collect::<Vec<u8>>(),
        BulkEntry::encode_ids(ids)
    ])?;
    Ok(())
}

fn delete(conn: &Connection, e: &BulkEntry) -> Result<()> {
    conn.prepare_cached("DELETE FROM confluo_bulk WHERE id = ?1")?
        .execute([e.entry])?;
    Ok(())
}

/// Writes `e` into the rows it still holds, and deletes it. Entries are
/// folded oldest first (of those kept): no older entry holds its rows. A row takes the entry's db_version: its changes are no newer
/// than they were.
fn fold(conn: &Connection, t: &TableInfo, e: &Arc<BulkEntry>) -> Result<()> {
    let meta = t.meta_table();
    let mut read =
        conn.prepare_cached(&format!("SELECT cl, dbv, clocks FROM {meta} WHERE id = ?1"))?;
    let mut write = conn.prepare_cached(&format!(
        "UPDATE {meta} SET cl = ?2, dbv = ?3, clocks = ?4 WHERE id = ?1"
    ))?;
    let just_this = Overlay {
        entries: vec![e.clone()],
    };
    for &id in e.ids.as_slice() {
        let Some((cl, dbv, blob)) = read
            .query_row([id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })
            .optional()?
        else {
            continue;
        };
        let (cl, dbv) = (cl as u64, dbv as u64);
        if dbv >= e.dbv || cl % 2 == 0 {
            continue;
        }
        let (cl, clocks, newest) = just_this.read(id, (cl, dbv), &blob, t.slots.len())?;
        write.execute(params![id, cl as i64, newest as i64, clocks.encode(newest)])?;
    }
    delete(conn, e)
}

/// Folds every entry of `t` into its rows: before something that reads or
/// rewrites all of a table's metadata its own way.
pub(crate) fn fold_all(conn: &Connection, cache: &BulkCache, t: &TableInfo) -> Result<()> {
    for e in &cache.overlay(conn, t.id)?.entries {
        fold(conn, t, e)?;
    }
    Ok(())
}

/// Forgets the entries of table `table`: its metadata is gone.
pub(crate) fn forget(conn: &Connection, table: i64) -> Result<()> {
    conn.prepare_cached("DELETE FROM confluo_bulk WHERE tbl = ?1")?
        .execute([table])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The index finds exactly the ids a search of the sorted ids does.
        #[test]
        fn sorted_ids_hold_exactly_their_ids(
            mut ids in prop::collection::vec(
                prop_oneof![0i64..64, 0i64..(1 << 47), Just((1i64 << 47) - 1)],
                0..300,
            ),
            probes in prop::collection::vec(
                prop_oneof![-3i64..70, 0i64..(1 << 47), (1i64 << 47)..(1 << 50)],
                50,
            ),
        ) {
            ids.sort_unstable();
            ids.dedup();
            let index = SortedIds::new(ids.clone());
            for probe in probes.iter().chain(&ids) {
                prop_assert_eq!(index.contains(*probe), ids.binary_search(probe).is_ok(), "{}", probe);
            }
        }
    }
}
