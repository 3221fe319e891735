//! Slots: where an endpoint's own tables (`ep_ct`, `ep_rnat`, `ep_flows6`,
//! maps of maps) are found. Putting a table into a map of maps waits for an
//! RCU grace period (the kernel's `maybe_wait_bpf_programs`, 10–15 ms each
//! on the test machine: most of an attach's time when it was done per
//! attach), so the tables are made ahead of time under spare slots by a
//! thread of their own, and an endpoint takes a spare slot by writing its
//! number into its `endpoint_info` (a plain hash map: no wait). A slot an
//! endpoint leaves gets fresh tables before it is handed out again (its old
//! ones, with the old endpoint's flows, are replaced, not cleared: nothing
//! of one endpoint's flows reaches another's).
//!
//! The pure part — which slot to hand out, which to prepare next — is
//! [`Pool`]; [`Refiller`] runs it against the maps.

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Spare slots kept ready (each holds three empty tables of the endpoint
/// quota: with the default quota about 1 MiB of bucket array each).
pub const SPARE_SLOTS: usize = 4;

/// The slots' bookkeeping. Slot 0 is never used (`endpoint_info.slot` 0:
/// no tables).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pool {
    /// Ready: fresh tables of the given quota in all three outer maps.
    pub spare: Vec<(u32, u32)>,
    /// To prepare again (left by an endpoint, or found without an owner
    /// at load, or of a quota no longer wanted).
    pub dirty: BTreeSet<u32>,
    /// Being prepared by the refiller right now.
    pub preparing: Option<u32>,
    /// The lowest slot never handed out.
    pub next: u32,
    /// The size of the tables made from now on.
    pub quota: u32,
    pub stop: bool,
}

impl Pool {
    /// The pool as found in pinned maps: `present` the slots that have
    /// tables, `used` the slots endpoints hold. Unowned slots are prepared
    /// again before use (their tables may hold a gone endpoint's flows).
    pub fn recovered(present: &BTreeSet<u32>, used: &BTreeSet<u32>, quota: u32) -> Pool {
        let next = present.iter().chain(used).max().map_or(1, |m| m + 1).max(1);
        let dirty = present.iter().filter(|s| !used.contains(s) && **s != 0).copied().collect();
        Pool { spare: Vec::new(), dirty, preparing: None, next, quota, stop: false }
    }

    /// A spare slot of the current quota, if any (spare ones of another
    /// quota go back to be prepared again).
    pub fn take(&mut self) -> Option<u32> {
        while let Some((slot, quota)) = self.spare.pop() {
            if quota == self.quota {
                return Some(slot);
            }
            self.dirty.insert(slot);
        }
        None
    }

    /// A slot to prepare now, for a caller that found no spare one.
    pub fn fresh(&mut self) -> u32 {
        match self.dirty.pop_first() {
            Some(s) => s,
            None => {
                self.next += 1;
                self.next - 1
            }
        }
    }

    /// What the refiller should prepare next, if anything: a dirty slot
    /// first, then a new one while fewer than [`SPARE_SLOTS`] are spare.
    pub fn next_to_prepare(&mut self) -> Option<u32> {
        if self.stop || self.preparing.is_some() {
            return None;
        }
        let slot = match self.dirty.pop_first() {
            Some(s) => s,
            None if self.spare.len() < SPARE_SLOTS => {
                self.next += 1;
                self.next - 1
            }
            None => return None,
        };
        self.preparing = Some(slot);
        Some(slot)
    }

    /// The refiller prepared `slot` with tables of `quota` (or failed to:
    /// then it is dirty again).
    pub fn prepared(&mut self, slot: u32, quota: u32, ok: bool) {
        self.preparing = None;
        if ok {
            self.spare.push((slot, quota));
        } else {
            self.dirty.insert(slot);
        }
    }

    /// An endpoint left `slot`.
    pub fn release(&mut self, slot: u32) {
        if slot != 0 {
            self.dirty.insert(slot);
        }
    }
}

/// The pool shared by a datapath and its refiller thread.
#[derive(Default)]
pub struct Shared {
    pub pool: Mutex<Pool>,
    pub wake: Condvar,
}

impl Shared {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs `prepare(slot, quota)` for the pool until it is stopped; a failed
/// preparation is retried after a second.
pub fn refill(shared: Arc<Shared>, mut prepare: impl FnMut(u32, u32) -> bool) {
    loop {
        let (slot, quota) = {
            let mut pool = shared.lock();
            loop {
                if pool.stop {
                    return;
                }
                if let Some(s) = pool.next_to_prepare() {
                    break (s, pool.quota);
                }
                pool = shared.wake.wait_timeout(pool, Duration::from_secs(1)).unwrap_or_else(|p| p.into_inner()).0;
            }
        };
        let ok = prepare(slot, quota);
        shared.lock().prepared(slot, quota, ok);
        if !ok {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_handed_out_once_and_come_back_only_prepared_again() {
        let mut p = Pool::recovered(&BTreeSet::new(), &BTreeSet::new(), 64);
        assert_eq!(p.next, 1, "slot 0 is never used");
        // The refiller fills up to SPARE_SLOTS, one at a time.
        let mut made = Vec::new();
        while let Some(s) = p.next_to_prepare() {
            assert_eq!(p.next_to_prepare(), None, "one preparation at a time");
            p.prepared(s, 64, true);
            made.push(s);
        }
        assert_eq!(made, (1..=SPARE_SLOTS as u32).collect::<Vec<_>>());
        let a = p.take().unwrap();
        let b = p.take().unwrap();
        assert_ne!(a, b);
        // A slot left goes back only through a preparation (fresh tables).
        p.release(a);
        assert!(!p.spare.iter().any(|(s, _)| *s == a));
        assert_eq!(p.next_to_prepare(), Some(a), "the left slot is prepared again first");
        p.prepared(a, 64, true);
        assert!(p.spare.contains(&(a, 64)));
        // A failed preparation leaves the slot dirty.
        let s = p.next_to_prepare().unwrap();
        p.prepared(s, 64, false);
        assert!(p.dirty.contains(&s) && !p.spare.iter().any(|(x, _)| *x == s));
        // Another quota: spare slots of the old one are not handed out.
        p.dirty.clear();
        p.quota = 8;
        assert_eq!(p.take(), None);
        assert!(p.spare.is_empty() && p.dirty.len() >= SPARE_SLOTS - 2);
        // With none spare a caller prepares one itself: a dirty one first.
        let d = *p.dirty.first().unwrap();
        assert_eq!(p.fresh(), d);
        p.dirty.clear();
        let n = p.next;
        assert_eq!(p.fresh(), n);
        assert_eq!(p.fresh(), n + 1);
    }

    #[test]
    fn a_recovered_pool_prepares_unowned_slots_again_and_never_reuses_a_number() {
        let present = BTreeSet::from([1, 2, 3, 7]);
        let used = BTreeSet::from([2, 7, 9]);
        let mut p = Pool::recovered(&present, &used, 64);
        assert_eq!(p.next, 10);
        assert_eq!(p.dirty, BTreeSet::from([1, 3]));
        assert_eq!(p.take(), None, "nothing is spare until prepared");
        assert_eq!(p.next_to_prepare(), Some(1));
        p.prepared(1, 64, true);
        assert_eq!(p.next_to_prepare(), Some(3));
        p.prepared(3, 64, true);
        assert_eq!(p.next_to_prepare(), Some(10));
        p.stop = true;
        assert_eq!(p.next_to_prepare(), None, "stopped");
    }
}
