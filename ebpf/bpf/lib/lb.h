/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Service VIPs (load balancing): a packet to a VIP of the endpoint's
 * network is answered here (ping; a TCP reset when no service or backend
 * takes it) or DNATed to a backend chosen by Maglev and remembered in the
 * endpoint's own `ep_ct` table, with the `ep_rnat` entry its replies are
 * translated back by (flows.h). A
 * flow whose backend left is reset (TCP) or moved (UDP). On the way back,
 * the replies of backends are translated back to the VIP (reverse_nat). */
#ifndef TRELLIS_LIB_LB_H
#define TRELLIS_LIB_LB_H

#include "arp.h"
#include "counters.h"
#include "events.h"
#include "flows.h"
#include "maps.h"
#include "nat.h"
#include "parse.h"

/* Answer a ping to a VIP in place. */
static __always_inline int echo_reply(struct __sk_buff *skb, const struct flow *f)
{
	void *data = skb_data(skb);
	void *end = skb_end(skb);
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || f->l4off > 128)
		return TC_ACT_SHOT;
	struct icmp_hdr *icmp = data + f->l4off;
	if ((void *)(icmp + 1) > end)
		return TC_ACT_SHOT;
	__u8 mac[ETH_ALEN];
	vip_mac(f->daddr, mac);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);
	/* Swapping the addresses leaves the IP checksum as it is. */
	ip->saddr = f->daddr;
	ip->daddr = f->saddr;
	icmp->type = ICMP_ECHO_REPLY;
	/* The type is the high byte of the first 16-bit word: 8 → 0. */
	__u32 sum = (__u16)~icmp->checksum;
	sum += (__u16)~bpf_htons(ICMP_ECHO_REQUEST << 8);
	sum += bpf_htons(ICMP_ECHO_REPLY << 8);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	icmp->checksum = ~sum;
	return bpf_redirect(skb->ifindex, 0);
}

/* What a reset answering TCP segment `t` (with `payload` bytes of data)
 * says: the segment's ack as its sequence number, or, to a segment
 * without one, an ack of everything the segment carried. */
struct reset_numbers {
	__u32 seq;
	__u32 ack_seq;
	int has_ack;
};

static __always_inline void reset_numbers_of(const struct tcphdr *t, __u32 payload, struct reset_numbers *r)
{
	r->has_ack = t->ack;
	r->seq = r->has_ack ? t->ack_seq : 0;
	r->ack_seq = r->has_ack ? 0 : bpf_htonl(bpf_ntohl(t->seq) + payload + t->syn + t->fin);
}

/* Write that reset's TCP header (no options) over `t`, from `sport` to
 * `dport`; its checksum is the caller's. */
static __always_inline void write_reset(struct tcphdr *t, __u16 sport, __u16 dport, const struct reset_numbers *r)
{
	__builtin_memset(t, 0, sizeof(*t));
	t->source = sport;
	t->dest = dport;
	t->seq = r->seq;
	t->ack_seq = r->ack_seq;
	t->doff = 5;
	t->rst = 1;
	t->ack = !r->has_ack;
}

/* Answer a TCP segment to a VIP with a reset from the VIP (no such port,
 * no backend, or the flow's backend left). The frame is cut down to the
 * headers and turned around. */
static __always_inline int tcp_reset(struct __sk_buff *skb, const struct flow *f)
{
	void *data = skb_data(skb);
	void *end = skb_end(skb);
	struct iphdr *ip = data + ETH_HLEN_;
	if ((void *)(ip + 1) > end || ip->ihl != 5)
		return TC_ACT_SHOT;
	struct tcphdr *t = (void *)(ip + 1);
	if ((void *)(t + 1) > end)
		return TC_ACT_SHOT;
	if (t->rst)
		return TC_ACT_SHOT;
	struct reset_numbers r;
	reset_numbers_of(t, bpf_ntohs(ip->tot_len) - 20 - t->doff * 4, &r);
	__u8 client_mac[ETH_ALEN];
	struct ethhdr *eth = data;
	__builtin_memcpy(client_mac, eth->h_source, ETH_ALEN);

	if (bpf_skb_change_tail(skb, ETH_HLEN_ + 40, 0))
		return TC_ACT_SHOT;
	data = skb_data(skb);
	end = skb_end(skb);
	eth = data;
	ip = data + ETH_HLEN_;
	t = (void *)(ip + 1);
	if ((void *)(t + 1) > end)
		return TC_ACT_SHOT;
	vip_mac(f->daddr, eth->h_source);
	__builtin_memcpy(eth->h_dest, client_mac, ETH_ALEN);
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = bpf_htons(40);
	ip->id = 0;
	ip->frag_off = bpf_htons(0x4000); /* DF */
	ip->ttl = 64;
	ip->protocol = PROTO_TCP;
	ip->saddr = f->daddr;
	ip->daddr = f->saddr;
	ip->check = 0;
	ip->check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)ip, 20, 0));

	write_reset(t, f->dport, f->sport, &r);
	struct {
		__u32 saddr, daddr;
		__u8 zero, proto;
		__be16 len;
	} pseudo = { f->daddr, f->saddr, 0, PROTO_TCP, bpf_htons(20) };
	__s64 sum = bpf_csum_diff(0, 0, (__be32 *)&pseudo, sizeof(pseudo), 0);
	if (sum < 0)
		return TC_ACT_SHOT;
	sum = bpf_csum_diff(0, 0, (__be32 *)t, 20, sum);
	if (sum < 0)
		return TC_ACT_SHOT;
	t->check = csum_fold(sum);
	return bpf_redirect(skb->ifindex, 0);
}

