//! A node's tunnel state, without I/O: the connection's link per slot,
//! how it folds with the operator's drain and the probe's verdict into the
//! state `tunneler status` shows, and what each transition records.
//! [`NodeTunnel`](super::NodeTunnel) holds it in a watch channel and
//! applies these transitions there.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::error::TunnelError;

/// The state a node's tunnel is in, as shown by `tunneler status`. Its
/// wire names (status document, metrics label, messages) are in
/// [`TunnelState::ALL`] and nowhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelState {
    /// Connecting or handshaking.
    Connecting,
    /// Connected and authenticated.
    Healthy,
    /// Connected, but the active health probe fails. Node-addressed dials
    /// still use it; pool dials avoid it.
    Unhealthy,
    /// Connected, but taken out of the pool by an operator. Node-addressed
    /// dials still use it; streams already flowing keep flowing.
    Draining,
    /// Waiting to retry after a failure.
    Backoff,
    /// Host key mismatch or authentication refused; retried at max_backoff.
    Rejected,
}

impl TunnelState {
    /// Every state with its wire name.
    pub const ALL: [(TunnelState, &'static str); 6] = [
        (TunnelState::Connecting, "connecting"),
        (TunnelState::Healthy, "healthy"),
        (TunnelState::Unhealthy, "unhealthy"),
        (TunnelState::Draining, "draining"),
        (TunnelState::Backoff, "backoff"),
        (TunnelState::Rejected, "rejected"),
    ];

    /// The wire name.
    pub fn as_str(&self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(s, _)| s == self)
            .map_or("unknown", |(_, n)| n)
    }

    /// The state a wire name stands for.
    pub fn from_name(name: &str) -> Option<TunnelState> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(s, _)| *s)
    }

    /// True when a session is up (whatever the probe or drain say).
    pub fn is_connected(&self) -> bool {
        matches!(
            self,
            TunnelState::Healthy | TunnelState::Unhealthy | TunnelState::Draining
        )
    }
}

impl std::fmt::Display for TunnelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Compares with a wire name, as clients of the status document do.
impl PartialEq<&str> for TunnelState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for TunnelState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for TunnelState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        TunnelState::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown tunnel state {name:?}")))
    }
}

/// Where the connection itself is; the shown state also folds in drain and
/// probe results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Link {
    Connecting,
    Up,
    Backoff,
    Rejected,
}

/// State plus when it was entered and why the last failure happened.
#[derive(Debug, Clone)]
pub struct StateInfo {
    /// Current shown state.
    pub state: TunnelState,
    /// When this state was entered.
    pub since: SystemTime,
    /// The most recent failure; cleared when a session is established.
    pub last_error: Option<TunnelError>,
    /// When the next connect attempt is due (backoff and rejected only).
    pub next_retry: Option<SystemTime>,
    /// Round trip of the last keepalive ping.
    pub rtt: Option<Duration>,
    /// The node's link: the best of its connections' links.
    pub(super) link: Link,
    /// One link per SSH connection (`ssh.connections_per_node`).
    pub(super) slots: Vec<Link>,
    pub(super) draining: bool,
    pub(super) probe_failing: bool,
}

/// The node's link from its connections': up if any is up, else
/// connecting if any is, else rejected if any is, else backoff.
fn best_link(slots: &[Link]) -> Link {
    for l in [Link::Up, Link::Connecting, Link::Rejected] {
        if slots.contains(&l) {
            return l;
        }
    }
    Link::Backoff
}

impl StateInfo {
    /// The state shown for this link, drain and probe verdict.
    pub(super) fn shown(&self) -> TunnelState {
        match self.link {
            Link::Connecting => TunnelState::Connecting,
            Link::Backoff => TunnelState::Backoff,
            Link::Rejected => TunnelState::Rejected,
            Link::Up if self.draining => TunnelState::Draining,
            Link::Up if self.probe_failing => TunnelState::Unhealthy,
            Link::Up => TunnelState::Healthy,
        }
    }

    /// A node of `slots` connections, all connecting.
    pub(super) fn connecting(slots: usize) -> StateInfo {
        StateInfo {
            state: TunnelState::Connecting,
            since: SystemTime::now(),
            last_error: None,
            next_retry: None,
            rtt: None,
            link: Link::Connecting,
            slots: vec![Link::Connecting; slots],
            draining: false,
            probe_failing: false,
        }
    }

    /// Applies `f`; when the shown state changes, records it and when.
    pub(super) fn apply(&mut self, f: impl FnOnce(&mut StateInfo)) {
        let before = self.shown();
        f(self);
        let after = self.shown();
        if before != after {
            self.state = after;
            self.since = SystemTime::now();
        }
    }

    /// Connection `slot` is now at `link`, after `err` when it failed,
    /// with its next attempt due in `next_retry`. The node's link is the
    /// best of its slots'; a working session clears the last error, and
    /// the next retry shown is the soonest still ahead.
    pub(super) fn set_link(
        &mut self,
        slot: usize,
        link: Link,
        err: Option<TunnelError>,
        next_retry: Option<Duration>,
    ) {
        let s = self;
        if let Some(l) = s.slots.get_mut(slot) {
            *l = link;
        }
        s.link = best_link(&s.slots);
        if s.link != Link::Up {
            s.rtt = None;
            s.probe_failing = false;
        }
        if s.link == Link::Up {
            // A working session answers the question "what is wrong".
            s.last_error = None;
        } else if err.is_some() {
            s.last_error = err;
        }
        let retry = next_retry.map(|d| SystemTime::now() + d);
        s.next_retry = match (s.link, s.next_retry, retry) {
            (Link::Up | Link::Connecting, _, _) => None,
            (_, Some(old), Some(new)) if old > SystemTime::now() => Some(old.min(new)),
            (_, _, new) => new,
        };
    }

