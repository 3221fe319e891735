//! The Trellis eBPF datapath.
//!
//! The programs are C (`bpf/*.bpf.c`, one header per feature in
//! `bpf/lib/`, compiled by `build.rs` with clang-19); their map layouts
//! live in one header (`include/trellis.h`) mirrored here by `#[repr(C)]`
//! types whose sizes and offsets are checked on both sides (C
//! `_Static_assert`s, Rust tests). [`Datapath`] loads them with aya.
//!
//! Two programs run on the host side of every endpoint veth: on what the
//! endpoint sends, anti-spoofing, tenant isolation and service VIPs (Maglev
//! backend choice, conntrack, ARP/ping/reset answers); on what it
//! receives, the reverse translation of backends' replies. Both count per
//! endpoint. [`maglev`] builds the lookup tables the agent writes.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap, PerCpuHashMap};
use aya::programs::links::FdLink;
use aya::programs::tc::{NlOptions, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader, Pod};

/// The layout of the pinned maps (a hash of `include/trellis.h` and
/// `bpf/lib/maps.h`, made by `build.rs`): pins of another layout cannot be
/// reused by these programs.
pub const MAP_LAYOUT: &str = env!("TRELLIS_MAP_LAYOUT");

/// The compiled endpoint program.
pub static ENDPOINT_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/endpoint.bpf.o"));

/// `struct endpoint_info` of `trellis.h`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// IPv4 address in network byte order.
    pub ip: u32,
    pub mac: [u8; 6],
    pub pad: u16,
    /// The network's VNI.
    pub net_id: u32,
    pub flags: u32,
    /// The gateway (the agent's DNS server), network byte order; 0: none.
    pub gateway: u32,
    pub gw_mac: [u8; 6],
    pub pad2: u16,
    /// Its IPv6 address on a dual-stack network (all zero: none).
    pub ip6: [u8; 16],
    /// The network's IPv6 gateway, where DNS over IPv6 to outside
    /// resolvers goes (all zero: none).
    pub gw6: [u8; 16],
    /// Its own tables' key in the per-endpoint maps of maps (0: none);
    /// set by [`Datapath::set_endpoint`] ([`slots`]).
    pub slot: u32,
    pub pad3: u32,
}

// SAFETY: plain old data with no padding the compiler may leave
// uninitialised (checked by the layout test).
unsafe impl Pod for EndpointInfo {}

/// `CFG_EVENTS` of `struct config`: send monitor events.
pub const CFG_EVENTS: u32 = 1;
/// `CFG_DNS_KERNEL`: answer A queries found in the `dns` map in the program.
pub const CFG_DNS_KERNEL: u32 = 2;
/// `CFG_DNS_RA`: the agent's DNS server forwards (its answers set RA).
pub const CFG_DNS_RA: u32 = 4;
/// `CFG_MESH`: some service is published on the mesh.
pub const CFG_MESH: u32 = 8;
/// `EP_DNS_FAST` of `endpoint_info.flags`.
pub const EP_DNS_FAST: u32 = 4;

/// `EP_INTERNAL`: the endpoint's network is internal (nothing leaves it).
pub const EP_INTERNAL: u32 = 1;
/// `EP_DNS`: DNS to outside resolvers goes to the gateway.
pub const EP_DNS: u32 = 2;

impl EndpointInfo {
    pub fn new(ip: Ipv4Addr, mac: [u8; 6], net_id: u32) -> EndpointInfo {
        EndpointInfo {
            ip: be(ip),
            mac,
            pad: 0,
            net_id,
            flags: 0,
            gateway: 0,
            gw_mac: [0; 6],
            pad2: 0,
            ip6: [0; 16],
            gw6: [0; 16],
            slot: 0,
            pad3: 0,
        }
    }

    /// Its IPv6 address: a global source it may send from.
    pub fn with_ip6(mut self, ip6: std::net::Ipv6Addr) -> EndpointInfo {
        self.ip6 = ip6.octets();
        self
    }

    pub fn with_flags(mut self, flags: u32) -> EndpointInfo {
        self.flags = flags;
        self
    }

    /// DNS queries to resolvers outside Trellis go to `gateway` (whose
    /// MAC is `mac`) instead.
    pub fn with_dns_at(mut self, gateway: Ipv4Addr, mac: [u8; 6]) -> EndpointInfo {
        self.flags |= EP_DNS;
        self.gateway = be(gateway);
        self.gw_mac = mac;
        self
    }

    /// And DNS over IPv6 to resolvers outside Trellis goes to `gateway6`
    /// (the same bridge, the same MAC as [`EndpointInfo::with_dns_at`]).
    pub fn with_dns6_at(mut self, gateway6: std::net::Ipv6Addr) -> EndpointInfo {
        self.gw6 = gateway6.octets();
        self
    }
}

/// An address as the maps hold it (network byte order in a `u32`).
pub fn be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The address of a map's `u32`.
pub fn ip_of(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

/// `struct net_info`: a Trellis subnet's network (value of the `nets` LPM
/// trie, keyed by prefix).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct NetInfo {
    pub net_id: u32,
    pub flags: u32,
}

/// `struct vip_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct VipInfo {
    pub net_id: u32,
    pub backends: u32,
}

/// `struct svc_key`: VIP, port (network order) and IP protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SvcKey {
    pub vip: u32,
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

impl SvcKey {
    pub fn new(vip: Ipv4Addr, port: u16, proto: u8) -> SvcKey {
        SvcKey { vip: be(vip), port: port.to_be(), proto, pad: 0 }
    }
}

/// `struct svc_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct SvcInfo {
    pub id: u32,
    /// Network order.
    pub target_port: u16,
    pub pad: u16,
    pub count: u32,
    /// A digest of the backend set its Maglev table was built from.
    pub revision: u32,
}

/// `MAGLEV_M` of `trellis.h`.
pub const MAGLEV_M: usize = 509;

/// `struct maglev_table`: backend address per slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    pub ip: [u32; MAGLEV_M],
}

/// `struct backend_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendKey {
    pub svc_id: u32,
    pub ip: u32,
}

/// `struct backend_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackendInfo {
    pub mac: [u8; 6],
    pub pad: u16,
}

/// `struct ct_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtKey {
    pub client: u32,
    pub vip: u32,
    pub cport: u16,
    pub vport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// `struct ct_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    pub backend: u32,
    pub bport: u16,
    pub mac: [u8; 6],
    pub svc_id: u32,
    /// `CT_*` ([`conntrack::State`]).
    pub state: u8,
    pub pad: [u8; 3],
    /// `bpf_ktime_get_coarse_ns` of its last packet (to a second).
    pub seen: u64,
}

/// `struct svc_stats` (one per CPU in the map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcStats {
    pub selections: u64,
    pub resets: u64,
}

/// `struct pub_key`: a port every host accepts for a service (the routing
/// mesh), network order, and its IP protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PubKey {
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

impl PubKey {
    pub fn new(port: u16, proto: u8) -> PubKey {
        PubKey { port: port.to_be(), proto, pad: 0 }
    }
}

/// `struct pub_info`: the service behind a published port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct PubInfo {
    /// The service's id (its `maglev` table and `backends`).
    pub id: u32,
    /// The backends' port, network order.
    pub target_port: u16,
    pub pad: u16,
    pub count: u32,
    pub revision: u32,
    /// The ifindex of the service network's bridge on this host.
    pub bridge: u32,
}

/// `struct mesh_config`: this host's mesh MAC.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshConfig {
    pub mac: [u8; 6],
    pub pad: u16,
}

/// `struct rnat_key`: a backend's reply as the datapath keys it (client,
/// backend, their ports, protocol); the key of `mesh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RnatKey {
    pub client: u32,
    pub backend: u32,
    pub cport: u16,
    pub bport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// `struct rnat_value`: the VIP and port a backend's replies must come
/// from.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RnatValue {
    pub vip: u32,
    pub vport: u16,
    /// `RNAT_CLOSING` ([`conntrack::RNAT_CLOSING`]).
    pub flags: u8,
    pub pad: u8,
    /// As [`CtValue::seen`], from the replies.
    pub seen: u64,
}

/// `FLOW6_VIP`: an endpoint's flow to an IPv6 VIP (in `ep_flows6`).
pub const FLOW6_VIP: u8 = 1;
/// `FLOW6_REPLY`: what comes back to an endpoint's port from a backend of
/// an IPv6 VIP flow, or from the gateway's DNS (in `ep_flows6`).
pub const FLOW6_REPLY: u8 = 2;

/// `struct flow6_key`: one direction of an endpoint's IPv6 flow (its own
/// address is the client's): [`FLOW6_VIP`] the VIP and port asked, or
/// [`FLOW6_REPLY`] the address and port replies come from, with the
/// endpoint's port; ports in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Flow6Key {
    pub addr: [u8; 16],
    pub cport: u16,
    pub port: u16,
    pub proto: u8,
    pub kind: u8,
    pub pad: [u8; 2],
}

