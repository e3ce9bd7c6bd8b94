//! Discovery bookkeeping: where each node came from, and how each discovery
//! source is doing (last success, current error, rejected Nodes).
//!
//! The sources write here after every sync; the status page and the
//! metrics read it. It knows nothing of the registry or the admin API.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::control::node_set::Rejection;
use crate::metrics::Metrics;

/// Where a node came from. Reload manages `Config` nodes only; nodes added
/// through the API survive a reload unless the config names them too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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
    /// The name shown in status and logs (the same as its serde name).
    pub fn as_str(&self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Api => "api",
            Source::File => "file",
            Source::Kubernetes => "kubernetes",
        }
    }

    /// True for the sources that reconcile by difference on their own
    /// (their nodes come back at the next sync if removed by hand).
    pub fn is_discovery(&self) -> bool {
        matches!(self, Source::File | Source::Kubernetes)
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a discovery source is doing, for the status page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// file or kubernetes.
    pub source: Source,
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

impl SourceStatus {
    fn new(source: Source) -> SourceStatus {
        SourceStatus {
            source,
            last_success: None,
            last_error: None,
            nodes: 0,
            rejected: Vec::new(),
        }
    }
}

/// The discovery sources' records, and the metrics that mirror them.
pub struct SourceBook {
    by_source: Mutex<BTreeMap<Source, SourceStatus>>,
    metrics: Arc<Metrics>,
}

impl SourceBook {
    /// An empty book; `metrics` gets the discovery gauges and counters.
    pub fn new(metrics: Arc<Metrics>) -> SourceBook {
        SourceBook {
            by_source: Mutex::new(BTreeMap::new()),
            metrics,
        }
    }

    fn with<R>(&self, source: Source, f: impl FnOnce(&mut SourceStatus) -> R) -> R {
        let mut book = self.by_source.lock().unwrap_or_else(|e| e.into_inner());
        f(book
            .entry(source)
            .or_insert_with(|| SourceStatus::new(source)))
    }

    /// Records a successful sync of `source`.
    pub fn ok(&self, source: Source) {
        let now = SystemTime::now();
        self.with(source, |s| {
            s.last_success = Some(crate::timestamp::rfc3339(now));
            s.last_error = None;
        });
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.metrics
            .discovery_last_success
            .store(secs, Ordering::Relaxed);
        self.metrics
            .discovery_failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(source.as_str(), 0);
    }

    /// Records a failed sync of `source`; its nodes stay as they were.
    pub fn failed(&self, source: Source, error: String) {
        self.with(source, |s| s.last_error = Some(error));
        self.metrics
            .discovery_errors
            .fetch_add(1, Ordering::Relaxed);
        self.metrics
            .discovery_failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(source.as_str(), 1);
    }

    /// True when `source`'s last attempt failed.
    pub fn has_error(&self, source: Source) -> bool {
        self.by_source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&source)
            .is_some_and(|s| s.last_error.is_some())
    }

    /// The Nodes `source` had rejected at its last sync.
    pub fn rejected(&self, source: Source) -> Vec<Rejection> {
        self.by_source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&source)
            .map(|s| s.rejected.clone())
            .unwrap_or_default()
    }

    /// Records what a sync of `source` applied: `nodes` live, `rejected`
    /// left out.
    pub fn admitted(&self, source: Source, nodes: usize, rejected: Vec<Rejection>) {
        self.metrics
            .discovery_rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(source.as_str(), rejected.len() as u64);
        self.with(source, |s| {
            s.nodes = nodes;
            s.rejected = rejected;
        });
    }

    /// Every source's record, in a fixed order.
    pub fn snapshot(&self) -> Vec<SourceStatus> {
        self.by_source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}
