//! The composition root: load keys, bind sockets, build each part and hand
//! it the narrow handles it needs, serve until shutdown, and shut down in
//! order. Nothing imports this module but `main`.
//!
//! Building (loading keys, binding sockets) happens in [`start`] and fails
//! fast with a clear error; serving runs until the shutdown token fires.
//! One cancellation tree covers everything: the root token, a child per node
//! and per stream. Shutdown is graceful ([`run`]): the listeners stop first
//! (a child token of the root), open connections get the drain timeout,
//! then the root fires and tracked tasks get a deadline. Sockets may come
//! bound from the service manager ([`crate::proxy::activation`]).
//!
//! The parts: the [`NodeRegistry`] (live nodes), the [`SourceBook`]
//! (discovery bookkeeping), the [`ConfigStore`] (the running config and
//! the change lock), [`Control`] (node-set changes and reload),
//! [`StatusView`] (the status document), [`Readiness`], the proxy and the
//! admin API.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub mod signals;

use crate::admin::status::StatusView;
use crate::admin::{AdminApi, AdminHandles};
use crate::config::{Config, ListenAddr};
use crate::control::config_store::ConfigStore;
use crate::control::readiness::Readiness;
use crate::control::registry::NodeRegistry;
use crate::control::sources::SourceBook;
use crate::control::{load_context, Control, KeysError};
use crate::proxy::activation::{PassedSockets, Role};
use crate::proxy::route::RouteTable;
use crate::proxy::sockets::{bind_unix_for, BindError};
use crate::proxy::{EgressProxy, HeadBudget, ProxyListener, ProxySettings, SharedRoutes};
use crate::shard::Shards;
use crate::ssh::context::SharedContext;
use crate::tunnel::{SettingsCell, TunnelSettings};

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
    Tls(#[from] crate::proxy::tls::TlsError),
    /// The shard threads could not be started.
    #[error("cannot start the shard threads: {0}")]
    Shards(std::io::Error),
    /// A bound listener could not be handed to the shard threads.
    #[error("cannot hand a listener to the shard threads: {0}")]
    Listener(std::io::Error),
    /// A socket passed by the service manager cannot be used.
    #[error("{0}")]
    Activation(#[from] crate::proxy::activation::ActivationError),
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
    /// Stops the listeners only (graceful stop): a child of `shutdown`.
    pub accepting: CancellationToken,
    /// Every egress connection: handshakes, dials, streams. A graceful stop
    /// waits for these (up to the drain timeout) before `shutdown` fires.
    pub proxy_tasks: TaskTracker,
    /// The running config (the drain timeout at stop).
    pub config: Arc<ConfigStore>,
}

/// Loads keys, binds every socket and starts all actors. Returns once
/// everything is bound; tasks run on the returned tracker until `shutdown`
/// fires. Listeners whose address a socket in `passed` is bound to use that
/// socket (see [`crate::proxy::activation`]); any passed socket left over is an
/// error, and nothing is started. Each node, with its sessions and
/// streams, runs on one of `shards`; everything else on the caller's
/// runtime, which becomes the control runtime.
pub async fn start(
    config: Config,
    config_path: Option<PathBuf>,
    shutdown: CancellationToken,
    passed: PassedSockets,
    shards: Arc<Shards>,
) -> Result<Started, StartError> {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(
        config.ssh.max_concurrent_handshakes,
    ));
    let ctx: SharedContext = Arc::new(ArcSwap::from_pointee(load_context(&config, handshakes)?));
    let tunnel_settings = Arc::new(SettingsCell::new(TunnelSettings::from_config(&config)));

    // Bind everything before starting anything, so a bind error leaves
    // nothing running.
    let Sockets {
        listeners,
        admin: (admin_listener, admin_unlink),
        metrics: metrics_listener,
    } = bind_all(&config, passed).await?;
    let accepting = shutdown.child_token();
    let proxy_tasks = TaskTracker::new();

    let tracker = TaskTracker::new();
    let settings = Arc::new(ArcSwap::from_pointee(ProxySettings::from_config(
        &config.proxy,
    )));
    let registry = Arc::new(NodeRegistry::new());
    let for_metrics = registry.clone();
    let metrics = Arc::new(crate::metrics::Metrics::new(
        Arc::new(move || for_metrics.tunnels()),
        Some(shards.clone()),
    ));
    let routes: SharedRoutes = Arc::new(ArcSwap::from_pointee(RouteTable::empty()));
    let sources = Arc::new(SourceBook::new(metrics.clone()));
    let store = Arc::new(ConfigStore::new(config.clone()));
    let control = Arc::new(Control {
        config_path,
        config: store.clone(),
        registry: registry.clone(),
        sources: sources.clone(),
        routes: routes.clone(),
        settings: settings.clone(),
        ctx,
        tunnel_settings,
        metrics: metrics.clone(),
        tracker: tracker.clone(),
        shutdown: shutdown.clone(),
        shards: shards.clone(),
    });
    control.start_config_nodes();
    let status = Arc::new(StatusView::new(
        listeners.iter().map(|(l, _, _)| l.url()).collect(),
        registry.clone(),
        sources,
        routes.clone(),
    ));
    let readiness = Arc::new(Readiness::new(store.clone(), registry));

    let proxy = EgressProxy::new(
        routes,
        settings,
        metrics.dial.clone(),
        proxy_tasks.clone(),
        shutdown.child_token(),
    )
    .stop_accepting_on(accepting.clone());
    serve_proxy(listeners, &proxy, &shards, &tracker)?;
    let admin = AdminApi::new(
        AdminHandles {
            control: control.clone(),
            status,
            readiness: readiness.clone(),
            metrics: metrics.clone(),
            config: store.clone(),
            streams: proxy.live_streams(),
        },
        tracker.clone(),
        shutdown.child_token(),
    );
    let admin_path = config.admin.socket.clone();
    tracker.spawn(async move {
        admin.serve(admin_listener, admin_path).await;
        if let Some(path) = admin_unlink {
            let _ = std::fs::remove_file(path);
        }
    });
    spawn_sources(&config, &control, &tracker, &shutdown);
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
        shards = shards.len(),
        admin = %config.admin.socket.display(),
        "tunneler started"
    );
    Ok(Started {
        control,
        readiness,
        tracker,
        accepting,
        proxy_tasks,
        config: store,
    })
}

