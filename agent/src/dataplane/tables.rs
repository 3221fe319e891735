//! The eBPF datapath's tables as values (isolation subnets, VIPs, services,
//! Maglev tables, backends), and the ordered changes between two of them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use trellis_ebpf::{Backend6Key, BackendInfo, BackendKey, NetInfo, PubInfo, PubKey, Svc6Key, SvcInfo, SvcKey, VipInfo};

/// A port published on the routing mesh: the service behind it (`info`,
/// whose `bridge` is 0 here) and the bridge of its network, by name (the
/// kernel layer writes the bridge's ifindex into the map).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Published {
    pub info: PubInfo,
    pub bridge: String,
}

/// The eBPF datapath's tables: what isolation and service load balancing
/// look up. Desired and observed alike; observed Maglev tables are known by
/// service id only (each service entry carries the digest of the backend
/// set its table was built from).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    /// Every Trellis subnet of the cluster → its network.
    pub nets: BTreeMap<(Ipv4Addr, u8), NetInfo>,
    /// Every IPv6 subnet of a dual-stack network → its network.
    pub nets6: BTreeMap<(std::net::Ipv6Addr, u8), NetInfo>,
    pub vips: BTreeMap<Ipv4Addr, VipInfo>,
    pub services: BTreeMap<SvcKey, SvcInfo>,
    /// Service id → its backends (observed: empty).
    pub maglev: BTreeMap<u32, Vec<Ipv4Addr>>,
    pub backends: BTreeMap<BackendKey, BackendInfo>,
    /// IPv6 VIPs (dual-stack networks) and theirs, as the above; a
    /// service's ids are those of its IPv4 entries.
    pub vips6: BTreeMap<Ipv6Addr, VipInfo>,
    pub services6: BTreeMap<Svc6Key, SvcInfo>,
    pub maglev6: BTreeMap<u32, Vec<Ipv6Addr>>,
    pub backends6: BTreeMap<Backend6Key, BackendInfo>,
    /// The routing mesh: published ports of this host.
    pub published: BTreeMap<PubKey, Published>,
    /// The host's addresses the mesh answers on.
    pub mesh_addrs: BTreeSet<Ipv4Addr>,
    /// The host's mesh MAC while any port is published (the programs look
    /// for mesh connections only then).
    pub mesh_mac: Option<[u8; 6]>,
}

/// Changes to the tables, applied in this order: what a service will point
/// to first, the service after; the service's removal first, what it
/// pointed to after. A flow never meets a half-made entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableOps {
    pub put_backends: Vec<(BackendKey, BackendInfo)>,
    pub put_backends6: Vec<(Backend6Key, BackendInfo)>,
    pub put_maglev: Vec<(u32, Vec<Ipv4Addr>)>,
    pub put_maglev6: Vec<(u32, Vec<Ipv6Addr>)>,
    pub put_nets: Vec<((Ipv4Addr, u8), NetInfo)>,
    pub put_nets6: Vec<((std::net::Ipv6Addr, u8), NetInfo)>,
    pub put_services: Vec<(SvcKey, SvcInfo)>,
    pub put_services6: Vec<(Svc6Key, SvcInfo)>,
    pub put_vips: Vec<(Ipv4Addr, VipInfo)>,
    pub put_vips6: Vec<(Ipv6Addr, VipInfo)>,
    pub put_mesh_addrs: Vec<Ipv4Addr>,
    pub put_published: Vec<(PubKey, Published)>,
    /// The mesh switched on (with the MAC) or off (`Some(None)`).
    pub set_mesh: Option<Option<[u8; 6]>>,
    pub del_published: Vec<PubKey>,
    pub del_mesh_addrs: Vec<Ipv4Addr>,
    pub del_services: Vec<SvcKey>,
    pub del_services6: Vec<Svc6Key>,
    pub del_vips: Vec<Ipv4Addr>,
    pub del_vips6: Vec<Ipv6Addr>,
    pub del_maglev: Vec<u32>,
    pub del_maglev6: Vec<u32>,
    pub del_backends: Vec<BackendKey>,
    pub del_backends6: Vec<Backend6Key>,
    pub del_nets: Vec<(Ipv4Addr, u8)>,
    pub del_nets6: Vec<(std::net::Ipv6Addr, u8)>,
}

impl TableOps {
    pub fn is_empty(&self) -> bool {
        *self == TableOps::default()
    }

    /// How many entries change.
    pub fn len(&self) -> usize {
        self.put_backends.len()
            + self.put_backends6.len()
            + self.put_maglev.len()
            + self.put_maglev6.len()
            + self.put_services6.len()
            + self.put_vips6.len()
            + self.del_services6.len()
            + self.del_vips6.len()
            + self.del_maglev6.len()
            + self.del_backends6.len()
            + self.put_nets.len()
            + self.put_nets6.len()
            + self.put_services.len()
            + self.put_vips.len()
            + self.put_mesh_addrs.len()
            + self.put_published.len()
            + usize::from(self.set_mesh.is_some())
            + self.del_published.len()
            + self.del_mesh_addrs.len()
            + self.del_services.len()
            + self.del_vips.len()
            + self.del_maglev.len()
            + self.del_backends.len()
            + self.del_nets.len()
            + self.del_nets6.len()
    }
}

