//! Configuration: the TOML shapes serde reads, and the validated types the
//! rest of the daemon uses.
//!
//! The two are kept apart on purpose. The serde shapes mirror the file
//! (strings for durations, paths as written); [`Config::from_toml`] turns them
//! into domain types (`Duration`, `IpNet`, absolute `PathBuf`s) and rejects
//! anything inconsistent. Code after validation never has to re-check config.
//!
//! One file per concern: `raw` the serde shapes; one file per section with
//! its validated types, their defaults and its validator (`ssh` with
//! `[reconnect]`, `proxy` with its relay limits in `relay`, `admin` with
//! `[health]`, `discovery`, `runtime`); `node` one node and its own rules;
//! `node_set` the rules that span a node set; `address` the shape of node
//! addresses and pod CIDRs; `parse` the value parsers the sections share;
//! `effects` what a reload does with each key. [`Config::validate`] only
//! drives the sections in order and checks what spans two of them.

pub mod address;
mod admin;
mod discovery;
pub(crate) mod effects;
mod node;
mod node_set;
mod parse;
mod proxy;
mod raw;
mod relay;
mod runtime;
mod ssh;

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use admin::{AdminConfig, HealthConfig, ProbeTarget, DEFAULT_ADMIN_SOCKET};
pub use discovery::{DiscoveryConfig, KubeSource};
pub use node::{
    check_pod_scope, is_localhost, node_from_spec, normalize_name, valid_node_name, NodeConfig,
};
pub use node_set::{check_discovered_fit, check_node_set, check_strict_against_discovered};
pub(crate) use node_set::{
    has_internal_ip, net_holding, net_overlapping, pod_cidr_holding, pod_cidr_overlapping,
};
pub use proxy::{ListenAddr, ProxyConfig, TlsConfig};
pub use raw::NodeSpec;
pub use relay::RelayLimits;
pub use runtime::RuntimeConfig;
pub use ssh::{HostKeyPolicy, ReconnectConfig, SshConfig};
// Unit tests elsewhere build an `SshConfig` by hand.
#[cfg(test)]
pub(crate) use ssh::{WindowBounds, DEFAULT_MAXIMUM_PACKET_SIZE};

#[cfg(test)]
pub(crate) use node::test_node;

/// The text of the example config in deploy/, which tests hold against the
/// effects table and the reload diff.
#[cfg(test)]
pub(crate) fn example_text() -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/tunneler.example.toml"),
    )
    .unwrap()
}

/// The example config, parsed as installed under /etc/tunneler.
#[cfg(test)]
pub(crate) fn example() -> Config {
    Config::from_toml(&example_text(), std::path::Path::new("/etc/tunneler")).unwrap()
}

use address::AddressOrigin;
use raw::RawConfig;

/// Where `tunneler run` looks for its config unless `--config` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tunneler/tunneler.toml";

