//! Links: stale ones removed (ports and leftovers first, bridges after),
//! bridges made right, endpoint veths and mesh veths created or repaired.

use super::programs;
use crate::dataplane::{Action, LinkKind, Observed};
use crate::model;
use crate::reconcile::DesiredHost;

pub fn stale(desired: &DesiredHost, observed: &Observed, acts: &mut Vec<Action>) {
    // Stale links the agent owns: ports and leftovers first, bridges after.
    let mut stale_bridges = Vec::new();
    for name in observed.links.keys().filter(|n| model::owned_link(n)) {
        if name.starts_with(model::BRIDGE_PREFIX) {
            if !desired.bridges.contains_key(name) {
                stale_bridges.push(name.clone());
            }
        } else if !desired.endpoints.contains_key(name)
            && !desired.vxlans.contains_key(name)
            && !desired.endpoints.values().any(|e| e.engine_moves && &e.peer_if == name)
            && !desired.mesh_veths.contains_key(name)
            && !desired.mesh_veths.values().any(|v| &v.ifname == name)
        {
            // The host end of a stale mesh veth goes with its port.
            let port = name.strip_prefix(model::MESH_PREFIX).map(|n| format!("{}{n}", model::MESH_PORT_PREFIX));
            if port.is_some_and(|p| observed.links.contains_key(&p) && !desired.mesh_veths.contains_key(&p)) {
                continue;
            }
            acts.push(Action::DeleteLink { name: name.clone() });
        }
    }
    acts.extend(stale_bridges.into_iter().map(|name| Action::DeleteLink { name }));
}

pub fn bridges(desired: &DesiredHost, observed: &Observed, acts: &mut Vec<Action>) {
    for (name, b) in &desired.bridges {
        let observed_link = observed.links.get(name);
        match observed_link {
            Some(l) if l.kind == LinkKind::Bridge => {
                if l.mtu != b.mtu || !l.up || l.master.is_some() {
                    acts.push(Action::SetLink { name: name.clone(), mtu: b.mtu, master: None });
                }
                if l.mac.is_some_and(|m| m != b.mac) {
                    acts.push(Action::SetMac { link: name.clone(), mac: b.mac });
                }
                for a in l.addrs.iter().filter(|a| Some(**a) != b.addr && Some(**a) != b.addr6) {
                    acts.push(Action::DelAddress { link: name.clone(), addr: *a });
                }
                for addr in b.addr.into_iter().chain(b.addr6).filter(|a| !l.addrs.contains(a)) {
                    acts.push(Action::AddAddress { link: name.clone(), addr });
                }
            }
            other => {
                if other.is_some() {
                    acts.push(Action::DeleteLink { name: name.clone() });
                }
                acts.push(Action::CreateBridge { name: name.clone(), mtu: b.mtu, mac: b.mac });
                acts.push(Action::SetLink { name: name.clone(), mtu: b.mtu, master: None });
                for addr in b.addr.into_iter().chain(b.addr6) {
                    acts.push(Action::AddAddress { link: name.clone(), addr });
                }
            }
        }
    }
}

pub fn endpoints(desired: &DesiredHost, observed: &Observed, acts: &mut Vec<Action>) {
    for (name, spec) in &desired.endpoints {
        match observed.links.get(name) {
            Some(l) if l.kind == LinkKind::Veth => {
                if l.mtu != spec.mtu {
                    // The network's MTU moved: the container's end first
                    // (the host's end would drop its larger frames).
                    acts.push(Action::SetContainerMtu {
                        netns: spec.netns.clone(),
                        ifname: spec.ifname.clone(),
                        mtu: spec.mtu,
                    });
                }
                // A port that waits for its program comes up after it.
                if port_unready(l, spec) && !programs::attach_due(desired, observed, name, false) {
                    acts.push(Action::SetLink { name: name.clone(), mtu: spec.mtu, master: Some(spec.bridge.clone()) });
                }
            }
            other => {
                if other.is_some() {
                    acts.push(Action::DeleteLink { name: name.clone() });
                }
                // The veth is made down; with a program to carry it comes
                // up only once the program is on ([`programs::attach`]).
                acts.push(Action::CreateEndpoint(Box::new(spec.clone())));
                if !desired.programs.contains_key(name) {
                    acts.push(Action::SetLink { name: name.clone(), mtu: spec.mtu, master: Some(spec.bridge.clone()) });
                }
            }
        }
    }
}

/// An endpoint's host veth that is not yet an up port of its bridge of
/// the right size.
pub(super) fn port_unready(l: &crate::dataplane::ObservedLink, spec: &crate::dataplane::EndpointSpec) -> bool {
    l.master.as_deref() != Some(spec.bridge.as_str()) || !l.up || l.mtu != spec.mtu
}

/// The mesh veths: made whole where missing or not as desired (both ends,
/// MAC, address, bridge, the bridge's FDB entry); a wrong one is made
/// again (deleting its port deletes both ends).
pub fn mesh_veths(desired: &DesiredHost, observed: &Observed, acts: &mut Vec<Action>) {
    for (port, v) in &desired.mesh_veths {
        let p = observed.links.get(port);
        let h = observed.links.get(&v.ifname);
        let port_ok = p.is_some_and(|l| {
            l.kind == LinkKind::Veth
                && l.master.as_deref() == Some(v.bridge.as_str())
                && l.up
                && l.mtu == v.mtu
                && l.static_macs.contains(&v.mac)
        });
        let host_ok = h.is_some_and(|l| {
            l.kind == LinkKind::Veth && l.up && l.mtu == v.mtu && l.mac == Some(v.mac) && l.addrs == [v.cidr()]
        });
        if port_ok && host_ok {
            continue;
        }
        if p.is_some() {
            acts.push(Action::DeleteLink { name: port.clone() });
        } else if h.is_some() {
            acts.push(Action::DeleteLink { name: v.ifname.clone() });
        }
        acts.push(Action::CreateMeshVeth(Box::new(v.clone())));
    }
}
