/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Monitor events (a drop, or the start of a flow) into the `events` ring
 * buffer, sent only while the agent says someone watches, each endpoint
 * held to its share of the ring while the ring is more than half full
 * (`event_budget`); and drop(): the verdict of every refused packet,
 * counted by reason and reported. */
#ifndef TRELLIS_LIB_EVENTS_H
#define TRELLIS_LIB_EVENTS_H

#include "counters.h"
#include "maps.h"
#include "parse.h"

/* The ring's size (maps.h). */
#define EVENTS_BYTES (1 << 19)

/* May endpoint `ifindex` add an event to a ring more than half full? Its
 * budget refills at EVENT_SHARE a second up to EVENT_SHARE. (Updated
 * without a lock: two CPUs at once may both spend a token, which only
 * makes the share a little larger.) */
static __always_inline int event_share_left(__u32 ifindex)
{
	__u64 now = bpf_ktime_get_coarse_ns();
	struct event_budget *b = bpf_map_lookup_elem(&event_budget, &ifindex);
	if (!b) {
		struct event_budget fresh = { .stamp = now, .tokens = EVENT_SHARE - 1 };
		bpf_map_update_elem(&event_budget, &ifindex, &fresh, BPF_ANY);
		return 1;
	}
	__u64 elapsed = now - b->stamp;
	if (elapsed >= 1000000ULL) {
		/* Whole milliseconds' worth: EVENT_SHARE per 1000 ms. */
		__u64 ms = elapsed / 1000000ULL;
		__u64 add = ms * EVENT_SHARE / 1000;
		if (add > 0) {
			__u64 t = b->tokens + add;
			b->tokens = t > EVENT_SHARE ? EVENT_SHARE : t;
			b->stamp = now;
		}
	}
	if (b->tokens == 0)
		return 0;
	b->tokens -= 1;
	return 1;
}

/* The event of a flow, IPv4 (`f`) or IPv6 (`f6`: then `f` is its flow). */
static __always_inline void emit_flow(__u32 ifindex, const struct flow *f, const struct flow6 *f6, __u8 verdict,
				      __u8 reason)
{
	/* Only while a monitor watches: every event wakes the agent, which
	 * would cost each new connection tens of microseconds. */
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg || !(cfg->flags & CFG_EVENTS))
		return;
	if (bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) > EVENTS_BYTES / 2 && !event_share_left(ifindex)) {
		/* (Made at the program's start: looked up, not made here, which
		 * would put a zeroed entry on every caller's stack.) */
		struct endpoint_counters *c = bpf_map_lookup_elem(&counters, &ifindex);
		if (c)
			c->full[TABLE_EVENTS] += 1;
		return;
	}
	struct flow_event *ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
	if (!ev)
		return; /* full: the monitor is behind, the packet is not */
	ev->ifindex = ifindex;
	if (f6) {
		__builtin_memcpy(ev->saddr, f6->saddr, 16);
		__builtin_memcpy(ev->daddr, f6->daddr, 16);
		ev->family = 6;
	} else {
		__builtin_memset(ev->saddr, 0, 16);
		__builtin_memset(ev->daddr, 0, 16);
		__builtin_memcpy(ev->saddr, &f->saddr, 4);
		__builtin_memcpy(ev->daddr, &f->daddr, 4);
		ev->family = f->family == 4 ? 4 : 0;
	}
	ev->sport = f->sport;
	ev->dport = f->dport;
	ev->proto = f->proto;
	ev->verdict = verdict;
	ev->reason = reason;
	bpf_ringbuf_submit(ev, 0);
}

static __always_inline void emit(__u32 ifindex, const struct flow *f, __u8 verdict, __u8 reason)
{
	emit_flow(ifindex, f, 0, verdict, reason);
}

static __always_inline void emit6(__u32 ifindex, const struct flow6 *f6, __u8 verdict, __u8 reason)
{
	emit_flow(ifindex, &f6->f, f6, verdict, reason);
}

static __always_inline int drop(struct endpoint_counters *c, __u32 reason, __u32 ifindex, const struct flow *f)
{
	if (c && reason < DROP_REASONS)
		c->drops[reason] += 1;
	emit(ifindex, f, 1, reason);
	return TC_ACT_SHOT;
}

/* drop() of an IPv6 packet (`f6` none: no event, counted still). */
static __always_inline int drop6(struct endpoint_counters *c, __u32 reason, __u32 ifindex, const struct flow6 *f6)
{
	if (c && reason < DROP_REASONS)
		c->drops[reason] += 1;
	if (f6)
		emit6(ifindex, f6, 1, reason);
	return TC_ACT_SHOT;
}

#endif
