/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* IPv6 address translation: fixed offsets into an IPv6 frame without
 * extension headers, address comparisons, rewriting an address or a port
 * of a TCP/UDP packet with its checksum (IPv6 has no header checksum), and
 * the reverse translation of what comes back to an endpoint (reverse6):
 * the replies of an IPv6 VIP's backend, and of the gateway's DNS to a
 * query sent on to it, get the address and port the endpoint asked. */
#ifndef TRELLIS_LIB_NAT6_H
#define TRELLIS_LIB_NAT6_H

#include "flows.h"
#include "maps.h"
#include "nat.h"
#include "parse.h"

#define IPV6_SRC_OFF (ETH_HLEN_ + 8)
#define IPV6_DST_OFF (ETH_HLEN_ + 24)
#define IPV6_L4_OFF (ETH_HLEN_ + 40)

static __always_inline int addr6_eq(const __u8 *a, const __u8 *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline int addr6_zero(const __u8 *a)
{
	const __u32 *x = (const __u32 *)a;
	return !(x[0] | x[1] | x[2] | x[3]);
}

static __always_inline __u32 l4_csum_off6(__u8 proto)
{
	return IPV6_L4_OFF + (proto == PROTO_TCP ? __builtin_offsetof(struct tcphdr, check)
						 : __builtin_offsetof(struct udphdr, check));
}

/* Rewrite the source or destination (`dst`) address of an IPv6 TCP/UDP
 * packet without extension headers, the L4 checksum with it. `old` may
 * point into the packet: it is read before anything is written. */
static __always_inline int rewrite6(struct __sk_buff *skb, __u8 proto, int dst, const __u8 *old, const __u8 *new_addr)
{
	__s64 diff = bpf_csum_diff((__be32 *)old, 16, (__be32 *)new_addr, 16, 0);
	if (diff < 0)
		return -1;
	__u64 flags = proto == PROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	if (bpf_l4_csum_replace(skb, l4_csum_off6(proto), 0, diff, flags | BPF_F_PSEUDO_HDR))
		return -1;
	return bpf_skb_store_bytes(skb, dst ? IPV6_DST_OFF : IPV6_SRC_OFF, new_addr, 16, 0);
}

/* Rewrite the source or destination (`dst`) port of the same. */
static __always_inline int rewrite6_port(struct __sk_buff *skb, __u8 proto, int dst, __u16 old_port, __u16 new_port)
{
	if (old_port == new_port)
		return 0;
	__u64 flags = proto == PROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	if (bpf_l4_csum_replace(skb, l4_csum_off6(proto), old_port, new_port, flags | 2))
		return -1;
	return bpf_skb_store_bytes(skb, IPV6_L4_OFF + (dst ? 2 : 0), &new_port, 2, 0);
}

/* An IPv6 TCP/UDP packet to the endpoint: if a FLOW6_REPLY entry of its
 * table knows where it comes from (a backend of a VIP flow, the gateway's
 * DNS), its source becomes the address and port the endpoint asked. */
static __always_inline int reverse6(struct __sk_buff *skb, const struct endpoint_info *ep)
{
	void *data = skb_data(skb);
	void *end = skb_end(skb);
	struct ipv6hdr *ip6 = data + ETH_HLEN_;
	__u16 *ports = data + IPV6_L4_OFF;
	if ((void *)(ports + 2) > end)
		return TC_ACT_OK;
	__u8 proto = ip6->nexthdr;
	if (proto != PROTO_UDP && proto != PROTO_TCP)
		return TC_ACT_OK;
	int closing = 0;
	if (proto == PROTO_TCP) {
		struct tcphdr *t = (void *)ports;
		if ((void *)(t + 1) > end)
			return TC_ACT_OK;
		closing = t->fin || t->rst;
	}
	void *table = flows6_table_of(ep->slot);
	if (!table)
		return TC_ACT_OK;
	struct flow6_key k = { .cport = ports[1], .port = ports[0], .proto = proto, .kind = FLOW6_REPLY };
	__builtin_memcpy(k.addr, ip6->saddr.in6_u.u6_addr8, 16);
	struct flow6_value *v = bpf_map_lookup_elem(table, &k);
	if (!v)
		return TC_ACT_OK;
	__u64 now = bpf_ktime_get_coarse_ns();
	if (now - v->seen > SEEN_STEP)
		v->seen = now;
	if (closing && !(v->flags & RNAT_CLOSING))
		v->flags |= RNAT_CLOSING;
	__u8 to[16];
	__builtin_memcpy(to, v->addr, 16);
	__u16 to_port = v->port;
	if (rewrite6(skb, proto, 0, k.addr, to) || rewrite6_port(skb, proto, 0, k.port, to_port))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

#endif
