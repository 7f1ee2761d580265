//! A TCP proxy that injects network faults between a service and a store
//! it talks to (Redis, the broker, DynamoDB Local, the payment service),
//! for the chaos campaign and the tests: placed in front of the store by
//! configuration (the service is given the proxy's address), then told
//! what to do to the traffic, and healed.
//!
//! Not toxiproxy: no crate of it builds here, and a chaos run needs only
//! these faults, switched from the same process:
//!
//! * `Latency(d)`: every chunk, both ways, waits `d` before it is passed on;
//! * `Cut`: every open connection is closed at once, and new ones are
//!   closed as soon as they are accepted (a node down, a firewall reset);
//! * `BlackHole`: connections stay open and bytes are taken but never
//!   passed on, both ways (a partition: the worst case for timeouts).
//!
//! Healing (`Fault::None`) lets new connections through; a black-holed
//! connection resumes passing what it holds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to the traffic now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    Latency(Duration),
    Cut,
    BlackHole,
}

/// A running proxy; dropping it stops it and closes its connections.
#[derive(Debug)]
pub struct FaultProxy {
    local_addr: SocketAddr,
    fault: Arc<watch::Sender<Fault>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `listen` (port 0: any free one) and passes traffic to
    /// `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let (fault, _) = watch::channel(Fault::None);
        let fault = Arc::new(fault);
        let task = tokio::spawn(accept(listener, upstream, fault.clone()));
        Ok(Self {
            local_addr,
            fault,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// From now on, `fault` (`Fault::None` heals).
    pub fn set(&self, fault: Fault) {
        tracing::info!(?fault, proxy = %self.local_addr, "network fault");
        self.fault.send_replace(fault);
    }

    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        // Connections see the sender go and close.
        self.fault.send_replace(Fault::Cut);
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, fault: Arc<watch::Sender<Fault>>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let cut = *fault.borrow() == Fault::Cut;
        if cut {
            drop(client);
            continue;
        }
        let watching = fault.subscribe();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            // Either direction ending (or a cut) ends the connection.
            tokio::select! {
                _ = pump(client_read, server_write, watching.clone()) => {}
                _ = pump(server_read, client_write, watching) => {}
            }
        });
    }
}

fn black_holed(fault: &mut watch::Receiver<Fault>) -> bool {
    *fault.borrow_and_update() == Fault::BlackHole
}

/// Passes bytes from `from` to `to` as the fault allows, until either
/// side closes or the connection is cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // A black hole takes nothing further: wait until it changes.
        while black_holed(&mut fault) {
            if fault.changed().await.is_err() {
                return;
            }
        }
        let read = tokio::select! {
            read = from.read(&mut buf) => read,
            changed = fault.changed() => {
                let cut = *fault.borrow() == Fault::Cut;
                if changed.is_err() || cut {
                    return;
                }
                continue;
            }
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Copied out: a borrow must not be held across an await.
        let now = *fault.borrow();
        match now {
            Fault::Cut => return,
            Fault::Latency(delay) => tokio::time::sleep(delay).await,
            Fault::None | Fault::BlackHole => {}
        }
        // Taken while black-holed: held until healed.
        while black_holed(&mut fault) {
            if fault.changed().await.is_err() {
                return;
            }
        }
        let cut = *fault.borrow() == Fault::Cut;
        if cut || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Instant;

    use super::*;

    /// An echo server: what the proxy stands in front of.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = conn.read(&mut buf).await {
                        if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn proxy() -> FaultProxy {
        FaultProxy::start("127.0.0.1:0".parse().unwrap(), echo().await)
            .await
            .unwrap()
    }

    /// Sends `ping` and reads the echo, within `limit`.
    async fn round_trip(conn: &mut TcpStream, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        tokio::time::timeout(limit, async {
            conn.write_all(b"ping").await.ok()?;
            let mut buf = [0u8; 4];
            conn.read_exact(&mut buf).await.ok()?;
            (&buf == b"ping").then_some(())
        })
        .await
        .ok()
        .flatten()
        .map(|()| started.elapsed())
    }

    const SOON: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn bytes_pass_both_ways_and_latency_delays_each_way() {
        let proxy = proxy().await;
        let mut conn = TcpStream::connect(proxy.local_addr()).await.unwrap();
        assert!(round_trip(&mut conn, SOON).await.is_some());
        proxy.set(Fault::Latency(Duration::from_millis(150)));
        let took = round_trip(&mut conn, SOON)
            .await
            .expect("delayed, not lost");
        assert!(
            took >= Duration::from_millis(300),
            "{took:?}: 150 ms each way"
        );
        proxy.set(Fault::None);
        let took = round_trip(&mut conn, SOON).await.expect("healed");
        assert!(took < Duration::from_millis(150), "{took:?}");
    }

    #[tokio::test]
    async fn a_cut_closes_open_connections_and_refuses_new_ones_until_healed() {
        let proxy = proxy().await;
        let mut open = TcpStream::connect(proxy.local_addr()).await.unwrap();
        assert!(round_trip(&mut open, SOON).await.is_some());
        proxy.set(Fault::Cut);
        let mut buf = [0u8; 4];
        let closed = tokio::time::timeout(SOON, open.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0) | Err(_))), "{closed:?}");
        let mut new = TcpStream::connect(proxy.local_addr()).await.unwrap();
        assert!(
            round_trip(&mut new, Duration::from_millis(500))
                .await
                .is_none()
        );
        proxy.set(Fault::None);
        let mut again = TcpStream::connect(proxy.local_addr()).await.unwrap();
        assert!(round_trip(&mut again, SOON).await.is_some());
    }

    #[tokio::test]
    async fn a_black_hole_holds_bytes_without_closing_and_gives_them_back_when_healed() {
        let proxy = proxy().await;
        let mut conn = TcpStream::connect(proxy.local_addr()).await.unwrap();
        assert!(round_trip(&mut conn, SOON).await.is_some());
        proxy.set(Fault::BlackHole);
        conn.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        let held =
            tokio::time::timeout(Duration::from_millis(500), conn.read_exact(&mut buf)).await;
        assert!(held.is_err(), "nothing comes back while black-holed");
        proxy.set(Fault::None);
        tokio::time::timeout(SOON, conn.read_exact(&mut buf))
            .await
            .expect("the held bytes arrive once healed")
            .unwrap();
        assert_eq!(&buf, b"ping");
    }
}
