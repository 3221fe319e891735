//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table
//! of [`MAGLEV_M`] slots in which each backend owns about `M / N` slots, and
//! adding or removing one backend moves few slots between the others. Every
//! host computes the same table from the same backend set, so a flow keeps
//! its backend whichever host's table it meets.

use std::net::Ipv4Addr;

use crate::{MAGLEV_M, MaglevTable, be};

/// A 64-bit mix (splitmix64's finaliser): stable across runs and hosts.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The table for `backends` (order and duplicates do not matter). An empty
/// set gives a table of zeros: no backend.
pub fn table(backends: &[Ipv4Addr]) -> MaglevTable {
    let mut set: Vec<Ipv4Addr> = backends.to_vec();
    set.sort();
    set.dedup();
    let m = MAGLEV_M as u64;
    let mut out = MaglevTable { ip: [0; MAGLEV_M] };
    if set.is_empty() {
        return out;
    }
    // Each backend's preference list is offset + j * skip (mod M); M is
    // prime, so it visits every slot.
    let prefs: Vec<(u64, u64)> = set
        .iter()
        .map(|ip| {
            let k = u32::from(*ip) as u64;
            let offset = mix(k ^ 0x5bd1_e995) % m;
            let skip = mix(k ^ 0x9e37_79b9_7f4a_7c15) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; set.len()];
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
            out.ip[slot] = be(set[i]);
            next[i] += 1;
            filled += 1;
            if filled == MAGLEV_M {
                break 'fill;
            }
        }
    }
    out
}

/// A digest of a backend set (what a service's map entry records, so the
/// agent knows whether the kernel's table is the one for the current set).
pub fn digest(backends: &[Ipv4Addr]) -> u32 {
    let mut set: Vec<u32> = backends.iter().map(|ip| u32::from(*ip)).collect();
    set.sort_unstable();
    set.dedup();
    let mut h = 0x811c_9dc5u64 ^ set.len() as u64;
    for ip in set {
        h = mix(h ^ ip as u64);
    }
    (h as u32) | 1
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
    }
}
