//! The SSH layer: who we are (`identity`, `keygen`), whom we trust
//! (`known_hosts`), what every session shares (`context`), and one
//! session's connect, verify and authenticate (`session`, reading through
//! `readahead`). It knows nothing of nodes' state or of streams.

pub(crate) mod context;
pub(crate) mod identity;
pub mod keygen;
pub mod known_hosts;
pub(crate) mod readahead;
pub(crate) mod session;
