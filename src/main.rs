//! The `tunneler` binary: parse the command line, set up logging, call the
//! library. Everything else lives in the `tunneler` crate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tunneler::config::{Config, DEFAULT_ADMIN_SOCKET, DEFAULT_CONFIG_PATH};

#[derive(Parser)]
#[command(
    name = "tunneler",
    version,
    about = "Verified SSH tunnels from kube-apiserver to every node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with span fields (node, stream).
    Json,
}

#[derive(Subcommand)]
enum NodesAction {
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

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

/// A current-thread runtime on the calling thread. For `run` it is the
/// control runtime (admin, discovery, reload, accept and CONNECT heads);
/// nodes and their streams run on the daemon's shard threads.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, log_format } => run(&config, log_format),
        Command::Status {
            socket,
            config,
            json,
            watch,
        } => status(socket, config, json, watch),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "tunneler",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: OK ({} node(s), {} listener(s))",
                    config.display(),
                    c.nodes.len(),
                    c.proxy.listen.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", config.display());
                ExitCode::from(1)
            }
        },
        Command::Nodes {
            socket,
            config,
            action,
        } => {
            let socket = match admin_socket(socket, config) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let (method, path, body) = match action {
                NodesAction::Add {
                    name,
                    address,
                    port,
                    internal_ips,
                    pod_cidrs,
                    hostnames,
                } => {
                    let mut body = serde_json::json!({
                        "name": name,
                        "address": address,
                        "pod_cidrs": pod_cidrs,
                        "hostnames": hostnames,
                    });
                    if let Some(p) = port {
                        body["port"] = p.into();
                    }
                    if !internal_ips.is_empty() {
                        body["internal_ips"] = internal_ips.into();
                    }
                    (hyper::Method::POST, "/v1/nodes".to_string(), Some(body))
                }
                NodesAction::Remove { name } => (
                    hyper::Method::DELETE,
                    format!("/v1/nodes/{}", path_segment(&name)),
                    None,
                ),
                NodesAction::Drain { name } => (
                    hyper::Method::POST,
                    format!("/v1/nodes/{}/drain", path_segment(&name)),
                    None,
                ),
                NodesAction::Undrain { name } => (
                    hyper::Method::POST,
                    format!("/v1/nodes/{}/undrain", path_segment(&name)),
                    None,
                ),
                NodesAction::Reconnect { name } => (
                    hyper::Method::POST,
                    format!("/v1/nodes/{}/reconnect", path_segment(&name)),
                    None,
                ),
            };
            admin_call(socket, method, &path, body)
        }
        Command::Reload { socket, config } => match admin_socket(socket, config) {
            Ok(socket) => admin_call(socket, hyper::Method::POST, "/v1/reload", None),
            Err(code) => code,
        },
        Command::Keygen { out, comment } => match tunneler::keygen::generate(&out, &comment) {
            Ok(g) => {
                eprintln!(
                    "wrote {} (mode 0600) and {}",
                    g.private.display(),
                    g.public.display()
                );
                eprintln!("add this line to ~tunneler/.ssh/authorized_keys on every node:");
                println!("{}", g.authorized_keys_line);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("keygen: {e}");
                ExitCode::from(1)
            }
        },
    }
}

fn run(config_path: &Path, log_format: LogFormat) -> ExitCode {
    init_logging(log_format);
    // Fatal errors go through tracing only: in json mode every stderr line
    // must be one JSON object, and in text mode the log line reads well.
    let fatal = |msg: String| {
        tracing::error!("{msg}");
        ExitCode::from(1)
    };
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => return fatal(format!("{}: {e}", config_path.display())),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fatal(format!("cannot start the async runtime: {e}")),
    };
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            tokio::select! {
                _ = int.recv() => tracing::info!("SIGINT received"),
                _ = term.recv() => tracing::info!("SIGTERM received"),
            }
            signals.cancel();
        });
        let path = std::fs::canonicalize(config_path).unwrap_or_else(|_| config_path.to_path_buf());
        match tunneler::daemon::run(config, Some(path), shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fatal(format!("tunneler: {e}")),
        }
    })
}

/// Node names are DNS-style, so only a name with other bytes needs care:
/// refuse to build a path from it rather than percent-encode by hand.
fn path_segment(name: &str) -> String {
    if name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        name.to_string()
    } else {
        "%00invalid-node-name".to_string()
    }
}

/// Sends one admin request and prints the answer: exit 0 on 2xx, 1 on an
/// error answer (printed to stderr), 2 when the daemon cannot be reached.
fn admin_call(
    socket: PathBuf,
    method: hyper::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(tunneler::client::request(&socket, method, path, body)) {
        Ok((code, body)) => {
            let text = String::from_utf8_lossy(&body);
            if (200..300).contains(&code) {
                print!("{text}");
                ExitCode::SUCCESS
            } else {
                let msg = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                    .unwrap_or_else(|| text.trim().to_string());
                eprintln!("tunneler: {msg} (HTTP {code})");
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("tunneler: {e}");
            ExitCode::from(2)
        }
    }
}

/// The admin socket from `--socket`, else from `--config`'s [admin]
/// socket, else the default. A config that does not load exits 2.
fn admin_socket(socket: Option<PathBuf>, config: Option<PathBuf>) -> Result<PathBuf, ExitCode> {
    match (socket, config) {
        (Some(s), _) => Ok(s),
        (None, Some(c)) => match Config::load(&c) {
            Ok(cfg) => Ok(cfg.admin.socket),
            Err(e) => {
                eprintln!("{}: {e}", c.display());
                Err(ExitCode::from(2))
            }
        },
        (None, None) => Ok(PathBuf::from(DEFAULT_ADMIN_SOCKET)),
    }
}

fn status(socket: Option<PathBuf>, config: Option<PathBuf>, json: bool, watch: bool) -> ExitCode {
    let socket = match admin_socket(socket, config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    if watch {
        return rt.block_on(async {
            loop {
                let frame = match tunneler::client::status(&socket).await {
                    Ok((doc, _)) => doc.table(),
                    Err(e) => format!("tunneler status: {e}\n"),
                };
                // Clear the screen and home the cursor, then draw.
                print!("\x1b[2J\x1b[H{frame}");
                let _ = std::io::Write::flush(&mut std::io::stdout());
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
        });
    }
    match rt.block_on(tunneler::client::status(&socket)) {
        Ok((doc, raw)) => {
            if json {
                print!("{}", String::from_utf8_lossy(&raw));
            } else {
                print!("{}", doc.table());
            }
            if doc.all_healthy() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("tunneler status: {e}");
            ExitCode::from(2)
        }
    }
}
