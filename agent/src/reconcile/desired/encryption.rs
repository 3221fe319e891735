//! IPsec: the SAs and policies of the encrypted networks' tunnels.

use std::collections::{BTreeMap, BTreeSet};

use super::DesiredHost;
use crate::model::{self, NetworkRecord};
use crate::reconcile::Identity;

/// The IPsec state of a host whose tunnels `d` holds: for every encrypted
/// network with a VXLAN device here, SAs and policies towards each host its
/// tunnel entries point at, and the acks this host gives once they are in.
/// A network whose key ring is missing still gets its policies: its
/// traffic stops rather than leave in the clear.
pub fn encryption(
    networks: &[NetworkRecord],
    keys: &BTreeMap<String, trellis_ipsec::KeyRing>,
    d: &mut DesiredHost,
    me: &Identity,
) {
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
        nets.push(trellis_ipsec::EncryptedNet { port: v.spec.port, ring, peers });
    }
    if let Some(local) = me.underlay {
        d.xfrm = trellis_ipsec::xfrm::plan(local, &nets);
    }
}
