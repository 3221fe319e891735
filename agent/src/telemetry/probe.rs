//! Active probes of the peers, every interval, two of them, each answered by
//! the peer's kernel:
//! * **underlay**: an ICMP echo to the peer's underlay address (the outer
//!   path its VXLAN packets take);
//! * **tunnel**: an ICMPv6 echo through the probe VXLAN device
//!   ([`crate::model::PROBE_VXLAN`]) to the peer's link-local address on
//!   its own probe device — encapsulated on the hosts' VXLAN port, so a
//!   blocked port or a broken VXLAN path shows even while ICMP passes.
//!
//! What `host ls` and `status` show: reachable or not over each, and the
//! round trips.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
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
    /// The same through the probe tunnel.
    pub tunnel: TunnelHealth,
}

#[derive(Clone, Debug, Default)]
pub struct TunnelHealth {
    pub rtt: Option<Duration>,
    pub sent: u64,
    pub answered: u64,
    pub missed: u32,
}

impl PeerHealth {
    /// Unreachable: probed, and the last `n` probes went unanswered, over
    /// the underlay or through the tunnel.
    pub fn unreachable(&self, n: u32) -> bool {
        self.underlay_down(n) || self.tunnel_down(n)
    }

    pub fn underlay_down(&self, n: u32) -> bool {
        self.sent > 0 && self.missed >= n
    }

    pub fn tunnel_down(&self, n: u32) -> bool {
        self.tunnel.sent > 0 && self.tunnel.missed >= n
    }
}

/// Probes missed in a row before a peer counts as unreachable.
pub const MISSED_FOR_DOWN: u32 = 2;

/// A peer to probe: its id, underlay address, and probe-tunnel address.
type Peer = (String, Ipv4Addr, Option<Ipv6Addr>);

#[derive(Default)]
pub struct Prober {
    peers: Mutex<Vec<Peer>>,
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
    /// The peers to probe (the live hosts but this one): id, underlay
    /// address, VTEP MAC (its probe-tunnel address derives from it).
    pub fn set_peers(&self, peers: Vec<(String, IpAddr, Option<crate::model::Mac>)>) {
        let v4: Vec<Peer> = peers
            .into_iter()
            .filter_map(|(id, ip, mac)| match ip {
                IpAddr::V4(v4) => Some((id, v4, mac.map(|m| m.link_local()))),
                _ => None,
            })
            .collect();
        let ids: Vec<&String> = v4.iter().map(|(id, _, _)| id).collect();
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

    /// Probe every `every`, forever, on a thread of its own (raw sockets,
    /// blocking reads with a deadline).
    pub fn start(self: &Arc<Self>, every: Duration) -> std::io::Result<()> {
        let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
        sock.set_read_timeout(Some(Duration::from_millis(20)))?;
        let me = self.clone();
        std::thread::Builder::new().name("peer-probe".into()).spawn(move || me.run(sock, every))?;
        Ok(())
    }

    /// A raw ICMPv6 socket on the probe device, once it exists.
    fn tunnel_socket() -> Option<(Socket, u32)> {
        let index = nix::net::if_::if_nametoindex(crate::model::PROBE_VXLAN).ok()?;
        let sock = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).ok()?;
        sock.bind_device(Some(crate::model::PROBE_VXLAN.as_bytes())).ok()?;
        sock.set_read_timeout(Some(Duration::from_millis(20))).ok()?;
        Some((sock, index))
    }