/// `struct flow6_value`: for a [`FLOW6_VIP`] key the backend chosen (as a
/// [`CtValue`]), for a [`FLOW6_REPLY`] key the address and port the
/// replies must come from (as an [`RnatValue`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow6Value {
    pub addr: [u8; 16],
    pub port: u16,
    pub mac: [u8; 6],
    pub svc_id: u32,
    pub state: u8,
    pub flags: u8,
    pub pad: [u8; 2],
    pub seen: u64,
}

/// `struct svc6_key`: an IPv6 VIP, port (network order) and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Svc6Key {
    pub vip: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

impl Svc6Key {
    pub fn new(vip: Ipv6Addr, port: u16, proto: u8) -> Svc6Key {
        Svc6Key { vip: vip.octets(), port: port.to_be(), proto, pad: 0 }
    }
}

/// `struct maglev6_table`: backend address per slot (all zero: none).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Maglev6Table {
    pub ip: [[u8; 16]; MAGLEV_M],
}

/// `struct backend6_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend6Key {
    pub svc_id: u32,
    pub ip: [u8; 16],
}

/// `MESH_INGRESS`: this host took the connection.
pub const MESH_INGRESS: u8 = 1;
/// `MESH_RETURN`: another host did; replies go back to its mesh MAC.
pub const MESH_RETURN: u8 = 2;

/// `struct mesh_flow`: one connection through the mesh.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshFlow {
    pub addr: u32,
    pub port: u16,
    pub kind: u8,
    pub pad: u8,
    pub ifindex: u32,
    pub peer_mac: [u8; 6],
    pub own_mac: [u8; 6],
}

/// A host's mesh MAC: 06:7e and its underlay IPv4 address (unique in the
/// cluster, and never an endpoint's, which start 02:42).
pub fn mesh_mac(underlay: Ipv4Addr) -> [u8; 6] {
    let o = underlay.octets();
    [0x06, 0x7e, o[0], o[1], o[2], o[3]]
}

/// The map values and keys shared with the C programs are plain old data.
macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: a `#[repr(C)]` struct of integers and byte arrays with
            // no padding (each one's size and offsets are checked against
            // the C layout by the layout tests), so every bit pattern is valid.
            unsafe impl Pod for $t {}
        )*
    };
}

pod!(
    NetInfo,
    VipInfo,
    SvcKey,
    SvcInfo,
    MaglevTable,
    BackendKey,
    BackendInfo,
    CtKey,
    CtValue,
    SvcStats,
    DnsKey,
    DnsAnswer,
    DnsStats,
    PubKey,
    PubInfo,
    MeshConfig,
    RnatKey,
    RnatValue,
    Flow6Key,
    Flow6Value,
    Svc6Key,
    Maglev6Table,
    Backend6Key,
    MeshFlow
);

/// Longest query name (wire format) the in-kernel DNS path answers.
pub const DNS_NAME_MAX: usize = 64;

/// The record types the in-kernel DNS path answers.
pub const DNS_TYPE_A: u16 = 1;
pub const DNS_TYPE_AAAA: u16 = 28;

/// A name of the in-kernel DNS table: its network, the record type asked
/// for and the name in wire format (length-prefixed labels, the root's 0),
/// lower case, zero-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DnsKey {
    pub net_id: u32,
    pub qtype: u16,
    pub pad: u16,
    pub name: [u8; DNS_NAME_MAX],
}

impl DnsKey {
    /// The A key of `name` (dotted, case-insensitive) in network `net_id`;
    /// `None` when its wire form does not fit or it is not a valid name.
    pub fn new(net_id: u32, name: &str) -> Option<DnsKey> {
        Self::of_type(net_id, name, DNS_TYPE_A)
    }

    /// The key of `name`'s record of type `qtype` (A or AAAA).
    pub fn of_type(net_id: u32, name: &str, qtype: u16) -> Option<DnsKey> {
        let mut k = DnsKey { net_id, qtype, pad: 0, name: [0; DNS_NAME_MAX] };
        let mut at = 0;
        for label in name.trim_end_matches('.').split('.') {
            let b = label.as_bytes();
            if b.is_empty() || b.len() > 63 || at + 1 + b.len() + 1 > DNS_NAME_MAX {
                return None;
            }
            k.name[at] = b.len() as u8;
            for (i, c) in b.iter().enumerate() {
                k.name[at + 1 + i] = c.to_ascii_lowercase();
            }
            at += 1 + b.len();
        }
        Some(k)
    }
}

/// The one address (of the key's family) a name of the in-kernel DNS
/// table has.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsAnswer {
    pub ttl: u32,
    /// Network byte order; an IPv4 address in the first 4 bytes.
    pub addr: [u8; 16],
}

impl DnsAnswer {
    pub fn new(ip: impl Into<std::net::IpAddr>, ttl: u32) -> DnsAnswer {
        let mut addr = [0; 16];
        match ip.into() {
            std::net::IpAddr::V4(v4) => addr[..4].copy_from_slice(&v4.octets()),
            std::net::IpAddr::V6(v6) => addr = v6.octets(),
        }
        DnsAnswer { ttl, addr }
    }
}

/// What the in-kernel DNS path did, summed over CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsStats {
    pub answered: u64,
    pub passed: u64,
}

pub mod conntrack;
pub mod maglev;
pub mod slots;

/// `enum drop_reason` of `trellis.h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    SpoofMac = 0,
    SpoofIp = 1,
    SpoofArp = 2,
    SpoofIpv6 = 3,
    Malformed = 4,
    Isolation = 5,
    NoService = 6,
    NoBackend = 7,
    TableFull = 8,
}

impl DropReason {
    pub const ALL: [DropReason; DROP_REASONS] = [
        DropReason::SpoofMac,
        DropReason::SpoofIp,
        DropReason::SpoofArp,
        DropReason::SpoofIpv6,
        DropReason::Malformed,
        DropReason::Isolation,
        DropReason::NoService,
        DropReason::NoBackend,
        DropReason::TableFull,
    ];

    /// The name metrics and the monitor use.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::SpoofMac => "spoofed_mac",
            DropReason::SpoofIp => "spoofed_ip",
            DropReason::SpoofArp => "spoofed_arp",
            DropReason::SpoofIpv6 => "spoofed_ipv6",
            DropReason::Malformed => "malformed",
            DropReason::Isolation => "isolation",
            DropReason::NoService => "no_service",
            DropReason::NoBackend => "no_backend",
            DropReason::TableFull => "table_full",
        }
    }
}

pub const DROP_REASONS: usize = 9;

/// `enum table` of `trellis.h`: the tables an endpoint has a share of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Table {
    /// Its connections to VIPs (`ep_ct`).
    Ct = 0,
    /// Their reverse translations (`ep_rnat`).
    Rnat = 1,
    /// The monitor's ring buffer.
    Events = 2,
}

impl Table {
    pub const ALL: [Table; TABLES] = [Table::Ct, Table::Rnat, Table::Events];

    /// The name metrics use (`trellis_datapath_table_full_total{table}`).
    pub fn name(self) -> &'static str {
        match self {
            Table::Ct => "conntrack",
            Table::Rnat => "reverse_nat",
            Table::Events => "monitor_events",
        }
    }
}

pub const TABLES: usize = 3;

/// `struct endpoint_counters` of `trellis.h` (one per CPU in the map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounters {
    pub from_packets: u64,
    pub from_bytes: u64,
    pub to_packets: u64,
    pub to_bytes: u64,
    pub drops: [u64; DROP_REASONS],
    /// Times its share of a table was spent, by [`Table`].
    pub full: [u64; TABLES],
}

// SAFETY: as above.
unsafe impl Pod for EndpointCounters {}

/// `struct flow_event` of `trellis.h`: one record of the `events` ring
/// buffer (a drop, or a flow that started).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub ifindex: u32,
    /// IPv4: the first 4 bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// IP protocol (IPv6: next header).
    pub proto: u8,
    /// 0 passed, 1 dropped.
    pub verdict: u8,
    pub reason: u8,
    /// 4, 6, or 0: neither (ARP and such).
    pub family: u8,
}

impl FlowEvent {
    /// Read one record (`None` when it has the wrong size).
    pub fn from_bytes(b: &[u8]) -> Option<FlowEvent> {
        if b.len() < std::mem::size_of::<FlowEvent>() {
            return None;
        }
        let addr = |i: usize| -> [u8; 16] { b[i..i + 16].try_into().expect("16 bytes") };
        Some(FlowEvent {
            ifindex: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            saddr: addr(4),
            daddr: addr(20),
            sport: u16::from_be_bytes([b[36], b[37]]),
            dport: u16::from_be_bytes([b[38], b[39]]),
            proto: b[40],
            verdict: b[41],
            reason: b[42],
            family: b[43],
        })
    }

