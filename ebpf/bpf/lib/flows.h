/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* An endpoint's own flow tables (`ep_ct`, `ep_rnat`, `ep_flows6`: one hash
 * map each, made by the agent with the endpoint's quota as its size, found
 * by the endpoint's slot: the agent keeps tables ready under spare slots,
 * since putting a table into a map of maps waits for an RCU grace period)
 * and what the packets of a flow keep in them: when it was last seen, to a second, and
 * how far a TCP connection got. New flows never evict old ones: a table
 * that is full refuses them (counted in endpoint_counters.full); the agent
 * removes flows gone idle or closed (ebpf/src/conntrack.rs). */
#ifndef TRELLIS_LIB_FLOWS_H
#define TRELLIS_LIB_FLOWS_H

#include "maps.h"
#include "parse.h"

static __always_inline void *ct_table_of(__u32 slot)
{
	return bpf_map_lookup_elem(&ep_ct, &slot);
}

static __always_inline void *rnat_table_of(__u32 slot)
{
	return bpf_map_lookup_elem(&ep_rnat, &slot);
}

static __always_inline void *flows6_table_of(__u32 slot)
{
	return bpf_map_lookup_elem(&ep_flows6, &slot);
}

/* An endpoint's share of `table` was spent. */
static __always_inline void table_full(struct endpoint_counters *c, __u32 table)
{
	if (c && table < TABLES)
		c->full[table] += 1;
}

/* A packet of a flow from its client, whose entry keeps `seen` and
 * `state`: refresh `seen` (at most once a second: a write per packet
 * would bounce its cache line between CPUs) and follow the TCP handshake
 * and close. */
static __always_inline void flow_seen(__u64 *seen, __u8 *state, const struct flow *f, __u64 now)
{
	if (now - *seen > SEEN_STEP)
		*seen = now;
	if (f->proto != PROTO_TCP)
		return;
	if (f->fin || f->rst) {
		if (*state != CT_CLOSING)
			*state = CT_CLOSING;
	} else if (*state == CT_OPEN && f->ack && !f->syn) {
		*state = CT_ESTABLISHED;
	}
}

static __always_inline void ct_seen(struct ct_value *v, const struct flow *f, __u64 now)
{
	flow_seen(&v->seen, &v->state, f, now);
}

/* A reply of the flow whose reverse translation is `v`. */
static __always_inline void rnat_seen(struct rnat_value *v, const struct flow *f, __u64 now)
{
	if (now - v->seen > SEEN_STEP)
		v->seen = now;
	if (f->proto == PROTO_TCP && (f->fin || f->rst) && !(v->flags & RNAT_CLOSING))
		v->flags |= RNAT_CLOSING;
}

#endif
