//! The running config, kept apart from the lock that orders changes to it:
//! readers load the last stored config without waiting, writers serialize
//! on the change lock.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::Config;

/// The running config, apart from the lock that orders changes to it.
///
/// Reads are lock-free loads of the last stored config. Writers (reload,
/// node add/remove, a discovery sync) hold [`ConfigStore::change`] while
/// they validate and apply, and store the new config at the end.
pub struct ConfigStore {
    current: ArcSwap<Config>,
    changes: tokio::sync::Mutex<()>,
}

impl ConfigStore {
    /// A store holding `config`.
    pub fn new(config: Config) -> ConfigStore {
        ConfigStore {
            current: ArcSwap::from_pointee(config),
            changes: tokio::sync::Mutex::new(()),
        }
    }

    /// The current config (lock-free; a reload in progress is not seen
    /// until it has applied).
    pub fn load(&self) -> Arc<Config> {
        self.current.load_full()
    }

    /// Orders one change against the others; held while validating and
    /// applying.
    pub async fn change(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.changes.lock().await
    }

    /// Replaces the config; only a holder of [`ConfigStore::change`]
    /// should, after validating and applying it.
    pub(crate) fn store(&self, config: Config) {
        self.current.store(Arc::new(config));
    }
}
