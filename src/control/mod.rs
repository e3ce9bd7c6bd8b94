//! Changes to the live node set: the admin API's add, remove, drain and
//! reconnect, a discovery source's sync, and a config reload.
//!
//! Every change takes the config store's change lock, is validated as a
//! whole before anything is touched, edits the [`NodeRegistry`], and ends
//! by swapping in a new route table. Readers never take that lock: the
//! current config is an `ArcSwap` (see [`ConfigStore`]), the registry and
//! the route table are snapshots, so a status request, a scrape or an
//! admin uid check never waits behind a reload's key loading.

pub mod config_store;
pub mod node_set;
pub(crate) mod readiness;
pub(crate) mod registry;
pub(crate) mod reload;
pub mod sources;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn, Instrument};

use crate::config::{
    check_discovered_fit, check_node_set, check_pod_scope, check_strict_against_discovered, Config,
    ConfigError, NodeConfig, ProxyConfig,
};
use crate::control::config_store::ConfigStore;
use crate::control::node_set::Candidate;
use crate::control::registry::{NodeEntry, NodeRegistry};
use crate::control::sources::{Source, SourceBook};
use crate::metrics::Metrics;
use crate::proxy::route::RouteTable;
use crate::proxy::{ProxySettings, SharedRoutes};
use crate::shard::Shards;
use crate::ssh::context::{SharedContext, SshContext};
use crate::ssh::identity::Identity;
use crate::ssh::known_hosts::KnownHostsStore;
use crate::tunnel::{NodeTunnel, SharedSettings, TunnelSettings, TunnelState};

/// Why the SSH identity or known_hosts could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
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
}

/// Loads the identity and known_hosts `config` names into a new SSH
/// context that shares `handshakes` (the cap survives reloads).
pub fn load_context(
    config: &Config,
    handshakes: Arc<tokio::sync::Semaphore>,
) -> Result<SshContext, KeysError> {
    let identity = Identity::load(&config.ssh).map_err(|e| KeysError::Identity {
        path: config.ssh.identity_file.clone(),
        reason: e.to_string(),
    })?;
    let known_hosts = KnownHostsStore::open(&config.ssh.known_hosts_file).map_err(|source| {
        KeysError::KnownHosts {
            path: config.ssh.known_hosts_file.clone(),
            source,
        }
    })?;
    Ok(SshContext::new(
        config.ssh.clone(),
        Arc::new(identity),
        Arc::new(known_hosts),
        handshakes,
    )
    .with_service_cidrs(config.proxy.service_cidrs.clone()))
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
    Keys(#[from] KeysError),
    /// A name is already provided by another source.
    #[error(
        "node {name:?} comes from the {other} source already; a name may come from one source only"
    )]
    Conflict {
        /// The node.
        name: String,
        /// The source that has it.
        other: Source,
    },
    /// The node belongs to a discovery source, which would bring it back.
    #[error("node {name:?} comes from the {from} discovery source; remove it there")]
    Discovered {
        /// The node.
        name: String,
        /// Its source.
        from: Source,
    },
    /// There is no config file to reload (started from a Config value).
    #[error("this daemon was not started from a config file")]
    NoConfigFile,
    /// A tunnel operation failed (e.g. a reconnect could not connect).
    #[error("{0}")]
    Tunnel(#[from] crate::error::TunnelError),
}

/// What a sync of one node source did.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
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
    #[serde(default)]
    pub rejected: usize,
}

/// What a reload did: the config nodes' changes, and warnings.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// Added, removed, changed (replaced after draining) and unchanged
    /// (connection and `since` kept) config nodes.
    #[serde(flatten)]
    pub nodes: SyncReport,
    /// Settings that only take effect after a restart (or for new nodes).
    pub warnings: Vec<String>,
}

