//! The eBPF datapath's tables as values (isolation subnets, VIPs, services,
//! Maglev tables, backends), and the ordered changes between two of them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use trellis_ebpf::{BackendInfo, BackendKey, NetInfo, SvcInfo, SvcKey, VipInfo};

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
        // service's entries records another backend set.
        let stale: BTreeSet<u32> = want
            .services
            .iter()
            .filter(|(k, v)| self.services.get(*k).is_none_or(|o| o.revision != v.revision))
            .map(|(_, v)| v.id)
            .collect();
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
