//! The eBPF datapath's tables: every Trellis subnet (isolation), the VIP
//! services of the networks this host has endpoints on, and the ports its
//! eBPF mesh publishes (with the backends and Maglev tables of their
//! services; see [`super::mesh::MeshPath`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::DesiredHost;
use crate::dataplane::Tables;
use crate::model::{self, EndpointRecord, HostRecord, NetworkRecord, Records, ServiceRecord};
use crate::reconcile::Identity;

/// The eBPF tables of a host whose endpoints `d` holds: every Trellis
/// subnet (isolation), and the VIP services of the networks it has
/// endpoints on, with the backends its datapath can reach now — local ones
/// whose veth exists, and remote ones on live hosts, whose tunnel entries
/// the same pass programs first. Only ready backends are in the Maglev
/// tables; draining ones keep only their backend entries.
pub fn tables(
    networks: &[NetworkRecord],
    endpoints: &(impl Records<EndpointRecord> + ?Sized),
    hosts: &[HostRecord],
    services: &[ServiceRecord],
    me: &Identity,
    d: &DesiredHost,
) -> Tables {
    tables_holding(networks, endpoints, hosts, services, &std::collections::BTreeSet::new(), me, d)
}

/// [`tables`], the ports a process of this host holds left out of the mesh.
pub fn tables_holding(
    networks: &[NetworkRecord],
    endpoints: &(impl Records<EndpointRecord> + ?Sized),
    hosts: &[HostRecord],
    services: &[ServiceRecord],
    held: &std::collections::BTreeSet<(model::Proto, u16)>,
    me: &Identity,
    d: &DesiredHost,
) -> Tables {
    use crate::dataplane::tables::Published;
    use trellis_ebpf::{
        Backend6Key, BackendInfo, BackendKey, NetInfo, PubInfo, PubKey, Svc6Key, SvcInfo, SvcKey, VipInfo, maglev,
    };
    let mut t = Tables::default();
    if !me.ebpf {
        return t;
    }
    let mut vni_of = BTreeMap::new();
    for n in networks {
        vni_of.insert(n.id.as_str(), n.vni);
        let info = NetInfo { net_id: n.vni, flags: if n.internal { trellis_ebpf::EP_INTERNAL } else { 0 } };
        if let Some(IpNet::V4(v4)) = n.subnet_v4() {
            t.nets.insert((v4.network(), v4.prefix_len()), info);
        }
        if let Some(IpNet::V6(v6)) = n.subnet_v6() {
            t.nets6.insert((v6.network(), v6.prefix_len()), info);
        }
    }
    let local_ids: BTreeSet<&str> = d.endpoints.values().map(|e| e.endpoint_id.as_str()).collect();
    let local_nets: BTreeSet<&str> =
        endpoints.each().filter(|e| local_ids.contains(e.id.as_str())).map(|e| e.network_id.as_str()).collect();
    let remote: BTreeSet<&str> = if me.underlay.is_some() {
        hosts.iter().filter(|h| h.id != me.host).map(|h| h.id.as_str()).collect()
    } else {
        BTreeSet::new()
    };
    // Endpoints by network: a service looks at its own network's only.
    let by_net = super::mesh::by_network(endpoints);
    for s in services.iter().filter(|s| s.mode == model::ServiceMode::Vip) {
        // The VIP for endpoints of its network here; the published ports
        // for outside clients. Either needs the backends and the table.
        let vip_here = local_nets.contains(s.network_id.as_str());
        let net_eps = by_net.get(s.network_id.as_str()).map(Vec::as_slice).unwrap_or_default();
        let published = super::mesh::ebpf_published_here(s, endpoints, net_eps, hosts, &local_ids, held, me);
        if !vip_here && published.is_empty() {
            continue;
        }
        let (Some(id), Some(IpAddr::V4(vip)), Some(vni)) =
            (s.datapath_id(), s.vip, vni_of.get(s.network_id.as_str()).copied())
        else {
            continue;
        };
        // New connections go to the serving backends (the Maglev table);
        // the draining ones keep their backend entries, so the connections
        // they have keep flowing; unready ones get neither.
        let mut ips = Vec::new();
        let mut ips6 = Vec::new();
        let vip6 = match s.vip6 {
            Some(IpAddr::V6(v6)) => Some(v6),
            _ => None,
        };
        for e in by_net.get(s.network_id.as_str()).into_iter().flatten() {
            let serving = match s.backend_state(e) {
                Some(model::BackendState::Serving) => true,
                Some(model::BackendState::Draining) => false,
                Some(model::BackendState::Unready) | None => continue,
            };
            let reachable = local_ids.contains(e.id.as_str()) || remote.contains(e.host.as_str());
            if !reachable {
                continue;
            }
            let info = BackendInfo { mac: e.mac.0, pad: 0 };
            if let IpAddr::V4(ip) = e.ip {
                t.backends.insert(BackendKey { svc_id: id, ip: trellis_ebpf::be(ip) }, info);
                if serving {
                    ips.push(ip);
                }
            }
            // The IPv6 VIP's backends: their IPv6 addresses (for this
            // host's endpoints only: published ports are IPv4).
            if let (true, Some(IpAddr::V6(ip6))) = (vip6.is_some() && vip_here, e.ipv6()) {
                t.backends6.insert(Backend6Key { svc_id: id, ip: ip6.octets() }, info);
                if serving {
                    ips6.push(ip6);
                }
            }
        }
        ips.sort();
        ips.dedup();
        ips6.sort();
        ips6.dedup();
        let revision = maglev::digest(&ips);
        for p in published {
            let info = PubInfo {
                id,
                target_port: s.target_of(p.port, p.proto).to_be(),
                pad: 0,
                count: ips.len() as u32,
                revision,
                bridge: 0,
            };
            t.published.insert(
                PubKey::new(p.host_port, p.proto.number()),
                Published { info, bridge: model::bridge_name(&s.network_id) },
            );
        }
        t.maglev.insert(id, ips.clone());
        if !vip_here {
            continue;
        }
        for p in &s.ports {
            t.services.insert(
                SvcKey::new(vip, p.port, p.proto.number()),
                SvcInfo { id, target_port: p.target.to_be(), pad: 0, count: ips.len() as u32, revision },
            );
        }
        // No port given: every port, TCP and UDP, to the same port of a
        // backend (Docker's VIPs forward any port). The datapath looks the
        // port-0 entry up when no port's matches.
        if s.ports.is_empty() {
            for proto in [model::Proto::Tcp, model::Proto::Udp] {
                t.services.insert(
                    SvcKey::new(vip, 0, proto.number()),
                    SvcInfo { id, target_port: 0, pad: 0, count: ips.len() as u32, revision },
                );
            }
        }
        t.vips.insert(vip, VipInfo { net_id: vni, backends: ips.len() as u32 });
        if let Some(vip6) = vip6 {
            let (revision, count) = (maglev::digest6(&ips6), ips6.len() as u32);
            let info = |target: u16| SvcInfo { id, target_port: target.to_be(), pad: 0, count, revision };
            for p in &s.ports {
                t.services6.insert(Svc6Key::new(vip6, p.port, p.proto.number()), info(p.target));
            }
            if s.ports.is_empty() {
                for proto in [model::Proto::Tcp, model::Proto::Udp] {
                    t.services6.insert(Svc6Key::new(vip6, 0, proto.number()), info(0));
                }
            }
            t.maglev6.insert(id, ips6);
            t.vips6.insert(vip6, VipInfo { net_id: vni, backends: count });
        }
    }
    if !t.published.is_empty()
        && let Some(IpAddr::V4(u)) = me.underlay
    {
        t.mesh_addrs.insert(u);
        t.mesh_mac = Some(trellis_ebpf::mesh_mac(u));
    }
    t
}
