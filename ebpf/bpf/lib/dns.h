/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* DNS: the in-kernel fast path (a plain A or AAAA query for a name of the
 * `dns` map answered in place and sent straight back into the endpoint's
 * namespace), and queries to resolvers outside Trellis redirected to the
 * gateway, where the agent answers them. */
#ifndef TRELLIS_LIB_DNS_H
#define TRELLIS_LIB_DNS_H

#include "counters.h"
#include "events.h"
#include "flows.h"
#include "maps.h"
#include "nat.h"
#include "nat6.h"
#include "parse.h"

/* Where a query's parts are (IPv4 without options; IPv6 without
 * extension headers). */
#define DNS_UDP_OFF (ETH_HLEN_ + 20)
#define DNS_UDP_OFF6 (ETH_HLEN_ + 40)
#define DNS_HDR_END (DNS_UDP_OFF + 8 + 12)
/* The answer record appended: name pointer, type, class, TTL, length,
 * address (4 bytes for A, 16 for AAAA). */
#define DNS_RR_HDR 12
#define DNS_RR_LEN (DNS_RR_HDR + 4)
#define DNS_RR_LEN6 (DNS_RR_HDR + 16)

/* The in-kernel DNS fast path: a plain query (one question, no EDNS or
 * other records) for the A or AAAA record of a name in `dns` (the
 * client's network's names with exactly one address of that family) is turned into the reply the
 * agent's server would write, and 1 returned: the caller sends it back
 * (answer_dns). Anything else returns -1 and goes on to the server. */
/* An IPv6 reply's UDP segment, copied out for its checksum (the verifier
 * takes a map value of a bounded length where it would not take the
 * packet's). */
struct dns_segment {
	__u8 b[128];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct dns_segment);
} dns_segment SEC(".maps");

/* The UDP checksum of an IPv6 reply built in place (`len` bytes of UDP
 * header and payload after a fixed IPv6 header): the pseudo-header's
 * addresses, length and next header, then the segment (zero-padded to
 * four bytes). */
static __always_inline int udp6_checksum(struct __sk_buff *skb, __u32 len)
{
	__u32 zero = 0;
	struct dns_segment *seg = bpf_map_lookup_elem(&dns_segment, &zero);
	if (!seg || len < 8 || len > 120)
		return -1;
	__builtin_memset(seg->b, 0, sizeof(seg->b));
	if (bpf_skb_load_bytes(skb, DNS_UDP_OFF6, seg->b, len))
		return -1;
	void *data = skb_data(skb);
	void *end = skb_end(skb);
	struct ipv6hdr *ip6 = data + ETH_HLEN_;
	struct udphdr *udp = data + DNS_UDP_OFF6;
	if ((void *)(udp + 1) > end)
		return -1;
	__be32 tail[2] = { bpf_htonl(len), bpf_htonl(PROTO_UDP) };
	__s64 sum = bpf_csum_diff(0, 0, (__be32 *)&ip6->saddr, 32, 0);
	if (sum < 0)
		return -1;
	sum = bpf_csum_diff(0, 0, tail, sizeof(tail), sum);
	if (sum < 0)
		return -1;
	__u32 size4 = (len + 3) & 0x7c;
	sum = bpf_csum_diff(0, 0, (__be32 *)seg->b, size4, sum);
	if (sum < 0)
		return -1;
	__u16 c = csum_fold(sum);
	udp->check = c ? c : 0xffff;
	return 0;
}

/* The fast path for a query whose UDP header is at `udp_off` (a constant:
 * DNS_UDP_OFF, or DNS_UDP_OFF6 with `v6`). */