    fn addr(&self, a: &[u8; 16]) -> Option<std::net::IpAddr> {
        match self.family {
            4 => Some(Ipv4Addr::new(a[0], a[1], a[2], a[3]).into()),
            6 => Some(Ipv6Addr::from(*a).into()),
            _ => None,
        }
    }

    /// The source address (none for a frame neither IPv4 nor IPv6).
    pub fn src(&self) -> Option<std::net::IpAddr> {
        self.addr(&self.saddr)
    }

    pub fn dst(&self) -> Option<std::net::IpAddr> {
        self.addr(&self.daddr)
    }

    pub fn reason_name(&self) -> &'static str {
        DropReason::ALL.get(self.reason as usize).map(|r| r.name()).unwrap_or("unknown")
    }
}

impl EndpointCounters {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    /// Times the endpoint found its share of `table` spent.
    pub fn full(&self, table: Table) -> u64 {
        self.full[table as usize]
    }
}

/// How a program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// tcx where the kernel has it (≥ 6.6), clsact below.
    Auto,
    /// A clsact qdisc and a tc filter, as on kernels before 6.6.
    Clsact,
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("eBPF program {call}: {source}")]
    Program {
        call: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {call}: {source}")]
    Map {
        call: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("pinning a link at {path}: {reason}")]
    Pin { path: std::path::PathBuf, reason: String },
    #[error("adding a clsact qdisc to {ifname}: {source}")]
    Clsact { ifname: String, source: std::io::Error },
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// The program on what an endpoint sends (tc ingress of its host veth).
const FROM_ENDPOINT: &str = "trellis_from_endpoint";
/// The program on what it receives (tc egress).
const TO_ENDPOINT: &str = "trellis_to_endpoint";
/// The routing mesh's program on an uplink (tc ingress).
const FROM_UPLINK: &str = "trellis_from_uplink";
/// The routing mesh's program on a network's VXLAN device (tc ingress).
const FROM_TUNNEL: &str = "trellis_from_tunnel";

/// Where a mesh program goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MeshRole {
    /// An interface outside clients reach the host on.
    Uplink,
    /// A network's VXLAN device (replies come back over it).
    Tunnel,
}

impl MeshRole {
    fn program(self) -> &'static str {
        match self {
            MeshRole::Uplink => FROM_UPLINK,
            MeshRole::Tunnel => FROM_TUNNEL,
        }
    }
}

/// The loaded endpoint programs and their maps.
pub struct Datapath {
    ebpf: Ebpf,
    /// The size of each endpoint's own flow tables made from now on.
    flow_quota: u32,
    /// Where its maps are pinned (the refiller opens the outer maps there).
    pin_dir: std::path::PathBuf,
    /// The per-endpoint tables' slots, and the thread that prepares spare
    /// ones (started with the first endpoint).
    slots: std::sync::Arc<slots::Shared>,
    refiller: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.slots.lock().stop = true;
        self.slots.wake.notify_all();
        if let Some(t) = self.refiller.take() {
            let _ = t.join();
        }
    }
}

/// How many flows an endpoint may track at once by default (its
/// connections to VIPs; as many reverse translations). Its tables are not
/// preallocated: a full one is about 10 MiB.
pub const FLOWS_PER_ENDPOINT: u32 = 65536;

/// `BPF_F_NO_PREALLOC`, the flag of the flow tables' template (an inner
/// map must have the template's flags).
const NO_PREALLOC: u32 = 1;

/// What one sweep of the endpoints' flow tables did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSweep {
    /// Flows (connection entries) still tracked, over every endpoint.
    pub live: usize,
    /// Connection and reverse-translation entries removed.
    pub removed_ct: usize,
    pub removed_rnat: usize,
}

type CtTable = HashMap<aya::maps::MapData, CtKey, CtValue>;
type RnatTable = HashMap<aya::maps::MapData, RnatKey, RnatValue>;
type Flows6Table = HashMap<aya::maps::MapData, Flow6Key, Flow6Value>;

/// The monotonic clock the programs stamp flows with, in ns.
pub fn flow_clock() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64,
        Err(_) => 0,
    }
}

fn map_err(call: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { call, source }
}

/// The maps of maps holding an endpoint's own tables, by its ifindex.
const PER_ENDPOINT_OUTER: [&str; 3] = ["ep_ct", "ep_rnat", "ep_flows6"];

/// `BPF_ANY`: put, replacing what is there.
const BPF_ANY_FLAG: u64 = 0;

/// Put `table` into the outer map `outer` under `slot`.
fn insert_inner<V: aya::maps::InnerMap>(
    outer: Option<&mut aya::maps::Map>,
    slot: u32,
    table: &V,
    flags: u64,
    call: &'static str,
) -> Result<()> {
    let outer = outer.ok_or(DatapathError::Missing(call))?;
    let mut m = aya::maps::HashOfMaps::<_, u32, V>::try_from(outer).map_err(map_err("open"))?;
    m.insert(slot, table, flags).map_err(|source| DatapathError::Map { call, source })
}

/// Fresh tables of `quota` entries for `slot` in the three outer maps
/// (`ep_ct`, `ep_rnat`, `ep_flows6`, in that order: the last twice the
/// quota, as it holds both directions of a flow), replacing what the slot
/// had. Each put waits for an RCU grace period: the three go from three
/// threads at once.
fn prepare_slot(outers: [Option<&mut aya::maps::Map>; 3], slot: u32, quota: u32, flags: u64) -> Result<()> {
    let ct = CtTable::create(quota, NO_PREALLOC).map_err(map_err("create a flow table"))?;
    let rnat = RnatTable::create(quota, NO_PREALLOC).map_err(map_err("create a reverse-NAT table"))?;
    let flows6 =
        Flows6Table::create(quota.saturating_mul(2), NO_PREALLOC).map_err(map_err("create an IPv6 flow table"))?;
    let [a, b, c] = outers;
    std::thread::scope(|scope| {
        let hs = [
            scope.spawn(move || insert_inner(a, slot, &ct, flags, "add a flow table")),
            scope.spawn(move || insert_inner(b, slot, &rnat, flags, "add a reverse-NAT table")),
            scope.spawn(move || insert_inner(c, slot, &flows6, flags, "add an IPv6 flow table")),
        ];
        hs.into_iter().try_for_each(|h| h.join().map_err(|_| DatapathError::Missing("a flow-table thread"))?)
    })
}

/// A removal of something already gone is fine.
fn removed(r: std::result::Result<(), aya::maps::MapError>, call: &'static str) -> Result<()> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        // (aya's hash map removal reports a missing key as the syscall's ENOENT.)
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Map { call, source }),
    }
}

