//! Confluo's sync server: devices push their changes to a space and pull
//! what others pushed, over HTTP (protocol in PROTOCOL.md). It merges with
//! the engine's own merge rules and never runs client SQL.

pub mod api;
pub mod auth;
mod group;
pub mod metrics;
pub mod pg;
pub mod quota;
pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use confluo_core::Limits;
use tokio::sync::watch;

pub use auth::{Auth, DEV_TOKEN};
pub use pg::{PgOptions, PgStore};
pub use store::{SqliteStore, Store};

/// Limits and sizes, with the defaults of the protocol documentation.
#[derive(Clone, Debug)]
pub struct Config {
    pub max_body_bytes: usize,
    /// The most changes one request may carry: bounds the memory a request
    /// takes however small its changes are.
    pub max_changes: usize,
    pub limits: Limits,
    /// About how many bytes of changes one pull page carries.
    pub page_bytes: usize,
    /// The longest a long poll waits.
    pub max_wait: Duration,
    /// How long a client may take to send a request's headers, and how
    /// long a kept-alive connection may sit idle between requests.
    pub header_timeout: Duration,
    /// A request body must arrive within `body_timeout` plus its length at
    /// `min_body_rate` bytes per second: a body that trickles is cut off.
    pub body_timeout: Duration,
    pub min_body_rate: usize,
    /// Connections served at once; past it, new connections get only
    /// `/healthz` (and a 503 for anything else) until some close.
    pub max_connections: usize,
    /// On shutdown, how long requests in flight may take to finish.
    pub shutdown_grace: Duration,
    /// Serve HTTPS with this certificate and key (see `tls_config`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// With a store other server processes share: how often long polls
    /// look for pushes they were not told about (a lost notification).
    pub shared_store_recheck: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_body_bytes: 16 << 20,
            max_changes: 200_000,
            limits: Limits::default(),
            page_bytes: 4 << 20,
            max_wait: Duration::from_secs(60),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            min_body_rate: 32 << 10,
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(5),
            tls: None,
            shared_store_recheck: Duration::from_secs(2),
        }
    }
}

/// A TLS configuration from a PEM certificate chain and a PEM private key.
pub fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("the certificate file: {e}"))?;
    if certs.is_empty() {
        anyhow::bail!("the certificate file holds no certificate");
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| anyhow::anyhow!("the key file: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

impl Config {
    /// The deadline for reading a body of `len` bytes.
    pub fn body_deadline(&self, len: usize) -> Duration {
        self.body_timeout + Duration::from_secs((len / self.min_body_rate.max(1)) as u64)
    }
}

/// Everything a request handler needs.
pub struct App {
    pub store: Arc<dyn Store>,
    pub auth: Auth,
    pub config: Config,
    pub metrics: metrics::Metrics,
    /// Per-user usage against the quotas of the auth file.
    pub meter: quota::Meter,
    versions: Mutex<HashMap<String, watch::Sender<u64>>>,
    shutdown: watch::Receiver<bool>,
    shutdown_tx: watch::Sender<bool>,
}

impl App {
    pub fn new(store: Arc<dyn Store>, auth: Auth, config: Config) -> Arc<App> {
        let (shutdown_tx, shutdown) = watch::channel(false);
        let meter = quota::Meter::new(auth.quotas.clone());
        Arc::new(App {
            store,
            auth,
            config,
            metrics: metrics::Metrics::default(),
            meter,
            versions: Mutex::new(HashMap::new()),
            shutdown,
            shutdown_tx,
        })
    }

    /// Watches `space` for pushes, for a long poll. The space's entry lives
    /// as long as someone watches it, so spaces nobody polls take no memory.
    fn subscribe(&self, space: &str) -> SpaceWatch<'_> {
        let mut map = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        let rx = map
            .entry(space.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        SpaceWatch {
            app: self,
            space: space.to_owned(),
            rx: Some(rx),
        }
    }

    /// How many spaces are being watched by long polls now.
    pub fn watched_spaces(&self) -> usize {
        self.versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Wakes the long polls of `space`: a push just committed `version`
    /// (here or, with a shared store, in another server process).
    fn notify(&self, space: &str, version: u64) {
        let map = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = map.get(space) {
            tx.send_if_modified(|known| {
                let newer = version > *known;
                *known = (*known).max(version);
                newer
            });
        }
    }

    /// Wakes every long poll, to look at its space again.
    fn wake_all(&self) {
        let map = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        for tx in map.values() {
            tx.send_modify(|_| {});
        }
    }

    /// With a store other server processes write to: wakes long polls on
    /// their pushes, as the store reports them, and also looks at the
    /// versions of every watched space every `shared_store_recheck`, in
    /// case a report was lost. Ends with the app.
    fn follow_shared_store(self: &Arc<App>) {
        let app = Arc::downgrade(self);
        let feed: store::PushFeed = Arc::new(move |push| {
            if let Some(app) = app.upgrade() {
                match push {
                    Some((space, version)) => app.notify(space, version),
                    None => app.wake_all(),
                }
            }
        });
        if !self.store.follow_pushes(feed) {
            return;
        }
        let app = Arc::downgrade(self);
        let every = self.config.shared_store_recheck;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(app) = app.upgrade() else { return };
                let watched: Vec<String> = app
                    .versions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .keys()
                    .cloned()
                    .collect();
                if watched.is_empty() {
                    continue;
                }
                let store = app.store.clone();
                match tokio::task::spawn_blocking(move || store.versions(&watched)).await {
                    Ok(Ok(found)) => {
                        for (space, version) in found {
                            app.notify(&space, version);
                        }
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "re-checking watched spaces"),
                    Err(_) => {}
                }
            }
        });
    }

    /// Ends every long poll now (the server is shutting down).
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
    }
}

