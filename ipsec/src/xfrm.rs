//! The kernel IPsec state an encrypted network needs, as values: which SAs
//! and policies a host should have ([`plan`]), what to change to get there
//! from what it has ([`diff`]), and the xfrm netlink messages that do it
//! (built here, sent by the agent's one executor).
//!
//! Selection: an encrypted network's VXLAN device uses a UDP port of its
//! own, so its packets are told apart in xfrm terms — a policy per peer and
//! direction matching `udp dport <port>` between the two VTEPs, with an ESP
//! transport template. The "in" policy makes the kernel drop cleartext sent
//! to that port; an "out" policy without a usable SA stops traffic
//! instead of letting it leave in the clear.
//!
//! Transport: ESP (IP protocol 50), or ESP in UDP (RFC 3948, the kernel's
//! `espinudp`) towards a peer where either host asks for it, for paths
//! that filter protocol 50 (most clouds): the same SAs, keys and
//! policies, each SA with an encapsulation template (source and
//! destination port the cluster's ESP-in-UDP port); the receiving host
//! decapsulates on a UDP socket marked for it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use netlink_packet_xfrm::{
    Address, AlgAead, EncapTmpl, Id, LifetimeConfig, Selector, UserPolicyId, UserPolicyInfo, UserSaId, UserSaInfo,
    UserTemplate, XfrmAttrs, XfrmMessage,
    constants::{
        AF_INET, AF_INET6, IPPROTO_ESP, UDP_ENCAP_ESPINUDP, XFRM_INF, XFRM_MODE_TRANSPORT, XFRM_POLICY_ALLOW,
        XFRM_POLICY_IN, XFRM_POLICY_OUT, XFRM_STATE_ESN,
    },
    nlas::{ReplayEsn, XFRM_ALG_AEAD_NAME_LEN},
    policy::{DelGetMessage as PolicyDelGet, ModifyMessage as PolicyModify},
    state::{DelGetMessage as StateDelGet, ModifyMessage as StateModify},
};

use crate::keys::{self, SA_KEY_LEN, SaMaterial};
use crate::rotation::KeyRing;

pub const AEAD: &str = "rfc4106(gcm(aes))";
pub const ICV_BITS: u32 = 128;
/// Replay window of inbound SAs, in packets.
pub const REPLAY_WINDOW: u32 = 128;
/// Bytes ESP in transport mode with AES-GCM adds to a packet, at most:
/// SPI + sequence (8), IV (8), padding (≤3) + pad length + next header (2),
/// ICV (16) — rounded up.
pub const ESP_OVERHEAD: u32 = 40;
/// ESP in UDP adds a UDP header (8 bytes) to ESP's overhead.
pub const ESP_IN_UDP_OVERHEAD: u32 = ESP_OVERHEAD + 8;
/// The ESP-in-UDP port (RFC 3948's, IKE's NAT traversal port) unless the
/// cluster says otherwise.
pub const ESP_IN_UDP_PORT: u16 = 4500;
/// Request ids of Trellis's SAs and policies carry this prefix (the low 16
/// bits are the network's port), so the agent never touches others'.
pub const REQID_BASE: u32 = 0x7472_0000;
const UDP: u8 = 17;
const PRIORITY: u32 = 100;

pub fn reqid(port: u16) -> u32 {
    REQID_BASE | port as u32
}

pub fn is_ours(reqid: u32) -> bool {
    reqid & 0xffff_0000 == REQID_BASE
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dir {
    In,
    Out,
}

/// An SA as the kernel keys it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SaId {
    pub dst: IpAddr,
    pub spi: u32,
}

/// One SA: the packets from `src` to `dst`'s `port` in `epoch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaSpec {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub port: u16,
    pub epoch: u32,
    pub dir: Dir,
    pub material: SaMaterial,
    /// The outbound sequence number it starts from: 0 for a new SA; one
    /// re-created after it vanished continues past what the peer has seen
    /// (the peer's anti-replay window would drop a restart from 0).
    pub start_seq: u64,
    /// ESP in UDP on this port (both ends'), or plain ESP.
    pub encap: Option<u16>,
}

