//! Recording local writes: turning the writes the triggers captured in a
//! transaction into metadata rows, right before it commits.

use std::borrow::Cow;
use std::collections::HashMap;

use rusqlite::{params, Connection};

use crate::bulk::{self, BulkCache, BulkWrite, Overlay};

use crate::capture::{lock, Event, EventKind, LOCAL_SITE};
use crate::clocks::{encode_tombstone, encode_uniform, RowClocks, Stamp};
use crate::codec::unpack_values;
use crate::db::Database;
use crate::error::{Error, Result};
use crate::row_ids::{key_order, same_key, MetaRows, RowIds};
use crate::schema::{quote, TableInfo};
use crate::value::Value;

impl Database {
    /// Writes the metadata of every write captured in the open transaction:
    /// one db_version and one clock for the whole transaction.
    pub(crate) fn flush_captured(&self, conn: &Connection) -> Result<()> {
        if lock(&self.inner.state).events.is_empty() {
            return Ok(());
        }
        self.catch_up_counters(conn)?;
        let (events, hlc, dbv) = {
            let mut st = lock(&self.inner.state);
            let events = std::mem::take(&mut st.events);
            (events, st.tx_hlc(), st.db_version())
        };
        let events = sorted_by_row(events, &self.inner.row_ids);
        let stamp = Stamp {
            hlc,
            site: LOCAL_SITE,
            dbv,
        };
        let mut start = 0;
        while start < events.len() {
            let table_id = events[start].1.table;
            let end = start
                + events[start..]
                    .iter()
                    .take_while(|(_, e)| e.table == table_id)
                    .count();
            let table = self
                .all_tables()
                .into_iter()
                .find(|t| t.id == table_id)
                .ok_or_else(|| Error::Sqlite {
                    message: format!("a write was captured for unknown synced table id {table_id}"),
                    code: None,
                })?;
            lock(&self.inner.state).mark_changed(&table.name);
            let bulk = Bulk {
                cache: &self.inner.bulk,
                min_rows: self.inner.options.bulk_update_rows.max(1),
            };
            record_rows(conn, bulk, &table, &events[start..end], stamp)?;
            start = end;
        }
        Ok(())
    }
}

/// The events in (table, row id) order, each with its row's id (see
/// `row_ids`), the writes to one row in the order they were made. The
/// metadata table is in id order, so sorted writes touch each B-tree page
/// once instead of at random. Positions are sorted, not the events
/// themselves, which are several times larger.
fn sorted_by_row(events: Vec<Event>, ids: &RowIds) -> Vec<(i64, Event)> {
    let mut order: Vec<(i64, i64, usize)> = events
        .iter()
        .enumerate()
        .map(|(i, e)| (e.table, ids.id(&e.key), i))
        .collect();
    // By position within an id: as stable as a stable sort, with plain
    // integer comparisons.
    order.sort_unstable();
    // Two keys may share an id (rarely): there, by key, then by position.
    let mut start = 0;
    while start < order.len() {
        let (table, id, _) = order[start];
        let end = start
            + order[start..]
                .iter()
                .take_while(|o| (o.0, o.1) == (table, id))
                .count();
        if end - start > 1 {
            order[start..end].sort_by(|a, b| {
                key_order(events[a.2].key.as_sql(), events[b.2].key.as_sql()).then(a.2.cmp(&b.2))
            });
        }
        start = end;
    }
    let order: Vec<(i64, usize)> = order.into_iter().map(|(_, id, i)| (id, i)).collect();
    let mut taken: Vec<Option<Event>> = events.into_iter().map(Some).collect();
    order
        .into_iter()
        .map(|(id, i)| (id, taken[i].take().expect("each position once")))
        .collect()
}

/// One table's writes in a transaction, by row: `events` split into each
/// row's writes (`rows`), and the rows written alike (`alike`): for each
/// set of columns, the positions in `rows` of the rows only updated in just
/// those, and for none, of the rows only deleted.
struct RowWrites<'e> {
    rows: Vec<&'e [(i64, Event)]>,
    alike: Vec<(Cow<'e, [u64]>, Vec<usize>)>,
}

