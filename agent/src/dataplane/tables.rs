//! The eBPF datapath's tables as values (isolation subnets, VIPs, services,
//! Maglev tables, backends), and the ordered changes between two of them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use trellis_ebpf::{BackendInfo, BackendKey, NetInfo, PubInfo, PubKey, SvcInfo, SvcKey, VipInfo};

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
    pub vips: BTreeMap<Ipv4Addr, VipInfo>,
    pub services: BTreeMap<SvcKey, SvcInfo>,
    /// Service id → its backends (observed: empty).
    pub maglev: BTreeMap<u32, Vec<Ipv4Addr>>,
    pub backends: BTreeMap<BackendKey, BackendInfo>,
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
    pub put_maglev: Vec<(u32, Vec<Ipv4Addr>)>,
    pub put_nets: Vec<((Ipv4Addr, u8), NetInfo)>,
    pub put_services: Vec<(SvcKey, SvcInfo)>,
    pub put_vips: Vec<(Ipv4Addr, VipInfo)>,
    pub put_mesh_addrs: Vec<Ipv4Addr>,
    pub put_published: Vec<(PubKey, Published)>,
    /// The mesh switched on (with the MAC) or off (`Some(None)`).
    pub set_mesh: Option<Option<[u8; 6]>>,
    pub del_published: Vec<PubKey>,
    pub del_mesh_addrs: Vec<Ipv4Addr>,
    pub del_services: Vec<SvcKey>,
    pub del_vips: Vec<Ipv4Addr>,
    pub del_maglev: Vec<u32>,
    pub del_backends: Vec<BackendKey>,
    pub del_nets: Vec<(Ipv4Addr, u8)>,
}

impl TableOps {
    pub fn is_empty(&self) -> bool {
        *self == TableOps::default()
    }

    /// How many entries change.
    pub fn len(&self) -> usize {
        self.put_backends.len()
            + self.put_maglev.len()
            + self.put_nets.len()
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
    }
}

impl Tables {
    /// The operations that turn `self` (observed) into `want`.
    pub fn ops_to(&self, want: &Tables) -> TableOps {
        fn changed<K: Ord + Clone, V: PartialEq + Clone>(have: &BTreeMap<K, V>, want: &BTreeMap<K, V>) -> Vec<(K, V)> {
            want.iter().filter(|(k, v)| have.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect()
        }
        fn gone<K: Ord + Clone, V>(have: &BTreeMap<K, V>, want: &BTreeMap<K, V>) -> Vec<K> {
            have.keys().filter(|k| !want.contains_key(*k)).cloned().collect()
        }
        // A table is rewritten when it is missing or when any of its
        // service's entries (VIP or mesh) records another backend set.
        let mut stale: BTreeSet<u32> = want
            .services
            .iter()
            .filter(|(k, v)| self.services.get(*k).is_none_or(|o| o.revision != v.revision))
            .map(|(_, v)| v.id)
            .collect();
        stale.extend(
            want.published
                .iter()
                .filter(|(k, v)| self.published.get(*k).is_none_or(|o| o.info.revision != v.info.revision))
                .map(|(_, v)| v.info.id),
        );
        let put_maglev = want
            .maglev
            .iter()
            .filter(|(id, _)| !self.maglev.contains_key(*id) || stale.contains(*id))
            .map(|(id, b)| (*id, b.clone()))
            .collect();
        TableOps {
            put_backends: changed(&self.backends, &want.backends),
            put_maglev,
            put_nets: changed(&self.nets, &want.nets),
            put_services: changed(&self.services, &want.services),
            put_vips: changed(&self.vips, &want.vips),
            put_mesh_addrs: want.mesh_addrs.difference(&self.mesh_addrs).copied().collect(),
            put_published: changed(&self.published, &want.published),
            set_mesh: (self.mesh_mac != want.mesh_mac).then_some(want.mesh_mac),
            del_published: gone(&self.published, &want.published),
            del_mesh_addrs: self.mesh_addrs.difference(&want.mesh_addrs).copied().collect(),
            del_services: gone(&self.services, &want.services),
            del_vips: gone(&self.vips, &want.vips),
            del_maglev: gone(&self.maglev, &want.maglev),
            del_backends: gone(&self.backends, &want.backends),
            del_nets: gone(&self.nets, &want.nets),
        }
    }

    /// The tables after `ops` (Maglev tables by id only).
    pub fn apply(&mut self, ops: &TableOps) {
        self.backends.extend(ops.put_backends.iter().cloned());
        self.maglev.extend(ops.put_maglev.iter().map(|(id, _)| (*id, Vec::new())));
        self.nets.extend(ops.put_nets.iter().cloned());
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
    }
}
