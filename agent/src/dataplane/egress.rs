//! Egress and isolation rules in nftables, built as plain values.
//!
//! One table, `inet trellis`, in the agent's host namespace:
//! * `postrouting` (nat): traffic of a non-internal network leaving through
//!   anything but its own bridge is masqueraded.
//! * `forward` (filter): an internal network forwards nothing in or out;
//!   no network forwards into another Trellis network.
//! * `input` (filter): an internal network's endpoints reach only their
//!   gateway address on the host.
//! * `prerouting` (nat), with the agent's DNS on: an endpoint's DNS query
//!   to any other resolver is redirected to its gateway, where Trellis
//!   answers (names resolve even where an engine wrote its own resolver;
//!   Docker's embedded DNS forwards to the host's resolvers from inside the
//!   container). Connection tracking puts the reply's source back.
//! * `raw_prerouting` / `raw_output` (filter, before connection tracking),
//!   when the eBPF program does that redirect instead (nothing to undo): DNS
//!   over UDP to and from each gateway is not tracked. A tracked query costs
//!   a conntrack entry per client port, and parallel A/AAAA queries from one
//!   socket race to insert theirs — the lost insert is the 5 s DNS delay of
//!   kubernetes#56903.
//!
//! * Published ports (`docker run -p`), IPv4, as two maps whatever their
//!   number (one lookup per packet): `published` keyed by `proto . port`
//!   (every host address) and `published_addr` keyed by `address . proto .
//!   port` (`-p IP:PORT:PORT`), both to `endpoint address . port`. They are
//!   DNATed in `prerouting` (from outside, and from containers: hairpin)
//!   and `output` (from the host itself, 127.0.0.1 included) when the
//!   destination is a local address; `forward` accepts what was DNATed
//!   (across networks too, but never out of an internal one);
//!   `postrouting` masquerades only what needs it for the reply to come
//!   back through the host: hairpin (a Trellis bridge in, a Trellis bridge
//!   out) and 127.0.0.1 (which a container cannot answer). Traffic from
//!   outside keeps its source address. The loopback case also needs
//!   `route_localnet` on the bridges of the networks that publish
//!   ([`EgressRules::localnet`]).
//!
//! * The routing mesh from the host itself: 127.0.0.1 on a mesh port is an
//!   element of `published_ip_*` to the host's mesh address (its underlay
//!   address, where the mesh's program on `lo` takes it), with the source
//!   NATed to that address in `postrouting` ([`EgressRules::mesh_loopback`]).
//!
//! * The routing mesh through nftables (hosts without the eBPF datapath,
//!   services with a backend on such a host, and on every host what its
//!   containers send to its own addresses: hairpin) ([`MeshRule`]): one
//!   rule per hook whatever the number of ports, an anonymous verdict map
//!   keyed `meta l4proto . th dport` jumping to one chain per (service,
//!   protocol, target port), whose rules DNAT to one of the service's N
//!   ready backends at random (rule i with `numgen random mod N-i == 0`:
//!   each backend with probability 1/N; only a connection's first packet
//!   crosses them, and no set per service: sets are slow to make). In `prerouting` for local
//!   destinations (from outside, and from containers; only from the
//!   containers, `iifname trb-*`, for ports the eBPF mesh publishes) and
//!   `output` (the host itself, 127.0.0.1 included); `forward` accepts what
//!   was DNATed; `postrouting` SNATs to the host's own address on the
//!   backend's network ([`MeshSnat`], by output bridge: a map), first of
//!   its rules, for connections to a mesh port (`ct original proto-dst` in
//!   `mesh_tcp` / `mesh_udp`), so that a backend on any host replies to
//!   this one over the network's VXLAN. A second table, `bridge trellis`,
//!   gives what the host sends into a network's VXLAN device the host's
//!   mesh MAC as its source (the bridge's own MAC, the gateway's, is every
//!   host's: the bridges at the other end would warn of "own address as
//!   source address" on every packet). Rules from the same values, and
//!   part of the same fingerprint.
//!
//! The whole table is replaced atomically when it differs. Every rule
//! carries the fingerprint of the desired rules as its comment, so the
//! reconciler can tell a missing or altered rule from one glance at the
//! installed table.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{Chain, Map, NfListObject, Nftables, Rule, SetType, SetTypeValue, Table};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::model::{BRIDGE_PREFIX, Mac, Proto, VXLAN_PREFIX};

pub const TABLE: &str = "trellis";

/// One network as the egress rules need it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EgressNet {
    pub bridge: String,
    /// Its IPv4 subnet and gateway (none on an IPv6-only network).
    pub subnet: Option<IpNet>,
    pub gateway: Option<IpAddr>,
    pub internal: bool,
    /// Its IPv6 subnet (dual-stack or IPv6-only): masqueraded as the IPv4
    /// one.
    pub subnet6: Option<IpNet>,
    /// Its IPv6 gateway: DNS over IPv6 to other resolvers goes there.
    pub gateway6: Option<IpAddr>,
}

/// A host port published to an endpoint of this host (IPv4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PublishedRule {
    pub proto: Proto,
    /// `None`: every address of the host.
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    /// The endpoint's address and port.
    pub addr: Ipv4Addr,
    pub port: u16,
}

/// A port of a service published on the routing mesh through nftables on
/// this host.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MeshRule {
    pub proto: Proto,
    pub host_port: u16,
    /// The service it goes to: the ports of one service with one target
    /// share a chain.
    pub service: String,
    /// The backends' port.
    pub target: u16,
    /// The service's ready backends (sorted): each new connection goes to
    /// one of them at random. None: the port is left to the host, where
    /// nothing listens (TCP reset, ICMP port unreachable).
    pub backends: Vec<Ipv4Addr>,
    /// Only what this host's containers send to its addresses (hairpin):
    /// the eBPF mesh takes the rest of the port.
    pub hairpin_only: bool,
}

impl MeshRule {
    /// The chain of its service and target port.
    pub fn chain(&self) -> String {
        format!("mesh_{}_{}_{}", self.service, self.proto.as_str(), self.target)
    }
}

/// This host's mesh address on a network: what connections through the
/// network's bridge are SNATed to, and the MAC of what the host sends into
/// the network's VXLAN device.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MeshSnat {
    pub bridge: String,
    pub vxlan: String,
    /// The bridge's own MAC (the gateway's): what the host's frames leave
    /// with, and only those get the mesh MAC (the eBPF mesh's frames,
    /// redirected into the bridge, keep theirs).
    pub gateway_mac: Mac,
    pub addr: Ipv4Addr,
    pub mac: Mac,
}

/// A rule as (chain, statements).
type ChainRule = (String, Vec<Statement<'static>>);

/// The sets of mesh ports the SNAT looks the original destination port up
/// in, by protocol (nft cannot concatenate `ct original proto-dst`).
const MESH_PORT_SETS: [(Proto, &str); 2] = [(Proto::Tcp, "mesh_tcp"), (Proto::Udp, "mesh_udp")];
/// Output bridge → the host's mesh address on it.
const MESH_SNAT_MAP: &str = "mesh_snat";
/// VXLAN device . the bridge's MAC → the host's mesh MAC on its network
/// (`bridge trellis`).
const MESH_SRC_MAP: &str = "mesh_src";

/// The maps of published ports, as (to address, to port): nft 1.0.6's
/// JSON parser takes no concatenated map data (`ipv4_addr .
/// inet_service`), so the endpoint's address and port are two lookups of
/// the same key.
type Maps = (&'static str, &'static str);
/// Keyed by `proto . port`: on every address of the host.
pub const MAPS_ANY: Maps = ("published_addr", "published_port");
/// Keyed by `address . proto . port`: on one address of the host.
pub const MAPS_ADDR: Maps = ("published_ip_addr", "published_ip_port");

/// The desired egress rules of a host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressRules {
    pub nets: Vec<EgressNet>,
    /// Ports published to this host's endpoints (sorted).
    pub published: Vec<PublishedRule>,
    /// Bridges whose `route_localnet` is set (to 1) when the rules are
    /// applied: those of networks with published ports, so that a
    /// connection from the host to 127.0.0.1 can be DNATed out of them.
    /// Written like [`EgressRules::forwarding`], never turned off; part of
    /// the fingerprint.
    pub localnet: Vec<String>,
    /// The routing mesh's address on this host (its underlay address),
    /// while it publishes ports: what the host sends to 127.0.0.1 on a mesh
    /// port is DNATed to it (a `published_ip_*` element each) and its
    /// source NATed to it, so that it takes the loopback to the mesh's
    /// program and its replies come back to the host.
    pub mesh_loopback: Option<Ipv4Addr>,
    /// Mesh ports published through nftables (sorted).
    pub mesh: Vec<MeshRule>,
    /// This host's mesh addresses, by network (sorted).
    pub mesh_snat: Vec<MeshSnat>,
    /// Redirect endpoints' DNS queries to their gateway.
    pub dns_intercept: bool,
    /// Keep DNS over UDP to and from the gateways out of connection
    /// tracking (never with `dns_intercept`, whose NAT needs it).
    pub dns_notrack: bool,
    /// Turn IPv4 forwarding on (`/proc/sys/net/ipv4/ip_forward = 1`) right
    /// after the table is in: the host routes between the networks'
    /// bridges and the uplink, which the masquerade rules assume. Never
    /// turned off. It is a host-wide setting, not a rule: not in the
    /// [`EgressRules::fingerprint`], written whenever the rules are
    /// applied, and a failure to write it fails the apply.
    pub forwarding: bool,
}

