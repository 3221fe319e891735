//! Active probes of the peers, every interval, two of them, each answered by
//! the peer's kernel:
//! * **underlay**: an ICMP echo to the peer's underlay address (the outer
//!   path its VXLAN packets take);
//! * **tunnel**: an ICMPv6 echo through the probe VXLAN device
//!   ([`crate::model::PROBE_VXLAN`]) to the peer's link-local address on
//!   its own probe device — encapsulated on the hosts' VXLAN port, so a
//!   blocked port or a broken VXLAN path shows even while ICMP passes.
//!
//! * **path MTU**, both ways: an echo of the largest size the path must
//!   carry (the smaller of the two hosts' advertised underlay MTUs, the
//!   basis of every network's MTU) with Don't Fragment set, to the peer's
//!   underlay address, which its VXLAN packets share; and an ICMPv6 echo
//!   through the probe device whose VXLAN packet is that size (the device
//!   sets Don't Fragment on its outer packets, and its MTU is the
//!   underlay's less VXLAN's 50 bytes), which finds what the path carries
//!   of VXLAN itself: a firewall or middlebox that passes large ICMP but
//!   not large UDP on the VXLAN port shows there only. When a size goes
//!   unanswered while small probes answer, a search one size a round
//!   finds what the path does carry ([`PathMtu`]). The networks' devices
//!   carry no DF bit, so a narrower path fragments (or, on a layer-2 hop,
//!   drops) their packets: `host ls` shows both verified sizes, and the
//!   agent warns, naming the peer.
//!
//! What `host ls` and `status` show: reachable or not over each, the round
//! trips, and the path MTUs.

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
    /// The largest packet the underlay path carries unfragmented.
    pub mtu: PathMtu,
}

/// The smallest size a path MTU search tries (IPv4's minimum reassembly
/// size: any path carries it).
pub const PMTU_FLOOR: u32 = 576;
/// A search stops when the sizes that passed and failed are this close.
const PMTU_STEP: u32 = 8;
/// Rounds between two verifications of a found path MTU.
const PMTU_RECHECK: u32 = 30;

/// The path MTU towards one peer: a search by Don't-Fragment probes, one
/// size a round (pure: the prober sends what [`PathMtu::next_size`] says
/// and reports with [`PathMtu::record`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathMtu {
    /// What the path must carry: the smaller of both hosts' advertised
    /// underlay MTUs (0: not known, nothing is probed).
    pub expected: u32,
    /// The largest size whose probe was answered, when the last search
    /// ended (`None`: none ended yet).
    pub verified: Option<u32>,
    /// This search: the largest size answered, the smallest not (0: none).
    ok: u32,
    bad: u32,
    /// A first unanswered probe at `expected` is tried again (a probe may
    /// be lost) before the search goes lower.
    retried: bool,
    /// Rounds until the next search.
    wait: u32,
}

impl PathMtu {
    /// A peer's advertised MTU changed (or is first known): search again.
    pub fn expect(&mut self, expected: u32) {
        if expected != self.expected {
            *self = PathMtu { expected, ..PathMtu::default() };
        }
    }

    /// The size to probe this round, if any.
    pub fn next_size(&mut self) -> Option<u32> {
        if self.expected == 0 {
            return None;
        }
        if self.wait > 0 {
            self.wait -= 1;
            return None;
        }
        if self.bad == 0 {
            return Some(self.expected);
        }
        Some((self.ok.max(PMTU_FLOOR) + self.bad) / 2)
    }

    /// The probe of `size` was answered (or not). Returns what the path
    /// carries when a search has just found it narrower than expected, and
    /// other than the last search found (the caller warns).
    pub fn record(&mut self, size: u32, answered: bool) -> Option<u32> {
        if answered {
            self.ok = self.ok.max(size);
            if size >= self.expected || (self.bad > 0 && self.bad - self.ok <= PMTU_STEP) {
                return self.finish(self.ok);
            }
            return None;
        }
        if size == self.expected && !self.retried {
            self.retried = true;
            return None;
        }
        self.bad = if self.bad == 0 { size } else { self.bad.min(size) };
        if self.bad <= PMTU_FLOOR || self.bad - self.ok.max(PMTU_FLOOR) <= PMTU_STEP {
            return self.finish(self.ok.max(PMTU_FLOOR).min(self.bad));
        }
        None
    }

    fn finish(&mut self, verified: u32) -> Option<u32> {
        let before = self.verified.replace(verified);
        self.ok = 0;
        self.bad = 0;
        self.retried = false;
        self.wait = PMTU_RECHECK;
        (verified < self.expected && before != Some(verified)).then_some(verified)
    }
}

