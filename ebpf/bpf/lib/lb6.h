/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* IPv6 service VIPs (dual-stack networks), as lb.h does IPv4 ones: a
 * neighbour solicitation for a VIP and a ping to it are answered here; a
 * TCP/UDP packet to it is DNATed to a backend chosen by the same Maglev
 * scheme (the service's `maglev6` table), remembered in the endpoint's
 * `ep_flows6` table (a FLOW6_VIP entry, with the FLOW6_REPLY entry its
 * replies are translated back by: reverse6, nat6.h); a flow whose backend
 * left is reset (TCP) or moved (UDP); a port no service has, or a service
 * without backends, answers TCP with a reset. Packets with extension
 * headers before their TCP/UDP header are not translated (dropped as to
 * no service). */
#ifndef TRELLIS_LIB_LB6_H
#define TRELLIS_LIB_LB6_H

#include "counters.h"
#include "events.h"
#include "flows.h"
#include "lb.h"
#include "maps.h"
#include "nat.h"
#include "nat6.h"
#include "ndp.h"
#include "parse.h"

#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129
#define ICMPV6_NEIGH_SOLICIT 135

/* The IPv6 VIP path's locals, here rather than on the stack: the endpoint
 * program's own frame leaves a called function about a hundred bytes. */
struct v6_scratch {
	struct flow6 f6; /* the packet (a VIP's, or any while events are on) */
	struct vip6_key vk;
	struct svc6_key sk;
	struct flow6_key fk;
	struct flow6_key rk;
	struct flow6_value cv;
	struct flow6_value nv;
	struct backend6_key bk;
	__u8 client[16];
	__u8 vip[16];
	__u8 client_mac[ETH_ALEN];
	__u8 mac[ETH_ALEN];
	struct {
		__u8 src[16];
		__u8 dst[16];
		__be32 len;
		__u8 zero[3];
		__u8 nexthdr;
	} pseudo;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct v6_scratch);
} v6_scratch SEC(".maps");

static __always_inline struct v6_scratch *v6_scratch_get(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&v6_scratch, &zero);
}

/* The MAC an IPv6 VIP answers with: 02:42 and its last four bytes (it
 * never leaves the endpoint's veth: the program rewrites every frame to
 * it). */
static __always_inline void vip6_mac(const __u8 *vip, __u8 *mac)
{
	mac[0] = 0x02;
	mac[1] = 0x42;
	__builtin_memcpy(mac + 2, vip + 12, 4);
}

/* The checksum of an ICMPv6 or TCP message of `len` bytes at `l4`
 * (its checksum field zero) from `src` to `dst` (the pseudo-header built
 * in `s`). */
static __always_inline __s64 csum6(struct v6_scratch *s, const __u8 *src, const __u8 *dst, __u8 nexthdr, void *l4,
				   __u32 len)
{
	__builtin_memcpy(s->pseudo.src, src, 16);
	__builtin_memcpy(s->pseudo.dst, dst, 16);
	s->pseudo.len = bpf_htonl(len);
	__builtin_memset(s->pseudo.zero, 0, 3);
	s->pseudo.nexthdr = nexthdr;
	__s64 sum = bpf_csum_diff(0, 0, (__be32 *)&s->pseudo, sizeof(s->pseudo), 0);
	if (sum < 0)
		return sum;
	return bpf_csum_diff(0, 0, (__be32 *)l4, len, sum);
}

/* The neighbour advertisement an IPv6 VIP answers a solicitation with. */
struct neigh_advert {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be32 flags;
	__u8 target[16];
	__u8 opt_type; /* 2: target link-layer address */
	__u8 opt_len;  /* in 8 bytes */
	__u8 mac[ETH_ALEN];
};

/* Answer the endpoint's neighbour solicitation for `s->vip`: the frame
 * becomes the advertisement (solicited, override, the VIP's MAC) and goes
 * back to the endpoint. */
