//! The PostgreSQL store: any number of server processes share one
//! PostgreSQL database, each able to serve any request. The layout is the
//! embedded store's (see `store.rs`); what differs is how processes that
//! do not share memory agree:
//!
//! - a push is one transaction that locks its space's row (`FOR UPDATE`),
//!   so the versions of a space stay contiguous and each push lands whole
//!   whichever process merges it; pushes to other spaces go on meanwhile;
//! - a committed push is announced with `NOTIFY`, and every process
//!   `LISTEN`s, to wake its long polls (`Store::follow_pushes`);
//! - staged parts of a multi-request push are rows, so its parts may
//!   reach different processes;
//! - the schema is made and migrated by the first process to start, under
//!   an advisory lock, so processes starting together do not race.
//!
//! `tokio-postgres` talks to the database from a runtime of the store's
//! own: `Store`'s methods are blocking (the server calls them from its
//! blocking threads, tests call them directly), and block on it.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use confluo_core::{pack_key, Change, SiteId};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::StreamExt;
use tokio_postgres::{AsyncMessage, IsolationLevel};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::{
    cell_versions, check_pull, decode_stored, merge_row, row_runs, Page, PageBuilder, PushFeed,
    PushOutcome, PushPart, Resume, SpaceState, Store, StoreError, StoreResult, MAX_STAGED_BYTES,
    STAGED_TTL,
};

/// The schema, one migration per layout change. Each runs once, in order,
/// in the transaction that records it in `confluo_migrations`.
const MIGRATIONS: &[&str] = &["
CREATE TABLE confluo_meta(key TEXT PRIMARY KEY, value BYTEA NOT NULL);
CREATE TABLE confluo_spaces(
  id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  name TEXT NOT NULL UNIQUE, version BIGINT NOT NULL, epoch TEXT NOT NULL);
CREATE TABLE confluo_rows(
  space BIGINT NOT NULL, tbl TEXT COLLATE \"C\" NOT NULL, pk BYTEA NOT NULL,
  cl BIGINT NOT NULL, version BIGINT NOT NULL, cells BYTEA NOT NULL,
  PRIMARY KEY (space, tbl, pk));
CREATE TABLE confluo_row_versions(
  space BIGINT NOT NULL, version BIGINT NOT NULL, tbl TEXT COLLATE \"C\" NOT NULL,
  pk BYTEA NOT NULL,
  PRIMARY KEY (space, version, tbl, pk));
CREATE TABLE confluo_versions(
  space BIGINT NOT NULL, version BIGINT NOT NULL, tag TEXT NOT NULL,
  PRIMARY KEY (space, version));
CREATE TABLE confluo_space_tables(
  space BIGINT NOT NULL, tbl TEXT NOT NULL, key_arity INT NOT NULL,
  PRIMARY KEY (space, tbl));
CREATE TABLE confluo_staged(
  space TEXT NOT NULL, push_id TEXT NOT NULL, part BIGINT NOT NULL, site BYTEA NOT NULL,
  body BYTEA NOT NULL, created BIGINT NOT NULL,
  PRIMARY KEY (space, push_id, part));
"];

/// The advisory lock key migrations run under ("confluo" in ASCII).
const MIGRATION_LOCK: i64 = 0x63_6f6e_666c_756f;

/// The channel committed pushes are announced on; the payload is
/// "<version> <space>".
const CHANNEL: &str = "confluo_pushes";

/// The parameters of a statement.
type Params<'a, const N: usize> = [&'a (dyn tokio_postgres::types::ToSql + Sync); N];

/// The tag of a version of a space (by id).
const TAG_OF: &str = "SELECT tag FROM confluo_versions WHERE space = $1 AND version = $2";

/// Rows of a push loaded, merged and written per round trip.
const PUSH_BATCH: usize = 2_000;

/// Rows of a pull fetched per round trip.
const PULL_FETCH: i32 = 1_000;

/// How long a request waits for a free connection before it fails.
const POOL_WAIT: Duration = Duration::from_secs(30);

/// How to reach the database, besides its URL.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// Connections this process keeps open at most.
    pub pool_size: usize,
    /// A PEM file of certificate authorities to trust for TLS, beside the
    /// web's public ones (for a managed service with its own CA, such as
    /// Amazon RDS). TLS follows the URL's `sslmode`.
    pub ca_file: Option<std::path::PathBuf>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            pool_size: 16,
            ca_file: None,
        }
    }
}

