//! Faults and their windows

use crate::*;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) enum FaultKind {
    SshdKilled,
    LinkDown,
    HostKeyRotated,
    Removed,
    Drained,
    Reconnected,
}

pub(crate) const FAULT_ORDER: [FaultKind; 6] = [
    FaultKind::SshdKilled,
    FaultKind::LinkDown,
    FaultKind::HostKeyRotated,
    FaultKind::Removed,
    FaultKind::Drained,
    FaultKind::Reconnected,
];

impl FaultKind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            FaultKind::SshdKilled => "sshd killed",
            FaultKind::LinkDown => "link down",
            FaultKind::HostKeyRotated => "host key rotated",
            FaultKind::Removed => "removed from nodes_file",
            FaultKind::Drained => "drained",
            FaultKind::Reconnected => "reconnect",
        }
    }

    pub(crate) fn color(self) -> &'static str {
        match self {
            FaultKind::SshdKilled => "#d62728",
            FaultKind::LinkDown => "#ff7f0e",
            FaultKind::HostKeyRotated => "#9467bd",
            FaultKind::Removed => "#8c564b",
            FaultKind::Drained => "#17becf",
            FaultKind::Reconnected => "#2ca02c",
        }
    }

    /// A dial to the node may fail while this lasts.
    pub(crate) fn refuses_dials(self) -> bool {
        matches!(
            self,
            FaultKind::SshdKilled | FaultKind::LinkDown | FaultKind::Removed | FaultKind::Drained
        )
    }

    /// Streams on the node may die while this lasts: the SSH session that
    /// carries them is gone. A drain, a removal with its drain, a planned
    /// reconnect and a host key rotation must keep them flowing.
    pub(crate) fn kills_streams(self) -> bool {
        matches!(self, FaultKind::SshdKilled | FaultKind::LinkDown)
    }
}

pub(crate) struct Window {
    pub(crate) node: usize,
    pub(crate) kind: FaultKind,
    pub(crate) start: Instant,
    pub(crate) end: Option<Instant>,
}

/// Every fault window of the run.
pub(crate) struct Faults {
    pub(crate) windows: Mutex<Vec<Window>>,
}

impl Faults {
    pub(crate) fn begin(&self, node: usize, kind: FaultKind) -> usize {
        let mut w = self.windows.lock().unwrap();
        w.push(Window {
            node,
            kind,
            start: Instant::now(),
            end: None,
        });
        w.len() - 1
    }

    pub(crate) fn end(&self, idx: usize) {
        self.windows.lock().unwrap()[idx].end = Some(Instant::now() + GRACE);
    }

    /// The fault on `node` over `from..=to` that `accepts`, if any.
    pub(crate) fn explains(
        &self,
        node: usize,
        from: Instant,
        to: Instant,
        accepts: fn(FaultKind) -> bool,
    ) -> Option<FaultKind> {
        self.windows
            .lock()
            .unwrap()
            .iter()
            .filter(|w| w.node == node && accepts(w.kind))
            .find(|w| w.start <= to && w.end.is_none_or(|e| e >= from))
            .map(|w| w.kind)
    }

    /// The fault on `node` over `from..=to`, whatever it is (for reports).
    pub(crate) fn any_over(&self, node: usize, from: Instant, to: Instant) -> Option<FaultKind> {
        self.explains(node, from, to, |_| true)
    }

    /// True while a fault that refuses dials is open on `node`.
    pub(crate) fn refusing(&self, node: usize) -> bool {
        let now = Instant::now();
        self.explains(node, now, now, FaultKind::refuses_dials)
            .is_some()
    }
}
