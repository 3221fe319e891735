//! Key rotation, make-before-break across the cluster, as a pure state
//! machine over a network's [`KeyRing`] (kept in the store) and the acks of
//! the hosts that carry the network:
//!
//! 1. **Rotate**: a new epoch's secret joins the ring; senders keep the old
//!    one. Every host installs inbound SAs for every epoch in the ring and
//!    acks the newest it installed.
//! 2. **Switch**: once every member acked the new epoch inbound, senders
//!    move to it (each host installs its new outbound SA before removing the
//!    old one) and ack the epoch they send with.
//! 3. **Retire**: once every member sends with the new epoch and a grace
//!    period has passed for packets in flight, the old epoch leaves the
//!    ring and hosts remove its inbound SAs.
//!
//! Any agent may drive a step; the store's compare-and-swap makes one win.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::keys::Secret;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochKey {
    pub epoch: u32,
    pub secret: Secret,
    pub created_ms: u64,
}

/// A network's keys: at most two epochs at once (during a rotation), and
/// the one senders use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRing {
    pub keys: Vec<EpochKey>,
    pub tx: u32,
    /// When senders last switched epoch (or the ring was made).
    pub switched_ms: u64,
    /// Why the current rotation started, for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
}

/// What a host reports for a network once its kernel has the SAs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The newest epoch whose inbound SAs (from every peer) are installed.
    pub rx: u32,
    /// The epoch its outbound SAs use.
    pub tx: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    Schedule,
    SequenceNumbers,
    OnDemand,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Rotate when the epoch in use is this old (0: never on schedule).
    pub interval_ms: u64,
    /// Keep the old epoch's inbound SAs this long after every sender switched.
    pub grace_ms: u64,
}

/// What the cluster should do next with a network's keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Rotate { epoch: u32, reason: Reason },
    Switch { to: u32 },
    Retire { epoch: u32 },
}

/// Why a rotation was asked for outside the schedule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Triggers {
    pub requested: bool,
    /// An outbound SA of the network passed the sequence-number threshold.
    pub seq_exhausted: bool,
}

impl KeyRing {
    /// A ring with its first epoch.
    pub fn new(secret: Secret, now_ms: u64) -> KeyRing {
        KeyRing {
            keys: vec![EpochKey { epoch: 1, secret, created_ms: now_ms }],
            tx: 1,
            switched_ms: now_ms,
            reason: None,
        }
    }

    pub fn newest(&self) -> u32 {
        self.keys.iter().map(|k| k.epoch).max().unwrap_or(self.tx)
    }

    pub fn key(&self, epoch: u32) -> Option<&Secret> {
        self.keys.iter().find(|k| k.epoch == epoch).map(|k| &k.secret)
    }

    /// Whether a rotation is under way (more than one epoch in the ring).
    pub fn rotating(&self) -> bool {
        self.keys.len() > 1
    }

    /// The step due now, if any. `members` are the live hosts that carry
    /// the network; a member without an ack holds every step back.
    pub fn next_step(
        &self,
        members: &BTreeSet<String>,
        acks: &BTreeMap<String, Ack>,
        now_ms: u64,
        policy: &Policy,
        triggers: Triggers,
    ) -> Option<Step> {
        let all = |f: &dyn Fn(&Ack) -> bool| members.iter().all(|m| acks.get(m).is_some_and(f));
        let newest = self.newest();
        if newest > self.tx {
            return all(&|a| a.rx >= newest).then_some(Step::Switch { to: newest });
        }
        if let Some(old) = self.keys.iter().map(|k| k.epoch).filter(|e| *e < self.tx).min() {
            let switched = all(&|a| a.tx >= self.tx);
            let settled = now_ms.saturating_sub(self.switched_ms) >= policy.grace_ms;
            return (switched && settled).then_some(Step::Retire { epoch: old });
        }
        let reason = if triggers.requested {
            Reason::OnDemand
        } else if triggers.seq_exhausted {
            Reason::SequenceNumbers
        } else if policy.interval_ms > 0 && now_ms.saturating_sub(self.switched_ms) >= policy.interval_ms {
            Reason::Schedule
        } else {
            return None;
        };
        Some(Step::Rotate { epoch: newest + 1, reason })
    }

