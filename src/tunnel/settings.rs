//! The settings only the tunnel reads: the reconnect backoff, the active
//! health probe and how long a replaced session may drain. They are the
//! tunnel's own, beside (not inside) the SSH context the sessions share.
//! A reload swaps them in a [`SettingsCell`], which also tells the readers
//! that asked to be woken (the probe waits on that rather than polling for
//! a `[health]` section).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::{Config, HealthConfig, ReconnectConfig};

/// What the tunnels of every node read of the config.
#[derive(Debug, Clone, PartialEq)]
pub struct TunnelSettings {
    /// Backoff settings.
    pub reconnect: ReconnectConfig,
    /// The optional active health probe.
    pub health: Option<HealthConfig>,
    /// How long a retiring session may keep serving its streams.
    pub drain_timeout: Duration,
}

impl TunnelSettings {
    /// The tunnel's part of `config`.
    pub fn from_config(config: &Config) -> TunnelSettings {
        TunnelSettings {
            reconnect: config.reconnect.clone(),
            health: config.health.clone(),
            drain_timeout: config.proxy.drain_timeout,
        }
    }
}

/// The current [`TunnelSettings`], swapped by a reload. Each connect
/// attempt and each probe round reads the newest.
#[derive(Debug)]
pub struct SettingsCell {
    current: ArcSwap<TunnelSettings>,
    changed: watch::Sender<()>,
}

impl SettingsCell {
    /// A cell holding `settings`.
    pub fn new(settings: TunnelSettings) -> SettingsCell {
        SettingsCell {
            current: ArcSwap::from_pointee(settings),
            changed: watch::Sender::new(()),
        }
    }

    /// The current settings, cheaply (lock-free).
    pub fn load(&self) -> arc_swap::Guard<Arc<TunnelSettings>> {
        self.current.load()
    }

    /// The current settings, as an owned handle.
    pub fn load_full(&self) -> Arc<TunnelSettings> {
        self.current.load_full()
    }

    /// Replaces the settings and wakes every subscriber.
    pub fn store(&self, settings: Arc<TunnelSettings>) {
        self.current.store(settings);
        self.changed.send_replace(());
    }

    /// A receiver that sees every [`store`](Self::store) made after this
    /// call.
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }
}

/// The shared handle on the current tunnel settings.
pub type SharedSettings = Arc<SettingsCell>;
