//! Which of an endpoint's tracked flows are over: the rule the agent's
//! sweep applies to the endpoint's own tables (`ep_ct`, `ep_rnat`).
//!
//! The programs never evict a flow to make room for another (a full table
//! refuses the newcomer, see `bpf/lib/flows.h`), so flows leave only here:
//! when neither direction has been seen for the lifetime of the state the
//! connection is in, the lifetimes Cilium uses by default. A flow is one
//! `ct` entry (the client's side, with the TCP state) and its `rnat` entry
//! (the replies' side, with when a reply was last seen and whether one
//! closed it); either direction keeps both alive. A reset sent by the
//! client removes both at once in the program.

use std::collections::HashMap;
use std::time::Duration;

use crate::{CtKey, CtValue, RnatKey, RnatValue};

/// `CT_OPEN`: UDP, or TCP before the client acknowledged the handshake.
pub const CT_OPEN: u8 = 0;
/// `CT_ESTABLISHED`: TCP, handshake acknowledged.
pub const CT_ESTABLISHED: u8 = 1;
/// `CT_CLOSING`: TCP, the client sent a FIN (or a reset).
pub const CT_CLOSING: u8 = 2;
/// `RNAT_CLOSING`: a reply carried a FIN or a reset.
pub const RNAT_CLOSING: u8 = 1;

const TCP: u8 = 6;

/// How long a flow may go unseen, by state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    /// TCP before the handshake completed (a SYN nobody answered).
    pub tcp_opening: Duration,
    pub tcp_established: Duration,
    /// TCP after a FIN or reset from either side.
    pub tcp_closing: Duration,
    /// UDP and everything else.
    pub other: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes {
            tcp_opening: Duration::from_secs(60),
            tcp_established: Duration::from_secs(6 * 3600),
            tcp_closing: Duration::from_secs(10),
            other: Duration::from_secs(60),
        }
    }
}

impl Lifetimes {
    fn of(&self, proto: u8, state: u8, closing: bool) -> Duration {
        if proto != TCP {
            self.other
        } else if closing || state == CT_CLOSING {
            self.tcp_closing
        } else if state == CT_ESTABLISHED {
            self.tcp_established
        } else {
            self.tcp_opening
        }
    }
}

/// The `rnat` entry the replies of flow (`k`, `v`) are translated by.
pub fn reply_key(k: &CtKey, v: &CtValue) -> RnatKey {
    RnatKey { client: k.client, backend: v.backend, cport: k.cport, bport: v.bport, proto: k.proto, pad: [0; 3] }
}

/// What a sweep removes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expired {
    pub ct: Vec<CtKey>,
    pub rnat: Vec<RnatKey>,
}

fn idle(now: u64, seen: u64) -> Duration {
    Duration::from_nanos(now.saturating_sub(seen))
}

