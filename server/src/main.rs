//! `confluo-server`: the sync server.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use confluo_server::{serve, App, Auth, Config, PgOptions, PgStore, SqliteStore, Store, DEV_TOKEN};

/// Shown after the options, so that an operator finds the auth file's
/// format without reading the source.
const AUTH_HELP: &str = "\
The auth file (--auth) is TOML; its format is in PROTOCOL.md, section Tokens:

  jwt_secret = \"at least 32 bytes\"    # optional: accept HS256 JWTs
  jwt_issuer = \"...\"                  # optional: the iss JWTs must carry
  jwt_audience = \"...\"                # optional: the aud JWTs must carry
  jwt_allow_wildcard = false          # optional: may a JWT claim \"*\"?

  [[tokens]]                          # any number of static tokens
  token = \"at least 8 characters\"
  user = \"alice\"
  spaces = [\"alice-lists\"]            # \"*\" for every space
  mode = \"read-write\"                 # or \"read\"

Logs go to standard output (RUST_LOG sets the level, e.g. RUST_LOG=debug).";

#[derive(Parser)]
#[command(name = "confluo-server", about = "Confluo's sync server", after_help = AUTH_HELP)]
struct Args {
    /// Where every space is kept: a SQLite file (the embedded default), or
    /// a PostgreSQL database, postgres://USER[:PASSWORD]@HOST[:PORT]/DB,
    /// that any number of server processes share (add ?sslmode=require
    /// for TLS).
    #[arg(long, default_value = "./confluo-server.db")]
    db: String,
    /// With PostgreSQL: connections this process keeps open at most.
    #[arg(long, default_value_t = 16)]
    db_pool_size: usize,
    /// With PostgreSQL: how often, in seconds, long polls look for pushes
    /// of other server processes they were not notified of.
    #[arg(long, default_value_t = 2)]
    db_recheck_secs: u64,
    /// With PostgreSQL: a PEM file of certificate authorities to trust
    /// besides the public ones (a managed service's own CA).
    #[arg(long)]
    db_ca_file: Option<PathBuf>,
    /// Address to listen on, HOST:PORT; a host name listens on the first
    /// address it resolves to that can be bound.
    #[arg(long, default_value = "127.0.0.1:7878")]
    listen: String,
    /// Tokens and JWT settings (TOML; the format is below).
    #[arg(long)]
    auth: Option<PathBuf>,
    /// Accept the development token for every space (loopback only).
    #[arg(long)]
    dev: bool,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    max_body_bytes: usize,
    /// Most changes in one request.
    #[arg(long, default_value_t = 200_000)]
    max_changes: usize,
    /// Largest single value, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_value_bytes: usize,
    /// Seconds a client may take to send a request's headers; also how
    /// long a kept-alive connection may sit idle.
    #[arg(long, default_value_t = 10)]
    header_timeout_secs: u64,
    /// A request body must arrive within this many seconds plus its length
    /// at --min-body-rate.
    #[arg(long, default_value_t = 10)]
    body_timeout_secs: u64,
    /// Slowest accepted body upload, in bytes per second.
    #[arg(long, default_value_t = 32 << 10)]
    min_body_rate: usize,
    /// Connections served at once; past it only /healthz is answered.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Seconds requests in flight may take to finish after SIGTERM.
    #[arg(long, default_value_t = 5)]
    shutdown_grace_secs: u64,
    /// Serve HTTPS: the certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// A parent may start us with SIGTERM and SIGINT blocked (the mask is
/// inherited); unblock them so that graceful shutdown works.
#[cfg(unix)]
fn unblock_shutdown_signals() {
    // SAFETY: plain libc calls on a local, initialised signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

fn main() -> ExitCode {
    // Before the runtime starts its threads, which inherit the mask.
    #[cfg(unix)]
    unblock_shutdown_signals();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The chain of causes on one line, not a backtrace: this is
            // what an operator reads when the server will not start.
            eprintln!("confluo-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    // Colour codes only for a person at a terminal, not in log files.
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(colour)
        .init();
    let args = Args::parse();
    let mut auth = match &args.auth {
        Some(path) => Auth::from_file(path)?,
        None if args.dev => Auth::default(),
        None => bail!("give --auth FILE (or --dev on a loopback address for development)"),
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&args.listen)
        .await
        .with_context(|| format!("resolving --listen {} (HOST:PORT)", args.listen))?
        .collect();
    if args.dev {
        if addrs.is_empty() || !addrs.iter().all(|a| a.ip().is_loopback()) {
            bail!(
                "--dev is only allowed on a loopback address, not {}",
                args.listen
            );
        }
        auth = auth.with_dev_token();
        tracing::warn!(
            "DEVELOPMENT MODE: the token {DEV_TOKEN:?} grants read-write access to every space"
        );
    }
    let (store, db_shown) = open_store(&args)?;
    let defaults = Config::default();
    let secs = std::time::Duration::from_secs;
    let config = Config {
        max_body_bytes: args.max_body_bytes,
        max_changes: args.max_changes.max(1),
        limits: confluo_core::Limits {
            max_value_bytes: args.max_value_bytes,
            ..defaults.limits
        },
        header_timeout: secs(args.header_timeout_secs.max(1)),
        body_timeout: secs(args.body_timeout_secs.max(1)),
        min_body_rate: args.min_body_rate.max(1),
        max_connections: connection_cap(args.max_connections),
        shutdown_grace: secs(args.shutdown_grace_secs),
        shared_store_recheck: secs(args.db_recheck_secs.max(1)),
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => {
                let read = |p: &PathBuf| {
                    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
                };
                Some(confluo_server::tls_config(&read(cert)?, &read(key)?)?)
            }
            _ => None,
        },
        ..defaults
    };
    let app = App::new(store, auth, config);
    let listener = tokio::net::TcpListener::bind(&addrs[..])
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let scheme = if args.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(addr = %listener.local_addr()?, scheme, db = %db_shown, "confluo-server listening");
    serve(listener, app, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// The store `--db` names, and how to show it in the log (without a
/// password).
fn open_store(args: &Args) -> anyhow::Result<(Arc<dyn Store>, String)> {
    let db = &args.db;
    if db.starts_with("postgres://") || db.starts_with("postgresql://") {
        let shown = match db.rsplit_once('@') {
            Some((_, place)) => format!("postgres://...@{place}"),
            None => db.clone(),
        };
        let options = PgOptions {
            pool_size: args.db_pool_size,
            ca_file: args.db_ca_file.clone(),
        };
        // Connecting blocks on the store's own runtime: not from this one.
        let url = db.clone();
        let store = std::thread::spawn(move || PgStore::connect(&url, options))
            .join()
            .map_err(|_| anyhow::anyhow!("connecting to PostgreSQL panicked"))?
            .with_context(|| format!("opening {shown}"))?;
        return Ok((Arc::new(store), shown));
    }
    let store = SqliteStore::open(db.as_ref()).with_context(|| format!("opening {db}"))?;
    Ok((Arc::new(store), db.clone()))
}

/// Connections that fit in the process's file descriptor limit, leaving
/// room for the database, the connections past the cap that still get
/// `/healthz`, and the rest of the process: more would make `accept` fail
/// and leave `/healthz` unanswered.
fn connection_cap(wanted: usize) -> usize {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            let fits = (limit.rlim_cur as usize).saturating_sub(128).max(1);
            if fits < wanted {
                tracing::warn!(
                    wanted,
                    serving = fits,
                    "the file descriptor limit (ulimit -n) caps the connections served at once"
                );
                return fits;
            }
        }
    }
    wanted.max(1)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutting down");
}
