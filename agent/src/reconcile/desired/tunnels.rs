//! Tunnels: on a host with endpoints on a network, a VXLAN device with a
//! static FDB entry (MAC → VTEP) and neighbour entry (IP → MAC) for every
//! endpoint of that network on every other live host; and the probe device
//! towards every peer.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::{DesiredHost, DesiredVxlan};
use crate::dataplane::{Sysctl, VxlanSpec};
use crate::model::{self, EndpointRecord, HostRecord, NetworkRecord, Records};
use crate::reconcile::Identity;

/// The probe device's MTU when this host's underlay MTU is not known (or
/// small): IPv6's minimum.
pub const PROBE_MIN_MTU: u32 = 1280;

/// The VXLAN devices of a host whose underlay address is `local` (call
/// after [`super::links`]: a network gets a device where `d` has endpoints).
pub fn tunnels(
    endpoints: &(impl Records<EndpointRecord> + ?Sized),
    hosts: &[HostRecord],
    by_id: &BTreeMap<&str, &NetworkRecord>,
    me: &Identity,
    local: IpAddr,
    d: &mut DesiredHost,
) {
    let host = me.host.as_str();
    let live: BTreeMap<&str, &HostRecord> = hosts.iter().filter(|h| h.id != host).map(|h| (h.id.as_str(), h)).collect();
    // The probe tunnel to every peer (see [`model::PROBE_VXLAN`]), as
    // large as this host's underlay carries, its packets not fragmented:
    // the path MTU probes through it find what VXLAN itself gets through.
    let own_mtu = hosts.iter().find(|h| h.id == host).map_or(0, |h| h.underlay_mtu);
    let mut probe = DesiredVxlan {
        spec: VxlanSpec {
            name: model::PROBE_VXLAN.into(),
            vni: model::PROBE_VNI,
            port: me.vxlan_port,
            local,
            mtu: own_mtu.saturating_sub(model::VXLAN_OVERHEAD).max(PROBE_MIN_MTU),
            mac: me.vtep_mac,
            // Its link-local address answers probes from the moment it is
            // up: IPv6 on (a host may have it off by default), no DAD wait.
            sysctls: ["disable_ipv6", "accept_dad"]
                .map(|knob| Sysctl {
                    path: format!("/proc/sys/net/ipv6/conf/{}/{knob}", model::PROBE_VXLAN),
                    value: "0".into(),
                })
                .into(),
            dont_fragment: true,
        },
        bridge: String::new(),
        fdb: BTreeSet::new(),
        neigh: BTreeSet::new(),
        dup_fdb: BTreeMap::new(),
        dup_neigh: BTreeMap::new(),
    };
    for h in live.values() {
        probe.fdb.insert((h.vtep_mac, h.underlay));
        probe.neigh.insert((IpAddr::V6(h.vtep_mac.link_local()), h.vtep_mac));
    }
    d.vxlans.insert(model::PROBE_VXLAN.into(), probe);
    // One look at every endpoint (a search per local one was local × all).
    let local_ids: BTreeSet<&str> = d.endpoints.values().map(|e| e.endpoint_id.as_str()).collect();
    let local_nets: BTreeSet<&str> = endpoints
        .each()
        .filter(|e| e.host == host && local_ids.contains(e.id.as_str()))
        .map(|e| e.network_id.as_str())
        .collect();
    for net_id in local_nets {
        let Some(n) = by_id.get(net_id) else { continue };
        d.vxlans.insert(model::vxlan_name(&n.id), network_vxlan(n, endpoints, &live, me, local));
    }
}

/// A network's VXLAN device on this host, with an entry for every endpoint
/// of the network on every other live host (`live`), draining ones too
/// (their connections keep flowing).
pub fn network_vxlan(
    n: &NetworkRecord,
    endpoints: &(impl Records<EndpointRecord> + ?Sized),
    live: &BTreeMap<&str, &HostRecord>,
    me: &Identity,
    local: IpAddr,
) -> DesiredVxlan {
    let mut v = DesiredVxlan {
        spec: VxlanSpec {
            name: model::vxlan_name(&n.id),
            vni: n.vni,
            port: n.vxlan_port.unwrap_or(me.vxlan_port),
            local,
            mtu: n.mtu,
            mac: me.vtep_mac,
            // A network's device carries IPv4 only: nothing to set.
            sysctls: Vec::new(),
            dont_fragment: false,
        },
        bridge: model::bridge_name(&n.id),
        fdb: BTreeSet::new(),
        neigh: BTreeSet::new(),
        dup_fdb: BTreeMap::new(),
        dup_neigh: BTreeMap::new(),
    };
    for e in endpoints.each().filter(|e| e.network_id == n.id && e.in_datapath()) {
        let Some(h) = live.get(e.host.as_str()) else { continue };
        if !v.fdb.insert((e.mac, h.underlay)) {
            *v.dup_fdb.entry((e.mac, h.underlay)).or_default() += 1;
        }
        if !v.neigh.insert((e.ip, e.mac)) {
            *v.dup_neigh.entry((e.ip, e.mac)).or_default() += 1;
        }
        // Its IPv6 address too: the device answers neighbour solicitations
        // for it as it answers ARP (no multicast NDP over the tunnels).
        if let Some(ip6) = e.ip6
            && !v.neigh.insert((ip6, e.mac))
        {
            *v.dup_neigh.entry((ip6, e.mac)).or_default() += 1;
        }
    }
    v
}