static __always_inline int na_reply(struct __sk_buff *skb, struct v6_scratch *s)
{
	void *data = skb_data(skb);
	void *end = skb_end(skb);
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = data + ETH_HLEN_;
	if ((void *)(ip6 + 1) > end)
		return TC_ACT_SHOT;
	__builtin_memcpy(s->client_mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(s->client, ip6->saddr.in6_u.u6_addr8, 16);
	vip6_mac(s->vip, s->mac);
	if (bpf_skb_change_tail(skb, ETH_HLEN_ + 40 + sizeof(struct neigh_advert), 0))
		return TC_ACT_SHOT;
	data = skb_data(skb);
	end = skb_end(skb);
	eth = data;
	ip6 = data + ETH_HLEN_;
	struct neigh_advert *na = (void *)(ip6 + 1);
	if ((void *)(na + 1) > end)
		return TC_ACT_SHOT;
	__builtin_memcpy(eth->h_dest, s->client_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, s->mac, ETH_ALEN);
	*(__be32 *)ip6 = bpf_htonl(0x60000000);
	ip6->payload_len = bpf_htons(sizeof(struct neigh_advert));
	ip6->nexthdr = NEXTHDR_ICMPV6;
	ip6->hop_limit = 255;
	__builtin_memcpy(ip6->saddr.in6_u.u6_addr8, s->vip, 16);
	__builtin_memcpy(ip6->daddr.in6_u.u6_addr8, s->client, 16);
	na->type = ICMPV6_NEIGH_ADVERT;
	na->code = 0;
	na->checksum = 0;
	na->flags = bpf_htonl(0x60000000); /* solicited, override */
	__builtin_memcpy(na->target, s->vip, 16);
	na->opt_type = 2;
	na->opt_len = 1;
	__builtin_memcpy(na->mac, s->mac, ETH_ALEN);
	__s64 sum = csum6(s, s->vip, s->client, NEXTHDR_ICMPV6, na, sizeof(*na));
	if (sum < 0)
		return TC_ACT_SHOT;
	na->checksum = csum_fold(sum);
	return bpf_redirect(skb->ifindex, 0);
}

/* Answer a ping to an IPv6 VIP in place (the addresses swapped leave the
 * checksum's pseudo-header sum as it was; the type changes it). */
static __always_inline int echo6_reply(struct __sk_buff *skb, struct v6_scratch *s)
{
	void *data = skb_data(skb);
	void *end = skb_end(skb);
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = data + ETH_HLEN_;
	struct icmp_hdr *icmp = (void *)(ip6 + 1);
	if ((void *)(icmp + 1) > end)
		return TC_ACT_SHOT;
	vip6_mac(ip6->daddr.in6_u.u6_addr8, s->mac);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, s->mac, ETH_ALEN);
	__builtin_memcpy(s->client, ip6->saddr.in6_u.u6_addr8, 16);
	__builtin_memcpy(ip6->saddr.in6_u.u6_addr8, ip6->daddr.in6_u.u6_addr8, 16);
	__builtin_memcpy(ip6->daddr.in6_u.u6_addr8, s->client, 16);
	ip6->hop_limit = 64;
	icmp->type = ICMPV6_ECHO_REPLY;
	__u32 sum = (__u16)~icmp->checksum;
	sum += (__u16)~bpf_htons(ICMPV6_ECHO_REQUEST << 8);
	sum += bpf_htons(ICMPV6_ECHO_REPLY << 8);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	icmp->checksum = ~sum;
	return bpf_redirect(skb->ifindex, 0);
}

/* Answer a TCP segment to an IPv6 VIP with a reset from the VIP, as
 * tcp_reset does for IPv4. */
