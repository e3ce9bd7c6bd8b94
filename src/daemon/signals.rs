//! Every signal the daemon handles, in one place: SIGHUP reloads, SIGTERM
//! and SIGINT stop gracefully, and a second SIGTERM or SIGINT during the
//! drain ends the drain.
//!
//! The hazard is the start. The default action of all three ends the
//! process, so a `systemctl reload` racing a start used to kill the daemon
//! (1 to 2 of 5 starts with SIGHUP 0 to 100 ms in). Hence the order: `main`
//! calls [`hold`] as its first instruction (before any thread exists, so
//! every thread inherits the mask), [`Signals::install`] registers tokio's
//! handlers, and only then [`release`] lifts the mask. A signal that came
//! meanwhile stayed pending and reaches its handler.

use std::future::Future;

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal as Sig};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// SIGHUP, SIGTERM and SIGINT: the signals held back during the start.
fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Sig::SIGHUP, Sig::SIGTERM, Sig::SIGINT] {
        set.add(s);
    }
    set
}

/// Holds back (blocks) SIGHUP, SIGTERM and SIGINT on the calling thread
/// and every thread it creates later. Only threads created after the call
/// inherit the mask, so call it first thing in `main`.
pub fn hold() {
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&stop_signals()), None);
}

/// Lifts the mask [`hold`] set; nothing more is held back.
pub fn release() {
    let _ = pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&stop_signals()), None);
}

/// The daemon's signal streams. From [`Signals::install`] on, a signal is
/// recorded by its stream, never acted on by its default action, whatever
/// the daemon is doing.
#[derive(Debug)]
pub struct Signals {
    /// SIGHUP: reload, once the daemon is ready.
    pub hangup: Signal,
    /// SIGTERM: graceful stop.
    pub terminate: Signal,
    /// SIGINT: graceful stop.
    pub interrupt: Signal,
}

impl Signals {
    /// Registers the three handlers. Call inside a tokio runtime.
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM.
pub async fn cancel_on_stop(shutdown: CancellationToken, mut term: Signal, mut int: Signal) {
    tokio::select! {
        _ = int.recv() => info!("SIGINT received"),
        _ = term.recv() => info!("SIGTERM received"),
    }
    shutdown.cancel();
}

/// Resolves on the next SIGTERM or SIGINT (an impatient operator during
/// the drain). The handlers are registered by this call, not when the
/// future is first polled, so call it before anything says the drain
/// began. If they cannot be registered it never resolves, and the drain
/// runs its full time.
pub fn stop_again() -> impl Future<Output = ()> {
    let signals = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        match signals {
            (Ok(mut term), Ok(mut int)) => tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            },
            _ => std::future::pending().await,
        }
    }
}

/// Calls `reload` on every SIGHUP until `cancel` fires. SIGHUPs before
/// `ready` fires (tokio's stream kept any that came during the start) fold
/// into one reload, applied once ready.
pub async fn reload_on_hangup<F, Fut>(
    mut hup: Signal,
    ready: CancellationToken,
    cancel: CancellationToken,
    mut reload: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut pending = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ready.cancelled(), if pending => {
                pending = false;
                info!("ready: applying the reload asked for by SIGHUP during the start");
                reload().await;
            }
            r = hup.recv() => {
                if r.is_none() {
                    return;
                }
                if ready.is_cancelled() {
                    info!("SIGHUP received: reloading the config");
                    reload().await;
                } else if !pending {
                    info!("SIGHUP received before the daemon is ready: reloading once it is");
                    pending = true;
                }
            }
        }
    }
}
