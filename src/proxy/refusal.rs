//! Refusals: why a CONNECT is turned away, the one place that maps each
//! reason to its HTTP status and dial metric, and the lingering reply that
//! makes sure the client reads it.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::TunnelError;
use crate::metrics::DialResult;
use crate::proxy::access::DialRecord;
use crate::proxy::{EgressProxy, HeadError, Target};

/// Keeps a reason phrase on one line and printable.
fn phrase(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(400)
        .collect()
}

/// How long a refused client gets to close its side after our reply.
pub(super) const LINGER: Duration = Duration::from_secs(1);

/// How much a refused client may still send while we wait for its close.
const LINGER_BYTES: usize = 64 * 1024;

/// Writes a refusal and closes, lingering: TCP turns a close with the
/// client's bytes still unread into a reset, which discards a reply not
/// yet sent and can reach the client before the reply it could have read.
/// So after the reply and our FIN, what the client sends is read and
/// dropped until it closes, for at most [`LINGER`] and [`LINGER_BYTES`].
pub(super) async fn reply<W: AsyncRead + AsyncWrite + Unpin>(w: &mut W, code: u16, text: &str) {
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        phrase(text)
    );
    if w.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    if w.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER, async {
        while left > 0 {
            match w.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Why a CONNECT is refused. [`Refusal::answer`] is the one place that
/// turns it into both the HTTP reply and the dial metric's result.
#[derive(Debug)]
pub(super) enum Refusal {
    /// The request head was refused before routing.
    Head(HeadError),
    /// The destination (or its port) is not allowed.
    Forbidden(String),
    /// The dial through a tunnel failed.
    Dial(TunnelError),
}

/// How a refusal is answered and counted.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    code: u16,
    result: DialResult,
    text: String,
}

impl Refusal {
    /// Refuses `target` with 403, saying why (and what to change).
    pub(super) fn forbidden(target: &Target, why: &dyn std::fmt::Display) -> Refusal {
        Refusal::Forbidden(format!("{target}: {why}"))
    }

    /// The reply and the metric for this refusal; `None` when the client
    /// left before asking anything (no reply, not a dial).
    fn answer(&self) -> Option<Answer> {
        let (code, result, text) = match self {
            Refusal::Head(HeadError::Closed) => return None,
            Refusal::Head(HeadError::Truncated) => (
                400,
                DialResult::BadRequest,
                "Bad Request: connection closed before the request head was complete".into(),
            ),
            Refusal::Head(HeadError::BadRequest(why)) => {
                (400, DialResult::BadRequest, format!("Bad Request: {why}"))
            }
            Refusal::Head(HeadError::NotConnect(m)) => (
                405,
                DialResult::BadRequest,
                format!("Method Not Allowed: {m}; only CONNECT is served"),
            ),
            Refusal::Head(HeadError::TooLarge) => (
                431,
                DialResult::BadRequest,
                "Request Header Fields Too Large".into(),
            ),
            Refusal::Forbidden(why) => (403, DialResult::Forbidden, format!("Forbidden: {why}")),
            Refusal::Dial(e @ TunnelError::ChannelRefused(_)) => {
                (502, DialResult::Refused, format!("Bad Gateway: {e}"))
            }
            Refusal::Dial(e @ TunnelError::ChannelOpenTimeout(_)) => {
                (504, DialResult::Timeout, format!("Gateway Timeout: {e}"))
            }
            Refusal::Dial(e) => (
                503,
                DialResult::NoTunnel,
                format!("Service Unavailable: {e}"),
            ),
        };
        Some(Answer { code, result, text })
    }
}

impl EgressProxy {
    /// Records a refused dial in the metrics and the access log, then
    /// sends the error reply.
    pub(super) async fn refuse<W: AsyncRead + AsyncWrite + Unpin>(
        &self,
        rec: &DialRecord,
        w: &mut W,
        why: Refusal,
    ) {
        let Some(a) = why.answer() else {
            return;
        };
        self.metrics
            .record(a.result, rec.started.elapsed().as_secs_f64());
        if self.settings.load().access_log {
            rec.refused(a.code, &phrase(&a.text));
        }
        reply(w, a.code, &a.text).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_phrases_stay_on_one_printable_line() {
        assert_eq!(phrase("node said: no"), "node said: no");
        assert_eq!(phrase("a\r\nX-Evil: 1\tb\u{e9}"), "a??X-Evil: 1?b?");
        assert_eq!(phrase(&"x".repeat(500)).len(), 400);
    }

    #[test]
    fn tunnel_errors_map_to_gateway_statuses() {
        let refused = TunnelError::ChannelRefused("connect failed".into());
        assert_eq!(
            reply_to(refused),
            (
                502,
                "Bad Gateway: channel open refused by node: connect failed".into()
            )
        );
        let slow = TunnelError::ChannelOpenTimeout(Duration::from_secs(5));
        assert_eq!(
            reply_to(slow),
            (
                504,
                "Gateway Timeout: channel open timed out after 5s".into()
            )
        );
        let down = TunnelError::NotConnected("node-1 connecting".into());
        assert_eq!(
            reply_to(down),
            (
                503,
                "Service Unavailable: no healthy tunnel: node-1 connecting".into()
            )
        );
    }

    /// The reply a dial failure gets, and that its metric result agrees.
    fn reply_to(e: TunnelError) -> (u16, String) {
        let a = Refusal::Dial(e)
            .answer()
            .expect("a dial failure is answered");
        let result = match a.code {
            502 => DialResult::Refused,
            503 => DialResult::NoTunnel,
            504 => DialResult::Timeout,
            other => panic!("unexpected status {other}"),
        };
        assert_eq!(a.result, result, "{a:?}");
        (a.code, a.text)
    }

    #[test]
    fn refusals_before_routing_map_to_400s_and_a_closed_client_gets_nothing() {
        let code = |h: HeadError| Refusal::Head(h).answer().map(|a| (a.code, a.result));
        assert_eq!(code(HeadError::Closed), None);
        assert_eq!(
            code(HeadError::Truncated),
            Some((400, DialResult::BadRequest))
        );
        assert_eq!(
            code(HeadError::NotConnect("GET".into())),
            Some((405, DialResult::BadRequest))
        );
        assert_eq!(
            code(HeadError::TooLarge),
            Some((431, DialResult::BadRequest))
        );
        assert_eq!(
            Refusal::Forbidden("x".into())
                .answer()
                .map(|a| (a.code, a.result)),
            Some((403, DialResult::Forbidden))
        );
    }
}
