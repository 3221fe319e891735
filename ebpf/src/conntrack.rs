//! Which of an endpoint's tracked flows are over: the rule the agent's
//! sweep applies to the endpoint's own tables (`ep_ct`, `ep_rnat`, and
//! `ep_flows6`, which holds both directions of its IPv6 flows).
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

use crate::{CtKey, CtValue, FLOW6_REPLY, FLOW6_VIP, Flow6Key, Flow6Value, RnatKey, RnatValue};

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
    let (ct, rnat) = expire(
        now,
        ct.iter().map(|(k, v)| Client {
            key: *k,
            reply: reply_key(k, v),
            proto: k.proto,
            state: v.state,
            seen: v.seen,
        }),
        rnat.iter().map(|(k, v)| Reply { key: *k, proto: k.proto, closing: v.flags & RNAT_CLOSING != 0, seen: v.seen }),
        life,
    );
    Expired { ct, rnat }
}

/// The `FLOW6_REPLY` entry the replies of IPv6 VIP flow (`k`, `v`) are
/// translated by.
pub fn reply_key6(k: &Flow6Key, v: &Flow6Value) -> Flow6Key {
    Flow6Key { addr: v.addr, cport: k.cport, port: v.port, proto: k.proto, kind: FLOW6_REPLY, pad: [0; 2] }
}

/// [`expired`] for an endpoint's IPv6 table (`ep_flows6`), which holds
/// both directions: the keys to remove.
pub fn expired6(now: u64, flows: &[(Flow6Key, Flow6Value)], life: &Lifetimes) -> Vec<Flow6Key> {
    let clients = flows.iter().filter(|(k, _)| k.kind == FLOW6_VIP).map(|(k, v)| Client {
        key: *k,
        reply: reply_key6(k, v),
        proto: k.proto,
        state: v.state,
        seen: v.seen,
    });
    let replies = flows.iter().filter(|(k, _)| k.kind == FLOW6_REPLY).map(|(k, v)| Reply {
        key: *k,
        proto: k.proto,
        closing: v.flags & RNAT_CLOSING != 0,
        seen: v.seen,
    });
    let (mut gone, replies_gone) = expire(now, clients, replies, life);
    gone.extend(replies_gone);
    gone
}

/// A client's side of a flow: its key, the key of its replies' side, and
/// what its packets kept.
struct Client<K, R> {
    key: K,
    reply: R,
    proto: u8,
    state: u8,
    seen: u64,
}

/// A replies' side.
struct Reply<R> {
    key: R,
    proto: u8,
    closing: bool,
    seen: u64,
}

/// The rule, for either family's tables: the clients' and the replies'
/// keys of the flows that are over.
fn expire<K, R: Copy + Eq + std::hash::Hash>(
    now: u64,
    clients: impl Iterator<Item = Client<K, R>>,
    replies: impl Iterator<Item = Reply<R>>,
    life: &Lifetimes,
) -> (Vec<K>, Vec<R>) {
    let replies: Vec<Reply<R>> = replies.collect();
    let by_key: HashMap<R, &Reply<R>> = replies.iter().map(|r| (r.key, r)).collect();
    let (mut gone, mut gone_replies) = (Vec::new(), Vec::new());
    let mut partnered = std::collections::HashSet::new();
    for c in clients {
        let reply = by_key.get(&c.reply);
        let last = reply.map_or(c.seen, |r| r.seen.max(c.seen));
        let closing = reply.is_some_and(|r| r.closing);
        if idle(now, last) > life.of(c.proto, c.state, closing) {
            if reply.is_some() {
                gone_replies.push(c.reply);
            }
            gone.push(c.key);
        }
        partnered.insert(c.reply);
    }
    for r in &replies {
        if partnered.contains(&r.key) {
            continue;
        }
        let state = if r.proto == TCP { CT_ESTABLISHED } else { CT_OPEN };
        if idle(now, r.seen) > life.of(r.proto, state, r.closing) {
            gone_replies.push(r.key);
        }
    }
    (gone, gone_replies)
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

    /// The IPv6 table holds both directions: the same rule, the reply
    /// entry found by the backend the client entry records.
    #[test]
    fn ipv6_flows_expire_by_the_same_rule_both_directions_in_one_table() {
        let life = Lifetimes::default();
        let now = 100_000 * S;
        let vip = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x64];
        let backend = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
        let client = |cport, proto, state, seen| {
            let k = Flow6Key { addr: vip, cport, port: 80, proto, kind: FLOW6_VIP, pad: [0; 2] };
            let v = Flow6Value { addr: backend, port: 8080, svc_id: 7, state, seen, ..Default::default() };
            (k, v)
        };
        let reply = |c: &(Flow6Key, Flow6Value), flags, seen| {
            (reply_key6(&c.0, &c.1), Flow6Value { addr: vip, port: 80, flags, seen, ..Default::default() })
        };
        let streamed = client(1, UDP, CT_OPEN, now - 120 * S);
        let quiet = client(2, UDP, CT_OPEN, now - 120 * S);
        let closed = client(3, TCP, CT_ESTABLISHED, now - 20 * S);
        let dns = (
            Flow6Key { addr: [0xfd; 16], cport: 4, port: 53, proto: UDP, kind: FLOW6_REPLY, pad: [0; 2] },
            Flow6Value { addr: [0x20; 16], port: 53, seen: now - 61 * S, ..Default::default() },
        );
        let table = [
            streamed,
            reply(&streamed, 0, now - S),
            quiet,
            reply(&quiet, 0, now - 90 * S),
            closed,
            reply(&closed, RNAT_CLOSING, now - 20 * S),
            dns,
        ];
        let gone = expired6(now, &table, &life);
        assert_eq!(gone, vec![quiet.0, closed.0, table[3].0, table[5].0, dns.0]);
        assert_eq!(reply_key6(&quiet.0, &quiet.1).addr, backend, "replies come from the backend");
    }

    #[test]
    fn a_clock_behind_the_programs_removes_nothing() {
        // The programs' coarse clock and ours differ by a tick either way.
        let f = flow(1, UDP, CT_OPEN, 10 * S);
        assert_eq!(expired(10 * S - 1, &[f], &[], &Lifetimes::default()), Expired::default());
    }
}
