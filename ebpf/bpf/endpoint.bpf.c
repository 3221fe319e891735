// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The Trellis endpoint datapath, on the host side of every endpoint veth.
 *
 * trellis_from_endpoint (ingress: what the endpoint sends):
 *   anti-spoofing (source MAC, IPv4 source, ARP sender), tenant isolation
 *   (nothing reaches another Trellis network; nothing leaves an internal
 *   one), service VIPs (ARP and ping answered here, TCP/UDP DNAT to a
 *   backend chosen by Maglev, remembered in a conntrack LRU; flows whose
 *   backend left are reset), counters and monitor events.
 * trellis_to_endpoint (egress: what the endpoint receives):
 *   reverse translation of backends' replies to the VIP, counters. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "trellis.h"

/* The ICMP echo header (linux/icmp.h pulls in libc headers). */
struct icmp_hdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 id;
	__be16 seq;
};
#define ICMP_ECHO_REPLY 0
#define ICMP_ECHO_REQUEST 8

/* IP protocol numbers (linux/in.h pulls in libc headers). */
#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17

#define ARP_REQUEST 1
#define ARP_REPLY 2

#define ETH_HLEN_ 14
#define IP_CSUM_OFF (ETH_HLEN_ + __builtin_offsetof(struct iphdr, check))
#define IP_DST_OFF (ETH_HLEN_ + __builtin_offsetof(struct iphdr, daddr))
#define IP_SRC_OFF (ETH_HLEN_ + __builtin_offsetof(struct iphdr, saddr))

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
	__uint(max_entries, 1 << 18);
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

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct rnat_key);
	__type(value, struct rnat_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} rnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct svc_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} svc_stats SEC(".maps");

/* An ARP header (as linux/if_arp.h has it, which pulls in libc headers). */
struct arp_hdr {
	__be16 ar_hrd;
	__be16 ar_pro;
	__u8 ar_hln;
	__u8 ar_pln;
	__be16 ar_op;
};

/* The ARP payload for IPv4 over Ethernet. */
struct arp_eth_ipv4 {
	__u8 sha[ETH_ALEN];
	__u8 sip[4];
	__u8 tha[ETH_ALEN];
	__u8 tip[4];
} __attribute__((packed));

/* skb->data and skb->data_end, loaded straight from the context register
 * (left to itself the compiler may keep `skb + offset` in a register and
 * load through it later, which the verifier refuses). */
static __always_inline void *skb_data(struct __sk_buff *skb)
{
	void *p;
	asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(p) : "r"(skb), "i"(__builtin_offsetof(struct __sk_buff, data)));
	return p;
}

static __always_inline void *skb_end(struct __sk_buff *skb)
{
	void *p;
	asm volatile("%0 = *(u32 *)(%1 + %2)" : "=r"(p) : "r"(skb), "i"(__builtin_offsetof(struct __sk_buff, data_end)));
	return p;
}

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] && a[5] == b[5];
}

/* The MAC a VIP answers ARP with: 02:42 and the address, the scheme of
 * every Trellis address (model::mac_for_ip). */
static __always_inline void vip_mac(__u32 vip, __u8 *mac)
{
	mac[0] = 0x02;
	mac[1] = 0x42;
	__builtin_memcpy(mac + 2, &vip, 4);
}

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

/* The addresses and ports of an IPv4 packet, for events and services. */
struct flow {
	__u32 saddr, daddr;
	__u16 sport, dport;
	__u8 proto;
	__u8 start; /* a TCP SYN or an ICMP echo request */
	__u8 syn;
	__u8 echo;
	__u32 l4off; /* from the start of the frame; 0 if no L4 header */
};