/// Every socket the daemon serves on, bound (or taken from the service
/// manager) before anything starts.
struct Sockets {
    /// The egress listeners.
    listeners: Vec<Bound>,
    /// The admin socket, and its path if we bound it (removed after).
    admin: (tokio::net::UnixListener, Option<PathBuf>),
    /// The metrics listener, if configured.
    metrics: Option<tokio::net::TcpListener>,
}

/// Binds every listener `config` names, taking the passed socket where one
/// matches; a passed socket left over is an error.
async fn bind_all(config: &Config, mut passed: PassedSockets) -> Result<Sockets, StartError> {
    check_passed(config, &passed)?;
    let listeners = bind_proxy_listeners(config, &mut passed).await?;
    let admin = match passed.take_unix(&config.admin.socket, Role::Admin, "admin.socket")? {
        Some(l) => (unix_from_std(l)?, None),
        None => (
            bind_unix_for(&config.admin.socket, config.admin.socket_group.as_deref())?,
            Some(config.admin.socket.clone()),
        ),
    };
    let metrics = match config.admin.metrics_listen {
        None => None,
        Some(a) => Some(tcp_listener(&mut passed, a, Role::Metrics, "admin.metrics_listen").await?),
    };
    passed.finish()?;
    Ok(Sockets {
        listeners,
        admin,
        metrics,
    })
}

/// Serves `proxy` on every listener. Every shard accepts on every listener
/// (a clone of the socket each), so a stream whose node lives on the shard
/// that accepted it is read, routed, dialled and relayed on that one
/// thread with no hand-off.
fn serve_proxy(
    listeners: Vec<Bound>,
    proxy: &EgressProxy,
    shards: &Shards,
    tracker: &TaskTracker,
) -> Result<(), StartError> {
    for (l, budget, unlink) in listeners {
        let url = l.url();
        let budget = HeadBudget::new(budget);
        let detached = l.detach().map_err(StartError::Listener)?;
        let mut serving = Vec::with_capacity(shards.len());
        for shard in shards.all() {
            let mine = detached.try_clone().map_err(StartError::Listener)?;
            let (proxy, budget) = (proxy.clone(), budget.clone());
            serving.push(shard.spawn(tracker, async move {
                match mine.attach() {
                    Ok(l) => proxy.serve(l, budget).await,
                    Err(e) => warn!(error = %e, "a shard cannot accept on a listener"),
                }
            }));
        }
        drop(detached);
        info!(listener = %url, shards = serving.len(), "egress proxy listening");
        tracker.spawn(async move {
            for s in serving {
                let _ = s.await;
            }
            // Only a socket we bound: a passed one stays with the service
            // manager, and new connections queue on it for the next daemon.
            if let Some(path) = unlink {
                let _ = std::fs::remove_file(path);
            }
        });
    }
    Ok(())
}

/// Starts the node sources `config` names: the nodes file and the
/// Kubernetes watch.
fn spawn_sources(
    config: &Config,
    control: &Arc<Control>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    if let Some(path) = config.discovery.nodes_file.clone() {
        tracker.spawn(crate::discovery::watch_file(
            control.clone(),
            path,
            config.discovery.address_types.clone(),
            shutdown.child_token(),
        ));
    }
    if let Some(kube) = config.discovery.kubernetes.clone() {
        tracker.spawn(crate::discovery::kube_watch::run(
            control.clone(),
            kube,
            config.discovery.address_types.clone(),
            shutdown.child_token(),
        ));
    }
}

