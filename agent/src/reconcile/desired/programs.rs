//! The endpoint programs: on every endpoint veth of this host, with what
//! they need to know of the endpoint's network (isolation, DNS).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use super::DesiredHost;
use crate::dataplane::ProgramSpec;
use crate::model::{self, EndpointRecord, NetworkRecord, Records};
use crate::reconcile::Identity;

/// The programs of the endpoints `d` holds (call after [`super::links`]).
pub fn programs(
    endpoints: &(impl Records<EndpointRecord> + ?Sized),
    by_id: &BTreeMap<&str, &NetworkRecord>,
    me: &Identity,
    d: &mut DesiredHost,
) {
    let host = me.host.as_str();
    let net_of: BTreeMap<&str, &str> = endpoints.each().map(|e| (e.id.as_str(), e.network_id.as_str())).collect();
    // Containers (namespaces) of this host on more than one network see
    // the names of all of them: their queries go to the server. Keyed by
    // the path's bytes (a `Path` compares component by component: most of
    // this function's time on a host with a thousand endpoints).
    let mut nets_of_sandbox: HashMap<&std::ffi::OsStr, BTreeSet<&str>> = HashMap::new();
    for e in endpoints.each().filter(|e| e.host == host && e.in_datapath()) {
        nets_of_sandbox.entry(e.netns.as_os_str()).or_default().insert(e.network_id.as_str());
    }
    for (name, spec) in &d.endpoints {
        let Some(n) = net_of.get(spec.endpoint_id.as_str()).and_then(|id| by_id.get(id)) else { continue };
        // (An IPv6-only network's IPv4 gateway is the unspecified address:
        // its DNS over IPv6 is redirected, to its gateway's MAC.)
        let dns_at = match (me.dns_intercept, n.gateway_v4(), n.ipv6_only()) {
            (true, Some(IpAddr::V4(gw)), _) => Some((gw, model::Mac::for_ip(n.subnet.network()))),
            (true, None, true) => Some((std::net::Ipv4Addr::UNSPECIFIED, model::Mac::for_ip(n.subnet.network()))),
            _ => None,
        };
        let dns6_at = match (dns_at, n.gateway_v6()) {
            (Some(_), Some(IpAddr::V6(gw6))) => Some(gw6),
            _ => None,
        };
        let alone = nets_of_sandbox.get(spec.netns.as_os_str()).is_none_or(|s| s.len() <= 1);
        let dns_fast = me.dns_kernel && dns_at.is_some() && alone;
        d.programs.insert(name.clone(), ProgramSpec { vni: n.vni, internal: n.internal, dns_at, dns6_at, dns_fast });
    }
}
