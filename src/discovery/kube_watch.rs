//! Node discovery from the Kubernetes API, with kube-rs's runtime watcher.
//!
//! The watcher lists Node objects, then watches them; it re-lists on its
//! own after a broken watch. kube's reflector keeps the store of the
//! latest objects (swapping in a re-list only once it is complete), and we
//! hand the registry the whole desired set once the initial list is
//! complete and after every change, so reconciliation is by difference
//! exactly as for the nodes file.
//!
//! Each Node object passes the discovery border on its own (see
//! `discovery`): one bad Node is reported and left out, the rest apply.
//!
//! A failing API (down, forbidden, garbage) never tears tunnels down: the
//! error is recorded for the status and metrics, the last good node set
//! stays, and the watcher retries with backoff.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::KubeSource;
use crate::control::node_set::Candidate;
use crate::control::sources::Source;
use crate::control::Control;
use crate::discovery::candidate_from_node;

async fn client(source: &KubeSource) -> Result<Client, String> {
    let config = match source {
        KubeSource::Kubeconfig(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        KubeSource::InCluster => {
            kube::Config::incluster().map_err(|e| format!("in-cluster config: {e}"))?
        }
    };
    Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}

/// Every stored Node through the discovery border, one at a time (sorted
/// by name): a bad Node becomes a rejected candidate, never an error for
/// the whole set.
fn convert(store: &Store<Node>, address_types: &[String], port: u16) -> Vec<Candidate> {
    let mut nodes = store.state();
    nodes.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| candidate_from_node(n, i, address_types, port))
        .collect()
}

/// Watches Node objects and reconciles the daemon's `kubernetes` nodes
/// until cancelled. Never returns early: a client that cannot be built is
/// retried too, since a kubeconfig may appear later.
pub async fn run(
    control: Arc<Control>,
    source: KubeSource,
    address_types: Vec<String>,
    cancel: CancellationToken,
) {
    let src = Source::Kubernetes;
    let client = loop {
        match client(&source).await {
            Ok(c) => break c,
            Err(e) => {
                warn!(error = %e, "Kubernetes discovery cannot start; retrying in 10s");
                control.source_failed(src, e);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                }
            }
        }
    };
    let api: Api<Node> = Api::all(client);
    let (store, writer) = reflector::store::<Node>();
    let mut events =
        reflector::reflector(writer, watcher::watcher(api, watcher::Config::default()))
            .default_backoff()
            .boxed();
    let mut synced_once = false;
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => return,
            ev = events.next() => ev,
        };
        // The reflector has applied the event to the store already.
        let changed = match ev {
            None => {
                // The watcher stream does not end by itself; if it does,
                // report it and stop rather than spin.
                control.source_failed(src, "Kubernetes watch stream ended".into());
                return;
            }
            Some(Err(e)) => {
                warn!(error = %e, "Kubernetes watch failed; keeping the last good node set");
                control.source_failed(src, format!("Kubernetes API: {e}"));
                false
            }
            // A (re-)list in progress: the store still holds the last
            // complete one.
            Some(Ok(Event::Init | Event::InitApply(_))) => false,
            Some(Ok(Event::InitDone)) => true,
            Some(Ok(Event::Apply(_) | Event::Delete(_))) => synced_once,
        };
        if !changed {
            continue;
        }
        let port = control.default_ssh_port();
        let result = control
            .sync_source(src, convert(&store, &address_types, port))
            .await
            .map_err(|e| e.to_string());
        match result {
            Ok(report) => {
                synced_once = true;
                info!(?report, nodes = store.len(), "Kubernetes nodes applied");
                control.source_ok(src);
            }
            Err(e) => {
                warn!(error = %e, "Kubernetes node set rejected; keeping the last good set");
                control.source_failed(src, e);
            }
        }
    }
}
