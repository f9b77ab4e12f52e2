//! Confluo's sync server: devices push their changes to a space and pull
//! what others pushed, over HTTP (protocol in PROTOCOL.md). It merges with
//! the engine's own merge rules and never runs client SQL.

pub mod api;
pub mod auth;
pub mod metrics;
pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use confluo_core::Limits;
use tokio::sync::watch;

pub use auth::{Auth, DEV_TOKEN};
pub use store::{SqliteStore, Store};

/// Limits and sizes, with the defaults of the protocol documentation.
#[derive(Clone, Debug)]
pub struct Config {
    pub max_body_bytes: usize,
    pub limits: Limits,
    /// About how many bytes of changes one pull page carries.
    pub page_bytes: usize,
    /// The longest a long poll waits.
    pub max_wait: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_body_bytes: 16 << 20,
            limits: Limits::default(),
            page_bytes: 4 << 20,
            max_wait: Duration::from_secs(60),
        }
    }
}

/// Everything a request handler needs.
pub struct App {
    pub store: Arc<dyn Store>,
    pub auth: Auth,
    pub config: Config,
    pub metrics: metrics::Metrics,
    versions: Mutex<HashMap<String, watch::Sender<u64>>>,
    shutdown: watch::Receiver<bool>,
    shutdown_tx: watch::Sender<bool>,
}

impl App {
    pub fn new(store: Arc<dyn Store>, auth: Auth, config: Config) -> Arc<App> {
        let (shutdown_tx, shutdown) = watch::channel(false);
        Arc::new(App {
            store,
            auth,
            config,
            metrics: metrics::Metrics::default(),
            versions: Mutex::new(HashMap::new()),
            shutdown,
            shutdown_tx,
        })
    }

    fn subscribe(&self, space: &str) -> watch::Receiver<u64> {
        let mut map = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(space.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Wakes the long polls of `space`: a push just committed `version`.
    fn notify(&self, space: &str, version: u64) {
        let map = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = map.get(space) {
            tx.send_replace(version);
        }
    }

    /// Ends every long poll now (the server is shutting down).
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then finishes
/// the requests in flight (long polls return at once).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = api::router(app.clone());
    let app2 = app.clone();
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown.await;
            app2.begin_shutdown();
        })
        .await
}

/// A server running on its own thread and runtime: for the demo and tests.
pub struct BackgroundServer {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundServer {
    /// Starts serving `store` on a free loopback port.
    pub fn start(
        store: Arc<dyn Store>,
        auth: Auth,
        config: Config,
    ) -> std::io::Result<BackgroundServer> {
        Self::start_on("127.0.0.1:0".parse().expect("address"), store, auth, config)
    }

    /// Starts serving `store` on `addr`.
    pub fn start_on(
        addr: SocketAddr,
        store: Arc<dyn Store>,
        auth: Auth,
        config: Config,
    ) -> std::io::Result<BackgroundServer> {
        let app = App::new(store, auth, config);
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let app2 = app.clone();
        let thread = std::thread::Builder::new()
            .name("confluo-server".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(std_listener).expect("listener");
                    let _ = serve(listener, app2, async {
                        let _ = stop_rx.await;
                    })
                    .await;
                });
            })?;
        Ok(BackgroundServer {
            addr,
            app,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
