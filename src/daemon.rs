//! The composition root: load keys, bind sockets, build each part and hand
//! it the narrow handles it needs, serve until shutdown, and shut down in
//! order. Nothing imports this module but `main`.
//!
//! Building (loading keys, binding sockets) happens in [`start`] and fails
//! fast with a clear error; serving runs until the shutdown token fires.
//! One cancellation tree covers everything: the root token, a child per node
//! and per stream. Shutdown waits for tracked tasks with a deadline.
//!
//! The parts: the [`NodeRegistry`] (live nodes), the [`SourceBook`]
//! (discovery bookkeeping), the [`ConfigStore`] (the running config and
//! the change lock), [`Control`] (node-set changes and reload),
//! [`StatusView`] (the status document), [`Readiness`], the proxy and the
//! admin API.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::{AdminApi, AdminHandles};
use crate::config::{Config, ListenAddr};
use crate::config_store::ConfigStore;
use crate::control::{load_context, Control, ControlParts, KeysError};
use crate::proxy::{EgressProxy, ProxyListener, ProxySettings, SharedRoutes};
use crate::readiness::Readiness;
use crate::registry::NodeRegistry;
use crate::route::RouteTable;
use crate::sockets::{bind_unix_for, BindError};
use crate::sources::SourceBook;
use crate::ssh_context::{ContextCell, SharedContext};
use crate::status::StatusView;