/// A long poll's watch of one space; the last one to go forgets the space.
pub(crate) struct SpaceWatch<'a> {
    app: &'a App,
    space: String,
    rx: Option<watch::Receiver<u64>>,
}

impl SpaceWatch<'_> {
    /// Waits for the next push to the space.
    pub(crate) async fn changed(&mut self) {
        if let Some(rx) = &mut self.rx {
            let _ = rx.changed().await;
        }
    }
}

impl Drop for SpaceWatch<'_> {
    fn drop(&mut self) {
        let mut map = self.app.versions.lock().unwrap_or_else(|e| e.into_inner());
        self.rx.take();
        if map
            .get(&self.space)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            map.remove(&self.space);
        }
    }
}

/// The router, with the connection's peer address put into each request
/// (for the logs). The router is shared: layering it per connection would
/// rebuild every route for every connection, kilobytes that an idle long
/// poll holds for its whole wait.
#[derive(Clone)]
struct WithPeer {
    router: axum::Router,
    peer: std::net::SocketAddr,
}

impl tower::Service<axum::http::Request<hyper::body::Incoming>> for WithPeer {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = axum::routing::future::RouteFuture<std::convert::Infallible>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: axum::http::Request<hyper::body::Incoming>) -> Self::Future {
        req.extensions_mut().insert(api::ClientAddr(self.peer));
        tower::Service::call(&mut self.router, req)
    }
}

/// One accepted connection, served over whatever stream it came on.
struct Conn {
    service: WithPeer,
    header_timeout: Duration,
    keep_alive: bool,
    watcher: hyper_util::server::graceful::Watcher,
}

impl Conn {
    async fn serve<I>(self, stream: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
        use hyper_util::server::conn::auto;
        use hyper_util::service::TowerToHyperService;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            .keep_alive(self.keep_alive);
        let builder = builder.http1_only();
        let conn =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(self.service));
        let _ = self.watcher.watch(conn.into_owned()).await;
    }
}

/// Connections past `max_connections` that are still answered (with
/// `/healthz` or a 503) rather than closed at once.
const OVERFLOW_CONNECTIONS: usize = 64;

/// Serves `app` on `listener` until `shutdown` completes, then lets the
/// requests in flight finish (long polls return at once) for at most
/// `shutdown_grace`, and ends the rest.
///
/// Every connection has a header-read timeout (which is also its idle
/// timeout between requests), so clients that open connections and send
/// nothing, or send half a request, cannot hold them; connections are
/// capped, and past the cap a new one is still answered for `/healthz`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    app.follow_shared_store();
    let router = api::router(app.clone());
    let overflow_router = api::overflow_router();
    let slots = Arc::new(tokio::sync::Semaphore::new(app.config.max_connections));
    let overflow = Arc::new(tokio::sync::Semaphore::new(OVERFLOW_CONNECTIONS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let tls = app.config.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    tokio::pin!(shutdown);
    let mut accept_errors = 0u64;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, say: wait for some to close
                    // instead of spinning, and say so now and then.
                    if accept_errors % 100 == 0 {
                        tracing::warn!(error = %e, "accept failed");
                    }
                    accept_errors += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let (permit, service, header_timeout, keep_alive) =
            if let Ok(permit) = slots.clone().try_acquire_owned() {
                let service = WithPeer {
                    router: router.clone(),
                    peer,
                };
                (permit, service, app.config.header_timeout, true)
            } else if let Ok(permit) = overflow.clone().try_acquire_owned() {
                app.metrics
                    .overflow
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let service = WithPeer {
                    router: overflow_router.clone(),
                    peer,
                };
                (permit, service, Duration::from_secs(2), false)
            } else {
                // Closed at once.
                continue;
            };
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let conn = Conn {
                service,
                header_timeout,
                keep_alive,
                watcher,
            };
            match tls {
                None => conn.serve(stream).await,
                Some(tls) => {
                    // The handshake is part of the request's headers: it
                    // gets the same time.
                    match tokio::time::timeout(header_timeout, tls.accept(stream)).await {
                        Ok(Ok(stream)) => conn.serve(stream).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
    app.begin_shutdown();
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(app.config.shutdown_grace) => {
            tracing::warn!("requests still running after the shutdown grace period were ended");
        }
    }
    Ok(())
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
