/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Per-CPU counters: per endpoint (packets and bytes each way, drops by
 * reason), per service (backend selections, resets) and of the in-kernel
 * DNS path (answered, passed on). Entries are made on first use. */
#ifndef TRELLIS_LIB_COUNTERS_H
#define TRELLIS_LIB_COUNTERS_H

#include "maps.h"

static __always_inline struct endpoint_counters *counters_of(__u32 ifindex)
{
	struct endpoint_counters *c = bpf_map_lookup_elem(&counters, &ifindex);
	if (c)
		return c;
	struct endpoint_counters zero = {};
	bpf_map_update_elem(&counters, &ifindex, &zero, BPF_NOEXIST);
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
