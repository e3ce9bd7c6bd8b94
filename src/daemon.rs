//! Wiring: load keys, bind sockets, start one tunnel per node, serve the
//! proxy and the admin API, change the node set live, and shut down in order.
//!
//! Building (loading keys, binding sockets) happens in [`Daemon::start`] and
//! fails fast with a clear error; serving runs until the shutdown token fires.
//! One cancellation tree covers everything: the root token, a child per node
//! and per stream. Shutdown waits for tracked tasks with a deadline.
//!
//! Every change to the node set (API add/remove, reload) goes through one
//! async lock, is validated as a whole before anything is touched, and ends
//! by swapping in a new route table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn, Instrument};

use crate::admin::AdminApi;
use crate::config::{
    check_node_set, check_pod_scope, check_strict_against_discovered, Config, ConfigError,
    ListenAddr, NodeConfig,
};
use crate::identity::Identity;
use crate::known_hosts::KnownHostsStore;
use crate::node_set::{Candidate, Rejection};
use crate::proxy::{EgressProxy, ProxyListener, ProxySettings, SharedRoutes};
use crate::route::RouteTable;
use crate::shard::Shards;
use crate::sockets::{bind_unix_for, BindError};
use crate::status::{rfc3339, AmbiguousAddress, NodeStatus, StatusDocument};
use crate::tunnel::{NodeTunnel, SharedContext, SshContext, TunnelState};

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
    /// The TLS listener's certificates could not be loaded.
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The shard threads could not be started.
    #[error("cannot start the shard threads: {0}")]
    Shards(std::io::Error),
    /// A TCP listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    BindTcp {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Why a change to the node set was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The named node does not exist.
    #[error("no node named {0:?}")]
    NotFound(String),
    /// A node with this name exists already.
    #[error("a node named {0:?} exists already")]
    Exists(String),
    /// The request or the new config is invalid.
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    /// The new config's keys could not be loaded.
    #[error("{0}")]
    Start(#[from] StartError),
    /// A name is already provided by another source.
    #[error(
        "node {name:?} comes from the {other} source already; a name may come from one source only"
    )]
    Conflict {
        /// The node.
        name: String,
        /// The source that has it.
        other: &'static str,
    },
    /// The node belongs to a discovery source, which would bring it back.
    #[error("node {name:?} comes from the {from} discovery source; remove it there")]
    Discovered {
        /// The node.
        name: String,
        /// Its source.
        from: &'static str,
    },
    /// There is no config file to reload (started from a Config value).
    #[error("this daemon was not started from a config file")]
    NoConfigFile,
    /// A tunnel operation failed (e.g. a reconnect could not connect).
    #[error("{0}")]
    Tunnel(#[from] crate::error::TunnelError),
}

/// Where a node came from. Reload manages `Config` nodes only; nodes added
/// through the API survive a reload unless the config names them too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A `[[node]]` entry in the config file.
    Config,
    /// `POST /v1/nodes`.
    Api,
    /// `[discovery] nodes_file`.
    File,
    /// `[discovery.kubernetes]`.
    Kubernetes,
}

impl Source {
    /// The name shown in status.
    pub fn as_str(&self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Api => "api",
            Source::File => "file",
            Source::Kubernetes => "kubernetes",
        }
    }
}

/// How a discovery source is doing, for the status page.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct SourceStatus {
    /// file or kubernetes.
    pub source: String,
    /// Last successful sync (RFC 3339).
    pub last_success: Option<String>,
    /// The current error, if the last attempt failed.
    pub last_error: Option<String>,
    /// Nodes this source provides now.
    pub nodes: usize,
    /// Nodes this source lists that were not applied, with why. A `kept`
    /// one still serves its last good config.
    #[serde(default)]
    pub rejected: Vec<Rejection>,
}

/// What a sync of one node source did.
#[derive(Debug, Default, Serialize)]
pub struct SyncReport {
    /// Nodes started.
    pub added: Vec<String>,
    /// Nodes drained and closed.
    pub removed: Vec<String>,
    /// Nodes replaced.
    pub changed: Vec<String>,
    /// Nodes untouched.
    pub unchanged: usize,
    /// Nodes the source lists that were rejected (see the source status).
    pub rejected: usize,
}

struct NodeEntry {
    tunnel: Arc<NodeTunnel>,
    source: Source,
}

