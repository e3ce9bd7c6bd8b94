//! Node discovery from the Kubernetes API (not built yet).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::KubeSource;
use crate::daemon::{Daemon, Source};

/// Watches Node objects and reconciles the daemon's `kubernetes` nodes.
pub async fn run(
    daemon: Arc<Daemon>,
    _source: KubeSource,
    _address_types: Vec<String>,
    _cancel: CancellationToken,
) {
    daemon.source_failed(
        Source::Kubernetes,
        "Kubernetes API discovery is not implemented in this build".into(),
    );
}
