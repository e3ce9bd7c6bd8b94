//! What a reload applies, key by key, and the difference between two
//! configs.
//!
//! The diff is not a list of hand-written comparisons: both configs are
//! serialized (the validated types derive `Serialize`, with their TOML key
//! names) and compared key by key, so a new config field is compared
//! without anyone remembering to. What a changed key *means* for a reload
//! comes from [`EFFECTS`], one row per key or whole section, kept beside
//! the config types in `config::effects`; its unit tests fail when a config
//! key has no row, or a row names no key, and check that the configuration
//! reference marks exactly the `Restart` keys "Restart.", and that the
//! example config's comments say "restart" at exactly those keys.

use serde_json::Value;

pub use crate::config::effects::{effect, Effect, EFFECTS};
use crate::config::Config;

/// A key whose value differs between two configs, and when that counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `section` or `section.key`, as in [`EFFECTS`].
    pub key: String,
    /// When it takes effect.
    pub effect: Effect,
}

impl Change {
    /// The operator's warning for a change a reload does not fully apply.
    pub fn warning(&self) -> Option<String> {
        match self.effect {
            Effect::Live => None,
            Effect::NewNodes => Some(format!(
                "{} changed: applies to nodes added or changed from now on; `tunneler nodes remove`/`add` or a restart applies it to the others",
                self.key
            )),
            Effect::Restart => Some(format!(
                "{} changed: takes effect after a restart",
                self.key
            )),
        }
    }
}

/// `config` as a JSON object of sections.
fn sections(config: &Config) -> serde_json::Map<String, Value> {
    match serde_json::to_value(config) {
        Ok(Value::Object(m)) => m,
        // Config is a struct of plain data: it always serializes to an
        // object. Should that ever fail, every section compares equal and
        // the reload applies the nodes only, which is the safe side.
        _ => serde_json::Map::new(),
    }
}

/// Every key (at the granularity of [`EFFECTS`]) whose value differs
/// between `old` and `new`, in config order.
pub fn diff(old: &Config, new: &Config) -> Vec<Change> {
    let (old, new) = (sections(old), sections(new));
    let mut changes = Vec::new();
    let mut push = |key: String| {
        // A key without a row is caught by the unit test; at run time it
        // counts as needing a restart, the conservative answer.
        let effect = effect(&key).unwrap_or(Effect::Restart);
        changes.push(Change { key, effect });
    };
    for (section, new_value) in &new {
        let old_value = old.get(section).unwrap_or(&Value::Null);
        let whole = EFFECTS.iter().any(|(row, _)| row == section);
        match (old_value, new_value) {
            (Value::Object(a), Value::Object(b)) if !whole => {
                for (key, b_value) in b {
                    if a.get(key) != Some(b_value) {
                        push(format!("{section}.{key}"));
                    }
                }
            }
            (a, b) if a != b => push(section.clone()),
            _ => {}
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::example;

    #[test]
    fn the_diff_names_each_changed_key_with_its_effect() {
        let old = example();
        assert_eq!(diff(&old, &old), vec![]);
        let mut new = old.clone();
        new.proxy.dial_timeout *= 2;
        new.proxy.socket_group = Some("other".into());
        new.ssh.connections_per_node += 1;
        new.discovery.address_types.push("Hostname".into());
        new.nodes.pop();
        let got: Vec<(String, Effect)> = diff(&old, &new)
            .into_iter()
            .map(|c| (c.key, c.effect))
            .collect();
        let want = [
            ("ssh.connections_per_node", Effect::NewNodes),
            ("proxy.dial_timeout", Effect::Live),
            ("proxy.socket_group", Effect::Restart),
            ("discovery", Effect::Restart),
            ("node", Effect::Live),
        ];
        for w in &want {
            assert!(
                got.contains(&(w.0.to_string(), w.1)),
                "{w:?} missing in {got:?}"
            );
        }
        assert_eq!(got.len(), want.len(), "{got:?}");
    }
}
