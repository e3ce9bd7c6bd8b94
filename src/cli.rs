//! The command line, as clap types. `main.rs` parses it and dispatches;
//! the admin-client commands run in the `client` module.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::DEFAULT_CONFIG_PATH;

/// `tunneler`: the command line.
#[derive(Parser)]
#[command(
    name = "tunneler",
    version,
    about = "Verified SSH tunnels from kube-apiserver to every node"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground.
    Run {
        /// Config file.
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Log line format on stderr.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Show the state of every tunnel (exit 0 all healthy, 1 not, 2 unreachable).
    Status {
        /// Admin socket to ask (overrides --config).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Config file whose [admin] socket to ask.
        #[arg(long, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// Print the admin API's JSON status document.
        #[arg(long)]
        json: bool,
        /// Redraw the table every second until interrupted.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
    /// Print shell completions.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Validate a config file.
    CheckConfig {
        /// Config file.
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Change the node set of a running daemon.
    Nodes {
        /// Admin socket (default /run/tunneler/admin.sock).
        #[arg(long, global = true)]
        socket: Option<PathBuf>,
        /// Config file whose [admin] socket to use.
        #[arg(long, global = true, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// The change.
        #[command(subcommand)]
        action: NodesAction,
    },
    /// Re-read the daemon's config file and apply the difference.
    Reload {
        /// Admin socket (default /run/tunneler/admin.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Config file whose [admin] socket to use.
        #[arg(long, conflicts_with = "socket")]
        config: Option<PathBuf>,
    },
    /// Write a new ed25519 key pair and print the authorized_keys line.
    Keygen {
        /// Private key path; the public key goes to PATH.pub.
        #[arg(long)]
        out: PathBuf,
        /// Comment in the public key.
        #[arg(long, default_value = "tunneler")]
        comment: String,
    },
}

/// `--log-format`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with span fields (node, stream).
    Json,
}

/// `tunneler nodes ...`.
#[derive(Subcommand)]
pub enum NodesAction {
    /// Add a node.
    Add {
        /// Node name.
        name: String,
        /// SSH address (IP or name).
        #[arg(long)]
        address: String,
        /// SSH port (default from [ssh] port).
        #[arg(long)]
        port: Option<u16>,
        /// IP that routes to this node (repeatable; default: the address).
        #[arg(long = "internal-ip")]
        internal_ips: Vec<String>,
        /// Pod CIDR of this node (repeatable).
        #[arg(long = "pod-cidr")]
        pod_cidrs: Vec<String>,
        /// Further name that routes to this node (repeatable).
        #[arg(long = "hostname")]
        hostnames: Vec<String>,
        /// DNS name (InternalDNS, ExternalDNS) that routes to this node
        /// (repeatable).
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        /// The node's own address inside the pod range, such as a CNI
        /// tunnel address: held to the node port policy (repeatable).
        #[arg(long = "host-address")]
        host_addresses: Vec<String>,
    },
    /// Remove a node: out of routing at once, closed after its streams drain.
    Remove {
        /// Node name.
        name: String,
    },
    /// Take a node out of the service pool; node-addressed dials still go.
    Drain {
        /// Node name.
        name: String,
    },
    /// Put a drained node back into the service pool.
    Undrain {
        /// Node name.
        name: String,
    },
    /// Open a new session, switch new streams to it, drain the old one.
    Reconnect {
        /// Node name.
        name: String,
    },
}

/// `tunneler check-config`: validates the file; exit code 0 or 1.
pub fn check_config(config: &std::path::Path) -> u8 {
    match crate::config::Config::load(config) {
        Ok(c) => {
            let (nodes, listeners) = (c.nodes.len(), c.proxy.listen.len());
            println!(
                "{}: OK ({nodes} node(s), {listeners} listener(s))",
                config.display()
            );
            0
        }
        Err(e) => {
            eprintln!("{}: {e}", config.display());
            1
        }
    }
}

/// `tunneler keygen`: writes a new key pair and prints the
/// authorized_keys line; exit code 0 or 1.
pub fn keygen(out: &std::path::Path, comment: &str) -> u8 {
    match crate::ssh::keygen::generate(out, comment) {
        Ok(g) => {
            let (private, public) = (g.private.display(), g.public.display());
            eprintln!("wrote {private} (mode 0600) and {public}");
            eprintln!("add this line to ~tunneler/.ssh/authorized_keys on every node:");
            println!("{}", g.authorized_keys_line);
            0
        }
        Err(e) => {
            eprintln!("keygen: {e}");
            1
        }
    }
}
