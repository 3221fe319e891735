//! The kernel state one host should have, computed from the whole desired
//! state of the cluster, one object kind per file: [`links`] (bridges,
//! veths, egress rules), [`programs`], [`tunnels`], [`mesh`] (the routing
//! mesh's devices, entries, program attachments, nftables rules and mesh
//! veths), [`tables`],
//! [`encryption`]. Pure.

pub mod encryption;
pub mod links;
pub mod mesh;
pub mod programs;
pub mod tables;
pub mod tunnels;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::{Identity, Snapshot};
use crate::dataplane::egress::EgressRules;
use crate::dataplane::{EndpointSpec, Mac, ProgramSpec, Tables, VxlanSpec};
use crate::model::{self, EndpointRecord, HostRecord, NetworkRecord, Records};

/// A network's VXLAN device with its static entries for remote endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredVxlan {
    pub spec: VxlanSpec,
    /// The bridge it is a port of (empty: none, the probe device).
    pub bridge: String,
    pub fdb: BTreeSet<(Mac, IpAddr)>,
    pub neigh: BTreeSet<(IpAddr, Mac)>,
    /// Entries more than one endpoint gives (a record replaced by one with
    /// the same address, say), with how many more: removing one of them
    /// keeps the entry ([`super::incremental`]).
    pub dup_fdb: BTreeMap<(Mac, IpAddr), u32>,
    pub dup_neigh: BTreeMap<(IpAddr, Mac), u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBridge {
    pub mtu: u32,
    pub addr: Option<IpNet>,
    /// A dual-stack network's IPv6 gateway address.
    pub addr6: Option<IpNet>,
    pub mac: Mac,
}

/// The kernel state one host should have.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredHost {
    pub bridges: BTreeMap<String, DesiredBridge>,
    /// Keyed by host-side interface name.
    pub endpoints: BTreeMap<String, EndpointSpec>,
    /// Keyed by device name.
    pub vxlans: BTreeMap<String, DesiredVxlan>,
    /// Endpoint veths that carry the endpoint programs, with what the
    /// programs need to know of the endpoint's network.
    pub programs: BTreeMap<String, ProgramSpec>,
    /// Interfaces that carry a routing mesh program (the uplink, network
    /// VXLAN devices).
    pub mesh_links: BTreeMap<String, trellis_ebpf::MeshRole>,
    /// Mesh ports this host does not publish because a process of it holds
    /// them (service name, port).
    pub mesh_held: Vec<(String, crate::model::MeshPort)>,
    /// Mesh ports this host publishes through nftables (service name,
    /// port): the backends see its mesh address, not the client's.
    pub mesh_nft: Vec<(String, crate::model::MeshPort)>,
    /// The networks this host needs a mesh address on (ids): it publishes
    /// a service of each (see [`mesh`]).
    pub mesh_addrs_wanted: BTreeSet<String>,
    /// The veths holding this host's mesh addresses, by the bridge end's
    /// name.
    pub mesh_veths: BTreeMap<String, crate::dataplane::MeshVethSpec>,
    pub egress: EgressRules,
    /// The eBPF datapath's isolation and service tables.
    pub tables: Tables,
    /// IPsec SAs and policies of the encrypted networks' tunnels.
    pub xfrm: trellis_ipsec::XfrmState,
    /// The VXLAN device of each encrypted network's port (to hold its
    /// tunnel entries back while its policies fail).
    pub esp_vxlans: BTreeMap<u16, String>,
    /// What this host acks for each encrypted network it carries once a
    /// pass installed all of `xfrm`.
    pub acks: BTreeMap<String, trellis_ipsec::Ack>,
}

/// What `host` should have, from every network and endpoint of the cluster.
/// Every network gets its bridge on every host (cheap, and a network is
/// usable on a host before its first endpoint lands there).
pub fn desired(
    networks: &[NetworkRecord],
    endpoints: &(impl Records<EndpointRecord> + ?Sized),
    hosts: &[HostRecord],
    me: &Identity,
) -> DesiredHost {
    let mut d = DesiredHost::default();
    let by_id: BTreeMap<&str, &NetworkRecord> = networks.iter().map(|n| (n.id.as_str(), n)).collect();
    links::bridges(networks, me, &mut d);
    links::endpoints(endpoints, &by_id, me, &mut d);
    if me.ebpf {
        programs::programs(endpoints, &by_id, me, &mut d);
    }
    if let Some(local) = me.underlay {
        tunnels::tunnels(endpoints, hosts, &by_id, me, local, &mut d);
    }
    d
}

/// Everything a host should have from one snapshot of the store: links,
/// programs and tunnels, what the routing mesh adds to them, then the tables (which look at the endpoints and
/// tunnels `d` holds) and the IPsec state (which looks at its tunnels).
pub fn desired_host(s: &Snapshot, me: &Identity) -> DesiredHost {
    let nets = sized_for(&s.networks, &s.hosts);
    let networks: &[NetworkRecord] = nets.as_deref().unwrap_or(s.networks.as_slice());
    let mut d = desired(networks, &s.endpoints, &s.hosts, me);
    mesh::mesh(networks, &s.endpoints, &s.hosts, &s.services, &s.held_ports, &s.mesh_addrs, me, &mut d);
    d.tables = tables::tables_holding(networks, &s.endpoints, &s.hosts, &s.services, &s.held_ports, me, &d);
    encryption::encryption(networks, &s.keys, &s.hosts, &mut d, me);
    d
}

/// The networks with the MTU the hosts' underlays allow
/// ([`model::network_mtu`]); `None` when every one keeps its record's.
fn sized_for(networks: &[NetworkRecord], hosts: &[HostRecord]) -> Option<Vec<NetworkRecord>> {
    if networks.iter().all(|n| model::network_mtu(n, hosts) == n.mtu) {
        return None;
    }
    Some(networks.iter().map(|n| NetworkRecord { mtu: model::network_mtu(n, hosts), ..n.clone() }).collect())
}
