//! Property test: random replicas, random local writes and random exchanges
//! always converge, to exactly what an independent model of the merge rules
//! predicts.
//!
//! The model here does not call the engine's merge code: it keeps, for each
//! replica, every change that replica made or received, and folds them with
//! the rules of the design (highest causal length wins; within it, each cell
//! keeps the largest (hlc, site)). From the engine it only takes what a real
//! peer would see: each transaction's clock, site ids, and the contents of
//! the change sets exchanged.
//!
//! Cases: 1,000 by default; `CONFLUO_PROPTEST_CASES` raises it for soak runs.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use confluo_core::{ChangeSet, Database, ManualTimeSource, Options, Value};
use proptest::prelude::*;

const KEYS: &[&str] = &["k0", "k1", "k2", "k3", "k4"];
const COLUMNS: [&str; 2] = ["title", "status"];
const VALUES: &[Option<&str>] = &[Some("a"), Some("b"), Some("c"), None];

#[derive(Clone, Debug)]
enum LocalOp {
    Insert {
        key: usize,
        title: usize,
        status: usize,
    },
    Update {
        key: usize,
        column: usize,
        value: usize,
    },
    Delete {
        key: usize,
    },
    ChangeKey {
        from: usize,
        to: usize,
    },
    /// One statement that sets a column of every row.
    UpdateAll {
        column: usize,
        value: usize,
    },
    /// One statement that deletes every row but one.
    DeleteAllBut {
        key: usize,
    },
}

#[derive(Clone, Debug)]
enum Op {
    /// One local transaction of one or more statements.
    Write {
        replica: usize,
        ops: Vec<LocalOp>,
    },
    /// `to` asks `from` for what it misses.
    Pull {
        from: usize,
        to: usize,
    },
    /// `from` sends its whole history (a resend of everything).
    Resend {
        from: usize,
        to: usize,
    },
    /// An old change set, delivered again, late, possibly to someone else.
    Replay {
        set: usize,
        to: usize,
    },
    Tick {
        ms: u64,
    },
}