impl SaSpec {
    pub fn id(&self) -> SaId {
        SaId { dst: self.dst, spi: self.material.spi }
    }
}

/// A policy: packets between two VTEPs to an encrypted network's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyId {
    pub dir: Dir,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub port: u16,
}

/// The xfrm state a host should have, or has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XfrmState {
    pub sas: BTreeMap<SaId, SaSpec>,
    pub policies: BTreeSet<PolicyId>,
}

/// An SA of Trellis's as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObservedSa {
    pub src: IpAddr,
    pub reqid: u32,
    /// Packets sent on it (outbound SAs).
    pub oseq: u64,
    /// Its ESP-in-UDP port, if it is encapsulated.
    pub encap: Option<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObservedXfrm {
    pub sas: BTreeMap<SaId, ObservedSa>,
    pub policies: BTreeSet<PolicyId>,
}

/// One change to the kernel's xfrm state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XfrmOp {
    AddSa(Box<SaSpec>),
    DelSa(SaId),
    AddPolicy(PolicyId),
    DelPolicy(PolicyId),
}

/// An encrypted network as a host sees it: its port, its keys, and the
/// underlay addresses of the other hosts it shares tunnels with.
#[derive(Clone, Debug)]
pub struct EncryptedNet<'a> {
    pub port: u16,
    pub ring: &'a KeyRing,
    pub peers: BTreeSet<IpAddr>,
    /// The peers whose SAs carry ESP in UDP on this port (`None`: none).
    pub udp: Option<(u16, BTreeSet<IpAddr>)>,
}

/// What host `me` should have: per network, one "in" policy for its port
/// from anywhere (cleartext from any source is refused, not only from
/// peers); per network and peer, an inbound SA for every epoch in the ring,
/// an outbound SA for the epoch senders use, and an "out" policy.
pub fn plan(me: IpAddr, nets: &[EncryptedNet<'_>]) -> XfrmState {
    let mut s = XfrmState::default();
    for n in nets {
        s.policies.insert(PolicyId { dir: Dir::In, src: unspecified(me), dst: me, port: n.port });
        for &peer in n.peers.iter().filter(|p| **p != me) {
            let encap = n.udp.as_ref().and_then(|(port, peers)| peers.contains(&peer).then_some(*port));
            for k in &n.ring.keys {
                let m = keys::derive(&k.secret, k.epoch, peer, me, n.port);
                let sa = SaSpec {
                    src: peer,
                    dst: me,
                    port: n.port,
                    epoch: k.epoch,
                    dir: Dir::In,
                    material: m,
                    start_seq: 0,
                    encap,
                };
                s.sas.insert(sa.id(), sa);
            }
            if let Some(secret) = n.ring.key(n.ring.tx) {
                let m = keys::derive(secret, n.ring.tx, me, peer, n.port);
                let sa = SaSpec {
                    src: me,
                    dst: peer,
                    port: n.port,
                    epoch: n.ring.tx,
                    dir: Dir::Out,
                    material: m,
                    start_seq: 0,
                    encap,
                };
                s.sas.insert(sa.id(), sa);
            }
            s.policies.insert(PolicyId { dir: Dir::Out, src: me, dst: peer, port: n.port });
        }
    }
    s
}

/// The changes that take `have` to `want`, in two parts: `first` (SAs,
/// inbound before outbound so a peer's first packet finds its SA, then the
/// policies that use them) goes before any tunnel entry is added; `last`
/// (stale policies, then stale SAs) goes after stale tunnel entries are
/// removed — so no packet to a peer ever leaves without its policy, and a
/// rotation adds the new outbound SA before the old one goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XfrmDiff {
    pub first: Vec<XfrmOp>,
    pub last: Vec<XfrmOp>,
}

