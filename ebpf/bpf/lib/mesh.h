/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The routing mesh: a port published for a service is accepted on every
 * host, from outside, and each new connection goes to a backend chosen by
 * the service's Maglev table (the VIP's), on this host or another one,
 * with the client's address kept.
 *
 *   uplink, loopback     a packet to one of this host's addresses on a
 *   (tc ingress)         published port (from outside, or from the host
 *                        itself over the loopback): DNAT to the backend,
 *                        remembered in `ct` and `mesh`, sent into the
 *                        network's bridge from this host's mesh MAC (the
 *                        bridge forwards it to a local veth or over the
 *                        tunnel).
 *   backend's veth       what arrives from another host's mesh MAC is
 *   (to the endpoint)    remembered (MESH_RETURN): the backend's replies
 *                        go back to that MAC, over the tunnel, not out of
 *                        this host.
 *   backend's veth       a reply of a flow this host took: translated back
 *   (from the endpoint)  and sent out of the uplink it came in on, to the
 *                        MAC it came from; of a flow another host took: to
 *                        that host's mesh MAC.
 *   tunnel (tc ingress)  a reply to this host's mesh MAC: translated back
 *                        and sent out of the uplink.
 * Nothing here touches the host's routing, netfilter or conntrack: the
 * client talks to one address throughout and the backend sees the client's.
 * A port with no backend is left to the host's stack, where nothing
 * listens on it: TCP is reset, UDP gets ICMP port unreachable. */
#ifndef TRELLIS_LIB_MESH_H
#define TRELLIS_LIB_MESH_H

#include "lb.h"
#include "maps.h"
#include "nat.h"
#include "parse.h"

/* The first two octets of every host's mesh MAC. */
#define MESH_MAC0 0x06
#define MESH_MAC1 0x7e

static __always_inline struct mesh_config *mesh_config_of(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&mesh_config, &zero);
}

/* A reply of a connection this host took (`mf`, MESH_INGRESS): from the
 * address and port the client asked, out of the interface the connection
 * came in on, to the MAC it came from. */
static __always_inline int mesh_reply(struct __sk_buff *skb, const struct flow *f, const struct mesh_flow *mf)
{
	struct mesh_flow m = *mf;
	if (rewrite(skb, f, 0, f->saddr, m.addr, f->sport, m.port))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, m.peer_mac, ETH_ALEN, 0) ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, m.own_mac, ETH_ALEN, 0))
		return TC_ACT_SHOT;
	/* It came to a MAC not the receiving device's (the gateway's, this
	 * host's mesh MAC): "other host" to the kernel, which the loopback
	 * keeps and the host's stack then drops. It is for the host now. */
	bpf_skb_change_type(skb, 0 /* PACKET_HOST */);
	return bpf_redirect(m.ifindex, 0);
}

/* The key of `mesh` for a packet the backend sends (`f`). */
static __always_inline struct rnat_key mesh_key_of_reply(const struct flow *f)
{
	struct rnat_key k = { .client = f->daddr, .backend = f->saddr, .cport = f->dport, .bport = f->sport, .proto = f->proto };
	return k;
}

/* tc ingress of an uplink. */
static __always_inline int mesh_from_uplink(struct __sk_buff *skb)
{
	void *data = skb_data(skb);
	void *end = skb_end(skb);
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return TC_ACT_OK;
	if (ip->frag_off & bpf_htons(0x3fff))
		return TC_ACT_OK; /* fragments: the host's */
	struct flow f = {};
	parse_flow(ip, data, end, &f);
	if ((f.proto != PROTO_TCP && f.proto != PROTO_UDP) || !f.l4off)
		return TC_ACT_OK;
	if (!bpf_map_lookup_elem(&mesh_addrs, &f.daddr))
		return TC_ACT_OK;
	struct pub_key pk = { .port = f.dport, .proto = f.proto };
	struct pub_info *p = bpf_map_lookup_elem(&published, &pk);
	if (!p)
		return TC_ACT_OK;
	struct pub_info pub = *p;
	/* Only what starts a connection here starts one: a TCP segment past
	 * the SYN with no connection of the mesh belongs to the host (a reply
	 * to one of its own connections whose local port is the published
	 * one, or on the loopback a reply to a client of the host's own),
	 * and so does a UDP datagram for a socket of the host. */
	if (f.proto == PROTO_TCP && !f.syn) {
		struct ct_key ck = { .client = f.saddr, .vip = f.daddr, .cport = f.sport, .vport = f.dport, .proto = f.proto };
		if (!bpf_map_lookup_elem(&ct, &ck))
			return TC_ACT_OK;
	} else if (f.proto == PROTO_UDP) {
		struct bpf_sock_tuple t = {};
		t.ipv4.saddr = f.saddr;
		t.ipv4.daddr = f.daddr;
		t.ipv4.sport = f.sport;
		t.ipv4.dport = f.dport;
		struct bpf_sock *sk = bpf_sk_lookup_udp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
		if (sk) {
			bpf_sk_release(sk);
			return TC_ACT_OK;
		}
	}
	struct mesh_config *mc = mesh_config_of();
	if (!mc)
		return TC_ACT_OK;
	__u8 mesh_mac[ETH_ALEN];
	__builtin_memcpy(mesh_mac, mc->mac, ETH_ALEN);
	struct ct_value cv = {};
	int chosen = select_backend(skb, &f, pub.id, pub.count, pub.target_port, &cv, &ct);
	if (chosen != SELECT_OK) {
		if (chosen == SELECT_LEFT) {
			struct svc_stats *st = stats_of(pub.id);
			if (st)
				st->resets += 1;
		}
		/* Nothing listens on the port here: the host refuses it. */
		return TC_ACT_OK;
	}
	struct rnat_key mk = { .client = f.saddr, .backend = cv.backend, .cport = f.sport, .bport = cv.bport, .proto = f.proto };
	struct mesh_flow mf = { .addr = f.daddr, .port = f.dport, .kind = MESH_INGRESS, .ifindex = skb->ifindex };
	__builtin_memcpy(mf.peer_mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(mf.own_mac, eth->h_dest, ETH_ALEN);
	struct mesh_flow *had = bpf_map_lookup_elem(&mesh, &mk);
	if (!had || had->kind != MESH_INGRESS || had->addr != mf.addr || had->port != mf.port ||
	    had->ifindex != mf.ifindex || !mac_eq(had->peer_mac, mf.peer_mac) || !mac_eq(had->own_mac, mf.own_mac))
		bpf_map_update_elem(&mesh, &mk, &mf, BPF_ANY);
	if (rewrite(skb, &f, 1, f.daddr, cv.backend, f.dport, cv.bport))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, cv.mac, ETH_ALEN, 0) || bpf_skb_store_bytes(skb, ETH_ALEN, mesh_mac, ETH_ALEN, 0))
		return TC_ACT_SHOT;
	return bpf_redirect(pub.bridge, 0);
}

