//! One test-suite, two stores: every case runs against the embedded SQLite
//! store and against the PostgreSQL store (on a throwaway PostgreSQL the
//! suite starts itself, see `support/postgres.rs`).

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use confluo_core::{Change, ChangeSet, Hlc, SiteId, Value};
use confluo_server::store::{PushOutcome, Resume, StoreError};
use confluo_server::{PgOptions, PgStore, SqliteStore, Store};

/// A store of one backend, and whatever must live as long as it.
struct Fixture {
    store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
}

fn sqlite(staging_cap: Option<usize>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut store = SqliteStore::open(&dir.path().join("server.db")).unwrap();
    if let Some(cap) = staging_cap {
        store = store.with_staging_cap(cap);
    }
    Fixture {
        store: Arc::new(store),
        _dir: Some(dir),
    }
}

fn postgres(staging_cap: Option<usize>) -> Fixture {
    let mut store = PgStore::connect(&support::postgres::database(), PgOptions::default()).unwrap();
    if let Some(cap) = staging_cap {
        store = store.with_staging_cap(cap);
    }
    Fixture {
        store: Arc::new(store),
        _dir: None,
    }
}

/// Runs each case once per backend: `sqlite::case` and `postgres::case`.
macro_rules! both_stores {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $case() { super::$case(super::sqlite); })*
        }
        mod postgres {
            $(#[test] fn $case() { super::$case(super::postgres); })*
        }
    };
}

both_stores!(
    a_sliced_version_delivers_rows_that_moved_on_between_slices,
    a_page_carries_every_cell_of_its_versions_even_in_rows_that_moved_on,
    staged_parts_belong_to_their_space_and_a_resent_part_replaces_its_first_copy,
    spaces_get_an_epoch_when_created,
    the_newest_write_of_each_column_wins_whatever_the_order_of_pushes,
    a_push_with_nothing_new_keeps_the_version_and_its_tag,
    a_push_that_contradicts_a_tables_key_shape_changes_nothing,
    concurrent_pushes_to_one_space_get_contiguous_versions,
    a_device_does_not_get_its_own_changes_back,
    cursors_and_resume_tokens_that_do_not_belong_are_refused,
    a_delete_and_a_later_revival_travel_as_causal_lengths,
    pages_stay_near_their_budget_when_a_large_version_follows_a_small_one,
);

type Make = fn(Option<usize>) -> Fixture;

const DEVICE: [u8; 16] = [7; 16];

fn change(pk: &str, column: Option<&str>, hlc: u64) -> Change {
    Change {
        table: Arc::from("t"),
        pk: vec![Value::Text(pk.into())].into(),
        column: column.map(Arc::from),
        value: if column.is_some() {
            Value::Text(format!("{pk}-{hlc}"))
        } else {
            Value::Null
        },
        hlc: Hlc(hlc),
        site: SiteId::from_bytes(DEVICE),
        cl: 1,
        db_version: 1,
        seq: 0,
    }
}

fn encode(changes: Vec<Change>) -> Vec<u8> {
    ChangeSet {
        source: SiteId::from_bytes(DEVICE),
        recipient: None,
        since: 0,
        until: 1,
        changes,
    }
    .encode()
}

fn push(store: &dyn Store, changes: Vec<Change>) -> PushOutcome {
    store.push("s", &[encode(changes)]).unwrap()
}

/// Pulls everything after `cursor` page by page, as a device does.
fn pull_all(store: &dyn Store, cursor: u64, budget: usize) -> (Vec<Change>, u64) {
    let (mut got, mut cursor, mut resume) = (Vec::new(), cursor, None::<Resume>);
    loop {
        let page = store
            .pull("s", cursor, resume.as_ref(), None, budget)
            .unwrap();
        got.extend(page.changes);
        resume = page.resume;
        if resume.is_none() {
            cursor = page.until;
        }
        if !page.more {
            return (got, cursor);
        }
    }
}

/// The newest value of every cell, by (row, column).
fn cells(changes: &[Change]) -> BTreeMap<(String, Option<String>), (u64, Value)> {
    let mut out = BTreeMap::new();
    for c in changes {
        let Value::Text(pk) = &c.pk[0] else {
            panic!("text keys only")
        };
        let key = (pk.clone(), c.column.as_deref().map(str::to_owned));
        let newer = out
            .get(&key)
            .is_none_or(|(hlc, _): &(u64, Value)| c.hlc.0 > *hlc);
        if newer {
            out.insert(key, (c.hlc.0, c.value.clone()));
        }
    }
    out
}

