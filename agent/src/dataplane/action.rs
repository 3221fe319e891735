//! The changes the reconciler asks of the kernel, as values: what to
//! create, set and delete, and what the endpoint programs are told.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;

use super::egress::EgressRules;
use super::tables::TableOps;
use crate::model::Mac;

/// A kernel setting written under `/proc/sys`: a file and its new value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sysctl {
    pub path: String,
    pub value: String,
}

/// A network's VXLAN device on a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    pub local: IpAddr,
    pub mtu: u32,
    pub mac: Mac,
    /// Settings of the device itself, written right after it is created
    /// and before it is set up (its per-device entries exist only once it
    /// does, and some must be in place before it comes up), best effort:
    /// a failure is logged, the device stays. Chosen by the desired state
    /// (the probe device's IPv6 settings), not by the executor.
    pub sysctls: Vec<Sysctl>,
    /// Its outer packets carry Don't Fragment (`df set`): the probe
    /// device's, so that a sized probe through it finds what the path
    /// carries of VXLAN itself. A network's device leaves it unset: a
    /// narrower hop fragments its packets rather than dropping them.
    pub dont_fragment: bool,
}

/// The veth that holds this host's mesh address on a network (see
/// [`crate::model::MeshAddrRecord`]): `port` is a port of the network's
/// bridge, `ifname` stays in the host's namespace with the address as a
/// /32 (the subnet's route stays the bridge's, through the gateway) and the
/// address's MAC; a static FDB entry of the bridge sends frames to that MAC
/// to `port` (the host's end sends too little for the bridge to learn it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshVethSpec {
    pub ifname: String,
    pub port: String,
    pub bridge: String,
    pub mtu: u32,
    pub mac: Mac,
    pub addr: std::net::Ipv4Addr,
    /// Settings of the two ends, written right after they are created and
    /// before they come up (best effort, as [`VxlanSpec::sysctls`]).
    pub sysctls: Vec<Sysctl>,
}

impl MeshVethSpec {
    /// The host end's address, as the kernel reports it.
    pub fn cidr(&self) -> IpNet {
        IpNet::new(IpAddr::V4(self.addr), 32).expect("a /32")
    }
}

/// Everything needed to plug an endpoint in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub endpoint_id: String,
    pub host_if: String,
    pub peer_if: String,
    pub bridge: String,
    pub mtu: u32,
    pub netns: PathBuf,
    pub ifname: String,
    pub mac: Mac,
    /// Its IPv4 address (none on an IPv6-only network).
    pub addr: Option<IpNet>,
    /// Default route via this address (none on internal networks).
    pub default_via: Option<IpAddr>,
    /// A dual-stack network's IPv6 address, and the IPv6 default route's
    /// gateway (none on internal networks).
    pub addr6: Option<IpNet>,
    pub default_via6: Option<IpAddr>,
    /// The engine moves the container end into its sandbox and configures
    /// it (Docker): both ends are created in the host's namespace, the
    /// container end named `peer_if`.
    pub engine_moves: bool,
    /// When the endpoint was created (Unix seconds): an engine's sandbox
    /// namespace appears only after its Join.
    pub created_unix: i64,
}

/// One change to the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A bridge with a fixed MAC: a bridge without one takes the lowest
    /// of its ports' MACs, and changes it as ports come and go — leaving
    /// every container's neighbour entry for the gateway stale.
    CreateBridge {
        name: String,
        mtu: u32,
        mac: Mac,
    },
    SetMac {
        link: String,
        mac: Mac,
    },
    /// Make an existing link match: MTU, up, and (for ports) its bridge.
    SetLink {
        name: String,
        mtu: u32,
        master: Option<String>,
    },
    /// The MTU of an endpoint's interface inside its container (its
    /// network's MTU changed: a host with a smaller underlay joined or
    /// left). Set before the host side when it goes down.
    SetContainerMtu {
        netns: std::path::PathBuf,
        ifname: String,
        mtu: u32,
    },
    AddAddress {
        link: String,
        addr: IpNet,
    },
    DelAddress {
        link: String,
        addr: IpNet,
    },
    CreateEndpoint(Box<EndpointSpec>),
    /// A mesh veth, whole: both ends, the host end's MAC and address, the
    /// bridge's FDB entry, both up (cleaned up if any step fails).
    CreateMeshVeth(Box<MeshVethSpec>),
    CreateVxlan(Box<VxlanSpec>),
    AddFdb {
        link: String,
        mac: Mac,
        dst: IpAddr,
    },
    DelFdb {
        link: String,
        mac: Mac,
        dst: IpAddr,
    },
    AddNeigh {
        link: String,
        ip: IpAddr,
        mac: Mac,
    },
    DelNeigh {
        link: String,
        ip: IpAddr,
        mac: Mac,
    },
    /// Attach the endpoint program to an endpoint's host-side veth and
    /// program its entry (replacing any earlier attachment).
    AttachProgram {
        ifname: String,
        /// Its IPv4 address (none on an IPv6-only network).
        ip: Option<IpAddr>,
        /// Its IPv6 address (dual-stack and IPv6-only networks).
        ip6: Option<IpAddr>,
        mac: Mac,
        program: crate::dataplane::ProgramSpec,
    },
    /// Change the isolation and service tables.
    UpdateTables(Box<TableOps>),
    DetachProgram {
        ifname: String,
    },
    /// Attach a routing mesh program to an interface's tc ingress (the
    /// uplink, a network's VXLAN device), replacing any earlier one.
    AttachMesh {
        ifname: String,
        role: trellis_ebpf::MeshRole,
    },
    DetachMesh {
        ifname: String,
    },
    DeleteLink {
        name: String,
    },
    ApplyEgress(EgressRules),
    /// Change an IPsec SA or policy of an encrypted network (whose VXLAN
    /// device is `vxlan`, when the change is for one).
    Xfrm {
        op: trellis_ipsec::XfrmOp,
        vxlan: Option<String>,
    },
}

impl Action {
    /// The endpoint this action is for, if any (to report errors per endpoint).
    pub fn endpoint(&self) -> Option<&str> {
        match self {
            Action::CreateEndpoint(spec) => Some(&spec.endpoint_id),
            _ => None,
        }
    }
}

/// What an endpoint's programs know of its network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramSpec {
    pub vni: u32,
    pub internal: bool,
    /// DNS to resolvers outside Trellis goes to this gateway (and MAC).
    pub dns_at: Option<(std::net::Ipv4Addr, Mac)>,
    /// And DNS over IPv6 to outside resolvers goes to this IPv6 gateway
    /// (a dual-stack network's, on the same bridge).
    pub dns6_at: Option<std::net::Ipv6Addr>,
    /// Its container is on this network only: plain A queries for names
    /// with one address may be answered in the kernel.
    pub dns_fast: bool,
}

impl ProgramSpec {
    /// `endpoint_info.flags` as the program has them.
    pub fn flags(&self) -> u32 {
        let mut f = 0;
        if self.internal {
            f |= trellis_ebpf::EP_INTERNAL;
        }
        if self.dns_at.is_some() {
            f |= trellis_ebpf::EP_DNS;
        }
        if self.dns_fast {
            f |= trellis_ebpf::EP_DNS_FAST;
        }
        f
    }
}
