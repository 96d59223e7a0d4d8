//! A fault-injecting TCP proxy for tests, placed between jobsvc and PostgreSQL.
//!
//! Modes: pass, blackhole (bytes are accepted and held, nothing is forwarded either way: a
//! partition or a hung server, as the client sees it), and delay (each chunk waits before it
//! is forwarded); plus `reset_all`, which closes every open connection at once.
//! Written here because what the tests need is a page of tokio; the proxies that exist
//! (toxiproxy and the like) are separate servers to install and drive over HTTP.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Blackhole,
    Delay(Duration),
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    conns: Arc<Mutex<JoinSet<()>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy on a free loopback port forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, _) = watch::channel(Mode::Pass);
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let accept = {
            let mode = mode.clone();
            let conns = conns.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let mode = mode.subscribe();
                    conns
                        .lock()
                        .unwrap()
                        .spawn(connection(client, upstream, mode));
                }
            })
        };
        FaultProxy {
            addr,
            mode,
            conns,
            accept,
        }
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Closes every connection open now (new ones are accepted as the mode says).
    pub fn reset_all(&self) {
        self.conns.lock().unwrap().abort_all();
    }

    /// `url` (a postgres:// URL of the upstream) rewritten to go through the proxy.
    pub fn url(&self, url: &str, upstream: SocketAddr) -> String {
        let via = url.replace(
            &format!("127.0.0.1:{}", upstream.port()),
            &format!("127.0.0.1:{}", self.addr.port()),
        );
        assert_ne!(via, url, "the URL names the upstream address");
        via
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.conns.lock().unwrap().abort_all();
    }
}

/// Waits while the mode is a blackhole; returns the delay to apply, if any.
async fn gate(mode: &mut watch::Receiver<Mode>) -> Option<Duration> {
    let m = *mode
        .wait_for(|m| *m != Mode::Blackhole)
        .await
        .expect("the proxy outlives its connections");
    match m {
        Mode::Delay(d) => Some(d),
        _ => None,
    }
}

async fn connection(mut client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<Mode>) {
    // A blackholed server does not answer a connection attempt either.
    gate(&mut mode).await;
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.split();
    let (sr, sw) = server.split();
    tokio::select! {
        _ = pump(cr, sw, mode.clone()) => {}
        _ = pump(sr, cw, mode) => {}
    }
}

/// Copies chunk by chunk, each chunk held while the mode says so.
async fn pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(d) = gate(&mut mode).await {
            tokio::time::sleep(d).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
