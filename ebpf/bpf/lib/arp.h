/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* ARP: the header and IPv4-over-Ethernet body (linux/if_arp.h pulls in
 * libc headers), the MAC every VIP answers with, and the answer to an ARP
 * request for a VIP, made from the request in place. */
#ifndef TRELLIS_LIB_ARP_H
#define TRELLIS_LIB_ARP_H

#include "parse.h"

#define ARP_REQUEST 1
#define ARP_REPLY 2

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

/* The MAC a VIP answers ARP with: 02:42 and the address, the scheme of
 * every Trellis address (model::mac_for_ip). */
static __always_inline void vip_mac(__u32 vip, __u8 *mac)
{
	mac[0] = 0x02;
	mac[1] = 0x42;
	__builtin_memcpy(mac + 2, &vip, 4);
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

#endif