/// The node-set changer: everything that may add, replace or remove a
/// node, or re-read the config. The composition root builds it field by
/// field; nothing else sees the fields.
pub struct Control {
    /// The file a reload re-reads (none: reload is refused).
    pub(crate) config_path: Option<PathBuf>,
    /// The running config.
    pub(crate) config: Arc<ConfigStore>,
    /// The live nodes.
    pub(crate) registry: Arc<NodeRegistry>,
    /// Discovery bookkeeping.
    pub(crate) sources: Arc<SourceBook>,
    /// The route table the proxy reads.
    pub(crate) routes: SharedRoutes,
    /// The proxy's reloadable settings.
    pub(crate) settings: Arc<ArcSwap<ProxySettings>>,
    /// The SSH context new connections use.
    pub(crate) ctx: SharedContext,
    /// The tunnels' own settings (backoff, probe, drain).
    pub(crate) tunnel_settings: SharedSettings,
    /// For the ambiguous-address gauge.
    pub(crate) metrics: Arc<Metrics>,
    /// Where node actors and drains run.
    pub(crate) tracker: TaskTracker,
    /// The root token; each node gets a child.
    pub(crate) shutdown: CancellationToken,
    /// Where each node's tunnel runs (placed when it starts, kept for its
    /// life).
    pub(crate) shards: Arc<Shards>,
}

impl Control {
    /// The SSH port for nodes that do not name one.
    pub fn default_ssh_port(&self) -> u16 {
        self.config.load().ssh.port
    }

    /// Records a successful sync of `source` (see [`SourceBook::ok`]).
    pub fn source_ok(&self, source: Source) {
        self.sources.ok(source)
    }

    /// Records a failed sync of `source` (see [`SourceBook::failed`]).
    pub fn source_failed(&self, source: Source, error: String) {
        self.sources.failed(source, error)
    }

    /// True when `source`'s last attempt failed.
    pub fn source_has_error(&self, source: Source) -> bool {
        self.sources.has_error(source)
    }

    /// Starts the config's own nodes; called once, at start.
    pub fn start_config_nodes(&self) {
        let config = self.config.load();
        self.registry.update(|nodes| {
            for n in &config.nodes {
                let tunnel = self.spawn_tunnel(n.clone());
                nodes.insert(
                    n.name.clone(),
                    NodeEntry {
                        tunnel,
                        source: Source::Config,
                    },
                );
            }
        });
        self.rebuild_routes(&config.proxy);
    }

    fn spawn_tunnel(&self, node: NodeConfig) -> Arc<NodeTunnel> {
        NodeTunnel::spawn(
            node,
            self.ctx.clone(),
            self.tunnel_settings.clone(),
            self.shutdown.child_token(),
            &self.tracker,
            self.shards.place(),
        )
    }

