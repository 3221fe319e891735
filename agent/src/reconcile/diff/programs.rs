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

pub fn detach(desired: &DesiredHost, observed: &Observed, acts: &mut Vec<Action>) {
    for name in observed.programs.iter().filter(|n| !desired.programs.contains_key(*n)) {
        acts.push(Action::DetachProgram { ifname: name.clone() });
    }
}
