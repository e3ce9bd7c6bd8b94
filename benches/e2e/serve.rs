//! Servers inside the node namespace (`e2e __serve SOURCE_PORT ECHO_PORT`)

use crate::*;

/// Entry point of the re-executed binary inside a namespace.
pub(crate) fn main(args: &[String]) {
    let port = |i: usize| -> u16 { args.get(i).and_then(|p| p.parse().ok()).expect("port") };
    let source = TcpListener::bind(("0.0.0.0", port(0))).expect("bind source");
    let echo = std::net::TcpListener::bind(("0.0.0.0", port(1))).expect("bind echo");
    echo.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || echo_server(echo));
    println!("ready");
    let _ = io::stdout().flush();
    for conn in source.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || {
            let _ = source_one(conn);
        });
    }
}

/// Reads a little-endian u64 count and u64 seed, writes that many bytes
/// of the seed's [`pattern`], half-closes and waits for the client to
/// close.
pub(crate) fn source_one(mut s: TcpStream) -> io::Result<()> {
    let mut req = [0u8; 16];
    s.read_exact(&mut req)?;
    let [count, seed] =
        [&req[..8], &req[8..]].map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    let mut buf = vec![0u8; 1 << 20];
    let mut sent = 0u64;
    while sent < count {
        let k = (count - sent).min(buf.len() as u64) as usize;
        pattern::fill(seed, sent, &mut buf[..k]);
        s.write_all(&buf[..k])?;
        sent += k as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut sink = [0u8; 64];
    while s.read(&mut sink)? > 0 {}
    Ok(())
}

/// Raw echo on a current-thread runtime: thousands of connections are
/// cheap, and one round trip wakes one thread.
pub(crate) fn echo_server(l: std::net::TcpListener) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let l = tokio::net::TcpListener::from_std(l).expect("listener");
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
}

/// Starts the bench servers in `ns` and waits for their "ready".
pub(crate) fn start_servers(ns: &str) -> ChildGuard {
    let exe = std::env::current_exe().expect("current exe");
    let mut guard = ChildGuard::spawn(
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(exe)
            .args(["__serve", &SOURCE_PORT.to_string(), &ECHO_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped()),
    );
    let mut out = guard.child().stdout.take().unwrap();
    let mut line = [0u8; 6];
    let ok = out.read_exact(&mut line).is_ok() && &line == b"ready\n";
    assert!(ok, "bench servers in {ns} did not start");
    guard
}