    fn rebuild_routes(&self, proxy: &ProxyConfig) {
        let nodes = self.registry.snapshot();
        let table = RouteTable::build(
            nodes.values().map(|e| (&e.tunnel.node, e.tunnel.clone())),
            &proxy.service_cidrs,
        )
        .with_pod_networks(&proxy.pod_network_cidrs);
        let before = self.routes.load();
        for (name, who) in table.ambiguous_names() {
            if before.ambiguous_names().get(name) != Some(who) {
                warn!(%name, nodes = ?who, "name claimed by several nodes: not routed for any of them");
            }
        }
        for (ip, who) in table.ambiguous() {
            if before.ambiguous().get(ip) != Some(who) {
                warn!(address = %ip, nodes = ?who, "address claimed by several nodes: not routed by IP for any of them");
            }
        }
        self.metrics.ambiguous_addresses.store(
            (table.ambiguous().len() + table.ambiguous_names().len()) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.routes.store(Arc::new(table));
    }

    /// Config and API nodes, and discovered nodes, apart.
    fn strict_and_discovered(&self) -> (Vec<NodeConfig>, Vec<NodeConfig>) {
        let (strict, discovered): (Vec<_>, Vec<_>) = self
            .registry
            .node_configs()
            .into_iter()
            .partition(|(_, src)| !src.is_discovery());
        (
            strict.into_iter().map(|(n, _)| n).collect(),
            discovered.into_iter().map(|(n, _)| n).collect(),
        )
    }

    fn tunnel(&self, name: &str) -> Result<Arc<NodeTunnel>, ChangeError> {
        self.registry
            .get(name)
            .map(|e| e.tunnel)
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
        let _change = self.config.change().await;
        let config = self.config.load();
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
        self.registry.update(|nodes| {
            nodes.insert(
                node.name.clone(),
                NodeEntry {
                    tunnel,
                    source: Source::Api,
                },
            )
        });
        self.rebuild_routes(&config.proxy);
        info!(node = %node.name, "node added through the admin API");
        Ok(())
    }

    /// `DELETE /v1/nodes/{name}`: removes a node from routing at once, then
    /// closes its tunnel after its streams drain (bounded by the drain timeout).
    pub async fn remove_node(&self, name: &str) -> Result<(), ChangeError> {
        let _change = self.config.change().await;
        let config = self.config.load();
        let entry = self.registry.update(|nodes| {
            match nodes.get(name).map(|e| e.source) {
                None => return Err(ChangeError::NotFound(name.to_string())),
                // The source would bring it back at its next sync.
                Some(src) if src.is_discovery() => {
                    return Err(ChangeError::Discovered {
                        name: name.to_string(),
                        from: src,
                    })
                }
                Some(_) => {}
            }
            nodes
                .remove(name)
                .ok_or_else(|| ChangeError::NotFound(name.to_string()))
        })?;
        self.rebuild_routes(&config.proxy);
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
        let _change = self.config.change().await;
        let config = self.config.load();
        let existing = self.registry.node_configs();
        let pick = |f: &dyn Fn(Source) -> bool| -> Vec<NodeConfig> {
            existing
                .iter()
                .filter(|(_, s)| f(*s))
                .map(|(n, _)| n.clone())
                .collect()
        };
        let current = pick(&|s| s == source);
        let strict = pick(&|s| !s.is_discovery());
        let other_discovered = pick(&|s| s != source && s.is_discovery());
        let admission = crate::control::node_set::admit(
            candidates,
            &crate::control::node_set::Context {
                current: &current,
                strict: &strict,
                other_discovered: &other_discovered,
                service_cidrs: &config.proxy.service_cidrs,
                cluster_cidrs: &config.proxy.cluster_cidrs,
            },
        );
        let previous = self.sources.rejected(source);
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
        self.rebuild_routes(&config.proxy);
        for t in retired {
            self.retire(t, config.proxy.drain_timeout);
        }
        self.sources
            .admitted(source, admission.nodes.len(), admission.rejected);
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
        self.registry.update(|nodes| {
            let mut report = SyncReport::default();
            let mut retired = Vec::new();
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
        })
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
        let _change = self.config.change().await;
        let current = self.config.load();

        // Validate everything first: the new config's nodes plus the API
        // nodes it does not name, strictly; then against the discovered
        // nodes, which must also still fit the new service and cluster
        // CIDRs.
        let existing = self.registry.node_configs();
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
                        other: *src,
                    })
                }
                Source::File | Source::Kubernetes => discovered.push(n.clone()),
                Source::Api => combined.push(n.clone()),
            }
        }
        check_node_set(&combined, &new.proxy.service_cidrs)?;
        check_strict_against_discovered(&combined, &discovered)?;
        check_discovered_fit(
            &discovered,
            &new.proxy.service_cidrs,
            &new.proxy.cluster_cidrs,
        )?;
        // Keys and known_hosts are re-read on every reload, also when
        // their paths did not change: a key replaced under the same name is
        // picked up by the next connection of each node.
        let new_ctx = load_context(&new, self.ctx.load().handshakes.clone())?;

        // Apply.
        let warnings = crate::control::reload::diff(&current, &new)
            .iter()
            .filter_map(|c| c.warning())
            .collect();
        self.ctx.store(Arc::new(new_ctx));
        self.tunnel_settings
            .store(Arc::new(TunnelSettings::from_config(&new)));
        self.settings
            .store(Arc::new(ProxySettings::from_config(&new.proxy)));
        let (nodes, retired) = self.apply_desired(Source::Config, &new.nodes);
        self.rebuild_routes(&new.proxy);
        for t in retired {
            self.retire(t, new.proxy.drain_timeout);
        }
        self.config.store(new);
        Ok(ReloadReport { nodes, warnings })
    }
}