pub fn diff(want: &XfrmState, have: &ObservedXfrm) -> XfrmDiff {
    let mut d = XfrmDiff::default();
    // (A change of transport, ESP to ESP in UDP or back, makes the SA
    // again.)
    let missing = |sa: &&SaSpec| {
        have.sas.get(&sa.id()).is_none_or(|o| o.src != sa.src || !is_ours(o.reqid) || o.encap != sa.encap)
    };
    let (inbound, outbound): (Vec<&SaSpec>, Vec<&SaSpec>) =
        want.sas.values().filter(missing).partition(|sa| sa.dir == Dir::In);
    // An SA under the same id that is not the one wanted goes first.
    for sa in inbound.iter().chain(outbound.iter()) {
        if have.sas.contains_key(&sa.id()) {
            d.first.push(XfrmOp::DelSa(sa.id()));
        }
        d.first.push(XfrmOp::AddSa(Box::new((*sa).clone())));
    }
    d.first.extend(want.policies.difference(&have.policies).map(|p| XfrmOp::AddPolicy(*p)));
    d.last.extend(have.policies.difference(&want.policies).map(|p| XfrmOp::DelPolicy(*p)));
    d.last.extend(have.sas.keys().filter(|id| !want.sas.contains_key(id)).map(|id| XfrmOp::DelSa(*id)));
    d
}

impl XfrmDiff {
    pub fn is_empty(&self) -> bool {
        self.first.is_empty() && self.last.is_empty()
    }

    /// Both parts in order (what a host with no tunnels would do).
    pub fn all(&self) -> Vec<XfrmOp> {
        self.first.iter().chain(self.last.iter()).cloned().collect()
    }
}

fn family(ip: IpAddr) -> u16 {
    if ip.is_ipv4() { AF_INET } else { AF_INET6 }
}

/// The "any" address of `ip`'s family.
fn unspecified(ip: IpAddr) -> IpAddr {
    if ip.is_ipv4() { IpAddr::from([0u8; 4]) } else { IpAddr::from([0u8; 16]) }
}

