//! Servers inside the node namespaces (`soak __serve`)

use crate::*;

use tokio::net::{TcpListener, TcpStream};

/// Entry point of the re-executed binary inside a node namespace.
pub(crate) fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let echo = TcpListener::bind(("0.0.0.0", ECHO_PORT))
            .await
            .expect("bind echo");
        let source = TcpListener::bind(("0.0.0.0", SOURCE_PORT))
            .await
            .expect("bind source");
        println!("ready");
        let _ = io::stdout().flush();
        tokio::spawn(accept(source, true));
        accept(echo, false).await;
    });
}

pub(crate) async fn accept(l: TcpListener, source: bool) {
    loop {
        let Ok((s, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = s.set_nodelay(true);
        if source {
            tokio::spawn(source_one(s));
        } else {
            tokio::spawn(echo_one(s));
        }
    }
}

/// Raw echo; half-closes after the client's EOF.
pub(crate) async fn echo_one(mut s: TcpStream) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => {
                let _ = s.shutdown().await;
                return;
            }
            Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Reads a u64 rate (bytes/s) and a u64 seed, then writes the seed's
/// pattern at that pace until the client goes away. After a stall it
/// catches up at full speed: the resume is a burst.
pub(crate) async fn source_one(mut s: TcpStream) {
    let mut req = [0u8; 16];
    if s.read_exact(&mut req).await.is_err() {
        return;
    }
    let rate = u64::from_le_bytes(req[..8].try_into().unwrap()).max(1);
    let seed = u64::from_le_bytes(req[8..].try_into().unwrap());
    let mut buf = vec![0u8; 16 << 10];
    let start = Instant::now();
    let mut off = 0u64;
    loop {
        let due = (rate as f64 * start.elapsed().as_secs_f64()) as u64;
        if off >= due {
            let wait = (off + buf.len() as u64 - due) as f64 / rate as f64;
            tokio::time::sleep(Duration::from_secs_f64(wait.min(0.1))).await;
            continue;
        }
        pattern::fill(seed, off, &mut buf);
        if s.write_all(&buf).await.is_err() {
            return;
        }
        off += buf.len() as u64;
    }
}

pub(crate) fn start_servers(ns: &str) -> ChildGuard {
    let exe = std::env::current_exe().expect("current exe");
    let mut guard = ChildGuard::spawn(
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(exe)
            .arg("__serve")
            .stdin(Stdio::null())
            .stdout(Stdio::piped()),
    );
    let mut out = guard.child().stdout.take().unwrap();
    let mut line = [0u8; 6];
    let ok = out.read_exact(&mut line).is_ok() && &line == b"ready\n";
    assert!(ok, "soak servers in {ns} did not start");
    guard
}
