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
    /// List the open streams (target, node, session, age, bytes, buffered
    /// bytes, whether each holds its SSH session).
    Streams {
        /// Admin socket to ask (overrides --config).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Config file whose [admin] socket to ask.
        #[arg(long, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// Only this node's streams.
        #[arg(long)]
        node: Option<String>,
        /// Order: oldest first, or held and most buffered first.
        #[arg(long, value_enum, default_value_t = StreamOrder::Age)]
        sort: StreamOrder,
        /// At most this many streams (default 100; the daemon caps it at 10000).
        #[arg(long)]
        limit: Option<usize>,
        /// Print the admin API's JSON document.
        #[arg(long)]
        json: bool,
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
    /// Write the man pages (tunneler.1 and one per subcommand) into DIR;
    /// packaging runs it.
    #[command(hide = true)]
    Manpages {
        /// Directory to write into (created if missing).
        #[arg(long)]
        out_dir: PathBuf,
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

/// `tunneler streams --sort`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum StreamOrder {
    /// Oldest first.
    Age,
    /// Streams holding their session first, then most bytes buffered.
    Buffered,
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

/// `tunneler manpages`: writes `tunneler.1` and `tunneler-<sub>.1` for
/// every visible subcommand (nested ones too) into `dir`, from the clap
/// definitions, so the pages never drift from `--help`; exit code 0 or 1.
/// The pages' date is `SOURCE_DATE_EPOCH` when set (reproducible
/// packages), else today.
pub fn manpages(dir: &std::path::Path) -> u8 {
    use clap::CommandFactory;
    fn write(
        cmd: &clap::Command,
        name: &str,
        date: &str,
        dir: &std::path::Path,
    ) -> std::io::Result<()> {
        let cmd = cmd.clone().name(name.to_string());
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd.clone())
            .date(date)
            .source(format!("tunneler {}", env!("CARGO_PKG_VERSION")))
            .manual("tunneler manual")
            .render(&mut out)?;
        std::fs::write(dir.join(format!("{name}.1")), out)?;
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub, &format!("{name}-{}", sub.get_name()), date, dir)?;
        }
        Ok(())
    }
    let when = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(|s| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s))
        .unwrap_or_else(std::time::SystemTime::now);
    let date = crate::timestamp::rfc3339(when)
        .split('T')
        .next()
        .unwrap_or_default()
        .to_string();
    let cmd = Cli::command();
    let done = std::fs::create_dir_all(dir).and_then(|()| write(&cmd, "tunneler", &date, dir));
    match done {
        Ok(()) => {
            println!("wrote the man pages into {}", dir.display());
            0
        }
        Err(e) => {
            eprintln!("manpages: {}: {e}", dir.display());
            1
        }
    }
}
