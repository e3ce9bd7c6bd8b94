//! The live node registry: every node's tunnel and where the node came
//! from, by name.
//!
//! Readers (status, metrics scrapes, readiness, the admin API) take a
//! snapshot without a lock: the map sits behind an `ArcSwap` and is
//! replaced as a whole. Writers copy, change and swap it under a small
//! mutex; the node set changes a few times a minute at most, while it is
//! read on every scrape and status request. The route table is built from
//! it by the control module after each change.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::config::NodeConfig;
use crate::control::sources::Source;
use crate::tunnel::NodeTunnel;

/// One live node.
#[derive(Debug, Clone)]
pub struct NodeEntry {
    /// Its tunnel.
    pub tunnel: Arc<NodeTunnel>,
    /// Where it came from.
    pub source: Source,
}

/// The live nodes, sorted by name.
pub type NodeMap = BTreeMap<String, NodeEntry>;

/// The live node map: lock-free reads, serialized writes.
#[derive(Default)]
pub struct NodeRegistry {
    nodes: ArcSwap<NodeMap>,
    writer: Mutex<()>,
}

impl NodeRegistry {
    /// An empty registry.
    pub fn new() -> NodeRegistry {
        NodeRegistry::default()
    }

    /// The current map; later changes do not show in it.
    pub fn snapshot(&self) -> Arc<NodeMap> {
        self.nodes.load_full()
    }

    /// Every live tunnel, sorted by node name.
    pub fn tunnels(&self) -> Vec<Arc<NodeTunnel>> {
        self.nodes
            .load()
            .values()
            .map(|e| e.tunnel.clone())
            .collect()
    }

    /// The node named `name`.
    pub fn get(&self, name: &str) -> Option<NodeEntry> {
        self.nodes.load().get(name).cloned()
    }

    /// Every node's config and source.
    pub fn node_configs(&self) -> Vec<(NodeConfig, Source)> {
        self.nodes
            .load()
            .values()
            .map(|e| (e.tunnel.node.clone(), e.source))
            .collect()
    }

    /// Changes the map: `f` edits a copy, which then replaces the map for
    /// every reader at once. Writers run one at a time.
    pub fn update<R>(&self, f: impl FnOnce(&mut NodeMap) -> R) -> R {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut map = NodeMap::clone(&self.nodes.load());
        let r = f(&mut map);
        self.nodes.store(Arc::new(map));
        r
    }
}