/// A host's prefix length, or 0 for the "any" address.
fn host_prefix(ip: IpAddr) -> u8 {
    match ip {
        _ if ip.is_unspecified() => 0,
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn selector(src: IpAddr, dst: IpAddr, port: u16) -> Selector {
    Selector {
        daddr: Address::from_ip(&dst),
        saddr: Address::from_ip(&src),
        dport: port,
        dport_mask: 0xffff,
        family: family(dst),
        prefixlen_d: host_prefix(dst),
        prefixlen_s: host_prefix(src),
        proto: UDP,
        ..Default::default()
    }
}

fn forever() -> LifetimeConfig {
    LifetimeConfig {
        soft_byte_limit: XFRM_INF,
        hard_byte_limit: XFRM_INF,
        soft_packet_limit: XFRM_INF,
        hard_packet_limit: XFRM_INF,
        ..Default::default()
    }
}

/// `XFRM_MSG_NEWSA`: ESP transport, AES-GCM, 64-bit extended sequence
/// numbers, the SA's own selector (so an inbound SA only ever carries its
/// network's port between its two hosts).
pub fn add_sa(sa: &SaSpec) -> XfrmMessage {
    let mut name = [0u8; XFRM_ALG_AEAD_NAME_LEN];
    name[..AEAD.len()].copy_from_slice(AEAD.as_bytes());
    let words = REPLAY_WINDOW.div_ceil(32);
    let mut nlas = vec![
        XfrmAttrs::EncryptionAlgAead(AlgAead {
            alg_name: name,
            alg_key_len: (SA_KEY_LEN * 8) as u32,
            alg_icv_len: ICV_BITS,
            alg_key: sa.material.key.to_vec(),
        }),
        XfrmAttrs::ReplayStateEsn(ReplayEsn {
            bmp_len: words,
            replay_window: REPLAY_WINDOW,
            bmp: vec![0; words as usize],
            oseq: sa.start_seq as u32,
            oseq_hi: (sa.start_seq >> 32) as u32,
            ..Default::default()
        }),
    ];
    if let Some(port) = sa.encap {
        nlas.push(XfrmAttrs::EncapsulationTemplate(EncapTmpl {
            encap_type: UDP_ENCAP_ESPINUDP,
            encap_sport: port,
            encap_dport: port,
            encap_oa: Address::default(),
        }));
    }
    XfrmMessage::AddSa(StateModify {
        user_sa_info: UserSaInfo {
            selector: selector(sa.src, sa.dst, sa.port),
            id: Id { daddr: Address::from_ip(&sa.dst), spi: sa.material.spi, proto: IPPROTO_ESP },
            saddr: Address::from_ip(&sa.src),
            lifetime_cfg: forever(),
            reqid: reqid(sa.port),
            family: family(sa.dst),
            mode: XFRM_MODE_TRANSPORT,
            flags: XFRM_STATE_ESN,
            ..Default::default()
        },
        nlas,
    })
}

pub fn del_sa(id: SaId) -> XfrmMessage {
    XfrmMessage::DeleteSa(StateDelGet {
        user_sa_id: UserSaId {
            daddr: Address::from_ip(&id.dst),
            spi: id.spi,
            family: family(id.dst),
            proto: IPPROTO_ESP,
        },
        nlas: vec![],
    })
}

fn direction(d: Dir) -> u8 {
    match d {
        Dir::In => XFRM_POLICY_IN,
        Dir::Out => XFRM_POLICY_OUT,
    }
}

/// `XFRM_MSG_NEWPOLICY` with an ESP transport template (required, any
/// algorithm) naming the network's request id.
pub fn add_policy(p: &PolicyId) -> XfrmMessage {
    XfrmMessage::AddPolicy(PolicyModify {
        user_policy_info: UserPolicyInfo {
            selector: selector(p.src, p.dst, p.port),
            lifetime_cfg: forever(),
            priority: PRIORITY,
            direction: direction(p.dir),
            action: XFRM_POLICY_ALLOW,
            ..Default::default()
        },
        nlas: vec![XfrmAttrs::Template(vec![UserTemplate {
            id: Id { proto: IPPROTO_ESP, ..Default::default() },
            family: family(p.dst),
            reqid: reqid(p.port),
            mode: XFRM_MODE_TRANSPORT,
            aalgos: !0,
            ealgos: !0,
            calgos: !0,
            ..Default::default()
        }])],
    })
}

pub fn del_policy(p: &PolicyId) -> XfrmMessage {
    XfrmMessage::DeletePolicy(PolicyDelGet {
        user_policy_id: UserPolicyId {
            selector: selector(p.src, p.dst, p.port),
            index: 0,
            direction: direction(p.dir),
        },
        nlas: vec![],
    })
}

fn ip_of(a: &Address, family: u16) -> IpAddr {
    if family == AF_INET6 { IpAddr::V6(a.to_ipv6()) } else { IpAddr::V4(a.to_ipv4()) }
}

/// One message of an SA dump, if it is one of Trellis's.
pub fn observed_sa(msg: &XfrmMessage) -> Option<(SaId, ObservedSa)> {
    let XfrmMessage::AddSa(m) = msg else { return None };
    let info = &m.user_sa_info;
    if info.id.proto != IPPROTO_ESP || !is_ours(info.reqid) {
        return None;
    }
    let oseq = m.nlas.iter().find_map(|a| match a {
        XfrmAttrs::ReplayStateEsn(r) => Some(((r.oseq_hi as u64) << 32) | r.oseq as u64),
        XfrmAttrs::ReplayState(r) => Some(r.oseq as u64),
        _ => None,
    });
    let encap = m.nlas.iter().find_map(|a| match a {
        XfrmAttrs::EncapsulationTemplate(t) if t.encap_type == UDP_ENCAP_ESPINUDP => Some(t.encap_dport),
        _ => None,
    });
    let id = SaId { dst: ip_of(&info.id.daddr, info.family), spi: info.id.spi };
    Some((id, ObservedSa { src: ip_of(&info.saddr, info.family), reqid: info.reqid, oseq: oseq.unwrap_or(0), encap }))
}

/// One message of a policy dump, if it is one of Trellis's.
pub fn observed_policy(msg: &XfrmMessage) -> Option<PolicyId> {
    let XfrmMessage::AddPolicy(m) = msg else { return None };
    let info = &m.user_policy_info;
    let ours = m.nlas.iter().any(|a| matches!(a, XfrmAttrs::Template(t) if t.iter().any(|t| is_ours(t.reqid))));
    let dir = match info.direction {
        XFRM_POLICY_IN => Dir::In,
        XFRM_POLICY_OUT => Dir::Out,
        _ => return None,
    };
    ours.then(|| PolicyId {
        dir,
        src: ip_of(&info.selector.saddr, info.selector.family),
        dst: ip_of(&info.selector.daddr, info.selector.family),
        port: info.selector.dport,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Secret;
    use crate::rotation::{Reason, Step};
    use netlink_packet_core::{Emitable, ParseableParametrized};
    use std::net::Ipv4Addr;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 168, 0, last))
    }

    fn ring() -> KeyRing {
        KeyRing::new(Secret::from_bytes([3; 32]), 0)
    }

    fn observe(s: &XfrmState) -> ObservedXfrm {
        ObservedXfrm {
            sas: s
                .sas
                .iter()
                .map(|(id, sa)| (*id, ObservedSa { src: sa.src, reqid: reqid(sa.port), oseq: 0, encap: sa.encap }))
                .collect(),
            policies: s.policies.clone(),
        }
    }

    /// Emit a message as the kernel would see it and parse it back the way
    /// a dump is parsed.
    fn round_trip(msg: &XfrmMessage) -> XfrmMessage {
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        XfrmMessage::parse_with_param(&buf, msg.message_type()).unwrap()
    }

    #[test]
    fn a_host_gets_sas_and_policies_for_every_peer_of_every_encrypted_network() {
        let r = ring();
        let nets = [EncryptedNet { port: 4790, ring: &r, peers: [ip(1), ip(2), ip(3)].into(), udp: None }];
        let s = plan(ip(1), &nets);
        // Two peers: one inbound and one outbound SA each and an out
        // policy each; one in policy for the port, from anywhere.
        assert_eq!(s.sas.len(), 4);
        assert_eq!(s.policies.len(), 3);
        let out: Vec<_> = s.sas.values().filter(|sa| sa.dir == Dir::Out).collect();
        assert!(out.iter().all(|sa| sa.src == ip(1) && sa.epoch == 1 && sa.port == 4790));
        // What host 2 sends to host 1 is what host 1 receives from host 2.
        let other = plan(ip(2), &nets);
        let sent = other.sas.values().find(|sa| sa.dir == Dir::Out && sa.dst == ip(1)).unwrap();
        let got = s.sas.values().find(|sa| sa.dir == Dir::In && sa.src == ip(2)).unwrap();
        assert_eq!(sent.material, got.material);
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        assert!(s.policies.contains(&PolicyId { dir: Dir::In, src: any, dst: ip(1), port: 4790 }));
        assert!(s.policies.contains(&PolicyId { dir: Dir::Out, src: ip(1), dst: ip(3), port: 4790 }));
        // With no peer yet, the port is already closed to cleartext.
        let alone = plan(ip(1), &[EncryptedNet { port: 4790, ring: &r, peers: [].into(), udp: None }]);
        assert!(alone.sas.is_empty());
        assert_eq!(
            alone.policies.iter().collect::<Vec<_>>(),
            [&PolicyId { dir: Dir::In, src: any, dst: ip(1), port: 4790 }]
        );
        let XfrmMessage::AddPolicy(m) = add_policy(&PolicyId { dir: Dir::In, src: any, dst: ip(1), port: 4790 }) else {
            panic!()
        };
        assert_eq!((m.user_policy_info.selector.prefixlen_s, m.user_policy_info.selector.prefixlen_d), (0, 32));
    }

    #[test]
    fn a_rotation_adds_inbound_then_swaps_outbound_then_drops_the_old() {
        let r1 = ring();
        let r2 = r1.apply(Step::Rotate { epoch: 2, reason: Reason::OnDemand }, || Secret::from_bytes([4; 32]), 1);
        let r3 = r2.apply(Step::Switch { to: 2 }, || unreachable!(), 2);
        let r4 = r3.apply(Step::Retire { epoch: 1 }, || unreachable!(), 3);
        let at = |r: &KeyRing| plan(ip(1), &[EncryptedNet { port: 4790, ring: r, peers: [ip(2)].into(), udp: None }]);
        let (s1, s2, s3, s4) = (at(&r1), at(&r2), at(&r3), at(&r4));
        // Rotate: only a new inbound SA.
        let ops = diff(&s2, &observe(&s1)).all();
        assert!(matches!(&ops[..], [XfrmOp::AddSa(sa)] if sa.dir == Dir::In && sa.epoch == 2), "{ops:?}");
        // Switch: the new outbound SA is added before the old one goes.
        let ops = diff(&s3, &observe(&s2));
        assert!(matches!(&ops.last[..], [XfrmOp::DelSa(_)]), "the old outbound SA goes last: {ops:?}");
        let ops = ops.all();
        assert!(
            matches!(&ops[..], [XfrmOp::AddSa(sa), XfrmOp::DelSa(old)] if sa.dir == Dir::Out && sa.epoch == 2 && old.dst == ip(2)),
            "{ops:?}"
        );
        // Retire: the old inbound SA goes; policies never change.
        let ops = diff(&s4, &observe(&s3)).all();
        assert!(matches!(&ops[..], [XfrmOp::DelSa(old)] if old.dst == ip(1)), "{ops:?}");
        assert_eq!(s1.policies, s4.policies);
    }

    #[test]
    fn diff_repairs_a_missing_sa_and_removes_what_is_not_wanted() {
        let r = ring();
        let want = plan(ip(1), &[EncryptedNet { port: 4790, ring: &r, peers: [ip(2)].into(), udp: None }]);
        assert!(diff(&want, &observe(&want)).is_empty());
        let mut have = observe(&want);
        let gone = *have.sas.keys().next().unwrap();
        have.sas.remove(&gone);
        let stale = PolicyId { dir: Dir::Out, src: ip(1), dst: ip(9), port: 4790 };
        have.policies.insert(stale);
        have.sas.insert(
            SaId { dst: ip(9), spi: 0x8000_1234 },
            ObservedSa { src: ip(1), reqid: reqid(4790), oseq: 5, encap: None },
        );
        let d = diff(&want, &have);
        assert_eq!((d.first.len(), d.last.len()), (1, 2));
        let ops = d.all();
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert!(matches!(&ops[0], XfrmOp::AddSa(sa) if sa.id() == gone));
        assert_eq!(ops[1], XfrmOp::DelPolicy(stale));
        assert_eq!(ops[2], XfrmOp::DelSa(SaId { dst: ip(9), spi: 0x8000_1234 }));
        // An SA under a wanted id but from another source is replaced.
        let mut have = observe(&want);
        have.sas.get_mut(&gone).unwrap().src = ip(7);
        assert_eq!(
            diff(&want, &have).first,
            vec![XfrmOp::DelSa(gone), XfrmOp::AddSa(Box::new(want.sas[&gone].clone()))]
        );
    }

    #[test]
    fn sa_messages_carry_esp_transport_gcm_and_esn() {
        let r = ring();
        let s = plan(ip(1), &[EncryptedNet { port: 4790, ring: &r, peers: [ip(2)].into(), udp: None }]);
        let sa = s.sas.values().find(|sa| sa.dir == Dir::Out).unwrap();
        let msg = add_sa(sa);
        let XfrmMessage::AddSa(m) = &msg else { panic!("{msg:?}") };
        let info = &m.user_sa_info;
        assert_eq!((info.mode, info.flags & XFRM_STATE_ESN, info.id.proto), (XFRM_MODE_TRANSPORT, XFRM_STATE_ESN, 50));
        assert_eq!((info.selector.dport, info.selector.proto, info.selector.prefixlen_d), (4790, 17, 32));
        assert_eq!((info.id.spi, info.reqid), (sa.material.spi, reqid(4790)));
        let aead = m.nlas.iter().find_map(|a| if let XfrmAttrs::EncryptionAlgAead(a) = a { Some(a) } else { None });
        let aead = aead.unwrap();
        assert_eq!(&aead.alg_name[..AEAD.len()], AEAD.as_bytes());
        assert_eq!((aead.alg_key_len, aead.alg_icv_len, aead.alg_key.len()), (288, 128, 36));
        assert!(
            m.nlas
                .iter()
                .any(|a| matches!(a, XfrmAttrs::ReplayStateEsn(r) if r.replay_window == 128 && r.bmp.len() == 4))
        );
        // The wire form parses back to an SA the observer recognises.
        let back = round_trip(&msg);
        assert_eq!(back, msg);
        assert_eq!(
            observed_sa(&back),
            Some((sa.id(), ObservedSa { src: ip(1), reqid: reqid(4790), oseq: 0, encap: None }))
        );
        let XfrmMessage::DeleteSa(d) = del_sa(sa.id()) else { panic!() };
        assert_eq!(
            (d.user_sa_id.spi, d.user_sa_id.proto, d.user_sa_id.daddr),
            (sa.material.spi, 50, Address::from_ip(&ip(2)))
        );
    }

    #[test]
    fn policy_messages_select_the_networks_port_between_two_vteps() {
        let p = PolicyId { dir: Dir::In, src: ip(2), dst: ip(1), port: 4791 };
        let msg = add_policy(&p);
        let XfrmMessage::AddPolicy(m) = &msg else { panic!() };
        assert_eq!(m.user_policy_info.direction, XFRM_POLICY_IN);
        assert_eq!(m.user_policy_info.selector.saddr, Address::from_ip(&ip(2)));
        let XfrmAttrs::Template(t) = &m.nlas[0] else { panic!() };
        assert_eq!((t[0].id.proto, t[0].mode, t[0].reqid, t[0].optional), (50, XFRM_MODE_TRANSPORT, reqid(4791), 0));
        assert_eq!(observed_policy(&round_trip(&msg)), Some(p));
        let XfrmMessage::DeletePolicy(d) = del_policy(&p) else { panic!() };
        assert_eq!((d.user_policy_id.direction, d.user_policy_id.selector.dport), (XFRM_POLICY_IN, 4791));
        // Others' policies are not ours.
        let mut foreign = m.clone();
        foreign.nlas = vec![XfrmAttrs::Template(vec![UserTemplate { reqid: 7, ..Default::default() }])];
        assert_eq!(observed_policy(&XfrmMessage::AddPolicy(foreign)), None);
        assert!(is_ours(reqid(4789)) && !is_ours(7));
    }

    #[test]
    fn esp_in_udp_towards_the_peers_that_need_it_with_the_same_keys() {
        let r = ring();
        let udp = Some((ESP_IN_UDP_PORT, [ip(3)].into()));
        let s = plan(ip(1), &[EncryptedNet { port: 4790, ring: &r, peers: [ip(2), ip(3)].into(), udp }]);
        let plain = plan(ip(1), &[EncryptedNet { port: 4790, ring: &r, peers: [ip(2), ip(3)].into(), udp: None }]);
        for sa in s.sas.values() {
            let to_3 = sa.src == ip(3) || sa.dst == ip(3);
            assert_eq!(sa.encap, to_3.then_some(ESP_IN_UDP_PORT), "{sa:?}");
            assert_eq!(sa.material, plain.sas[&sa.id()].material, "the same keys and SPIs either way");
        }
        assert_eq!(s.policies, plain.policies, "the same policies");
        // The message carries the template; a dump reads it back.
        let sa = s.sas.values().find(|sa| sa.dst == ip(3)).unwrap();
        let back = round_trip(&add_sa(sa));
        let XfrmMessage::AddSa(m) = &back else { panic!("{back:?}") };
        let t = m.nlas.iter().find_map(|a| if let XfrmAttrs::EncapsulationTemplate(t) = a { Some(t) } else { None });
        let t = t.expect("an encapsulation template");
        assert_eq!((t.encap_type, t.encap_sport, t.encap_dport), (UDP_ENCAP_ESPINUDP, 4500, 4500));
        assert_eq!(observed_sa(&back).unwrap().1.encap, Some(4500));
        // Switching a peer's transport makes its SAs again, nothing else.
        let d = diff(&s, &observe(&plain));
        let remade: BTreeSet<SaId> =
            d.first.iter().filter_map(|op| if let XfrmOp::AddSa(sa) = op { Some(sa.id()) } else { None }).collect();
        let to_3: BTreeSet<SaId> = s.sas.values().filter(|sa| sa.encap.is_some()).map(|sa| sa.id()).collect();
        assert_eq!(remade, to_3);
        assert!(d.last.is_empty(), "{d:?}");
    }
}
