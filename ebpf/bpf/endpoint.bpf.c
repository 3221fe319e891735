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
 *   reverse translation of backends' replies to the VIP (IPv4 and IPv6),
 *   counters.
 * trellis_from_uplink, trellis_from_tunnel: the routing mesh (mesh.h).
 *
 * This file holds the two entry points: the order of the checks above
 * (anti-spoofing and isolation are theirs, inline). The mechanics are in
 * lib/, one header per feature:
 *   parse.h     protocol headers, skb data pointers, struct flow
 *   maps.h      every map (layouts: include/trellis.h), config switches
 *   counters.h  per-endpoint, per-service and DNS counters
 *   events.h    monitor events (an endpoint's share of the ring), drop()
 *   flows.h     an endpoint's own connection and reverse-NAT tables
 *   nat.h       address/port rewriting with checksums
 *   arp.h       ARP headers, the VIP MAC, ARP answers for VIPs
 *   lb.h        service VIPs: ping/reset answers, Maglev, conntrack, DNAT,
 *               reverse NAT
 *   nat6.h      IPv6 rewriting, the reverse translation of IPv6 replies
 *   lb6.h       IPv6 service VIPs: NDP/ping/reset answers, Maglev, DNAT
 *   ndp.h       IPv6 neighbour discovery an endpoint may not send
 *   dns.h       the in-kernel DNS fast path, DNS redirected to the gateway
 *   mesh.h      the routing mesh: published ports on every host (the
 *               programs of uplinks and tunnels below, and the backends'
 *               side in the two endpoint programs) */
#include "lib/parse.h"
#include "lib/maps.h"
#include "lib/counters.h"
#include "lib/events.h"
#include "lib/flows.h"
#include "lib/nat.h"
#include "lib/arp.h"
#include "lib/ndp.h"
#include "lib/lb.h"
#include "lib/nat6.h"
#include "lib/lb6.h"
#include "lib/dns.h"
#include "lib/mesh.h"

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
		/* (An IPv6-only endpoint has no IPv4 address: it sends none.) */
		if (ip->saddr != ep->ip || !ep->ip)
			return drop(c, DROP_SPOOF_IP, ifindex, &f);
		__u32 daddr = ip->daddr;
		int verdict;
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
			return to_vip(skb, c, &vv, &f, ep->slot);
		}
		/* A flow that is not to a VIP now owns its addresses and ports: a
		 * reverse translation left by an earlier VIP flow with the same
		 * client port must not rewrite its replies. */
		if ((f.proto == PROTO_TCP && f.syn) || f.proto == PROTO_UDP) {
			struct rnat_key stale = { .client = f.saddr, .backend = daddr, .cport = f.sport, .bport = f.dport, .proto = f.proto };
			void *rnats = rnat_table_of(ep->slot);
			/* Looked up first: the lookup takes no lock, a delete does. */
			if (rnats && bpf_map_lookup_elem(rnats, &stale))
				bpf_map_delete_elem(rnats, &stale);
		}
		struct net_key nk = { .prefixlen = 32, .ip = daddr };
		struct net_info *n = bpf_map_lookup_elem(&nets, &nk);
		if (n) {
			if (n->net_id != ep->net_id)
				return drop(c, DROP_ISOLATION, ifindex, &f);
		} else if ((f.proto == PROTO_TCP || f.proto == PROTO_UDP) && f.l4off &&
			   (verdict = mesh_from_endpoint(skb, &f)) >= 0) {
			/* A backend's reply to a connection the mesh brought. */
			return verdict;
		} else if ((ep->flags & EP_DNS) && ep->gateway && f.dport == bpf_htons(53) && f.l4off &&
			   (f.proto == PROTO_UDP || f.proto == PROTO_TCP)) {
			/* DNS to a resolver outside Trellis (one an engine wrote
			 * into the container): answered here when it can be,
			 * else by the agent at the gateway, the reply coming back
			 * from the address asked. */
			if (dns_query && trellis_dns_fast(skb, ep->net_id, f.l4off) > 0)
				return answer_dns(skb, c);
			return to_gateway_dns(skb, c, ep, &f);
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
		if (!mac_eq(body->sha, ep->mac) || sip != ep->ip || !ep->ip)
			return drop(c, DROP_SPOOF_ARP, ifindex, &f);
		if (arp->ar_op == bpf_htons(ARP_REQUEST)) {
			struct vip_info *v = bpf_map_lookup_elem(&vips, &tip);
			if (v && v->net_id == ep->net_id)
				return arp_reply(skb, tip);
		}
		return TC_ACT_OK;
	}
	case bpf_htons(ETH_P_IPV6): {
		/* Its own link-local address, the unspecified one (DAD) and
		 * its IPv6 address on a dual-stack network; no neighbour
		 * advertisement for another's address, no router
		 * advertisement. */
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end)
			return drop(c, DROP_MALFORMED, ifindex, &f);
		/* Its addresses for the monitor, off the stack (lb6.h): parsed
		 * only while someone watches (events are sent only then). */
		struct v6_scratch *s6 = v6_scratch_get();
		struct flow6 *f6 = s6 && (config_flags() & CFG_EVENTS) ? &s6->f6 : 0;
		if (f6)
			parse_flow6(ip6, data, end, f6);
		const __u8 *src = ip6->saddr.in6_u.u6_addr8;
		int unspecified = ip6->saddr.in6_u.u6_addr32[0] == 0 && ip6->saddr.in6_u.u6_addr32[1] == 0 &&
				  ip6->saddr.in6_u.u6_addr32[2] == 0 && ip6->saddr.in6_u.u6_addr32[3] == 0;
		if (!unspecified && !own_link_local(src, ep->mac) && !own_ip6(src, ep))
			return drop6(c, DROP_SPOOF_IPV6, ifindex, f6);
		if (ndp_spoofed(ip6, end, ep))
			return drop6(c, DROP_SPOOF_IPV6, ifindex, f6);
		/* A plain query over UDP to the network's resolver, its IPv6
		 * gateway: answered here when it can be, as over IPv4. */
		int dns6_fast = ip6->nexthdr == PROTO_UDP && (ep->flags & EP_DNS_FAST) && (config_flags() & CFG_DNS_KERNEL);
		__u16 *ports6 = (void *)(ip6 + 1);
		if (dns6_fast && ((void *)(ports6 + 2) > end || ports6[1] != bpf_htons(53)))
			dns6_fast = 0;
		if (dns6_fast && addr6_eq(ip6->daddr.in6_u.u6_addr8, ep->gw6) &&
		    trellis_dns_fast(skb, ep->net_id, DNS_UDP_OFF6) > 0)
			return answer_dns(skb, c);
		/* To an IPv6 VIP (or soliciting one's address): lb6.h. */
		int vip6 = vip6_from_endpoint(skb, ep, c);
		if (vip6 != VIP6_NOT)
			return vip6;
		data = skb_data(skb);
		end = skb_end(skb);
		ip6 = data + ETH_HLEN_;
		if ((void *)(ip6 + 1) > end)
			return drop6(c, DROP_MALFORMED, ifindex, f6);
		/* Isolation: nothing to another network's IPv6 subnet; from an
		 * internal network nothing but link-local and multicast beyond
		 * its own. */
		int verdict6;
		struct net6_key k6 = {.prefixlen = 128};
		__builtin_memcpy(k6.ip, &ip6->daddr, 16);
		struct net_info *n6 = bpf_map_lookup_elem(&nets6, &k6);
		if (!n6 && (ep->flags & EP_DNS) && dns6_fast && own_ip6(ip6->saddr.in6_u.u6_addr8, ep)) {
			/* To a resolver outside Trellis: answered here too when it
			 * can be, from the address asked. */
			if (trellis_dns_fast(skb, ep->net_id, DNS_UDP_OFF6) > 0)
				return answer_dns(skb, c);
			data = skb_data(skb);
			end = skb_end(skb);
			ip6 = data + ETH_HLEN_;
			if ((void *)(ip6 + 1) > end)
				return drop6(c, DROP_MALFORMED, ifindex, f6);
		}
		if (n6) {
			if (n6->net_id != ep->net_id)
				return drop6(c, DROP_ISOLATION, ifindex, f6);
		} else if ((ep->flags & EP_DNS) && (verdict6 = to_gateway_dns6(skb, ep)) != DNS6_NOT_QUERY) {
			/* DNS to a resolver outside Trellis, over IPv6: to the
			 * gateway's IPv6 address, as over IPv4. */
			if (verdict6 == DNS6_TABLE_FULL) {
				table_full(c, TABLE_RNAT);
				return drop6(c, DROP_TABLE_FULL, ifindex, f6);
			}
			if (verdict6 != DNS6_SENT)
				return drop6(c, DROP_MALFORMED, ifindex, f6);
			return TC_ACT_OK;
		} else if (ep->flags & EP_INTERNAL) {
			__u8 d0 = ip6->daddr.in6_u.u6_addr8[0];
			__u8 d1 = ip6->daddr.in6_u.u6_addr8[1];
			if (d0 != 0xff && !(d0 == 0xfe && (d1 & 0xc0) == 0x80))
				return drop6(c, DROP_ISOLATION, ifindex, f6);
		}
		if (f6 && f6->f.start)
			emit6(ifindex, f6, 0, 0);
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
	if ((void *)(eth + 1) > end)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return reverse6(skb, ep);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return TC_ACT_OK;
	struct flow f = {};
	parse_flow(ip, data, end, &f);
	if ((f.proto != PROTO_TCP && f.proto != PROTO_UDP) || !f.l4off)
		return TC_ACT_OK;
	mesh_to_endpoint(skb, &f);
	return reverse_nat(skb, &f, ep->slot);
}

/* tc ingress of the host's uplink: the routing mesh's published ports. */
SEC("classifier")
int trellis_from_uplink(struct __sk_buff *skb)
{
	return mesh_from_uplink(skb);
}

/* tc ingress of a network's VXLAN device: replies coming back to this
 * host's mesh MAC. */
SEC("classifier")
int trellis_from_tunnel(struct __sk_buff *skb)
{
	return mesh_from_tunnel(skb);
}

char _license[] SEC("license") = "Dual BSD/GPL";
