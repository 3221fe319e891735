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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use crate::dataplane::ProbeSockets;
use crate::model::liveness::Path;

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

    /// The verdict the data path's liveness takes
    /// ([`crate::model::liveness`]).
    pub fn path(&self) -> Path {
        if self.sent == 0 {
            Path::Unprobed
        } else if self.unreachable(MISSED_FOR_DOWN) {
            Path::Silent
        } else {
            Path::Answering
        }
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

    /// What the probes say of `id` (unprobed if it is not a peer).
    pub fn path(&self, id: &str) -> Path {
        self.health.lock().unwrap_or_else(|p| p.into_inner()).get(id).map_or(Path::Unprobed, PeerHealth::path)
    }

    /// Probe every `every`, forever, on a thread of its own (the sockets
    /// block, with a short deadline on every read).
    pub fn start(self: &Arc<Self>, sockets: Box<dyn ProbeSockets>, every: Duration) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new().name("peer-probe".into()).spawn(move || {
            let mut sockets = sockets;
            let id = (std::process::id() & 0xffff) as u16;
            let mut seq: u16 = 0;
            loop {
                seq = seq.wrapping_add(1);
                let t0 = Instant::now();
                me.round(sockets.as_mut(), id, seq, every);
                std::thread::sleep(every.saturating_sub(t0.elapsed()));
            }
        })?;
        Ok(())
    }

    /// One round: every peer probed both ways, the answers within the
    /// interval (at most a second) counted.
    pub fn round(&self, sockets: &mut dyn ProbeSockets, id: u16, seq: u16, every: Duration) {
        {
            let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner()).clone();
            // The probe device comes and goes with the reconciler (and may
            // be re-created): follow it.
            let tunnel = sockets.refresh_tunnel();
            let t0 = Instant::now();
            let mut pending: HashMap<Ipv4Addr, String> = HashMap::new();
            let mut pending6: HashMap<Ipv6Addr, String> = HashMap::new();
            for (host, ip, ll) in &peers {
                if let Err(e) = sockets.send_underlay(*ip, id, seq) {
                    tracing::debug!(peer = %host, error = %e, "probe not sent");
                }
                pending.insert(*ip, host.clone());
                if let (true, Some(ll)) = (tunnel, ll) {
                    match sockets.send_tunnel(*ll, id, seq) {
                        Ok(()) => {
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
                    && let Some((src, rid, rseq)) = sockets.recv_underlay()
                    && rid == id
                    && rseq == seq
                    && let Some(host) = pending.remove(&src)
                {
                    answered.insert(host, t0.elapsed());
                }
                if !pending6.is_empty()
                    && tunnel
                    && let Some((from, rid, rseq)) = sockets.recv_tunnel()
                    && (rid, rseq) == (id, seq)
                    && let Some(host) = pending6.remove(&from)
                {
                    answered6.insert(host, t0.elapsed());
                }
                if pending.is_empty() && !tunnel {
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_counts_answers_per_peer_and_path() {
        use crate::dataplane::{Dataplane, FakeDataplane};
        let dp = FakeDataplane::default();
        let mac: crate::model::Mac = "02:00:00:00:aa:02".parse().unwrap();
        {
            let mut p = dp.peers.lock().unwrap();
            p.underlay.insert(Ipv4Addr::new(192, 0, 2, 2));
            p.underlay.insert(Ipv4Addr::new(192, 0, 2, 3));
            p.tunnel.insert(mac.link_local());
            p.probe_device = true;
        }
        let prober = Prober::default();
        prober.set_peers(vec![
            ("h2".into(), "192.0.2.2".parse().unwrap(), Some(mac)),
            // Its underlay answers, its tunnel does not (a blocked VXLAN port).
            ("h3".into(), "192.0.2.3".parse().unwrap(), Some("02:00:00:00:aa:03".parse().unwrap())),
            // Nothing answers.
            ("h4".into(), "192.0.2.4".parse().unwrap(), None),
        ]);
        let mut sockets = dp.probe_sockets().unwrap();
        for seq in 1..=MISSED_FOR_DOWN as u16 {
            prober.round(sockets.as_mut(), 7, seq, Duration::from_millis(50));
        }
        let h = |id: &str| prober.health(id).unwrap();
        assert!(h("h2").rtt.is_some() && h("h2").tunnel.rtt.is_some() && !h("h2").unreachable(MISSED_FOR_DOWN));
        assert_eq!((h("h2").sent, h("h2").answered, h("h2").tunnel.answered), (2, 2, 2));
        assert!(h("h3").tunnel_down(MISSED_FOR_DOWN) && !h("h3").underlay_down(MISSED_FOR_DOWN));
        assert!(h("h4").underlay_down(MISSED_FOR_DOWN));
        assert_eq!(h("h4").tunnel.sent, 0, "no probe-tunnel address: not probed through the tunnel");
        // The tunnel device goes: only the underlay is probed.
        dp.peers.lock().unwrap().probe_device = false;
        prober.round(sockets.as_mut(), 7, 9, Duration::from_millis(50));
        assert_eq!(h("h2").tunnel.sent, 2);
        assert_eq!(h("h2").sent, 3);
        // A peer that left is forgotten.
        prober.set_peers(vec![("h2".into(), "192.0.2.2".parse().unwrap(), Some(mac))]);
        assert!(prober.health("h3").is_none());
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
        assert_eq!(h.path(), Path::Unprobed);
        h.sent = 2;
        h.missed = 1;
        assert!(!h.unreachable(MISSED_FOR_DOWN));
        assert_eq!(h.path(), Path::Answering, "one missed probe is not silence");
        h.missed = 2;
        assert!(h.unreachable(MISSED_FOR_DOWN));
        assert_eq!(h.path(), Path::Silent);
        h.missed = 0;
        h.tunnel = TunnelHealth { sent: 2, answered: 0, missed: 2, rtt: None };
        assert_eq!(h.path(), Path::Silent, "the tunnel silent is silent");
    }
}
