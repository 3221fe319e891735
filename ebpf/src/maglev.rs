//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table
//! of [`MAGLEV_M`] slots in which each backend owns about `M / N` slots, and
//! adding or removing one backend moves few slots between the others. Every
//! host computes the same table from the same backend set, so a flow keeps
//! its backend whichever host's table it meets.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::{MAGLEV_M, Maglev6Table, MaglevTable, be};

/// A 64-bit mix (splitmix64's finaliser): stable across runs and hosts.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The owner of each slot: indexes into `keys` (sorted, no duplicates, not
/// empty), each key's preference list offset + j * skip (mod M, which is
/// prime, so it visits every slot), the keys taking turns.
fn owners(keys: &[u64]) -> [usize; MAGLEV_M] {
    let m = MAGLEV_M as u64;
    let prefs: Vec<(u64, u64)> = keys
        .iter()
        .map(|&k| {
            let offset = mix(k ^ 0x5bd1_e995) % m;
            let skip = mix(k ^ 0x9e37_79b9_7f4a_7c15) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut out = [0usize; MAGLEV_M];
    let mut next = vec![0u64; keys.len()];
    let mut taken = [false; MAGLEV_M];
    let mut filled = 0;
    'fill: loop {
        for (i, &(offset, skip)) in prefs.iter().enumerate() {
            let mut slot = ((offset + next[i] * skip) % m) as usize;
            while taken[slot] {
                next[i] += 1;
                slot = ((offset + next[i] * skip) % m) as usize;
            }
            taken[slot] = true;
            out[slot] = i;
            next[i] += 1;
            filled += 1;
            if filled == MAGLEV_M {
                break 'fill;
            }
        }
    }
    out
}

/// A backend set, sorted, without duplicates.
fn set_of<T: Ord + Copy>(backends: &[T]) -> Vec<T> {
    let mut set = backends.to_vec();
    set.sort();
    set.dedup();
    set
}

/// An IPv6 address as a Maglev key (both halves mixed in).
fn key6(ip: &Ipv6Addr) -> u64 {
    let v = u128::from(*ip);
    mix((v >> 64) as u64) ^ (v as u64)
}

/// The table for `backends` (order and duplicates do not matter). An empty
/// set gives a table of zeros: no backend.
pub fn table(backends: &[Ipv4Addr]) -> MaglevTable {
    let set = set_of(backends);
    let mut out = MaglevTable { ip: [0; MAGLEV_M] };
    if set.is_empty() {
        return out;
    }
    let keys: Vec<u64> = set.iter().map(|ip| u32::from(*ip) as u64).collect();
    for (slot, i) in owners(&keys).into_iter().enumerate() {
        out.ip[slot] = be(set[i]);
    }
    out
}

/// The table for IPv6 `backends`, as [`table`].
pub fn table6(backends: &[Ipv6Addr]) -> Maglev6Table {
    let set = set_of(backends);
    let mut out = Maglev6Table { ip: [[0; 16]; MAGLEV_M] };
    if set.is_empty() {
        return out;
    }
    let keys: Vec<u64> = set.iter().map(key6).collect();
    for (slot, i) in owners(&keys).into_iter().enumerate() {
        out.ip[slot] = set[i].octets();
    }
    out
}

fn digest_of(keys: impl Iterator<Item = u64>) -> u32 {
    let set = set_of(&keys.collect::<Vec<_>>());
    let mut h = 0x811c_9dc5u64 ^ set.len() as u64;
    for k in set {
        h = mix(h ^ k);
    }
    (h as u32) | 1
}

/// A digest of a backend set (what a service's map entry records, so the
/// agent knows whether the kernel's table is the one for the current set).
pub fn digest(backends: &[Ipv4Addr]) -> u32 {
    digest_of(backends.iter().map(|ip| u32::from(*ip) as u64))
}

/// [`digest`] of an IPv6 backend set.
pub fn digest6(backends: &[Ipv6Addr]) -> u32 {
    digest_of(backends.iter().map(key6))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ips(n: u8) -> Vec<Ipv4Addr> {
        (1..=n).map(|i| Ipv4Addr::new(10, 9, 0, i)).collect()
    }

    fn shares(t: &MaglevTable) -> HashMap<u32, usize> {
        let mut m = HashMap::new();
        for ip in t.ip {
            *m.entry(ip).or_default() += 1;
        }
        m
    }

    #[test]
    fn every_slot_has_a_backend_and_shares_are_even() {
        for n in [1u8, 2, 3, 7, 20, 50] {
            let t = table(&ips(n));
            let s = shares(&t);
            assert!(!s.contains_key(&0), "an empty slot with {n} backends");
            assert_eq!(s.len(), n as usize);
            let even = MAGLEV_M as f64 / n as f64;
            for (ip, count) in s {
                let dev = (count as f64 - even).abs() / even;
                assert!(dev <= 0.1, "{n} backends: {} has {count} slots, {even:.1} is even", ip_of(ip));
            }
        }
    }

    fn ip_of(v: u32) -> Ipv4Addr {
        crate::ip_of(v)
    }

    #[test]
    fn the_same_set_in_any_order_gives_the_same_table() {
        let mut a = ips(5);
        let t1 = table(&a);
        a.reverse();
        a.push(a[0]);
        assert_eq!(table(&a), t1);
        assert_eq!(digest(&a), digest(&ips(5)));
        assert_ne!(digest(&ips(4)), digest(&ips(5)));
    }

    #[test]
    fn removing_a_backend_moves_only_its_slots_mostly() {
        let before = table(&ips(10));
        let mut fewer = ips(10);
        let gone = be(fewer.remove(3));
        let after = table(&fewer);
        let mut moved = 0;
        for (b, a) in before.ip.iter().zip(after.ip.iter()) {
            if *b != gone && b != a {
                moved += 1;
            }
        }
        // Maglev promises minimal disruption, not none: a few percent.
        assert!(moved < MAGLEV_M / 10, "{moved} slots of surviving backends moved");
        assert!(!after.ip.contains(&gone));
    }

    #[test]
    fn no_backend_is_all_zeros() {
        assert!(table(&[]).ip.iter().all(|&x| x == 0));
        assert!(table6(&[]).ip.iter().all(|x| *x == [0; 16]));
    }

    #[test]
    fn ipv6_tables_spread_as_evenly_and_keep_their_slots() {
        let ips6 = |n: u16| -> Vec<Ipv6Addr> { (1..=n).map(|i| Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, i)).collect() };
        for n in [1u16, 3, 7, 50] {
            let t = table6(&ips6(n));
            let mut s: HashMap<[u8; 16], usize> = HashMap::new();
            for ip in t.ip {
                *s.entry(ip).or_default() += 1;
            }
            assert!(!s.contains_key(&[0; 16]) && s.len() == n as usize, "{n} backends");
            let even = MAGLEV_M as f64 / n as f64;
            assert!(s.values().all(|c| (*c as f64 - even).abs() / even <= 0.1), "{n} backends: {s:?}");
        }
        let mut set = ips6(10);
        let before = table6(&set);
        set.reverse();
        assert_eq!(table6(&set), before, "order does not matter");
        assert_eq!(digest6(&set), digest6(&ips6(10)));
        assert_ne!(digest6(&ips6(9)), digest6(&ips6(10)));
        let gone = set.remove(4).octets();
        let after = table6(&set);
        let moved = before.ip.iter().zip(after.ip.iter()).filter(|(b, a)| **b != gone && b != a).count();
        assert!(moved < MAGLEV_M / 10, "{moved} slots of surviving backends moved");
    }
}
