//! What a host should have of bridges (every network's, on every host),
//! endpoint veths (its own endpoints') and egress rules (with the ports
//! published to its own endpoints, but those of internal networks).

use std::collections::BTreeMap;

use ipnet::IpNet;

use super::{DesiredBridge, DesiredHost};
use crate::dataplane::EndpointSpec;
use crate::dataplane::egress::{EgressNet, EgressRules, PublishedRule};
use crate::model::{self, EndpointRecord, NetworkRecord, Records};
use crate::reconcile::Identity;

/// Every network's bridge (cheap, and a network is usable on a host before
/// its first endpoint lands there) and the egress rules of them all.
pub fn bridges(networks: &[NetworkRecord], me: &Identity, d: &mut DesiredHost) {
    let mut egress = Vec::new();
    for n in networks {
        let bridge = model::bridge_name(&n.id);
        // The same on every host (the gateway is anycast), never an
        // endpoint's (no endpoint has the subnet's network address).
        let mac = model::Mac::for_ip(n.subnet.network());
        d.bridges.insert(
            bridge.clone(),
            DesiredBridge { mtu: n.mtu, addr: n.gateway4_cidr(), addr6: n.gateway6_cidr(), mac },
        );
        egress.push(EgressNet {
            bridge,
            subnet: n.subnet_v4(),
            gateway: n.gateway_v4(),
            internal: n.internal,
            subnet6: n.subnet_v6(),
            gateway6: n.gateway_v6(),
        });
    }
    d.egress = EgressRules::new(egress);
    // The eBPF program redirects DNS itself; nftables does without it.
    d.egress.dns_intercept = me.dns_intercept && !me.ebpf;
    // With the program's redirect (no NAT to undo), DNS over UDP to the
    // gateway is kept out of connection tracking.
    d.egress.dns_notrack = me.dns_intercept && me.ebpf;
    // The host routes between the bridges and the uplink: forwarding on
    // with every apply of the rules (with no network too), never off.
    d.egress.forwarding = true;
}

/// The veths of this host's endpoints (not those being deleted, but those
/// draining: their connections keep flowing; their published ports went
/// with the detach).
pub fn endpoints(
    endpoints: &(impl Records<EndpointRecord> + ?Sized),
    by_id: &BTreeMap<&str, &NetworkRecord>,
    me: &Identity,
    d: &mut DesiredHost,
) {
    let host = me.host.as_str();
    for e in endpoints.each().filter(|e| e.host == host && e.in_datapath()) {
        let Some(n) = by_id.get(e.network_id.as_str()) else {
            continue;
        };
        if let (false, false, std::net::IpAddr::V4(addr)) = (n.internal, e.deleting, e.ip) {
            d.egress.publish(
                &model::bridge_name(&n.id),
                e.ports.iter().filter_map(|p| {
                    let host_ip = match p.host_ip {
                        None => None,
                        Some(std::net::IpAddr::V4(ip)) => Some(ip),
                        // IPv6 host addresses are refused when published.
                        Some(std::net::IpAddr::V6(_)) => return None,
                    };
                    Some(PublishedRule { proto: p.proto, host_ip, host_port: p.host_port, addr, port: p.port })
                }),
            );
        }
        let host_if = model::host_ifname(&e.id);
        d.endpoints.insert(
            host_if.clone(),
            EndpointSpec {
                endpoint_id: e.id.clone(),
                host_if,
                peer_if: model::peer_ifname(&e.id),
                bridge: model::bridge_name(&n.id),
                mtu: n.mtu,
                netns: e.netns.clone(),
                ifname: e.ifname.clone(),
                mac: e.mac,
                addr: e.ipv4().zip(n.subnet_v4()).and_then(|(a, s)| IpNet::new(a, s.prefix_len()).ok()),
                default_via: if n.internal { None } else { n.gateway_v4() },
                addr6: e.ipv6().zip(n.subnet_v6()).and_then(|(a, s)| IpNet::new(a, s.prefix_len()).ok()),
                default_via6: if n.internal { None } else { n.gateway_v6() },
                engine_moves: e.kind == model::EndpointKind::Docker,
                created_unix: e.created_unix,
            },
        );
    }
}
