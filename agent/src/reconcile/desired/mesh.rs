//! The routing mesh on this host: which of the services' published ports
//! it accepts (every port in `ingress` mode; in `host` mode only those of
//! services with a backend here), and through which datapath
//! ([`MeshPath`]):
//!
//! * the eBPF mesh (the client's address kept): the VXLAN devices it needs
//!   to reach the backends on other hosts, the FDB entries through which
//!   backends here send replies back to the host that took the connection
//!   (every other host's mesh MAC), the interfaces the mesh programs go on
//!   (the uplink, the loopback for the host's own clients, and every
//!   network's VXLAN device), and 127.0.0.1 on the published ports (the
//!   egress rules);
//! * nftables (SNAT to this host's own address on the service's network,
//!   its *mesh address*): hosts without the eBPF datapath, and services
//!   with a backend on such a host (whose replies no program steers back);
//!   and, on every host, what its containers send to its own addresses on
//!   any mesh port (hairpin).
//!
//! The mesh addresses: this host needs one on every network it publishes a
//! service of ([`DesiredHost::mesh_addrs_wanted`], allocated after the pass
//! from the store's IPAM); with one, it gets its mesh veth there
//! ([`MeshVethSpec`]), and every other host the static FDB and neighbour
//! entries for it in the network's VXLAN device, as for a remote endpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use super::{DesiredHost, tunnels};
use crate::dataplane::egress::{MeshRule, MeshSnat};
use crate::dataplane::{MeshVethSpec, Sysctl};
use crate::model::{
    self, EndpointRecord, HostRecord, MeshAddrRecord, MeshPort, NetworkRecord, Proto, PublishMode, Records,
    ServiceMode, ServiceRecord,
};
use crate::reconcile::Identity;

/// A host's mesh MAC (see `trellis_ebpf::mesh_mac`).
pub fn mesh_mac(underlay: std::net::Ipv4Addr) -> model::Mac {
    model::Mac(trellis_ebpf::mesh_mac(underlay))
}

/// Which datapath publishes a service's ports on a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeshPath {
    /// The eBPF programs: the backend sees the client's own address.
    Ebpf,
    /// nftables DNAT and SNAT: the backend sees the host's mesh address.
    Nft,
}

impl MeshPath {
    pub fn as_str(self) -> &'static str {
        match self {
            MeshPath::Ebpf => "ebpf",
            MeshPath::Nft => "nftables",
        }
    }
}

/// Does host `id` run the eBPF datapath? (A record from before the
/// capability was written ran it: it was always on then.)
fn host_has_ebpf(hosts: &[HostRecord], id: &str) -> bool {
    hosts.iter().find(|h| h.id == id).is_none_or(|h| h.capabilities.get("ebpf").copied().unwrap_or(true))
}

/// How this host publishes `s`: through the eBPF mesh when it has the
/// datapath and so does the host of every backend of `s` (a backend's
/// replies to a client outside are steered back to the host that took the
/// connection by the program at the backend's veth); through nftables
/// otherwise. `net_eps`: the endpoints of `s`'s network (any others are
/// ignored).
pub fn path_of(s: &ServiceRecord, net_eps: &[&EndpointRecord], hosts: &[HostRecord], me: &Identity) -> MeshPath {
    if !me.ebpf {
        return MeshPath::Nft;
    }
    let without = net_eps
        .iter()
        .filter(|e| e.host != me.host && s.backend_state(e).is_some())
        .any(|e| hosts.iter().any(|h| h.id == e.host) && !host_has_ebpf(hosts, &e.host));
    if without { MeshPath::Nft } else { MeshPath::Ebpf }
}

/// The endpoints of each network.
pub fn by_network(endpoints: &(impl Records<EndpointRecord> + ?Sized)) -> BTreeMap<&str, Vec<&EndpointRecord>> {
    let mut by_net: BTreeMap<&str, Vec<&EndpointRecord>> = BTreeMap::new();
    for e in endpoints.each() {
        by_net.entry(e.network_id.as_str()).or_default().push(e);
    }
    by_net
}

