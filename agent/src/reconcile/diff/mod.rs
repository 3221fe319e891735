//! The actions that turn what a host has ([`Observed`]) into what it
//! should have ([`DesiredHost`]), in an order that works, one object kind
//! per file. The phases, in order:
//!
//! 1. IPsec SAs and policies to add: an encrypted network's are in before
//!    any tunnel entry could send its traffic;
//! 2. stale links ([`links::stale`]): ports and leftovers, then bridges;
//! 3. bridges, then endpoint veths and mesh veths ([`links`]);
//! 4. VXLAN devices and their entries ([`tunnels`]);
//! 5. the endpoint programs on the veths ([`programs::attach`]), the
//!    routing mesh's on the uplink and network devices
//!    ([`programs::attach_mesh`]);
//! 6. the eBPF tables: remote backends' tunnel entries and local backends'
//!    veths are in place by now;
//! 7. programs off interfaces that are no endpoint's, mesh programs off
//!    interfaces that need none;
//! 8. the egress rules;
//! 9. stale IPsec policies and SAs: the tunnel entries that used them are
//!    gone.
//!
//! Pure.

pub mod links;
pub mod programs;
pub mod tunnels;

use crate::dataplane::{Action, Observed};
use crate::reconcile::DesiredHost;

pub fn diff(desired: &DesiredHost, observed: &Observed) -> Vec<Action> {
    diff_with(desired, observed, true)
}

/// [`diff`] but the eBPF tables, which the caller knows to match (the same
/// desired tables and the same picture of the kernel's as a pass that found
/// them equal): comparing tens of thousands of entries on every periodic
/// pass is what an idle agent would spend its time on.
pub fn diff_but_tables(desired: &DesiredHost, observed: &Observed) -> Vec<Action> {
    diff_with(desired, observed, false)
}

fn diff_with(desired: &DesiredHost, observed: &Observed, with_tables: bool) -> Vec<Action> {
    let mut acts = Vec::new();
    let xfrm = trellis_ipsec::xfrm::diff(&desired.xfrm, &observed.xfrm);
    let xfrm_action = |op: &trellis_ipsec::XfrmOp| {
        let port = match op {
            trellis_ipsec::XfrmOp::AddSa(sa) => Some(sa.port),
            trellis_ipsec::XfrmOp::AddPolicy(p) | trellis_ipsec::XfrmOp::DelPolicy(p) => Some(p.port),
            trellis_ipsec::XfrmOp::DelSa(_) => None,
        };
        Action::Xfrm { op: op.clone(), vxlan: port.and_then(|p| desired.esp_vxlans.get(&p).cloned()) }
    };
    acts.extend(xfrm.first.iter().map(xfrm_action));
    links::stale(desired, observed, &mut acts);
    links::bridges(desired, observed, &mut acts);
    links::endpoints(desired, observed, &mut acts);
    links::mesh_veths(desired, observed, &mut acts);
    tunnels::vxlans(desired, observed, &mut acts);
    programs::attach(desired, observed, &mut acts);
    programs::attach_mesh(desired, observed, &mut acts);
    if with_tables {
        tables(desired, observed, &mut acts);
    }
    programs::detach(desired, observed, &mut acts);
    programs::detach_mesh(desired, observed, &mut acts);
    egress(desired, observed, &mut acts);
    acts.extend(xfrm.last.iter().map(xfrm_action));
    acts
}

fn tables(desired: &DesiredHost, observed: &Observed, acts: &mut Vec<Action>) {
    // The tables last: remote backends' tunnel entries and local backends'
    // veths are in place by now.
    let ops = observed.tables.ops_to(&desired.tables);
    if !ops.is_empty() {
        acts.push(Action::UpdateTables(Box::new(ops)));
    }
}

fn egress(desired: &DesiredHost, observed: &Observed, acts: &mut Vec<Action>) {
    if observed.egress.as_deref() != Some(desired.egress.fingerprint().as_str()) {
        acts.push(Action::ApplyEgress(desired.egress.clone()));
    }
}