/// Refuses a passed socket that matches no listener setting, before
/// anything is bound.
fn check_passed(config: &Config, passed: &PassedSockets) -> Result<(), StartError> {
    let unix_paths: Vec<&Path> = config
        .proxy
        .listen
        .iter()
        .filter_map(|l| match l {
            ListenAddr::Unix(p) => Some(p.as_path()),
            ListenAddr::Tcp(_) => None,
        })
        .chain([config.admin.socket.as_path()])
        .collect();
    let tcp_addrs: Vec<std::net::SocketAddr> = config
        .proxy
        .listen
        .iter()
        .filter_map(|l| match l {
            ListenAddr::Tcp(a) => Some(*a),
            ListenAddr::Unix(_) => None,
        })
        .chain(config.proxy.tls.as_ref().map(|t| t.listen))
        .chain(config.admin.metrics_listen)
        .collect();
    passed.check_known(&unix_paths, &tcp_addrs)?;
    Ok(())
}

/// A passed Unix listener on the runtime.
fn unix_from_std(
    l: std::os::unix::net::UnixListener,
) -> Result<tokio::net::UnixListener, StartError> {
    let addr = l
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
        .unwrap_or_default();
    tokio::net::UnixListener::from_std(l).map_err(|e| {
        StartError::BindUnix(BindError::Io {
            path: addr,
            source: e,
        })
    })
}

/// The passed TCP socket bound to `addr`, else a new one bound there.
async fn tcp_listener(
    passed: &mut PassedSockets,
    addr: std::net::SocketAddr,
    role: Role,
    setting: &str,
) -> Result<tokio::net::TcpListener, StartError> {
    let bind_error = |source| StartError::BindTcp {
        addr: addr.to_string(),
        source,
    };
    match passed.take_tcp(addr, role, setting)? {
        Some(l) => tokio::net::TcpListener::from_std(l).map_err(bind_error),
        None => tokio::net::TcpListener::bind(addr)
            .await
            .map_err(bind_error),
    }
}

/// A listener, its pending-handshake budget, and the path we bound (and so
/// remove after serving; never a passed socket's).
type Bound = (ProxyListener, usize, Option<PathBuf>);

/// Binds the egress listeners (or takes the passed ones), each with its own
/// pending-handshake budget.
async fn bind_proxy_listeners(
    config: &Config,
    passed: &mut PassedSockets,
) -> Result<Vec<Bound>, StartError> {
    let mut listeners = Vec::new();
    let budget = config.proxy.max_pending_handshakes;
    for (i, l) in config.proxy.listen.iter().enumerate() {
        let setting = format!("proxy.listen[{i}]");
        listeners.push(match l {
            ListenAddr::Unix(p) => match passed.take_unix(p, Role::Egress, &setting)? {
                Some(l) => (
                    ProxyListener::Unix(unix_from_std(l)?, p.clone()),
                    budget,
                    None,
                ),
                None => (
                    ProxyListener::Unix(
                        bind_unix_for(p, config.proxy.socket_group.as_deref())?,
                        p.clone(),
                    ),
                    budget,
                    Some(p.clone()),
                ),
            },
            ListenAddr::Tcp(a) => (
                ProxyListener::Tcp(tcp_listener(passed, *a, Role::Egress, &setting).await?),
                budget,
                None,
            ),
        });
    }
    if let Some(tls) = &config.proxy.tls {
        let acceptor = crate::proxy::tls::acceptor(tls)?;
        if tls.client_names.is_empty() {
            warn!(
                client_ca_file = %tls.client_ca_file.display(),
                "proxy.tls.client_names is empty: every certificate that chains to client_ca_file may use the proxy; if that is the cluster CA, every kubelet's client certificate can"
            );
        }
        let l = tcp_listener(passed, tls.listen, Role::Egress, "proxy.tls.listen").await?;
        listeners.push((
            ProxyListener::Tls(l, acceptor),
            tls.max_pending_handshakes,
            None,
        ));
    }
    Ok(listeners)
}