static __always_inline void parse_flow(struct iphdr *ip, void *data, void *end, struct flow *f)
{
	f->saddr = ip->saddr;
	f->daddr = ip->daddr;
	f->proto = ip->protocol;
	if (ip->ihl < 5)
		return;
	void *l4 = (void *)ip + ip->ihl * 4;
	if (ip->protocol == PROTO_TCP) {
		struct tcphdr *t = l4;
		if ((void *)(t + 1) <= end) {
			f->sport = t->source;
			f->dport = t->dest;
			f->syn = t->syn && !t->ack;
			f->start = f->syn;
			f->l4off = l4 - data;
		}
	} else if (ip->protocol == PROTO_UDP) {
		struct udphdr *u = l4;
		if ((void *)(u + 1) <= end) {
			f->sport = u->source;
			f->dport = u->dest;
			f->l4off = l4 - data;
		}
	} else if (ip->protocol == PROTO_ICMP) {
		struct icmp_hdr *i = l4;
		if ((void *)(i + 1) <= end) {
			f->echo = i->type == ICMP_ECHO_REQUEST && i->code == 0;
			f->start = f->echo;
			f->l4off = l4 - data;
		}
	}
}

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

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

/* Answer an ARP request for a VIP: the frame is turned into the reply and
 * sent back out of the veth, to the endpoint. */
static __always_inline int arp_reply(struct __sk_buff *skb, __u32 vip)
{
	void *data = skb_data(skb);
	void *end = skb_end(skb);
	struct ethhdr *eth = data;
	struct arp_hdr *arp = (void *)(eth + 1);
	struct arp_eth_ipv4 *body = (void *)(arp + 1);
	if ((void *)(body + 1) > end)
		return TC_ACT_SHOT;
	__u8 mac[ETH_ALEN];
	vip_mac(vip, mac);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);
	arp->ar_op = bpf_htons(ARP_REPLY);
	__builtin_memcpy(body->tha, body->sha, ETH_ALEN);
	__builtin_memcpy(body->tip, body->sip, 4);
	__builtin_memcpy(body->sha, mac, ETH_ALEN);
	__builtin_memcpy(body->sip, &vip, 4);
	return bpf_redirect(skb->ifindex, 0);
}

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
	__u32 payload = bpf_ntohs(ip->tot_len) - 20 - t->doff * 4;
	__u32 seq = 0, ack_seq = 0;
	int has_ack = t->ack;
	if (has_ack)
		seq = t->ack_seq;
	else
		ack_seq = bpf_htonl(bpf_ntohl(t->seq) + payload + t->syn + t->fin);
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

	__builtin_memset(t, 0, sizeof(*t));
	t->source = f->dport;
	t->dest = f->sport;
	t->seq = seq;
	t->ack_seq = ack_seq;
	t->doff = 5;
	t->rst = 1;
	t->ack = !has_ack;
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

/* Rewrite one address and port of an IPv4 TCP/UDP packet, checksums
 * included (`dst`: the destination, else the source). */
static __always_inline int rewrite(struct __sk_buff *skb, const struct flow *f, int dst, __u32 old_ip, __u32 new_ip,
				   __u16 old_port, __u16 new_port)
{
	__u32 l4 = f->l4off;
	if (l4 < ETH_HLEN_ + 20 || l4 > ETH_HLEN_ + 60)
		return -1;
	__u32 csum_off = l4 + (f->proto == PROTO_TCP ? __builtin_offsetof(struct tcphdr, check)
						      : __builtin_offsetof(struct udphdr, check));
	__u32 port_off = l4 + (dst ? 2 : 0);
	__u64 flags = f->proto == PROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	if (bpf_l4_csum_replace(skb, csum_off, old_ip, new_ip, flags | BPF_F_PSEUDO_HDR | 4))
		return -1;
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, flags | 2))
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0))
			return -1;
	}
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_ip, new_ip, 4))
		return -1;
	if (bpf_skb_store_bytes(skb, dst ? IP_DST_OFF : IP_SRC_OFF, &new_ip, 4, 0))
		return -1;
	return 0;
}