/// 64-bit FNV-1a: a stable fingerprint, not a security measure.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

fn s(v: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(v.into()))
}
fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}
fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: Cow::Borrowed(protocol),
        field: Cow::Borrowed(field),
    })))
}
fn prefix(net: &IpNet) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(net.network().to_string())),
        len: net.prefix_len() as u32,
    }))
}
fn m(left: Expression<'static>, op: Operator, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}
fn concat(v: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(v))
}
fn ct_status() -> Expression<'static> {
    Expression::Named(NamedExpression::CT(nftables::expr::CT { key: Cow::Borrowed("status"), family: None, dir: None }))
}
fn fib_daddr_type() -> Expression<'static> {
    Expression::Named(NamedExpression::Fib(nftables::expr::Fib {
        result: nftables::expr::FibResult::Type,
        flags: std::collections::HashSet::from([nftables::expr::FibFlag::Daddr]),
    }))
}
fn family_of(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "ip" } else { "ip6" }
}

impl EgressRules {
    pub fn new(mut nets: Vec<EgressNet>) -> EgressRules {
        nets.sort();
        nets.dedup();
        EgressRules {
            nets,
            published: Vec::new(),
            localnet: Vec::new(),
            mesh_loopback: None,
            mesh: Vec::new(),
            mesh_snat: Vec::new(),
            dns_intercept: false,
            dns_notrack: false,
            forwarding: false,
        }
    }

    /// Add the ports published to this host's endpoints on the network
    /// bridged by `bridge` (sorted, duplicates dropped).
    pub fn publish(&mut self, bridge: &str, rules: impl IntoIterator<Item = PublishedRule>) {
        let before = self.published.len();
        self.published.extend(rules);
        if self.published.len() > before && !self.localnet.iter().any(|b| b == bridge) {
            self.localnet.push(bridge.to_string());
            self.localnet.sort();
        }
        self.published.sort();
        self.published.dedup();
    }

    /// Make 127.0.0.1 on each of `ports` reach the routing mesh on this
    /// host, whose address is `addr` (the host itself is the client then).
    /// Sorted once, whatever the number of ports (once per port cost a
    /// pass O(n² log n): seconds of CPU at 10,000 published services).
    pub fn publish_mesh_loopback(&mut self, addr: Ipv4Addr, ports: impl IntoIterator<Item = (Proto, u16)>) {
        let before = self.published.len();
        self.published.extend(ports.into_iter().map(|(proto, port)| PublishedRule {
            proto,
            host_ip: Some(Ipv4Addr::LOCALHOST),
            host_port: port,
            addr,
            port,
        }));
        if self.published.len() > before {
            self.mesh_loopback = Some(addr);
            self.published.sort();
            self.published.dedup();
        }
    }

    /// Publish `rules` on the mesh through nftables (sorted once).
    pub fn publish_mesh(&mut self, rules: impl IntoIterator<Item = MeshRule>) {
        let before = self.mesh.len();
        self.mesh.extend(rules);
        if self.mesh.len() > before {
            self.mesh.sort();
            self.mesh.dedup();
        }
    }

    /// This host's mesh address on the network bridged by `snat.bridge`.
    pub fn mesh_address(&mut self, snat: MeshSnat) {
        self.mesh_snat.push(snat);
        self.mesh_snat.sort();
        self.mesh_snat.dedup();
    }

    /// Set `route_localnet` on `bridge` with the rules (127.0.0.1 DNATed
    /// out of it).
    pub fn need_localnet(&mut self, bridge: &str) {
        if !self.localnet.iter().any(|b| b == bridge) {
            self.localnet.push(bridge.to_string());
            self.localnet.sort();
        }
    }

    /// The mesh rules that DNAT (those with a backend).
    fn mesh_live(&self) -> impl Iterator<Item = &MeshRule> {
        self.mesh.iter().filter(|r| !r.backends.is_empty())
    }

    /// Does the mesh need its rules (a port with a backend, and an address
    /// to SNAT to)?
    fn mesh_on(&self) -> bool {
        self.mesh_live().next().is_some() && !self.mesh_snat.is_empty()
    }

    /// The mesh's rules, by chain: the SNAT (first of `postrouting`, before
    /// any masquerade), the DNAT lookups, the per-service chains.
    fn mesh_rules(&self) -> (Vec<ChainRule>, Vec<ChainRule>) {
        let (mut first, mut rest) = (Vec::new(), Vec::new());
        if !self.mesh_on() {
            return (first, rest);
        }
        for (proto, set) in MESH_PORT_SETS {
            if !self.mesh_live().any(|r| r.proto == proto) {
                continue;
            }
            first.push((
                "postrouting".to_string(),
                vec![
                    m(ct_status(), Operator::IN, s("dnat")),
                    m(meta(MetaKey::Oifname), Operator::EQ, s(format!("{BRIDGE_PREFIX}*"))),
                    m(meta(MetaKey::L4proto), Operator::EQ, s(proto.as_str())),
                    m(
                        Expression::Named(NamedExpression::CT(nftables::expr::CT {
                            key: Cow::Borrowed("proto-dst"),
                            family: None,
                            dir: Some(nftables::expr::CTDir::Original),
                        })),
                        Operator::EQ,
                        s(format!("@{set}")),
                    ),
                    Statement::SNAT(Some(nftables::stmt::NAT {
                        addr: Some(Expression::Named(NamedExpression::Map(Box::new(nftables::expr::Map {
                            key: meta(MetaKey::Oifname),
                            data: s(format!("@{MESH_SNAT_MAP}")),
                        })))),
                        family: Some(nftables::stmt::NATFamily::IP),
                        port: None,
                        flags: None,
                    })),
                ],
            ));
        }
        let vmap = |hairpin: bool| {
            let items: Vec<nftables::expr::SetItem<'static>> = self
                .mesh_live()
                .filter(|r| r.hairpin_only == hairpin)
                .map(|r| {
                    nftables::expr::SetItem::Mapping(
                        concat(vec![s(r.proto.as_str()), Expression::Number(r.host_port as u32)]),
                        Expression::Verdict(nftables::expr::Verdict::Jump(nftables::stmt::JumpTarget {
                            target: Cow::Owned(r.chain()),
                        })),
                    )
                })
                .collect();
            (!items.is_empty()).then(|| {
                Statement::VerdictMap(nftables::stmt::VerdictMap {
                    key: concat(vec![meta(MetaKey::L4proto), payload("th", "dport")]),
                    data: Expression::Named(NamedExpression::Set(items)),
                })
            })
        };
        let local =
            || vec![m(meta(MetaKey::Nfproto), Operator::EQ, s("ipv4")), m(fib_daddr_type(), Operator::EQ, s("local"))];
        if let Some(v) = vmap(false) {
            // From anywhere (outside, containers), and from the host itself.
            for chain in ["prerouting", "output"] {
                let mut st = local();
                st.push(v.clone());
                rest.push((chain.to_string(), st));
            }
        }
        if let Some(v) = vmap(true) {
            // From the host's containers only: the eBPF mesh has the rest.
            let mut st = vec![m(meta(MetaKey::Iifname), Operator::EQ, s(format!("{BRIDGE_PREFIX}*")))];
            st.extend(local());
            st.push(v);
            rest.push(("prerouting".to_string(), st));
        }
        // One chain per service and target: a backend at random, each
        // with probability 1/N (rule i takes it with 1/(N-i), the last one
        // takes what is left). Rules, not a map of the backends: every set
        // costs the kernel about a millisecond to make (measured here:
        // 10,000 services' two-element maps, anonymous or named, took
        // 6-13 s of kernel time per load of the table; these rules 0.6 s),
        // and nft 1.0.6's JSON cannot type a map keyed by numgen in a
        // concatenation. Only a connection's first packet crosses them.
        let mut chains: Vec<(String, &MeshRule)> = self.mesh_live().map(|r| (r.chain(), r)).collect();
        chains.sort_by(|a, b| a.0.cmp(&b.0));
        chains.dedup_by(|a, b| a.0 == b.0);
        for (chain, r) in chains {
            let n = r.backends.len();
            for (i, b) in r.backends.iter().enumerate() {
                // (a port mapping needs the protocol matched)
                let mut st = vec![m(meta(MetaKey::L4proto), Operator::EQ, s(r.proto.as_str()))];
                if i + 1 < n {
                    st.push(m(
                        Expression::Named(NamedExpression::Numgen(nftables::expr::Numgen {
                            mode: nftables::expr::NgMode::Random,
                            ng_mod: (n - i) as u32,
                            offset: None,
                        })),
                        Operator::EQ,
                        Expression::Number(0),
                    ));
                }
                st.push(Statement::DNAT(Some(nftables::stmt::NAT {
                    addr: Some(s(b.to_string())),
                    family: Some(nftables::stmt::NATFamily::IP),
                    port: Some(Expression::Number(r.target as u32)),
                    flags: None,
                })));
                rest.push((chain.clone(), st));
            }
        }
        (first, rest)
    }