/// The ports of `s` this host accepts: with an IPv4 underlay, every
/// `ingress` port, and the `host` ports when a backend of `s` (serving, or
/// draining: its connections through this host keep flowing) is one of
/// this host's endpoints (`local_ids`); but those `held` by a process of
/// the host ([`held_here`]). Whichever datapath publishes them.
pub fn published_here<'a>(
    s: &'a ServiceRecord,
    endpoints: &(impl Records<EndpointRecord> + ?Sized),
    local_ids: &BTreeSet<&str>,
    held: &BTreeSet<(Proto, u16)>,
    me: &Identity,
) -> Vec<&'a MeshPort> {
    split_held(s, endpoints, local_ids, held, me).0
}

/// The ports of `s` the eBPF mesh publishes here ([`published_here`] when
/// [`path_of`] says eBPF; `net_eps` are the endpoints of its network).
pub fn ebpf_published_here<'a>(
    s: &'a ServiceRecord,
    endpoints: &(impl Records<EndpointRecord> + ?Sized),
    net_eps: &[&EndpointRecord],
    hosts: &[HostRecord],
    local_ids: &BTreeSet<&str>,
    held: &BTreeSet<(Proto, u16)>,
    me: &Identity,
) -> Vec<&'a MeshPort> {
    let ports = published_here(s, endpoints, local_ids, held, me);
    if ports.is_empty() || path_of(s, net_eps, hosts, me) != MeshPath::Ebpf {
        return Vec::new();
    }
    ports
}

/// The ports of `s` this host would accept but a process of it holds: left
/// to that process (a mesh that took them would cut it off), and reported.
pub fn held_here<'a>(
    s: &'a ServiceRecord,
    endpoints: &(impl Records<EndpointRecord> + ?Sized),
    local_ids: &BTreeSet<&str>,
    held: &BTreeSet<(Proto, u16)>,
    me: &Identity,
) -> Vec<&'a MeshPort> {
    split_held(s, endpoints, local_ids, held, me).1
}

/// The ports of `s` this host would accept: (free here, held here).
fn split_held<'a>(
    s: &'a ServiceRecord,
    endpoints: &(impl Records<EndpointRecord> + ?Sized),
    local_ids: &BTreeSet<&str>,
    held: &BTreeSet<(Proto, u16)>,
    me: &Identity,
) -> (Vec<&'a MeshPort>, Vec<&'a MeshPort>) {
    candidates(s, endpoints, local_ids, me).into_iter().partition(|p| !held.contains(&(p.proto, p.host_port)))
}

fn candidates<'a>(
    s: &'a ServiceRecord,
    endpoints: &(impl Records<EndpointRecord> + ?Sized),
    local_ids: &BTreeSet<&str>,
    me: &Identity,
) -> Vec<&'a MeshPort> {
    if !matches!(me.underlay, Some(IpAddr::V4(_))) || s.mode != ServiceMode::Vip || s.publish.is_empty() {
        return Vec::new();
    }
    let backend_here = || {
        endpoints.each().any(|e| {
            local_ids.contains(e.id.as_str())
                && matches!(s.backend_state(e), Some(model::BackendState::Serving | model::BackendState::Draining))
        })
    };
    let host_mode = s.publish.iter().any(|p| p.mode == PublishMode::Host) && backend_here();
    s.publish.iter().filter(|p| p.mode == PublishMode::Ingress || host_mode).collect()
}

