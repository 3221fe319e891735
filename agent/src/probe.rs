//! Active probes of the peers' tunnel endpoints: an ICMP echo to every live
//! peer's underlay address (the outer path its VXLAN packets take) every
//! interval, answered by the peer's kernel. What `host ls` and `status`
//! show: reachable or not, since when, and the round trip.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// What is known of one peer.
#[derive(Clone, Debug, Default)]
pub struct PeerHealth {
    /// The last round trip, if the last probe was answered.
    pub rtt: Option<Duration>,
    pub last_ok: Option<Instant>,
    /// Probes sent and answered.
    pub sent: u64,
    pub answered: u64,
    /// Consecutive unanswered probes.
    pub missed: u32,
}

impl PeerHealth {
    /// Unreachable: probed, and the last `n` probes went unanswered.
    pub fn unreachable(&self, n: u32) -> bool {
        self.sent > 0 && self.missed >= n
    }
}

/// Probes missed in a row before a peer counts as unreachable.
pub const MISSED_FOR_DOWN: u32 = 2;

#[derive(Default)]
pub struct Prober {
    peers: Mutex<Vec<(String, Ipv4Addr)>>,
    health: Mutex<HashMap<String, PeerHealth>>,
}

/// An ICMP echo request (RFC 792): type 8, code 0, checksum, id, sequence.
pub fn echo_request(id: u16, seq: u16) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0] = 8;
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(b"trellis!");
    let sum = checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

/// The Internet checksum.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo reply in a raw IPv4 datagram: (source, id, sequence).
pub fn parse_reply(datagram: &[u8]) -> Option<(Ipv4Addr, u16, u16)> {
    let ihl = (*datagram.first()? & 0x0f) as usize * 4;
    let icmp = datagram.get(ihl..ihl + 8)?;
    if icmp[0] != 0 || icmp[1] != 0 {
        return None;
    }
    let src = Ipv4Addr::new(datagram[12], datagram[13], datagram[14], datagram[15]);
    Some((src, u16::from_be_bytes([icmp[4], icmp[5]]), u16::from_be_bytes([icmp[6], icmp[7]])))
}

impl Prober {
    /// The peers to probe (the live hosts but this one).
    pub fn set_peers(&self, peers: Vec<(String, IpAddr)>) {
        let v4: Vec<(String, Ipv4Addr)> = peers
            .into_iter()
            .filter_map(|(id, ip)| match ip {
                IpAddr::V4(v4) => Some((id, v4)),
                _ => None,
            })
            .collect();
        let ids: Vec<&String> = v4.iter().map(|(id, _)| id).collect();
        self.health.lock().unwrap_or_else(|p| p.into_inner()).retain(|id, _| ids.contains(&id));
        *self.peers.lock().unwrap_or_else(|p| p.into_inner()) = v4;
    }

    /// Every probed peer's health.
    pub fn all(&self) -> Vec<(String, PeerHealth)> {
        let mut v: Vec<_> =
            self.health.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, h)| (k.clone(), h.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn health(&self, id: &str) -> Option<PeerHealth> {
        self.health.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    /// Probe every `every`, forever, on a thread of its own (a raw socket,
    /// blocking reads with a deadline).
    pub fn start(self: &Arc<Self>, every: Duration) -> std::io::Result<()> {
        let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let me = self.clone();
        std::thread::Builder::new().name("peer-probe".into()).spawn(move || me.run(sock, every))?;
        Ok(())
    }

    fn run(&self, sock: Socket, every: Duration) {
        let id = (std::process::id() & 0xffff) as u16;
        let mut seq: u16 = 0;
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
        loop {
            seq = seq.wrapping_add(1);
            let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let t0 = Instant::now();
            let mut pending: HashMap<Ipv4Addr, String> = HashMap::new();
            for (host, ip) in &peers {
                let addr: SocketAddr = (IpAddr::V4(*ip), 0).into();
                if let Err(e) = sock.send_to(&echo_request(id, seq), &addr.into()) {
                    tracing::debug!(peer = %host, error = %e, "probe not sent");
                }
                pending.insert(*ip, host.clone());
            }
            let mut answered: HashMap<String, Duration> = HashMap::new();
            // Replies within the interval (at most a second).
            let deadline = t0 + every.min(Duration::from_secs(1));
            while !pending.is_empty() && Instant::now() < deadline {
                let Ok(n) = sock.recv(&mut buf) else { continue };
                // SAFETY: recv initialised the first n bytes.
                let data: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
                if let Some((src, rid, rseq)) = parse_reply(&data)
                    && rid == id
                    && rseq == seq
                    && let Some(host) = pending.remove(&src)
                {
                    answered.insert(host, t0.elapsed());
                }
            }
            {
                let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
                for (host, _) in &peers {
                    let h = health.entry(host.clone()).or_default();
                    h.sent += 1;
                    match answered.get(host) {
                        Some(rtt) => {
                            h.answered += 1;
                            h.rtt = Some(*rtt);
                            h.last_ok = Some(Instant::now());
                            h.missed = 0;
                        }
                        None => {
                            h.rtt = None;
                            h.missed += 1;
                            if h.missed == MISSED_FOR_DOWN {
                                tracing::warn!(peer = %host, "peer's tunnel endpoint stopped answering probes");
                            }
                        }
                    }
                }
            }
            std::thread::sleep(every.saturating_sub(t0.elapsed()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_requests_carry_a_valid_checksum() {
        let p = echo_request(0x1234, 7);
        assert_eq!(checksum(&p), 0, "a packet with its checksum sums to zero");
        assert_eq!((p[0], u16::from_be_bytes([p[4], p[5]]), u16::from_be_bytes([p[6], p[7]])), (8, 0x1234, 7));
    }

    #[test]
    fn replies_are_read_from_raw_datagrams() {
        let mut d = vec![0x45u8, 0, 0, 36, 0, 0, 0, 0, 64, 1, 0, 0, 198, 19, 0, 2, 198, 19, 0, 1];
        let mut icmp = echo_request(9, 3);
        icmp[0] = 0;
        d.extend_from_slice(&icmp);
        assert_eq!(parse_reply(&d), Some((Ipv4Addr::new(198, 19, 0, 2), 9, 3)));
        d[20] = 8; // a request, not a reply
        assert_eq!(parse_reply(&d), None);
        assert_eq!(parse_reply(&d[..22]), None, "truncated");
    }

    #[test]
    fn a_peer_is_down_after_missed_probes_only() {
        let mut h = PeerHealth::default();
        assert!(!h.unreachable(MISSED_FOR_DOWN), "never probed is not down");
        h.sent = 2;
        h.missed = 1;
        assert!(!h.unreachable(MISSED_FOR_DOWN));
        h.missed = 2;
        assert!(h.unreachable(MISSED_FOR_DOWN));
    }
}
