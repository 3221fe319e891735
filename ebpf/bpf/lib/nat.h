/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Address translation: rewrite one address and port of an IPv4 TCP/UDP
 * packet with its IP and L4 checksums (the DNAT to a backend, the reverse
 * translation of its replies, DNS sent to the gateway), and the checksum
 * fold the answers built from scratch use. */
#ifndef TRELLIS_LIB_NAT_H
#define TRELLIS_LIB_NAT_H

#include "parse.h"

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
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

#endif
