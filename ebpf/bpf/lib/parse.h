/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Packet parsing: the kernel headers the programs build on, the protocol
 * headers and numbers the uapi headers cannot give without libc (ICMP
 * echo, IP protocols), fixed offsets into an IPv4 frame, skb->data and
 * data_end loaded so that the verifier accepts them, and `struct flow`:
 * the addresses, ports and kind of an IPv4 or IPv6 packet (parse_flow,
 * parse_flow6). */
#ifndef TRELLIS_LIB_PARSE_H
#define TRELLIS_LIB_PARSE_H

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

#define ETH_HLEN_ 14
#define IP_CSUM_OFF (ETH_HLEN_ + __builtin_offsetof(struct iphdr, check))
#define IP_DST_OFF (ETH_HLEN_ + __builtin_offsetof(struct iphdr, daddr))
#define IP_SRC_OFF (ETH_HLEN_ + __builtin_offsetof(struct iphdr, saddr))

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

/* The addresses and ports of an IPv4 or IPv6 packet, for events and
 * services. */
struct flow {
	__u32 saddr, daddr; /* IPv4 */
	__u16 sport, dport;
	__u8 proto;
	__u8 start; /* a TCP SYN or an ICMP/ICMPv6 echo request */
	__u8 syn;
	__u8 echo;
	__u32 l4off; /* from the start of the frame; 0 if no L4 header */
	__u8 fin;    /* TCP flags the connection tables follow */
	__u8 rst;
	__u8 ack;
	__u8 family; /* 4, 6 (then it is a struct flow6's), 0: not parsed */
};

/* The same of an IPv6 packet, with its addresses (kept off the endpoint
 * program's stack: see v6_scratch, lb6.h). */
struct flow6 {
	struct flow f;
	__u8 saddr[16], daddr[16];
};

/* The ports and kind of the L4 header at `l4` (protocol `proto`; an echo
 * request is ICMP's `echo_type` of protocol `icmp`), if it is whole. */
static __always_inline void parse_l4(void *l4, void *data, void *end, __u8 proto, __u8 icmp, __u8 echo_type,
				     struct flow *f)
{
	if (proto == PROTO_TCP) {
		struct tcphdr *t = l4;
		if ((void *)(t + 1) <= end) {
			f->sport = t->source;
			f->dport = t->dest;
			f->syn = t->syn && !t->ack;
			f->start = f->syn;
			f->fin = t->fin;
			f->rst = t->rst;
			f->ack = t->ack;
			f->l4off = l4 - data;
		}
	} else if (proto == PROTO_UDP) {
		struct udphdr *u = l4;
		if ((void *)(u + 1) <= end) {
			f->sport = u->source;
			f->dport = u->dest;
			f->l4off = l4 - data;
		}
	} else if (proto == icmp) {
		struct icmp_hdr *i = l4;
		if ((void *)(i + 1) <= end) {
			f->echo = i->type == echo_type && i->code == 0;
			f->start = f->echo;
			f->l4off = l4 - data;
		}
	}
}

static __always_inline void parse_flow(struct iphdr *ip, void *data, void *end, struct flow *f)
{
	f->family = 4;
	f->saddr = ip->saddr;
	f->daddr = ip->daddr;
	f->proto = ip->protocol;
	if (ip->ihl < 5)
		return;
	parse_l4((void *)ip + ip->ihl * 4, data, end, ip->protocol, PROTO_ICMP, ICMP_ECHO_REQUEST, f);
}

/* The addresses, ports and kind of an IPv6 packet into `f6` (ports and
 * flags only when its TCP, UDP or ICMPv6 header follows the fixed
 * header). */
static __always_inline void parse_flow6(struct ipv6hdr *ip6, void *data, void *end, struct flow6 *f6)
{
	struct flow *f = &f6->f;
	__builtin_memset(f6, 0, sizeof(*f6));
	f->family = 6;
	__builtin_memcpy(f6->saddr, ip6->saddr.in6_u.u6_addr8, 16);
	__builtin_memcpy(f6->daddr, ip6->daddr.in6_u.u6_addr8, 16);
	f->proto = ip6->nexthdr;
	parse_l4((void *)(ip6 + 1), data, end, ip6->nexthdr, 58 /* ICMPv6 */, 128 /* echo request */, f);
}

#endif