/* A TCP/UDP packet an endpoint sends out of Trellis (`f`): a backend's
 * reply to a mesh connection goes back the way the connection came.
 * Returns -1 when it is none. */
static __always_inline int mesh_from_endpoint(struct __sk_buff *skb, const struct flow *f)
{
	if (!(config_flags() & CFG_MESH))
		return -1;
	struct rnat_key k = mesh_key_of_reply(f);
	struct mesh_flow *mf = bpf_map_lookup_elem(&mesh, &k);
	if (!mf)
		return -1;
	if (mf->kind == MESH_INGRESS)
		return mesh_reply(skb, f, mf);
	__u8 back[ETH_ALEN];
	__builtin_memcpy(back, mf->peer_mac, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, 0, back, ETH_ALEN, 0))
		return TC_ACT_SHOT;
	return TC_ACT_OK; /* the bridge sends it over the tunnel */
}

/* A TCP/UDP packet to an endpoint (`f`): one another host's mesh sent is
 * remembered, so that its replies go back there. A connection that starts
 * otherwise (a TCP SYN, any UDP datagram not from a mesh MAC) owns its
 * addresses and ports from then on: an entry an earlier mesh connection
 * with the same ones left must not steer its replies. */
static __always_inline void mesh_to_endpoint(struct __sk_buff *skb, const struct flow *f)
{
	if (!(config_flags() & CFG_MESH))
		return;
	void *data = skb_data(skb);
	void *end = skb_end(skb);
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return;
	int starts = f->proto == PROTO_UDP || (f->proto == PROTO_TCP && f->syn);
	struct rnat_key k = { .client = f->saddr, .backend = f->daddr, .cport = f->sport, .bport = f->dport, .proto = f->proto };
	if (eth->h_source[0] != MESH_MAC0 || eth->h_source[1] != MESH_MAC1) {
		/* Looked up first: the lookup takes no lock, a delete does. */
		if (starts && bpf_map_lookup_elem(&mesh, &k))
			bpf_map_delete_elem(&mesh, &k);
		return;
	}
	__u8 from[ETH_ALEN];
	__builtin_memcpy(from, eth->h_source, ETH_ALEN);
	struct mesh_config *mc = mesh_config_of();
	if (mc && mac_eq(from, mc->mac))
		return; /* this host took it: its uplink program wrote the entry */
	struct mesh_flow *had = bpf_map_lookup_elem(&mesh, &k);
	if (had && had->kind == MESH_RETURN && mac_eq(had->peer_mac, from))
		return; /* known already */
	if (had && had->kind == MESH_INGRESS && !starts)
		return;
	struct mesh_flow mf = { .kind = MESH_RETURN };
	__builtin_memcpy(mf.peer_mac, from, ETH_ALEN);
	bpf_map_update_elem(&mesh, &k, &mf, BPF_ANY);
}

/* tc ingress of a network's VXLAN device: a backend's reply sent back to
 * this host's mesh MAC. Anything else to that MAC is dropped (the bridge
 * would flood it). */
static __always_inline int mesh_from_tunnel(struct __sk_buff *skb)
{
	void *data = skb_data(skb);
	void *end = skb_end(skb);
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_dest[0] != MESH_MAC0 || eth->h_dest[1] != MESH_MAC1)
		return TC_ACT_OK;
	struct mesh_config *mc = mesh_config_of();
	if (!mc || !mac_eq(eth->h_dest, mc->mac))
		return TC_ACT_OK;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_SHOT;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return TC_ACT_SHOT;
	struct flow f = {};
	parse_flow(ip, data, end, &f);
	if ((f.proto != PROTO_TCP && f.proto != PROTO_UDP) || !f.l4off)
		return TC_ACT_SHOT;
	struct rnat_key k = mesh_key_of_reply(&f);
	struct mesh_flow *mf = bpf_map_lookup_elem(&mesh, &k);
	if (!mf || mf->kind != MESH_INGRESS)
		return TC_ACT_SHOT;
	return mesh_reply(skb, &f, mf);
}

#endif