impl<'e> RowWrites<'e> {
    fn of(events: &'e [(i64, Event)]) -> Self {
        let mut rows = Vec::new();
        let mut alike: Vec<(Cow<'e, [u64]>, Vec<usize>)> = Vec::new();
        let mut index: HashMap<Cow<'e, [u64]>, usize> = HashMap::new();
        // Rows come written alike in runs: the last set of columns is tried
        // before hashing.
        let mut last = 0;
        let mut start = 0;
        while start < events.len() {
            let key = events[start].1.key.as_sql();
            // One row's writes: keys SQLite calls equal (1 and 1.0) are one
            // row, whatever type each write gave it.
            let end = start
                + events[start..]
                    .iter()
                    .take_while(|(_, e)| same_key(e.key.as_sql(), key))
                    .count();
            let group = &events[start..end];
            start = end;
            let shape = match group {
                [(_, e)] if e.kind == EventKind::Deleted && !e.uncertain => {
                    Some(Cow::Borrowed(&[][..]))
                }
                _ => updated_columns(group),
            };
            if let Some(masks) = shape {
                if alike.get(last).is_none_or(|(m, _)| *m != masks) {
                    last = *index.entry(masks.clone()).or_insert_with(|| {
                        alike.push((masks, Vec::new()));
                        alike.len() - 1
                    });
                }
                alike[last].1.push(rows.len());
            }
            rows.push(group);
        }
        RowWrites { rows, alike }
    }
}

/// The union of the columns a row's writes updated, if they are all
/// updates whose effect is known: one transaction stamps every cell alike,
/// so several updates of a row add up to one.
fn updated_columns(group: &[(i64, Event)]) -> Option<Cow<'_, [u64]>> {
    if let [(_, e)] = group {
        // The common case, without a copy.
        return match &e.kind {
            EventKind::Updated(m) if !e.uncertain => Some(Cow::Borrowed(&m[..])),
            _ => None,
        };
    }
    let mut masks: Vec<u64> = Vec::new();
    for (_, e) in group {
        let EventKind::Updated(m) = &e.kind else {
            return None;
        };
        if e.uncertain {
            return None;
        }
        if masks.len() < m.len() {
            masks.resize(m.len(), 0);
        }
        for (w, m) in masks.iter_mut().zip(m.iter()) {
            *w |= m;
        }
    }
    Some(Cow::Owned(masks))
}

/// Where bulk entries are read, and how many rows updated alike make one.
#[derive(Clone, Copy)]
struct Bulk<'a> {
    cache: &'a BulkCache,
    min_rows: usize,
}

/// Records as bulk entries (see `bulk`) the rows written alike in numbers
/// worth one; returns which rows it recorded. A row goes in only if it is
/// alive and its metadata is at its own id, which is what an entry names it
/// by.
fn record_bulk(
    conn: &Connection,
    bulk: Bulk<'_>,
    t: &TableInfo,
    writes: &RowWrites<'_>,
    stamp: Stamp,
) -> Result<Vec<bool>> {
    let mut recorded = vec![false; writes.rows.len()];
    for (masks, rows) in &writes.alike {
        if rows.len() < bulk.min_rows {
            continue;
        }
        let wanted: Vec<(i64, &Value)> = rows
            .iter()
            .map(|&row| {
                let (id, e) = &writes.rows[row][0];
                (*id, &e.key)
            })
            .collect();
        let mut ids: Vec<i64> = Vec::with_capacity(rows.len());
        for (&row, at_home) in rows.iter().zip(alive_at_home(conn, t, &wanted)?) {
            let id = writes.rows[row][0].0;
            // An entry names each row once (only one key is at an id).
            if at_home && ids.last() != Some(&id) {
                ids.push(id);
                recorded[row] = true;
            }
        }
        if ids.len() >= bulk.min_rows {
            // Rows only deleted are keyed by no columns (see `RowWrites`).
            let write = if masks.is_empty() {
                BulkWrite::Deleted
            } else {
                BulkWrite::Updated(masks)
            };
            bulk::record(conn, bulk.cache, t, stamp, write, &ids)?;
        } else {
            for &row in rows {
                recorded[row] = false;
            }
        }
    }
    Ok(recorded)
}

