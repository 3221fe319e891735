//! The routing mesh on this host: which of the services' published ports
//! it accepts (every port in `ingress` mode; in `host` mode only those of
//! services with a backend here), the VXLAN devices it needs to reach the
//! backends of those services on other hosts, the FDB entries through
//! which backends here send replies back to the host that took the
//! connection (every other host's mesh MAC), the interfaces the mesh
//! programs go on (the uplink, the loopback for the host's own clients,
//! and every network's VXLAN device), and 127.0.0.1 on the published
//! ports (the egress rules).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::{DesiredHost, tunnels};
use crate::model::{
    self, EndpointRecord, HostRecord, MeshPort, NetworkRecord, Proto, PublishMode, ServiceMode, ServiceRecord,
};
use crate::reconcile::Identity;

/// A host's mesh MAC (see `trellis_ebpf::mesh_mac`).
pub fn mesh_mac(underlay: std::net::Ipv4Addr) -> model::Mac {
    model::Mac(trellis_ebpf::mesh_mac(underlay))
}

/// The ports of `s` this host accepts: with the eBPF datapath and an IPv4
/// underlay, every `ingress` port, and the `host` ports when a backend of
/// `s` (serving, or draining: its connections through this host keep
/// flowing) is one of this host's endpoints (`local_ids`); but those `held`
/// by a process of the host ([`held_here`]).
pub fn published_here<'a>(
    s: &'a ServiceRecord,
    endpoints: &[EndpointRecord],
    local_ids: &BTreeSet<&str>,
    held: &BTreeSet<(Proto, u16)>,
    me: &Identity,
) -> Vec<&'a MeshPort> {
    split_held(s, endpoints, local_ids, held, me).0
}

/// The ports of `s` this host would accept but a process of it holds: left
/// to that process (a mesh that took them would cut it off), and reported.
pub fn held_here<'a>(
    s: &'a ServiceRecord,
    endpoints: &[EndpointRecord],
    local_ids: &BTreeSet<&str>,
    held: &BTreeSet<(Proto, u16)>,
    me: &Identity,
) -> Vec<&'a MeshPort> {
    split_held(s, endpoints, local_ids, held, me).1
}

/// The ports of `s` this host would accept: (free here, held here).
fn split_held<'a>(
    s: &'a ServiceRecord,
    endpoints: &[EndpointRecord],
    local_ids: &BTreeSet<&str>,
    held: &BTreeSet<(Proto, u16)>,
    me: &Identity,
) -> (Vec<&'a MeshPort>, Vec<&'a MeshPort>) {
    candidates(s, endpoints, local_ids, me).into_iter().partition(|p| !held.contains(&(p.proto, p.host_port)))
}

fn candidates<'a>(
    s: &'a ServiceRecord,
    endpoints: &[EndpointRecord],
    local_ids: &BTreeSet<&str>,
    me: &Identity,
) -> Vec<&'a MeshPort> {
    if !me.ebpf || !matches!(me.underlay, Some(IpAddr::V4(_))) || s.mode != ServiceMode::Vip || s.publish.is_empty() {
        return Vec::new();
    }
    let backend_here = || {
        endpoints.iter().any(|e| {
            local_ids.contains(e.id.as_str())
                && matches!(s.backend_state(e), Some(model::BackendState::Serving | model::BackendState::Draining))
        })
    };
    let host_mode = s.publish.iter().any(|p| p.mode == PublishMode::Host) && backend_here();
    s.publish.iter().filter(|p| p.mode == PublishMode::Ingress || host_mode).collect()
}

/// Add what the mesh needs to `d` (call after the tunnels): the VXLAN
/// devices of networks whose services this host publishes, every other
/// live host's mesh MAC in the devices of networks with published
/// services, and the mesh programs' interfaces.
pub fn mesh(
    networks: &[NetworkRecord],
    endpoints: &[EndpointRecord],
    hosts: &[HostRecord],
    services: &[ServiceRecord],
    held: &BTreeSet<(Proto, u16)>,
    me: &Identity,
    d: &mut DesiredHost,
) {
    let Some(local @ IpAddr::V4(_)) = me.underlay else { return };
    if !me.ebpf {
        return;
    }
    let by_id: BTreeMap<&str, &NetworkRecord> = networks.iter().map(|n| (n.id.as_str(), n)).collect();
    let live: BTreeMap<&str, &HostRecord> =
        hosts.iter().filter(|h| h.id != me.host).map(|h| (h.id.as_str(), h)).collect();
    let local_ids: BTreeSet<&str> = d.endpoints.values().map(|e| e.endpoint_id.as_str()).collect();
    let IpAddr::V4(addr) = local else { return };
    let mut here = false;
    let mut published_nets = BTreeSet::new();
    let mut loopback = Vec::new();
    for s in services.iter().filter(|s| s.mode == ServiceMode::Vip && !s.publish.is_empty()) {
        published_nets.insert(s.network_id.as_str());
        d.mesh_held.extend(held_here(s, endpoints, &local_ids, held, me).into_iter().map(|p| (s.name.clone(), *p)));
        let ports = published_here(s, endpoints, &local_ids, held, me);
        // The host's own 127.0.0.1 on the ports (sorted once, below).
        loopback.extend(ports.iter().map(|p| (p.proto, p.host_port)));
        if !ports.is_empty() {
            here = true;
            // Its backends on other hosts are reached over the network's
            // device, here too when no endpoint of the network is.
            if let Some(n) = by_id.get(s.network_id.as_str()) {
                d.vxlans
                    .entry(model::vxlan_name(&n.id))
                    .or_insert_with(|| tunnels::network_vxlan(n, endpoints, &live, me, local));
            }
        }
    }
    d.egress.publish_mesh_loopback(addr, loopback);
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
    if here {
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
