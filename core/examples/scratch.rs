use std::time::Instant;
fn main() {
    let n: usize = 100_000;
    let mut ids: Vec<String> = (0..n as u64)
        .map(|i: u64| {
            uuid::Uuid::from_u128((i as u128).wrapping_mul(0x9E3779B97F4A7C15F39CC0605CEDC834))
                .to_string()
        })
        .collect();
    let body = "x".repeat(140);
    for (label, schema, sorted) in [
        ("wr+dbv random", "CREATE TABLE m(pk PRIMARY KEY, cl, dbv, clocks) WITHOUT ROWID; CREATE INDEX m_dbv ON m(dbv);", false),
        ("wr+dbv sorted", "CREATE TABLE m(pk PRIMARY KEY, cl, dbv, clocks) WITHOUT ROWID; CREATE INDEX m_dbv ON m(dbv);", true),
        ("rowid+uniq+dbv sorted", "CREATE TABLE m(rid INTEGER PRIMARY KEY, pk UNIQUE, cl, dbv, clocks); CREATE INDEX m_dbv ON m(dbv);", true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let c = rusqlite::Connection::open(dir.path().join("b.db")).unwrap();
        c.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; CREATE TABLE todo(id TEXT PRIMARY KEY NOT NULL, title TEXT, status TEXT, body TEXT);").unwrap();
        c.execute_batch(schema).unwrap();
        let t = Instant::now();
        let tx = c.unchecked_transaction().unwrap();
        { let mut s = tx.prepare("INSERT INTO todo VALUES (?1, 'title title title title title title title', 'in_progress', ?2)").unwrap(); for id in &ids { s.execute([id, &body]).unwrap(); } }
        let t1 = t.elapsed();
        let mut keys = ids.clone();
        if sorted { keys.sort(); }
        { let mut q = tx.prepare("SELECT cl FROM m WHERE pk = ?1").unwrap();
          let mut s = tx.prepare("INSERT INTO m(pk, cl, dbv, clocks) VALUES (?1, 1, 5, x'00112233445566778899aabb')").unwrap();
          for id in &keys { let _ = q.query_row([id], |r| r.get::<_, i64>(0)); s.execute([id]).unwrap(); } }
        tx.commit().unwrap();
        println!("{label}: app {:?} total {:?}", t1, t.elapsed());
    }
    ids.truncate(0);
}
