//! `confluo-server`: the sync server.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use confluo_server::{serve, App, Auth, Config, SqliteStore, DEV_TOKEN};

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
    /// The SQLite file that keeps every space.
    #[arg(long, default_value = "./confluo-server.db")]
    db: PathBuf,
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
    /// Largest single value, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_value_bytes: usize,
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
    let store =
        SqliteStore::open(&args.db).with_context(|| format!("opening {}", args.db.display()))?;
    let defaults = Config::default();
    let config = Config {
        max_body_bytes: args.max_body_bytes,
        limits: confluo_core::Limits {
            max_value_bytes: args.max_value_bytes,
            ..defaults.limits
        },
        ..defaults
    };
    let app = App::new(Arc::new(store), auth, config);
    let listener = tokio::net::TcpListener::bind(&addrs[..])
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, db = %args.db.display(), "confluo-server listening");
    serve(listener, app, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
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