fn a_sliced_version_delivers_rows_that_moved_on_between_slices(make: Make) {
    let f = make(None);
    let store = &*f.store;
    let mut v1 = Vec::new();
    for r in ["r1", "r2", "r3"] {
        v1.extend([
            change(r, None, 10),
            change(r, Some("a"), 10),
            change(r, Some("b"), 10),
        ]);
    }
    assert_eq!(push(store, v1).version, 1);
    // A budget so small the first page holds one row of version 1.
    let first = store.pull("s", 0, None, None, 1).unwrap();
    let resume = first.resume.clone().expect("version 1 was cut");
    assert_eq!((first.until, first.changes.len()), (0, 3));
    // Meanwhile r3.a moves on to version 2.
    assert_eq!(push(store, vec![change("r3", Some("a"), 20)]).version, 2);
    let mut got = first.changes;
    let mut resume = Some(resume);
    let mut until = 0;
    while let Some(r) = resume {
        let page = store.pull("s", 0, Some(&r), None, 1).unwrap();
        got.extend(page.changes);
        resume = page.resume;
        until = page.until;
    }
    assert_eq!(until, 1);
    // Every cell of version 1 arrived (r3.a in its newer form is fine).
    for r in ["r1", "r2", "r3"] {
        for col in [None, Some("b")] {
            assert!(
                got.iter()
                    .any(|c| c.pk[0] == Value::Text(r.into()) && c.column.as_deref() == col),
                "{r} {col:?} missing"
            );
        }
    }
    // And the next pull brings version 2.
    let next = store.pull("s", 1, None, None, 1 << 20).unwrap();
    assert_eq!(next.until, 2);
    assert!(next.changes.iter().any(|c| c.hlc == Hlc(20)));
}

fn pages_stay_near_their_budget_when_a_large_version_follows_a_small_one(make: Make) {
    let f = make(None);
    let store = &*f.store;
    let rows = |prefix: &str, n: usize| -> Vec<Change> {
        (0..n)
            .flat_map(|i| {
                let r = format!("{prefix}{i:03}");
                [change(&r, None, 10), change(&r, Some("a"), 10)]
            })
            .collect()
    };
    assert_eq!(push(store, rows("small", 2)).version, 1);
    assert_eq!(push(store, rows("large", 300)).version, 2);
    // A budget of some tens of changes: version 1 fits, version 2 does not.
    let budget = 10 * (rows("x", 1).iter().map(change_bytes).sum::<usize>());
    let first = store.pull("s", 0, None, None, budget).unwrap();
    assert_eq!(first.until, 1, "the page ends after the whole version 1");
    assert_eq!(first.changes.len(), 4, "and holds nothing of version 2");
    assert!(first.more);
    // Every later page stays near the budget, and all of version 2 arrives.
    let (mut cursor, mut resume, mut got) = (1, None::<Resume>, 0);
    loop {
        let page = store
            .pull("s", cursor, resume.as_ref(), None, budget)
            .unwrap();
        assert!(page.changes.len() <= 60, "{} changes", page.changes.len());
        got += page.changes.len();
        resume = page.resume;
        if resume.is_none() {
            cursor = page.until;
        }
        if !page.more {
            break;
        }
    }
    assert_eq!((got, cursor), (600, 2));
}

/// About what a change costs in a page's budget.
fn change_bytes(c: &Change) -> usize {
    encode(vec![c.clone()]).len()
}

fn a_page_carries_every_cell_of_its_versions_even_in_rows_that_moved_on(make: Make) {
    let f = make(None);
    let store = &*f.store;
    let filler = |prefix: &str| -> Vec<Change> {
        (0..10)
            .flat_map(|i| {
                let pk = format!("{prefix}{i}");
                [change(&pk, None, 10), change(&pk, Some("a"), 10)]
            })
            .collect()
    };
    // Version 1: row r in full, with other rows; version 2: other rows;
    // version 3: r's title alone.
    let mut v1 = vec![
        change("r", None, 10),
        change("r", Some("title"), 10),
        change("r", Some("note"), 10),
    ];
    v1.extend(filler("f"));
    push(store, v1);
    push(store, filler("g"));
    assert_eq!(push(store, vec![change("r", Some("title"), 30)]).version, 3);
    // Pages small enough to end between versions 2 and 3.
    for budget in [1, 100, 300, 600, 1 << 20] {
        let (got, until) = pull_all(store, 0, budget);
        assert_eq!(until, 3);
        let r: Vec<_> = got
            .iter()
            .filter(|c| c.pk[0] == Value::Text("r".into()))
            .map(|c| (c.column.as_deref().map(str::to_owned), c.hlc.0))
            .collect();
        for cell in [
            (None, 10),
            (Some("note".to_owned()), 10),
            (Some("title".to_owned()), 30),
        ] {
            assert!(
                r.contains(&cell),
                "budget {budget}: {cell:?} missing from {r:?}"
            );
        }
    }
}

