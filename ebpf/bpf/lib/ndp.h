/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* IPv6 from an endpoint: the addresses it may send from, and the neighbour
 * discovery messages it may send (no advertisement of another's address,
 * no router advertisement: a container is no router), behind extension
 * headers too. */
#ifndef TRELLIS_LIB_NDP_H
#define TRELLIS_LIB_NDP_H

#include "parse.h"

#define ICMPV6_ROUTER_ADVERT 134
#define ICMPV6_NEIGH_ADVERT 136
#define NEXTHDR_ICMPV6 58

/* `a` is the endpoint's link-local address: fe80::/64 and the modified
 * EUI-64 of its MAC, what the kernel gives it (the agent sets the
 * container interface's addr_gen_mode to EUI-64). */
static __always_inline int own_link_local(const __u8 *a, const __u8 *mac)
{
	return a[0] == 0xfe && a[1] == 0x80 && !(a[2] | a[3] | a[4] | a[5] | a[6] | a[7]) && a[8] == (mac[0] ^ 2) &&
	       a[9] == mac[1] && a[10] == mac[2] && a[11] == 0xff && a[12] == 0xfe && a[13] == mac[3] &&
	       a[14] == mac[4] && a[15] == mac[5];
}

/* `a` is the endpoint's IPv6 address (read in place from the map value:
 * no copy on the program's stack, which is near its limit). */
static __always_inline int own_ip6(const __u8 *a, const struct endpoint_info *ep)
{
	const __u32 *own = (const __u32 *)ep->ip6;
	const __u32 *x = (const __u32 *)a;
	return (own[0] | own[1] | own[2] | own[3]) && x[0] == own[0] && x[1] == own[1] && x[2] == own[2] &&
	       x[3] == own[3];
}

/* IPv6 extension headers an NDP message may hide behind (hop-by-hop,
 * routing, destination options; a fragmented NDP message the kernel drops
 * itself, RFC 6980), and how many of them the program walks: a longer
 * chain before an ICMPv6 message is dropped rather than left unread. */
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_DEST 60
#define EXT_HDRS_MAX 4

static __always_inline int ext_hdr(__u8 nh)
{
	return nh == NEXTHDR_HOP || nh == NEXTHDR_ROUTING || nh == NEXTHDR_DEST;
}

/* An ICMPv6 message the endpoint may not send, right after the header or
 * behind extension headers: a neighbour advertisement for an address not
 * its own, or a router advertisement. A chain of extension headers too
 * long to walk, or cut short, counts as one. */
static __always_inline int ndp_spoofed(const struct ipv6hdr *ip6, const void *end, const struct endpoint_info *ep)
{
	__u8 nh = ip6->nexthdr;
	const __u8 *icmp = (const void *)(ip6 + 1);
#pragma unroll
	for (int i = 0; i < EXT_HDRS_MAX; i++) {
		if (!ext_hdr(nh))
			break;
		if ((const void *)(icmp + 2) > end)
			return 1;
		nh = icmp[0];
		icmp += ((__u32)icmp[1] + 1) * 8;
	}
	if (ext_hdr(nh))
		return 1;
	if (nh != NEXTHDR_ICMPV6)
		return 0;
	if ((const void *)(icmp + 1) > end)
		return 0;
	if (icmp[0] == ICMPV6_ROUTER_ADVERT)
		return 1;
	if (icmp[0] != ICMPV6_NEIGH_ADVERT)
		return 0;
	if ((const void *)(icmp + 24) > end)
		return 1; /* an advertisement too short to carry its target */
	const __u8 *target = icmp + 8;
	return !own_ip6(target, ep) && !own_link_local(target, ep->mac);
}

#endif