/* What select_backend found. */
#define SELECT_OK 0
#define SELECT_NONE 1 /* the service has no backend */
#define SELECT_LEFT 2 /* a TCP flow past its SYN whose backend left: reset it */
#define SELECT_FULL 3 /* a new flow, and its table is full */

/* The backend of flow `f` to service `svc_id` (`count` backends, on
 * `target_port`, 0: the port asked for): the one its entry in `table`
 * (keyed by the client and the address and port it asked) remembers
 * while that backend stays, else a new choice by the Maglev table,
 * remembered. `table` is the client endpoint's own (ep_ct), or for the
 * routing mesh the shared `ct` LRU; the Maglev table is the same either
 * way, so a client gets the same backend. */
static __always_inline int select_backend(struct __sk_buff *skb, const struct flow *f, __u32 svc_id, __u32 count,
					  __u16 target_port, struct ct_value *out, void *table)
{
	struct ct_key ck = { .client = f->saddr, .vip = f->daddr, .cport = f->sport, .vport = f->dport, .proto = f->proto };
	__u64 now = bpf_ktime_get_coarse_ns();
	struct ct_value *known = bpf_map_lookup_elem(table, &ck);
	if (known) {
		struct backend_key bk = { .svc_id = known->svc_id, .ip = known->backend };
		if (known->svc_id == svc_id && bpf_map_lookup_elem(&backends, &bk)) {
			ct_seen(known, f, now);
			*out = *known;
			return SELECT_OK;
		}
		/* Its backend left: TCP is told at once; UDP moves on. */
		bpf_map_delete_elem(table, &ck);
		if (f->proto == PROTO_TCP && !f->syn)
			return SELECT_LEFT;
	}
	struct maglev_table *mt = bpf_map_lookup_elem(&maglev, &svc_id);
	if (!mt || count == 0)
		return SELECT_NONE;
	__u32 slot = bpf_get_hash_recalc(skb) % MAGLEV_M;
	/* Keep the bound check the compiler would prove redundant: the
	 * verifier needs it. */
	asm volatile("" : "+r"(slot));
	if (slot >= MAGLEV_M)
		return SELECT_NONE;
	__u32 ip = mt->ip[slot];
	struct backend_key bk = { .svc_id = svc_id, .ip = ip };
	struct backend_info *b = ip ? bpf_map_lookup_elem(&backends, &bk) : 0;
	if (!b)
		return SELECT_NONE;
	out->backend = ip;
	out->bport = target_port ? target_port : f->dport;
	__builtin_memcpy(out->mac, b->mac, ETH_ALEN);
	out->svc_id = svc_id;
	out->state = CT_OPEN;
	out->seen = now;
	ct_seen(out, f, now);
	/* A full table (an endpoint's quota) refuses the flow: nothing in it
	 * is pushed out for a newcomer. */
	if (bpf_map_update_elem(table, &ck, out, BPF_ANY))
		return SELECT_FULL;
	struct svc_stats *st = stats_of(svc_id);
	if (st)
		st->selections += 1;
	return SELECT_OK;
}