pub struct PgStore {
    /// Always `Some` until dropped (a runtime cannot be dropped inside
    /// another one's task, so `Drop` shuts it down in the background).
    runtime: Option<tokio::runtime::Runtime>,
    pool: Pool,
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    site: SiteId,
    max_staged_bytes: usize,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Storage(format!("postgres: {}", db.message())),
        None => match std::error::Error::source(&e) {
            Some(cause) => StoreError::Storage(format!("postgres: {e}: {cause}")),
            None => StoreError::Storage(format!("postgres: {e}")),
        },
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        pg(e)
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => pg(e),
            other => StoreError::Storage(format!("postgres pool: {other}")),
        }
    }
}

/// TLS for the database connections: the web's public roots, and those of
/// `ca_file`.
fn tls(ca_file: Option<&Path>) -> StoreResult<MakeRustlsConnect> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| StoreError::Storage(format!("{}: {e}", path.display())))?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| StoreError::Storage(format!("{}: {e}", path.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Storage(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`),
    /// making or migrating its schema.
    pub fn connect(url: &str, options: PgOptions) -> StoreResult<PgStore> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Storage(format!("the database URL: {e}")))?;
        let tls = tls(options.ca_file.as_deref())?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("confluo-postgres")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Storage(format!("starting the database runtime: {e}")))?;
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = {
            let _in_runtime = runtime.enter();
            Pool::builder(manager)
                .max_size(options.pool_size.max(1))
                .wait_timeout(Some(POOL_WAIT))
                .create_timeout(Some(POOL_WAIT))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .build()
                .map_err(|e| StoreError::Storage(format!("postgres pool: {e}")))?
        };
        let site = match runtime.block_on(prepare(&pool)) {
            Ok(site) => site,
            Err(e) => {
                // As in `Drop`: this may run inside another runtime.
                runtime.shutdown_background();
                return Err(e);
            }
        };
        Ok(PgStore {
            runtime: Some(runtime),
            pool,
            config,
            tls,
            site,
            max_staged_bytes: MAX_STAGED_BYTES,
        })
    }

    /// Sets how many bytes of unfinished pushes a space may keep.
    pub fn with_staging_cap(mut self, bytes: usize) -> Self {
        self.max_staged_bytes = bytes;
        self
    }

    fn run<T>(&self, f: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        self.runtime
            .as_ref()
            .expect("the runtime lives as long as the store")
            .block_on(f)
    }

    async fn push_async(&self, space: &str, parts: Vec<PushPart<'_>>) -> StoreResult<PushOutcome> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // The space's lock: pushes to it, from any process, take turns.
        let lock = tx
            .prepare_cached("SELECT id, version FROM confluo_spaces WHERE name = $1 FOR UPDATE")
            .await?;
        let row = match tx.query_opt(&lock, &[&space]).await? {
            Some(row) => row,
            None => {
                tx.execute(
                    "INSERT INTO confluo_spaces(name, version, epoch) VALUES ($1, 0, $2) \
                     ON CONFLICT (name) DO NOTHING",
                    &[&space, &uuid::Uuid::new_v4().to_string()],
                )
                .await?;
                tx.query_one(&lock, &[&space]).await?
            }
        };
        let (sid, current): (i64, i64) = (row.get(0), row.get(1));
        check_shapes(&tx, sid, &parts).await?;
        let version = current as u64 + 1;
        let mut outcome = PushOutcome {
            previous: current as u64,
            version: current as u64,
            tag: None,
            applied: 0,
            stale: 0,
        };
        for part in parts {
            let cs = part.decode()?;
            let runs: Vec<&[Change]> = row_runs(&cs.changes).collect();
            for batch in runs.chunks(PUSH_BATCH) {
                self.merge_batch(&tx, sid, version, batch, &mut outcome)
                    .await?;
            }
        }
        if outcome.applied > 0 {
            let tag = uuid::Uuid::new_v4().simple().to_string();
            let (move_to, tag_it, announce) = futures_util::try_join!(
                tx.prepare_cached("UPDATE confluo_spaces SET version = $1 WHERE id = $2"),
                tx.prepare_cached(
                    "INSERT INTO confluo_versions(space, version, tag) VALUES ($1, $2, $3) \
                     ON CONFLICT (space, version) DO UPDATE SET tag = excluded.tag",
                ),
                tx.prepare_cached("SELECT pg_notify($1, $2)"),
            )?;
            let v = version as i64;
            let payload = format!("{version} {space}");
            // One round trip: the three go out together. The notification
            // reaches every listening process when this commits.
            let (p1, p2, p3): (Params<2>, Params<3>, Params<2>) =
                ([&v, &sid], [&sid, &v, &tag], [&CHANNEL, &payload]);
            futures_util::try_join!(
                tx.execute(&move_to, &p1),
                tx.execute(&tag_it, &p2),
                tx.execute(&announce, &p3),
            )?;
            outcome.version = version;
            outcome.tag = Some(tag);
        } else {
            let stmt = tx.prepare_cached(TAG_OF).await?;
            outcome.tag = tx
                .query_opt(&stmt, &[&sid, &current])
                .await?
                .map(|r| r.get(0));
        }
        tx.commit().await?;
        Ok(outcome)
    }

    /// Merges one batch of rows of a push: loads them in one query, merges
    /// in memory, and writes what won in a few statements.
    async fn merge_batch(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        sid: i64,
        version: u64,
        runs: &[&[Change]],
        outcome: &mut PushOutcome,
    ) -> StoreResult<()> {
        type Key = (Arc<str>, Vec<u8>);
        // Each row of the batch once, in first-seen order.
        let mut order: Vec<Key> = Vec::new();
        let mut slot: HashMap<Key, usize> = HashMap::new();
        let run_slots: Vec<usize> = runs
            .iter()
            .map(|run| {
                let key = (run[0].table.clone(), pack_key(&run[0].pk));
                *slot.entry(key.clone()).or_insert_with(|| {
                    order.push(key);
                    order.len() - 1
                })
            })
            .collect();
        let tables: Vec<&str> = order.iter().map(|(t, _)| &**t).collect();
        let keys: Vec<&[u8]> = order.iter().map(|(_, k)| &k[..]).collect();
        let load = tx
            .prepare_cached(
                "SELECT r.tbl, r.pk, r.cells FROM confluo_rows AS r \
                 JOIN unnest($2::text[], $3::bytea[]) AS k(tbl, pk) \
                 ON r.tbl = k.tbl AND r.pk = k.pk WHERE r.space = $1",
            )
            .await?;
        struct Row {
            before: Vec<u64>,
            cells: Vec<Change>,
            cl: u64,
            won: bool,
        }
        let mut rows: Vec<Row> = (0..order.len())
            .map(|_| Row {
                before: Vec::new(),
                cells: Vec::new(),
                cl: 0,
                won: false,
            })
            .collect();
        for r in tx.query(&load, &[&sid, &tables, &keys]).await? {
            let key: (String, Vec<u8>) = (r.get(0), r.get(1));
            let Some(&i) = slot.get(&(Arc::from(key.0.as_str()), key.1)) else {
                continue;
            };
            let cells = decode_stored(r.get::<_, &[u8]>(2))?;
            rows[i].before = cell_versions(&cells);
            rows[i].cells = cells;
        }
        for (run, &i) in runs.iter().zip(&run_slots) {
            let row = &mut rows[i];
            if let Some(merged) = merge_row(&row.cells, run, version, outcome) {
                row.cells = merged.cells;
                row.cl = merged.cl;
                row.won = true;
            }
        }
        // What won: the rows to write, and the versions their cells
        // stopped or started carrying.
        let (mut w_tbl, mut w_pk, mut w_cl, mut w_cells) = (vec![], vec![], vec![], vec![]);
        let (mut gone_v, mut gone_tbl, mut gone_pk) = (vec![], vec![], vec![]);
        let (mut new_v, mut new_tbl, mut new_pk) = (vec![], vec![], vec![]);
        for (i, row) in rows.into_iter().enumerate() {
            if !row.won {
                continue;
            }
            let (table, key) = (tables[i], keys[i]);
            let after = cell_versions(&row.cells);
            for v in row.before.iter().filter(|v| !after.contains(v)) {
                gone_v.push(*v as i64);
                gone_tbl.push(table);
                gone_pk.push(key);
            }
            for v in after.iter().filter(|v| !row.before.contains(v)) {
                new_v.push(*v as i64);
                new_tbl.push(table);
                new_pk.push(key);
            }
            w_tbl.push(table);
            w_pk.push(key);
            w_cl.push(row.cl as i64);
            w_cells.push(
                crate::store::MergedRow {
                    cl: row.cl,
                    cells: row.cells,
                }
                .encode(self.site, version),
            );
        }
        if w_tbl.is_empty() {
            return Ok(());
        }
        let (save, forget, add) = futures_util::try_join!(
            tx.prepare_cached(
                "INSERT INTO confluo_rows(space, tbl, pk, cl, version, cells) \
                 SELECT $1, t, p, c, $2, b FROM unnest($3::text[], $4::bytea[], $5::int8[], $6::bytea[]) AS w(t, p, c, b) \
                 ON CONFLICT (space, tbl, pk) DO UPDATE \
                 SET cl = excluded.cl, version = excluded.version, cells = excluded.cells",
            ),
            tx.prepare_cached(
                "DELETE FROM confluo_row_versions AS v \
                 USING unnest($2::int8[], $3::text[], $4::bytea[]) AS g(version, tbl, pk) \
                 WHERE v.space = $1 AND v.version = g.version AND v.tbl = g.tbl AND v.pk = g.pk",
            ),
            tx.prepare_cached(
                "INSERT INTO confluo_row_versions(space, version, tbl, pk) \
                 SELECT $1, v, t, p FROM unnest($2::int8[], $3::text[], $4::bytea[]) AS n(v, t, p) \
                 ON CONFLICT DO NOTHING",
            ),
        )?;
        // One round trip: the statements go out together (an empty list
        // of versions is a statement that does nothing).
        let version = version as i64;
        let (p1, p2, p3): (Params<6>, Params<4>, Params<4>) = (
            [&sid, &version, &w_tbl, &w_pk, &w_cl, &w_cells],
            [&sid, &gone_v, &gone_tbl, &gone_pk],
            [&sid, &new_v, &new_tbl, &new_pk],
        );
        futures_util::try_join!(
            tx.execute(&save, &p1),
            tx.execute(&forget, &p2),
            tx.execute(&add, &p3),
        )?;
        Ok(())
    }

    async fn pull_async(
        &self,
        space: &str,
        cursor: u64,
        resume: Option<&Resume>,
        exclude: Option<SiteId>,
        budget: usize,
    ) -> StoreResult<Page> {
        let mut client = self.pool.get().await?;
        // One snapshot for the space's version and its rows.
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let stmt = tx
            .prepare_cached("SELECT id, version FROM confluo_spaces WHERE name = $1")
            .await?;
        let state = tx.query_opt(&stmt, &[&space]).await?;
        let Some(state) = state else {
            check_pull(cursor, None, 0)?;
            return Ok(PageBuilder::new(0, budget, exclude).finish(true, 0));
        };
        let (sid, version): (i64, i64) = (state.get(0), state.get(1));
        let version = version as u64;
        check_pull(cursor, resume, version)?;
        const FROM: &str = "SELECT v.version, v.tbl, v.pk, r.cells FROM confluo_row_versions AS v \
             JOIN confluo_rows AS r ON r.space = v.space AND r.tbl = v.tbl AND r.pk = v.pk";
        let portal = match resume {
            Some(r) => {
                let stmt = tx
                    .prepare_cached(&format!(
                        "{FROM} WHERE v.space = $1 AND (v.version, v.tbl, v.pk) > ($2, $3, $4) \
                         AND v.version <= $5 ORDER BY v.version, v.tbl, v.pk"
                    ))
                    .await?;
                let (at, upto) = (r.version as i64, version as i64);
                tx.bind(&stmt, &[&sid, &at, &r.table, &r.key, &upto])
                    .await?
            }
            None => {
                let stmt = tx
                    .prepare_cached(&format!(
                        "{FROM} WHERE v.space = $1 AND v.version > $2 AND v.version <= $3 \
                         ORDER BY v.version, v.tbl, v.pk"
                    ))
                    .await?;
                let (from, upto) = (cursor as i64, version as i64);
                tx.bind(&stmt, &[&sid, &from, &upto]).await?
            }
        };
        let mut page = PageBuilder::new(cursor, budget, exclude);
        let exhausted = 'fetch: loop {
            let rows = tx.query_portal(&portal, PULL_FETCH).await?;
            let last_fetch = rows.len() < PULL_FETCH as usize;
            for row in rows {
                let v = row.get::<_, i64>(0) as u64;
                if !page.offer(v, row.get::<_, &[u8]>(3), || Ok((row.get(1), row.get(2))))? {
                    break 'fetch false;
                }
            }
            if last_fetch {
                break true;
            }
        };
        let mut page = page.finish(exhausted, version);
        let stmt = tx.prepare_cached(TAG_OF).await?;
        page.until_tag = tx
            .query_opt(&stmt, &[&sid, &(page.until as i64)])
            .await?
            .map(|r| r.get(0));
        Ok(page)
    }

    async fn stage_async(
        &self,
        space: &str,
        site: SiteId,
        push_id: &str,
        part: u32,
        body: &[u8],
    ) -> StoreResult<()> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let site = &site.as_bytes()[..];
        let part = part as i64;
        tx.execute(
            "DELETE FROM confluo_staged WHERE created < $1",
            &[&(now_secs() - STAGED_TTL.as_secs() as i64)],
        )
        .await?;
        tx.execute(
            "DELETE FROM confluo_staged WHERE space = $1 AND site = $2 AND push_id <> $3",
            &[&space, &site, &push_id],
        )
        .await?;
        // The part this one replaces does not count against the cap.
        let staged: i64 = tx
            .query_one(
                "SELECT coalesce(sum(length(body)), 0)::int8 FROM confluo_staged \
                 WHERE space = $1 AND NOT (push_id = $2 AND part = $3)",
                &[&space, &push_id, &part],
            )
            .await?
            .get(0);
        if staged as usize + body.len() > self.max_staged_bytes {
            return Err(StoreError::BadInput(format!(
                "more than {} bytes of unfinished pushes are waiting for this space",
                self.max_staged_bytes
            )));
        }
        tx.execute(
            "INSERT INTO confluo_staged(space, push_id, part, site, body, created) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (space, push_id, part) DO UPDATE \
             SET site = excluded.site, body = excluded.body, created = excluded.created",
            &[&space, &push_id, &part, &site, &body, &now_secs()],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Runs the migrations this database lacks, and returns the server's
/// site id (made by the first process, shared by all).
async fn prepare(pool: &Pool) -> StoreResult<SiteId> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    // "Already exists, skipping" is no news for every process but the
    // first.
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS confluo_migrations(
           version INT PRIMARY KEY, applied TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await?;
    let done: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM confluo_migrations",
            &[],
        )
        .await?
        .get(0);
    let known = MIGRATIONS.len() as i32;
    if done > known {
        return Err(StoreError::Storage(format!(
            "the database has schema version {done}, newer than this server's {known}"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(done as usize) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO confluo_migrations(version) VALUES ($1)",
            &[&(i as i32 + 1)],
        )
        .await?;
    }
    let site = SiteId::random();
    tx.execute(
        "INSERT INTO confluo_meta(key, value) VALUES ('site', $1) ON CONFLICT (key) DO NOTHING",
        &[&&site.as_bytes()[..]],
    )
    .await?;
    let stored: Vec<u8> = tx
        .query_one("SELECT value FROM confluo_meta WHERE key = 'site'", &[])
        .await?
        .get(0);
    tx.commit().await?;
    SiteId::from_slice(&stored)
        .ok_or_else(|| StoreError::Storage("the stored site id is not 16 bytes".into()))
}

/// Checks every change's key against the shape its table has in the space
/// (see `TableShapes` in `store.rs`), learning the shapes of new tables.
async fn check_shapes(
    tx: &deadpool_postgres::Transaction<'_>,
    sid: i64,
    parts: &[PushPart<'_>],
) -> StoreResult<()> {
    let mut arity: HashMap<Arc<str>, usize> = HashMap::new();
    let known = tx
        .prepare_cached("SELECT tbl, key_arity FROM confluo_space_tables WHERE space = $1")
        .await?;
    for r in tx.query(&known, &[&sid]).await? {
        arity.insert(Arc::from(r.get::<_, &str>(0)), r.get::<_, i32>(1) as usize);
    }
    let mut learned: Vec<(Arc<str>, usize)> = Vec::new();
    for part in parts {
        for (table, len) in part.key_shapes()? {
            let n = *arity.entry(table.clone()).or_insert_with(|| {
                learned.push((table.clone(), len));
                len
            });
            if len != n {
                return Err(StoreError::BadInput(format!(
                    "table {table:?} has keys of {n} value(s) in this space, but a change has a key of {len}"
                )));
            }
        }
    }
    for (table, n) in learned {
        tx.execute(
            "INSERT INTO confluo_space_tables(space, tbl, key_arity) VALUES ($1, $2, $3)",
            &[&sid, &&*table, &(n as i32)],
        )
        .await?;
    }
    Ok(())
}

/// Listens for pushes committed by any process until the connection ends;
/// each one goes to `feed`. `feed(None)` once listening: pushes made while
/// not listening (before, or while reconnecting) must be looked for.
async fn listen(
    config: &tokio_postgres::Config,
    tls: MakeRustlsConnect,
    feed: &PushFeed,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(tls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    feed(None);
    while let Some(n) = rx.recv().await {
        if let Some((version, space)) = n.payload().split_once(' ') {
            if let Ok(version) = version.parse() {
                feed(Some((space, version)));
            }
        }
    }
    drop(client);
    match driver.await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}

impl Store for PgStore {
    fn push_parts(&self, space: &str, parts: Vec<PushPart<'_>>) -> StoreResult<PushOutcome> {
        self.run(self.push_async(space, parts))
    }

    fn pull(
        &self,
        space: &str,
        cursor: u64,
        resume: Option<&Resume>,
        exclude: Option<SiteId>,
        budget: usize,
    ) -> StoreResult<Page> {
        self.run(self.pull_async(space, cursor, resume, exclude, budget))
    }

    fn space(&self, space: &str) -> StoreResult<Option<SpaceState>> {
        self.run(async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached("SELECT version, epoch FROM confluo_spaces WHERE name = $1")
                .await?;
            Ok(client
                .query_opt(&stmt, &[&space])
                .await?
                .map(|r| SpaceState {
                    version: r.get::<_, i64>(0) as u64,
                    epoch: r.get(1),
                }))
        })
    }

    fn versions(&self, spaces: &[String]) -> StoreResult<Vec<(String, u64)>> {
        self.run(async {
            let client = self.pool.get().await?;
            let rows = client
                .query(
                    "SELECT name, version FROM confluo_spaces WHERE name = ANY($1)",
                    &[&spaces],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
                .collect())
        })
    }

    fn stage(
        &self,
        space: &str,
        site: SiteId,
        push_id: &str,
        part: u32,
        body: &[u8],
    ) -> StoreResult<()> {
        self.run(self.stage_async(space, site, push_id, part, body))
    }

    fn take_staged(
        &self,
        space: &str,
        push_id: &str,
        last: u32,
    ) -> StoreResult<Option<Vec<Vec<u8>>>> {
        self.run(async {
            let client = self.pool.get().await?;
            let rows = client
                .query(
                    "DELETE FROM confluo_staged WHERE space = $1 AND push_id = $2 RETURNING part, body",
                    &[&space, &push_id],
                )
                .await?;
            let mut parts: Vec<(i64, Vec<u8>)> = rows
                .into_iter()
                .map(|r| (r.get(0), r.get(1)))
                .filter(|(i, _)| *i < last as i64)
                .collect();
            parts.sort_by_key(|(i, _)| *i);
            let complete = parts.iter().map(|(i, _)| *i).eq(1..last as i64);
            Ok(complete.then(|| parts.into_iter().map(|(_, body)| body).collect()))
        })
    }

    fn server_site(&self) -> SiteId {
        self.site
    }

    fn version_tag(&self, space: &str, version: u64) -> StoreResult<Option<String>> {
        self.run(async {
            let client = self.pool.get().await?;
            let stmt = client
                .prepare_cached(
                    "SELECT v.tag FROM confluo_versions AS v JOIN confluo_spaces AS s \
                     ON s.id = v.space WHERE s.name = $1 AND v.version = $2",
                )
                .await?;
            Ok(client
                .query_opt(&stmt, &[&space, &(version as i64)])
                .await?
                .map(|r| r.get(0)))
        })
    }

    fn follow_pushes(&self, feed: PushFeed) -> bool {
        let (config, tls) = (self.config.clone(), self.tls.clone());
        let runtime = self
            .runtime
            .as_ref()
            .expect("the runtime lives as long as the store");
        runtime.spawn(async move {
            loop {
                if let Err(e) = listen(&config, tls.clone(), &feed).await {
                    tracing::warn!(error = %pg(e), "listening for pushes of other server processes; reconnecting");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        true
    }
}