/// How long shutdown waits for streams and sessions to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The SSH identity or known_hosts could not be loaded.
    #[error(transparent)]
    Keys(#[from] KeysError),
    /// A Unix socket could not be bound.
    #[error("cannot bind socket: {0}")]
    BindUnix(#[from] BindError),
    /// The TLS listener's certificates could not be loaded.
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    /// A TCP listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    BindTcp {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The running parts `run` drives after start.
pub struct Started {
    /// Node-set changes and reload (SIGHUP uses it).
    pub control: Arc<Control>,
    /// The start latch (systemd readiness).
    pub readiness: Arc<Readiness>,
    /// Every task; shutdown waits for them.
    pub tracker: TaskTracker,
}

/// Loads keys, binds every socket and starts all actors. Returns once
/// everything is bound; tasks run on the returned tracker until `shutdown`
/// fires.
pub async fn start(
    config: Config,
    config_path: Option<PathBuf>,
    shutdown: CancellationToken,
) -> Result<Started, StartError> {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(
        config.ssh.max_concurrent_handshakes,
    ));
    let ctx: SharedContext = Arc::new(ContextCell::new(load_context(&config, handshakes)?));

    // Bind everything before starting anything, so a bind error leaves
    // nothing running.
    let listeners = bind_proxy_listeners(&config).await?;
    let admin_listener = bind_unix_for(&config.admin.socket, config.admin.socket_group.as_deref())?;
    let metrics_listener =
        match config.admin.metrics_listen {
            None => None,
            Some(a) => Some(tokio::net::TcpListener::bind(a).await.map_err(|source| {
                StartError::BindTcp {
                    addr: a.to_string(),
                    source,
                }
            })?),
        };

    let tracker = TaskTracker::new();
    let settings = Arc::new(ArcSwap::from_pointee(ProxySettings::from_config(
        &config.proxy,
    )));
    let registry = Arc::new(NodeRegistry::new());
    let for_metrics = registry.clone();
    let metrics = Arc::new(crate::metrics::Metrics::new(Arc::new(move || {
        for_metrics.tunnels()
    })));
    let routes: SharedRoutes = Arc::new(ArcSwap::from_pointee(RouteTable::empty()));
    let sources = Arc::new(SourceBook::new(metrics.clone()));
    let store = Arc::new(ConfigStore::new(config.clone()));
    let control = Arc::new(Control::new(ControlParts {
        config_path,
        config: store.clone(),
        registry: registry.clone(),
        sources: sources.clone(),
        routes: routes.clone(),
        settings: settings.clone(),
        ctx,
        metrics: metrics.clone(),
        tracker: tracker.clone(),
        shutdown: shutdown.clone(),
    }));
    control.start_config_nodes();
    let status = Arc::new(StatusView::new(
        listeners.iter().map(|(l, _)| l.url()).collect(),
        registry.clone(),
        sources,
        routes.clone(),
    ));
    let readiness = Arc::new(Readiness::new(store.clone(), registry));

    let proxy = EgressProxy::new(
        routes,
        settings,
        metrics.dial.clone(),
        tracker.clone(),
        shutdown.child_token(),
    );
    for (l, budget) in listeners {
        tracker.spawn(proxy.clone().serve(l, budget));
    }
    let admin = AdminApi::new(
        AdminHandles {
            control: control.clone(),
            status,
            readiness: readiness.clone(),
            metrics: metrics.clone(),
            config: store,
        },
        tracker.clone(),
        shutdown.child_token(),
    );
    tracker.spawn(admin.serve(admin_listener, config.admin.socket.clone()));
    if let Some(path) = config.discovery.nodes_file.clone() {
        tracker.spawn(crate::discovery::watch_file(
            control.clone(),
            path,
            config.discovery.address_types.clone(),
            shutdown.child_token(),
        ));
    }
    if let Some(kube) = config.discovery.kubernetes.clone() {
        tracker.spawn(crate::kube_watch::run(
            control.clone(),
            kube,
            config.discovery.address_types.clone(),
            shutdown.child_token(),
        ));
    }
    if let Some(l) = metrics_listener {
        tracker.spawn(crate::admin::serve_metrics(
            l,
            metrics,
            tracker.clone(),
            shutdown.child_token(),
        ));
    }
    info!(
        nodes = config.nodes.len(),
        admin = %config.admin.socket.display(),
        "tunneler started"
    );
    Ok(Started {
        control,
        readiness,
        tracker,
    })
}

/// Binds the egress listeners, each with its own pending-handshake budget.
async fn bind_proxy_listeners(config: &Config) -> Result<Vec<(ProxyListener, usize)>, StartError> {
    let mut listeners = Vec::new();
    let budget = config.proxy.max_pending_handshakes;
    for l in &config.proxy.listen {
        listeners.push((
            match l {
                ListenAddr::Unix(p) => ProxyListener::Unix(
                    bind_unix_for(p, config.proxy.socket_group.as_deref())?,
                    p.clone(),
                ),
                ListenAddr::Tcp(a) => {
                    ProxyListener::Tcp(tokio::net::TcpListener::bind(a).await.map_err(
                        |source| StartError::BindTcp {
                            addr: a.to_string(),
                            source,
                        },
                    )?)
                }
            },
            budget,
        ));
    }
    if let Some(tls) = &config.proxy.tls {
        let acceptor = crate::tls::acceptor(tls)?;
        if tls.client_names.is_empty() {
            warn!(
                client_ca_file = %tls.client_ca_file.display(),
                "proxy.tls.client_names is empty: every certificate that chains to client_ca_file may use the proxy; if that is the cluster CA, every kubelet's client certificate can"
            );
        }
        let l = tokio::net::TcpListener::bind(tls.listen)
            .await
            .map_err(|source| StartError::BindTcp {
                addr: tls.listen.to_string(),
                source,
            })?;
        listeners.push((ProxyListener::Tls(l, acceptor), tls.max_pending_handshakes));
    }
    Ok(listeners)
}

/// Runs the daemon until `shutdown` fires, then waits (bounded) for every
/// task to finish. SIGHUP reloads `config_path`.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let first_attempt_bound = config.ssh.connect_timeout * 2 + Duration::from_secs(1);
    let Started {
        control,
        readiness,
        tracker,
    } = start(config, config_path, shutdown.clone()).await?;
    // systemd: READY=1 once the listeners are bound (done) and the first
    // connection attempt to every node has finished, success or not.
    let ready_cancel = shutdown.clone();
    tracker.spawn(async move {
        readiness
            .latch_after_first_attempts(first_attempt_bound, ready_cancel)
            .await;
        if *readiness.started().borrow() {
            info!("ready: listeners bound, first connection attempts finished");
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        }
    });
    // WATCHDOG=1 from a loop on the same runtime as the tunnels: if the
    // runtime wedges, systemd notices and restarts us.
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        let every = Duration::from_micros(usec / 2);
        let wd_cancel = shutdown.clone();
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = wd_cancel.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
        });
    }
    let hup_control = control;
    let hup_cancel = shutdown.clone();
    tracker.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            warn!("cannot listen for SIGHUP; reload through the admin API only");
            return;
        };
        loop {
            tokio::select! {
                _ = hup_cancel.cancelled() => return,
                r = hup.recv() => if r.is_none() { return },
            }
            info!("SIGHUP received: reloading the config");
            let _ = hup_control.reload().await;
        }
    });
    shutdown.cancelled().await;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    info!("shutting down");
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!(grace = ?SHUTDOWN_GRACE, "some tasks did not finish in time; exiting anyway");
    }
    info!("stopped");
    Ok(())
}
