//! Work proportional to the change: the commonest event of a large cluster
//! — an endpoint of another host added, changed or removed on a plain
//! network no service lives on — changes only that network's tunnel entries on this
//! host. [`remote_endpoints`] finds such a change between two snapshots,
//! patches the last desired state with it and returns just the actions it
//! needs, in the order a full [`super::diff()`] would give them; anything
//! else (this host's endpoints, dual-stack networks, encrypted networks, whose tunnel entries'
//! hosts are their IPsec peers, networks, hosts, services, keys, a kernel
//! that does not match the last desired state) is left to the full
//! computation. The property test in `tests.rs` holds the two equal over
//! random event sequences. Pure.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::{DesiredHost, DesiredVxlan, Identity, Snapshot};
use crate::dataplane::{Action, LinkKind, Mac, Observed};
use crate::model::{self, EndpointRecord, HostRecord, NetworkRecord, ServiceRecord};

/// What the check of a change looks up, kept while the hosts and services
/// it was made from do not change (one allocation each in an informer's
/// views).
#[derive(Default)]
pub struct Index {
    hosts: Option<Arc<Vec<HostRecord>>>,
    /// Live hosts' underlay addresses but this one's.
    underlay: HashMap<String, IpAddr>,
    services: Option<Arc<Vec<ServiceRecord>>>,
    /// Networks some service lives on.
    service_nets: HashSet<String>,
    networks: Option<Arc<Vec<NetworkRecord>>>,
    /// Encrypted networks: an endpoint there may add or drop an IPsec peer.
    encrypted: HashSet<String>,
    /// Dual-stack networks: an endpoint there has two neighbour entries
    /// (left to the full computation).
    dual: HashSet<String>,
}

impl Index {
    fn refresh(&mut self, s: &Snapshot, me: &Identity) {
        if !self.hosts.as_ref().is_some_and(|h| Arc::ptr_eq(h, &s.hosts)) {
            self.underlay = s.hosts.iter().filter(|h| h.id != me.host).map(|h| (h.id.clone(), h.underlay)).collect();
            self.hosts = Some(s.hosts.clone());
        }
        if !self.services.as_ref().is_some_and(|v| Arc::ptr_eq(v, &s.services)) {
            self.service_nets = s.services.iter().map(|v| v.network_id.clone()).collect();
            self.services = Some(s.services.clone());
        }
        if !self.networks.as_ref().is_some_and(|n| Arc::ptr_eq(n, &s.networks)) {
            self.encrypted = s.networks.iter().filter(|n| n.encrypted).map(|n| n.id.clone()).collect();
            self.dual = s.networks.iter().filter(|n| n.subnet6.is_some()).map(|n| n.id.clone()).collect();
            self.networks = Some(s.networks.clone());
        }
    }

    /// A change of another host's endpoint on `network` is this module's.
    fn patchable(&self, network: &str) -> bool {
        !self.service_nets.contains(network) && !self.encrypted.contains(network) && !self.dual.contains(network)
    }
}

/// The tunnel entries one endpoint gives its network's device here: none
/// when it is this host's, out of the datapath, or on a host not live.
fn entries(e: &EndpointRecord, idx: &Index, me: &Identity) -> Option<((Mac, IpAddr), (IpAddr, Mac))> {
    if e.host == me.host || !e.in_datapath() {
        return None;
    }
    let underlay = idx.underlay.get(&e.host)?;
    Some(((e.mac, *underlay), (e.ip, e.mac)))
}

/// An entry taken out of a set that counts its extra contributors.
fn take<K: Ord + Copy>(set: &mut BTreeSet<K>, dups: &mut BTreeMap<K, u32>, k: K) {
    match dups.get_mut(&k) {
        Some(n) if *n > 1 => *n -= 1,
        Some(_) => {
            dups.remove(&k);
        }
        None => {
            set.remove(&k);
        }
    }
}

/// An entry put into a set that counts its extra contributors.
fn put<K: Ord + Copy>(set: &mut BTreeSet<K>, dups: &mut BTreeMap<K, u32>, k: K) {
    if !set.insert(k) {
        *dups.entry(k).or_default() += 1;
    }
}

/// The entries of one device a change touched.
#[derive(Default)]
struct Touched {
    fdb: BTreeSet<(Mac, IpAddr)>,
    neigh: BTreeSet<(IpAddr, Mac)>,
}

