/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Every map of the endpoint programs, pinned by name (the agent reuses
 * them across restarts); their keys and values are the layouts of
 * trellis.h. Also config_flags(): the switches the agent sets in `config`. */
#ifndef TRELLIS_LIB_MAPS_H
#define TRELLIS_LIB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "trellis.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct endpoint_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct endpoint_counters);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 19); /* EVENTS_BYTES (events.h) */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 17);
	__type(key, struct dns_key);
	__type(value, struct dns_answer);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dns SEC(".maps");

/* The in-kernel DNS path's key, built here rather than on the stack (the
 * endpoint program's stack and the DNS path's together are near the
 * verifier's 512 bytes). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct dns_key);
} dns_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct dns_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dns_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct net_key);
	__type(value, struct net_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nets SEC(".maps");

/* The IPv6 subnets of dual-stack networks, as `nets`. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct net6_key);
	__type(value, struct net_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nets6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct vip_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct svc_key);
	__type(value, struct svc_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct maglev_table);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct backend_key);
	__type(value, struct backend_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} backends SEC(".maps");

/* The routing mesh's connections (clients outside, no endpoint's). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ct SEC(".maps");

/* An endpoint's own connection and reverse-NAT tables: the agent makes
 * them (with the endpoint's quota as max_entries: an inner map's size may
 * differ from this template's) when it programs the endpoint. Not
 * preallocated, so an endpoint's share costs memory only as it is used. */
struct ep_ct_table {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	/* Sizes, not types: the BTF of a type reached only through the
	 * outer map is a forward declaration, which has no size. */
	__uint(key_size, sizeof(struct ct_key));
	__uint(value_size, sizeof(struct ct_value));
};

struct ep_rnat_table {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(key_size, sizeof(struct rnat_key));
	__uint(value_size, sizeof(struct rnat_value));
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct ep_ct_table);
} ep_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct ep_rnat_table);
} ep_rnat SEC(".maps");

/* An endpoint's IPv6 flows, both directions (trellis.h: flow6_key). */
struct ep_flows6_table {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(key_size, sizeof(struct flow6_key));
	__uint(value_size, sizeof(struct flow6_value));
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct ep_flows6_table);
} ep_flows6 SEC(".maps");

/* IPv6 VIPs and their services, as `vips`, `services`, `maglev`,
 * `backends`. */
struct vip6_key {
	__u8 vip[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct vip6_key);
	__type(value, struct vip_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vips6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct svc6_key);
	__type(value, struct svc_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} services6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct maglev6_table);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} maglev6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct backend6_key);
	__type(value, struct backend_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} backends6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct event_budget);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} event_budget SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct svc_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} svc_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pub_key);
	__type(value, struct pub_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} published SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mesh_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct rnat_key);
	__type(value, struct mesh_flow);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} mesh SEC(".maps");

static __always_inline __u32 config_flags(void)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);
	return cfg ? cfg->flags : 0;
}

#endif
