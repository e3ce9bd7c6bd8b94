//! Logging for `tunneler run`: text or JSON lines on stderr, filtered by
//! `RUST_LOG` (default `info`), with russh's known false alarm dropped.
//!
//! Access records (target `tunneler::access`, see `proxy::access`) go
//! through a layer of their own: `proxy.access_log` alone turns them on and
//! off, whatever `RUST_LOG` says, and in JSON a record is shaped as every
//! other line (its fields under `fields`) but carries no span or span
//! list, so its fields are all there is to parse.

use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::Layer;

use crate::cli::LogFormat;
use crate::proxy::access::ACCESS_TARGET;

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let env = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let rest = tracing_subscriber::filter::filter_fn(|meta| {
        meta.target() != ACCESS_TARGET && !crate::ssh::session::is_russh_packet_size_complaint(meta)
    });
    let access = || tracing_subscriber::filter::filter_fn(|meta| meta.target() == ACCESS_TARGET);
    let ansi = std::io::stderr().is_terminal();
    let registry = tracing_subscriber::registry();
    match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi)
                    .with_filter(env.and(rest)),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi)
                    .with_filter(access()),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(std::io::stderr)
                    .with_filter(env.and(rest)),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stderr)
                    .with_filter(access()),
            )
            .init(),
    }
}
