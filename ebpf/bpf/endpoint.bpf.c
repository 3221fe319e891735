// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Runs on the host side of every endpoint veth, on packets the endpoint
 * sends: anti-spoofing (source MAC, IPv4 source, ARP sender) and
 * per-endpoint counters with drop reasons. */
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

/* The ICMP header's start (linux/icmp.h pulls in libc headers). */
struct icmp_hdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
};
#define ICMP_ECHO_REQUEST 8

/* IP protocol numbers (linux/in.h pulls in libc headers). */
#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17

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

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] && a[5] == b[5];
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

/* The addresses and ports of an IPv4 packet, for events. */
struct flow {
	__u32 saddr, daddr;
	__u16 sport, dport;
	__u8 proto;
	__u8 start; /* a TCP SYN or an ICMP echo request */
};

static __always_inline void parse_flow(struct iphdr *ip, void *end, struct flow *f)
{
	f->saddr = ip->saddr;
	f->daddr = ip->daddr;
	f->proto = ip->protocol;
	void *l4 = (void *)ip + ip->ihl * 4;
	if (ip->protocol == PROTO_TCP) {
		struct tcphdr *t = l4;
		if ((void *)(t + 1) <= end) {
			f->sport = t->source;
			f->dport = t->dest;
			f->start = t->syn && !t->ack;
		}
	} else if (ip->protocol == PROTO_UDP) {
		struct udphdr *u = l4;
		if ((void *)(u + 1) <= end) {
			f->sport = u->source;
			f->dport = u->dest;
		}
	} else if (ip->protocol == PROTO_ICMP) {
		struct icmp_hdr *i = l4;
		if ((void *)(i + 1) <= end)
			f->start = i->type == ICMP_ECHO_REQUEST;
	}
}

static __always_inline void emit(__u32 ifindex, const struct flow *f, __u8 verdict, __u8 reason)
{
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

	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct flow f = {};
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return drop(c, DROP_MALFORMED, ifindex, &f);
	struct iphdr *ip4 = (void *)(eth + 1);
	if (eth->h_proto == bpf_htons(ETH_P_IP) && (void *)(ip4 + 1) <= end)
		parse_flow(ip4, end, &f);
	if (!mac_eq(eth->h_source, ep->mac))
		return drop(c, DROP_SPOOF_MAC, ifindex, &f);

	switch (eth->h_proto) {
	case bpf_htons(ETH_P_IP): {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return drop(c, DROP_MALFORMED, ifindex, &f);
		if (ip->saddr != ep->ip)
			return drop(c, DROP_SPOOF_IP, ifindex, &f);
		if (f.start)
			emit(ifindex, &f, 0, 0);
		return TC_ACT_OK;
	}
	case bpf_htons(ETH_P_ARP): {
		struct arp_hdr *arp = (void *)(eth + 1);
		struct arp_eth_ipv4 *body = (void *)(arp + 1);
		if ((void *)(body + 1) > end)
			return drop(c, DROP_MALFORMED, ifindex, &f);
		__u32 sip = 0;
		__builtin_memcpy(&sip, body->sip, 4);
		if (!mac_eq(body->sha, ep->mac) || sip != ep->ip)
			return drop(c, DROP_SPOOF_ARP, ifindex, &f);
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

char _license[] SEC("license") = "Dual BSD/GPL";