    /// Marks the probe as failing (with the reason, shown as
    /// `last_error`) or passing (clearing a probe error).
    pub(super) fn set_probe_failing(&mut self, failing: Option<String>) {
        self.probe_failing = failing.is_some();
        match failing {
            Some(why) => self.last_error = Some(TunnelError::Probe(why)),
            None => {
                if matches!(self.last_error, Some(TunnelError::Probe(_))) {
                    self.last_error = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_states_round_trip_through_their_wire_names() {
        for (state, name) in TunnelState::ALL {
            assert_eq!(state.as_str(), name);
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<TunnelState>(&json).unwrap(), state);
        }
        assert!(serde_json::from_str::<TunnelState>("\"sleepy\"").is_err());
    }

    fn rejected() -> TunnelError {
        TunnelError::HostKeyChanged("node-1".into())
    }

    /// The node's link is its best slot's: one session up is enough to be
    /// healthy, and a rejected slot shows only when none connects.
    #[test]
    fn the_node_shows_its_best_connection() {
        use Link::*;
        assert_eq!(best_link(&[Backoff, Up, Rejected]), Up);
        assert_eq!(best_link(&[Backoff, Rejected, Connecting]), Connecting);
        assert_eq!(best_link(&[Backoff, Rejected]), Rejected);
        assert_eq!(best_link(&[Backoff, Backoff]), Backoff);
        assert_eq!(best_link(&[]), Backoff);
        let mut s = StateInfo::connecting(2);
        s.apply(|s| s.set_link(0, Rejected, Some(rejected()), Some(Duration::from_secs(60))));
        assert_eq!(
            s.state,
            TunnelState::Connecting,
            "the other slot still connects"
        );
        s.apply(|s| s.set_link(1, Backoff, None, Some(Duration::from_secs(1))));
        assert_eq!(s.state, TunnelState::Rejected);
        assert!(matches!(s.last_error, Some(TunnelError::HostKeyChanged(_))));
        s.apply(|s| s.set_link(1, Up, None, None));
        assert_eq!(s.state, TunnelState::Healthy);
        assert!(s.last_error.is_none(), "a working session clears the error");
        assert_eq!(s.next_retry, None);
    }

    /// Drain and probe only change what an up link shows: draining before
    /// unhealthy; a link that goes down forgets the probe's verdict and its
    /// round trip.
    #[test]
    fn drain_and_probe_fold_into_an_up_link_only() {
        let mut s = StateInfo::connecting(1);
        s.apply(|s| s.set_probe_failing(Some("no answer".into())));
        assert_eq!(s.state, TunnelState::Connecting);
        s.apply(|s| s.set_link(0, Link::Up, None, None));
        s.apply(|s| s.set_probe_failing(Some("no answer".into())));
        assert_eq!(s.state, TunnelState::Unhealthy);
        assert!(matches!(&s.last_error, Some(TunnelError::Probe(w)) if w == "no answer"));
        s.apply(|s| s.draining = true);
        assert_eq!(s.state, TunnelState::Draining);
        assert!(s.state.is_connected());
        s.apply(|s| s.draining = false);
        s.apply(|s| s.set_probe_failing(None));
        assert_eq!(s.state, TunnelState::Healthy);
        assert!(
            s.last_error.is_none(),
            "a passing probe clears its own error"
        );
        s.apply(|s| s.set_probe_failing(Some("no answer".into())));
        s.rtt = Some(Duration::from_millis(1));
        s.apply(|s| s.set_link(0, Link::Backoff, None, Some(Duration::from_secs(1))));
        assert_eq!(s.state, TunnelState::Backoff);
        assert!(!s.state.is_connected());
        assert!(!s.probe_failing);
        assert_eq!(s.rtt, None);
    }

    /// A probe passing never clears an error that is not the probe's.
    #[test]
    fn a_passing_probe_keeps_a_connection_error() {
        let mut s = StateInfo::connecting(1);
        s.apply(|s| s.set_link(0, Link::Backoff, Some(rejected()), None));
        s.apply(|s| s.set_probe_failing(None));
        assert!(matches!(s.last_error, Some(TunnelError::HostKeyChanged(_))));
    }

    /// The retry shown is the soonest still ahead: a later, longer delay
    /// does not push it back; once up or connecting there is none.
    #[test]
    fn the_next_retry_shown_is_the_soonest_ahead() {
        let mut s = StateInfo::connecting(2);
        s.apply(|s| s.set_link(0, Link::Backoff, None, Some(Duration::from_secs(10))));
        assert_eq!(s.next_retry, None, "slot 1 still connects");
        let t0 = SystemTime::now();
        s.apply(|s| s.set_link(1, Link::Backoff, None, Some(Duration::from_secs(10))));
        s.apply(|s| s.set_link(0, Link::Backoff, None, Some(Duration::from_secs(100))));
        let next = s.next_retry.unwrap();
        assert!(next >= t0 + Duration::from_secs(10));
        assert!(
            next < t0 + Duration::from_secs(50),
            "pushed back to {next:?}"
        );
        s.apply(|s| s.set_link(1, Link::Connecting, None, None));
        assert_eq!(s.next_retry, None);
    }

    /// `since` moves only when the shown state changes.
    #[test]
    fn since_marks_a_change_of_the_shown_state() {
        let mut s = StateInfo::connecting(1);
        s.apply(|s| s.set_link(0, Link::Up, None, None));
        let since = s.since;
        std::thread::sleep(Duration::from_millis(5));
        s.apply(|s| s.rtt = Some(Duration::from_millis(1)));
        assert_eq!(s.since, since);
        s.apply(|s| s.draining = true);
        assert!(s.since > since);
    }
}
