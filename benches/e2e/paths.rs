//! Paths and client streams

use crate::*;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum PathKind {
    Direct,
    SshL,
    DaemonTcp,
    DaemonUnix,
}

pub(crate) const PATHS: [PathKind; 4] = [
    PathKind::Direct,
    PathKind::SshL,
    PathKind::DaemonTcp,
    PathKind::DaemonUnix,
];

impl PathKind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::SshL => "ssh -L",
            PathKind::DaemonTcp => "daemon tcp",
            PathKind::DaemonUnix => "daemon unix",
        }
    }
}

/// Where each path connects.
#[derive(Clone)]
pub(crate) struct Endpoints {
    pub(crate) node_ip: Ipv4Addr,
    /// Remote port → local `ssh -L` port.
    pub(crate) forwards: HashMap<u16, u16>,
    pub(crate) daemon_tcp: SocketAddr,
    pub(crate) daemon_unix: PathBuf,
}

/// A blocking client stream.
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
}

impl Stream {
    /// Half-closes the client's sending side.
    pub(crate) fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub(crate) fn connect_request(ip: Ipv4Addr, port: u16) -> String {
    format!("CONNECT {ip}:{port} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
}

/// Checks a CONNECT response head; it is complete when this is called.
pub(crate) fn check_head(head: &[u8]) -> io::Result<()> {
    if head.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "CONNECT refused: {}",
            String::from_utf8_lossy(head).lines().next().unwrap_or("")
        )))
    }
}

/// Reads a CONNECT response head. The servers speak only after the client
/// does, so nothing follows the head yet and reading in chunks is safe.
pub(crate) fn read_head_blocking<S: Read>(s: &mut S) -> io::Result<()> {
    let mut head = Vec::with_capacity(128);
    let mut buf = [0u8; 512];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 || head.len() > 8192 {
            return Err(io::Error::other("no complete CONNECT response"));
        }
        head.extend_from_slice(&buf[..n]);
    }
    check_head(&head)
}

impl Endpoints {
    /// Opens a stream to `port` on the node through `path`.
    pub(crate) fn dial(&self, path: PathKind, port: u16) -> io::Result<Stream> {
        let tcp = |a: SocketAddr| -> io::Result<Stream> {
            let s = TcpStream::connect_timeout(&a, IO_TIMEOUT)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            Ok(Stream::Tcp(s))
        };
        let mut s = match path {
            PathKind::Direct => return tcp(SocketAddr::from((self.node_ip, port))),
            PathKind::SshL => return tcp(SocketAddr::from(([127, 0, 0, 1], self.forwards[&port]))),
            PathKind::DaemonTcp => tcp(self.daemon_tcp)?,
            PathKind::DaemonUnix => {
                let s = UnixStream::connect(&self.daemon_unix)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                Stream::Unix(s)
            }
        };
        s.write_all(connect_request(self.node_ip, port).as_bytes())?;
        read_head_blocking(&mut s)?;
        Ok(s)
    }

    /// The async twin of [`Endpoints::dial`].
    pub(crate) async fn dial_async(
        &self,
        path: PathKind,
        port: u16,
    ) -> io::Result<Box<dyn AsyncStream>> {
        let mut s: Box<dyn AsyncStream> = match path {
            PathKind::Direct | PathKind::SshL | PathKind::DaemonTcp => {
                let a = match path {
                    PathKind::Direct => SocketAddr::from((self.node_ip, port)),
                    PathKind::SshL => SocketAddr::from(([127, 0, 0, 1], self.forwards[&port])),
                    _ => self.daemon_tcp,
                };
                let s = tokio::net::TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                if path != PathKind::DaemonTcp {
                    return Ok(Box::new(s));
                }
                Box::new(s)
            }
            PathKind::DaemonUnix => {
                Box::new(tokio::net::UnixStream::connect(&self.daemon_unix).await?)
            }
        };
        s.write_all(connect_request(self.node_ip, port).as_bytes())
            .await?;
        let mut head = Vec::with_capacity(128);
        let mut buf = [0u8; 512];
        while !head.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut buf).await?;
            if n == 0 || head.len() > 8192 {
                return Err(io::Error::other("no complete CONNECT response"));
            }
            head.extend_from_slice(&buf[..n]);
        }
        check_head(&head)?;
        Ok(s)
    }
}

/// An async client stream of any path.
pub(crate) trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

/// Message `i` of the echo stream keyed by `seed`: its slice of the pattern.
pub(crate) fn message(seed: u64, i: u64) -> [u8; MSG] {
    let mut msg = [0u8; MSG];
    pattern::fill(seed, i * MSG as u64, &mut msg);
    msg
}

/// An echo that is not the message sent.
pub(crate) fn echo_mismatch(i: u64, sent: &[u8], back: &[u8]) -> io::Error {
    let at = sent.iter().zip(back).position(|(a, b)| a != b).unwrap_or(0);
    io::Error::other(format!(
        "echo {i} differs from what was sent at byte {at}: sent {:02x?}, got {:02x?}",
        &sent[at..(at + 8).min(MSG)],
        &back[at..(at + 8).min(MSG)]
    ))
}

/// One 64-byte round trip: message `i` of `seed`, compared on return.
pub(crate) fn round_trip<S: Read + Write>(s: &mut S, seed: u64, i: u64) -> io::Result<()> {
    let msg = message(seed, i);
    let mut back = [0u8; MSG];
    s.write_all(&msg)?;
    s.read_exact(&mut back).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::other(format!(
            "echo {i}: no complete reply within {IO_TIMEOUT:?} (bytes lost on the way?)"
        )),
        _ => e,
    })?;
    if back != msg {
        return Err(echo_mismatch(i, &msg, &back));
    }
    Ok(())
}

pub(crate) async fn round_trip_async(
    s: &mut Box<dyn AsyncStream>,
    seed: u64,
    i: u64,
) -> io::Result<()> {
    let msg = message(seed, i);
    let mut back = [0u8; MSG];
    s.write_all(&msg).await?;
    s.read_exact(&mut back).await?;
    if back != msg {
        return Err(echo_mismatch(i, &msg, &back));
    }
    Ok(())
}

/// Ends an echo stream: half-close, then the far side must close too with
/// nothing more (an extra byte is a duplicate the relay made up).
pub(crate) fn finish_echo(s: &mut Stream) -> io::Result<()> {
    s.shutdown_write()?;
    let mut extra = [0u8; 256];
    match s.read(&mut extra)? {
        0 => Ok(()),
        n => Err(io::Error::other(format!(
            "{n} unexpected byte(s) after the last echo"
        ))),
    }
}

pub(crate) async fn finish_echo_async(s: &mut Box<dyn AsyncStream>) -> io::Result<()> {
    s.shutdown().await?;
    let mut extra = [0u8; 256];
    match tokio::time::timeout(IO_TIMEOUT, s.read(&mut extra))
        .await
        .map_err(|_| io::Error::other("no EOF after the last echo"))??
    {
        0 => Ok(()),
        n => Err(io::Error::other(format!(
            "{n} unexpected byte(s) after the last echo"
        ))),
    }
}