/// A config error names the offending key, so an operator can find it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path tried.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax or shape error (unknown key, wrong type, missing key).
    #[error("invalid config: {0}")]
    Parse(String),
    /// A value that parsed but does not make sense.
    #[error("invalid config: `{key}`: {reason}")]
    Invalid {
        /// Dotted path of the key, e.g. `node[2].pod_cidrs`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl ConfigError {
    /// The error as a reason for rejecting one node: the field and what is
    /// wrong, without the "invalid config" framing (a discovered Node is not
    /// the operator's config).
    pub fn node_reason(&self) -> String {
        match self {
            ConfigError::Invalid { key, reason } => {
                format!("{}: {reason}", key.strip_prefix("node.").unwrap_or(key))
            }
            ConfigError::Parse(e) => e.clone(),
            other => other.to_string(),
        }
    }
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// SSH client settings shared by every node.
    pub ssh: SshConfig,
    /// Reconnect backoff.
    pub reconnect: ReconnectConfig,
    /// The egress (HTTP CONNECT) front end.
    pub proxy: ProxyConfig,
    /// The admin API.
    pub admin: AdminConfig,
    /// The optional active health probe.
    pub health: Option<HealthConfig>,
    /// Node sources besides the static list.
    pub discovery: DiscoveryConfig,
    /// Threads and runtimes.
    pub runtime: RuntimeConfig,
    /// Statically configured nodes (`[[node]]`, hence the serialized name).
    #[serde(rename = "node")]
    pub nodes: Vec<NodeConfig>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let abs = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|d| d.join(path))
                .unwrap_or_else(|_| path.to_path_buf())
        };
        let base = abs.parent().unwrap_or(Path::new("/"));
        Config::from_toml(&text, base)
    }

    /// Parses and validates TOML text; relative paths resolve against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        Config::validate(raw, base)
    }

    /// Validates each section in file order, then what spans sections: the
    /// admin socket is no proxy listener, and the nodes fit the proxy's
    /// ranges and each other. The first error wins.
    fn validate(raw: RawConfig, base: &Path) -> Result<Config, ConfigError> {
        let ssh = ssh::validate_ssh(raw.ssh, base)?;
        let reconnect = ssh::validate_reconnect(raw.reconnect)?;
        let proxy = proxy::validate_proxy(raw.proxy, base)?;
        let health = raw.health.map(admin::validate_health).transpose()?;
        let runtime = runtime::validate_runtime(raw.runtime)?;
        let discovery = match raw.discovery {
            None => DiscoveryConfig::default(),
            Some(d) => discovery::validate_discovery(d, base)?,
        };
        let admin = admin::validate_admin(raw.admin, base)?;
        if proxy
            .listen
            .contains(&ListenAddr::Unix(admin.socket.clone()))
        {
            return Err(invalid(
                "admin.socket",
                "is the same path as a proxy listener",
            ));
        }

        let mut nodes = Vec::new();
        for (i, n) in raw.nodes.into_iter().enumerate() {
            let key = format!("node[{i}]");
            let node = node::validate_node(&key, n, ssh.port, AddressOrigin::Operator)?;
            check_pod_scope(&key, &node, &proxy.cluster_cidrs)?;
            nodes.push(node);
        }
        check_node_set(&nodes, &proxy.service_cidrs)?;

        Ok(Config {
            ssh,
            reconnect,
            proxy,
            admin,
            health,
            discovery,
            runtime,
            nodes,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use super::*;

    pub(super) const BASE: &str = r#"
[ssh]
user = "tunneler"
identity_file = "keys/id_ed25519"
known_hosts_file = "keys/known_hosts"
"#;

    pub(super) fn parse(extra: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&format!("{BASE}{extra}"), Path::new("/etc/tunneler"))
    }

    pub(super) fn err_of(extra: &str) -> String {
        parse(extra).unwrap_err().to_string()
    }

    #[test]
    fn the_documented_shape_parses() {
        let c = parse(
            r#"
[reconnect]
initial_backoff = "1s"
max_backoff = "30s"

[proxy]
listen = ["unix:///run/tunneler/egress.sock", "tcp://127.0.0.1:8131"]
service_cidrs = ["10.96.0.0/12"]

[admin]
socket = "/run/tunneler/admin.sock"

[[node]]
name = "node-1"
address = "10.0.0.11"
pod_cidrs = ["10.244.1.0/24"]
"#,
        )
        .unwrap();
        assert_eq!(
            c.ssh.identity_file,
            PathBuf::from("/etc/tunneler/keys/id_ed25519")
        );
        assert_eq!(c.ssh.port, 22);
        assert_eq!(
            c.nodes[0].internal_ips,
            vec!["10.0.0.11".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(c.nodes[0].endpoint(), "10.0.0.11:22");
        assert_eq!(c.proxy.dial_timeout, Duration::from_secs(5));
        assert_eq!(c.proxy.listen.len(), 2);
    }

    #[test]
    fn zero_nodes_is_valid() {
        assert!(parse("").unwrap().nodes.is_empty());
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err_of("[proxy]\nbogus = 1\n").contains("bogus"));
        assert!(err_of("[proxy]\ndial_timeout = \"5\"\n").contains("proxy.dial_timeout"));
        assert!(err_of("[proxy]\nservice_cidrs = [\"10.96.0.0/33\"]\n")
            .contains("proxy.service_cidrs[0]"));
        assert!(err_of("[proxy]\nlisten = [\"tcp://0.0.0.0:8131\"]\n").contains("loopback"));
        assert!(
            err_of("[reconnect]\ninitial_backoff = \"1m\"\nmax_backoff = \"1s\"\n")
                .contains("reconnect.initial_backoff")
        );
        let dup = "[[node]]\nname = \"a\"\naddress = \"10.0.0.1\"\n[[node]]\nname = \"a\"\naddress = \"10.0.0.2\"\n";
        assert!(err_of(dup).contains("node[1].name"));
        let overlap = "[[node]]\nname = \"a\"\naddress = \"10.0.0.1\"\npod_cidrs = [\"10.244.0.0/22\"]\n[[node]]\nname = \"b\"\naddress = \"10.0.0.2\"\npod_cidrs = [\"10.244.1.0/24\"]\n";
        assert!(err_of(overlap).contains("node[1].pod_cidrs"));
        let host_bits =
            "[[node]]\nname = \"a\"\naddress = \"10.0.0.1\"\npod_cidrs = [\"10.244.1.1/24\"]\n";
        assert!(err_of(host_bits).contains("host bits"));
        let dns = "[[node]]\nname = \"a\"\naddress = \"node-a.example\"\n";
        assert!(err_of(dns).contains("node[0].internal_ips"));
        let bad_name = "[[node]]\nname = \"Node_A\"\naddress = \"10.0.0.1\"\n";
        assert!(err_of(bad_name).contains("node[0].name"));
    }
}