/// For each of `wanted` (ids ascending, each with its key), whether the
/// key's metadata is at that id (its own) and the row is alive. The
/// metadata is walked in id order: a step to the next row costs about a
/// quarter of a seek (670 instructions against 2,800), so the rows between
/// two wanted ones are stepped over when they are few, and the walk starts
/// again at the next wanted id past a longer gap.
fn alive_at_home(conn: &Connection, t: &TableInfo, wanted: &[(i64, &Value)]) -> Result<Vec<bool>> {
    const MAX_STEPS: usize = 4;
    let mut walk = conn.prepare_cached(&format!(
        "SELECT id, pk, cl FROM {} WHERE id >= ?1 ORDER BY id",
        t.meta_table()
    ))?;
    let mut found = Vec::with_capacity(wanted.len());
    while found.len() < wanted.len() {
        let mut rows = walk.query([wanted[found.len()].0])?;
        let mut steps = 0;
        while found.len() < wanted.len() && steps <= MAX_STEPS {
            let Some(r) = rows.next()? else {
                // No metadata past here.
                found.resize(wanted.len(), false);
                break;
            };
            // `get_ref` costs a quarter of `get` here, at every row.
            let id = r.get_ref(0)?.as_i64()?;
            steps += 1;
            while let Some(&(want, key)) = wanted.get(found.len()) {
                if want > id {
                    break;
                }
                // Two keys may share an id: at most one of them is there.
                found.push(
                    want == id
                        && same_key(key.as_sql(), r.get_ref(1)?)
                        && r.get_ref(2)?.as_i64()? % 2 == 1,
                );
                steps = 0;
            }
        }
    }
    Ok(found)
}

/// Records one table's captured writes; `events` are sorted by row, each
/// with its row's id.
fn record_rows(
    conn: &Connection,
    bulk: Bulk<'_>,
    t: &TableInfo,
    events: &[(i64, Event)],
    stamp: Stamp,
) -> Result<()> {
    let overlay = bulk.cache.overlay(conn, t.id)?;
    let writes = RowWrites::of(events);
    let in_bulk = record_bulk(conn, bulk, t, &writes, stamp)?;
    let meta = t.meta_table();
    let slots = t.slots.len();
    let uniform = encode_uniform(stamp.hlc, stamp.site, slots);
    let tombstone = encode_tombstone(stamp.hlc, stamp.site);
    let dbv = stamp.dbv as i64;
    // The common cases write the row at its own id in one statement. They
    // change nothing when another key holds that id; the row is then found
    // by probing, below.
    let mut inserted = conn.prepare_cached(&format!(
        "INSERT INTO {meta}(id, pk, cl, dbv, clocks) VALUES (?1, ?2, 1, ?3, ?4) \
         ON CONFLICT(id) DO UPDATE SET cl = cl + 1 - cl % 2, dbv = excluded.dbv, clocks = excluded.clocks \
         WHERE pk = excluded.pk"
    ))?;
    // A deleted row almost always has metadata already: an UPDATE finds it
    // in one seek (an upsert would first try to insert).
    let mut deleted = conn.prepare_cached(&format!(
        "UPDATE {meta} SET cl = cl + cl % 2, dbv = ?3, clocks = ?4 WHERE id = ?1 AND pk = ?2"
    ))?;
    // Updates change the clocks in place: one statement (and one lookup of
    // the row) instead of a read and a write. SET expressions see the old
    // row, so `confluo_restamp` gets the old cl, dbv and clocks.
    let mut restamp = conn.prepare_cached(&format!(
        "UPDATE {meta} SET cl = cl + 1 - cl % 2, dbv = ?3, \
         clocks = confluo_restamp(cl, dbv, clocks, ?3, ?4, ?5, ?6) WHERE id = ?1 AND pk = ?2"
    ))?;
    let mut rows = MetaRows::new(conn, t)?;
    let hlc = stamp.hlc.0 as i64;
    let slots_arg = slots as i64;

    for (group, _) in writes.rows.iter().zip(&in_bulk).filter(|(_, b)| !**b) {
        let (id, Event { key, .. }) = &group[0];
        if group.iter().any(|(_, e)| e.uncertain) {
            reconcile(conn, t, *id, key, stamp, &mut rows, &overlay)?;
            continue;
        }
        let written = match *group {
            // A row a bulk entry holds is read through it, below.
            _ if overlay.holds(*id) => 0,
            // The common cases need nothing of the old metadata.
            [(
                _,
                Event {
                    kind: EventKind::Inserted,
                    ..
                },
            )] => inserted.execute(params![id, key, dbv, uniform])?,
            [(
                _,
                Event {
                    kind: EventKind::Deleted,
                    ..
                },
            )] => deleted.execute(params![id, key, dbv, tombstone])?,
            _ => match updated_columns(group) {
                // Nothing written when the row has no metadata yet (it is
                // then recorded as a new one, every column written, as
                // `apply_local` does) or another key holds the id.
                Some(masks) => {
                    restamp.execute(params![id, key, dbv, hlc, slots_arg, masks_blob(&masks)])?
                }
                None => 0,
            },
        };
        if written == 0 {
            let at = rows.locate(*id, key)?;
            let (mut cl, mut clocks) = at.clocks(&overlay, slots)?;
            for (_, e) in group.iter() {
                apply_local(&mut cl, &mut clocks, &e.kind, stamp, slots);
            }
            rows.save(&at, key, cl, stamp.dbv, &clocks.encode(stamp.dbv))?;
        }
    }
    Ok(())
}