/// The flows of one endpoint's tables that are over at `now` (the
/// monotonic clock, ns, the programs' `seen` clock).
///
/// A reverse translation no connection entry points at (a DNS query sent
/// on to the gateway, or one whose connection entry went when its backend
/// left) lives by its own replies, as a flow of its protocol that has not
/// been acknowledged.
pub fn expired(now: u64, ct: &[(CtKey, CtValue)], rnat: &[(RnatKey, RnatValue)], life: &Lifetimes) -> Expired {
    let replies: HashMap<RnatKey, &RnatValue> = rnat.iter().map(|(k, v)| (*k, v)).collect();
    let mut out = Expired::default();
    let mut partnered = std::collections::HashSet::new();
    for (k, v) in ct {
        let rk = reply_key(k, v);
        let reply = replies.get(&rk);
        let last = reply.map_or(v.seen, |r| r.seen.max(v.seen));
        let closing = reply.is_some_and(|r| r.flags & RNAT_CLOSING != 0);
        if idle(now, last) > life.of(k.proto, v.state, closing) {
            out.ct.push(*k);
            if reply.is_some() {
                out.rnat.push(rk);
            }
        }
        partnered.insert(rk);
    }
    for (k, v) in rnat {
        if partnered.contains(k) {
            continue;
        }
        let closing = v.flags & RNAT_CLOSING != 0;
        let state = if k.proto == TCP { CT_ESTABLISHED } else { CT_OPEN };
        if idle(now, v.seen) > life.of(k.proto, state, closing) {
            out.rnat.push(*k);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const UDP: u8 = 17;

    fn flow(cport: u16, proto: u8, state: u8, seen: u64) -> (CtKey, CtValue) {
        let k = CtKey { client: 1, vip: 2, cport, vport: 80, proto, pad: [0; 3] };
        let v = CtValue { backend: 3, bport: 8080, svc_id: 9, state, seen, ..Default::default() };
        (k, v)
    }

    fn reply(f: &(CtKey, CtValue), flags: u8, seen: u64) -> (RnatKey, RnatValue) {
        (reply_key(&f.0, &f.1), RnatValue { vip: 2, vport: 80, flags, pad: 0, seen })
    }

    #[test]
    fn each_state_lives_its_own_lifetime() {
        let life = Lifetimes::default();
        let now = 100_000 * S;
        let young_udp = flow(1, UDP, CT_OPEN, now - 59 * S);
        let old_udp = flow(2, UDP, CT_OPEN, now - 61 * S);
        let idle_established = flow(3, TCP, CT_ESTABLISHED, now - 5 * 3600 * S);
        let dead_established = flow(4, TCP, CT_ESTABLISHED, now - 7 * 3600 * S);
        let closed = flow(5, TCP, CT_CLOSING, now - 11 * S);
        let closing = flow(6, TCP, CT_CLOSING, now - 9 * S);
        let unanswered_syn = flow(7, TCP, CT_OPEN, now - 61 * S);
        let ct = [young_udp, old_udp, idle_established, dead_established, closed, closing, unanswered_syn];
        let gone = expired(now, &ct, &[], &life);
        let ports: Vec<u16> = gone.ct.iter().map(|k| k.cport).collect();
        assert_eq!(ports, vec![2, 4, 5, 7]);
        assert!(gone.rnat.is_empty());
    }

    #[test]
    fn either_direction_keeps_a_flow_and_its_reply_entry_goes_with_it() {
        let life = Lifetimes::default();
        let now = 100_000 * S;
        // The client went quiet two minutes ago; the backend still streams.
        let streamed = flow(1, UDP, CT_OPEN, now - 120 * S);
        let both_quiet = flow(2, UDP, CT_OPEN, now - 120 * S);
        let rnat = [reply(&streamed, 0, now - S), reply(&both_quiet, 0, now - 90 * S)];
        let gone = expired(now, &[streamed, both_quiet], &rnat, &life);
        assert_eq!(gone.ct, vec![both_quiet.0]);
        assert_eq!(gone.rnat, vec![rnat[1].0], "the reply entry goes with its flow");
    }

    #[test]
    fn a_reply_that_closed_shortens_an_established_flow() {
        let life = Lifetimes::default();
        let now = 100_000 * S;
        let f = flow(1, TCP, CT_ESTABLISHED, now - 20 * S);
        let gone = expired(now, &[f], &[reply(&f, RNAT_CLOSING, now - 20 * S)], &life);
        assert_eq!(gone.ct, vec![f.0]);
        let kept = expired(now, &[f], &[reply(&f, 0, now - 20 * S)], &life);
        assert_eq!(kept, Expired::default());
    }

    #[test]
    fn reply_entries_without_a_flow_live_by_their_own_replies() {
        let life = Lifetimes::default();
        let now = 100_000 * S;
        let dns = |cport, proto, flags, seen| {
            (
                RnatKey { client: 1, backend: 7, cport, bport: 53, proto, pad: [0; 3] },
                RnatValue { vip: 8, vport: 53, flags, pad: 0, seen },
            )
        };
        let rnat = [
            dns(1, UDP, 0, now - 30 * S),
            dns(2, UDP, 0, now - 61 * S),
            dns(3, TCP, 0, now - 3600 * S),
            dns(4, TCP, RNAT_CLOSING, now - 11 * S),
        ];
        let gone = expired(now, &[], &rnat, &life);
        let ports: Vec<u16> = gone.rnat.iter().map(|k| k.cport).collect();
        assert_eq!(ports, vec![2, 4]);
    }

    #[test]
    fn a_clock_behind_the_programs_removes_nothing() {
        // The programs' coarse clock and ours differ by a tick either way.
        let f = flow(1, UDP, CT_OPEN, 10 * S);
        assert_eq!(expired(10 * S - 1, &[f], &[], &Lifetimes::default()), Expired::default());
    }
}
