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

use crate::admin::status::StatusView;
use crate::admin::{AdminApi, AdminHandles};
use crate::config::{Config, ListenAddr};
use crate::control::config_store::ConfigStore;
use crate::control::readiness::Readiness;
use crate::control::registry::NodeRegistry;
use crate::control::sources::SourceBook;
use crate::control::{load_context, Control, ControlParts, KeysError};
use crate::proxy::activation::{PassedSockets, Role};
use crate::proxy::route::RouteTable;
use crate::proxy::sockets::{bind_unix_for, BindError};
use crate::proxy::{EgressProxy, HeadBudget, ProxyListener, ProxySettings, SharedRoutes};
use crate::shard::Shards;
use crate::ssh::context::{ContextCell, SharedContext};

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
    mut passed: PassedSockets,
    shards: Arc<Shards>,
) -> Result<Started, StartError> {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(
        config.ssh.max_concurrent_handshakes,
    ));
    let ctx: SharedContext = Arc::new(ContextCell::new(load_context(&config, handshakes)?));

    // Bind everything before starting anything, so a bind error leaves
    // nothing running.
    check_passed(&config, &passed)?;
    let listeners = bind_proxy_listeners(&config, &mut passed).await?;
    let (admin_listener, admin_unlink) =
        match passed.take_unix(&config.admin.socket, Role::Admin, "admin.socket")? {
            Some(l) => (unix_from_std(l)?, None),
            None => (
                bind_unix_for(&config.admin.socket, config.admin.socket_group.as_deref())?,
                Some(config.admin.socket.clone()),
            ),
        };
    let metrics_listener = match config.admin.metrics_listen {
        None => None,
        Some(a) => Some(tcp_listener(&mut passed, a, Role::Metrics, "admin.metrics_listen").await?),
    };
    passed.finish()?;
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
        shards: shards.clone(),
    }));
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
    // Every shard accepts on every listener (a clone of the socket each),
    // so a stream whose node lives on the shard that accepted it is read,
    // routed, dialled and relayed on that one thread with no hand-off.
    for (l, budget, unlink) in listeners {
        let url = l.url();
        let budget = HeadBudget::new(budget);
        let detached = l.detach().map_err(StartError::Listener)?;
        let mut serving = Vec::with_capacity(shards.len());
        for shard in shards.all() {
            let mine = detached.try_clone().map_err(StartError::Listener)?;
            let (proxy, budget) = (proxy.clone(), budget.clone());
            serving.push(shard.spawn(&tracker, async move {
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

/// The daemon's signal streams. Installed first thing (see `main.rs`):
/// from then on a signal is recorded by its stream, never acted on by its
/// default action (which ends the process), whatever the daemon is doing.
#[derive(Debug)]
pub struct Signals {
    /// SIGHUP: reload, once the daemon is ready.
    pub hangup: tokio::signal::unix::Signal,
    /// SIGTERM: graceful stop.
    pub terminate: tokio::signal::unix::Signal,
    /// SIGINT: graceful stop.
    pub interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    /// Registers the three handlers. Call inside a tokio runtime.
    pub fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }
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
    mut hup: tokio::signal::unix::Signal,
) -> Result<(), StartError> {
    let first_attempt_bound = config.ssh.connect_timeout * 2 + Duration::from_secs(1);
    // Everything runs under `stop`, which fires only after the drain.
    let stop = CancellationToken::new();
    // The shard threads outlive everything below: tasks on a shard only
    // progress while its thread runs, and the graceful drain needs them.
    let shards = Arc::new(Shards::start(config.runtime.shards).map_err(StartError::Shards)?);
    let Started {
        control,
        readiness,
        tracker,
        accepting,
        proxy_tasks,
        config: store,
    } = start(config, config_path, stop.clone(), passed, shards.clone()).await?;
    let shutdown_signal = shutdown.clone();
    let shutdown = stop.clone();
    // systemd: READY=1 once the listeners are bound (done) and the first
    // connection attempt to every node has finished, success or not.
    let ready_cancel = shutdown.clone();
    let ready = CancellationToken::new();
    let became_ready = ready.clone();
    tracker.spawn(async move {
        readiness
            .latch_after_first_attempts(first_attempt_bound, ready_cancel)
            .await;
        became_ready.cancel();
        if *readiness.started().borrow() {
            info!("ready: listeners bound, first connection attempts finished");
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        }
    });
    // Freed memory back to the system after streams came and went.
    let trim_shards = shards.clone();
    tracker.spawn(crate::memory::trim_loop(
        crate::memory::TRIM_EVERY,
        move || trim_shards.loads().iter().map(|l| l.total_streams).sum(),
        shutdown.clone(),
    ));
    // WATCHDOG=1 from the control runtime, only while every shard runs a
    // no-op task in time: if any runtime wedges, systemd notices and
    // restarts us. It goes on through the drain, which may be longer than
    // WatchdogSec.
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
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
    let hup_control = control;
    let hup_cancel = shutdown.clone();
    tracker.spawn(async move {
        // SIGHUPs before ready (tokio's stream kept any that came during
        // the start) fold into one reload, applied once ready.
        let mut pending = false;
        loop {
            tokio::select! {
                _ = hup_cancel.cancelled() => return,
                _ = ready.cancelled(), if pending => {
                    pending = false;
                    info!("ready: applying the reload asked for by SIGHUP during the start");
                    let _ = hup_control.reload().await;
                }
                r = hup.recv() => {
                    if r.is_none() {
                        return;
                    }
                    if ready.is_cancelled() {
                        info!("SIGHUP received: reloading the config");
                        let _ = hup_control.reload().await;
                    } else if !pending {
                        info!("SIGHUP received before the daemon is ready: reloading once it is");
                        pending = true;
                    }
                }
            }
        }
    });
    shutdown_signal.cancelled().await;
    // Listening for a second SIGTERM or SIGINT (an impatient operator) ends
    // the drain; registered before anything says the drain began.
    let again = {
        use tokio::signal::unix::{signal, SignalKind};
        let signals = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        async move {
            match signals {
                (Ok(mut term), Ok(mut int)) => tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                },
                _ => std::future::pending().await,
            }
        }
    };
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
    Ok(())
}