/* A packet the endpoint sends to a VIP of its network. */
static __always_inline int to_vip(struct __sk_buff *skb, struct endpoint_counters *c, const struct vip_info *v,
				  const struct flow *f)
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
		if (c)
			c->drops[DROP_NO_SERVICE] += 1;
		emit(ifindex, f, 1, DROP_NO_SERVICE);
		return f->proto == PROTO_TCP ? tcp_reset(skb, f) : TC_ACT_SHOT;
	}
	__u32 svc_id = svc->id;
	__u16 target_port = svc->target_port;

	struct ct_key ck = { .client = f->saddr, .vip = f->daddr, .cport = f->sport, .vport = f->dport, .proto = f->proto };
	struct ct_value cv = {};
	struct ct_value *known = bpf_map_lookup_elem(&ct, &ck);
	int chosen = 0;
	if (known) {
		struct backend_key bk = { .svc_id = known->svc_id, .ip = known->backend };
		if (known->svc_id == svc_id && bpf_map_lookup_elem(&backends, &bk)) {
			cv = *known;
			chosen = 1;
		} else {
			/* Its backend left: TCP is told at once; UDP moves on. */
			bpf_map_delete_elem(&ct, &ck);
			if (f->proto == PROTO_TCP && !f->syn) {
				struct svc_stats *st = stats_of(svc_id);
				if (st)
					st->resets += 1;
				if (c)
					c->drops[DROP_NO_BACKEND] += 1;
				emit(ifindex, f, 1, DROP_NO_BACKEND);
				return tcp_reset(skb, f);
			}
		}
	}
	if (!chosen) {
		struct maglev_table *table = bpf_map_lookup_elem(&maglev, &svc_id);
		if (!table || svc->count == 0)
			goto no_backend;
		__u32 slot = bpf_get_hash_recalc(skb) % MAGLEV_M;
		/* Keep the bound check the compiler would prove redundant: the
		 * verifier needs it. */
		asm volatile("" : "+r"(slot));
		if (slot >= MAGLEV_M)
			goto no_backend;
		__u32 ip = table->ip[slot];
		struct backend_key bk = { .svc_id = svc_id, .ip = ip };
		struct backend_info *b = ip ? bpf_map_lookup_elem(&backends, &bk) : 0;
		if (!b)
			goto no_backend;
		cv.backend = ip;
		cv.bport = target_port;
		__builtin_memcpy(cv.mac, b->mac, ETH_ALEN);
		cv.svc_id = svc_id;
		bpf_map_update_elem(&ct, &ck, &cv, BPF_ANY);
		struct svc_stats *st = stats_of(svc_id);
		if (st)
			st->selections += 1;
	}
	struct rnat_key rk = { .client = f->saddr, .backend = cv.backend, .cport = f->sport, .bport = cv.bport, .proto = f->proto };
	struct rnat_value *rv = bpf_map_lookup_elem(&rnat, &rk);
	if (!rv || rv->vip != f->daddr || rv->vport != f->dport) {
		struct rnat_value nv = { .vip = f->daddr, .vport = f->dport };
		bpf_map_update_elem(&rnat, &rk, &nv, BPF_ANY);
	}
	if (rewrite(skb, f, 1, f->daddr, cv.backend, f->dport, cv.bport))
		return drop(c, DROP_MALFORMED, ifindex, f);
	if (bpf_skb_store_bytes(skb, 0, cv.mac, ETH_ALEN, 0))
		return drop(c, DROP_MALFORMED, ifindex, f);
	if (f->start)
		emit(ifindex, f, 0, 0);
	return TC_ACT_OK;

no_backend:
	if (c)
		c->drops[DROP_NO_BACKEND] += 1;
	emit(ifindex, f, 1, DROP_NO_BACKEND);
	return f->proto == PROTO_TCP ? tcp_reset(skb, f) : TC_ACT_SHOT;
}

static __always_inline __u32 config_flags(void)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);
	return cfg ? cfg->flags : 0;
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

/* Where a query's parts are (IPv4 without options). */
#define DNS_UDP_OFF (ETH_HLEN_ + 20)
#define DNS_HDR_END (DNS_UDP_OFF + 8 + 12)
/* The answer record appended: name pointer, type, class, TTL, length, address. */
#define DNS_RR_LEN 16

/* The in-kernel DNS fast path: a plain query (one question, no EDNS or
 * other records) for the A record of a name in `dns` (the client's
 * network's names with exactly one address) is turned into the reply the
 * agent's server would write, and 1 returned: the caller sends it back
 * (answer_dns). Anything else returns -1 and goes on to the server. */
/* A global (not inlined) function: the verifier checks it once, on its
 * own, rather than at every path that reaches it. */