impl Datapath {
    /// Load the endpoint programs with their maps pinned in `pin_dir` (a
    /// bpffs directory): maps already pinned there are reused, so endpoint
    /// entries, service tables, connections and counters outlive the
    /// process.
    pub fn load_pinned(pin_dir: &Path) -> Result<Datapath> {
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pin_dir);
        // (Its maps are declared pinned by name: loading needs a bpffs.)
        let mut ebpf = loader.load(ENDPOINT_OBJECT)?;
        for name in [FROM_ENDPOINT, TO_ENDPOINT, FROM_UPLINK, FROM_TUNNEL] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::Missing("endpoint program"))?
                .try_into()
                .map_err(|source| DatapathError::Program { call: "lookup", source })?;
            prog.load().map_err(|source| DatapathError::Program { call: "load", source })?;
        }
        let dp = Datapath {
            ebpf,
            flow_quota: FLOWS_PER_ENDPOINT,
            pin_dir: pin_dir.to_path_buf(),
            slots: std::sync::Arc::new(slots::Shared::default()),
            refiller: None,
        };
        // Slots found pinned: those with tables, those endpoints hold.
        let mut present = std::collections::BTreeSet::new();
        for name in PER_ENDPOINT_OUTER {
            let keys = dp.outer::<CtTable>(name)?.keys().collect::<std::result::Result<Vec<u32>, _>>();
            present.extend(keys.map_err(map_err("list the per-endpoint tables"))?);
        }
        let used = dp.entries::<u32, EndpointInfo>("endpoints")?.into_iter().map(|(_, e)| e.slot).collect();
        *dp.slots.lock() = slots::Pool::recovered(&present, &used, FLOWS_PER_ENDPOINT);
        Ok(dp)
    }

    /// The size of the flow tables of endpoints programmed from now on
    /// (an endpoint's tables, once made, keep theirs; spare ones of
    /// another size are made again).
    pub fn set_flow_quota(&mut self, quota: u32) {
        self.flow_quota = quota.max(1);
        self.slots.lock().quota = self.flow_quota;
        self.slots.wake.notify_all();
    }

    /// Start the thread that keeps spare slots ready (once).
    fn start_refiller(&mut self) {
        if self.refiller.is_some() {
            return;
        }
        let shared = self.slots.clone();
        let dir = self.pin_dir.clone();
        let spawned = std::thread::Builder::new().name("trellis-slots".into()).spawn(move || {
            let open =
                |name: &str| aya::maps::MapData::from_pin(dir.join(name)).and_then(aya::maps::Map::from_map_data);
            let (Ok(mut ct), Ok(mut rnat), Ok(mut flows6)) = (open("ep_ct"), open("ep_rnat"), open("ep_flows6")) else {
                return; // (unpinned: every slot is prepared by the caller)
            };
            slots::refill(shared, |slot, quota| {
                prepare_slot([Some(&mut ct), Some(&mut rnat), Some(&mut flows6)], slot, quota, BPF_ANY_FLAG).is_ok()
            });
        });
        self.refiller = spawned.ok();
    }

    fn outer<V: aya::maps::InnerMap>(
        &self,
        name: &'static str,
    ) -> Result<aya::maps::HashOfMaps<&aya::maps::MapData, u32, V>> {
        let map = self.ebpf.map(name).ok_or(DatapathError::Missing(name))?;
        aya::maps::HashOfMaps::try_from(map).map_err(map_err("open"))
    }

    /// The per-endpoint outer maps (maps of maps), each on its own.
    fn outer_maps(&mut self) -> Result<std::collections::HashMap<&str, &mut aya::maps::Map>> {
        let maps: std::collections::HashMap<&str, &mut aya::maps::Map> =
            self.ebpf.maps_mut().filter(|(n, _)| PER_ENDPOINT_OUTER.contains(n)).collect();
        if let Some(missing) = PER_ENDPOINT_OUTER.iter().find(|n| !maps.contains_key(*n)) {
            return Err(DatapathError::Missing(missing));
        }
        Ok(maps)
    }

    /// The slot of endpoint `ifindex`'s tables (none: no such endpoint, or
    /// it has none).
    pub fn endpoint_slot(&self, ifindex: u32) -> Result<Option<u32>> {
        self.slot_of(ifindex)
    }

    /// How many slots are ready for new endpoints.
    pub fn spare_slots(&self) -> usize {
        self.slots.lock().spare.len()
    }

    fn slot_of(&self, ifindex: u32) -> Result<Option<u32>> {
        let map = self.ebpf.map("endpoints").ok_or(DatapathError::Missing("endpoints"))?;
        let m: HashMap<_, u32, EndpointInfo> = HashMap::try_from(map).map_err(map_err("open endpoints"))?;
        match m.get(&ifindex, 0) {
            Ok(e) => Ok(Some(e.slot).filter(|s| *s != 0)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DatapathError::Map { call: "look up an endpoint", source }),
        }
    }

    /// The table of `slot` in the per-endpoint outer map `outer`.
    fn slot_table<V: aya::maps::FromMapData + aya::maps::InnerMap>(
        &self,
        outer: &'static str,
        slot: u32,
    ) -> Result<Option<V>> {
        match self.outer::<V>(outer)?.get(&slot, 0) {
            Ok(m) => Ok(Some(m)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DatapathError::Map { call: "open a per-endpoint table", source }),
        }
    }

    /// Endpoint `ifindex`'s table in the per-endpoint outer map `outer`.
    fn endpoint_table<V: aya::maps::FromMapData + aya::maps::InnerMap>(
        &self,
        outer: &'static str,
        ifindex: u32,
    ) -> Result<Option<V>> {
        match self.slot_of(ifindex)? {
            Some(slot) => self.slot_table(outer, slot),
            None => Ok(None),
        }
    }

    /// Endpoint `ifindex`'s IPv6 flows, both directions: its connections
    /// to IPv6 VIPs ([`FLOW6_VIP`]) and what their replies and its DNS
    /// sent to the gateway come back as ([`FLOW6_REPLY`]).
    pub fn endpoint_flows6(&self, ifindex: u32) -> Result<Vec<(Flow6Key, Flow6Value)>> {
        match self.endpoint_table::<Flows6Table>("ep_flows6", ifindex)? {
            Some(t) => t.iter().collect::<std::result::Result<Vec<_>, _>>().map_err(map_err("list IPv6 flows")),
            None => Ok(Vec::new()),
        }
    }

    /// The endpoints (ifindexes) that have flow tables.
    pub fn flow_table_ifindexes(&self) -> Result<Vec<u32>> {
        Ok(self
            .entries::<u32, EndpointInfo>("endpoints")?
            .into_iter()
            .filter(|(_, e)| e.slot != 0)
            .map(|(k, _)| k)
            .collect())
    }

    fn ct_table(&self, ifindex: u32) -> Result<Option<CtTable>> {
        self.endpoint_table("ep_ct", ifindex)
    }

    fn rnat_table(&self, ifindex: u32) -> Result<Option<RnatTable>> {
        self.endpoint_table("ep_rnat", ifindex)
    }

    /// The flows endpoint `ifindex` tracks (client flow → backend).
    pub fn endpoint_connections(&self, ifindex: u32) -> Result<Vec<(CtKey, CtValue)>> {
        match self.ct_table(ifindex)? {
            Some(t) => t.iter().collect::<std::result::Result<Vec<_>, _>>().map_err(map_err("list flows")),
            None => Ok(Vec::new()),
        }
    }

    /// The reverse translations endpoint `ifindex` keeps.
    pub fn endpoint_reverse_nat(&self, ifindex: u32) -> Result<Vec<(RnatKey, RnatValue)>> {
        match self.rnat_table(ifindex)? {
            Some(t) => t.iter().collect::<std::result::Result<Vec<_>, _>>().map_err(map_err("list reverse NAT")),
            None => Ok(Vec::new()),
        }
    }

    /// Remove the flows that are over ([`conntrack::expired`] at `now`,
    /// the [`flow_clock`]) from every endpoint's tables.
    pub fn sweep_flows(&self, now: u64, life: &conntrack::Lifetimes) -> Result<FlowSweep> {
        let mut sweep = FlowSweep::default();
        // Each endpoint's slot read once, with the endpoint entries.
        let slots: Vec<u32> = self
            .entries::<u32, EndpointInfo>("endpoints")?
            .into_iter()
            .map(|(_, e)| e.slot)
            .filter(|s| *s != 0)
            .collect();
        for slot in slots {
            let (Some(mut ct), rnat) =
                (self.slot_table::<CtTable>("ep_ct", slot)?, self.slot_table::<RnatTable>("ep_rnat", slot)?)
            else {
                continue;
            };
            let flows = ct.iter().filter_map(|r| r.ok()).collect::<Vec<_>>();
            let mut rnat = rnat;
            let replies =
                rnat.as_ref().map(|t| t.iter().filter_map(|r| r.ok()).collect::<Vec<_>>()).unwrap_or_default();
            let gone = conntrack::expired(now, &flows, &replies, life);
            for k in &gone.ct {
                removed(ct.remove(k), "remove a flow")?;
            }
            if let Some(t) = rnat.as_mut() {
                for k in &gone.rnat {
                    removed(t.remove(k), "remove a reverse translation")?;
                }
            }
            sweep.live += flows.len() - gone.ct.len();
            sweep.removed_ct += gone.ct.len();
            sweep.removed_rnat += gone.rnat.len();
            if let Some(mut t) = self.slot_table::<Flows6Table>("ep_flows6", slot)? {
                let flows6 = t.iter().filter_map(|r| r.ok()).collect::<Vec<_>>();
                let gone = conntrack::expired6(now, &flows6, life);
                for k in &gone {
                    removed(t.remove(k), "remove an IPv6 flow")?;
                }
                let live6 = flows6.iter().filter(|(k, _)| k.kind == FLOW6_VIP).count();
                let gone6 = gone.iter().filter(|k| k.kind == FLOW6_VIP).count();
                sweep.live += live6 - gone6;
                sweep.removed_ct += gone6;
                sweep.removed_rnat += gone.len() - gone6;
            }
        }
        Ok(sweep)
    }

    fn program(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        self.ebpf
            .program_mut(name)
            .ok_or(DatapathError::Missing("endpoint program"))?
            .try_into()
            .map_err(|source| DatapathError::Program { call: "lookup", source })
    }

    /// The monitor's ring buffer, taken out of the loaded object (once).
    pub fn take_events(&mut self) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        let map = self.ebpf.take_map("events").ok_or(DatapathError::Missing("events map"))?;
        aya::maps::RingBuf::try_from(map)
            .map_err(|e| DatapathError::Pin { path: "events".into(), reason: e.to_string() })
    }

    fn attach_one(
        &mut self,
        name: &str,
        ifname: &str,
        at: TcAttachType,
        mode: AttachMode,
    ) -> Result<aya::programs::tc::SchedClassifierLinkId> {
        let prog = self.program(name)?;
        match mode {
            AttachMode::Auto => prog.attach(ifname, at),
            AttachMode::Clsact => prog.attach_with_options(ifname, at, TcAttachOptions::Netlink(NlOptions::default())),
        }
        .map_err(|source| DatapathError::Program { call: "attach", source })
    }

    /// Attach both programs to `ifname` (the host side of an endpoint's
    /// veth), in the calling thread's namespace, for as long as this
    /// [`Datapath`] lives.
    pub fn attach(&mut self, ifname: &str, mode: AttachMode) -> Result<()> {
        if mode == AttachMode::Clsact {
            add_clsact(ifname)?;
        }
        self.attach_one(FROM_ENDPOINT, ifname, TcAttachType::Ingress, mode)?;
        self.attach_one(TO_ENDPOINT, ifname, TcAttachType::Egress, mode)?;
        Ok(())
    }

    /// Attach both programs to `ifname` so that they stay attached after
    /// this process exits, and leave a marker directory `marker` (in a
    /// bpffs) that says so. With tcx the links are pinned in it (`from`,
    /// `to`); with clsact the tc filters stay in the kernel by themselves.
    pub fn attach_persistent(&mut self, ifname: &str, marker: &Path, mode: AttachMode) -> Result<()> {
        if mode == AttachMode::Clsact {
            add_clsact(ifname)?;
        }
        let _ = remove_marker(marker);
        std::fs::create_dir(marker)
            .map_err(|e| DatapathError::Pin { path: marker.to_path_buf(), reason: e.to_string() })?;
        // Both at once: a tcx attachment waits for an RCU grace period
        // (~10 ms here), and two waits that overlap share one.
        let mut from = None;
        let mut to = None;
        for (name, prog) in self.ebpf.programs_mut() {
            let p: &mut SchedClassifier =
                prog.try_into().map_err(|source| DatapathError::Program { call: "lookup", source })?;
            match name {
                FROM_ENDPOINT => from = Some(p),
                TO_ENDPOINT => to = Some(p),
                _ => {}
            }
        }
        let (Some(from), Some(to)) = (from, to) else { return Err(DatapathError::Missing("endpoint program")) };
        let results = std::thread::scope(|scope| {
            let jobs = [(from, TcAttachType::Ingress, "from"), (to, TcAttachType::Egress, "to")]
                .map(|(prog, at, pin)| scope.spawn(move || attach_pinned(prog, ifname, at, mode, &marker.join(pin))));
            jobs.map(|j| j.join().unwrap_or_else(|_| Err(DatapathError::Missing("attach thread"))))
        });
        for r in results {
            r?;
        }
        Ok(())
    }

    /// Attach the mesh program of `role` to the tc ingress of `ifname` for
    /// good, with a marker directory `marker` (the tcx link pinned in it
    /// as `from`, as for endpoints; [`remove_marker`] undoes it).
    pub fn attach_mesh_persistent(
        &mut self,
        ifname: &str,
        role: MeshRole,
        marker: &Path,
        mode: AttachMode,
    ) -> Result<()> {
        if mode == AttachMode::Clsact {
            add_clsact(ifname)?;
        }
        let _ = remove_marker(marker);
        std::fs::create_dir(marker)
            .map_err(|e| DatapathError::Pin { path: marker.to_path_buf(), reason: e.to_string() })?;
        let prog = self.program(role.program())?;
        attach_pinned(prog, ifname, TcAttachType::Ingress, mode, &marker.join("from"))
    }

    /// The published ports (the routing mesh).
    pub fn published(&self) -> Result<Vec<(PubKey, PubInfo)>> {
        self.entries("published")
    }

    pub fn put_published(&mut self, key: PubKey, info: PubInfo) -> Result<()> {
        self.put("published", key, info)
    }

    pub fn remove_published(&mut self, key: PubKey) -> Result<()> {
        self.delete::<PubKey, PubInfo>("published", key)
    }

    /// The host addresses the mesh answers on.
    pub fn mesh_addrs(&self) -> Result<Vec<Ipv4Addr>> {
        Ok(self.entries::<u32, u32>("mesh_addrs")?.into_iter().map(|(k, _)| ip_of(k)).collect())
    }

    pub fn put_mesh_addr(&mut self, addr: Ipv4Addr) -> Result<()> {
        self.put("mesh_addrs", be(addr), 1u32)
    }

    pub fn remove_mesh_addr(&mut self, addr: Ipv4Addr) -> Result<()> {
        self.delete::<u32, u32>("mesh_addrs", be(addr))
    }

    /// This host's mesh MAC (all zero: none set).
    pub fn mesh_mac(&self) -> Result<[u8; 6]> {
        let map = self.ebpf.map("mesh_config").ok_or(DatapathError::Missing("mesh_config"))?;
        let a: aya::maps::Array<_, MeshConfig> = aya::maps::Array::try_from(map).map_err(map_err("open"))?;
        Ok(a.get(&0, 0).map_err(map_err("read mesh_config"))?.mac)
    }

    pub fn set_mesh_mac(&mut self, mac: [u8; 6]) -> Result<()> {
        let map = self.ebpf.map_mut("mesh_config").ok_or(DatapathError::Missing("mesh_config"))?;
        let mut a: aya::maps::Array<_, MeshConfig> = aya::maps::Array::try_from(map).map_err(map_err("open"))?;
        a.set(0, MeshConfig { mac, pad: 0 }, 0).map_err(map_err("write mesh_config"))
    }

    /// The connections through the mesh this host knows.
    pub fn mesh_flows(&self) -> Result<Vec<(RnatKey, MeshFlow)>> {
        self.entries("mesh")
    }

    fn hash<K: Pod, V: Pod>(&self, name: &'static str) -> Result<HashMap<&aya::maps::MapData, K, V>> {
        let map = self.ebpf.map(name).ok_or(DatapathError::Missing(name))?;
        HashMap::try_from(map).map_err(map_err("open"))
    }

    fn hash_mut<K: Pod, V: Pod>(&mut self, name: &'static str) -> Result<HashMap<&mut aya::maps::MapData, K, V>> {
        let map = self.ebpf.map_mut(name).ok_or(DatapathError::Missing(name))?;
        HashMap::try_from(map).map_err(map_err("open"))
    }

    fn put<K: Pod, V: Pod>(&mut self, name: &'static str, key: K, value: V) -> Result<()> {
        self.hash_mut::<K, V>(name)?.insert(key, value, 0).map_err(map_err("insert"))
    }

    fn delete<K: Pod, V: Pod>(&mut self, name: &'static str, key: K) -> Result<()> {
        removed(self.hash_mut::<K, V>(name)?.remove(&key), "remove")
    }

    fn entries<K: Pod, V: Pod>(&self, name: &'static str) -> Result<Vec<(K, V)>> {
        self.hash::<K, V>(name)?.iter().collect::<std::result::Result<Vec<_>, _>>().map_err(map_err("list"))
    }

    /// Remove an endpoint's entry and its counters (both keyed by the
    /// ifindex of its veth: nothing else removes them when it goes).
    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<()> {
        // Its slot goes back to be given fresh tables (its flows go with
        // the old ones, freed by the kernel with their last reference), and
        // its share of the monitor's ring.
        let slot = self.slot_of(ifindex)?;
        self.delete::<u32, EndpointInfo>("endpoints", ifindex)?;
        if let Some(s) = slot {
            self.slots.lock().release(s);
            self.slots.wake.notify_all();
        }
        self.delete::<u32, [u8; 16]>("event_budget", ifindex)?;
        let map = self.ebpf.map_mut("counters").ok_or(DatapathError::Missing("counters map"))?;
        let mut per_cpu: PerCpuHashMap<_, u32, EndpointCounters> =
            PerCpuHashMap::try_from(map).map_err(map_err("open counters"))?;
        removed(per_cpu.remove(&ifindex), "remove counters")
    }

    /// The ifindexes that have counters (the program makes them).
    pub fn counter_ifindexes(&self) -> Result<Vec<u32>> {
        let map = self.ebpf.map("counters").ok_or(DatapathError::Missing("counters map"))?;
        let per_cpu: PerCpuHashMap<_, u32, EndpointCounters> =
            PerCpuHashMap::try_from(map).map_err(map_err("open counters"))?;
        per_cpu.keys().collect::<std::result::Result<Vec<_>, _>>().map_err(map_err("list counters"))
    }

    /// Every endpoint entry, by ifindex.
    pub fn endpoint_entries(&self) -> Result<Vec<(u32, EndpointInfo)>> {
        self.entries("endpoints")
    }

    /// The ifindexes that have endpoint entries.
    pub fn endpoint_ifindexes(&self) -> Result<Vec<u32>> {
        Ok(self.entries::<u32, EndpointInfo>("endpoints")?.into_iter().map(|(k, _)| k).collect())
    }

    /// Program (or update) an endpoint, keyed by its host-side ifindex,
    /// with its own tables: the slot it has (an update, or an agent
    /// restarted: flows and all), else a spare one, else one prepared now
    /// (which waits for RCU grace periods: see [`slots`]).
    pub fn set_endpoint(&mut self, ifindex: u32, mut info: EndpointInfo) -> Result<()> {
        self.start_refiller();
        info.slot = match self.slot_of(ifindex)? {
            Some(s) => s,
            None => {
                let spare = self.slots.lock().take();
                match spare {
                    Some(s) => s,
                    None => {
                        let (slot, quota) = {
                            let mut pool = self.slots.lock();
                            (pool.fresh(), pool.quota)
                        };
                        let mut outers = self.outer_maps()?;
                        let maps = [outers.remove("ep_ct"), outers.remove("ep_rnat"), outers.remove("ep_flows6")];
                        if let Err(e) = prepare_slot(maps, slot, quota, BPF_ANY_FLAG) {
                            self.slots.lock().release(slot);
                            return Err(e);
                        }
                        slot
                    }
                }
            }
        };
        self.slots.wake.notify_all();
        self.put("endpoints", ifindex, info)
    }

    fn nets_map(&self) -> Result<LpmTrie<&aya::maps::MapData, u32, NetInfo>> {
        let map = self.ebpf.map("nets").ok_or(DatapathError::Missing("nets"))?;
        LpmTrie::try_from(map).map_err(map_err("open"))
    }

    fn nets_map_mut(&mut self) -> Result<LpmTrie<&mut aya::maps::MapData, u32, NetInfo>> {
        let map = self.ebpf.map_mut("nets").ok_or(DatapathError::Missing("nets"))?;
        LpmTrie::try_from(map).map_err(map_err("open"))
    }

    /// Every Trellis subnet the isolation check knows, with its network.
    pub fn nets(&self) -> Result<Vec<((Ipv4Addr, u8), NetInfo)>> {
        let m = self.nets_map()?;
        let mut out = Vec::new();
        for kv in m.iter() {
            let (k, v) = kv.map_err(map_err("list nets"))?;
            out.push(((ip_of(k.data()), k.prefix_len() as u8), v));
        }
        Ok(out)
    }

    pub fn put_net(&mut self, (ip, len): (Ipv4Addr, u8), info: NetInfo) -> Result<()> {
        self.nets_map_mut()?.insert(&LpmKey::new(len as u32, be(ip)), info, 0).map_err(map_err("insert net"))
    }

    pub fn remove_net(&mut self, (ip, len): (Ipv4Addr, u8)) -> Result<()> {
        removed(self.nets_map_mut()?.remove(&LpmKey::new(len as u32, be(ip))), "remove net")
    }

    fn nets6_map(&self) -> Result<LpmTrie<&aya::maps::MapData, [u8; 16], NetInfo>> {
        let map = self.ebpf.map("nets6").ok_or(DatapathError::Missing("nets6"))?;
        LpmTrie::try_from(map).map_err(map_err("open"))
    }

    fn nets6_map_mut(&mut self) -> Result<LpmTrie<&mut aya::maps::MapData, [u8; 16], NetInfo>> {
        let map = self.ebpf.map_mut("nets6").ok_or(DatapathError::Missing("nets6"))?;
        LpmTrie::try_from(map).map_err(map_err("open"))
    }

    /// Every IPv6 subnet the isolation check knows, with its network.
    pub fn nets6(&self) -> Result<Vec<((std::net::Ipv6Addr, u8), NetInfo)>> {
        let m = self.nets6_map()?;
        let mut out = Vec::new();
        for kv in m.iter() {
            let (k, v) = kv.map_err(map_err("list IPv6 nets"))?;
            out.push(((std::net::Ipv6Addr::from(k.data()), k.prefix_len() as u8), v));
        }
        Ok(out)
    }

    pub fn put_net6(&mut self, (ip, len): (std::net::Ipv6Addr, u8), info: NetInfo) -> Result<()> {
        self.nets6_map_mut()?.insert(&LpmKey::new(len as u32, ip.octets()), info, 0).map_err(map_err("insert IPv6 net"))
    }

    pub fn remove_net6(&mut self, (ip, len): (std::net::Ipv6Addr, u8)) -> Result<()> {
        removed(self.nets6_map_mut()?.remove(&LpmKey::new(len as u32, ip.octets())), "remove IPv6 net")
    }

    pub fn vips(&self) -> Result<Vec<(Ipv4Addr, VipInfo)>> {
        Ok(self.entries::<u32, VipInfo>("vips")?.into_iter().map(|(k, v)| (ip_of(k), v)).collect())
    }

    pub fn put_vip(&mut self, vip: Ipv4Addr, info: VipInfo) -> Result<()> {
        self.put("vips", be(vip), info)
    }

    pub fn remove_vip(&mut self, vip: Ipv4Addr) -> Result<()> {
        self.delete::<u32, VipInfo>("vips", be(vip))
    }

    pub fn services(&self) -> Result<Vec<(SvcKey, SvcInfo)>> {
        self.entries("services")
    }

    pub fn put_service(&mut self, key: SvcKey, info: SvcInfo) -> Result<()> {
        self.put("services", key, info)
    }

    pub fn remove_service(&mut self, key: SvcKey) -> Result<()> {
        self.delete::<SvcKey, SvcInfo>("services", key)
    }

    /// The service ids that have a Maglev table.
    pub fn maglev_ids(&self) -> Result<Vec<u32>> {
        self.hash::<u32, MaglevTable>("maglev")?
            .keys()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(map_err("list maglev"))
    }

    pub fn maglev(&self, id: u32) -> Result<Option<MaglevTable>> {
        match self.hash::<u32, MaglevTable>("maglev")?.get(&id, 0) {
            Ok(t) => Ok(Some(t)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DatapathError::Map { call: "read maglev", source }),
        }
    }

    pub fn put_maglev(&mut self, id: u32, table: &MaglevTable) -> Result<()> {
        self.put("maglev", id, *table)
    }

    pub fn remove_maglev(&mut self, id: u32) -> Result<()> {
        self.delete::<u32, MaglevTable>("maglev", id)
    }

    pub fn backends(&self) -> Result<Vec<(BackendKey, BackendInfo)>> {
        self.entries("backends")
    }

    pub fn put_backend(&mut self, key: BackendKey, info: BackendInfo) -> Result<()> {
        self.put("backends", key, info)
    }

    pub fn remove_backend(&mut self, key: BackendKey) -> Result<()> {
        self.delete::<BackendKey, BackendInfo>("backends", key)
    }

    pub fn vips6(&self) -> Result<Vec<(Ipv6Addr, VipInfo)>> {
        Ok(self.entries::<[u8; 16], VipInfo>("vips6")?.into_iter().map(|(k, v)| (Ipv6Addr::from(k), v)).collect())
    }

    pub fn put_vip6(&mut self, vip: Ipv6Addr, info: VipInfo) -> Result<()> {
        self.put("vips6", vip.octets(), info)
    }

    pub fn remove_vip6(&mut self, vip: Ipv6Addr) -> Result<()> {
        self.delete::<[u8; 16], VipInfo>("vips6", vip.octets())
    }

    pub fn services6(&self) -> Result<Vec<(Svc6Key, SvcInfo)>> {
        self.entries("services6")
    }

    pub fn put_service6(&mut self, key: Svc6Key, info: SvcInfo) -> Result<()> {
        self.put("services6", key, info)
    }

    pub fn remove_service6(&mut self, key: Svc6Key) -> Result<()> {
        self.delete::<Svc6Key, SvcInfo>("services6", key)
    }

    /// The service ids that have an IPv6 Maglev table.
    pub fn maglev6_ids(&self) -> Result<Vec<u32>> {
        self.hash::<u32, Maglev6Table>("maglev6")?
            .keys()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(map_err("list maglev6"))
    }

    pub fn put_maglev6(&mut self, id: u32, table: &Maglev6Table) -> Result<()> {
        self.put("maglev6", id, *table)
    }

    pub fn remove_maglev6(&mut self, id: u32) -> Result<()> {
        self.delete::<u32, Maglev6Table>("maglev6", id)
    }

    pub fn backends6(&self) -> Result<Vec<(Backend6Key, BackendInfo)>> {
        self.entries("backends6")
    }

    pub fn put_backend6(&mut self, key: Backend6Key, info: BackendInfo) -> Result<()> {
        self.put("backends6", key, info)
    }

    pub fn remove_backend6(&mut self, key: Backend6Key) -> Result<()> {
        self.delete::<Backend6Key, BackendInfo>("backends6", key)
    }

    /// Turn the `config` switches in `mask` on or off (the others kept).
    pub fn set_config(&mut self, mask: u32, on: bool) -> Result<()> {
        let now = self.config()?;
        let map = self.ebpf.map_mut("config").ok_or(DatapathError::Missing("config"))?;
        let mut cfg: aya::maps::Array<_, u32> = aya::maps::Array::try_from(map).map_err(map_err("open"))?;
        cfg.set(0, if on { now | mask } else { now & !mask }, 0).map_err(map_err("set config"))
    }

    /// The `config` switches.
    pub fn config(&self) -> Result<u32> {
        let map = self.ebpf.map("config").ok_or(DatapathError::Missing("config"))?;
        let cfg: aya::maps::Array<_, u32> = aya::maps::Array::try_from(map).map_err(map_err("open"))?;
        cfg.get(&0, 0).map_err(map_err("read config"))
    }

    /// Send monitor events (while someone watches) or not.
    pub fn set_events(&mut self, on: bool) -> Result<()> {
        self.set_config(CFG_EVENTS, on)
    }

    /// Are monitor events on?
    pub fn events_on(&self) -> Result<bool> {
        Ok(self.config()? & CFG_EVENTS != 0)
    }

    /// The in-kernel DNS table.
    pub fn dns_entries(&self) -> Result<Vec<(DnsKey, DnsAnswer)>> {
        self.entries("dns")
    }

    pub fn put_dns(&mut self, key: DnsKey, answer: DnsAnswer) -> Result<()> {
        self.put("dns", key, answer)
    }

    pub fn remove_dns(&mut self, key: DnsKey) -> Result<()> {
        self.delete::<DnsKey, DnsAnswer>("dns", key)
    }

    /// What the in-kernel DNS path did, summed over CPUs.
    pub fn dns_stats(&self) -> Result<DnsStats> {
        let map = self.ebpf.map("dns_stats").ok_or(DatapathError::Missing("dns_stats"))?;
        let per_cpu: aya::maps::PerCpuArray<_, DnsStats> =
            aya::maps::PerCpuArray::try_from(map).map_err(map_err("open"))?;
        let values = per_cpu.get(&0, 0).map_err(map_err("read dns_stats"))?;
        Ok(values.iter().fold(DnsStats::default(), |a, v| DnsStats {
            answered: a.answered + v.answered,
            passed: a.passed + v.passed,
        }))
    }

    /// The tracked connections to VIPs (client flow → backend) of every
    /// endpoint.
    pub fn connections(&self) -> Result<Vec<(CtKey, CtValue)>> {
        let mut all = Vec::new();
        for ifindex in self.flow_table_ifindexes()? {
            all.extend(self.endpoint_connections(ifindex)?);
        }
        Ok(all)
    }

    /// The routing mesh's tracked connections (clients outside).
    pub fn mesh_connections(&self) -> Result<Vec<(CtKey, CtValue)>> {
        self.entries("ct")
    }

    /// Remove a service's counters (the program makes them; a service
    /// made later with the same VIP starts from zero).
    pub fn remove_svc_stats(&mut self, id: u32) -> Result<()> {
        let map = self.ebpf.map_mut("svc_stats").ok_or(DatapathError::Missing("svc_stats"))?;
        let mut per_cpu: PerCpuHashMap<_, u32, SvcStats> = PerCpuHashMap::try_from(map).map_err(map_err("open"))?;
        removed(per_cpu.remove(&id), "remove svc_stats")
    }

    /// A service's counters, summed over CPUs.
    pub fn svc_stats(&self, id: u32) -> Result<SvcStats> {
        let map = self.ebpf.map("svc_stats").ok_or(DatapathError::Missing("svc_stats"))?;
        let per_cpu: PerCpuHashMap<_, u32, SvcStats> = PerCpuHashMap::try_from(map).map_err(map_err("open"))?;
        let values = match per_cpu.get(&id, 0) {
            Ok(v) => v,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(SvcStats::default()),
            Err(source) => return Err(DatapathError::Map { call: "read svc_stats", source }),
        };
        Ok(values.iter().fold(SvcStats::default(), |a, v| SvcStats {
            selections: a.selections + v.selections,
            resets: a.resets + v.resets,
        }))
    }

    /// The counters of an endpoint, summed over CPUs (zero before its
    /// first packet).
    pub fn counters(&self, ifindex: u32) -> Result<EndpointCounters> {
        let map = self.ebpf.map("counters").ok_or(DatapathError::Missing("counters map"))?;
        let per_cpu: PerCpuHashMap<_, u32, EndpointCounters> =
            PerCpuHashMap::try_from(map).map_err(|source| DatapathError::Map { call: "open counters", source })?;
        let values = match per_cpu.get(&ifindex, 0) {
            Ok(v) => v,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(EndpointCounters::default()),
            Err(source) => return Err(DatapathError::Map { call: "read counters", source }),
        };
        let mut sum = EndpointCounters::default();
        for c in values.iter() {
            sum.from_packets += c.from_packets;
            sum.from_bytes += c.from_bytes;
            sum.to_packets += c.to_packets;
            sum.to_bytes += c.to_bytes;
            for (s, d) in sum.drops.iter_mut().zip(c.drops.iter()) {
                *s += d;
            }
            for (s, d) in sum.full.iter_mut().zip(c.full.iter()) {
                *s += d;
            }
        }
        Ok(sum)
    }
}