    /// The ring after `step`. `fresh` is the new epoch's secret (used by
    /// `Rotate` only).
    pub fn apply(&self, step: Step, fresh: impl FnOnce() -> Secret, now_ms: u64) -> KeyRing {
        let mut next = self.clone();
        match step {
            Step::Rotate { epoch, reason } => {
                next.keys.push(EpochKey { epoch, secret: fresh(), created_ms: now_ms });
                next.reason = Some(reason);
            }
            Step::Switch { to } => {
                next.tx = to;
                next.switched_ms = now_ms;
            }
            Step::Retire { epoch } => {
                next.keys.retain(|k| k.epoch != epoch);
                if !next.rotating() {
                    next.reason = None;
                }
            }
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy { interval_ms: 1_000_000, grace_ms: 2_000 };

    fn members(n: usize) -> BTreeSet<String> {
        (0..n).map(|i| format!("h{i}")).collect()
    }

    fn acks(rx: u32, tx: u32, n: usize) -> BTreeMap<String, Ack> {
        (0..n).map(|i| (format!("h{i}"), Ack { rx, tx })).collect()
    }

    fn secret(b: u8) -> Secret {
        Secret::from_bytes([b; 32])
    }

    #[test]
    fn a_steady_ring_rotates_on_demand_on_sequence_numbers_and_on_schedule() {
        let ring = KeyRing::new(secret(1), 0);
        let m = members(3);
        let a = acks(1, 1, 3);
        assert_eq!(ring.next_step(&m, &a, 10, &POLICY, Triggers::default()), None);
        let demand = Triggers { requested: true, ..Default::default() };
        assert_eq!(
            ring.next_step(&m, &a, 10, &POLICY, demand),
            Some(Step::Rotate { epoch: 2, reason: Reason::OnDemand })
        );
        let seq = Triggers { seq_exhausted: true, ..Default::default() };
        assert_eq!(
            ring.next_step(&m, &a, 10, &POLICY, seq),
            Some(Step::Rotate { epoch: 2, reason: Reason::SequenceNumbers })
        );
        assert_eq!(
            ring.next_step(&m, &a, 1_000_000, &POLICY, Triggers::default()),
            Some(Step::Rotate { epoch: 2, reason: Reason::Schedule })
        );
        let never = Policy { interval_ms: 0, ..POLICY };
        assert_eq!(ring.next_step(&m, &a, u64::MAX, &never, Triggers::default()), None);
    }

    #[test]
    fn a_rotation_runs_make_before_break() {
        let m = members(3);
        let ring = KeyRing::new(secret(1), 0);
        let ring = ring.apply(Step::Rotate { epoch: 2, reason: Reason::OnDemand }, || secret(2), 100);
        assert_eq!((ring.tx, ring.newest(), ring.rotating()), (1, 2, true));
        assert_eq!(ring.key(2), Some(&secret(2)));
        // No switch until every member installed epoch 2 inbound; a
        // demand during a rotation does not start another.
        let mut a = acks(1, 1, 3);
        a.insert("h0".into(), Ack { rx: 2, tx: 1 });
        let demand = Triggers { requested: true, seq_exhausted: true };
        assert_eq!(ring.next_step(&m, &a, 200, &POLICY, demand), None);
        let mut missing = acks(2, 1, 3);
        missing.remove("h2");
        assert_eq!(ring.next_step(&m, &missing, 200, &POLICY, demand), None);
        let a = acks(2, 1, 3);
        assert_eq!(ring.next_step(&m, &a, 200, &POLICY, demand), Some(Step::Switch { to: 2 }));
        let ring = ring.apply(Step::Switch { to: 2 }, || unreachable!(), 300);
        assert_eq!((ring.tx, ring.switched_ms), (2, 300));
        // No retirement until every sender switched and the grace passed.
        let mut a = acks(2, 2, 3);
        a.insert("h1".into(), Ack { rx: 2, tx: 1 });
        assert_eq!(ring.next_step(&m, &a, 10_000, &POLICY, demand), None);
        let a = acks(2, 2, 3);
        assert_eq!(ring.next_step(&m, &a, 300 + 1_999, &POLICY, demand), None);
        assert_eq!(ring.next_step(&m, &a, 300 + 2_000, &POLICY, demand), Some(Step::Retire { epoch: 1 }));
        let ring = ring.apply(Step::Retire { epoch: 1 }, || unreachable!(), 2_300);
        assert_eq!((ring.keys.len(), ring.tx, ring.rotating(), ring.reason), (1, 2, false, None));
        assert_eq!(ring.key(1), None);
        // Steady again: the schedule counts from the switch.
        assert_eq!(ring.next_step(&m, &a, 2_300, &POLICY, Triggers::default()), None);
        assert_eq!(
            ring.next_step(&m, &a, 300 + POLICY.interval_ms, &POLICY, Triggers::default()),
            Some(Step::Rotate { epoch: 3, reason: Reason::Schedule })
        );
    }

    #[test]
    fn with_no_members_steps_proceed_and_the_ring_round_trips() {
        let ring =
            KeyRing::new(secret(1), 0).apply(Step::Rotate { epoch: 2, reason: Reason::Schedule }, || secret(2), 1);
        let none = BTreeSet::new();
        assert_eq!(
            ring.next_step(&none, &BTreeMap::new(), 1, &POLICY, Triggers::default()),
            Some(Step::Switch { to: 2 })
        );
        let json = serde_json::to_string(&ring).unwrap();
        assert_eq!(serde_json::from_str::<KeyRing>(&json).unwrap(), ring);
    }
}