static __always_inline int dns_fast_at(struct __sk_buff *skb, __u32 net_id, const __u32 udp_off, const int v6)
{
	const __u32 hdr_end = udp_off + 8 + 12;
	/* Read and written in place (one helper call to copy the name for the
	 * lookup, one to grow the packet): each bpf_skb_load_bytes or
	 * bpf_skb_store_bytes call cost about as much as the rest together. */
	void *data = skb_data(skb);
	void *end = skb_end(skb);
	if (data + hdr_end > end)
		return -1;
	struct udphdr *udp = data + udp_off;
	__u8 *h = data + udp_off + 8;
	__u32 ulen = bpf_ntohs(udp->len);
	/* The whole query in the linear part (so is its reply after growing). */
	if (ulen < 8 + 12 + 1 + 4 || ulen > 8 + 12 + DNS_NAME_MAX + 4 || udp_off + ulen != skb->len ||
	    data + udp_off + ulen != end)
		return -1;
	/* QR=0, opcode QUERY, not truncated; one question, nothing else. */
	if ((h[2] & 0xfa) != 0 || h[4] != 0 || h[5] != 1 || h[6] || h[7] || h[8] || h[9] || h[10] || h[11])
		goto pass;
	__u8 rd = h[2] & 0x01;
	__u32 zero = 0;
	struct dns_key *k = bpf_map_lookup_elem(&dns_scratch, &zero);
	if (!k)
		goto pass;
	__builtin_memset(k, 0, sizeof(*k));
	k->net_id = net_id;
	__u32 qlen = ulen - 8 - 12 - 4;
	if (qlen < 1 || qlen > DNS_NAME_MAX)
		goto pass;
	if (bpf_skb_load_bytes(skb, hdr_end, k->name, qlen))
		goto pass;
	/* Labels of at most 63 bytes (no compression in a question), ending
	 * with the root exactly at the end: walked label by label (a name of
	 * 64 bytes has at most 32 labels). */
	__u32 pos = 0;
	int ended = 0;
	for (int l = 0; l < DNS_NAME_MAX / 2; l++) {
		if (pos >= qlen)
			break;
		__u8 len = k->name[pos & (DNS_NAME_MAX - 1)];
		if (len == 0) {
			ended = pos == qlen - 1;
			break;
		}
		if (len > 63)
			break;
		pos += len + 1;
	}
	if (!ended)
		goto pass;
	/* Lower case for the lookup (length bytes are below 64: untouched),
	 * four bytes at a time (the name is 4-aligned in the key): a byte's
	 * top bit marks it as 'A'..'Z'. */
	__u32 *words = (__u32 *)k->name;
#pragma clang loop unroll(disable)
	for (int i = 0; i < DNS_NAME_MAX / 4; i++) {
		__u32 x = words[i];
		__u32 low7 = x & 0x7f7f7f7f;
		__u32 ge_a = low7 + 0x3f3f3f3f; /* top bit: low7 >= 'A' */
		__u32 gt_z = low7 + 0x25252525; /* top bit: low7 > 'Z' */
		words[i] = x | ((ge_a & ~gt_z & ~x & 0x80808080) >> 2); /* 0x80 >> 2 = 0x20 */
	}
	/* Type and class, after the name (qlen is at most 64 here). */
	__u8 *q = data + hdr_end + (qlen & (DNS_NAME_MAX * 2 - 1));
	if ((void *)(q + 4) > end)
		goto pass;
	if (q[0] != 0 || (q[1] != DNS_TYPE_A && q[1] != DNS_TYPE_AAAA) || q[2] != 0 || q[3] != 1)
		goto pass; /* not A or AAAA / IN */
	int six = q[1] == DNS_TYPE_AAAA;
	k->qtype = q[1];
	/* Read in place (map values outlive the packet helpers below): the
	 * stack is tight, shared with the program that calls this. */
	struct dns_answer *ans = bpf_map_lookup_elem(&dns, k);
	if (!ans)
		goto pass;
	__u8 ra = (config_flags() & CFG_DNS_RA) ? 0x80 : 0;
	__u32 rrlen = six ? DNS_RR_LEN6 : DNS_RR_LEN;

	/* The reply: the query with QR, AA (and RA as the server says), one
	 * answer (a pointer to the question's name, the type asked, IN, TTL,
	 * the address). */
	if (bpf_skb_change_tail(skb, skb->len + rrlen, 0))
		goto pass;
	data = skb_data(skb);
	end = skb_end(skb);
	if (data + hdr_end > end)
		return TC_ACT_SHOT;
	__u8 *rr = data + udp_off + (ulen & 0x7f);
	if ((void *)(rr + DNS_RR_LEN) > end)
		return TC_ACT_SHOT;
	struct ethhdr *eth = data;
	udp = data + udp_off;
	h = data + udp_off + 8;

	/* The MACs swapped in registers, two bytes at a time. */
	__u16 *src16 = (__u16 *)eth->h_source, *dst16 = (__u16 *)eth->h_dest;
#pragma unroll
	for (int i = 0; i < ETH_ALEN / 2; i++) {
		__u16 t = src16[i];
		src16[i] = dst16[i];
		dst16[i] = t;
	}
	if (v6) {
		struct ipv6hdr *ip6 = data + ETH_HLEN_;
		__u32 *s6 = (__u32 *)ip6->saddr.in6_u.u6_addr32, *d6 = (__u32 *)ip6->daddr.in6_u.u6_addr32;
#pragma unroll
		for (int i = 0; i < 4; i++) {
			__u32 t = s6[i];
			s6[i] = d6[i];
			d6[i] = t;
		}
		ip6->payload_len = bpf_htons(ulen + rrlen);
		ip6->hop_limit = 64;
	} else {
		struct iphdr *ip = data + ETH_HLEN_;
		__u32 a4 = ip->saddr;
		ip->saddr = ip->daddr;
		ip->daddr = a4;
		ip->tot_len = bpf_htons(bpf_ntohs(ip->tot_len) + rrlen);
		ip->ttl = 64;
		ip->check = 0;
		__u32 sum = 0;
		__u16 *w = (__u16 *)ip;
#pragma unroll
		for (int i = 0; i < 10; i++)
			sum += w[i];
		sum = (sum & 0xffff) + (sum >> 16);
		sum = (sum & 0xffff) + (sum >> 16);
		ip->check = ~sum & 0xffff;
	}
	__u16 port = udp->source;
	udp->source = udp->dest;
	udp->dest = port;
	udp->len = bpf_htons(ulen + rrlen);
	udp->check = 0; /* optional over IPv4; over IPv6 computed below */
	h[2] = 0x80 | 0x04 | rd;
	h[3] = ra;
	h[7] = 1;
	rr[0] = 0xc0;
	rr[1] = 0x0c;
	rr[2] = 0;
	rr[3] = six ? DNS_TYPE_AAAA : DNS_TYPE_A;
	rr[4] = 0;
	rr[5] = 1;
	__u32 ttl = ans->ttl;
	rr[6] = ttl >> 24;
	rr[7] = ttl >> 16;
	rr[8] = ttl >> 8;
	rr[9] = ttl;
	rr[10] = 0;
	if (six) {
		if ((void *)(rr + DNS_RR_LEN6) > end)
			return TC_ACT_SHOT;
		rr[11] = 16;
		__builtin_memcpy(&rr[12], ans->addr, 16);
	} else {
		rr[11] = 4;
		__builtin_memcpy(&rr[12], ans->addr, 4);
	}
	if (v6 && udp6_checksum(skb, ulen + rrlen))
		return TC_ACT_SHOT;
	dns_count(1);
	return 1;
pass:
	dns_count(0);
	return -1;
}