/// Attach `prog` to `ifname` for good: a tcx link is pinned at `pin`; a
/// netlink (clsact) filter is taken out of aya's list, so dropping it does
/// not detach it.
fn attach_pinned(
    prog: &mut SchedClassifier,
    ifname: &str,
    at: TcAttachType,
    mode: AttachMode,
    pin: &Path,
) -> Result<()> {
    let id = match mode {
        AttachMode::Auto => prog.attach(ifname, at),
        AttachMode::Clsact => prog.attach_with_options(ifname, at, TcAttachOptions::Netlink(NlOptions::default())),
    }
    .map_err(|source| DatapathError::Program { call: "attach", source })?;
    let link = prog.take_link(id).map_err(|source| DatapathError::Program { call: "take link", source })?;
    if let Ok(fd_link) = FdLink::try_from(link) {
        fd_link.pin(pin).map_err(|e| DatapathError::Pin { path: pin.to_path_buf(), reason: e.to_string() })?;
    }
    Ok(())
}

/// Remove an attachment marker (a directory, with the tcx links pinned in
/// it: unpinning them detaches the programs).
pub fn remove_marker(marker: &Path) -> std::io::Result<()> {
    if marker.is_dir() {
        for pin in ["from", "to"] {
            match std::fs::remove_file(marker.join(pin)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::remove_dir(marker)
    } else {
        std::fs::remove_file(marker)
    }
}

/// Undo [`Datapath::attach_persistent`] on `ifname` without the programs
/// loaded (an agent whose datapath is off now): the clsact filters go
/// (they outlive every process), then the marker (unpinning tcx links
/// detaches them). A gone interface has no filter left.
pub fn detach_persistent(ifname: &str, marker: &Path) -> std::io::Result<()> {
    let mut failed = None;
    if nix::net::if_::if_nametoindex(ifname).is_ok() {
        for (at, name) in [(TcAttachType::Ingress, FROM_ENDPOINT), (TcAttachType::Egress, TO_ENDPOINT)] {
            match aya::programs::tc::qdisc_detach_program(ifname, at, name) {
                Ok(()) => {}
                Err(aya::programs::tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => failed = Some(std::io::Error::other(format!("detaching {name} from {ifname}: {e}"))),
            }
        }
    }
    remove_marker(marker)?;
    failed.map_or(Ok(()), Err)
}

/// Undo [`Datapath::attach_mesh_persistent`] on `ifname` (programs loaded
/// or not): a clsact filter goes (it outlives every process), then the
/// marker (unpinning a tcx link detaches it).
pub fn detach_mesh_persistent(ifname: &str, marker: &Path) -> std::io::Result<()> {
    if nix::net::if_::if_nametoindex(ifname).is_ok() {
        for name in [FROM_UPLINK, FROM_TUNNEL] {
            // Only a clsact attachment is a filter; a tcx one is not found.
            let _ = aya::programs::tc::qdisc_detach_program(ifname, TcAttachType::Ingress, name);
        }
    }
    remove_marker(marker)
}

/// Mount a bpffs at `dir` unless one is there already.
pub fn mount_bpffs(dir: &std::path::Path) -> std::result::Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let target = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.get(4).is_some_and(|m| std::path::Path::new(m) == target) && l.contains(" - bpf ")
    });
    if mounted {
        return Ok(());
    }
    nix::mount::mount(Some("bpf"), &target, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| format!("mounting bpffs at {}: {e}", target.display()))
}

