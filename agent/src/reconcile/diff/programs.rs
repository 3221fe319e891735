//! The endpoint programs: attached on every endpoint veth (again whenever
//! the veth was recreated in this pass, or its flags changed), detached
//! from interfaces that are no endpoint's.

use std::collections::BTreeSet;

use crate::dataplane::{Action, Observed};
use crate::reconcile::DesiredHost;

/// Call after the links' phases: it looks at the veths they (re)create.
pub fn attach(desired: &DesiredHost, observed: &Observed, acts: &mut Vec<Action>) {
    // The endpoint program: on every endpoint veth, again whenever the veth
    // was (re)created in this pass; off interfaces that are no endpoint's.
    let created: BTreeSet<String> = acts
        .iter()
        .filter_map(|a| match a {
            Action::CreateEndpoint(s) => Some(s.host_if.clone()),
            _ => None,
        })
        .collect();
    for (name, p) in &desired.programs {
        let changed = observed.program_flags.get(name).is_some_and(|f| *f != p.flags());
        if !observed.programs.contains(name) || created.contains(name) || changed {
            let spec = &desired.endpoints[name];
            acts.push(Action::AttachProgram { ifname: name.clone(), ip: spec.addr.addr(), mac: spec.mac, program: *p });
        }
    }
}

/// The routing mesh's programs: on the uplink and the network devices that
/// should have one (again on a device (re)created in this pass). Call after
/// the tunnels' phase.
pub fn attach_mesh(desired: &DesiredHost, observed: &Observed, acts: &mut Vec<Action>) {
    let created: BTreeSet<String> = acts
        .iter()
        .filter_map(|a| match a {
            Action::CreateVxlan(v) => Some(v.name.clone()),
            _ => None,
        })
        .collect();
    for (name, role) in &desired.mesh_links {
        if !observed.mesh_links.contains(name) || created.contains(name) {
            acts.push(Action::AttachMesh { ifname: name.clone(), role: *role });
        }
    }
}

/// Mesh programs off interfaces that should have none (after the tables:
/// no published port points at them any more).
pub fn detach_mesh(desired: &DesiredHost, observed: &Observed, acts: &mut Vec<Action>) {
    for name in observed.mesh_links.iter().filter(|n| !desired.mesh_links.contains_key(*n)) {
        acts.push(Action::DetachMesh { ifname: name.clone() });
    }
}

pub fn detach(desired: &DesiredHost, observed: &Observed, acts: &mut Vec<Action>) {
    for name in observed.programs.iter().filter(|n| !desired.programs.contains_key(*n)) {
        acts.push(Action::DetachProgram { ifname: name.clone() });
    }
}
