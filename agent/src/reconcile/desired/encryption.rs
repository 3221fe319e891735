//! IPsec: the SAs and policies of the encrypted networks' tunnels.

use std::collections::{BTreeMap, BTreeSet};

use super::DesiredHost;
use crate::model::{self, HostRecord, NetworkRecord};
use crate::reconcile::Identity;

/// The IPsec state of a host whose tunnels `d` holds: for every encrypted
/// network with a VXLAN device here, SAs and policies towards each host its
/// tunnel entries point at, and the acks this host gives once they are in.
/// A network whose key ring is missing still gets its policies: its
/// traffic stops rather than leave in the clear.
///
/// The SAs towards a peer carry ESP in UDP when this host or that peer
/// asks for it (`--encryption-transport udp`, the peer's `esp_in_udp`
/// capability): both ends decide alike.
pub fn encryption(
    networks: &[NetworkRecord],
    keys: &BTreeMap<String, trellis_ipsec::KeyRing>,
    hosts: &[HostRecord],
    d: &mut DesiredHost,
    me: &Identity,
) {
    let udp_peers: BTreeSet<std::net::IpAddr> = hosts
        .iter()
        .filter(|h| h.id != me.host && (me.esp_in_udp || model::asks_esp_in_udp(h)))
        .map(|h| h.underlay)
        .collect();
    let none = trellis_ipsec::KeyRing { keys: vec![], tx: 0, switched_ms: 0, reason: None };
    let local_nets: BTreeSet<&str> = d.endpoints.values().map(|e| e.bridge.as_str()).collect();
    let mut nets = Vec::new();
    for n in networks.iter().filter(|n| n.encrypted) {
        let ring = keys.get(&n.id).unwrap_or(&none);
        if local_nets.contains(model::bridge_name(&n.id).as_str()) {
            d.acks.insert(n.id.clone(), trellis_ipsec::Ack { rx: ring.newest(), tx: ring.tx });
        }
        let Some(v) = d.vxlans.get(&model::vxlan_name(&n.id)) else { continue };
        d.esp_vxlans.insert(v.spec.port, v.spec.name.clone());
        let peers = v.fdb.iter().map(|(_, ip)| *ip).collect();
        let udp = (!udp_peers.is_empty()).then(|| (me.esp_udp_port, udp_peers.clone()));
        nets.push(trellis_ipsec::EncryptedNet { port: v.spec.port, ring, peers, udp });
    }
    if let Some(local) = me.underlay {
        d.xfrm = trellis_ipsec::xfrm::plan(local, &nets);
    }
}