/// If `next` differs from `prev` only in endpoints of other hosts on plain
/// networks no service lives on, and the devices they touch are in
/// `observed` as `desired` (the desired state of `prev`, which the caller
/// knows the kernel to have: its last pass applied it without an error)
/// wants them:
/// `desired` patched to be that of `next`, and the actions that take the
/// kernel there. `None`, `desired` untouched, otherwise.
pub fn remote_endpoints(
    prev: &Snapshot,
    next: &Snapshot,
    desired: &mut Arc<DesiredHost>,
    observed: &Observed,
    me: &Identity,
    idx: &mut Index,
) -> Option<Vec<Action>> {
    me.underlay?;
    let others_same = Arc::ptr_eq(&prev.networks, &next.networks)
        && Arc::ptr_eq(&prev.hosts, &next.hosts)
        && Arc::ptr_eq(&prev.services, &next.services)
        && Arc::ptr_eq(&prev.keys, &next.keys)
        && Arc::ptr_eq(&prev.mesh_addrs, &next.mesh_addrs)
        && prev.held_ports == next.held_ports;
    if !others_same {
        return None;
    }
    idx.refresh(next, me);
    // Check every change before touching anything.
    let mut changes: Vec<(String, Option<&EndpointRecord>, Option<&EndpointRecord>)> = Vec::new();
    for (before, after) in next.endpoints.changes(&prev.endpoints) {
        let (before, after) = (before.map(|e| &**e), after.map(|e| &**e));
        let any = before.or(after)?;
        let network = &any.network_id;
        let foreign = |e: Option<&EndpointRecord>| e.is_none_or(|e| e.host != me.host && &e.network_id == network);
        if !foreign(before) || !foreign(after) || !idx.patchable(network) {
            return None;
        }
        let vxlan = model::vxlan_name(network);
        if desired.vxlans.contains_key(&vxlan) {
            changes.push((vxlan, before, after));
        }
    }
    for vxlan in changes.iter().map(|(v, ..)| v).collect::<BTreeSet<_>>() {
        let want = &desired.vxlans[vxlan];
        let master = (!want.bridge.is_empty()).then(|| want.bridge.clone());
        match observed.links.get(vxlan) {
            Some(l)
                if l.kind == LinkKind::Vxlan
                    && l.vni == Some(want.spec.vni)
                    && l.master == master
                    && l.up
                    && l.mtu == want.spec.mtu => {}
            _ => return None,
        }
    }
    let d = Arc::make_mut(desired);
    let mut touched: BTreeMap<String, Touched> = BTreeMap::new();
    for (vxlan, before, after) in changes {
        let v: &mut DesiredVxlan = d.vxlans.get_mut(&vxlan).expect("checked above");
        let t = touched.entry(vxlan).or_default();
        if let Some((fdb, neigh)) = before.and_then(|e| entries(e, idx, me)) {
            take(&mut v.fdb, &mut v.dup_fdb, fdb);
            take(&mut v.neigh, &mut v.dup_neigh, neigh);
            t.fdb.insert(fdb);
            t.neigh.insert(neigh);
        }
        if let Some((fdb, neigh)) = after.and_then(|e| entries(e, idx, me)) {
            put(&mut v.fdb, &mut v.dup_fdb, fdb);
            put(&mut v.neigh, &mut v.dup_neigh, neigh);
            t.fdb.insert(fdb);
            t.neigh.insert(neigh);
        }
    }
    // As the full diff orders them: device by device, removals first.
    let mut acts = Vec::new();
    for (name, t) in touched {
        let (want, have) = (&d.vxlans[&name], &observed.links[&name]);
        let link = || name.clone();
        for &(mac, dst) in t.fdb.iter().filter(|k| have.fdb.contains(k) && !want.fdb.contains(k)) {
            acts.push(Action::DelFdb { link: link(), mac, dst });
        }
        for &(ip, mac) in t.neigh.iter().filter(|k| have.neigh.contains(k) && !want.neigh.contains(k)) {
            acts.push(Action::DelNeigh { link: link(), ip, mac });
        }
        for &(mac, dst) in t.fdb.iter().filter(|k| want.fdb.contains(k) && !have.fdb.contains(k)) {
            acts.push(Action::AddFdb { link: link(), mac, dst });
        }
        for &(ip, mac) in t.neigh.iter().filter(|k| want.neigh.contains(k) && !have.neigh.contains(k)) {
            acts.push(Action::AddNeigh { link: link(), ip, mac });
        }
    }
    Some(acts)
}