#[derive(Clone, Debug, Default)]
pub struct TunnelHealth {
    pub rtt: Option<Duration>,
    pub sent: u64,
    pub answered: u64,
    pub missed: u32,
    /// The largest VXLAN packet (outer IPv4 datagram) the path carries.
    pub mtu: PathMtu,
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

/// Whether a path MTU probe counts: sent, or refused by the kernel as too
/// big to send unfragmented (this host's link, or a router's Packet Too
/// Big it remembers, says the path does not carry it: it goes unanswered).
fn sent_or_too_big(sent: std::io::Result<()>, peer: &str, size: u32) -> bool {
    match sent {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(nix::libc::EMSGSIZE) => true,
        Err(e) => {
            tracing::debug!(%peer, size, error = %e, "path MTU probe not sent");
            false
        }
    }
}

/// A search found the path to `peer` narrower than both hosts advertise.
fn narrower(peer: &str, probe: &str, carries: u32, expected: u32) {
    tracing::warn!(
        %peer,
        probe,
        carries,
        expected,
        "the path to a peer carries less than both hosts' underlays advertise: VXLAN packets to it are \
         fragmented or lost; lower the uplink's MTU (or give networks a smaller --mtu)"
    );
}

/// Probes missed in a row before a peer counts as unreachable.
pub const MISSED_FOR_DOWN: u32 = 2;

/// A peer to probe: its id, underlay address, probe-tunnel address, and
/// the largest packet the path to it must carry.
type Peer = (String, Ipv4Addr, Option<Ipv6Addr>, u32);

#[derive(Default)]
pub struct Prober {
    peers: Mutex<Vec<Peer>>,
    health: Mutex<HashMap<String, PeerHealth>>,
    /// This host's underlay MTU (0: not known).
    own_mtu: std::sync::atomic::AtomicU32,
}

impl Prober {
    /// This host's underlay MTU, what the path MTU probes compare with.
    pub fn set_own_mtu(&self, mtu: u32) {
        self.own_mtu.store(mtu, std::sync::atomic::Ordering::Relaxed);
    }

