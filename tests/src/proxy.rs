//! A TCP proxy between agent and broker that a test can black-hole (bytes silently
//! dropped, sockets left open: a dead network path), cut (every connection reset), pause
//! (nothing forwarded, nothing dropped: TCP's flow control holds the sender) or slow to
//! a rate.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    blackhole: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    paused: watch::Sender<bool>,
    /// Bytes per second in each direction of each connection (0: no limit).
    rate: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let blackhole = Arc::new(AtomicBool::new(false));
        let (cut, cut_rx) = watch::channel(0u64);
        let bh = blackhole.clone();
        let (paused, paused_rx) = watch::channel(false);
        let rate = Arc::new(AtomicU64::new(0));
        let rate_all = rate.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let bh = bh.clone();
                let (p1, p2) = (paused_rx.clone(), paused_rx.clone());
                let (r1, r2) = (rate_all.clone(), rate_all.clone());
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let bh1 = bh.clone();
                    let up = async move {
                        let mut buf = vec![0u8; 16384];
                        while let Ok(n) = cr.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            hold(&p1, &r1, n).await;
                            if !bh1.load(Ordering::SeqCst) && sw.write_all(&buf[..n]).await.is_err()
                            {
                                break;
                            }
                        }
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 16384];
                        while let Ok(n) = sr.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            hold(&p2, &r2, n).await;
                            if !bh.load(Ordering::SeqCst) && cw.write_all(&buf[..n]).await.is_err()
                            {
                                break;
                            }
                        }
                    };
                    cut_rx.borrow_and_update();
                    tokio::select! {
                        _ = async { tokio::join!(up, down) } => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            blackhole,
            cut,
            paused,
            rate,
            task,
        }
    }

    /// Forward nothing while on (what was read waits; the senders' windows fill).
    pub fn pause(&self, on: bool) {
        self.paused.send_replace(on);
    }

    /// Forward at most `bytes_per_second` in each direction of each connection (0: as
    /// fast as it comes).
    pub fn throttle(&self, bytes_per_second: u64) {
        self.rate.store(bytes_per_second, Ordering::SeqCst);
    }

    /// Drop every byte from now on, keeping the sockets open (a dead path, not a reset).
    pub fn blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::SeqCst);
    }

    /// Close every connection through the proxy now.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

/// Waits while the proxy is paused, then for `n` bytes' time at the rate set.
async fn hold(paused: &watch::Receiver<bool>, rate: &AtomicU64, n: usize) {
    let mut paused = paused.clone();
    let _ = paused.wait_for(|p| !*p).await;
    if let Some(us) = (n as u64 * 1_000_000).checked_div(rate.load(Ordering::SeqCst)) {
        tokio::time::sleep(std::time::Duration::from_micros(us)).await;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}