/// The ready backends of `s` this host can reach now (sorted): its own
/// endpoints whose veth it has (`local_ids`), and those of the other live
/// hosts (`remote`), whose tunnel entries the same pass programs first.
fn serving_backends(
    s: &ServiceRecord,
    net_eps: &[&EndpointRecord],
    local_ids: &BTreeSet<&str>,
    remote: &BTreeSet<&str>,
) -> Vec<Ipv4Addr> {
    let mut ips: Vec<Ipv4Addr> = net_eps
        .iter()
        .filter(|e| s.serves(e) && (local_ids.contains(e.id.as_str()) || remote.contains(e.host.as_str())))
        .filter_map(|e| match e.ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// The mesh veth of this host on `n`, holding `addr` (its mesh address).
pub fn mesh_veth(n: &NetworkRecord, addr: &MeshAddrRecord) -> Option<MeshVethSpec> {
    let IpAddr::V4(ip) = addr.ip else { return None };
    let ifname = model::mesh_ifname(&n.id);
    let port = model::mesh_port_name(&n.id);
    let knob = |family: &str, dev: &str, name: &str, value: &str| Sysctl {
        path: format!("/proc/sys/net/{family}/conf/{dev}/{name}"),
        value: value.to_string(),
    };
    Some(MeshVethSpec {
        sysctls: vec![
            // The backends' replies come in here while the route to their
            // subnet is the bridge's: no strict reverse-path check (it
            // would drop them; the host's `all` setting still applies,
            // see `trellisctl status`).
            knob("ipv4", &ifname, "rp_filter", "0"),
            // They come back to 127.0.0.1 when the host itself was the
            // client.
            knob("ipv4", &ifname, "route_localnet", "1"),
            // IPv4 only: no link-local address, router solicitations or
            // DAD flooded to the network's containers.
            knob("ipv6", &ifname, "disable_ipv6", "1"),
            knob("ipv6", &port, "disable_ipv6", "1"),
        ],
        ifname,
        port,
        bridge: model::bridge_name(&n.id),
        mtu: n.mtu,
        mac: addr.mac,
        addr: ip,
    })
}

/// Add what the mesh needs to `d` (call after the tunnels): the VXLAN
/// devices of networks whose services this host publishes, the eBPF
/// mesh's programs, entries and tables' inputs, the nftables mesh's rules,
/// this host's mesh addresses (wanted, and their veths) and every other
/// live host's in the network devices.
#[allow(clippy::too_many_arguments)]
pub fn mesh(
    networks: &[NetworkRecord],
    endpoints: &(impl Records<EndpointRecord> + ?Sized),
    hosts: &[HostRecord],
    services: &[ServiceRecord],
    held: &BTreeSet<(Proto, u16)>,
    mesh_addrs: &[MeshAddrRecord],
    me: &Identity,
    d: &mut DesiredHost,
) {
    let Some(local @ IpAddr::V4(addr)) = me.underlay else { return };
    let by_id: BTreeMap<&str, &NetworkRecord> = networks.iter().map(|n| (n.id.as_str(), n)).collect();
    let live: BTreeMap<&str, &HostRecord> =
        hosts.iter().filter(|h| h.id != me.host).map(|h| (h.id.as_str(), h)).collect();
    let remote: BTreeSet<&str> = live.keys().copied().collect();
    let local_ids: BTreeSet<&str> = d.endpoints.values().map(|e| e.endpoint_id.as_str()).collect();
    let mine: BTreeMap<&str, &MeshAddrRecord> =
        mesh_addrs.iter().filter(|m| m.host == me.host).map(|m| (m.network_id.as_str(), m)).collect();
    // Endpoints by network: a service looks at its own network's only.
    let by_net = by_network(endpoints);
    let mut ebpf_here = false;
    let mut published_nets = BTreeSet::new();
    let mut loopback = Vec::new();
    let mut rules = Vec::new();
    for s in services.iter().filter(|s| s.mode == ServiceMode::Vip && !s.publish.is_empty()) {
        published_nets.insert(s.network_id.as_str());
        d.mesh_held.extend(held_here(s, endpoints, &local_ids, held, me).into_iter().map(|p| (s.name.clone(), *p)));
        let ports = published_here(s, endpoints, &local_ids, held, me);
        let Some(n) = by_id.get(s.network_id.as_str()) else { continue };
        if ports.is_empty() {
            continue;
        }
        // Its backends on other hosts are reached over the network's
        // device, here too when no endpoint of the network is.
        d.vxlans
            .entry(model::vxlan_name(&n.id))
            .or_insert_with(|| tunnels::network_vxlan(n, endpoints, &live, me, local));
        // An address of the network for what nftables takes (the eBPF
        // mesh's hairpin too).
        d.mesh_addrs_wanted.insert(n.id.clone());
        let eps = by_net.get(n.id.as_str()).map(Vec::as_slice).unwrap_or_default();
        let path = path_of(s, eps, hosts, me);
        if path == MeshPath::Ebpf {
            ebpf_here = true;
            // The host's own 127.0.0.1 on the ports (sorted once, below).
            loopback.extend(ports.iter().map(|p| (p.proto, p.host_port)));
        } else {
            d.mesh_nft.extend(ports.iter().map(|p| (s.name.clone(), **p)));
        }
        if !mine.contains_key(n.id.as_str()) {
            // Its rules come with the address (the pass after it is allocated).
            continue;
        }
        let backends = serving_backends(s, eps, &local_ids, &remote);
        if path == MeshPath::Nft {
            // 127.0.0.1 DNATed out of the bridge.
            d.egress.need_localnet(&model::bridge_name(&n.id));
        }
        rules.extend(ports.iter().map(|p| MeshRule {
            proto: p.proto,
            host_port: p.host_port,
            service: s.name.clone(),
            target: s.target_of(p.port, p.proto),
            backends: backends.clone(),
            hairpin_only: path == MeshPath::Ebpf,
        }));
    }
    d.egress.publish_mesh(rules);
    if me.ebpf {
        d.egress.publish_mesh_loopback(addr, loopback);
    }
    // This host's mesh addresses it needs, with their veths and SNAT.
    for (net_id, m) in &mine {
        let (Some(n), true) = (by_id.get(net_id), d.mesh_addrs_wanted.contains(*net_id)) else { continue };
        let Some(veth) = mesh_veth(n, m) else { continue };
        d.egress.mesh_address(MeshSnat {
            bridge: veth.bridge.clone(),
            vxlan: model::vxlan_name(&n.id),
            gateway_mac: model::Mac::for_ip(n.subnet.network()),
            addr: veth.addr,
            mac: veth.mac,
        });
        d.mesh_veths.insert(veth.port.clone(), veth);
    }
    // Every other live host's mesh addresses, in the devices of their
    // networks, as for remote endpoints: a backend here replies to them.
    for m in mesh_addrs.iter().filter(|m| m.host != me.host) {
        let (Some(h), Some(v)) = (live.get(m.host.as_str()), d.vxlans.get_mut(&model::vxlan_name(&m.network_id)))
        else {
            continue;
        };
        v.fdb.insert((m.mac, h.underlay));
        v.neigh.insert((m.ip, m.mac));
    }
    if !me.ebpf {
        return;
    }
    for net_id in &published_nets {
        if let Some(v) = d.vxlans.get_mut(&model::vxlan_name(net_id)) {
            for h in live.values() {
                if let IpAddr::V4(u) = h.underlay {
                    v.fdb.insert((mesh_mac(u), h.underlay));
                }
            }
        }
    }
    if published_nets.is_empty() {
        return;
    }
    // The programs: on the uplink when this host accepts ports; on every
    // network device, where the replies to connections this host took come
    // back from backends on other hosts.
    if ebpf_here {
        if let Some(uplink) = &me.uplink {
            d.mesh_links.insert(uplink.clone(), trellis_ebpf::MeshRole::Uplink);
        }
        // What the host sends to its own addresses (and 127.0.0.1, NATed
        // to the mesh address) crosses the loopback.
        d.mesh_links.insert("lo".into(), trellis_ebpf::MeshRole::Uplink);
    }
    for name in d.vxlans.keys().filter(|n| n.as_str() != model::PROBE_VXLAN) {
        d.mesh_links.insert(name.clone(), trellis_ebpf::MeshRole::Tunnel);
    }
}