    /// The peers to probe (the live hosts but this one): id, underlay
    /// address, VTEP MAC (its probe-tunnel address derives from it), and
    /// advertised underlay MTU (0: not known): the path to it is probed for
    /// the smaller of its and this host's.
    pub fn set_peers(&self, peers: Vec<(String, IpAddr, Option<crate::model::Mac>, u32)>) {
        let own = self.own_mtu.load(std::sync::atomic::Ordering::Relaxed);
        let v4: Vec<Peer> = peers
            .into_iter()
            .filter_map(|(id, ip, mac, mtu)| match ip {
                IpAddr::V4(v4) => {
                    let expected = if own > 0 && mtu > 0 { own.min(mtu) } else { 0 };
                    Some((id, v4, mac.map(|m| m.link_local()), expected))
                }
                _ => None,
            })
            .collect();
        let ids: Vec<&String> = v4.iter().map(|(id, ..)| id).collect();
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
            // Sized probes carry another id: (peer, size).
            let sized_id = id ^ 0x8000;
            let mut pending_sized: HashMap<Ipv4Addr, (String, u32)> = HashMap::new();
            let mut pending6_sized: HashMap<Ipv6Addr, (String, u32)> = HashMap::new();
            // This round's sizes: (peer, underlay size, tunnel size).
            let sizes: Vec<(String, Option<u32>, Option<u32>)> = {
                let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
                peers
                    .iter()
                    .map(|(host, _, ll, expected)| {
                        let h = health.entry(host.clone()).or_default();
                        h.mtu.expect(*expected);
                        h.tunnel.mtu.expect(*expected);
                        let through = if tunnel && ll.is_some() { h.tunnel.mtu.next_size() } else { None };
                        (host.clone(), h.mtu.next_size(), through)
                    })
                    .collect()
            };
            for (host, ip, ll, _) in &peers {
                if let Err(e) = sockets.send_underlay(*ip, id, seq) {
                    tracing::debug!(peer = %host, error = %e, "probe not sent");
                }
                pending.insert(*ip, host.clone());
                let (underlay_size, tunnel_size) =
                    sizes.iter().find(|(h, ..)| h == host).map_or((None, None), |(_, u, t)| (*u, *t));
                if let Some(size) = underlay_size {
                    let sent = sockets.send_underlay_sized(*ip, sized_id, seq, size);
                    if sent_or_too_big(sent, host, size) {
                        pending_sized.insert(*ip, (host.clone(), size));
                    }
                }
                if let (Some(size), Some(ll)) = (tunnel_size, ll) {
                    let sent = sockets.send_tunnel_sized(*ll, sized_id, seq, size);
                    if sent_or_too_big(sent, host, size) {
                        pending6_sized.insert(*ll, (host.clone(), size));
                    }
                }
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
            let probed_sized: Vec<(String, u32)> = pending_sized.values().cloned().collect();
            let probed6_sized: Vec<(String, u32)> = pending6_sized.values().cloned().collect();
            let mut answered_sized: Vec<String> = Vec::new();
            let mut answered6_sized: Vec<String> = Vec::new();
            let mut answered: HashMap<String, Duration> = HashMap::new();
            let mut answered6: HashMap<String, Duration> = HashMap::new();
            // Replies within the interval (at most a second).
            let deadline = t0 + every.min(Duration::from_secs(1));
            while !(pending.is_empty() && pending6.is_empty() && pending_sized.is_empty() && pending6_sized.is_empty())
                && Instant::now() < deadline
            {
                if !(pending.is_empty() && pending_sized.is_empty())
                    && let Some((src, rid, rseq)) = sockets.recv_underlay()
                    && rseq == seq
                {
                    if rid == id
                        && let Some(host) = pending.remove(&src)
                    {
                        answered.insert(host, t0.elapsed());
                    } else if rid == sized_id
                        && let Some((host, _)) = pending_sized.remove(&src)
                    {
                        answered_sized.push(host);
                    }
                }
                if !(pending6.is_empty() && pending6_sized.is_empty())
                    && tunnel
                    && let Some((from, rid, rseq)) = sockets.recv_tunnel()
                    && rseq == seq
                {
                    if rid == id
                        && let Some(host) = pending6.remove(&from)
                    {
                        answered6.insert(host, t0.elapsed());
                    } else if rid == sized_id
                        && let Some((host, _)) = pending6_sized.remove(&from)
                    {
                        answered6_sized.push(host);
                    }
                }
                if pending.is_empty() && pending_sized.is_empty() && !tunnel {
                    break;
                }
            }
            {
                let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
                for (host, size) in &probed_sized {
                    let h = health.entry(host.clone()).or_default();
                    // Only a path that answers small probes says anything
                    // of its size.
                    if answered.contains_key(host)
                        && let Some(carries) = h.mtu.record(*size, answered_sized.contains(host))
                    {
                        narrower(host, "underlay", carries, h.mtu.expected);
                    }
                }
                for (host, size) in &probed6_sized {
                    let h = health.entry(host.clone()).or_default();
                    if answered6.contains_key(host)
                        && let Some(carries) = h.tunnel.mtu.record(*size, answered6_sized.contains(host))
                    {
                        narrower(host, "tunnel", carries, h.tunnel.mtu.expected);
                    }
                }
                for (host, ..) in &peers {
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
            ("h2".into(), "192.0.2.2".parse().unwrap(), Some(mac), 0),
            // Its underlay answers, its tunnel does not (a blocked VXLAN port).
            ("h3".into(), "192.0.2.3".parse().unwrap(), Some("02:00:00:00:aa:03".parse().unwrap()), 0),
            // Nothing answers.
            ("h4".into(), "192.0.2.4".parse().unwrap(), None, 0),
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
        prober.set_peers(vec![("h2".into(), "192.0.2.2".parse().unwrap(), Some(mac), 0)]);
        assert!(prober.health("h3").is_none());
    }

    #[test]
    fn a_tunnel_that_does_not_answer_makes_the_peer_unreachable() {
        let mut h = PeerHealth { sent: 3, answered: 3, ..Default::default() };
        assert!(!h.unreachable(MISSED_FOR_DOWN));
        h.tunnel = TunnelHealth { sent: 3, answered: 1, missed: 2, ..Default::default() };
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
        h.tunnel = TunnelHealth { sent: 2, answered: 0, missed: 2, ..Default::default() };
        assert_eq!(h.path(), Path::Silent, "the tunnel silent is silent");
    }

    #[test]
    fn a_path_mtu_search_finds_what_the_path_carries() {
        // The path carries 1380 where both ends advertise 9000.
        let carries = 1380;
        let mut m = PathMtu::default();
        m.expect(9000);
        let mut rounds = 0;
        while m.verified.is_none() {
            let size = m.next_size().expect("a size to probe");
            m.record(size, size <= carries);
            rounds += 1;
            assert!(rounds < 20, "the search ends");
        }
        let found = m.verified.unwrap();
        assert!(found <= carries && carries - found <= PMTU_STEP, "found {found}");
        // Then it waits before checking again.
        assert_eq!((0..PMTU_RECHECK).filter_map(|_| m.next_size()).count(), 0);
        assert_eq!(m.next_size(), Some(9000), "a new search starts at the advertised size");
    }

    #[test]
    fn a_path_that_carries_what_is_advertised_is_verified_at_once_and_one_loss_is_forgiven() {
        let mut m = PathMtu::default();
        m.expect(1400);
        assert_eq!(m.next_size(), Some(1400));
        m.record(1400, false); // lost
        assert_eq!(m.next_size(), Some(1400), "tried again before searching lower");
        m.record(1400, true);
        assert_eq!(m.verified, Some(1400));
        // Nothing known of a peer's MTU: nothing probed.
        let mut unknown = PathMtu::default();
        unknown.expect(0);
        assert_eq!(unknown.next_size(), None);
    }

    #[test]
    fn the_prober_probes_each_path_for_the_smaller_advertised_mtu() {
        use crate::dataplane::{Dataplane, FakeDataplane};
        let dp = FakeDataplane::default();
        let (h2, h3) = (Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 3));
        {
            let mut p = dp.peers.lock().unwrap();
            p.underlay.extend([h2, h3]);
            p.path_mtu.insert(h3, 1300);
        }
        let prober = Prober::default();
        prober.set_own_mtu(9000);
        prober.set_peers(vec![
            ("h2".into(), h2.into(), None, 1400),
            // A jumbo peer behind something that carries 1300.
            ("h3".into(), h3.into(), None, 9000),
        ]);
        let mut sockets = dp.probe_sockets().unwrap();
        for seq in 1..=20u16 {
            prober.round(sockets.as_mut(), 7, seq, Duration::from_millis(20));
        }
        let mtu = |id: &str| prober.health(id).unwrap().mtu;
        assert_eq!((mtu("h2").expected, mtu("h2").verified), (1400, Some(1400)));
        assert_eq!(mtu("h3").expected, 9000);
        let found = mtu("h3").verified.expect("the search ended");
        assert!((1300 - PMTU_STEP..=1300).contains(&found), "found {found}");
        assert!(!prober.health("h3").unwrap().unreachable(MISSED_FOR_DOWN), "small probes still answer");
    }

    #[test]
    fn the_tunnel_is_probed_for_the_vxlan_packets_it_carries() {
        use crate::dataplane::{Dataplane, FakeDataplane};
        let dp = FakeDataplane::default();
        let (h2, h3) = (Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 3));
        let (m2, m3): (crate::model::Mac, crate::model::Mac) =
            ("02:00:00:00:aa:02".parse().unwrap(), "02:00:00:00:aa:03".parse().unwrap());
        {
            let mut p = dp.peers.lock().unwrap();
            p.underlay.extend([h2, h3]);
            p.tunnel.extend([m2.link_local(), m3.link_local()]);
            p.probe_device = true;
            // Large ICMP passes to h3, large VXLAN packets do not (a
            // middlebox on the UDP port).
            p.tunnel_mtu.insert(m3.link_local(), 1450);
        }
        let prober = Prober::default();
        prober.set_own_mtu(9000);
        prober.set_peers(vec![("h2".into(), h2.into(), Some(m2), 9000), ("h3".into(), h3.into(), Some(m3), 9000)]);
        let mut sockets = dp.probe_sockets().unwrap();
        for seq in 1..=20u16 {
            prober.round(sockets.as_mut(), 7, seq, Duration::from_millis(20));
        }
        let h = |id: &str| prober.health(id).unwrap();
        assert_eq!((h("h2").mtu.verified, h("h2").tunnel.mtu.verified), (Some(9000), Some(9000)));
        assert_eq!(h("h3").mtu.verified, Some(9000), "the underlay's echoes pass");
        let found = h("h3").tunnel.mtu.verified.expect("the tunnel's search ended");
        assert!((1450 - PMTU_STEP..=1450).contains(&found), "found {found}");
        assert!(!h("h3").unreachable(MISSED_FOR_DOWN), "small probes through the tunnel still answer");
        // Without a probe device nothing is probed through it.
        dp.peers.lock().unwrap().probe_device = false;
        let sent = h("h2").tunnel.sent;
        prober.round(sockets.as_mut(), 7, 21, Duration::from_millis(20));
        assert_eq!(h("h2").tunnel.sent, sent);
    }

    #[test]
    fn a_size_the_kernel_refuses_as_too_big_counts_as_not_carried() {
        assert!(sent_or_too_big(Ok(()), "h2", 1500));
        assert!(sent_or_too_big(Err(std::io::Error::from_raw_os_error(nix::libc::EMSGSIZE)), "h2", 9000));
        assert!(!sent_or_too_big(Err(std::io::Error::from_raw_os_error(nix::libc::ENETUNREACH)), "h2", 1500));
    }
}