    /// The rules of `bridge trellis`: what the host sends into a VXLAN
    /// device from the bridge's MAC leaves from its mesh MAC on that
    /// network (the frames the eBPF mesh redirects into the bridge pass
    /// this hook too, from their own MAC: untouched).
    fn bridge_rules(&self) -> Vec<Vec<Statement<'static>>> {
        if !self.mesh_on() {
            return Vec::new();
        }
        vec![vec![
            m(meta(MetaKey::Oifname), Operator::EQ, s(format!("{VXLAN_PREFIX}*"))),
            Statement::Mangle(nftables::stmt::Mangle {
                key: payload("ether", "saddr"),
                value: Expression::Named(NamedExpression::Map(Box::new(nftables::expr::Map {
                    key: concat(vec![meta(MetaKey::Oifname), payload("ether", "saddr")]),
                    data: s(format!("@{MESH_SRC_MAP}")),
                }))),
            }),
        ]]
    }

    /// The elements of the mesh's named sets and maps: ports by protocol,
    /// SNAT addresses by bridge, MACs by VXLAN device.
    #[allow(clippy::type_complexity)]
    fn mesh_elements(&self) -> (Vec<(Proto, Vec<u16>)>, Vec<(String, Ipv4Addr)>, Vec<(String, Mac, Mac)>) {
        if !self.mesh_on() {
            return (Vec::new(), Vec::new(), Vec::new());
        }
        let ports = MESH_PORT_SETS
            .iter()
            .map(|(proto, _)| {
                let mut p: Vec<u16> = self.mesh_live().filter(|r| r.proto == *proto).map(|r| r.host_port).collect();
                p.sort();
                p.dedup();
                (*proto, p)
            })
            .filter(|(_, p)| !p.is_empty())
            .collect();
        let snat = self.mesh_snat.iter().map(|m| (m.bridge.clone(), m.addr)).collect();
        let src = self.mesh_snat.iter().map(|m| (m.vxlan.clone(), m.gateway_mac, m.mac)).collect();
        (ports, snat, src)
    }

    /// The elements of the maps: (maps, key, endpoint address, endpoint port).
    fn elements(&self) -> Vec<(Maps, Expression<'static>, Expression<'static>, Expression<'static>)> {
        self.published
            .iter()
            .map(|p| {
                let proto = s(p.proto.as_str());
                let port = Expression::Number(p.host_port as u32);
                let (maps, key) = match p.host_ip {
                    Some(ip) => (MAPS_ADDR, vec![s(ip.to_string()), proto, port]),
                    None => (MAPS_ANY, vec![proto, port]),
                };
                (maps, concat(key), s(p.addr.to_string()), Expression::Number(p.port as u32))
            })
            .collect()
    }

    /// The rules of published ports, by chain.
    fn published_rules(&self, out: &mut Vec<(String, Vec<Statement<'static>>)>) {
        if self.published.is_empty() {
            if self.mesh_on() {
                out.insert(0, ("forward".to_string(), self.forward_dnat()));
            }
            return;
        }
        let l4 = || vec![meta(MetaKey::L4proto), payload("th", "dport")];
        let lookup = |key: &Vec<Expression<'static>>, map: &str| {
            Expression::Named(NamedExpression::Map(Box::new(nftables::expr::Map {
                key: concat(key.clone()),
                data: s(format!("@{map}")),
            })))
        };
        for chain in ["prerouting", "output"] {
            for (maps, key) in [(MAPS_ADDR, [vec![payload("ip", "daddr")], l4()].concat()), (MAPS_ANY, l4())] {
                if self.elements().iter().all(|(m, ..)| *m != maps) {
                    continue;
                }
                out.push((
                    chain.to_string(),
                    vec![
                        m(meta(MetaKey::Nfproto), Operator::EQ, s("ipv4")),
                        m(fib_daddr_type(), Operator::EQ, s("local")),
                        Statement::DNAT(Some(nftables::stmt::NAT {
                            addr: Some(lookup(&key, maps.0)),
                            family: Some(nftables::stmt::NATFamily::IP),
                            port: Some(lookup(&key, maps.1)),
                            flags: None,
                        })),
                    ],
                ));
            }
        }
        out.insert(0, ("forward".to_string(), self.forward_dnat()));
        let bridges = || s(format!("{BRIDGE_PREFIX}*"));
        // Hairpin: a container to a host address, DNATed to another
        // container; the reply must come back through the host.
        out.push((
            "postrouting".to_string(),
            vec![
                m(ct_status(), Operator::IN, s("dnat")),
                m(meta(MetaKey::Iifname), Operator::EQ, bridges()),
                m(meta(MetaKey::Oifname), Operator::EQ, bridges()),
                Statement::Masquerade(None),
            ],
        ));
        // From the host's 127.0.0.1 to the mesh: from the mesh's address,
        // which its replies come back to.
        if let Some(addr) = self.mesh_loopback {
            out.push((
                "postrouting".to_string(),
                vec![
                    m(ct_status(), Operator::IN, s("dnat")),
                    m(meta(MetaKey::Oifname), Operator::EQ, s("lo")),
                    m(
                        payload("ip", "saddr"),
                        Operator::EQ,
                        prefix(&IpNet::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8).expect("a prefix")),
                    ),
                    Statement::SNAT(Some(nftables::stmt::NAT {
                        addr: Some(s(addr.to_string())),
                        family: Some(nftables::stmt::NATFamily::IP),
                        port: None,
                        flags: None,
                    })),
                ],
            ));
        }
        // From the host's 127.0.0.1: a container cannot answer loopback.
        out.push((
            "postrouting".to_string(),
            vec![
                m(meta(MetaKey::Oifname), Operator::EQ, bridges()),
                m(
                    payload("ip", "saddr"),
                    Operator::EQ,
                    prefix(&IpNet::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8).expect("a prefix")),
                ),
                Statement::Masquerade(None),
            ],
        ));
    }

    /// What was DNATed is forwarded (across networks too, before the drops
    /// between networks), but never out of an internal network.
    fn forward_dnat(&self) -> Vec<Statement<'static>> {
        let mut accept = vec![m(ct_status(), Operator::IN, s("dnat"))];
        let internal: Vec<_> = self.nets.iter().filter(|n| n.internal).map(|n| n.bridge.clone()).collect();
        if !internal.is_empty() {
            accept.push(m(
                meta(MetaKey::Iifname),
                Operator::NEQ,
                Expression::Named(NamedExpression::Set(
                    internal.into_iter().map(|b| nftables::expr::SetItem::Element(s(b))).collect(),
                )),
            ));
        }
        accept.push(Statement::Accept(None));
        accept
    }

    /// The rules, as (chain, statements).
    fn rules(&self) -> Vec<(String, Vec<Statement<'static>>)> {
        let (mesh_first, mesh_rest) = self.mesh_rules();
        let mut out = mesh_first;
        for n in &self.nets {
            if let (true, Some(IpAddr::V4(gw)), Some(sub)) = (self.dns_intercept, n.gateway, n.subnet) {
                for proto in ["udp", "tcp"] {
                    out.push((
                        "prerouting".to_string(),
                        vec![
                            m(meta(MetaKey::Iifname), Operator::EQ, s(&n.bridge)),
                            m(payload("ip", "saddr"), Operator::EQ, prefix(&sub)),
                            m(payload("ip", "daddr"), Operator::NEQ, s(gw.to_string())),
                            m(payload(proto, "dport"), Operator::EQ, Expression::Number(53)),
                            Statement::DNAT(Some(nftables::stmt::NAT {
                                addr: Some(s(gw.to_string())),
                                family: Some(nftables::stmt::NATFamily::IP),
                                port: None,
                                flags: None,
                            })),
                        ],
                    ));
                }
            }
            // The same over IPv6, from the network's IPv6 subnet to its
            // IPv6 gateway (not link-local or multicast resolvers).
            if let (true, Some(sub6), Some(IpAddr::V6(gw6))) = (self.dns_intercept, n.subnet6, n.gateway6) {
                for proto in ["udp", "tcp"] {
                    out.push((
                        "prerouting".to_string(),
                        vec![
                            m(meta(MetaKey::Iifname), Operator::EQ, s(&n.bridge)),
                            m(payload("ip6", "saddr"), Operator::EQ, prefix(&sub6)),
                            m(payload("ip6", "daddr"), Operator::NEQ, s(gw6.to_string())),
                            m(payload("ip6", "daddr"), Operator::NEQ, prefix(&"fe80::/10".parse().expect("a prefix"))),
                            m(payload("ip6", "daddr"), Operator::NEQ, prefix(&"ff00::/8".parse().expect("a prefix"))),
                            m(payload(proto, "dport"), Operator::EQ, Expression::Number(53)),
                            Statement::DNAT(Some(nftables::stmt::NAT {
                                addr: Some(s(gw6.to_string())),
                                family: Some(nftables::stmt::NATFamily::IP6),
                                port: None,
                                flags: None,
                            })),
                        ],
                    ));
                }
            }
            if let (true, false, Some(IpAddr::V4(gw))) = (self.dns_notrack, self.dns_intercept, n.gateway) {
                // Queries in from the bridge, answers out to it.
                for (chain, dev, addr, port) in [
                    ("raw_prerouting", MetaKey::Iifname, "daddr", "dport"),
                    ("raw_output", MetaKey::Oifname, "saddr", "sport"),
                ] {
                    out.push((
                        chain.to_string(),
                        vec![
                            m(meta(dev), Operator::EQ, s(&n.bridge)),
                            m(payload("ip", addr), Operator::EQ, s(gw.to_string())),
                            m(payload("udp", port), Operator::EQ, Expression::Number(53)),
                            Statement::Notrack,
                        ],
                    ));
                }
            }
            if n.internal {
                out.push((
                    "forward".to_string(),
                    vec![
                        m(meta(MetaKey::Iifname), Operator::EQ, s(&n.bridge)),
                        m(meta(MetaKey::Oifname), Operator::NEQ, s(&n.bridge)),
                        Statement::Drop(None),
                    ],
                ));
                out.push((
                    "forward".to_string(),
                    vec![
                        m(meta(MetaKey::Oifname), Operator::EQ, s(&n.bridge)),
                        m(meta(MetaKey::Iifname), Operator::NEQ, s(&n.bridge)),
                        Statement::Drop(None),
                    ],
                ));
                // Into the host: its gateway only (DNS), per family; over
                // IPv6 neighbour discovery too (link-local, multicast).
                let mut input = vec![m(meta(MetaKey::Iifname), Operator::EQ, s(&n.bridge))];
                match (n.gateway, n.gateway6) {
                    (Some(gw), _) => input.push(m(payload(family_of(&gw), "daddr"), Operator::NEQ, s(gw.to_string()))),
                    // IPv6-only: no IPv4 at all (its IPv6 rule below).
                    (None, Some(_)) => input.push(m(meta(MetaKey::Nfproto), Operator::EQ, s("ipv4"))),
                    (None, None) => {}
                }
                input.push(Statement::Drop(None));
                out.push(("input".to_string(), input));
                if let Some(gw6) = n.gateway6 {
                    out.push((
                        "input".to_string(),
                        vec![
                            m(meta(MetaKey::Iifname), Operator::EQ, s(&n.bridge)),
                            m(payload("ip6", "daddr"), Operator::NEQ, s(gw6.to_string())),
                            m(payload("ip6", "daddr"), Operator::NEQ, prefix(&"fe80::/10".parse().expect("a prefix"))),
                            m(payload("ip6", "daddr"), Operator::NEQ, prefix(&"ff00::/8".parse().expect("a prefix"))),
                            Statement::Drop(None),
                        ],
                    ));
                }
            } else {
                out.push((
                    "forward".to_string(),
                    vec![
                        m(meta(MetaKey::Iifname), Operator::EQ, s(&n.bridge)),
                        m(meta(MetaKey::Oifname), Operator::EQ, s(format!("{BRIDGE_PREFIX}*"))),
                        m(meta(MetaKey::Oifname), Operator::NEQ, s(&n.bridge)),
                        Statement::Drop(None),
                    ],
                ));
                for subnet in n.subnet.iter().chain(&n.subnet6) {
                    out.push((
                        "postrouting".to_string(),
                        vec![
                            m(payload(family_of(&subnet.network()), "saddr"), Operator::EQ, prefix(subnet)),
                            m(meta(MetaKey::Oifname), Operator::NEQ, s(&n.bridge)),
                            Statement::Masquerade(None),
                        ],
                    ));
                }
            }
        }
        self.published_rules(&mut out);
        out.extend(mesh_rest);
        out
    }

    /// `<hash>/<number of rules>`: what [`observed_fingerprint`] reads back
    /// from a table holding exactly these rules.
    pub fn fingerprint(&self) -> String {
        let rules = self.rules();
        let mut text =
            serde_json::to_string(&rules.iter().map(|(c, st)| (c, st)).collect::<Vec<_>>()).expect("rules serialize");
        // The maps' elements and the loopback bridges count too (a table
        // without published ports hashes as it did before they existed).
        if !self.published.is_empty() || !self.localnet.is_empty() {
            text.push_str(&serde_json::to_string(&(self.elements(), &self.localnet)).expect("elements serialize"));
        }
        // And the mesh's sets and its bridge table (none: as before it).
        let bridge = self.bridge_rules();
        if self.mesh_on() {
            let (ports, snat, src) = self.mesh_elements();
            let src: Vec<(String, String, String)> =
                src.into_iter().map(|(d, g, m)| (d, g.to_string(), m.to_string())).collect();
            text.push_str(&serde_json::to_string(&(ports, snat, src, &bridge)).expect("mesh serializes"));
        }
        format!("{:016x}/{}", fnv1a(text.as_bytes()), rules.len() + bridge.len())
    }

    /// The nft batch that replaces the table with these rules atomically.
    pub fn batch(&self) -> Nftables<'static> {
        let fp = self.fingerprint();
        let hash = fp.split('/').next().unwrap_or_default().to_string();
        let table = || Table { family: NfFamily::INet, name: Cow::Borrowed(TABLE), handle: None };
        let mut b = Batch::new();
        // `add` is idempotent, so the delete below never fails on a fresh host.
        b.add(NfListObject::Table(table()));
        b.delete(NfListObject::Table(table()));
        b.add(NfListObject::Table(table()));
        for (name, ty, hook, prio) in [
            ("prerouting", NfChainType::NAT, NfHook::Prerouting, -100),
            ("postrouting", NfChainType::NAT, NfHook::Postrouting, 100),
            ("forward", NfChainType::Filter, NfHook::Forward, 0),
            ("input", NfChainType::Filter, NfHook::Input, 0),
            ("output", NfChainType::NAT, NfHook::Output, -100),
            // Before connection tracking (its priority is -200).
            ("raw_prerouting", NfChainType::Filter, NfHook::Prerouting, -300),
            ("raw_output", NfChainType::Filter, NfHook::Output, -300),
        ] {
            b.add(NfListObject::Chain(Chain {
                family: NfFamily::INet,
                table: Cow::Borrowed(TABLE),
                name: Cow::Borrowed(name),
                _type: Some(ty),
                hook: Some(hook),
                prio: Some(prio),
                policy: Some(NfChainPolicy::Accept),
                ..Chain::default()
            }));
        }
        // The mesh's chains (no hook: jumped to), sets and maps.
        let mut mesh_chains: Vec<String> = self.mesh_live().map(|r| r.chain()).collect();
        mesh_chains.sort();
        mesh_chains.dedup();
        if self.mesh_on() {
            for name in mesh_chains {
                b.add(NfListObject::Chain(Chain {
                    family: NfFamily::INet,
                    table: Cow::Borrowed(TABLE),
                    name: Cow::Owned(name),
                    ..Chain::default()
                }));
            }
        }
        let (mesh_ports, mesh_snat, mesh_src) = self.mesh_elements();
        for (proto, ports) in &mesh_ports {
            let name = MESH_PORT_SETS.iter().find(|(p, _)| p == proto).map(|(_, n)| *n).expect("a set per protocol");
            b.add(NfListObject::Set(Box::new(nftables::schema::Set {
                family: NfFamily::INet,
                table: Cow::Borrowed(TABLE),
                name: Cow::Borrowed(name),
                set_type: SetTypeValue::Single(SetType::InetService),
                elem: Some(Cow::Owned(ports.iter().map(|p| Expression::Number(*p as u32)).collect())),
                ..nftables::schema::Set::default()
            })));
        }
        if !mesh_snat.is_empty() {
            b.add(NfListObject::Map(Box::new(Map {
                family: NfFamily::INet,
                table: Cow::Borrowed(TABLE),
                name: Cow::Borrowed(MESH_SNAT_MAP),
                set_type: SetTypeValue::Single(SetType::Ifname),
                map: SetTypeValue::Single(SetType::Ipv4Addr),
                elem: Some(Cow::Owned(
                    mesh_snat.iter().map(|(b, a)| Expression::List(vec![s(b.clone()), s(a.to_string())])).collect(),
                )),
                ..Map::default()
            })));
        }
        let elements = self.elements();
        for (maps, key) in [
            (MAPS_ANY, vec![SetType::InetProto, SetType::InetService]),
            (MAPS_ADDR, vec![SetType::Ipv4Addr, SetType::InetProto, SetType::InetService]),
        ] {
            for (name, data) in [(maps.0, SetType::Ipv4Addr), (maps.1, SetType::InetService)] {
                let elem: Vec<_> = elements
                    .iter()
                    .filter(|(m, ..)| *m == maps)
                    .map(|(_, k, addr, port)| {
                        Expression::List(vec![k.clone(), if name == maps.0 { addr.clone() } else { port.clone() }])
                    })
                    .collect();
                b.add(NfListObject::Map(Box::new(Map {
                    family: NfFamily::INet,
                    table: Cow::Borrowed(TABLE),
                    name: Cow::Borrowed(name),
                    set_type: SetTypeValue::Concatenated(Cow::Owned(key.clone())),
                    map: SetTypeValue::Single(data),
                    elem: if elem.is_empty() { None } else { Some(Cow::Owned(elem)) },
                    ..Map::default()
                })));
            }
        }
        for (chain, expr) in self.rules() {
            b.add(NfListObject::Rule(Rule {
                family: NfFamily::INet,
                table: Cow::Borrowed(TABLE),
                chain: Cow::Owned(chain),
                expr: Cow::Owned(expr),
                handle: None,
                index: None,
                comment: Some(Cow::Owned(format!("trellis:{hash}"))),
            }));
        }
        // `bridge trellis`: replaced too, and made only when it has rules.
        let bridge_table = || Table { family: NfFamily::Bridge, name: Cow::Borrowed(TABLE), handle: None };
        b.add(NfListObject::Table(bridge_table()));
        b.delete(NfListObject::Table(bridge_table()));
        let bridge_rules = self.bridge_rules();
        if !bridge_rules.is_empty() {
            b.add(NfListObject::Table(bridge_table()));
            b.add(NfListObject::Chain(Chain {
                family: NfFamily::Bridge,
                table: Cow::Borrowed(TABLE),
                name: Cow::Borrowed("output"),
                _type: Some(NfChainType::Filter),
                hook: Some(NfHook::Output),
                prio: Some(0),
                policy: Some(NfChainPolicy::Accept),
                ..Chain::default()
            }));
            b.add(NfListObject::Map(Box::new(Map {
                family: NfFamily::Bridge,
                table: Cow::Borrowed(TABLE),
                name: Cow::Borrowed(MESH_SRC_MAP),
                set_type: SetTypeValue::Concatenated(Cow::Owned(vec![SetType::Ifname, SetType::EtherAddr])),
                map: SetTypeValue::Single(SetType::EtherAddr),
                elem: Some(Cow::Owned(
                    mesh_src
                        .iter()
                        .map(|(d, gw, mac)| {
                            Expression::List(vec![concat(vec![s(d.clone()), s(gw.to_string())]), s(mac.to_string())])
                        })
                        .collect(),
                )),
                ..Map::default()
            })));
            for expr in bridge_rules {
                b.add(NfListObject::Rule(Rule {
                    family: NfFamily::Bridge,
                    table: Cow::Borrowed(TABLE),
                    chain: Cow::Borrowed("output"),
                    expr: Cow::Owned(expr),
                    handle: None,
                    index: None,
                    comment: Some(Cow::Owned(format!("trellis:{hash}"))),
                }));
            }
        }
        b.to_nftables()
    }
}

