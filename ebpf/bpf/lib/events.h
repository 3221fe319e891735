/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Monitor events (a drop, or the start of a flow) into the `events` ring
 * buffer, sent only while the agent says someone watches; and drop(): the
 * verdict of every refused packet, counted by reason and reported. */
#ifndef TRELLIS_LIB_EVENTS_H
#define TRELLIS_LIB_EVENTS_H

#include "maps.h"
#include "parse.h"

static __always_inline void emit(__u32 ifindex, const struct flow *f, __u8 verdict, __u8 reason)
{
	/* Only while a monitor watches: every event wakes the agent, which
	 * would cost each new connection tens of microseconds. */
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg || !(cfg->flags & CFG_EVENTS))
		return;
	struct flow_event *ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
	if (!ev)
		return; /* full: the monitor is behind, the packet is not */
	ev->ifindex = ifindex;
	ev->saddr = f->saddr;
	ev->daddr = f->daddr;
	ev->sport = f->sport;
	ev->dport = f->dport;
	ev->proto = f->proto;
	ev->verdict = verdict;
	ev->reason = reason;
	ev->pad = 0;
	bpf_ringbuf_submit(ev, 0);
}

static __always_inline int drop(struct endpoint_counters *c, __u32 reason, __u32 ifindex, const struct flow *f)
{
	if (c && reason < DROP_REASONS)
		c->drops[reason] += 1;
	emit(ifindex, f, 1, reason);
	return TC_ACT_SHOT;
}

#endif