fn staged_parts_belong_to_their_space_and_a_resent_part_replaces_its_first_copy(make: Make) {
    let f = make(Some(250));
    let store = &*f.store;
    let (x, y) = (SiteId::from_bytes([1; 16]), SiteId::from_bytes([2; 16]));
    store.stage("a", x, "p", 1, &[1; 100]).unwrap();
    store.stage("a", x, "p", 2, &[2; 100]).unwrap();
    // The retry of a push whose answer was lost sends its parts again.
    store.stage("a", x, "p", 1, &[1; 100]).unwrap();
    store.stage("a", x, "p", 2, &[2; 100]).unwrap();
    let err = store.stage("a", y, "q", 1, &[3; 100]).unwrap_err();
    assert!(err.to_string().contains("unfinished pushes"), "{err}");
    // Another space's push of the same id is its own.
    store.stage("b", x, "p", 1, &[9; 10]).unwrap();
    store.stage("a", x, "p", 3, &[3; 10]).unwrap();
    assert_eq!(
        store.take_staged("a", "p", 3).unwrap(),
        Some(vec![vec![1; 100], vec![2; 100]]),
        "parts 1 and 2 of a 3-part push; a stray part 3 is not one of them"
    );
    assert_eq!(store.take_staged("a", "p", 3).unwrap(), None, "taken once");
    assert_eq!(
        store.take_staged("b", "p", 3).unwrap(),
        None,
        "part 2 missing"
    );
    assert_eq!(store.take_staged("b", "p", 2).unwrap(), None, "forgotten");
    // A device's new push drops the parts of its unfinished one.
    store.stage("a", x, "p", 1, &[1; 100]).unwrap();
    store.stage("a", x, "r", 1, &[4; 100]).unwrap();
    store.stage("a", y, "q", 1, &[3; 100]).unwrap();
    assert_eq!(store.take_staged("a", "p", 2).unwrap(), None);
    assert_eq!(
        store.take_staged("a", "r", 2).unwrap(),
        Some(vec![vec![4; 100]])
    );
}

fn spaces_get_an_epoch_when_created(make: Make) {
    let f = make(None);
    let store = &*f.store;
    assert_eq!(store.space("s").unwrap(), None);
    push(store, vec![change("r1", None, 10)]);
    let state = store.space("s").unwrap().unwrap();
    assert_eq!(state.version, 1);
    assert_eq!(state.epoch.len(), 36);
    let other = make(None);
    push(&*other.store, vec![change("r1", None, 10)]);
    assert_ne!(other.store.space("s").unwrap().unwrap().epoch, state.epoch);
}

fn the_newest_write_of_each_column_wins_whatever_the_order_of_pushes(make: Make) {
    let f = make(None);
    let store = &*f.store;
    let first = push(
        store,
        vec![
            change("r", None, 10),
            change("r", Some("a"), 30),
            change("r", Some("b"), 10),
        ],
    );
    assert_eq!((first.version, first.applied, first.stale), (1, 3, 0));
    // An older write of a and a newer one of b, in one push.
    let second = push(
        store,
        vec![change("r", Some("a"), 20), change("r", Some("b"), 40)],
    );
    assert_eq!((second.version, second.applied, second.stale), (2, 1, 1));
    let (got, until) = pull_all(store, 0, 1 << 20);
    assert_eq!(until, 2);
    let got = cells(&got);
    assert_eq!(got[&("r".into(), Some("a".into()))].0, 30);
    assert_eq!(got[&("r".into(), Some("b".into()))].0, 40);
    // The same row merged twice in one push: the later change wins once.
    let third = store
        .push(
            "s",
            &[
                encode(vec![change("r", Some("a"), 50)]),
                encode(vec![change("r", Some("a"), 60)]),
            ],
        )
        .unwrap();
    assert_eq!((third.version, third.applied), (3, 2));
    let (got, _) = pull_all(store, 2, 1 << 20);
    assert_eq!(
        got.iter().map(|c| c.hlc.0).collect::<Vec<_>>(),
        [60],
        "only the winner is stored: {got:?}"
    );
}