/// Runs the daemon until `shutdown` fires, then stops gracefully: the
/// listeners stop accepting at once, connections already accepted (their
/// handshakes, dials and streams) get up to `proxy.drain_timeout` to finish
/// while the tunnels stay up (a second SIGTERM or SIGINT ends that wait),
/// then whatever is left is cut and every task gets [`SHUTDOWN_GRACE`] to
/// end. SIGHUP (`hangup`, registered by the caller before anything else)
/// reloads `config_path`; one that arrives before the daemon is ready
/// (listeners bound, first connection attempts done) is logged and
/// applied once it is. `passed` are the sockets the service manager handed
/// in (see [`crate::proxy::activation`]).
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    shutdown: CancellationToken,
    passed: PassedSockets,
    hup: tokio::signal::unix::Signal,
) -> Result<(), StartError> {
    let first_attempt_bound = config.ssh.connect_timeout * 2 + Duration::from_secs(1);
    // Everything runs under `stop`, which fires only after the drain.
    let stop = CancellationToken::new();
    // The shard threads outlive everything below: tasks on a shard only
    // progress while its thread runs, and the graceful drain needs them.
    let shards = Arc::new(Shards::start(config.runtime.shards).map_err(StartError::Shards)?);
    let started = start(config, config_path, stop.clone(), passed, shards.clone()).await?;
    let tracker = &started.tracker;
    let ready = spawn_readiness(
        tracker,
        started.readiness.clone(),
        first_attempt_bound,
        &stop,
    );
    // Freed memory back to the system after streams came and went.
    let trim_shards = shards.clone();
    tracker.spawn(crate::memory::trim_loop(
        crate::memory::TRIM_EVERY,
        move || trim_shards.loads().iter().map(|l| l.total_streams).sum(),
        stop.clone(),
    ));
    spawn_watchdog(tracker, &shards, &stop);
    let hup_control = started.control.clone();
    tracker.spawn(signals::reload_on_hangup(
        hup,
        ready,
        stop.clone(),
        move || {
            let control = hup_control.clone();
            async move {
                let _ = control.reload().await;
            }
        },
    ));
    shutdown.cancelled().await;
    shut_down(started, stop, &shards).await;
    Ok(())
}

/// systemd: READY=1 once the listeners are bound (done) and the first
/// connection attempt to every node has finished, success or not (at most
/// `bound`). The returned token fires then.
fn spawn_readiness(
    tracker: &TaskTracker,
    readiness: Arc<Readiness>,
    bound: Duration,
    shutdown: &CancellationToken,
) -> CancellationToken {
    let ready_cancel = shutdown.clone();
    let ready = CancellationToken::new();
    let became_ready = ready.clone();
    tracker.spawn(async move {
        readiness
            .latch_after_first_attempts(bound, ready_cancel)
            .await;
        became_ready.cancel();
        if *readiness.started().borrow() {
            info!("ready: listeners bound, first connection attempts finished");
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        }
    });
    ready
}

/// WATCHDOG=1 from the control runtime, only while every shard runs a
/// no-op task in time: if any runtime wedges, systemd notices and restarts
/// us. It goes on through the drain, which may be longer than WatchdogSec.
fn spawn_watchdog(tracker: &TaskTracker, shards: &Arc<Shards>, shutdown: &CancellationToken) {
    let mut usec = 0u64;
    if !(sd_notify::watchdog_enabled(false, &mut usec) && usec > 0) {
        return;
    }
    let every = Duration::from_micros(usec / 2);
    let wd_cancel = shutdown.clone();
    let wd_shards = shards.clone();
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = wd_cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if wd_shards.responsive(every).await {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            } else {
                warn!("a shard thread did not answer in time; withholding the watchdog ping");
            }
        }
    });
}

/// The graceful stop, in order: stop accepting, give open connections the
/// drain timeout (a second SIGTERM or SIGINT ends that wait), cut what is
/// left by firing `stop`, give every task [`SHUTDOWN_GRACE`], then stop
/// the shard threads.
async fn shut_down(started: Started, stop: CancellationToken, shards: &Shards) {
    let Started {
        tracker,
        accepting,
        proxy_tasks,
        config: store,
        ..
    } = started;
    // A second SIGTERM or SIGINT (an impatient operator) ends the drain;
    // listened for before anything says the drain began.
    let again = signals::stop_again();
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    accepting.cancel();
    let limit = store.load().proxy.drain_timeout;
    let open = proxy_tasks.len();
    info!(
        open,
        ?limit,
        "shutting down: stopped accepting; open connections may finish within the drain timeout"
    );
    proxy_tasks.close();
    let drained = tokio::select! {
        r = tokio::time::timeout(limit, proxy_tasks.wait()) => r.is_ok(),
        _ = again => {
            warn!(open = proxy_tasks.len(), "second signal: not waiting for the drain; cutting the connections still open");
            true
        }
    };
    if !drained {
        warn!(
            open = proxy_tasks.len(),
            ?limit,
            "drain timeout: cutting the connections still open"
        );
    }
    stop.cancel();
    tracker.close();
    let all_done = async {
        tracker.wait().await;
        proxy_tasks.wait().await;
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, all_done)
        .await
        .is_err()
    {
        warn!(grace = ?SHUTDOWN_GRACE, "some tasks did not finish in time; exiting anyway");
    }
    shards.stop(Duration::from_secs(2));
    info!(drained, "stopped");
}