/// The entries of `want` that `have` lacks or holds otherwise, and the
/// keys of `have` that `want` lacks: one walk of both (they are sorted),
/// not a lookup per entry (a full pass diffs tens of thousands). `each`
/// sees every wanted entry with what `have` holds for its key.
fn delta<K: Ord + Clone, V: PartialEq + Clone>(
    have: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    mut each: impl FnMut(Option<&V>, &V),
) -> (Vec<(K, V)>, Vec<K>) {
    use std::cmp::Ordering::{Equal, Greater, Less};
    let (mut put, mut del) = (Vec::new(), Vec::new());
    let (mut h, mut w) = (have.iter().peekable(), want.iter().peekable());
    loop {
        let order = match (h.peek(), w.peek()) {
            (None, None) => break,
            (Some(_), None) => Less,
            (None, Some(_)) => Greater,
            (Some((hk, _)), Some((wk, _))) => hk.cmp(wk),
        };
        match order {
            Less => del.push(h.next().expect("peeked").0.clone()),
            Greater => {
                let (k, v) = w.next().expect("peeked");
                each(None, v);
                put.push((k.clone(), v.clone()));
            }
            Equal => {
                let ((_, hv), (k, v)) = (h.next().expect("peeked"), w.next().expect("peeked"));
                each(Some(hv), v);
                if hv != v {
                    put.push((k.clone(), v.clone()));
                }
            }
        }
    }
    (put, del)
}

/// The Maglev tables to write (missing, or of a service whose entries
/// record another backend set: `stale`) and to remove.
fn maglev_delta<B: Clone + PartialEq>(
    have: &BTreeMap<u32, Vec<B>>,
    want: &BTreeMap<u32, Vec<B>>,
    stale: &BTreeSet<u32>,
) -> (Vec<(u32, Vec<B>)>, Vec<u32>) {
    let mut put = Vec::new();
    let (_, del) = delta(have, want, |_, _| {});
    let mut have_ids = have.keys().peekable();
    for (id, b) in want {
        while have_ids.next_if(|h| *h < id).is_some() {}
        if have_ids.peek() != Some(&id) || stale.contains(id) {
            put.push((*id, b.clone()));
        }
    }
    (put, del)
}

impl Tables {
    /// The operations that turn `self` (observed) into `want`.
    pub fn ops_to(&self, want: &Tables) -> TableOps {
        // A table is rewritten when it is missing or when any of its
        // service's entries (VIP or mesh) records another backend set.
        let mut stale: BTreeSet<u32> = BTreeSet::new();
        let (put_services, del_services) = delta(&self.services, &want.services, |have, v| {
            if have.is_none_or(|o| o.revision != v.revision) {
                stale.insert(v.id);
            }
        });
        let (put_published, del_published) = delta(&self.published, &want.published, |have, v| {
            if have.is_none_or(|o| o.info.revision != v.info.revision) {
                stale.insert(v.info.id);
            }
        });
        let (put_maglev, del_maglev) = maglev_delta(&self.maglev, &want.maglev, &stale);
        let mut stale6: BTreeSet<u32> = BTreeSet::new();
        let (put_services6, del_services6) = delta(&self.services6, &want.services6, |have, v| {
            if have.is_none_or(|o| o.revision != v.revision) {
                stale6.insert(v.id);
            }
        });
        let (put_maglev6, del_maglev6) = maglev_delta(&self.maglev6, &want.maglev6, &stale6);
        let (put_backends, del_backends) = delta(&self.backends, &want.backends, |_, _| {});
        let (put_backends6, del_backends6) = delta(&self.backends6, &want.backends6, |_, _| {});
        let (put_vips6, del_vips6) = delta(&self.vips6, &want.vips6, |_, _| {});
        let (put_nets, del_nets) = delta(&self.nets, &want.nets, |_, _| {});
        let (put_nets6, del_nets6) = delta(&self.nets6, &want.nets6, |_, _| {});
        let (put_vips, del_vips) = delta(&self.vips, &want.vips, |_, _| {});
        TableOps {
            put_backends,
            put_backends6,
            put_maglev,
            put_maglev6,
            put_services6,
            put_vips6,
            del_services6,
            del_vips6,
            del_maglev6,
            del_backends6,
            put_nets,
            put_nets6,
            put_services,
            put_vips,
            put_mesh_addrs: want.mesh_addrs.difference(&self.mesh_addrs).copied().collect(),
            put_published,
            set_mesh: (self.mesh_mac != want.mesh_mac).then_some(want.mesh_mac),
            del_published,
            del_mesh_addrs: self.mesh_addrs.difference(&want.mesh_addrs).copied().collect(),
            del_services,
            del_vips,
            del_maglev,
            del_backends,
            del_nets,
            del_nets6,
        }
    }