fn a_push_with_nothing_new_keeps_the_version_and_its_tag(make: Make) {
    let f = make(None);
    let store = &*f.store;
    let first = push(
        store,
        vec![change("r", None, 10), change("r", Some("a"), 10)],
    );
    let tag = first.tag.clone().expect("a version has a tag");
    assert_eq!(store.version_tag("s", 1).unwrap().as_deref(), Some(&*tag));
    let again = push(store, vec![change("r", Some("a"), 10)]);
    assert_eq!((again.version, again.applied, again.stale), (1, 0, 1));
    assert_eq!(again.tag, Some(tag));
    assert_eq!(store.space("s").unwrap().unwrap().version, 1);
    assert_eq!(store.version_tag("s", 2).unwrap(), None);
    assert_eq!(store.version_tag("nowhere", 1).unwrap(), None);
}

fn a_push_that_contradicts_a_tables_key_shape_changes_nothing(make: Make) {
    let f = make(None);
    let store = &*f.store;
    push(store, vec![change("r", None, 10)]);
    let mut two_values = change("q", None, 20);
    two_values.pk = vec![Value::Text("q".into()), Value::Integer(1)].into();
    // The contradiction is in the second part: the first is not kept.
    let err = store
        .push(
            "s",
            &[
                encode(vec![change("fine", None, 20)]),
                encode(vec![two_values]),
            ],
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::BadInput(_)), "{err:?}");
    assert!(err.to_string().contains("keys of 1 value"), "{err}");
    assert_eq!(store.space("s").unwrap().unwrap().version, 1);
    let (got, _) = pull_all(store, 0, 1 << 20);
    assert!(
        got.iter().all(|c| c.pk[0] != Value::Text("fine".into())),
        "{got:?}"
    );
    // A table's shape is per space.
    let mut other = change("q", None, 20);
    other.pk = vec![Value::Text("q".into()), Value::Integer(1)].into();
    store.push("elsewhere", &[encode(vec![other])]).unwrap();
}