/* A global (not inlined) function: the verifier checks it once, on its
 * own, rather than at every path that reaches it. `off`: where the UDP
 * header is (IPv4 options, IPv6 extension headers: left to the server). */
__attribute__((noinline)) int trellis_dns_fast(struct __sk_buff *skb, __u32 net_id, __u32 off)
{
	if (!skb)
		return -1;
	if (off == DNS_UDP_OFF)
		return dns_fast_at(skb, net_id, DNS_UDP_OFF, 0);
	if (off == DNS_UDP_OFF6)
		return dns_fast_at(skb, net_id, DNS_UDP_OFF6, 1);
	return -1;
}

/* A query answered by trellis_dns_fast goes straight back into the
 * endpoint's namespace: delivered at the ingress of the veth's other end,
 * it skips the transmit path, this veth's egress program and a second
 * softirq round (the answer is counted as sent to the endpoint here). */
static __always_inline int answer_dns(struct __sk_buff *skb, struct endpoint_counters *c)
{
	if (c) {
		c->to_packets += 1;
		c->to_bytes += skb->len;
	}
	return bpf_redirect_peer(skb->ifindex, 0);
}

/* A DNS query to an outside resolver, sent to the gateway instead; the
 * reverse translation gives the reply the resolver's address back. */
static __always_inline int to_gateway_dns(struct __sk_buff *skb, struct endpoint_counters *c,
					  const struct endpoint_info *ep, const struct flow *f)
{
	void *rnats = rnat_table_of(ep->slot);
	if (!rnats) {
		table_full(c, TABLE_RNAT);
		return drop(c, DROP_TABLE_FULL, skb->ifindex, f);
	}
	struct rnat_key rk = { .client = f->saddr, .backend = ep->gateway, .cport = f->sport, .bport = f->dport, .proto = f->proto };
	struct rnat_value *rv = bpf_map_lookup_elem(rnats, &rk);
	__u64 now = bpf_ktime_get_coarse_ns();
	if (!rv || rv->vip != f->daddr) {
		struct rnat_value nv = { .vip = f->daddr, .vport = f->dport, .seen = now };
		if (bpf_map_update_elem(rnats, &rk, &nv, BPF_ANY)) {
			table_full(c, TABLE_RNAT);
			return drop(c, DROP_TABLE_FULL, skb->ifindex, f);
		}
	} else if (now - rv->seen > SEEN_STEP) {
		rv->seen = now;
	}
	if (rewrite(skb, f, 1, f->daddr, ep->gateway, f->dport, f->dport))
		return drop(c, DROP_MALFORMED, skb->ifindex, f);
	if (bpf_skb_store_bytes(skb, 0, ep->gw_mac, ETH_ALEN, 0))
		return drop(c, DROP_MALFORMED, skb->ifindex, f);
	return TC_ACT_OK;
}

