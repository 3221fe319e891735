/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Per-CPU counters: per endpoint (packets and bytes each way, drops by
 * reason), per service (backend selections, resets) and of the in-kernel
 * DNS path (answered, passed on). Entries are made on first use. */
#ifndef TRELLIS_LIB_COUNTERS_H
#define TRELLIS_LIB_COUNTERS_H

#include "maps.h"

/* An all-zero endpoint_counters, what a new entry starts from (from a map
 * rather than the stack: 128 bytes of the endpoint program's frame). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct endpoint_counters);
} counters_zero SEC(".maps");

static __always_inline struct endpoint_counters *counters_of(__u32 ifindex)
{
	struct endpoint_counters *c = bpf_map_lookup_elem(&counters, &ifindex);
	if (c)
		return c;
	__u32 zero = 0;
	struct endpoint_counters *fresh = bpf_map_lookup_elem(&counters_zero, &zero);
	if (!fresh)
		return 0;
	bpf_map_update_elem(&counters, &ifindex, fresh, BPF_NOEXIST);
	return bpf_map_lookup_elem(&counters, &ifindex);
}

static __always_inline struct svc_stats *stats_of(__u32 id)
{
	struct svc_stats *s = bpf_map_lookup_elem(&svc_stats, &id);
	if (s)
		return s;
	struct svc_stats zero = {};
	bpf_map_update_elem(&svc_stats, &id, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&svc_stats, &id);
}

static __always_inline void dns_count(int answered)
{
	__u32 zero = 0;
	struct dns_stats *st = bpf_map_lookup_elem(&dns_stats, &zero);
	if (!st)
		return;
	if (answered)
		st->answered += 1;
	else
		st->passed += 1;
}

#endif
