//! `[discovery]`: node sources besides `[[node]]` and the admin API.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::parse::resolve;
use super::raw::{RawDiscovery, RawKube};
use super::{invalid, ConfigError};

/// A discovered SSH address must be an IP literal (see `address`), so the
/// DNS-valued address types cannot name one.
const KNOWN_ADDRESS_TYPES: [&str; 2] = ["InternalIP", "ExternalIP"];

/// Node sources besides `[[node]]` and the admin API.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct DiscoveryConfig {
    /// A watched `kubectl get nodes -o json` file.
    pub nodes_file: Option<PathBuf>,
    /// Which `status.addresses` type is the SSH address, in preference order.
    pub address_types: Vec<String>,
    /// Watch Node objects in the Kubernetes API.
    pub kubernetes: Option<KubeSource>,
}

/// How to reach the Kubernetes API.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum KubeSource {
    /// A kubeconfig file.
    Kubeconfig(PathBuf),
    /// The pod's service account.
    InCluster,
}

/// `[discovery]`, when present; relative paths resolve against `base`.
pub(super) fn validate_discovery(
    d: RawDiscovery,
    base: &Path,
) -> Result<DiscoveryConfig, ConfigError> {
    let address_types = d
        .address_types
        .unwrap_or_else(|| vec!["InternalIP".into(), "ExternalIP".into()]);
    if address_types.is_empty() {
        return Err(invalid("discovery.address_types", "must not be empty"));
    }
    for (i, t) in address_types.iter().enumerate() {
        if !KNOWN_ADDRESS_TYPES.contains(&t.as_str()) {
            return Err(invalid(
                format!("discovery.address_types[{i}]"),
                format!("{t:?} is not one of {}", KNOWN_ADDRESS_TYPES.join(", ")),
            ));
        }
    }
    let kubernetes = match d.kubernetes {
        None => None,
        Some(RawKube {
            kubeconfig: Some(_),
            in_cluster: true,
        }) => {
            return Err(invalid(
                "discovery.kubernetes",
                "set either kubeconfig or in_cluster = true, not both",
            ))
        }
        Some(RawKube {
            kubeconfig: Some(p),
            ..
        }) => Some(KubeSource::Kubeconfig(resolve(base, &p))),
        Some(RawKube {
            kubeconfig: None,
            in_cluster: true,
        }) => Some(KubeSource::InCluster),
        Some(_) => {
            return Err(invalid(
                "discovery.kubernetes",
                "needs kubeconfig = \"PATH\" or in_cluster = true",
            ))
        }
    };
    Ok(DiscoveryConfig {
        nodes_file: d.nodes_file.map(|p| resolve(base, &p)),
        address_types,
        kubernetes,
    })
}
