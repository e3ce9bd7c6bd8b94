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
    },
    /// Validate a config file.
    CheckConfig {
        /// Config file.
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(&config),
        Command::Status {
            socket,
            config,
            json,
        } => status(socket, config, json),
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

fn run(config_path: &Path) -> ExitCode {
    init_logging();
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", config_path.display());
            return ExitCode::from(1);
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
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
        match tunneler::daemon::run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("tunneler: {e}");
                ExitCode::from(1)
            }
        }
    })
}

fn status(socket: Option<PathBuf>, config: Option<PathBuf>, json: bool) -> ExitCode {
    let socket = match (socket, config) {
        (Some(s), _) => s,
        (None, Some(c)) => match Config::load(&c) {
            Ok(cfg) => cfg.admin.socket,
            Err(e) => {
                eprintln!("{}: {e}", c.display());
                return ExitCode::from(2);
            }
        },
        (None, None) => PathBuf::from(DEFAULT_ADMIN_SOCKET),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
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