/// The changed-column masks as `confluo_restamp` takes them: 8 bytes
/// (little-endian) per 62 slots.
fn masks_blob(masks: &[u64]) -> Vec<u8> {
    masks.iter().flat_map(|m| m.to_le_bytes()).collect()
}

/// `confluo_restamp(cl, dbv, clocks, new_dbv, hlc, slots, masks)`: a row's
/// clocks after a local update of the columns in `masks` (see
/// `masks_blob`), stamped with this database's `hlc` at `new_dbv`.
pub(crate) fn restamp_function(ctx: &rusqlite::functions::Context<'_>) -> Result<Vec<u8>> {
    let bad = |what: &str| Error::invalid(format!("confluo_restamp: bad {what}"));
    let cl = u64::try_from(ctx.get::<i64>(0)?).map_err(|_| bad("cl"))?;
    let row_dbv = u64::try_from(ctx.get::<i64>(1)?).map_err(|_| bad("dbv"))?;
    let rusqlite::types::ValueRef::Blob(blob) = ctx.get_raw(2) else {
        return Err(bad("clocks"));
    };
    let dbv = u64::try_from(ctx.get::<i64>(3)?).map_err(|_| bad("db_version"))?;
    let hlc = crate::hlc::Hlc(ctx.get::<i64>(4)? as u64);
    let slots = usize::try_from(ctx.get::<i64>(5)?).map_err(|_| bad("slot count"))?;
    let rusqlite::types::ValueRef::Blob(masks) = ctx.get_raw(6) else {
        return Err(bad("masks"));
    };
    let masks: Vec<u64> = masks
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .collect();
    let stamp = Stamp {
        hlc,
        site: LOCAL_SITE,
        dbv,
    };
    let mut cl = cl;
    let mut clocks = RowClocks::decode(blob, row_dbv)?;
    apply_local(
        &mut cl,
        &mut clocks,
        &EventKind::Updated(masks.into()),
        stamp,
        slots,
    );
    Ok(clocks.encode(dbv))
}

/// Records a row that a failed statement touched, from what the table holds
/// now: the write may have stayed (`OR FAIL`) or been undone. A row that
/// exists is recorded as written in full (at worst a rewrite of the same
/// values); one that does not, as deleted if it was alive.
fn reconcile(
    conn: &Connection,
    t: &TableInfo,
    id: i64,
    key: &Value,
    stamp: Stamp,
    rows: &mut MetaRows<'_>,
    overlay: &Overlay,
) -> Result<()> {
    let slots = t.slots.len();
    let pk: Vec<Value> = match (t.pk.len(), key) {
        (1, v) => vec![v.clone()],
        (_, Value::Blob(b)) => unpack_values(b)?,
        _ => return Err(Error::invalid("a composite key that is not packed")),
    };
    let exists: bool = conn
        .prepare_cached(&format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE {})",
            quote(&t.name),
            t.key_where(1)
        ))?
        .query_row(rusqlite::params_from_iter(pk.iter()), |r| r.get(0))?;
    let at = rows.locate(id, key)?;
    let (mut cl, mut clocks) = at.clocks(overlay, slots)?;
    let alive = cl % 2 == 1;
    match (exists, alive) {
        (true, _) => apply_local(&mut cl, &mut clocks, &EventKind::Inserted, stamp, slots),
        (false, true) => apply_local(&mut cl, &mut clocks, &EventKind::Deleted, stamp, slots),
        (false, false) => return Ok(()),
    }
    rows.save(&at, key, cl, stamp.dbv, &clocks.encode(stamp.dbv))
}

/// A live row's update of the columns in `masks` (62 slots per word).
pub(crate) fn stamp_columns(clocks: &mut RowClocks, masks: &[u64], stamp: Stamp, slots: usize) {
    clocks.cells.resize(slots, None);
    for (word, &mask) in masks.iter().enumerate() {
        // Only the set bits: an update mostly changes a column or two.
        let mut rest = mask & ((1 << 62) - 1);
        while rest != 0 {
            let slot = word * 62 + rest.trailing_zeros() as usize;
            rest &= rest - 1;
            if slot < slots {
                clocks.cells[slot] = Some(stamp);
            }
        }
    }
}