    /// The tables after `ops` (Maglev tables by id only).
    pub fn apply(&mut self, ops: &TableOps) {
        self.backends.extend(ops.put_backends.iter().cloned());
        self.maglev.extend(ops.put_maglev.iter().map(|(id, _)| (*id, Vec::new())));
        self.backends6.extend(ops.put_backends6.iter().cloned());
        self.maglev6.extend(ops.put_maglev6.iter().map(|(id, _)| (*id, Vec::new())));
        self.services6.extend(ops.put_services6.iter().cloned());
        self.vips6.extend(ops.put_vips6.iter().cloned());
        for k in &ops.del_services6 {
            self.services6.remove(k);
        }
        for k in &ops.del_vips6 {
            self.vips6.remove(k);
        }
        for k in &ops.del_maglev6 {
            self.maglev6.remove(k);
        }
        for k in &ops.del_backends6 {
            self.backends6.remove(k);
        }
        self.nets.extend(ops.put_nets.iter().cloned());
        self.nets6.extend(ops.put_nets6.iter().cloned());
        self.services.extend(ops.put_services.iter().cloned());
        self.vips.extend(ops.put_vips.iter().cloned());
        self.mesh_addrs.extend(ops.put_mesh_addrs.iter().copied());
        self.published.extend(ops.put_published.iter().cloned());
        if let Some(m) = ops.set_mesh {
            self.mesh_mac = m;
        }
        for k in &ops.del_published {
            self.published.remove(k);
        }
        for a in &ops.del_mesh_addrs {
            self.mesh_addrs.remove(a);
        }
        for k in &ops.del_services {
            self.services.remove(k);
        }
        for k in &ops.del_vips {
            self.vips.remove(k);
        }
        for k in &ops.del_maglev {
            self.maglev.remove(k);
        }
        for k in &ops.del_backends {
            self.backends.remove(k);
        }
        for k in &ops.del_nets {
            self.nets.remove(k);
        }
        for k in &ops.del_nets6 {
            self.nets6.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;

    /// What `delta` replaced: a lookup per entry.
    fn naive<K: Ord + Clone, V: PartialEq + Clone>(
        have: &BTreeMap<K, V>,
        want: &BTreeMap<K, V>,
    ) -> (Vec<(K, V)>, Vec<K>) {
        let put = want.iter().filter(|(k, v)| have.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect();
        let del = have.keys().filter(|k| !want.contains_key(*k)).cloned().collect();
        (put, del)
    }

    #[test]
    fn one_walk_finds_what_a_lookup_per_entry_finds() {
        let mut rng = rand::rng();
        for _ in 0..500 {
            let mut map = || -> BTreeMap<u16, u8> {
                (0..rng.random_range(0..60)).map(|_| (rng.random_range(0..80), rng.random_range(0..3))).collect()
            };
            let (have, want) = (map(), map());
            let mut seen = Vec::new();
            let got = delta(&have, &want, |h, v| seen.push((h.copied(), *v)));
            assert_eq!(got, naive(&have, &want), "have {have:?} want {want:?}");
            // Every wanted entry is shown once, with what `have` holds.
            let expect: Vec<(Option<u8>, u8)> = want.iter().map(|(k, v)| (have.get(k).copied(), *v)).collect();
            assert_eq!(seen, expect);
        }
    }

    #[test]
    fn maglev_tables_are_rewritten_when_missing_or_stale_only() {
        let svc = |id: u32, revision: u32| SvcInfo { id, target_port: 0, pad: 0, count: 1, revision };
        let key = |port: u16| SvcKey::new(Ipv4Addr::new(10, 0, 0, 1), port, 6);
        let mut want = Tables::default();
        for id in 1..=4 {
            want.services.insert(key(id as u16), svc(id, 7));
            want.maglev.insert(id, vec![Ipv4Addr::new(10, 0, 1, id as u8)]);
        }
        let mut have = want.clone();
        // 1: missing; 2: its service records another backend set; 5: gone.
        have.maglev.remove(&1);
        have.services.insert(key(2), svc(2, 6));
        have.maglev.insert(5, vec![]);
        for v in have.maglev.values_mut() {
            v.clear();
        }
        let ops = have.ops_to(&want);
        assert_eq!(ops.put_maglev.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(ops.del_maglev, [5]);
        assert_eq!(ops.put_services, [(key(2), svc(2, 7))]);
        have.apply(&ops);
        assert!(have.ops_to(&want).is_empty());
    }
}
