//! The endpoint programs: attached on every endpoint veth (again whenever
//! the veth was recreated in this pass, or its flags changed), detached
//! from interfaces that are no endpoint's.

use std::collections::BTreeSet;

use crate::dataplane::{Action, Observed};
use crate::reconcile::DesiredHost;

/// Call after the links' phases: it looks at the veths they (re)create.
/// A veth made in this pass, or found down, comes up only after its
/// program is on: no frame crosses an endpoint that its anti-spoofing and
/// isolation program does not yet guard (a failed attach leaves it down,
/// see the runner).
pub fn attach(desired: &DesiredHost, observed: &Observed, acts: &mut Vec<Action>) {
    let created: BTreeSet<String> = acts
        .iter()
        .filter_map(|a| match a {
            Action::CreateEndpoint(s) => Some(s.host_if.clone()),
            _ => None,
        })
        .collect();
    for (name, p) in &desired.programs {
        let made = created.contains(name);
        if !attach_due(desired, observed, name, made) {
            continue;
        }
        let spec = &desired.endpoints[name];
        acts.push(Action::AttachProgram {
            ifname: name.clone(),
            ip: spec.addr.map(|a| a.addr()),
            ip6: spec.addr6.map(|a| a.addr()),
            mac: spec.mac,
            program: *p,
        });
        if made || observed.links.get(name).is_some_and(|l| super::links::port_unready(l, spec)) {
            acts.push(Action::SetLink { name: name.clone(), mtu: spec.mtu, master: Some(spec.bridge.clone()) });
        }
    }
}

/// The endpoint program goes (again) on `name` in this pass: it is wanted
/// there and not on, or its flags changed, or its veth is (re)`created`.
pub(super) fn attach_due(desired: &DesiredHost, observed: &Observed, name: &str, created: bool) -> bool {
    desired.programs.get(name).is_some_and(|p| {
        created
            || !observed.programs.contains(name)
            || observed.program_flags.get(name).is_some_and(|f| *f != p.flags())
    })
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
