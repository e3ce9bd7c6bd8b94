//! The `tunneler` binary: parse the command line and dispatch. The
//! commands live in the library: [`tunneler::daemon`] runs the daemon (this
//! file only adds logging, the runtime and the signal handler around it),
//! [`tunneler::admin::client`] talks to a running one. SIGHUP, SIGTERM
//! and SIGINT are held back from the first instruction until `run` has its
//! handlers, so no signal's default action can end a starting daemon.

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
use tokio_util::sync::CancellationToken;
use tunneler::admin::client;
use tunneler::cli::{Cli, Command, LogFormat};
use tunneler::config::Config;

/// A current-thread runtime on the calling thread. For `run` it is the
/// control runtime (admin, discovery, reload, metrics);
/// nodes and their streams run on the daemon's shard threads.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// SIGHUP, SIGTERM and SIGINT, held back (blocked) from main's first
/// instruction until `run` has its handlers: their default action ends the
/// process, so a `systemctl reload` racing a start used to kill the daemon
/// (1 to 2 of 5 starts with SIGHUP 0 to 100 ms in). A blocked signal stays
/// pending and reaches the handler when the mask is lifted.
fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT] {
        set.add(s);
    }
    set
}

/// Lifts the mask [`stop_signals`] set; nothing more is held back.
fn unblock_stop_signals() {
    let _ = pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&stop_signals()), None);
}

fn main() -> ExitCode {
    // Only threads created later inherit the mask; none exists yet.
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&stop_signals()), None);
    let command = Cli::parse().command;
    if !matches!(command, Command::Run { .. }) {
        // The client commands keep the default actions (a hangup ends
        // `status --watch`).
        unblock_stop_signals();
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
            |s| client::run_request(&s, tunneler::admin::api::Request::Reload),
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
                let query = tunneler::admin::api::StreamsQuery {
                    node,
                    sort: sort.into(),
                    limit,
                };
                client::run_streams(&s, query, json)
            },
        ),
        Command::Manpages { out_dir } => tunneler::cli::manpages(&out_dir),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let out = &mut std::io::stdout();
            clap_complete::generate(shell, &mut Cli::command(), "tunneler", out);
            0
        }
        Command::CheckConfig { config } => tunneler::cli::check_config(&config),
        Command::Keygen { out, comment } => tunneler::cli::keygen(&out, &comment),
    };
    ExitCode::from(code)
}

/// Takes the sockets systemd passed (socket activation), before anything
/// else could open a descriptor or start a thread.
fn passed_sockets() -> Result<tunneler::proxy::activation::PassedSockets, String> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let fds = tunneler::proxy::activation::take_listen_fds().map_err(|e| e.to_string())?;
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
    tunneler::proxy::activation::PassedSockets::new(owned).map_err(|e| e.to_string())
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
        tunneler::daemon::Signals::install().map_err(|e| e.to_string())
    });
    unblock_stop_signals();
    tunneler::logging::init(log_format);
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
        let tunneler::daemon::Signals {
            hangup,
            terminate,
            interrupt,
        } = signals;
        tokio::spawn(cancel_on_signal(shutdown.clone(), terminate, interrupt));
        let path = std::fs::canonicalize(config_path).unwrap_or_else(|_| config_path.to_path_buf());
        match tunneler::daemon::run(config, Some(path), shutdown, passed, hangup).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fatal(format!("tunneler: {e}")),
        }
    })
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn cancel_on_signal(
    shutdown: CancellationToken,
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
) {
    tokio::select! {
        _ = int.recv() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
    shutdown.cancel();
}
