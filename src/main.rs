//! The `tunneler` binary: parse the command line and dispatch. The
//! commands live in the library: [`tunneler::daemon`] runs the daemon (this
//! file only adds logging, the runtime and the signal handlers around it),
//! [`tunneler::client`] talks to a running one. SIGHUP, SIGTERM
//! and SIGINT are held back from the first instruction until `run` has its
//! handlers (see [`tunneler::signals`]).

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tunneler::client;
use tunneler::signals;
use tunneler::Config;
use tunneler::{Cli, Command, LogFormat};

/// A current-thread runtime on the calling thread. For `run` it is the
/// control runtime (admin, discovery, reload, metrics);
/// nodes and their streams run on the daemon's shard threads.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

fn main() -> ExitCode {
    // Only threads created later inherit the mask; none exists yet.
    signals::hold();
    let command = Cli::parse().command;
    if !matches!(command, Command::Run { .. }) {
        // The client commands keep the default actions (a hangup ends
        // `status --watch`).
        signals::release();
    }
    let code = match command {
        Command::Run { config, log_format } => return run(&config, log_format),
        Command::Status {
            socket,
            config,
            json,
            watch,
        } => client::admin_socket(socket, config)
            .map_or_else(|c| c, |s| client::run_status(&s, json, watch)),
        Command::Nodes {
            socket,
            config,
            action,
        } => client::admin_socket(socket, config).map_or_else(
            |c| c,
            |s| client::run_request(&s, client::nodes_request(action)),
        ),
        Command::Reload { socket, config } => client::admin_socket(socket, config).map_or_else(
            |c| c,
            |s| client::run_request(&s, tunneler::Request::Reload),
        ),
        Command::Streams {
            socket,
            config,
            node,
            sort,
            limit,
            json,
        } => client::admin_socket(socket, config).map_or_else(
            |c| c,
            |s| {
                let query = tunneler::StreamsQuery {
                    node,
                    sort: sort.into(),
                    limit,
                };
                client::run_streams(&s, query, json)
            },
        ),
        Command::Manpages { out_dir } => tunneler::manpages(&out_dir),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let out = &mut std::io::stdout();
            clap_complete::generate(shell, &mut Cli::command(), "tunneler", out);
            0
        }
        Command::CheckConfig { config } => tunneler::check_config(&config),
        Command::Keygen { out, comment } => tunneler::keygen(&out, &comment),
    };
    ExitCode::from(code)
}

/// Takes the sockets systemd passed (socket activation), before anything
/// else could open a descriptor or start a thread.
fn passed_sockets() -> Result<tunneler::PassedSockets, String> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let fds = tunneler::take_listen_fds().map_err(|e| e.to_string())?;
    let owned = fds
        .into_iter()
        .map(|(fd, name)| {
            // SAFETY: take_listen_fds returned only descriptors that the
            // service manager passed to this very process (LISTEN_PID) and
            // that are open sockets; this runs once, first thing, so nothing
            // else in the process owns or has closed them.
            (unsafe { OwnedFd::from_raw_fd(fd) }, name)
        })
        .collect();
    tunneler::PassedSockets::new(owned).map_err(|e| e.to_string())
}

fn run(config_path: &Path, log_format: LogFormat) -> ExitCode {
    let passed = passed_sockets();
    // Handlers first, while the signals are still held back: the runtime
    // (current-thread, so no thread inherits the mask) is what tokio's
    // handlers need, and then nothing of the start can be cut short by a
    // signal's default action. A signal that came meanwhile is delivered
    // to them when the mask is lifted.
    let rt = runtime();
    let signals = rt.as_ref().map_err(|e| e.to_string()).and_then(|rt| {
        let _enter = rt.enter();
        signals::Signals::install().map_err(|e| e.to_string())
    });
    signals::release();
    tunneler::init_logging(log_format);
    // Fatal errors go through tracing only: in json mode every stderr line
    // must be one JSON object, and in text mode the log line reads well.
    let fatal = |msg: String| {
        tracing::error!("{msg}");
        ExitCode::from(1)
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => return fatal(format!("cannot start the async runtime: {e}")),
    };
    let signals = match signals {
        Ok(s) => s,
        Err(e) => return fatal(format!("cannot install the signal handlers: {e}")),
    };
    let passed = match passed {
        Ok(p) => p,
        Err(e) => return fatal(e),
    };
    if !passed.is_empty() {
        tracing::info!(
            sockets = passed.len(),
            "socket activation: using the sockets passed by the service manager"
        );
    }
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => return fatal(format!("{}: {e}", config_path.display())),
    };
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let signals::Signals {
            hangup,
            terminate,
            interrupt,
        } = signals;
        tokio::spawn(signals::cancel_on_stop(
            shutdown.clone(),
            terminate,
            interrupt,
        ));
        let path = std::fs::canonicalize(config_path).unwrap_or_else(|_| config_path.to_path_buf());
        match tunneler::run(config, Some(path), shutdown, passed, hangup).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fatal(format!("tunneler: {e}")),
        }
    })
}
