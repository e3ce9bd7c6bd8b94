//! Wiring: load keys, bind sockets, start one tunnel per node, serve the
//! proxy and the admin API, and shut everything down in order.
//!
//! Building (loading keys, binding sockets) happens in [`Daemon::start`] and
//! fails fast with a clear error; serving runs until the shutdown token fires.
//! One cancellation tree covers everything: the root token, a child per node
//! and per stream. Shutdown waits for tracked tasks with a deadline.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::AdminApi;
use crate::config::{Config, ListenAddr};
use crate::known_hosts::KnownHostsStore;
use crate::proxy::{EgressProxy, ProxyListener, ProxySettings, SharedRoutes};
use crate::route::RouteTable;
use crate::sockets::{bind_unix, BindError};
use crate::status::{rfc3339, NodeStatus, StatusDocument};
use crate::tunnel::{NodeTunnel, SshContext};

/// How long shutdown waits for streams and sessions to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The identity file could not be loaded.
    #[error("cannot load identity file {path}: {reason}")]
    Identity {
        /// The path.
        path: PathBuf,
        /// Why (never key material).
        reason: String,
    },
    /// The known_hosts file could not be read.
    #[error("cannot read known_hosts file {path}: {source}")]
    KnownHosts {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A Unix socket could not be bound.
    #[error("cannot bind socket: {0}")]
    BindUnix(#[from] BindError),
    /// A TCP listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    BindTcp {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The daemon's shared state, read by the admin API.
pub struct Daemon {
    started: Instant,
    tunnels: Mutex<BTreeMap<String, Arc<NodeTunnel>>>,
    routes: SharedRoutes,
    listeners: Vec<String>,
}

impl Daemon {
    /// The status document for `GET /v1/status`.
    pub fn status(&self) -> StatusDocument {
        let tunnels: Vec<Arc<NodeTunnel>> = self
            .tunnels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let nodes = tunnels
            .iter()
            .map(|t| {
                let s = t.state();
                let c = &t.counters;
                let ld =
                    |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                NodeStatus {
                    name: t.node.name.clone(),
                    address: t.node.endpoint(),
                    state: s.state.as_str().to_string(),
                    since: rfc3339(s.since),
                    last_error: s.last_error.map(|e| e.to_string()),
                    reconnects: ld(&c.reconnects),
                    active_streams: ld(&c.active_streams),
                    total_streams: ld(&c.total_streams),
                    bytes_in: ld(&c.bytes_in),
                    bytes_out: ld(&c.bytes_out),
                }
            })
            .collect();
        StatusDocument {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            listeners: self.listeners.clone(),
            nodes,
        }
    }

    /// The live route table.
    pub fn routes(&self) -> &SharedRoutes {
        &self.routes
    }

    /// Loads keys, binds every socket and starts all actors. Returns once
    /// everything is bound; the returned future-free handle keeps running
    /// until `shutdown` fires, then [`Daemon::wait`] finishes the shutdown.
    pub async fn start(
        config: Config,
        shutdown: CancellationToken,
    ) -> Result<(Arc<Daemon>, TaskTracker), StartError> {
        let identity =
            russh::keys::load_secret_key(&config.ssh.identity_file, None).map_err(|e| {
                StartError::Identity {
                    path: config.ssh.identity_file.clone(),
                    reason: e.to_string(),
                }
            })?;
        let known_hosts =
            KnownHostsStore::open(&config.ssh.known_hosts_file).map_err(|source| {
                StartError::KnownHosts {
                    path: config.ssh.known_hosts_file.clone(),
                    source,
                }
            })?;

        // Bind everything before starting anything, so a bind error leaves
        // nothing running.
        let mut listeners = Vec::new();
        for l in &config.proxy.listen {
            listeners.push(match l {
                ListenAddr::Unix(p) => ProxyListener::Unix(bind_unix(p, 0o600)?, p.clone()),
                ListenAddr::Tcp(a) => {
                    ProxyListener::Tcp(tokio::net::TcpListener::bind(a).await.map_err(
                        |source| StartError::BindTcp {
                            addr: a.to_string(),
                            source,
                        },
                    )?)
                }
            });
        }
        let admin_listener = bind_unix(&config.admin.socket, 0o600)?;

        let tracker = TaskTracker::new();
        let ctx = Arc::new(SshContext::new(
            config.ssh.clone(),
            config.reconnect.clone(),
            Arc::new(identity),
            Arc::new(known_hosts),
        ));
        let mut tunnels = BTreeMap::new();
        for n in &config.nodes {
            let t = NodeTunnel::spawn(n.clone(), ctx.clone(), shutdown.child_token(), &tracker);
            tunnels.insert(n.name.clone(), t);
        }
        let table = RouteTable::build(
            config
                .nodes
                .iter()
                .filter_map(|n| tunnels.get(&n.name).map(|t| (n, t.clone()))),
            &config.proxy.service_cidrs,
        );
        let routes: SharedRoutes = Arc::new(ArcSwap::from_pointee(table));

        let daemon = Arc::new(Daemon {
            started: Instant::now(),
            tunnels: Mutex::new(tunnels),
            routes: routes.clone(),
            listeners: listeners.iter().map(ProxyListener::url).collect(),
        });

        let proxy = EgressProxy::new(
            routes,
            ProxySettings {
                dial_timeout: config.proxy.dial_timeout,
            },
            tracker.clone(),
            shutdown.child_token(),
        );
        for l in listeners {
            tracker.spawn(proxy.clone().serve(l));
        }
        let admin = AdminApi::new(daemon.clone(), tracker.clone(), shutdown.child_token());
        let admin_path = config.admin.socket.clone();
        tracker.spawn(admin.serve(admin_listener, admin_path));
        info!(
            nodes = config.nodes.len(),
            admin = %config.admin.socket.display(),
            "tunneler started"
        );
        Ok((daemon, tracker))
    }
}

/// Runs the daemon until `shutdown` fires, then waits (bounded) for every
/// task to finish.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    let (_daemon, tracker) = Daemon::start(config, shutdown.clone()).await?;
    shutdown.cancelled().await;
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