/// Add a clsact qdisc to `ifname` (one already there is fine).
fn add_clsact(ifname: &str) -> Result<()> {
    match aya::programs::tc::qdisc_add_clsact(ifname) {
        Ok(()) => Ok(()),
        // One is there already (the kernel's words vary: "File exists", or
        // with extended acks "Exclusivity flag on, cannot modify"; EEXIST).
        Err(aya::programs::tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(nix::libc::EEXIST) => Ok(()),
        Err(e) if e.to_string().contains("exists") => Ok(()),
        Err(e) => {
            Err(DatapathError::Clsact { ifname: ifname.to_string(), source: std::io::Error::other(e.to_string()) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn dns_keys_are_lowercase_wire_names() {
        let k = DnsKey::new(7, "Web.App.").unwrap();
        assert_eq!(k.net_id, 7);
        assert_eq!(&k.name[..9], b"\x03web\x03app\x00");
        assert!(k.name[9..].iter().all(|b| *b == 0));
        assert_eq!(DnsKey::new(7, "web.app"), Some(k));
        assert_eq!(DnsKey::new(7, ""), None);
        assert_eq!(DnsKey::new(7, "a..b"), None);
        assert_eq!(DnsKey::new(7, &"x".repeat(64)), None, "a label over 63 bytes");
        assert!(DnsKey::new(7, &"x".repeat(62)).is_some(), "62 + 2 bytes fit");
        assert_eq!(DnsKey::new(7, &"x".repeat(63)), None, "63 + 2 bytes do not");
        assert_eq!(DnsAnswer::new(Ipv4Addr::new(10, 0, 0, 1), 5).addr[..4], [10, 0, 0, 1]);
        let v6: std::net::Ipv6Addr = "fd00::7".parse().unwrap();
        assert_eq!(DnsAnswer::new(v6, 5).addr, v6.octets());
        let aaaa = DnsKey::of_type(7, "web.app", DNS_TYPE_AAAA).unwrap();
        assert_eq!((aaaa.qtype, aaaa.name), (DNS_TYPE_AAAA, k.name));
        assert_ne!(aaaa, k, "A and AAAA are distinct keys");
    }

    /// The same numbers as the `_Static_assert`s of `trellis.h`.
    #[test]
    fn layouts_match_the_c_header() {
        assert_eq!(size_of::<EndpointInfo>(), 72);
        assert_eq!(offset_of!(EndpointInfo, slot), 64);
        assert_eq!(offset_of!(EndpointInfo, gw6), 48);
        assert_eq!(size_of::<Flow6Key>(), 24);
        assert_eq!(offset_of!(Flow6Key, kind), 21);
        assert_eq!(size_of::<Flow6Value>(), 40);
        assert_eq!(offset_of!(Flow6Value, seen), 32);
        assert_eq!(offset_of!(Flow6Value, svc_id), 24);
        assert_eq!(size_of::<Svc6Key>(), 20);
        assert_eq!(size_of::<Maglev6Table>(), 16 * MAGLEV_M);
        assert_eq!(size_of::<Backend6Key>(), 20);
        assert_eq!(offset_of!(EndpointInfo, ip6), 32);
        assert_eq!(offset_of!(EndpointInfo, gw_mac), 24);
        assert_eq!(offset_of!(EndpointInfo, mac), 4);
        assert_eq!(offset_of!(EndpointInfo, net_id), 12);
        assert_eq!(size_of::<EndpointCounters>(), 128);
        assert_eq!(offset_of!(EndpointCounters, drops), 32);
        assert_eq!(offset_of!(EndpointCounters, full), 104);
        assert_eq!(DropReason::TableFull as usize, 8);
        assert_eq!(Table::Events as usize, 2);
        assert_eq!(DropReason::Malformed as usize, 4);
        assert_eq!(size_of::<FlowEvent>(), 44);
        assert_eq!(offset_of!(FlowEvent, proto), 40);
        assert_eq!(size_of::<NetInfo>(), 8);
        assert_eq!(size_of::<VipInfo>(), 8);
        assert_eq!(size_of::<SvcKey>(), 8);
        assert_eq!(offset_of!(SvcKey, proto), 6);
        assert_eq!(size_of::<SvcInfo>(), 16);
        assert_eq!(size_of::<MaglevTable>(), 4 * MAGLEV_M);
        assert_eq!(size_of::<BackendKey>(), 8);
        assert_eq!(size_of::<BackendInfo>(), 8);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtValue>(), 32);
        assert_eq!(offset_of!(CtValue, mac), 6);
        assert_eq!(offset_of!(CtValue, seen), 24);
        assert_eq!(size_of::<RnatValue>(), 16);
        assert_eq!(size_of::<SvcStats>(), 16);
        assert_eq!(size_of::<DnsKey>(), 72);
        assert_eq!(std::mem::offset_of!(DnsKey, name), 8);
        assert_eq!(size_of::<DnsAnswer>(), 20);
        assert_eq!(size_of::<DnsStats>(), 16);
        assert_eq!(DropReason::NoBackend as usize, 7);
        assert_eq!(size_of::<PubKey>(), 4);
        assert_eq!(size_of::<PubInfo>(), 20);
        assert_eq!(size_of::<MeshConfig>(), 8);
        assert_eq!(size_of::<RnatKey>(), 16);
        assert_eq!(size_of::<MeshFlow>(), 24);
        assert_eq!(offset_of!(MeshFlow, peer_mac), 12);
    }

    #[test]
    fn mesh_constants_match_the_c_header() {
        let h = include_str!("../include/trellis.h");
        assert!(h.contains(&format!("#define MESH_INGRESS {MESH_INGRESS}")));
        assert!(h.contains(&format!("#define MESH_RETURN {MESH_RETURN}")));
        assert!(h.contains(&format!("#define CFG_MESH {CFG_MESH}")));
        let m = include_str!("../bpf/lib/mesh.h");
        let mac = mesh_mac(Ipv4Addr::new(198, 19, 0, 1));
        assert!(m.contains(&format!("#define MESH_MAC0 {:#04x}", mac[0])));
        assert!(m.contains(&format!("#define MESH_MAC1 {:#04x}", mac[1])));
        assert_eq!(&mac[2..], &[198, 19, 0, 1]);
    }

    /// MAGLEV_M is the header's.
    #[test]
    fn maglev_size_matches_the_c_header() {
        let h = include_str!("../include/trellis.h");
        assert!(h.contains(&format!("#define MAGLEV_M {MAGLEV_M}")), "MAGLEV_M differs from trellis.h");
    }

    #[test]
    fn flow_events_decode() {
        let mut b = vec![0u8; 44];
        b[0..4].copy_from_slice(&7u32.to_ne_bytes());
        b[4..8].copy_from_slice(&[10, 1, 0, 99]);
        b[20..24].copy_from_slice(&[10, 1, 0, 3]);
        b[36..38].copy_from_slice(&40000u16.to_be_bytes());
        b[38..40].copy_from_slice(&53u16.to_be_bytes());
        b[40] = 17;
        b[41] = 1;
        b[42] = 1;
        b[43] = 4;
        let e = FlowEvent::from_bytes(&b).unwrap();
        assert_eq!(
            (e.ifindex, e.src(), e.dst(), e.sport, e.dport),
            (7, Some(Ipv4Addr::new(10, 1, 0, 99).into()), Some(Ipv4Addr::new(10, 1, 0, 3).into()), 40000, 53)
        );
        assert_eq!((e.proto, e.verdict, e.reason_name()), (17, 1, "spoofed_ip"));
        assert!(FlowEvent::from_bytes(&b[..43]).is_none());
        let (src6, dst6): (Ipv6Addr, Ipv6Addr) = ("fd00::2".parse().unwrap(), "fd00::ffff".parse().unwrap());
        b[4..20].copy_from_slice(&src6.octets());
        b[20..36].copy_from_slice(&dst6.octets());
        b[43] = 6;
        let e = FlowEvent::from_bytes(&b).unwrap();
        assert_eq!((e.src(), e.dst()), (Some(src6.into()), Some(dst6.into())));
        b[43] = 0;
        assert_eq!(FlowEvent::from_bytes(&b).unwrap().src(), None, "neither family: no address");
    }

    #[test]
    fn addresses_are_stored_in_network_order() {
        let e = EndpointInfo::new(Ipv4Addr::new(10, 1, 2, 3), [2, 0, 0, 0, 0, 1], 4096);
        assert_eq!(e.ip.to_ne_bytes(), [10, 1, 2, 3]);
    }

    #[test]
    fn the_object_is_an_ebpf_elf() {
        assert_eq!(&ENDPOINT_OBJECT[..4], b"\x7fELF");
        // e_machine = EM_BPF (247), little endian.
        assert_eq!(u16::from_le_bytes([ENDPOINT_OBJECT[18], ENDPOINT_OBJECT[19]]), 247);
    }
}
