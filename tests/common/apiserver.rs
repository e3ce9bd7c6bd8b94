//! kube-apiserver's egress dialer, reproduced byte for byte, for the tests
//! that stand in for kube-apiserver.
//!
//! What it copies (k8s.io/apiserver `pkg/server/egressselector/
//! egress_selector.go`, the HTTPConnect dialer, v0.33 to v0.36):
//! - one new connection per dial: the Unix socket (`uds.udsName`) or TCP,
//!   and over TCP always TLS with a client certificate, no ALPN, and the
//!   host of `tcp.url` as SNI (none when it is an IP, as Go's crypto/tls
//!   does);
//! - the request is exactly `CONNECT <addr> HTTP/1.1\r\nHost:
//!   127.0.0.1\r\n\r\n`, in one write;
//! - the reply is read as Go's `http.ReadResponse` reads it, through a
//!   4096-byte `bufio.Reader` over a reader capped at 1 MiB: status line
//!   `HTTP/x.y NNN reason`, then MIME headers up to the blank line;
//! - only status 200 counts;
//! - if any byte is already buffered after the reply's headers, the dial
//!   fails with "unexpected N bytes of buffered data". Over the Unix socket
//!   a target that speaks first fails the dial whenever its first bytes
//!   arrive before the reply is read; over TLS each read returns one
//!   record at most (as Go's `tls.Conn` does), so only bytes in the
//!   reply's own record count.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Go's `bufio.defaultBufSize`, the buffer `http.ReadResponse` reads
/// through.
pub const GO_BUFIO_SIZE: usize = 4096;
/// The cap on the bytes read for the reply (1 MiB since Kubernetes 1.35).
pub const MAX_REPLY_BYTES: usize = 1 << 20;

/// How the dialer reaches the proxy: the two transports of an
/// EgressSelectorConfiguration's `HTTPConnect` connection.
#[derive(Clone, Debug)]
pub enum Transport {
    /// `transport.uds.udsName`.
    Unix(PathBuf),
    /// `transport.tcp` with `tlsConfig`: `url` as written (`https://host:port`).
    Mtls {
        /// `tcp.url`.
        url: String,
        /// `tlsConfig.caBundle` (a file here).
        ca: PathBuf,
        /// `tlsConfig.clientCert`.
        cert: PathBuf,
        /// `tlsConfig.clientKey`.
        key: PathBuf,
    },
}

/// Why a dial failed, as kube-apiserver would report it.
#[derive(Debug)]
pub enum DialError {
    /// Connecting to the proxy, or the TLS handshake, failed.
    Connect(String),
    /// The request did not go out in one write.
    Write(String),
    /// Reading the reply failed or ended early (Go: unexpected EOF).
    Read(String),
    /// The reply head is larger than [`MAX_REPLY_BYTES`].
    TooLarge,
    /// `http.ReadResponse` refused the reply.
    Malformed(String),
    /// A status other than 200: the whole status line, as kube-apiserver
    /// puts it into its error ("error sending request: <status>").
    Status {
        /// The status code.
        code: u16,
        /// The status line's code and reason, e.g. `403 Forbidden: …`.
        status: String,
    },
    /// Bytes were buffered after the reply's headers.
    Buffered(usize),
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialError::Connect(e) => write!(f, "dial proxy: {e}"),
            DialError::Write(e) => write!(f, "write CONNECT: {e}"),
            DialError::Read(e) => write!(f, "reading proxy response: {e}"),
            DialError::TooLarge => write!(f, "proxy response larger than {MAX_REPLY_BYTES} bytes"),
            DialError::Malformed(e) => write!(f, "reading proxy response: {e}"),
            DialError::Status { status, .. } => write!(f, "error sending request: {status}"),
            DialError::Buffered(n) => write!(f, "unexpected {n} bytes of buffered data"),
        }
    }
}

