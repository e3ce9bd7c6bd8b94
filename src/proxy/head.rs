//! The CONNECT request head: a pure parser over the bytes read so far,
//! for the proxy, its tests and the `connect_head` fuzz target. It decides
//! nothing about routing; the target it returns is only well formed.

/// The largest CONNECT request head we accept. kube-apiserver's is ~60 bytes.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

/// A parsed CONNECT target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host without brackets: an IP literal or a name.
    pub host: String,
    /// Port, never 0.
    pub port: u16,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why a request head was refused before any routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// Not HTTP, or a CONNECT without a valid `host:port`.
    BadRequest(String),
    /// A method other than CONNECT.
    NotConnect(String),
    /// The head is larger than [`MAX_HEADER_BYTES`].
    TooLarge,
    /// The client closed before sending anything: nothing to answer.
    Closed,
    /// The client closed in the middle of the head.
    Truncated,
}

/// Outcome of parsing a buffer that may hold a partial head.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Partial,
    /// A complete CONNECT head of `len` bytes for `target`.
    Connect {
        /// The target from the request line.
        target: Target,
        /// Length of the head, including the blank line.
        len: usize,
    },
}

/// Parses a CONNECT request head with httparse. Pure, for tests and fuzzing.
pub fn parse_head(buf: &[u8]) -> Result<Parsed, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => {
            if buf.len() >= MAX_HEADER_BYTES {
                Err(HeadError::TooLarge)
            } else {
                Ok(Parsed::Partial)
            }
        }
        Ok(httparse::Status::Complete(len)) => {
            let method = req.method.unwrap_or_default();
            if method != "CONNECT" {
                return Err(HeadError::NotConnect(method.to_string()));
            }
            let path = req.path.unwrap_or_default();
            let target = parse_authority(path).ok_or_else(|| {
                HeadError::BadRequest(format!("CONNECT target {path:?} is not host:port"))
            })?;
            Ok(Parsed::Connect { target, len })
        }
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(e) => Err(HeadError::BadRequest(format!(
            "malformed HTTP request: {e}"
        ))),
    }
}

/// Parses `host:port`, `[v6]:port`. Hosts are IP literals or DNS-style names.
pub fn parse_authority(s: &str) -> Option<Target> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        h.parse::<std::net::Ipv6Addr>().ok()?;
        (h.to_string(), p)
    } else {
        let (h, p) = s.rsplit_once(':')?;
        if h.contains(':') {
            return None; // unbracketed IPv6 is ambiguous
        }
        (h.to_string(), p)
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    if port == 0 || host.is_empty() || host.len() > 253 {
        return None;
    }
    let ok = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':' || b == b'_');
    if !ok {
        return None;
    }
    Some(Target { host, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(host: &str, port: u16) -> Target {
        Target {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn apiserver_request_parses() {
        let req = b"CONNECT 10.0.0.11:10250 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nextra";
        assert_eq!(
            parse_head(req),
            Ok(Parsed::Connect {
                target: t("10.0.0.11", 10250),
                len: req.len() - 5
            })
        );
        assert_eq!(
            parse_head(b"CONNECT 10.0.0.11:10250 HTTP/1.1\r\nHo"),
            Ok(Parsed::Partial)
        );
    }

    #[test]
    fn authorities() {
        assert_eq!(
            parse_authority("[fd00::1]:10250"),
            Some(t("fd00::1", 10250))
        );
        assert_eq!(parse_authority("node-1:10250"), Some(t("node-1", 10250)));
        assert_eq!(parse_authority("fd00::1:10250"), None);
        assert_eq!(parse_authority("[fd00::1]"), None);
        assert_eq!(parse_authority("[not-ip]:80"), None);
        assert_eq!(parse_authority("host:0"), None);
        assert_eq!(parse_authority("host:65536"), None);
        assert_eq!(parse_authority("host:+80"), None);
        assert_eq!(parse_authority(":80"), None);
        assert_eq!(parse_authority("a b:80"), None);
        assert_eq!(parse_authority("host"), None);
    }

    #[test]
    fn bad_heads() {
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\n\r\n"),
            Err(HeadError::NotConnect(_))
        ));
        assert!(matches!(
            parse_head(b"\x16\x03\x01garbage\r\n\r\n"),
            Err(HeadError::BadRequest(_))
        ));
        assert!(matches!(
            parse_head(b"CONNECT nope HTTP/1.1\r\n\r\n"),
            Err(HeadError::BadRequest(_))
        ));
        let mut big = b"CONNECT a:1 HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEADER_BYTES + 10, b'a');
        assert_eq!(parse_head(&big), Err(HeadError::TooLarge));
    }

    #[test]
    fn targets_print_as_authorities() {
        assert_eq!(t("10.0.0.11", 10250).to_string(), "10.0.0.11:10250");
        assert_eq!(t("node-1", 22).to_string(), "node-1:22");
        assert_eq!(t("fd00::1", 443).to_string(), "[fd00::1]:443");
    }

    #[test]
    fn host_length_limit_is_253() {
        let host = |n: usize| format!("{}:80", "a".repeat(n));
        assert_eq!(parse_authority(&host(253)), Some(t(&"a".repeat(253), 80)));
        assert_eq!(parse_authority(&host(254)), None);
        assert_eq!(parse_authority(&host(252)), Some(t(&"a".repeat(252), 80)));
        assert_eq!(parse_authority("a:65535"), Some(t("a", 65535)));
        assert_eq!(parse_authority("a:"), None);
        assert_eq!(parse_authority("my_node.a-b:1"), Some(t("my_node.a-b", 1)));
        assert_eq!(parse_authority("a/b:1"), None);
    }

    #[test]
    fn connect_heads_map_to_their_errors() {
        assert_eq!(
            parse_head(b"CONNECT [fd00::1]:10250 HTTP/1.1\r\n\r\n"),
            Ok(Parsed::Connect {
                target: t("fd00::1", 10250),
                len: 36
            })
        );
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\n\r\n"),
            Err(HeadError::NotConnect("POST".into()))
        );
        assert_eq!(
            parse_head(b"CONNECT a:0 HTTP/1.1\r\n\r\n"),
            Err(HeadError::BadRequest(
                "CONNECT target \"a:0\" is not host:port".into()
            ))
        );
        // A partial head one byte short of the cap still waits for more.
        let mut near = b"CONNECT a:1 HTTP/1.1\r\nX: ".to_vec();
        near.resize(MAX_HEADER_BYTES - 1, b'a');
        assert_eq!(parse_head(&near), Ok(Parsed::Partial));
        near.push(b'a');
        assert_eq!(parse_head(&near), Err(HeadError::TooLarge));
        let many: String = (0..40).map(|i| format!("H{i}: v\r\n")).collect();
        let head = format!("CONNECT a:1 HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse_head(head.as_bytes()), Err(HeadError::TooLarge));
    }
}