fn local_op() -> impl Strategy<Value = LocalOp> {
    let k = 0..KEYS.len();
    let v = 0..VALUES.len();
    prop_oneof![
        3 => (k.clone(), v.clone(), v.clone()).prop_map(|(key, title, status)| LocalOp::Insert { key, title, status }),
        4 => (k.clone(), 0..2usize, v).prop_map(|(key, column, value)| LocalOp::Update { key, column, value }),
        2 => k.clone().prop_map(|key| LocalOp::Delete { key }),
        1 => (k.clone(), k).prop_map(|(from, to)| LocalOp::ChangeKey { from, to }),
        2 => (0..2usize, 0..VALUES.len()).prop_map(|(column, value)| LocalOp::UpdateAll { column, value }),
        1 => (0..KEYS.len()).prop_map(|key| LocalOp::DeleteAllBut { key }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let r = 0..5usize;
    prop_oneof![
        6 => (r.clone(), prop::collection::vec(local_op(), 1..4)).prop_map(|(replica, ops)| Op::Write { replica, ops }),
        4 => (r.clone(), r.clone()).prop_map(|(from, to)| Op::Pull { from, to }),
        1 => (r.clone(), r.clone()).prop_map(|(from, to)| Op::Resend { from, to }),
        1 => (0..64usize, r).prop_map(|(set, to)| Op::Replay { set, to }),
        2 => (0..3u64).prop_map(|ms| Op::Tick { ms }),
    ]
}

/// A change as the model sees it.
#[derive(Clone, Debug)]
struct M {
    key: String,
    column: Option<usize>,
    value: Option<String>,
    hlc: u64,
    site: [u8; 16],
    cl: u64,
}

/// A cell's winner: (hlc, site, value).
type MCell = (u64, [u8; 16], Option<String>);

#[derive(Default, Clone, Debug)]
struct MRow {
    cl: u64,
    cells: [Option<MCell>; 2],
}

/// The merge rules, folded over a list of changes. On equal (hlc, site) the
/// later change in the list wins: that only happens for one transaction
/// writing a cell twice, where the last write is the one that stays.
fn fold(changes: &[M]) -> BTreeMap<String, MRow> {
    let mut rows: BTreeMap<String, MRow> = BTreeMap::new();
    for c in changes {
        let row = rows.entry(c.key.clone()).or_default();
        if c.cl < row.cl {
            continue;
        }
        if c.cl > row.cl {
            *row = MRow {
                cl: c.cl,
                ..MRow::default()
            };
        }
        if let (Some(col), true) = (c.column, c.cl % 2 == 1) {
            let cell = &mut row.cells[col];
            if cell
                .as_ref()
                .is_none_or(|(h, s, _)| (c.hlc, c.site) >= (*h, *s))
            {
                *cell = Some((c.hlc, c.site, c.value.clone()));
            }
        }
    }
    rows
}

/// A folded state's causal lengths and the clocks of live rows' cells.
fn stamps(rows: &BTreeMap<String, MRow>) -> Vec<(String, u64, Vec<Option<MCell>>)> {
    rows.iter()
        .map(|(k, r)| {
            let cells = if r.cl % 2 == 1 {
                r.cells.to_vec()
            } else {
                Vec::new()
            };
            (k.clone(), r.cl, cells)
        })
        .collect()
}

/// The table a folded state shows: live rows, absent cells NULL.
fn view(rows: &BTreeMap<String, MRow>) -> Vec<Vec<Value>> {
    rows.iter()
        .filter(|(_, r)| r.cl % 2 == 1)
        .map(|(k, r)| {
            let mut out = vec![text(k)];
            for cell in &r.cells {
                out.push(
                    cell.as_ref()
                        .and_then(|(_, _, v)| v.as_deref())
                        .map_or(Value::Null, text),
                );
            }
            out
        })
        .collect()
}

struct Replica {
    db: Database,
    site: [u8; 16],
    knows: Vec<M>,
}

fn from_changeset(cs: &ChangeSet) -> Vec<M> {
    cs.changes
        .iter()
        .map(|c| M {
            key: c.pk[0].as_str().expect("text key").to_owned(),
            column: c
                .column
                .as_deref()
                .map(|n| COLUMNS.iter().position(|c| *c == n).expect("known column")),
            value: match &c.value {
                Value::Text(s) => Some(s.clone()),
                Value::Null => None,
                other => panic!("unexpected value {other:?}"),
            },
            hlc: c.hlc.0,
            site: *c.site.as_bytes(),
            cl: c.cl,
        })
        .collect()
}

/// Runs one local transaction on the engine and mirrors it in the model.
/// Returns the changes the model says it made (for the global history).
fn write(r: &mut Replica, ops: &[LocalOp]) -> Vec<M> {
    let placeholder = u64::MAX;
    let mut made = Vec::new();
    let tx = r.db.transaction().unwrap();
    for op in ops {
        let state = fold(&r.knows);
        let alive = |k: &str| state.get(k).is_some_and(|row| row.cl % 2 == 1);
        let cl_of = |k: &str| state.get(k).map_or(0, |row| row.cl);
        let value = |v: usize| VALUES[v].map(str::to_owned);
        let sql_value = |v: &Option<String>| v.as_deref().map_or(Value::Null, text);
        let mut emit = |key: &str, column: Option<usize>, value: Option<String>, cl: u64| {
            let m = M {
                key: key.to_owned(),
                column,
                value,
                hlc: placeholder,
                site: r.site,
                cl,
            };
            r.knows.push(m.clone());
            made.push(m);
        };
        match *op {
            LocalOp::Insert { key, title, status } => {
                let k = KEYS[key];
                if alive(k) {
                    continue;
                }
                let (t, s) = (value(title), value(status));
                tx.execute(
                    "INSERT INTO todo VALUES (?1, ?2, ?3)",
                    &[text(k), sql_value(&t), sql_value(&s)],
                )
                .unwrap();
                let cl = cl_of(k) + 1;
                emit(k, None, None, cl);
                emit(k, Some(0), t, cl);
                emit(k, Some(1), s, cl);
            }
            LocalOp::Update {
                key,
                column,
                value: v,
            } => {
                let k = KEYS[key];
                if !alive(k) {
                    continue;
                }
                let new = value(v);
                tx.execute(
                    &format!("UPDATE todo SET {} = ?1 WHERE id = ?2", COLUMNS[column]),
                    &[sql_value(&new), text(k)],
                )
                .unwrap();
                let old = state[k].cells[column].as_ref().and_then(|c| c.2.clone());
                if old != new {
                    emit(k, Some(column), new, cl_of(k));
                }
            }
            LocalOp::Delete { key } => {
                let k = KEYS[key];
                if !alive(k) {
                    continue;
                }
                tx.execute("DELETE FROM todo WHERE id = ?1", &[text(k)])
                    .unwrap();
                emit(k, None, None, cl_of(k) + 1);
            }
            LocalOp::UpdateAll { column, value: v } => {
                let new = value(v);
                tx.execute(
                    &format!("UPDATE todo SET {} = ?1", COLUMNS[column]),
                    &[sql_value(&new)],
                )
                .unwrap();
                for (k, row) in state.iter().filter(|(_, row)| row.cl % 2 == 1) {
                    if row.cells[column].as_ref().and_then(|c| c.2.clone()) != new {
                        emit(k, Some(column), new.clone(), row.cl);
                    }
                }
            }
            LocalOp::DeleteAllBut { key } => {
                tx.execute("DELETE FROM todo WHERE id <> ?1", &[text(KEYS[key])])
                    .unwrap();
                for (k, row) in state.iter().filter(|(_, row)| row.cl % 2 == 1) {
                    if k != KEYS[key] {
                        emit(k, None, None, row.cl + 1);
                    }
                }
            }
            LocalOp::ChangeKey { from, to } => {
                let (f, t) = (KEYS[from], KEYS[to]);
                if !alive(f) || alive(t) {
                    continue;
                }
                tx.execute("UPDATE todo SET id = ?1 WHERE id = ?2", &[text(t), text(f)])
                    .unwrap();
                let cells = state[f].cells.clone();
                emit(f, None, None, cl_of(f) + 1);
                let cl = cl_of(t) + 1;
                emit(t, None, None, cl);
                for (i, cell) in cells.iter().enumerate() {
                    emit(t, Some(i), cell.as_ref().and_then(|c| c.2.clone()), cl);
                }
            }
        }
    }
    tx.commit().unwrap();
    // Every write of a transaction carries the transaction's clock.
    let hlc = r.db.current_hlc().0;
    for m in r.knows.iter_mut().filter(|m| m.hlc == placeholder) {
        m.hlc = hlc;
    }
    made.iter_mut().for_each(|m| m.hlc = hlc);
    made
}

fn deliver(to: &mut Replica, cs: &ChangeSet) {
    let cs = ChangeSet::decode(&cs.encode()).unwrap();
    to.db.apply(&cs).unwrap();
    to.knows.extend(from_changeset(&cs));
}

fn run(replica_count: usize, ops: &[Op]) -> Result<(), TestCaseError> {
    let clock: Arc<ManualTimeSource> = common::clock();
    let mut replicas: Vec<Replica> = (0..replica_count)
        .map(|i| {
            // Bulk entries for any update, for updates of two rows or
            // more (so rows in entries get updated one by one too), and
            // none.
            let db = todo_replica_with(Options {
                time: clock.clone(),
                bulk_update_rows: [1, 2, 1024][i % 3],
                ..Options::default()
            });
            let site = *db.site_id().as_bytes();
            Replica {
                db,
                site,
                knows: Vec::new(),
            }
        })
        .collect();
    let mut history: Vec<M> = Vec::new();
    let mut sent: Vec<ChangeSet> = Vec::new();
    let pull = |replicas: &mut Vec<Replica>,
                sent: &mut Vec<ChangeSet>,
                from: usize,
                to: usize,
                resend: bool| {
        if from == to {
            return;
        }
        let (f, t) = (&replicas[from].db, &replicas[to].db);
        let cs = if resend {
            f.changes_since(0, None).unwrap()
        } else {
            f.changes_for_peer(t.site_id(), t.seen_version(f.site_id()).unwrap())
                .unwrap()
        };
        deliver(&mut replicas[to], &cs);
        sent.push(cs);
    };
    for op in ops {
        match op {
            Op::Write { replica, ops } => {
                let r = &mut replicas[replica % replica_count];
                history.extend(write(r, ops));
            }
            Op::Pull { from, to } => pull(
                &mut replicas,
                &mut sent,
                from % replica_count,
                to % replica_count,
                false,
            ),
            Op::Resend { from, to } => pull(
                &mut replicas,
                &mut sent,
                from % replica_count,
                to % replica_count,
                true,
            ),
            Op::Replay { set, to } => {
                if !sent.is_empty() {
                    let cs = sent[set % sent.len()].clone();
                    deliver(&mut replicas[to % replica_count], &cs);
                }
            }
            Op::Tick { ms } => clock.advance(*ms),
        }
    }
    // Each replica shows exactly what it knows.
    for (i, r) in replicas.iter().enumerate() {
        prop_assert_eq!(
            dump(&r.db, "todo"),
            view(&fold(&r.knows)),
            "replica {} before the final exchange",
            i
        );
    }
    // A final full exchange through replica 0 ...
    for i in 1..replica_count {
        pull(&mut replicas, &mut sent, i, 0, false);
    }
    for i in 1..replica_count {
        pull(&mut replicas, &mut sent, 0, i, false);
    }
    // ... leaves every replica identical, and equal to the merge of every
    // write anyone made.
    let merged = fold(&history);
    let expected = view(&merged);
    for (i, r) in replicas.iter().enumerate() {
        prop_assert_eq!(
            dump(&r.db, "todo"),
            expected.clone(),
            "replica {} after the final exchange",
            i
        );
        // Its metadata too: every row's causal length and every cell's
        // clock, as its full export tells them.
        let exported = fold(&from_changeset(&r.db.changes_since(0, None).unwrap()));
        prop_assert_eq!(
            stamps(&exported),
            stamps(&merged),
            "replica {} metadata after the final exchange",
            i
        );
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("CONFLUO_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge_to_the_model(
        replica_count in 3..=5usize,
        ops in prop::collection::vec(op(), 1..40),
    ) {
        run(replica_count, &ops)?;
    }
}
