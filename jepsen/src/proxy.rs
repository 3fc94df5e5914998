//! Network faults without root: a userspace TCP proxy in front of every
//! member's peer listener. Members advertise the proxy's address as their
//! peer URL, so all Raft traffic to member `j` passes through proxy `j`.
//!
//! Each member has its own loopback address (127.77.<slot>.<i+1>) and
//! keel dials its peers from it, so a proxy knows which member opened a
//! connection. A connection from member `k` to member `j` carries `k`'s
//! bytes to `j` one way and `j`'s bytes to `k` the other; the rules act on
//! each direction:
//!
//! - a cut ("`j` does not hear `k`") discards that direction's bytes, as a
//!   partition drops packets. The connection's HTTP/2 framing is broken
//!   from then on, so the proxy closes it once the cut is healed and the
//!   member reconnects, as it would after a real partition;
//! - loss: a lost TCP segment reaches the application late (after a
//!   retransmission), never not at all, so a "dropped" chunk is delayed
//!   by a retransmission timeout;
//! - rate: chunks are paced to a bandwidth, as a slow link queues them.
//!
//! A connection whose source is not a member (etcd does not choose its
//! source address) is passed through untouched and counted, so a run
//! records that its partitions could not apply.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The fault rules every proxy applies.
#[derive(Debug, Clone, Default)]
struct Rules {
    /// (hearer, speaker): bytes from `speaker` to `hearer` are dropped.
    deaf: HashSet<(usize, usize)>,
    /// Share of chunks delayed by a retransmission timeout.
    loss: f64,
    /// Bandwidth of every peer link, bytes per second.
    rate: Option<u64>,
}

impl Rules {
    fn blocks(&self, hearer: usize, speaker: Option<usize>) -> bool {
        speaker.is_some_and(|s| self.deaf.contains(&(hearer, s)))
    }
}

struct Shared {
    rules: Mutex<Rules>,
    changed: watch::Sender<u64>,
    unattributed: AtomicU64,
}

impl Shared {
    fn rules(&self) -> Rules {
        self.rules.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut Rules)) {
        if let Ok(mut r) = self.rules.lock() {
            f(&mut r);
        }
        self.changed.send_modify(|g| *g += 1);
    }
}

/// The proxies of one cluster; dropping it stops them.
pub struct PeerProxies {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

/// The loopback address of member `i` in network slot `slot`.
pub fn member_ip(slot: usize, i: usize) -> IpAddr {
    IpAddr::from([127, 77, slot as u8, (i + 1) as u8])
}

fn member_of(slot: usize, ip: IpAddr) -> Option<usize> {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            (a == 127 && b == 77 && c == slot as u8 && d >= 1).then(|| d as usize - 1)
        }
        IpAddr::V6(_) => None,
    }
}

impl PeerProxies {
    /// Starts one proxy per member: `routes[j]` is (address the proxy
    /// listens on, member `j`'s real peer listener).
    pub async fn start(slot: usize, routes: &[(SocketAddr, SocketAddr)]) -> Result<Self> {
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared { rules: Mutex::new(Rules::default()), changed, unattributed: AtomicU64::new(0) });
        let mut tasks = Vec::new();
        for (j, &(listen, upstream)) in routes.iter().enumerate() {
            let listener = TcpListener::bind(listen).await?;
            let shared = shared.clone();
            tasks.push(tokio::spawn(async move {
                while let Ok((inbound, from)) = listener.accept().await {
                    let speaker = member_of(slot, from.ip());
                    if speaker.is_none() {
                        shared.unattributed.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::spawn(relay(shared.clone(), j, speaker, inbound, upstream));
                }
            }));
        }
        Ok(PeerProxies { shared, tasks })
    }

    /// From now on `hearer` receives nothing from `speaker`.
    pub fn cut(&self, hearer: usize, speaker: usize) {
        self.shared.update(|r| {
            r.deaf.insert((hearer, speaker));
        });
    }

    /// Delays this share of chunks on every peer link by a retransmission.
    pub fn set_loss(&self, share: f64) {
        self.shared.update(|r| r.loss = share.clamp(0.0, 1.0));
    }

    /// Limits every peer link to `bytes_per_second`.
    pub fn set_rate(&self, bytes_per_second: u64) {
        self.shared.update(|r| r.rate = Some(bytes_per_second.max(1)));
    }

    /// Removes every rule; connections that lost bytes are closed.
    pub fn heal(&self) {
        self.shared.update(|r| *r = Rules::default());
    }