__attribute__((noinline)) int trellis_dns_fast(struct __sk_buff *skb, __u32 net_id, __u32 off)
{
	if (!skb || off != DNS_UDP_OFF)
		return -1; /* IP options: leave it to the server */
	/* Read and written in place (one helper call to copy the name for the
	 * lookup, one to grow the packet): each bpf_skb_load_bytes or
	 * bpf_skb_store_bytes call cost about as much as the rest together. */
	void *data = skb_data(skb);
	void *end = skb_end(skb);
	if (data + DNS_HDR_END > end)
		return -1;
	struct udphdr *udp = data + DNS_UDP_OFF;
	__u8 *h = data + DNS_UDP_OFF + 8;
	__u32 ulen = bpf_ntohs(udp->len);
	/* The whole query in the linear part (so is its reply after growing). */
	if (ulen < 8 + 12 + 1 + 4 || ulen > 8 + 12 + DNS_NAME_MAX + 4 || DNS_UDP_OFF + ulen != skb->len ||
	    data + DNS_UDP_OFF + ulen != end)
		return -1;
	/* QR=0, opcode QUERY, not truncated; one question, nothing else. */
	if ((h[2] & 0xfa) != 0 || h[4] != 0 || h[5] != 1 || h[6] || h[7] || h[8] || h[9] || h[10] || h[11])
		goto pass;
	__u8 rd = h[2] & 0x01;
	struct dns_key k = {};
	k.net_id = net_id;
	__u32 qlen = ulen - 8 - 12 - 4;
	if (qlen < 1 || qlen > DNS_NAME_MAX)
		goto pass;
	if (bpf_skb_load_bytes(skb, DNS_HDR_END, k.name, qlen))
		goto pass;
	/* Labels of at most 63 bytes (no compression in a question), ending
	 * with the root exactly at the end: walked label by label (a name of
	 * 64 bytes has at most 32 labels). */
	__u32 pos = 0;
	int ended = 0;
	for (int l = 0; l < DNS_NAME_MAX / 2; l++) {
		if (pos >= qlen)
			break;
		__u8 len = k.name[pos & (DNS_NAME_MAX - 1)];
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
	__u32 *words = (__u32 *)k.name;
#pragma clang loop unroll(disable)
	for (int i = 0; i < DNS_NAME_MAX / 4; i++) {
		__u32 x = words[i];
		__u32 low7 = x & 0x7f7f7f7f;
		__u32 ge_a = low7 + 0x3f3f3f3f; /* top bit: low7 >= 'A' */
		__u32 gt_z = low7 + 0x25252525; /* top bit: low7 > 'Z' */
		words[i] = x | ((ge_a & ~gt_z & ~x & 0x80808080) >> 2); /* 0x80 >> 2 = 0x20 */
	}
	/* Type and class, after the name (qlen is at most 64 here). */
	__u8 *q = data + DNS_HDR_END + (qlen & (DNS_NAME_MAX * 2 - 1));
	if ((void *)(q + 4) > end)
		goto pass;
	if (q[0] != 0 || q[1] != 1 || q[2] != 0 || q[3] != 1)
		goto pass; /* not A / IN */
	struct dns_answer *a = bpf_map_lookup_elem(&dns, &k);
	if (!a)
		goto pass;
	struct dns_answer ans = *a;
	__u8 ra = (config_flags() & CFG_DNS_RA) ? 0x80 : 0;

	/* The reply: the query with QR, AA (and RA as the server says), one
	 * answer (a pointer to the question's name, A, IN, TTL, the address). */
	if (bpf_skb_change_tail(skb, skb->len + DNS_RR_LEN, 0))
		goto pass;
	data = skb_data(skb);
	end = skb_end(skb);
	if (data + DNS_HDR_END > end)
		return TC_ACT_SHOT;
	__u8 *rr = data + DNS_UDP_OFF + (ulen & 0x7f);
	if ((void *)(rr + DNS_RR_LEN) > end)
		return TC_ACT_SHOT;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN_;
	udp = data + DNS_UDP_OFF;
	h = data + DNS_UDP_OFF + 8;

	__u8 mac[ETH_ALEN];
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
	__u32 a4 = ip->saddr;
	ip->saddr = ip->daddr;
	ip->daddr = a4;
	ip->tot_len = bpf_htons(bpf_ntohs(ip->tot_len) + DNS_RR_LEN);
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
	__u16 port = udp->source;
	udp->source = udp->dest;
	udp->dest = port;
	udp->len = bpf_htons(ulen + DNS_RR_LEN);
	udp->check = 0; /* optional over IPv4 */
	h[2] = 0x80 | 0x04 | rd;
	h[3] = ra;
	h[7] = 1;
	rr[0] = 0xc0;
	rr[1] = 0x0c;
	rr[2] = 0;
	rr[3] = 1;
	rr[4] = 0;
	rr[5] = 1;
	__u32 ttl = bpf_htonl(ans.ttl);
	__builtin_memcpy(&rr[6], &ttl, 4);
	rr[10] = 0;
	rr[11] = 4;
	__builtin_memcpy(&rr[12], &ans.ip, 4);
	dns_count(1);
	return 1;
pass:
	dns_count(0);
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
	struct rnat_key rk = { .client = f->saddr, .backend = ep->gateway, .cport = f->sport, .bport = f->dport, .proto = f->proto };
	struct rnat_value *rv = bpf_map_lookup_elem(&rnat, &rk);
	if (!rv || rv->vip != f->daddr) {
		struct rnat_value nv = { .vip = f->daddr, .vport = f->dport };
		bpf_map_update_elem(&rnat, &rk, &nv, BPF_ANY);
	}
	if (rewrite(skb, f, 1, f->daddr, ep->gateway, f->dport, f->dport))
		return drop(c, DROP_MALFORMED, skb->ifindex, f);
	if (bpf_skb_store_bytes(skb, 0, ep->gw_mac, ETH_ALEN, 0))
		return drop(c, DROP_MALFORMED, skb->ifindex, f);
	return TC_ACT_OK;
}

SEC("classifier")
int trellis_from_endpoint(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct endpoint_info *ep = bpf_map_lookup_elem(&endpoints, &ifindex);
	if (!ep)
		return TC_ACT_OK; /* not an endpoint the agent programmed */
	struct endpoint_counters *c = counters_of(ifindex);
	if (c) {
		c->from_packets += 1;
		c->from_bytes += skb->len;
	}

	void *data = skb_data(skb);
	void *end = skb_end(skb);
	struct flow f = {};
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return drop(c, DROP_MALFORMED, ifindex, &f);
	struct iphdr *ip4 = (void *)(eth + 1);
	if (eth->h_proto == bpf_htons(ETH_P_IP) && (void *)(ip4 + 1) <= end)
		parse_flow(ip4, data, end, &f);
	if (!mac_eq(eth->h_source, ep->mac))
		return drop(c, DROP_SPOOF_MAC, ifindex, &f);

	switch (eth->h_proto) {
	case bpf_htons(ETH_P_IP): {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return drop(c, DROP_MALFORMED, ifindex, &f);
		if (ip->saddr != ep->ip)
			return drop(c, DROP_SPOOF_IP, ifindex, &f);
		__u32 daddr = ip->daddr;
		int dns_query = f.proto == PROTO_UDP && f.dport == bpf_htons(53) && f.l4off &&
				(ep->flags & EP_DNS_FAST) && (config_flags() & CFG_DNS_KERNEL);
		/* A query to the network's resolver first: answered here, it
		 * needs none of the lookups below. */
		if (dns_query && daddr == ep->gateway && trellis_dns_fast(skb, ep->net_id, f.l4off) > 0)
			return answer_dns(skb, c);
		struct vip_info *v = bpf_map_lookup_elem(&vips, &daddr);
		if (v) {
			if (v->net_id != ep->net_id)
				return drop(c, DROP_ISOLATION, ifindex, &f);
			struct vip_info vv = *v;
			return to_vip(skb, c, &vv, &f);
		}
		/* A flow that is not to a VIP now owns its addresses and ports: a
		 * reverse translation left by an earlier VIP flow with the same
		 * client port must not rewrite its replies. */
		if ((f.proto == PROTO_TCP && f.syn) || f.proto == PROTO_UDP) {
			struct rnat_key stale = { .client = f.saddr, .backend = daddr, .cport = f.sport, .bport = f.dport, .proto = f.proto };
			/* Looked up first: the lookup takes no lock, a delete does. */
			if (bpf_map_lookup_elem(&rnat, &stale))
				bpf_map_delete_elem(&rnat, &stale);
		}
		struct net_key nk = { .prefixlen = 32, .ip = daddr };
		struct net_info *n = bpf_map_lookup_elem(&nets, &nk);
		if (n) {
			if (n->net_id != ep->net_id)
				return drop(c, DROP_ISOLATION, ifindex, &f);
		} else if ((ep->flags & EP_DNS) && ep->gateway && f.dport == bpf_htons(53) && f.l4off &&
			   (f.proto == PROTO_UDP || f.proto == PROTO_TCP)) {
			/* DNS to a resolver outside Trellis (one an engine wrote
			 * into the container): answered here when it can be,
			 * else by the agent at the gateway, the reply coming back
			 * from the address asked. */
			struct endpoint_info e = *ep;
			if (dns_query && trellis_dns_fast(skb, e.net_id, f.l4off) > 0)
				return answer_dns(skb, c);
			return to_gateway_dns(skb, c, &e, &f);
		} else if (ep->flags & EP_INTERNAL) {
			/* Nothing else leaves an internal network. */
			return drop(c, DROP_ISOLATION, ifindex, &f);
		}
		if (f.start)
			emit(ifindex, &f, 0, 0);
		return TC_ACT_OK;
	}
	case bpf_htons(ETH_P_ARP): {
		struct arp_hdr *arp = (void *)(eth + 1);
		struct arp_eth_ipv4 *body = (void *)(arp + 1);
		if ((void *)(body + 1) > end)
			return drop(c, DROP_MALFORMED, ifindex, &f);
		__u32 sip = 0, tip = 0;
		__builtin_memcpy(&sip, body->sip, 4);
		__builtin_memcpy(&tip, body->tip, 4);
		if (!mac_eq(body->sha, ep->mac) || sip != ep->ip)
			return drop(c, DROP_SPOOF_ARP, ifindex, &f);
		if (arp->ar_op == bpf_htons(ARP_REQUEST)) {
			struct vip_info *v = bpf_map_lookup_elem(&vips, &tip);
			if (v && v->net_id == ep->net_id)
				return arp_reply(skb, tip);
		}
		return TC_ACT_OK;
	}
	case bpf_htons(ETH_P_IPV6): {
		/* No IPv6 addresses are assigned yet: only the kernel's own
		 * link-local and unspecified sources may pass. */
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end)
			return drop(c, DROP_MALFORMED, ifindex, &f);
		__u8 b0 = ip6->saddr.in6_u.u6_addr8[0];
		__u8 b1 = ip6->saddr.in6_u.u6_addr8[1];
		int link_local = b0 == 0xfe && (b1 & 0xc0) == 0x80;
		int unspecified = ip6->saddr.in6_u.u6_addr32[0] == 0 && ip6->saddr.in6_u.u6_addr32[1] == 0 &&
				  ip6->saddr.in6_u.u6_addr32[2] == 0 && ip6->saddr.in6_u.u6_addr32[3] == 0;
		if (!link_local && !unspecified)
			return drop(c, DROP_SPOOF_IPV6, ifindex, &f);
		return TC_ACT_OK;
	}
	default:
		return TC_ACT_OK;
	}
}

SEC("classifier")
int trellis_to_endpoint(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct endpoint_info *ep = bpf_map_lookup_elem(&endpoints, &ifindex);
	if (!ep)
		return TC_ACT_OK;
	struct endpoint_counters *c = counters_of(ifindex);
	if (c) {
		c->to_packets += 1;
		c->to_bytes += skb->len;
	}
	void *data = skb_data(skb);
	void *end = skb_end(skb);
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return TC_ACT_OK;
	struct flow f = {};
	parse_flow(ip, data, end, &f);
	if ((f.proto != PROTO_TCP && f.proto != PROTO_UDP) || !f.l4off)
		return TC_ACT_OK;
	struct rnat_key rk = { .client = f.daddr, .backend = f.saddr, .cport = f.dport, .bport = f.sport, .proto = f.proto };
	struct rnat_value *rv = bpf_map_lookup_elem(&rnat, &rk);
	if (!rv)
		return TC_ACT_OK;
	struct rnat_value v = *rv;
	if (rewrite(skb, &f, 0, f.saddr, v.vip, f.sport, v.vport))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

char _license[] SEC("license") = "Dual BSD/GPL";