/// The connection kube-apiserver would go on to use.
pub enum Conn {
    /// Over the Unix socket.
    Unix(UnixStream),
    /// Over mTLS.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            // Go's tls.Conn.Read returns what is left of one record, never
            // more: the reply and a greeting in records of their own are
            // never in one read.
            Conn::Tls(s) => {
                let chunk = std::io::BufRead::fill_buf(s.as_mut())?;
                let n = chunk.len().min(buf.len());
                buf[..n].copy_from_slice(&chunk[..n]);
                std::io::BufRead::consume(s.as_mut(), n);
                Ok(n)
            }
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// A rustls client config as Go's crypto/tls client with
/// `tlsConfig.caBundle`, `clientCert` and `clientKey`: TLS 1.2 and 1.3,
/// no ALPN.
pub fn client_tls(ca: &Path, cert: &Path, key: Option<&Path>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("ca bundle") {
        roots.add(c.expect("ca cert")).expect("add ca");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots);
    let config = match key {
        Some(key) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .expect("client cert")
                .map(|c| c.expect("client cert"))
                .collect();
            let key = PrivateKeyDer::from_pem_file(key).expect("client key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client cert and key")
        }
        None => builder.with_no_client_auth(),
    };
    assert!(
        config.alpn_protocols.is_empty(),
        "Go's dialer sends no ALPN"
    );
    config
}

/// `host` of an `https://host:port` URL (brackets removed) and the
/// `host:port` to dial.
fn split_url(url: &str) -> (String, String) {
    let rest = url
        .strip_prefix("https://")
        .expect("tcp.url must be https://");
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6).to_string(),
        None => authority
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(authority)
            .to_string(),
    };
    (host, authority.to_string())
}

/// The SNI the dialer sends for `url`: the host, or none for an IP.
pub fn sni_for(url: &str) -> Option<String> {
    let (host, _) = split_url(url);
    host.parse::<std::net::IpAddr>().is_err().then_some(host)
}

/// Dials `addr` through the proxy as kube-apiserver does.
pub fn dial(transport: &Transport, addr: &str) -> Result<Conn, DialError> {
    dial_after(transport, addr, Duration::ZERO)
}

/// As [`dial`], but waits `pause` between sending the request and the
/// first read: kube-apiserver reads at once, but when its read comes later
/// than the target's first bytes is up to scheduling, and this makes that
/// case certain.
pub fn dial_after(transport: &Transport, addr: &str, pause: Duration) -> Result<Conn, DialError> {
    let mut conn = match transport {
        Transport::Unix(path) => {
            let s = UnixStream::connect(path).map_err(|e| DialError::Connect(e.to_string()))?;
            s.set_read_timeout(Some(Duration::from_secs(15))).ok();
            Conn::Unix(s)
        }
        Transport::Mtls { url, ca, cert, key } => {
            let (host, authority) = split_url(url);
            let tcp =
                TcpStream::connect(&authority).map_err(|e| DialError::Connect(e.to_string()))?;
            tcp.set_read_timeout(Some(Duration::from_secs(15))).ok();
            let name = ServerName::try_from(host.clone())
                .map_err(|e| DialError::Connect(format!("server name {host:?}: {e}")))?;
            let config = Arc::new(client_tls(ca, cert, Some(key)));
            let client = rustls::ClientConnection::new(config, name)
                .map_err(|e| DialError::Connect(e.to_string()))?;
            let mut tls = rustls::StreamOwned::new(client, tcp);
            // Go finishes the handshake before the request is written.
            while tls.conn.is_handshaking() {
                tls.conn
                    .complete_io(&mut tls.sock)
                    .map_err(|e| DialError::Connect(format!("TLS handshake: {e}")))?;
            }
            Conn::Tls(Box::new(tls))
        }
    };
    let request = format!("CONNECT {addr} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    let n = conn
        .write(request.as_bytes())
        .map_err(|e| DialError::Write(e.to_string()))?;
    if n != request.len() {
        return Err(DialError::Write(format!(
            "{n} of {} bytes in the one write",
            request.len()
        )));
    }
    conn.flush().map_err(|e| DialError::Write(e.to_string()))?;
    if !pause.is_zero() {
        std::thread::sleep(pause);
    }
    let mut br = GoBufReader::new(&mut conn);
    let (code, status) = read_response_head(&mut br)?;
    if code != 200 {
        return Err(DialError::Status { code, status });
    }
    let buffered = br.buffered();
    if buffered > 0 {
        return Err(DialError::Buffered(buffered));
    }
    Ok(conn)
}

/// Go's `bufio.Reader` of [`GO_BUFIO_SIZE`] bytes over a reader limited to
/// [`MAX_REPLY_BYTES`]: each fill reads what the socket has, up to the
/// free space, so bytes that came with the reply's head stay buffered.
pub struct GoBufReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    total: usize,
}