/// What a reload did: the config nodes' changes, and warnings.
#[derive(Debug, Default, Serialize)]
pub struct ReloadReport {
    /// Added, removed, changed (replaced after draining) and unchanged
    /// (connection and `since` kept) config nodes.
    #[serde(flatten)]
    pub nodes: SyncReport,
    /// Settings that only take effect after a restart.
    pub warnings: Vec<String>,
}

/// The daemon's shared state, read and changed by the admin API.
pub struct Daemon {
    started: Instant,
    config_path: Option<PathBuf>,
    nodes: Arc<Mutex<BTreeMap<String, NodeEntry>>>,
    metrics: Arc<crate::metrics::Metrics>,
    changes: tokio::sync::Mutex<Config>,
    routes: SharedRoutes,
    settings: Arc<ArcSwap<ProxySettings>>,
    ctx: SharedContext,
    listeners: Vec<String>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    sources: Mutex<BTreeMap<&'static str, SourceStatus>>,
    shards: Arc<Shards>,
}

fn load_context(
    config: &Config,
    handshakes: Arc<tokio::sync::Semaphore>,
) -> Result<SshContext, StartError> {
    let identity = Identity::load(&config.ssh).map_err(|e| StartError::Identity {
        path: config.ssh.identity_file.clone(),
        reason: e.to_string(),
    })?;
    let known_hosts = KnownHostsStore::open(&config.ssh.known_hosts_file).map_err(|source| {
        StartError::KnownHosts {
            path: config.ssh.known_hosts_file.clone(),
            source,
        }
    })?;
    Ok(SshContext::new(
        config.ssh.clone(),
        config.reconnect.clone(),
        config.health.clone(),
        config.proxy.drain_timeout,
        Arc::new(identity),
        Arc::new(known_hosts),
        handshakes,
    ))
}

impl Daemon {
    /// The status document for `GET /v1/status`.
    pub fn status(&self) -> StatusDocument {
        let (tunnels, sources): (Vec<Arc<NodeTunnel>>, BTreeMap<String, Source>) = {
            let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
            (
                nodes.values().map(|e| e.tunnel.clone()).collect(),
                nodes.iter().map(|(n, e)| (n.clone(), e.source)).collect(),
            )
        };
        let nodes = tunnels
            .iter()
            .map(|t| {
                let s = t.state();
                let c = &t.counters;
                let g = t.congestion();
                let ld =
                    |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                NodeStatus {
                    source: sources.get(&t.node.name).map(|s| s.as_str().to_string()),
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
                    rtt_ms: s.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    next_retry: s.next_retry.map(rfc3339),
                    host_key_mismatches: ld(&c.host_key_mismatches),
                    sessions: g.sessions as u64,
                    congested_sessions: g.congested_sessions as u64,
                    blocked_seconds: g.blocked_seconds,
                    streams_slowed: g.streams_slowed,
                    shard: Some(t.shard().id()),
                }
            })
            .collect();
        StatusDocument {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            listeners: self.listeners.clone(),
            nodes,
            sources: self
                .sources
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect(),
            ambiguous_addresses: self
                .routes
                .load()
                .ambiguous()
                .iter()
                .map(|(ip, nodes)| AmbiguousAddress {
                    address: ip.to_string(),
                    nodes: nodes.clone(),
                })
                .collect(),
        }
    }

    /// Whether `uid` may use the admin API: root, our own uid, or listed in
    /// `admin.admin_uids` (re-read on reload).
    pub async fn admin_allowed(&self, uid: u32) -> bool {
        uid == 0
            || uid == nix::unistd::geteuid().as_raw()
            || self.changes.lock().await.admin.admin_uids.contains(&uid)
    }

    /// True when every node has finished at least one connection attempt.
    pub fn first_attempts_done(&self) -> bool {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .all(|e| e.tunnel.attempts() > 0)
    }

    /// The Prometheus metrics.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// `/readyz`: ready when at least `admin.ready_min_healthy` nodes are
    /// healthy. The error says how many are.
    pub async fn ready(&self) -> Result<String, String> {
        let min = self.changes.lock().await.admin.ready_min_healthy;
        let doc = self.status();
        let healthy = doc.nodes.iter().filter(|n| n.state == "healthy").count();
        let msg = format!(
            "{healthy} of {} node(s) healthy (need {min})",
            doc.nodes.len()
        );
        if healthy >= min {
            Ok(msg)
        } else {
            Err(msg)
        }
    }