    fn run(&self, sock: Socket, every: Duration) {
        let id = (std::process::id() & 0xffff) as u16;
        let mut seq: u16 = 0;
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
        let mut tunnel: Option<(Socket, u32)> = None;
        loop {
            seq = seq.wrapping_add(1);
            let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner()).clone();
            // The probe device comes and goes with the reconciler (and may
            // be re-created): look it up again when it changed.
            let index = nix::net::if_::if_nametoindex(crate::model::PROBE_VXLAN).ok();
            if tunnel.as_ref().map(|(_, i)| *i) != index {
                tunnel = Self::tunnel_socket();
            }
            let t0 = Instant::now();
            let mut pending: HashMap<Ipv4Addr, String> = HashMap::new();
            let mut pending6: HashMap<Ipv6Addr, String> = HashMap::new();
            for (host, ip, ll) in &peers {
                let addr: SocketAddr = (IpAddr::V4(*ip), 0).into();
                if let Err(e) = sock.send_to(&echo_request(id, seq), &addr.into()) {
                    tracing::debug!(peer = %host, error = %e, "probe not sent");
                }
                pending.insert(*ip, host.clone());
                if let (Some((s6, index)), Some(ll)) = (&tunnel, ll) {
                    let addr = SocketAddr::V6(SocketAddrV6::new(*ll, 0, 0, *index));
                    match s6.send_to(&echo_request_v6(id, seq), &addr.into()) {
                        Ok(_) => {
                            pending6.insert(*ll, host.clone());
                        }
                        Err(e) => tracing::debug!(peer = %host, error = %e, "tunnel probe not sent"),
                    }
                }
            }
            let probed6: Vec<String> = pending6.values().cloned().collect();
            let mut answered: HashMap<String, Duration> = HashMap::new();
            let mut answered6: HashMap<String, Duration> = HashMap::new();
            // Replies within the interval (at most a second).
            let deadline = t0 + every.min(Duration::from_secs(1));
            while !(pending.is_empty() && pending6.is_empty()) && Instant::now() < deadline {
                if !pending.is_empty()
                    && let Ok(n) = sock.recv(&mut buf)
                {
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
                if !pending6.is_empty()
                    && let Some((s6, _)) = &tunnel
                    && let Ok((n, from)) = s6.recv_from(&mut buf)
                {
                    // SAFETY: recv_from initialised the first n bytes.
                    let data: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
                    if let Some(SocketAddr::V6(from)) = from.as_socket()
                        && parse_reply_v6(&data) == Some((id, seq))
                        && let Some(host) = pending6.remove(from.ip())
                    {
                        answered6.insert(host, t0.elapsed());
                    }
                }
                if pending.is_empty() && tunnel.is_none() {
                    break;
                }
            }
            {
                let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
                for (host, _, _) in &peers {
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
                                tracing::warn!(peer = %host, "peer's underlay address stopped answering probes");
                            }
                        }
                    }
                    if !probed6.contains(host) {
                        continue;
                    }
                    let t = &mut h.tunnel;
                    t.sent += 1;
                    match answered6.get(host) {
                        Some(rtt) => {
                            t.answered += 1;
                            t.rtt = Some(*rtt);
                            t.missed = 0;
                        }
                        None => {
                            t.rtt = None;
                            t.missed += 1;
                            if t.missed == MISSED_FOR_DOWN {
                                tracing::warn!(peer = %host, "probes through the VXLAN tunnel to the peer go unanswered");
                            }
                        }
                    }
                }
            }
            std::thread::sleep(every.saturating_sub(t0.elapsed()));
        }
    }
}

/// An ICMPv6 echo request (RFC 4443): type 128; the kernel fills in the
/// checksum of a raw ICMPv6 socket's packets.
pub fn echo_request_v6(id: u16, seq: u16) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0] = 128;
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(b"trellis!");
    p
}

/// An ICMPv6 echo reply as a raw ICMPv6 socket reads it: (id, sequence).
pub fn parse_reply_v6(icmp: &[u8]) -> Option<(u16, u16)> {
    let h = icmp.get(..8)?;
    (h[0] == 129 && h[1] == 0).then(|| (u16::from_be_bytes([h[4], h[5]]), u16::from_be_bytes([h[6], h[7]])))
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
    fn tunnel_probes_are_icmpv6_echoes_and_replies() {
        let p = echo_request_v6(5, 6);
        assert_eq!((p[0], p[1]), (128, 0));
        let mut r = p;
        r[0] = 129;
        assert_eq!(parse_reply_v6(&r), Some((5, 6)));
        assert_eq!(parse_reply_v6(&p), None, "a request is not a reply");
        assert_eq!(parse_reply_v6(&r[..7]), None, "truncated");
    }

    #[test]
    fn a_tunnel_that_does_not_answer_makes_the_peer_unreachable() {
        let mut h = PeerHealth { sent: 3, answered: 3, ..Default::default() };
        assert!(!h.unreachable(MISSED_FOR_DOWN));
        h.tunnel = TunnelHealth { sent: 3, answered: 1, missed: 2, rtt: None };
        assert!(h.tunnel_down(MISSED_FOR_DOWN) && !h.underlay_down(MISSED_FOR_DOWN));
        assert!(h.unreachable(MISSED_FOR_DOWN));
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