impl<R: Read> GoBufReader<R> {
    /// A reader over `inner`, empty.
    pub fn new(inner: R) -> Self {
        GoBufReader {
            inner,
            buf: vec![0; GO_BUFIO_SIZE],
            start: 0,
            end: 0,
            total: 0,
        }
    }

    /// Bytes read from `inner` and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// One read into the free space; `Ok(0)` at EOF or at the cap.
    fn fill(&mut self) -> Result<usize, DialError> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let room = (GO_BUFIO_SIZE - self.end).min(MAX_REPLY_BYTES - self.total);
        if room == 0 {
            return Ok(0);
        }
        loop {
            match self.inner.read(&mut self.buf[self.end..self.end + room]) {
                Ok(n) => {
                    self.end += n;
                    self.total += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(DialError::Read(e.to_string())),
            }
        }
    }

    /// One line without its `\n` (and `\r`), as textproto's ReadLine: a
    /// line longer than the buffer is collected over several fills.
    fn read_line(&mut self) -> Result<Vec<u8>, DialError> {
        let mut line = Vec::new();
        loop {
            if let Some(i) = self.buf[self.start..self.end]
                .iter()
                .position(|b| *b == b'\n')
            {
                line.extend_from_slice(&self.buf[self.start..self.start + i]);
                self.start += i + 1;
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buffered() == GO_BUFIO_SIZE {
                line.extend_from_slice(&self.buf[self.start..self.end]);
                self.start = self.end;
            }
            if self.fill()? == 0 {
                if self.total >= MAX_REPLY_BYTES {
                    return Err(DialError::TooLarge);
                }
                return Err(DialError::Read("unexpected EOF".into()));
            }
        }
    }
}

/// `http.ReadResponse`'s reading of the status line and headers; the
/// status code and `Status` (code and reason).
pub fn read_response_head<R: Read>(br: &mut GoBufReader<R>) -> Result<(u16, String), DialError> {
    let line = String::from_utf8_lossy(&br.read_line()?).into_owned();
    let (proto, status) = line
        .split_once(' ')
        .ok_or_else(|| DialError::Malformed(format!("malformed HTTP response {line:?}")))?;
    let status = status.trim_start_matches(' ').to_string();
    let code_text = status.split(' ').next().unwrap_or("");
    if code_text.len() != 3 || !code_text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DialError::Malformed(format!(
            "malformed HTTP status code {code_text:?}"
        )));
    }
    let code: u16 = code_text
        .parse()
        .map_err(|_| DialError::Malformed(format!("malformed HTTP status code {code_text:?}")))?;
    if !valid_http_version(proto) {
        return Err(DialError::Malformed(format!(
            "malformed HTTP version {proto:?}"
        )));
    }
    // textproto.ReadMIMEHeader: "Key: value" lines up to a blank one; a
    // first line that starts with white space is refused, later ones
    // continue the previous value.
    let mut first = true;
    loop {
        let h = br.read_line()?;
        if h.is_empty() {
            break;
        }
        let folded = h[0] == b' ' || h[0] == b'\t';
        if folded && first {
            return Err(DialError::Malformed(format!(
                "malformed MIME header initial line: {:?}",
                String::from_utf8_lossy(&h)
            )));
        }
        first = false;
        if folded {
            continue;
        }
        let Some(colon) = h.iter().position(|b| *b == b':') else {
            return Err(DialError::Malformed(format!(
                "malformed MIME header line: {:?}",
                String::from_utf8_lossy(&h)
            )));
        };
        let key = &h[..colon];
        if key.is_empty() || !key.iter().all(|b| b.is_ascii_graphic() && *b != b':') {
            return Err(DialError::Malformed(format!(
                "malformed MIME header line: {:?}",
                String::from_utf8_lossy(&h)
            )));
        }
    }
    Ok((code, status))
}

/// Go's `http.ParseHTTPVersion`: `HTTP/M.N` with one digit each.
fn valid_http_version(v: &str) -> bool {
    match v.strip_prefix("HTTP/").map(str::as_bytes) {
        Some([m, b'.', n]) => m.is_ascii_digit() && n.is_ascii_digit(),
        _ => false,
    }
}