/* A packet the endpoint sends to a VIP of its network. */
static __always_inline int to_vip(struct __sk_buff *skb, struct endpoint_counters *c, const struct vip_info *v,
				  const struct flow *f, __u32 slot)
{
	__u32 ifindex = skb->ifindex;
	if (f->proto == PROTO_ICMP) {
		if (f->echo && v->backends > 0)
			return echo_reply(skb, f);
		return drop(c, v->backends ? DROP_NO_SERVICE : DROP_NO_BACKEND, ifindex, f);
	}
	if ((f->proto != PROTO_TCP && f->proto != PROTO_UDP) || !f->l4off)
		return drop(c, DROP_NO_SERVICE, ifindex, f);
	struct svc_key sk = { .vip = f->daddr, .port = f->dport, .proto = f->proto };
	struct svc_info *svc = bpf_map_lookup_elem(&services, &sk);
	if (!svc) {
		/* A service published on no port in particular takes every port
		 * (as Docker's VIPs do): its entry is port 0, target 0 (the
		 * port the client asked for). Looked up only on a miss. */
		sk.port = 0;
		svc = bpf_map_lookup_elem(&services, &sk);
	}
	if (!svc) {
		if (c)
			c->drops[DROP_NO_SERVICE] += 1;
		emit(ifindex, f, 1, DROP_NO_SERVICE);
		return f->proto == PROTO_TCP ? tcp_reset(skb, f) : TC_ACT_SHOT;
	}
	__u32 svc_id = svc->id;
	__u16 target_port = svc->target_port;

	void *cts = ct_table_of(slot);
	void *rnats = rnat_table_of(slot);
	if (!cts || !rnats) {
		/* The agent has not made its tables (yet): nothing to keep the
		 * flow in. */
		table_full(c, cts ? TABLE_RNAT : TABLE_CT);
		return drop(c, DROP_TABLE_FULL, ifindex, f);
	}
	struct ct_value cv = {};
	int chosen = select_backend(skb, f, svc_id, svc->count, target_port, &cv, cts);
	if (chosen == SELECT_FULL) {
		table_full(c, TABLE_CT);
		return drop(c, DROP_TABLE_FULL, ifindex, f);
	}
	if (chosen == SELECT_LEFT) {
		struct svc_stats *st = stats_of(svc_id);
		if (st)
			st->resets += 1;
		if (c)
			c->drops[DROP_NO_BACKEND] += 1;
		emit(ifindex, f, 1, DROP_NO_BACKEND);
		return tcp_reset(skb, f);
	}
	if (chosen != SELECT_OK)
		goto no_backend;
	struct rnat_key rk = { .client = f->saddr, .backend = cv.backend, .cport = f->sport, .bport = cv.bport, .proto = f->proto };
	struct rnat_value *rv = bpf_map_lookup_elem(rnats, &rk);
	if (!rv || rv->vip != f->daddr || rv->vport != f->dport) {
		struct rnat_value nv = { .vip = f->daddr, .vport = f->dport, .seen = cv.seen };
		if (bpf_map_update_elem(rnats, &rk, &nv, BPF_ANY)) {
			/* Its replies could not be translated: the flow does not
			 * start (and leaves nothing behind). */
			struct ct_key ck = { .client = f->saddr, .vip = f->daddr, .cport = f->sport, .vport = f->dport, .proto = f->proto };
			bpf_map_delete_elem(cts, &ck);
			table_full(c, TABLE_RNAT);
			return drop(c, DROP_TABLE_FULL, ifindex, f);
		}
	}
	if (rewrite(skb, f, 1, f->daddr, cv.backend, f->dport, cv.bport))
		return drop(c, DROP_MALFORMED, ifindex, f);
	if (bpf_skb_store_bytes(skb, 0, cv.mac, ETH_ALEN, 0))
		return drop(c, DROP_MALFORMED, ifindex, f);
	if (f->proto == PROTO_TCP && f->rst) {
		/* The client ended it: its entries go now, not when the agent
		 * next sweeps (a client that closes with resets opens and ends
		 * thousands a second). */
		struct ct_key ck = { .client = f->saddr, .vip = f->daddr, .cport = f->sport, .vport = f->dport, .proto = f->proto };
		bpf_map_delete_elem(cts, &ck);
		bpf_map_delete_elem(rnats, &rk);
	}
	if (f->start)
		emit(ifindex, f, 0, 0);
	return TC_ACT_OK;

no_backend:
	if (c)
		c->drops[DROP_NO_BACKEND] += 1;
	emit(ifindex, f, 1, DROP_NO_BACKEND);
	return f->proto == PROTO_TCP ? tcp_reset(skb, f) : TC_ACT_SHOT;
}

/* A TCP/UDP packet to the endpoint (`f` parsed, with an L4 header): a
 * backend's reply to one of its VIP flows gets the VIP and port back as
 * its source. */
static __always_inline int reverse_nat(struct __sk_buff *skb, const struct flow *f, __u32 slot)
{
	void *rnats = rnat_table_of(slot);
	if (!rnats)
		return TC_ACT_OK;
	struct rnat_key rk = { .client = f->daddr, .backend = f->saddr, .cport = f->dport, .bport = f->sport, .proto = f->proto };
	struct rnat_value *rv = bpf_map_lookup_elem(rnats, &rk);
	if (!rv)
		return TC_ACT_OK;
	rnat_seen(rv, f, bpf_ktime_get_coarse_ns());
	struct rnat_value v = *rv;
	if (rewrite(skb, f, 0, f->saddr, v.vip, f->sport, v.vport))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

#endif