fn concurrent_pushes_to_one_space_get_contiguous_versions(make: Make) {
    let f = make(None);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let store = f.store.clone();
            std::thread::spawn(move || {
                (0..15)
                    .map(|i| {
                        let pk = format!("t{t}-{i}");
                        let outcome = push(
                            &*store,
                            vec![change(&pk, None, 10), change(&pk, Some("a"), 10)],
                        );
                        (outcome.version, outcome.tag.unwrap())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut versions: Vec<(u64, String)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    versions.sort();
    assert_eq!(
        versions.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
        (1..=60).collect::<Vec<_>>(),
        "each push its own version, none skipped"
    );
    for (v, tag) in &versions {
        assert_eq!(f.store.version_tag("s", *v).unwrap().as_ref(), Some(tag));
    }
    // Version by version, each page brings exactly one push's row.
    for v in 1..=60 {
        let page = f.store.pull("s", v - 1, None, None, 1).unwrap();
        assert_eq!(page.until, v);
        assert_eq!(page.changes.len(), 2, "version {v}: {:?}", page.changes);
    }
}

fn a_device_does_not_get_its_own_changes_back(make: Make) {
    let f = make(None);
    let store = &*f.store;
    let mut theirs = change("r", Some("b"), 20);
    theirs.site = SiteId::from_bytes([9; 16]);
    push(
        store,
        vec![change("r", None, 10), change("r", Some("a"), 10), theirs],
    );
    let page = store
        .pull("s", 0, None, Some(SiteId::from_bytes(DEVICE)), 1 << 20)
        .unwrap();
    assert_eq!(page.until, 1);
    assert_eq!(
        page.changes
            .iter()
            .map(|c| c.column.as_deref())
            .collect::<Vec<_>>(),
        [Some("b")]
    );
}

fn cursors_and_resume_tokens_that_do_not_belong_are_refused(make: Make) {
    let f = make(None);
    let store = &*f.store;
    assert!(matches!(
        store.pull("s", 3, None, None, 1 << 20),
        Err(StoreError::CursorGone {
            cursor: 3,
            version: 0
        })
    ));
    push(store, vec![change("r", None, 10)]);
    assert!(matches!(
        store.pull("s", 2, None, None, 1 << 20),
        Err(StoreError::CursorGone {
            cursor: 2,
            version: 1
        })
    ));
    let foreign = Resume {
        version: 5,
        table: "t".into(),
        key: vec![1],
    };
    assert!(matches!(
        store.pull("s", 0, Some(&foreign), None, 1 << 20),
        Err(StoreError::BadInput(_))
    ));
    let empty = store.pull("nowhere", 0, None, None, 1 << 20).unwrap();
    assert_eq!(
        (empty.until, empty.more, empty.changes.len()),
        (0, false, 0)
    );
}

fn a_delete_and_a_later_revival_travel_as_causal_lengths(make: Make) {
    let f = make(None);
    let store = &*f.store;
    push(
        store,
        vec![change("r", None, 10), change("r", Some("a"), 10)],
    );
    let mut delete = change("r", None, 20);
    delete.cl = 2;
    push(store, vec![delete]);
    let (got, _) = pull_all(store, 1, 1 << 20);
    assert_eq!(
        got.iter()
            .map(|c| (c.column.clone(), c.cl))
            .collect::<Vec<_>>(),
        [(None, 2)]
    );
    // A write from before the delete loses to it; the revival wins.
    let mut late = change("r", None, 15);
    late.cl = 1;
    assert_eq!(push(store, vec![late]).stale, 1);
    let mut revive = change("r", None, 30);
    revive.cl = 3;
    assert_eq!(push(store, vec![revive]).version, 3);
    let (got, until) = pull_all(store, 0, 1 << 20);
    assert_eq!(until, 3);
    assert!(
        got.iter().any(|c| c.column.is_none() && c.cl == 3),
        "{got:?}"
    );
}

// ---------------------------------------------------------------------------
// What only a store shared by several server processes needs

#[test]
fn processes_starting_together_on_a_new_database_migrate_it_once_and_share_a_site() {
    let url = support::postgres::database();
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || PgStore::connect(&url, PgOptions::default()))
        })
        .collect();
    let stores: Vec<PgStore> = starts
        .into_iter()
        .map(|s| s.join().unwrap().expect("every process starts"))
        .collect();
    let site = stores[0].server_site();
    assert!(stores.iter().all(|s| s.server_site() == site));
    assert_eq!(
        support::postgres::psql(&url, "SELECT count(*) FROM confluo_migrations"),
        "1"
    );
    // A push through one is pulled through another.
    push(&stores[1], vec![change("r", None, 10)]);
    let page = stores[3].pull("s", 0, None, None, 1 << 20).unwrap();
    assert_eq!((page.until, page.changes.len()), (1, 1));
    // Parts staged through one are taken through another.
    stores[0]
        .stage("s", SiteId::from_bytes([1; 16]), "p", 1, b"part one")
        .unwrap();
    assert_eq!(
        stores[2].take_staged("s", "p", 2).unwrap(),
        Some(vec![b"part one".to_vec()])
    );
}

#[test]
fn a_database_of_a_newer_schema_is_refused() {
    let url = support::postgres::database();
    drop(PgStore::connect(&url, PgOptions::default()).unwrap());
    support::postgres::psql(&url, "INSERT INTO confluo_migrations(version) VALUES (999)");
    let err = PgStore::connect(&url, PgOptions::default())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("newer than this server"), "{err}");
}

#[test]
fn pushes_committed_anywhere_are_reported_to_every_follower() {
    let url = support::postgres::database();
    let (a, b) = (
        PgStore::connect(&url, PgOptions::default()).unwrap(),
        PgStore::connect(&url, PgOptions::default()).unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel::<Option<(String, u64)>>();
    let tx = std::sync::Mutex::new(tx);
    assert!(b.follow_pushes(Arc::new(move |push| {
        let _ = tx
            .lock()
            .unwrap()
            .send(push.map(|(s, v)| (s.to_owned(), v)));
    })));
    let deadline = std::time::Duration::from_secs(10);
    assert_eq!(
        rx.recv_timeout(deadline).expect("listening"),
        None,
        "first: look again, pushes may have been missed before listening"
    );
    push(&a, vec![change("r", None, 10)]);
    a.push("other", &[encode(vec![change("x", None, 10)])])
        .unwrap();
    assert_eq!(rx.recv_timeout(deadline).unwrap(), Some(("s".into(), 1)));
    assert_eq!(
        rx.recv_timeout(deadline).unwrap(),
        Some(("other".into(), 1))
    );
    // A push that changed nothing is not announced.
    push(&a, vec![change("r", None, 10)]);
    push(&a, vec![change("r", Some("a"), 20)]);
    assert_eq!(rx.recv_timeout(deadline).unwrap(), Some(("s".into(), 2)));
}