    /// The SSH port for nodes that do not name one.
    pub async fn default_ssh_port(&self) -> u16 {
        self.changes.lock().await.ssh.port
    }

    /// The live route table.
    pub fn routes(&self) -> &SharedRoutes {
        &self.routes
    }

    /// Loads keys, binds every socket and starts all actors. Returns once
    /// everything is bound; tasks run on the returned tracker until
    /// `shutdown` fires. Each node, with its sessions and streams, runs on
    /// one of `shards`; everything else on the caller's runtime, which
    /// becomes the control runtime.
    pub async fn start(
        config: Config,
        config_path: Option<PathBuf>,
        shutdown: CancellationToken,
        shards: Arc<Shards>,
    ) -> Result<(Arc<Daemon>, TaskTracker), StartError> {
        let handshakes = Arc::new(tokio::sync::Semaphore::new(
            config.ssh.max_concurrent_handshakes,
        ));
        let ctx: SharedContext =
            Arc::new(ArcSwap::from_pointee(load_context(&config, handshakes)?));

        // Bind everything before starting anything, so a bind error leaves
        // nothing running.
        // Each listener with its own pending-handshake budget.
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
        let admin_listener =
            bind_unix_for(&config.admin.socket, config.admin.socket_group.as_deref())?;

        let tracker = TaskTracker::new();
        let settings = Arc::new(ArcSwap::from_pointee(ProxySettings::from_config(
            &config.proxy,
        )));
        let nodes: Arc<Mutex<BTreeMap<String, NodeEntry>>> = Arc::new(Mutex::new(BTreeMap::new()));
        let for_metrics = nodes.clone();
        let metrics = Arc::new(crate::metrics::Metrics::new(
            Arc::new(move || {
                for_metrics
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .map(|e| e.tunnel.clone())
                    .collect()
            }),
            Some(shards.clone()),
        ));
        let metrics_listener = match config.admin.metrics_listen {
            None => None,
            Some(a) => Some(tokio::net::TcpListener::bind(a).await.map_err(|source| {
                StartError::BindTcp {
                    addr: a.to_string(),
                    source,
                }
            })?),
        };
        let daemon = Arc::new(Daemon {
            started: Instant::now(),
            config_path,
            nodes,
            metrics: metrics.clone(),
            changes: tokio::sync::Mutex::new(config.clone()),
            routes: Arc::new(ArcSwap::from_pointee(RouteTable::empty())),
            settings: settings.clone(),
            ctx,
            listeners: listeners.iter().map(|(l, _)| l.url()).collect(),
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
            sources: Mutex::new(BTreeMap::new()),
            shards: shards.clone(),
        });
        {
            let mut nodes = daemon.nodes.lock().unwrap_or_else(|e| e.into_inner());
            for n in &config.nodes {
                let tunnel = daemon.spawn_tunnel(n.clone());
                nodes.insert(
                    n.name.clone(),
                    NodeEntry {
                        tunnel,
                        source: Source::Config,
                    },
                );
            }
        }
        daemon.rebuild_routes(&config.proxy.service_cidrs);

        let proxy = EgressProxy::new(
            daemon.routes.clone(),
            settings,
            metrics.dial.clone(),
            tracker.clone(),
            shutdown.child_token(),
        );
        for (l, budget) in listeners {
            tracker.spawn(proxy.clone().serve(l, budget));
        }
        let admin = AdminApi::new(daemon.clone(), tracker.clone(), shutdown.child_token());
        tracker.spawn(admin.serve(admin_listener, config.admin.socket.clone()));
        if let Some(path) = config.discovery.nodes_file.clone() {
            tracker.spawn(crate::discovery::watch_file(
                daemon.clone(),
                path,
                config.discovery.address_types.clone(),
                shutdown.child_token(),
            ));
        }
        if let Some(kube) = config.discovery.kubernetes.clone() {
            tracker.spawn(crate::kube_watch::run(
                daemon.clone(),
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
        Ok((daemon, tracker))
    }

    fn spawn_tunnel(&self, node: NodeConfig) -> Arc<NodeTunnel> {
        NodeTunnel::spawn(
            node,
            self.ctx.clone(),
            self.shutdown.child_token(),
            &self.tracker,
            self.shards.place(),
        )
    }

    fn rebuild_routes(&self, service_cidrs: &[ipnet::IpNet]) {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let table = RouteTable::build(
            nodes.values().map(|e| (&e.tunnel.node, e.tunnel.clone())),
            service_cidrs,
        );
        let before = self.routes.load();
        for (ip, who) in table.ambiguous() {
            if before.ambiguous().get(ip) != Some(who) {
                warn!(address = %ip, nodes = ?who, "address claimed by several nodes: not routed by IP for any of them");
            }
        }
        self.metrics.ambiguous_addresses.store(
            table.ambiguous().len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.routes.store(Arc::new(table));
    }

    /// Config and API nodes, and discovered nodes, apart.
    fn strict_and_discovered(&self) -> (Vec<NodeConfig>, Vec<NodeConfig>) {
        let (strict, discovered): (Vec<_>, Vec<_>) = self
            .node_configs()
            .into_iter()
            .partition(|(_, src)| matches!(src, Source::Config | Source::Api));
        (
            strict.into_iter().map(|(n, _)| n).collect(),
            discovered.into_iter().map(|(n, _)| n).collect(),
        )
    }

    fn node_configs(&self) -> Vec<(NodeConfig, Source)> {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|e| (e.tunnel.node.clone(), e.source))
            .collect()
    }

    fn tunnel(&self, name: &str) -> Result<Arc<NodeTunnel>, ChangeError> {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|e| e.tunnel.clone())
            .ok_or_else(|| ChangeError::NotFound(name.to_string()))
    }

    /// Drains and then stops a tunnel that has already left the route table:
    /// streams already flowing keep flowing until they end or the drain
    /// timeout passes.
    fn retire(&self, tunnel: Arc<NodeTunnel>, limit: Duration) {
        tunnel.set_draining(true);
        let span = tracing::info_span!("node", node = %tunnel.node.name);
        self.tracker.spawn(
            async move {
                let drained = tokio::select! {
                    d = tunnel.wait_streams_done(limit) => d,
                    _ = tunnel.cancel_token().cancelled() => true,
                };
                if !drained {
                    warn!(?limit, "drain timeout: closing with streams still open");
                }
                tunnel.stop();
                info!(drained, "node removed and its tunnel closed");
            }
            .instrument(span),
        );
    }

    /// `POST /v1/nodes`: adds a node. Refused (and nothing changes) when the
    /// name exists or the node conflicts with another's addresses.
    pub async fn add_node(&self, node: NodeConfig) -> Result<(), ChangeError> {
        let config = self.changes.lock().await;
        let (mut strict, discovered) = self.strict_and_discovered();
        if strict
            .iter()
            .chain(&discovered)
            .any(|n| n.name == node.name)
        {
            return Err(ChangeError::Exists(node.name));
        }
        check_pod_scope("node", &node, &config.proxy.cluster_cidrs)?;
        strict.push(node.clone());
        check_node_set(&strict, &config.proxy.service_cidrs)?;
        check_strict_against_discovered(&strict, &discovered)?;
        let tunnel = self.spawn_tunnel(node.clone());
        self.nodes.lock().unwrap_or_else(|e| e.into_inner()).insert(
            node.name.clone(),
            NodeEntry {
                tunnel,
                source: Source::Api,
            },
        );
        self.rebuild_routes(&config.proxy.service_cidrs);
        info!(node = %node.name, "node added through the admin API");
        Ok(())
    }

    /// `DELETE /v1/nodes/{name}`: removes a node from routing at once, then
    /// closes its tunnel after its streams drain (bounded by the drain timeout).
    pub async fn remove_node(&self, name: &str) -> Result<(), ChangeError> {
        let config = self.changes.lock().await;
        let entry = {
            let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
            match nodes.get(name).map(|e| e.source) {
                None => return Err(ChangeError::NotFound(name.to_string())),
                // The source would bring it back at its next sync.
                Some(src @ (Source::File | Source::Kubernetes)) => {
                    return Err(ChangeError::Discovered {
                        name: name.to_string(),
                        from: src.as_str(),
                    })
                }
                Some(_) => {}
            }
            nodes
                .remove(name)
                .ok_or_else(|| ChangeError::NotFound(name.to_string()))?
        };
        self.rebuild_routes(&config.proxy.service_cidrs);
        self.retire(entry.tunnel, config.proxy.drain_timeout);
        info!(node = %name, "node removed; draining its streams");
        Ok(())
    }

    /// `POST /v1/nodes/{name}/drain` and `/undrain`.
    pub fn set_draining(&self, name: &str, on: bool) -> Result<TunnelState, ChangeError> {
        let t = self.tunnel(name)?;
        t.set_draining(on);
        info!(node = %name, draining = on, "drain changed");
        Ok(t.state().state)
    }

    /// `POST /v1/nodes/{name}/reconnect`: make-before-break.
    pub async fn reconnect(&self, name: &str) -> Result<(), ChangeError> {
        let t = self.tunnel(name)?;
        t.reconnect().await?;
        Ok(())
    }

    /// Reconciles the nodes of one discovery source to the Nodes it lists
    /// now. Each Node is admitted on its own (`node_set::admit`): a bad or
    /// conflicting one is left out and reported, a live one that turns bad
    /// keeps its last good config, and everything else is applied. Nodes
    /// the source no longer lists are drained and closed, changed nodes are
    /// replaced, unchanged nodes keep their connection.
    pub async fn sync_source(
        &self,
        source: Source,
        candidates: Vec<Candidate>,
    ) -> Result<SyncReport, ChangeError> {
        let config = self.changes.lock().await;
        let existing = self.node_configs();
        let pick = |f: &dyn Fn(Source) -> bool| -> Vec<NodeConfig> {
            existing
                .iter()
                .filter(|(_, s)| f(*s))
                .map(|(n, _)| n.clone())
                .collect()
        };
        let current = pick(&|s| s == source);
        let strict = pick(&|s| matches!(s, Source::Config | Source::Api));
        let other_discovered =
            pick(&|s| s != source && matches!(s, Source::File | Source::Kubernetes));
        let admission = crate::node_set::admit(
            candidates,
            &crate::node_set::Context {
                current: &current,
                strict: &strict,
                other_discovered: &other_discovered,
                service_cidrs: &config.proxy.service_cidrs,
                cluster_cidrs: &config.proxy.cluster_cidrs,
            },
        );
        let previous: Vec<Rejection> = self
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(source.as_str())
            .map(|s| s.rejected.clone())
            .unwrap_or_default();
        // Loud once per new rejection, not on every sync of an unchanged list.
        for r in admission.rejected.iter().filter(|r| !previous.contains(r)) {
            if r.kept {
                warn!(
                    source = source.as_str(), node = %r.name, reason = %r.reason,
                    "discovered Node became invalid: it keeps its last good config and routes until it is fixed or deleted"
                );
            } else {
                warn!(
                    source = source.as_str(), node = %r.name, reason = %r.reason,
                    "discovered Node rejected: left out of routing"
                );
            }
        }

        let (mut report, retired) = self.apply_desired(source, &admission.nodes);
        report.rejected = admission.rejected.len();
        self.rebuild_routes(&config.proxy.service_cidrs);
        for t in retired {
            self.retire(t, config.proxy.drain_timeout);
        }
        self.metrics
            .discovery_rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(source.as_str(), admission.rejected.len() as u64);
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let st = sources
            .entry(source.as_str())
            .or_insert_with(|| SourceStatus {
                source: source.as_str().into(),
                ..Default::default()
            });
        st.nodes = admission.nodes.len();
        st.rejected = admission.rejected;
        Ok(report)
    }

    /// Makes `source`'s nodes exactly `desired`, after validation: nodes of
    /// `source` it does not name leave routing (returned, to be retired),
    /// changed nodes are replaced, unchanged ones keep their connection and
    /// now belong to `source` (how the config takes over an API-added node
    /// of the same name). The caller rebuilds routes and retires.
    fn apply_desired(
        &self,
        source: Source,
        desired: &[NodeConfig],
    ) -> (SyncReport, Vec<Arc<NodeTunnel>>) {
        let mut report = SyncReport::default();
        let mut retired = Vec::new();
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<String> = nodes
            .iter()
            .filter(|(name, e)| e.source == source && !desired.iter().any(|n| &n.name == *name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(e) = nodes.remove(&name) {
                retired.push(e.tunnel);
                report.removed.push(name);
            }
        }
        for n in desired {
            match nodes.get_mut(&n.name) {
                Some(e) if e.tunnel.node == *n => {
                    e.source = source;
                    report.unchanged += 1;
                }
                existing => {
                    if existing.is_some() {
                        if let Some(old) = nodes.remove(&n.name) {
                            retired.push(old.tunnel);
                        }
                        report.changed.push(n.name.clone());
                    } else {
                        report.added.push(n.name.clone());
                    }
                    let tunnel = self.spawn_tunnel(n.clone());
                    nodes.insert(n.name.clone(), NodeEntry { tunnel, source });
                }
            }
        }
        (report, retired)
    }

    /// Records a successful sync of `source`.
    pub fn source_ok(&self, source: Source) {
        let now = SystemTime::now();
        let mut s = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let e = s.entry(source.as_str()).or_insert_with(|| SourceStatus {
            source: source.as_str().into(),
            ..Default::default()
        });
        e.last_success = Some(rfc3339(now));
        e.last_error = None;
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.metrics
            .discovery_last_success
            .store(secs, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records a failed sync of `source`; its nodes stay as they were.
    pub fn source_failed(&self, source: Source, error: String) {
        let mut s = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        s.entry(source.as_str())
            .or_insert_with(|| SourceStatus {
                source: source.as_str().into(),
                ..Default::default()
            })
            .last_error = Some(error);
        self.metrics
            .discovery_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// True when `source`'s last attempt failed.
    pub fn source_has_error(&self, source: Source) -> bool {
        self.sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(source.as_str())
            .is_some_and(|s| s.last_error.is_some())
    }

    /// `POST /v1/reload` and SIGHUP: re-reads the config file and applies
    /// the difference. An invalid config is rejected as a whole.
    pub async fn reload(&self) -> Result<ReloadReport, ChangeError> {
        let path = self.config_path.clone().ok_or(ChangeError::NoConfigFile)?;
        let result = self.reload_from(&path).await;
        match &result {
            Ok(r) => info!(
                added = ?r.nodes.added, removed = ?r.nodes.removed, changed = ?r.nodes.changed,
                unchanged = r.nodes.unchanged, warnings = ?r.warnings, "config reloaded"
            ),
            Err(e) => error!(error = %e, "reload rejected; the running config stays"),
        }
        result
    }

    async fn reload_from(&self, path: &Path) -> Result<ReloadReport, ChangeError> {
        let new = Config::load(path)?;
        let mut current = self.changes.lock().await;
        let mut report = ReloadReport::default();

        // Validate everything first: the new config's nodes plus the API
        // nodes it does not name, strictly; then against the discovered
        // nodes, which must also still fit the new service and cluster
        // CIDRs.
        let existing = self.node_configs();
        let mut combined = new.nodes.clone();
        let mut discovered = Vec::new();
        for (n, src) in &existing {
            let named = new.nodes.iter().any(|c| c.name == n.name);
            match src {
                Source::Config => {}
                // The config takes over an API-added node of the same name.
                Source::Api if named => {}
                Source::File | Source::Kubernetes if named => {
                    return Err(ChangeError::Conflict {
                        name: n.name.clone(),
                        other: src.as_str(),
                    })
                }
                Source::File | Source::Kubernetes => discovered.push(n.clone()),
                Source::Api => combined.push(n.clone()),
            }
        }
        check_node_set(&combined, &new.proxy.service_cidrs)?;
        check_strict_against_discovered(&combined, &discovered)?;
        for d in &discovered {
            let key = format!("discovered node {:?}", d.name);
            check_pod_scope(&key, d, &new.proxy.cluster_cidrs)?;
            if let Some(c) = d.pod_cidrs.iter().find(|c| {
                new.proxy
                    .service_cidrs
                    .iter()
                    .any(|s| s.contains(&c.network()) || c.contains(&s.network()))
            }) {
                return Err(ChangeError::Invalid(ConfigError::Invalid {
                    key: "proxy.service_cidrs".into(),
                    reason: format!("overlaps the pod CIDR {c} of discovered node {:?}", d.name),
                }));
            }
            if let Some(ip) = d
                .internal_ips
                .iter()
                .find(|ip| new.proxy.service_cidrs.iter().any(|s| s.contains(*ip)))
            {
                return Err(ChangeError::Invalid(ConfigError::Invalid {
                    key: "proxy.service_cidrs".into(),
                    reason: format!("holds {ip}, an internal IP of discovered node {:?}", d.name),
                }));
            }
        }
        // Keys and known_hosts are re-read on every reload, also when
        // their paths did not change: a key replaced under the same name is
        // picked up by the next connection of each node.
        let new_ctx = Some(load_context(&new, self.ctx.load().handshakes.clone())?);

        // Apply.
        if new.proxy.listen != current.proxy.listen {
            report
                .warnings
                .push("proxy.listen changed: takes effect after a restart".into());
        }
        if new.proxy.tls != current.proxy.tls
            || new.proxy.socket_group != current.proxy.socket_group
            || new.proxy.max_pending_handshakes != current.proxy.max_pending_handshakes
        {
            report.warnings.push(
                "proxy.tls, proxy.socket_group and proxy.max_pending_handshakes take effect after a restart".into(),
            );
        }
        if new.ssh.max_concurrent_handshakes != current.ssh.max_concurrent_handshakes {
            report
                .warnings
                .push("ssh.max_concurrent_handshakes takes effect after a restart".into());
        }
        if new.ssh.connections_per_node != current.ssh.connections_per_node {
            report.warnings.push(
                "ssh.connections_per_node applies to nodes added or changed from now on; `tunneler nodes remove`/`add` or a restart applies it to the others".into(),
            );
        }
        if new.ssh.max_connections_per_node != current.ssh.max_connections_per_node {
            report.warnings.push(
                "ssh.max_connections_per_node applies to nodes added or changed from now on; `tunneler nodes remove`/`add` or a restart applies it to the others".into(),
            );
        }
        if new.admin.socket != current.admin.socket {
            report
                .warnings
                .push("admin.socket changed: takes effect after a restart".into());
        }
        if new.admin.socket_group != current.admin.socket_group {
            report
                .warnings
                .push("admin.socket_group changed: takes effect after a restart".into());
        }
        if new.admin.metrics_listen != current.admin.metrics_listen {
            report
                .warnings
                .push("admin.metrics_listen changed: takes effect after a restart".into());
        }
        if new.runtime != current.runtime {
            report
                .warnings
                .push("runtime.shards changed: takes effect after a restart".into());
        }
        if new.discovery != current.discovery {
            report
                .warnings
                .push("[discovery] changed: takes effect after a restart".into());
        }
        if let Some(ctx) = new_ctx {
            self.ctx.store(Arc::new(ctx));
        }
        self.settings
            .store(Arc::new(ProxySettings::from_config(&new.proxy)));
        let (nodes, retired) = self.apply_desired(Source::Config, &new.nodes);
        report.nodes = nodes;
        self.rebuild_routes(&new.proxy.service_cidrs);
        for t in retired {
            self.retire(t, new.proxy.drain_timeout);
        }
        *current = new;
        Ok(report)
    }
}

/// Runs the daemon until `shutdown` fires, then waits (bounded) for every
/// task to finish. SIGHUP reloads `config_path`.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let first_attempt_bound = config.ssh.connect_timeout * 2 + Duration::from_secs(1);
    // The shard threads outlive everything below: tasks on a shard only
    // progress while its thread runs, and the graceful drain needs them.
    let shards = Arc::new(Shards::start(config.runtime.shards).map_err(StartError::Shards)?);
    let (daemon, tracker) =
        Daemon::start(config, config_path, shutdown.clone(), shards.clone()).await?;
    // systemd: READY=1 once the listeners are bound (done) and the first
    // connection attempt to every node has finished, success or not.
    let ready_daemon = daemon.clone();
    let ready_cancel = shutdown.clone();
    tracker.spawn(async move {
        let deadline = tokio::time::Instant::now() + first_attempt_bound;
        while !ready_daemon.first_attempts_done() && tokio::time::Instant::now() < deadline {
            tokio::select! {
                _ = ready_cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        info!("ready: listeners bound, first connection attempts finished");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    });
    // WATCHDOG=1 from the control runtime, only while every shard runs a
    // no-op task in time: if any runtime wedges, systemd notices and
    // restarts us.
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
    let hup_daemon = daemon.clone();
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
            let _ = hup_daemon.reload().await;
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
    shards.stop(Duration::from_secs(2));
    info!("stopped");
    Ok(())
}