    /// Connections from an address that is no member's (so no cut could
    /// apply to them).
    pub fn unattributed_connections(&self) -> u64 {
        self.shared.unattributed.load(Ordering::Relaxed)
    }
}

impl Drop for PeerProxies {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Carries one connection from `peer` (None: not a member) to `member`
/// until either side closes it, or until a cut that discarded some of its
/// bytes is lifted.
async fn relay(shared: Arc<Shared>, member: usize, peer: Option<usize>, inbound: TcpStream, upstream: SocketAddr) {
    let Ok(outbound) = TcpStream::connect(upstream).await else { return };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    let broken = Arc::new(AtomicBool::new(false));
    let mut changes = shared.changed.subscribe();
    let lifted = async {
        loop {
            if changes.changed().await.is_err() {
                return;
            }
            let rules = shared.rules();
            let cut = rules.blocks(member, peer) || peer.is_some_and(|p| rules.blocks(p, Some(member)));
            if broken.load(Ordering::Relaxed) && !cut {
                return;
            }
        }
    };
    // Bytes from the connecting member to `member`, and back.
    let to_member = forward(&shared, in_read, out_write, |r| r.blocks(member, peer), &broken);
    let to_peer = forward(&shared, out_read, in_write, |r| peer.is_some_and(|p| r.blocks(p, Some(member))), &broken);
    tokio::select! {
        _ = to_member => {}
        _ = to_peer => {}
        _ = lifted => {}
    }
}

async fn forward(
    shared: &Shared,
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    blocked: impl Fn(&Rules) -> bool,
    broken: &AtomicBool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let rules = shared.rules();
        if blocked(&rules) {
            broken.store(true, Ordering::Relaxed);
            continue;
        }
        if rules.loss > 0.0 && rand::thread_rng().gen_bool(rules.loss) {
            let rto = rand::thread_rng().gen_range(200..400);
            tokio::time::sleep(Duration::from_millis(rto)).await;
        }
        if let Some(rate) = rules.rate {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server(addr: SocketAddr) -> Result<()> {
        let listener = TcpListener::bind(addr).await?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(())
    }

    async fn dial_from(member: usize, to: SocketAddr) -> Result<TcpStream> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(member_ip(250, member), 0))?;
        Ok(socket.connect(to).await?)
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut got)).await??;
        Ok(got)
    }

    #[tokio::test]
    async fn cuts_apply_per_direction_and_heal_closes_broken_connections() -> Result<()> {
        let port = |p| SocketAddr::new(member_ip(250, 0), p);
        let member0 = port(std::net::TcpListener::bind(port(0))?.local_addr()?.port());
        let proxy0 = port(std::net::TcpListener::bind(port(0))?.local_addr()?.port());
        echo_server(member0).await?;
        let proxies = PeerProxies::start(250, &[(proxy0, member0)]).await?;

        // Member 1 talks to member 0 through the proxy.
        let mut from1 = dial_from(1, proxy0).await?;
        assert_eq!(round_trip(&mut from1, b"hello").await?, b"hello");

        // Member 0 stops hearing member 2 only: member 1 is unaffected.
        proxies.cut(0, 2);
        let mut from2 = dial_from(2, proxy0).await?;
        assert!(round_trip(&mut from2, b"lost").await.is_err(), "a cut link delivered");
        assert_eq!(round_trip(&mut from1, b"still").await?, b"still");

        // One way: member 1 hears nothing back from member 0.
        proxies.cut(1, 0);
        assert!(round_trip(&mut from1, b"no reply").await.is_err(), "a cut reply arrived");

        // Healing closes the connections whose bytes were dropped; new
        // ones work.
        proxies.heal();
        let mut buf = [0u8; 16];
        let closed = tokio::time::timeout(Duration::from_secs(2), from2.read(&mut buf)).await?;
        assert!(matches!(closed, Ok(0) | Err(_)), "broken connection left open: {closed:?}");
        let mut again = dial_from(2, proxy0).await?;
        assert_eq!(round_trip(&mut again, b"back").await?, b"back");

        // A stranger's connection is passed through and counted.
        let mut stranger = TcpStream::connect(proxy0).await?;
        proxies.cut(0, 3);
        assert_eq!(round_trip(&mut stranger, b"anyone").await?, b"anyone");
        assert_eq!(proxies.unattributed_connections(), 1);
        Ok(())
    }
}