/// The batch as `nft -j` reads it. The nftables crate (0.6) writes the
/// `notrack` statement as the bare string `"notrack"`, which nft refuses
/// ("expected object"): nft's form, `{"notrack": null}`, is put in (the
/// crate reads that form back).
pub fn to_nft_json(batch: &Nftables<'_>) -> Result<String, serde_json::Error> {
    let mut v = serde_json::to_value(batch)?;
    fix_statements(&mut v, &|st| {
        if st.as_str() == Some("notrack") {
            *st = serde_json::json!({ "notrack": null });
        }
    });
    serde_json::to_string(&v)
}

/// Applies `fix` to every statement of every rule in an nft JSON document.
fn fix_statements(v: &mut serde_json::Value, fix: &dyn Fn(&mut serde_json::Value)) {
    let Some(objects) = v.get_mut("nftables").and_then(|o| o.as_array_mut()) else { return };
    for obj in objects {
        // Rules appear bare (a listing) or under a command (a batch).
        let rule = match obj.get_mut("rule") {
            Some(r) => Some(r),
            None => obj.as_object_mut().and_then(|o| o.values_mut().next()).and_then(|cmd| cmd.get_mut("rule")),
        };
        if let Some(exprs) = rule.and_then(|r| r.get_mut("expr")).and_then(|e| e.as_array_mut()) {
            exprs.iter_mut().for_each(fix);
        }
    }
}