static __always_inline int tcp_reset6(struct __sk_buff *skb, struct v6_scratch *s)
{
	void *data = skb_data(skb);
	void *end = skb_end(skb);
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = data + ETH_HLEN_;
	struct tcphdr *t = (void *)(ip6 + 1);
	if ((void *)(t + 1) > end || t->rst)
		return TC_ACT_SHOT;
	struct reset_numbers r;
	reset_numbers_of(t, bpf_ntohs(ip6->payload_len) - t->doff * 4, &r);
	__u16 cport = t->source, vport = t->dest;
	__builtin_memcpy(s->client_mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(s->client, ip6->saddr.in6_u.u6_addr8, 16);
	__builtin_memcpy(s->vip, ip6->daddr.in6_u.u6_addr8, 16);
	if (bpf_skb_change_tail(skb, ETH_HLEN_ + 40 + 20, 0))
		return TC_ACT_SHOT;
	data = skb_data(skb);
	end = skb_end(skb);
	eth = data;
	ip6 = data + ETH_HLEN_;
	t = (void *)(ip6 + 1);
	if ((void *)(t + 1) > end)
		return TC_ACT_SHOT;
	vip6_mac(s->vip, eth->h_source);
	__builtin_memcpy(eth->h_dest, s->client_mac, ETH_ALEN);
	*(__be32 *)ip6 = bpf_htonl(0x60000000);
	ip6->payload_len = bpf_htons(20);
	ip6->nexthdr = PROTO_TCP;
	ip6->hop_limit = 64;
	__builtin_memcpy(ip6->saddr.in6_u.u6_addr8, s->vip, 16);
	__builtin_memcpy(ip6->daddr.in6_u.u6_addr8, s->client, 16);
	write_reset(t, vport, cport, &r);
	__s64 sum = csum6(s, s->vip, s->client, PROTO_TCP, t, 20);
	if (sum < 0)
		return TC_ACT_SHOT;
	t->check = csum_fold(sum);
	return bpf_redirect(skb->ifindex, 0);
}

/* The backend of the flow `s->fk` (a FLOW6_VIP key) to service `svc_id`,
 * into `s->cv`, as select_backend: the one its entry remembers while that
 * backend stays, else a new choice by the Maglev table, remembered. */
static __always_inline int select_backend6(struct __sk_buff *skb, struct v6_scratch *s, __u32 svc_id, __u32 count,
					   __u16 target_port, void *table)
{
	__u64 now = bpf_ktime_get_coarse_ns();
	struct flow6_value *known = bpf_map_lookup_elem(table, &s->fk);
	s->bk.svc_id = svc_id;
	if (known) {
		__builtin_memcpy(s->bk.ip, known->addr, 16);
		if (known->svc_id == svc_id && bpf_map_lookup_elem(&backends6, &s->bk)) {
			flow_seen(&known->seen, &known->state, &s->f6.f, now);
			s->cv = *known;
			return SELECT_OK;
		}
		bpf_map_delete_elem(table, &s->fk);
		if (s->f6.f.proto == PROTO_TCP && !s->f6.f.syn)
			return SELECT_LEFT;
	}
	struct maglev6_table *mt = bpf_map_lookup_elem(&maglev6, &svc_id);
	if (!mt || count == 0)
		return SELECT_NONE;
	__u32 slot = bpf_get_hash_recalc(skb) % MAGLEV_M;
	asm volatile("" : "+r"(slot));
	if (slot >= MAGLEV_M)
		return SELECT_NONE;
	__builtin_memcpy(s->bk.ip, mt->ip[slot], 16);
	if (addr6_zero(s->bk.ip))
		return SELECT_NONE;
	struct backend_info *b = bpf_map_lookup_elem(&backends6, &s->bk);
	if (!b)
		return SELECT_NONE;
	__builtin_memset(&s->cv, 0, sizeof(s->cv));
	__builtin_memcpy(s->cv.addr, s->bk.ip, 16);
	s->cv.port = target_port ? target_port : s->f6.f.dport;
	__builtin_memcpy(s->cv.mac, b->mac, ETH_ALEN);
	s->cv.svc_id = svc_id;
	s->cv.state = CT_OPEN;
	s->cv.seen = now;
	flow_seen(&s->cv.seen, &s->cv.state, &s->f6.f, now);
	if (bpf_map_update_elem(table, &s->fk, &s->cv, BPF_ANY))
		return SELECT_FULL;
	struct svc_stats *st = stats_of(svc_id);
	if (st)
		st->selections += 1;
	return SELECT_OK;
}

/* vip6_from_endpoint's answer when the packet is no VIP's business. */
#define VIP6_NOT -1

/* An IPv6 packet from the endpoint (its source checked): if it is to an
 * IPv6 VIP, or solicits a VIP's address, what becomes of it (a TC
 * verdict); else VIP6_NOT. Not inlined, its locals in `v6_scratch`: the
 * endpoint program's frame leaves little room. */
static __attribute__((noinline)) int vip6_from_endpoint(struct __sk_buff *skb, const struct endpoint_info *ep,
							 struct endpoint_counters *c)
{
	struct v6_scratch *s = v6_scratch_get();
	void *data = skb_data(skb);
	void *end = skb_end(skb);
	struct ipv6hdr *ip6 = data + ETH_HLEN_;
	if (!s || !ep || (void *)(ip6 + 1) > end)
		return VIP6_NOT;
	__u32 ifindex = skb->ifindex;
	__builtin_memcpy(s->vk.vip, ip6->daddr.in6_u.u6_addr8, 16);
	struct vip_info *v = bpf_map_lookup_elem(&vips6, &s->vk);
	__u8 proto = ip6->nexthdr;
	if (!v) {
		/* A neighbour solicitation for a VIP of its network. */
		__u8 *icmp = (void *)(ip6 + 1);
		if (proto != NEXTHDR_ICMPV6 || (void *)(icmp + 24) > end || icmp[0] != ICMPV6_NEIGH_SOLICIT ||
		    icmp[1] != 0 || addr6_zero(ip6->saddr.in6_u.u6_addr8))
			return VIP6_NOT;
		__builtin_memcpy(s->vk.vip, icmp + 8, 16);
		v = bpf_map_lookup_elem(&vips6, &s->vk);
		if (!v || v->net_id != ep->net_id)
			return VIP6_NOT;
		__builtin_memcpy(s->vip, s->vk.vip, 16);
		return na_reply(skb, s);
	}
	parse_flow6(ip6, data, end, &s->f6);
	if (v->net_id != ep->net_id)
		return drop6(c, DROP_ISOLATION, ifindex, &s->f6);
	__u32 backends = v->backends;
	s->f6.f.proto = proto;
	if (proto == NEXTHDR_ICMPV6) {
		struct icmp_hdr *icmp = (void *)(ip6 + 1);
		if ((void *)(icmp + 1) > end)
			return drop6(c, DROP_MALFORMED, ifindex, &s->f6);
		if (icmp->type == ICMPV6_ECHO_REQUEST && icmp->code == 0 && backends > 0)
			return echo6_reply(skb, s);
		return drop6(c, backends ? DROP_NO_SERVICE : DROP_NO_BACKEND, ifindex, &s->f6);
	}
	/* Only from its own address (a link-local one could not be answered
	 * by a backend), and TCP or UDP right after the header. */
	if ((proto != PROTO_TCP && proto != PROTO_UDP) || !addr6_eq(ip6->saddr.in6_u.u6_addr8, ep->ip6))
		return drop6(c, DROP_NO_SERVICE, ifindex, &s->f6);
	__u16 *ports = data + IPV6_L4_OFF;
	if ((void *)(ports + 2) > end)
		return drop6(c, DROP_MALFORMED, ifindex, &s->f6);
	s->f6.f.sport = ports[0];
	s->f6.f.dport = ports[1];
	s->f6.f.l4off = IPV6_L4_OFF;
	if (proto == PROTO_TCP) {
		struct tcphdr *t = (void *)ports;
		if ((void *)(t + 1) > end)
			return drop6(c, DROP_MALFORMED, ifindex, &s->f6);
		s->f6.f.syn = t->syn && !t->ack;
		s->f6.f.start = s->f6.f.syn;
		s->f6.f.fin = t->fin;
		s->f6.f.rst = t->rst;
		s->f6.f.ack = t->ack;
	}
	__builtin_memcpy(s->sk.vip, s->vk.vip, 16);
	s->sk.port = s->f6.f.dport;
	s->sk.proto = proto;
	s->sk.pad = 0;
	struct svc_info *svc = bpf_map_lookup_elem(&services6, &s->sk);
	if (!svc) {
		s->sk.port = 0;
		svc = bpf_map_lookup_elem(&services6, &s->sk);
	}
	if (!svc) {
		if (c)
			c->drops[DROP_NO_SERVICE] += 1;
		emit6(ifindex, &s->f6, 1, DROP_NO_SERVICE);
		return proto == PROTO_TCP ? tcp_reset6(skb, s) : TC_ACT_SHOT;
	}
	__u32 svc_id = svc->id, count = svc->count;
	__u16 target_port = svc->target_port;
	void *table = flows6_table_of(ep->slot);
	if (!table) {
		table_full(c, TABLE_CT);
		return drop6(c, DROP_TABLE_FULL, ifindex, &s->f6);
	}
	__builtin_memcpy(s->fk.addr, s->vk.vip, 16);
	s->fk.cport = s->f6.f.sport;
	s->fk.port = s->f6.f.dport;
	s->fk.proto = proto;
	s->fk.kind = FLOW6_VIP;
	__builtin_memset(s->fk.pad, 0, 2);
	int chosen = select_backend6(skb, s, svc_id, count, target_port, table);
	if (chosen == SELECT_FULL) {
		table_full(c, TABLE_CT);
		return drop6(c, DROP_TABLE_FULL, ifindex, &s->f6);
	}
	if (chosen != SELECT_OK) {
		if (chosen == SELECT_LEFT) {
			struct svc_stats *st = stats_of(svc_id);
			if (st)
				st->resets += 1;
		}
		if (c)
			c->drops[DROP_NO_BACKEND] += 1;
		emit6(ifindex, &s->f6, 1, DROP_NO_BACKEND);
		return proto == PROTO_TCP ? tcp_reset6(skb, s) : TC_ACT_SHOT;
	}
	__builtin_memcpy(s->rk.addr, s->cv.addr, 16);
	s->rk.cport = s->f6.f.sport;
	s->rk.port = s->cv.port;
	s->rk.proto = proto;
	s->rk.kind = FLOW6_REPLY;
	__builtin_memset(s->rk.pad, 0, 2);
	struct flow6_value *rv = bpf_map_lookup_elem(table, &s->rk);
	if (!rv || !addr6_eq(rv->addr, s->vk.vip) || rv->port != s->f6.f.dport) {
		__builtin_memset(&s->nv, 0, sizeof(s->nv));
		__builtin_memcpy(s->nv.addr, s->vk.vip, 16);
		s->nv.port = s->f6.f.dport;
		s->nv.seen = s->cv.seen;
		if (bpf_map_update_elem(table, &s->rk, &s->nv, BPF_ANY)) {
			bpf_map_delete_elem(table, &s->fk);
			table_full(c, TABLE_RNAT);
			return drop6(c, DROP_TABLE_FULL, ifindex, &s->f6);
		}
	}
	if (rewrite6(skb, proto, 1, s->vk.vip, s->cv.addr) || rewrite6_port(skb, proto, 1, s->f6.f.dport, s->cv.port) ||
	    bpf_skb_store_bytes(skb, 0, s->cv.mac, ETH_ALEN, 0))
		return drop6(c, DROP_MALFORMED, ifindex, &s->f6);
	if (proto == PROTO_TCP && s->f6.f.rst) {
		bpf_map_delete_elem(table, &s->fk);
		bpf_map_delete_elem(table, &s->rk);
	}
	if (s->f6.f.start)
		emit6(ifindex, &s->f6, 0, 0);
	return TC_ACT_OK;
}

#endif
