//! The byte pattern and the error list

use crate::*;

/// A fresh seed for each stream, so that bytes of one stream showing up
/// on another are caught too.
pub(crate) fn next_seed() -> u64 {
    static SEEDS: pattern::Seeds = pattern::Seeds::new(0x7475_6e6e_656c_6572);
    SEEDS.next()
}

/// Every correctness failure of this run; any makes the bench exit 1.
pub(crate) fn errors() -> &'static std::sync::Mutex<Vec<String>> {
    static E: std::sync::OnceLock<std::sync::Mutex<Vec<String>>> = std::sync::OnceLock::new();
    E.get_or_init(Default::default)
}

/// Records a correctness failure (shown after the figures; exit 1).
pub(crate) fn fail(what: String) {
    progress(&format!("ERROR: {what}"));
    errors()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(what);
}