/* What to_gateway_dns6 did. */
#define DNS6_SENT 0	  /* sent to the gateway */
#define DNS6_NOT_QUERY 1  /* not such a query: the caller goes on */
#define DNS6_TABLE_FULL 2 /* the endpoint's table is full: drop */
#define DNS6_MALFORMED 3  /* could not be rewritten: drop */

/* A DNS query over IPv6 from the endpoint's own address to a resolver
 * outside Trellis (the caller checked the destination is in no Trellis
 * subnet), sent to the network's IPv6 gateway instead; a FLOW6_REPLY
 * entry remembers the resolver, whose address the reply gets back
 * (reverse6, nat6.h). Not inlined, and the drops left to the caller: its
 * locals stay off the endpoint program's frame, whose stack with
 * trellis_dns_fast's is near the limit. */
static __attribute__((noinline)) int to_gateway_dns6(struct __sk_buff *skb, const struct endpoint_info *ep)
{
	void *data = skb_data(skb);
	void *end = skb_end(skb);
	struct ipv6hdr *ip6 = data + ETH_HLEN_;
	__u16 *ports = data + IPV6_L4_OFF;
	if (!ep || (void *)(ports + 2) > end)
		return DNS6_NOT_QUERY;
	__u8 proto = ip6->nexthdr;
	if ((proto != PROTO_UDP && proto != PROTO_TCP) || ports[1] != bpf_htons(53) || addr6_zero(ep->gw6) ||
	    !addr6_eq(ip6->saddr.in6_u.u6_addr8, ep->ip6))
		return DNS6_NOT_QUERY;
	__u8 d0 = ip6->daddr.in6_u.u6_addr8[0];
	if (d0 == 0xff || (d0 == 0xfe && (ip6->daddr.in6_u.u6_addr8[1] & 0xc0) == 0x80))
		return DNS6_NOT_QUERY; /* multicast, link-local: not a resolver outside */
	void *t = flows6_table_of(ep->slot);
	if (!t)
		return DNS6_TABLE_FULL;
	/* The reply will come from the gateway's port 53 to the client's port. */
	struct flow6_key k = { .cport = ports[0], .port = bpf_htons(53), .proto = proto, .kind = FLOW6_REPLY };
	__builtin_memcpy(k.addr, ep->gw6, 16);
	struct flow6_value *v = bpf_map_lookup_elem(t, &k);
	__u64 now = bpf_ktime_get_coarse_ns();
	if (!v || !addr6_eq(v->addr, ip6->daddr.in6_u.u6_addr8)) {
		struct flow6_value nv = { .port = bpf_htons(53), .seen = now };
		__builtin_memcpy(nv.addr, ip6->daddr.in6_u.u6_addr8, 16);
		if (bpf_map_update_elem(t, &k, &nv, BPF_ANY))
			return DNS6_TABLE_FULL;
	} else if (now - v->seen > SEEN_STEP) {
		v->seen = now;
	}
	if (rewrite6(skb, proto, 1, ip6->daddr.in6_u.u6_addr8, ep->gw6))
		return DNS6_MALFORMED;
	if (bpf_skb_store_bytes(skb, 0, ep->gw_mac, ETH_ALEN, 0))
		return DNS6_MALFORMED;
	return DNS6_SENT;
}

#endif
