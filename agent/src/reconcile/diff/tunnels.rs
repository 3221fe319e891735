//! VXLAN devices: created or repaired, and their FDB and neighbour
//! entries made exactly the desired ones (removals before additions).

use crate::dataplane::{Action, LinkKind, Observed};
use crate::reconcile::DesiredHost;

pub fn vxlans(desired: &DesiredHost, observed: &Observed, acts: &mut Vec<Action>) {
    for (name, v) in &desired.vxlans {
        // A network's device is its bridge's port; the probe device is alone.
        let master = (!v.bridge.is_empty()).then(|| v.bridge.clone());
        let set_link = Action::SetLink { name: name.clone(), mtu: v.spec.mtu, master: master.clone() };
        match observed.links.get(name) {
            Some(l)
                if l.kind == LinkKind::Vxlan
                    && l.vni == Some(v.spec.vni)
                    && l.dont_fragment == v.spec.dont_fragment =>
            {
                if l.master != master || !l.up || l.mtu != v.spec.mtu {
                    acts.push(set_link);
                }
                for (mac, dst) in l.fdb.difference(&v.fdb) {
                    acts.push(Action::DelFdb { link: name.clone(), mac: *mac, dst: *dst });
                }
                for (ip, mac) in l.neigh.difference(&v.neigh) {
                    acts.push(Action::DelNeigh { link: name.clone(), ip: *ip, mac: *mac });
                }
                for (mac, dst) in v.fdb.difference(&l.fdb) {
                    acts.push(Action::AddFdb { link: name.clone(), mac: *mac, dst: *dst });
                }
                for (ip, mac) in v.neigh.difference(&l.neigh) {
                    acts.push(Action::AddNeigh { link: name.clone(), ip: *ip, mac: *mac });
                }
            }
            other => {
                if other.is_some() {
                    acts.push(Action::DeleteLink { name: name.clone() });
                }
                acts.push(Action::CreateVxlan(Box::new(v.spec.clone())));
                acts.push(set_link);
                acts.extend(v.fdb.iter().map(|(mac, dst)| Action::AddFdb { link: name.clone(), mac: *mac, dst: *dst }));
                acts.extend(v.neigh.iter().map(|(ip, mac)| Action::AddNeigh {
                    link: name.clone(),
                    ip: *ip,
                    mac: *mac,
                }));
            }
        }
    }
}
