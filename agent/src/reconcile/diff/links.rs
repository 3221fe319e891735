//! Links: stale ones removed (ports and leftovers first, bridges after),
//! bridges made right, endpoint veths created or repaired.

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
        {
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
                for a in l.addrs.iter().filter(|a| Some(**a) != b.addr) {
                    acts.push(Action::DelAddress { link: name.clone(), addr: *a });
                }
                if let Some(addr) = b.addr
                    && !l.addrs.contains(&addr)
                {
                    acts.push(Action::AddAddress { link: name.clone(), addr });
                }
            }
            other => {
                if other.is_some() {
                    acts.push(Action::DeleteLink { name: name.clone() });
                }
                acts.push(Action::CreateBridge { name: name.clone(), mtu: b.mtu, mac: b.mac });
                acts.push(Action::SetLink { name: name.clone(), mtu: b.mtu, master: None });
                if let Some(addr) = b.addr {
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
                if l.master.as_deref() != Some(spec.bridge.as_str()) || !l.up || l.mtu != spec.mtu {
                    acts.push(Action::SetLink { name: name.clone(), mtu: spec.mtu, master: Some(spec.bridge.clone()) });
                }
            }
            other => {
                if other.is_some() {
                    acts.push(Action::DeleteLink { name: name.clone() });
                }
                acts.push(Action::CreateEndpoint(Box::new(spec.clone())));
            }
        }
    }
}