/// One local write's effect on a row's causal length and clocks.
pub(crate) fn apply_local(
    cl: &mut u64,
    clocks: &mut RowClocks,
    kind: &EventKind,
    stamp: Stamp,
    slots: usize,
) {
    let alive = *cl % 2 == 1;
    let rewrite_all = |cl: &mut u64, clocks: &mut RowClocks| {
        // A new row, or a deleted key inserted again: every column anew.
        if !alive {
            *cl += 1;
        }
        *clocks = RowClocks {
            marker: Some(stamp),
            cells: vec![Some(stamp); slots],
        };
    };
    match kind {
        EventKind::Inserted => rewrite_all(cl, clocks),
        EventKind::Updated(_) if !alive => rewrite_all(cl, clocks),
        EventKind::Updated(masks) => stamp_columns(clocks, masks, stamp, slots),
        EventKind::Deleted => {
            if alive || *cl == 0 {
                *cl += if *cl == 0 { 2 } else { 1 };
            }
            *clocks = RowClocks {
                marker: Some(stamp),
                cells: Vec::new(),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;

    #[test]
    fn local_writes_move_the_causal_length() {
        let stamp = Stamp {
            hlc: Hlc(9),
            site: 0,
            dbv: 3,
        };
        let (mut cl, mut clocks) = (0, RowClocks::default());
        apply_local(&mut cl, &mut clocks, &EventKind::Inserted, stamp, 2);
        assert_eq!(cl, 1);
        apply_local(&mut cl, &mut clocks, &EventKind::Deleted, stamp, 2);
        assert_eq!((cl, clocks.cells.len()), (2, 0));
        apply_local(&mut cl, &mut clocks, &EventKind::Inserted, stamp, 2);
        assert_eq!((cl, clocks.cells.len()), (3, 2));
        // An insert over a live row (INSERT OR REPLACE) keeps the row's life.
        apply_local(&mut cl, &mut clocks, &EventKind::Inserted, stamp, 2);
        assert_eq!(cl, 3);
        let (mut cl, mut clocks) = (0, RowClocks::default());
        apply_local(&mut cl, &mut clocks, &EventKind::Deleted, stamp, 2);
        assert_eq!(cl, 2);
    }

    #[test]
    fn updates_stamp_only_the_changed_columns() {
        let old = Stamp {
            hlc: Hlc(1),
            site: 0,
            dbv: 1,
        };
        let new = Stamp {
            hlc: Hlc(2),
            site: 0,
            dbv: 2,
        };
        let (mut cl, mut clocks) = (
            1,
            RowClocks {
                marker: Some(old),
                cells: vec![Some(old); 3],
            },
        );
        apply_local(
            &mut cl,
            &mut clocks,
            &EventKind::Updated(vec![0b100].into()),
            new,
            3,
        );
        assert_eq!(clocks.cells, vec![Some(old), Some(old), Some(new)]);
        assert_eq!(clocks.marker, Some(old));
    }

    #[test]
    fn events_are_ordered_by_row_and_one_row_keeps_its_order() {
        let event = |table: i64, key: Value, kind: EventKind| Event {
            table,
            key,
            kind,
            uncertain: false,
        };
        let events = vec![
            event(2, Value::Integer(1), EventKind::Inserted),
            event(1, Value::Text("b".into()), EventKind::Deleted),
            event(1, Value::Integer(7), EventKind::Inserted),
            event(1, Value::Text("b".into()), EventKind::Inserted),
            event(1, Value::Real(2.5), EventKind::Updated(vec![1].into())),
            event(
                1,
                Value::Text("b".into()),
                EventKind::Updated(vec![2].into()),
            ),
        ];
        let ids = RowIds::fixed();
        let sorted = sorted_by_row(events.clone(), &ids);
        // Every event once, each with its key's id.
        assert_eq!(sorted.len(), events.len());
        for (id, e) in &sorted {
            assert_eq!(*id, ids.id(&e.key));
        }
        // By table, then by id: the metadata table's order.
        let order: Vec<(i64, i64)> = sorted.iter().map(|(id, e)| (e.table, *id)).collect();
        assert!(order.is_sorted(), "{order:?}");
        // One row's writes together, in the order they were made.
        let b_writes: Vec<(usize, &EventKind)> = sorted
            .iter()
            .enumerate()
            .filter(|(_, (_, e))| e.key == Value::Text("b".into()))
            .map(|(i, (_, e))| (i, &e.kind))
            .collect();
        let first = b_writes[0].0;
        assert_eq!(
            b_writes,
            vec![
                (first, &EventKind::Deleted),
                (first + 1, &EventKind::Inserted),
                (first + 2, &EventKind::Updated(vec![2].into())),
            ]
        );
    }
}