/// The fingerprint of an installed table (`None` when it is absent): the
/// common comment hash of its rules and their number, or `mixed/N` when the
/// rules do not all carry the same one.
pub fn observed_fingerprint(table: &Nftables<'_>) -> Option<String> {
    let mut table_seen = false;
    let mut hashes = std::collections::BTreeSet::new();
    let mut count = 0usize;
    for obj in table.objects.iter() {
        match obj {
            nftables::schema::NfObject::ListObject(NfListObject::Table(t)) if t.name == TABLE => table_seen = true,
            nftables::schema::NfObject::ListObject(NfListObject::Rule(r)) if r.table == TABLE => {
                count += 1;
                let c = r.comment.as_deref().unwrap_or("");
                hashes.insert(c.strip_prefix("trellis:").unwrap_or("foreign").to_string());
            }
            _ => {}
        }
    }
    if !table_seen {
        return None;
    }
    let hash = match hashes.len() {
        0 => format!("{:016x}", fnv1a(b"[]")),
        1 => hashes.into_iter().next().expect("one"),
        _ => "mixed".to_string(),
    };
    Some(format!("{hash}/{count}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(bridge: &str, subnet: &str, internal: bool) -> EgressNet {
        let subnet: IpNet = subnet.parse().unwrap();
        EgressNet {
            bridge: bridge.into(),
            subnet: Some(subnet),
            gateway: Some(ipnet::IpNet::hosts(&subnet).next().unwrap()),
            internal,
            subnet6: None,
            gateway6: None,
        }
    }

    #[test]
    fn a_dual_stack_networks_ipv6_subnet_is_masqueraded_too() {
        let dual = EgressNet { subnet6: Some("fd00:1::/64".parse().unwrap()), ..net("trb-a", "10.1.0.0/24", false) };
        let r = EgressRules::new(vec![
            dual,
            EgressNet { subnet6: Some("fd00:2::/64".parse().unwrap()), ..net("trb-b", "10.2.0.0/24", true) },
        ]);
        let masq: Vec<String> = r
            .rules()
            .into_iter()
            .filter(|(c, st)| c == "postrouting" && st.iter().any(|x| matches!(x, Statement::Masquerade(_))))
            .map(|(_, st)| serde_json::to_string(&st).unwrap())
            .collect();
        assert_eq!(masq.len(), 2, "{masq:?}");
        assert!(masq[0].contains("10.1.0.0") && masq[0].contains("\"ip\""), "{}", masq[0]);
        assert!(masq[1].contains("fd00:1::") && masq[1].contains("\"ip6\""), "{}", masq[1]);
        assert!(!masq.iter().any(|m| m.contains("fd00:2::")), "an internal network is never masqueraded");
    }

    /// An IPv6-only network: its IPv6 subnet masqueraded; internal, the
    /// host takes no IPv4 from it at all and over IPv6 only what is for its
    /// gateway, link-local or multicast (neighbour discovery).
    #[test]
    fn an_ipv6_only_networks_rules_are_ipv6_ones() {
        let six = |bridge: &str, internal| EgressNet {
            bridge: bridge.into(),
            subnet: None,
            gateway: None,
            internal,
            subnet6: Some("fd00:6::/64".parse().unwrap()),
            gateway6: Some("fd00:6::1".parse().unwrap()),
        };
        let open = EgressRules::new(vec![six("trb-o", false)]).rules();
        let masq: Vec<String> =
            open.iter().filter(|(c, _)| c == "postrouting").map(|(_, st)| serde_json::to_string(st).unwrap()).collect();
        assert!(masq.len() == 1 && masq[0].contains("fd00:6::") && masq[0].contains("\"ip6\""), "{masq:?}");
        let sealed = EgressRules::new(vec![six("trb-i", true)]).rules();
        let input: Vec<String> =
            sealed.iter().filter(|(c, _)| c == "input").map(|(_, st)| serde_json::to_string(st).unwrap()).collect();
        assert_eq!(input.len(), 2, "{input:?}");
        assert!(input[0].contains("nfproto") && input[0].contains("ipv4"), "no IPv4 into the host: {}", input[0]);
        assert!(
            input[1].contains("fd00:6::1") && input[1].contains("fe80::") && input[1].contains("ff00::"),
            "{}",
            input[1]
        );
    }

    #[test]
    fn rules_per_network_kind() {
        let r = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false), net("trb-b", "10.2.0.0/24", true)]);
        let rules = r.rules();
        let chains: Vec<_> = rules.iter().map(|(c, _)| c.as_str()).collect();
        // The internal network sorts after the open one (by bridge name).
        assert_eq!(chains, ["forward", "postrouting", "forward", "forward", "input"]);
        let json = serde_json::to_string(&r.batch()).unwrap();
        assert!(json.contains("\"masquerade\""), "{json}");
        assert!(json.contains("10.1.0.0"));
        assert!(!json.contains("\"10.2.0.0\""), "an internal network is never masqueraded: {json}");
        assert!(json.contains("trb-*"));
    }

    #[test]
    fn dns_queries_to_other_resolvers_go_to_the_gateway() {
        let mut r = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false), net("trb-b", "10.2.0.0/24", true)]);
        let without = r.fingerprint();
        r.dns_intercept = true;
        let rules = r.rules();
        let pre: Vec<_> = rules.iter().filter(|(c, _)| *c == "prerouting").collect();
        assert_eq!(pre.len(), 4, "udp and tcp, for each network (internal ones too)");
        assert_ne!(r.fingerprint(), without, "turning interception on changes the table");
        let json = serde_json::to_string(&r.batch()).unwrap();
        assert!(json.contains("\"dnat\"") && json.contains("\"prerouting\""), "{json}");
        assert!(json.contains("\"dport\"") && json.contains("53"));
    }

    #[test]
    fn dns_over_ipv6_to_other_resolvers_goes_to_the_ipv6_gateway() {
        let dual = EgressNet {
            subnet6: Some("fd00:1::/64".parse().unwrap()),
            gateway6: Some("fd00:1::1".parse().unwrap()),
            ..net("trb-a", "10.1.0.0/24", false)
        };
        let mut r = EgressRules::new(vec![dual, net("trb-b", "10.2.0.0/24", false)]);
        r.dns_intercept = true;
        let pre: Vec<String> = r
            .rules()
            .into_iter()
            .filter(|(c, _)| c == "prerouting")
            .map(|(_, st)| serde_json::to_string(&st).unwrap())
            .collect();
        assert_eq!(pre.len(), 6, "udp and tcp, IPv4 for both networks, IPv6 for the dual-stack one: {pre:?}");
        let six: Vec<&String> = pre.iter().filter(|j| j.contains("\"ip6\"")).collect();
        assert_eq!(six.len(), 2, "{six:?}");
        for j in &six {
            assert!(
                j.contains("fd00:1::1") && j.contains("\"dnat\"") && j.contains("trb-a") && j.contains("53"),
                "{j}"
            );
            assert!(j.contains("fe80::") && j.contains("ff00::"), "link-local and multicast resolvers left alone: {j}");
        }
        r.dns_intercept = false;
        assert!(!r.rules().iter().any(|(c, _)| c == "prerouting"), "nothing without interception");
    }

    #[test]
    fn dns_to_the_gateways_is_untracked_unless_nat_needs_it() {
        let mut r = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false), net("trb-b", "10.2.0.0/24", true)]);
        let without = r.fingerprint();
        r.dns_notrack = true;
        let rules = r.rules();
        let raw: Vec<_> = rules.iter().filter(|(c, _)| c.starts_with("raw_")).collect();
        // Both directions for each network, the internal one included.
        assert_eq!(raw.len(), 4, "{raw:?}");
        let json = serde_json::to_string(&r.batch()).unwrap();
        assert!(json.contains("\"notrack\""), "{json}");
        for gw in ["10.1.0.1", "10.2.0.1"] {
            assert!(json.contains(&format!("\"{gw}\"")), "{gw}: {json}");
        }
        assert!(json.contains("\"sport\"") && json.contains("\"dport\""), "{json}");
        assert!(json.contains("\"prio\":-300"), "the raw chains run before conntrack: {json}");
        assert_ne!(r.fingerprint(), without);
        // With the nftables DNAT of queries to other resolvers, replies need
        // their conntrack entry to get the resolver's address back.
        r.dns_intercept = true;
        assert!(r.rules().iter().all(|(c, _)| !c.starts_with("raw_")));
    }

    #[test]
    fn notrack_is_written_and_read_as_nft_does() {
        let mut r = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false)]);
        r.dns_notrack = true;
        let text = to_nft_json(&r.batch()).unwrap();
        assert!(text.contains("{\"notrack\":null}") && !text.contains("\"notrack\"]"), "{text}");
        // A listing as nft 1.0 prints it (two rules, one with notrack).
        let listed = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "inet", "name": "trellis", "handle": 1}},
            {"chain": {"family": "inet", "table": "trellis", "name": "raw_output", "handle": 1, "type": "filter", "hook": "output", "prio": -300, "policy": "accept"}},
            {"rule": {"family": "inet", "table": "trellis", "chain": "raw_output", "handle": 2, "comment": "trellis:abc",
              "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "sport"}}, "right": 53}}, {"notrack": null}]}},
            {"rule": {"family": "inet", "table": "trellis", "chain": "raw_output", "handle": 3, "comment": "trellis:abc",
              "expr": [{"drop": null}]}}]}"#;
        let set: Nftables<'_> = serde_json::from_str(listed).unwrap();
        assert_eq!(observed_fingerprint(&set).as_deref(), Some("abc/2"));
    }

    #[test]
    fn fingerprint_tracks_content_and_order_independent_input() {
        let a = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false), net("trb-b", "10.2.0.0/24", true)]);
        let b = EgressRules::new(vec![net("trb-b", "10.2.0.0/24", true), net("trb-a", "10.1.0.0/24", false)]);
        assert_eq!(a.fingerprint(), b.fingerprint());
        let c = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", true), net("trb-b", "10.2.0.0/24", true)]);
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert!(a.fingerprint().ends_with("/5"));
        assert_eq!(EgressRules::default().fingerprint(), format!("{:016x}/0", fnv1a(b"[]")));
    }

    #[test]
    fn observed_fingerprint_reads_back_the_batch() {
        let r = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false)]);
        // The batch as nft would list it back: table, chains, rules.
        let listed: Nftables<'_> = serde_json::from_value(serde_json::json!({"nftables": [
            {"table": {"family": "inet", "name": "trellis", "handle": 1}},
            {"rule": {"family": "inet", "table": "trellis", "chain": "forward", "handle": 4, "expr": [], "comment": format!("trellis:{}", r.fingerprint().split('/').next().unwrap())}},
            {"rule": {"family": "inet", "table": "trellis", "chain": "postrouting", "handle": 5, "expr": [], "comment": format!("trellis:{}", r.fingerprint().split('/').next().unwrap())}},
        ]}))
        .unwrap();
        assert_eq!(observed_fingerprint(&listed), Some(r.fingerprint()));
        let missing_rule: Nftables<'_> = serde_json::from_value(serde_json::json!({"nftables": [
            {"table": {"family": "inet", "name": "trellis", "handle": 1}},
            {"rule": {"family": "inet", "table": "trellis", "chain": "forward", "handle": 4, "expr": [], "comment": format!("trellis:{}", r.fingerprint().split('/').next().unwrap())}},
        ]}))
        .unwrap();
        assert_ne!(observed_fingerprint(&missing_rule), Some(r.fingerprint()));
        let empty: Nftables<'_> = serde_json::from_value(serde_json::json!({"nftables": []})).unwrap();
        assert_eq!(observed_fingerprint(&empty), None);
    }

    #[test]
    fn forwarding_is_no_rule_and_leaves_the_table_as_it_is() {
        let mut r = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false)]);
        assert!(!r.forwarding, "off unless the desired state asks");
        let (fingerprint, batch) = (r.fingerprint(), to_nft_json(&r.batch()).unwrap());
        r.forwarding = true;
        // A table installed before the flag existed still matches: no
        // reapply on upgrade, and no reapply when only the flag differs.
        assert_eq!(r.fingerprint(), fingerprint);
        assert_eq!(to_nft_json(&r.batch()).unwrap(), batch);
    }

    fn published(proto: Proto, host_ip: Option<&str>, host_port: u16, addr: &str, port: u16) -> PublishedRule {
        PublishedRule {
            proto,
            host_ip: host_ip.map(|i| i.parse().unwrap()),
            host_port,
            addr: addr.parse().unwrap(),
            port,
        }
    }

    #[test]
    fn published_ports_are_map_elements_not_rules() {
        let mut r = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false), net("trb-i", "10.2.0.0/24", true)]);
        let without = r.fingerprint();
        r.publish("trb-a", [published(Proto::Tcp, None, 8080, "10.1.0.2", 80)]);
        let one = r.rules();
        // prerouting + output for the every-address map, the forward
        // accept, the two masquerades.
        let chains: Vec<_> = one.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(chains[0], "forward", "the accept of DNATed traffic comes before the drops between networks");
        let added: Vec<_> = chains.iter().skip(EgressRules::new(r.nets.clone()).rules().len() + 1).collect();
        assert_eq!(added, [&"prerouting", &"output", &"postrouting", &"postrouting"]);
        assert_ne!(r.fingerprint(), without);
        let fp_one = r.fingerprint();
        // A thousand more ports: the same rules, more elements.
        r.publish("trb-a", (0..1000).map(|i| published(Proto::Udp, None, 20000 + i, "10.1.0.3", 53)));
        assert_eq!(r.rules(), one, "per-packet work must not grow with the ports");
        assert_ne!(r.fingerprint(), fp_one, "the elements are in the fingerprint");
        assert!(r.fingerprint().ends_with(&format!("/{}", one.len())));
        assert_eq!(r.localnet, ["trb-a"], "one bridge, once");
        // An address-bound port adds the address map's rules.
        r.publish("trb-a", [published(Proto::Udp, Some("127.0.0.1"), 5353, "10.1.0.3", 53)]);
        let pre = r.rules().into_iter().filter(|(c, _)| *c == "prerouting").count();
        assert_eq!(pre, 2);
        let json = to_nft_json(&r.batch()).unwrap();
        for map in ["published_addr", "published_port", "published_ip_addr", "published_ip_port"] {
            assert!(json.contains(&format!("\"@{map}\"")), "{map}: {json}");
        }
        assert!(json.contains("[{\"concat\":[\"127.0.0.1\",\"udp\",5353]},\"10.1.0.3\"]"), "{json}");
        assert!(json.contains("[{\"concat\":[\"tcp\",8080]},80]"), "{json}");
        assert!(json.contains("\"trb-i\""), "the internal network's bridge is excluded from the accept: {json}");
        if let Ok(path) = std::env::var("TRELLIS_DUMP_NFT") {
            std::fs::write(path, &json).unwrap();
        }
    }

    #[test]
    fn outside_traffic_keeps_its_source_only_hairpin_and_loopback_are_masqueraded() {
        let mut r = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false)]);
        r.publish("trb-a", [published(Proto::Tcp, None, 8080, "10.1.0.2", 80)]);
        let masq: Vec<String> = r
            .rules()
            .into_iter()
            .filter(|(c, st)| *c == "postrouting" && st.iter().any(|s| matches!(s, Statement::Masquerade(_))))
            .map(|(_, st)| serde_json::to_string(&st).unwrap())
            .collect();
        assert_eq!(masq.len(), 3, "{masq:?}");
        // The network's own (its subnet out of anything but its bridge),
        // hairpin (bridge in and out, DNATed) and loopback; none matches a
        // client from the uplink to the container.
        assert!(masq[0].contains("10.1.0.0"));
        assert!(masq[1].contains("\"iifname\"") && masq[1].contains("dnat"), "{}", masq[1]);
        assert!(masq[2].contains("127.0.0.0"), "{}", masq[2]);
    }

    fn mesh(service: &str, proto: Proto, host_port: u16, target: u16, backends: &[&str], hairpin: bool) -> MeshRule {
        MeshRule {
            proto,
            host_port,
            service: service.into(),
            target,
            backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
            hairpin_only: hairpin,
        }
    }

    fn snat(net: &str, addr: &str) -> MeshSnat {
        MeshSnat {
            bridge: format!("trb-{net}"),
            vxlan: format!("trx-{net}"),
            gateway_mac: Mac([2, 0x42, 10, 1, 0, 0]),
            addr: addr.parse().unwrap(),
            mac: Mac::for_ip(addr.parse().unwrap()),
        }
    }

    /// The rules of `r` as (chain, JSON of the statements).
    fn json_rules(r: &EgressRules) -> Vec<(String, String)> {
        r.rules().into_iter().map(|(c, st)| (c, serde_json::to_string(&st).unwrap())).collect()
    }

    #[test]
    fn mesh_ports_are_map_elements_and_services_chains_not_rules_per_packet() {
        let mut r = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false)]);
        r.mesh_address(snat("a", "10.1.0.5"));
        r.publish_mesh([mesh("web", Proto::Tcp, 30080, 8080, &["10.1.0.2", "10.1.0.3"], false)]);
        let one = json_rules(&r);
        let chains: Vec<&str> = one.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(
            chains,
            [
                "forward",
                "postrouting",
                "forward",
                "postrouting",
                "prerouting",
                "output",
                "mesh_web_tcp_8080",
                "mesh_web_tcp_8080"
            ],
            "the accept of DNATed traffic first of forward; SNAT first of postrouting; one lookup per hook; the service's chain, a rule per backend"
        );
        let fp_one = r.fingerprint();
        // A thousand more ports of the service: the same rules (the
        // lookups hold more elements), the same chain.
        r.publish_mesh((0..1000).map(|i| mesh("web", Proto::Tcp, 31000 + i, 8080, &["10.1.0.2", "10.1.0.3"], false)));
        let many = json_rules(&r);
        assert_eq!(many.len(), one.len(), "per-packet work must not grow with the ports");
        assert!(many[4].1.contains("31999") && many[5].1.contains("31999"), "{}", many[4].1);
        assert_ne!(r.fingerprint(), fp_one);
        // A thousand services: a chain each, jumped to from the same one
        // lookup per hook (a packet sees one lookup and one rule).
        let mut s = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false)]);
        s.mesh_address(snat("a", "10.1.0.5"));
        s.publish_mesh((0..1000).map(|i| mesh(&format!("s{i}"), Proto::Udp, 20000 + i, 53, &["10.1.0.9"], false)));
        let rules = json_rules(&s);
        let base: Vec<_> = rules.iter().filter(|(c, _)| !c.starts_with("mesh_")).collect();
        assert_eq!(base.len(), one.len() - 2, "{base:?}");
        assert_eq!(rules.iter().filter(|(c, _)| c.starts_with("mesh_s")).count(), 1000);
        let json = to_nft_json(&s.batch()).unwrap();
        assert!(!json.contains("\"numgen\""), "one backend: no choice to make");
        assert!(!json.contains("\"set\":[[0,"), "no set per service (they are slow to make)");
        if let Ok(path) = std::env::var("TRELLIS_DUMP_NFT_MESH") {
            std::fs::write(path, to_nft_json(&r.batch()).unwrap()).unwrap();
        }
    }

    #[test]
    fn a_mesh_connection_is_snated_to_the_host_s_address_on_the_backend_s_network() {
        let mut r = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false), net("trb-b", "10.2.0.0/24", false)]);
        r.publish("trb-b", [published(Proto::Tcp, None, 18080, "10.2.0.7", 80)]);
        r.mesh_address(snat("a", "10.1.0.5"));
        r.publish_mesh([
            mesh("web", Proto::Tcp, 30080, 8080, &["10.1.0.2"], false),
            mesh("dns", Proto::Udp, 30053, 53, &["10.1.0.3", "10.1.0.4", "10.1.0.6"], false),
        ]);
        let rules = json_rules(&r);
        let post: Vec<&String> = rules.iter().filter(|(c, _)| c == "postrouting").map(|(_, j)| j).collect();
        // Before every masquerade (a container of another network would be
        // masqueraded to the gateway, which answers on every host).
        assert!(post[0].contains("\"snat\"") && post[0].contains("@mesh_tcp"), "{}", post[0]);
        assert!(post[1].contains("\"snat\"") && post[1].contains("@mesh_udp"), "{}", post[1]);
        assert!(post[2..].iter().all(|j| !j.contains("\"snat\"")), "{post:?}");
        assert!(post[0].contains("\"proto-dst\"") && post[0].contains("\"original\""), "{}", post[0]);
        let json = to_nft_json(&r.batch()).unwrap();
        // The sets hold the mesh's ports, not the -p one (which keeps the
        // outside client's address).
        assert!(json.contains("\"name\":\"mesh_tcp\"") && json.contains("[30080]"), "{json}");
        assert!(json.contains("[30053]") && !json.contains("[18080]"), "{json}");
        assert!(json.contains("[\"trb-a\",\"10.1.0.5\"]"), "{json}");
        // What the host sends into the VXLAN device leaves from its mesh MAC.
        assert!(json.contains("\"family\":\"bridge\""), "{json}");
        assert!(
            json.contains("[{\"concat\":[\"trx-a\",\"02:42:0a:01:00:00\"]},\"02:42:0a:01:00:05\"]"),
            "only from the bridge's own MAC: {json}"
        );
        // A backend at random of the three, each with 1/3, to the target
        // port: the first with 1/3, the second with 1/2 of the rest, the
        // last what is left.
        let chain: Vec<&String> = rules.iter().filter(|(c, _)| c == "mesh_dns_udp_53").map(|(_, j)| j).collect();
        assert_eq!(chain.len(), 3);
        for (j, (backend, modulus)) in
            chain.iter().zip([("10.1.0.3", Some(3)), ("10.1.0.4", Some(2)), ("10.1.0.6", None)])
        {
            assert!(j.contains(&format!("\"addr\":\"{backend}\"")) && j.contains("\"port\":53"), "{j}");
            match modulus {
                Some(n) => assert!(j.contains(&format!("\"mod\":{n}")) && j.contains("\"right\":0"), "{j}"),
                None => assert!(!j.contains("numgen"), "{j}"),
            }
        }
    }

    #[test]
    fn hairpin_only_ports_are_looked_up_for_containers_only() {
        let mut r = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false)]);
        r.mesh_address(snat("a", "10.1.0.5"));
        r.publish_mesh([mesh("web", Proto::Tcp, 30080, 8080, &["10.1.0.2"], true)]);
        let rules = json_rules(&r);
        let lookups: Vec<_> = rules.iter().filter(|(_, j)| j.contains("\"vmap\"")).collect();
        assert_eq!(lookups.len(), 1, "{lookups:?}");
        assert_eq!(lookups[0].0, "prerouting", "not output: the host's own clients take the eBPF path");
        assert!(lookups[0].1.contains("\"iifname\"") && lookups[0].1.contains("trb-*"), "{}", lookups[0].1);
    }

    #[test]
    fn no_mesh_address_or_no_backend_leaves_the_table_as_before() {
        let plain = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false)]);
        let mut r = plain.clone();
        // Without an address to SNAT to, nothing can be published yet.
        r.publish_mesh([mesh("web", Proto::Tcp, 30080, 8080, &["10.1.0.2"], false)]);
        assert_eq!(r.fingerprint(), plain.fingerprint());
        // Without a backend: the port is the host's (it refuses).
        let mut r = plain.clone();
        r.mesh_address(snat("a", "10.1.0.5"));
        r.publish_mesh([mesh("web", Proto::Tcp, 30080, 8080, &[], false)]);
        assert_eq!(r.fingerprint(), plain.fingerprint());
        assert!(!to_nft_json(&r.batch()).unwrap().contains("mesh_"));
    }

    #[test]
    fn no_published_ports_leave_the_table_as_before() {
        let r = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false)]);
        let mut p = r.clone();
        p.publish("trb-a", []);
        assert_eq!(p.fingerprint(), r.fingerprint());
        assert!(p.localnet.is_empty());
    }
}
