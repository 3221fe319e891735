/* Map layouts shared by the Trellis eBPF programs and the Rust loader
 * (ebpf/src/lib.rs mirrors every struct with #[repr(C)] and checks the same
 * sizes and offsets in its tests). Addresses and ports are in network byte
 * order everywhere. */
#ifndef TRELLIS_H
#define TRELLIS_H

#include <linux/types.h>

/* endpoint_info.flags */
#define EP_INTERNAL 1 /* its network is --internal: nothing leaves it */
#define EP_DNS 2      /* the agent answers DNS on the gateway: queries to
		       * resolvers outside Trellis are sent there */
#define EP_DNS_FAST 4 /* its container is on this network only: its plain
		       * A and AAAA queries (over IPv4 or IPv6) may be
		       * answered from the `dns` map */

/* What the datapath knows of an endpoint, keyed by the ifindex of its
 * host-side veth. */
struct endpoint_info {
	__u32 ip;      /* IPv4 address */
	__u8 mac[6];   /* the endpoint's MAC */
	__u16 pad;
	__u32 net_id;  /* the network's VNI */
	__u32 flags;   /* EP_* */
	__u32 gateway; /* the network's gateway (its DNS server), 0: none */
	__u8 gw_mac[6];
	__u16 pad2;
	__u8 ip6[16];  /* its IPv6 address on a dual-stack network; all zero: none */
	__u8 gw6[16];  /* the network's IPv6 gateway (DNS over IPv6 to outside
			* resolvers goes there); all zero: none */
	__u32 slot;    /* its own tables' key in ep_ct, ep_rnat, ep_flows6 (0: none) */
	__u32 pad3;
};

/* Why a packet was dropped (index into endpoint_counters.drops). */
enum drop_reason {
	DROP_SPOOF_MAC = 0,
	DROP_SPOOF_IP = 1,
	DROP_SPOOF_ARP = 2,
	DROP_SPOOF_IPV6 = 3,
	DROP_MALFORMED = 4,
	DROP_ISOLATION = 5,   /* aimed at another network (or out of an internal one) */
	DROP_NO_SERVICE = 6,  /* a VIP port no service has */
	DROP_NO_BACKEND = 7,  /* a service with no backend (or a flow whose backend left) */
	DROP_TABLE_FULL = 8,  /* a new flow while the endpoint's own flow table is full */
	DROP_REASONS = 9,
};

/* The tables an endpoint has a share of (index into endpoint_counters.full). */
enum table {
	TABLE_CT = 0,     /* its connections to VIPs (ep_ct) */
	TABLE_RNAT = 1,   /* their reverse translations (ep_rnat) */
	TABLE_EVENTS = 2, /* the monitor's ring buffer */
	TABLES = 3,
};

/* Per endpoint and per CPU. "from" is traffic the endpoint sends. */
struct endpoint_counters {
	__u64 from_packets;
	__u64 from_bytes;
	__u64 to_packets;
	__u64 to_bytes;
	__u64 drops[DROP_REASONS];
	__u64 full[TABLES]; /* times its share of a table was spent (enum table) */
};

/* One event of the monitor ring buffer: a drop, or the start of a flow
 * (a TCP SYN, an ICMP or ICMPv6 echo request) that passed. */
struct flow_event {
	__u32 ifindex;
	__u8 saddr[16]; /* IPv4: the first 4 bytes */
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u8 proto;    /* IP protocol (IPv6: next header); 0 when neither */
	__u8 verdict;  /* 0 passed, 1 dropped */
	__u8 reason;   /* enum drop_reason, when dropped */
	__u8 family;   /* 4, 6, or 0: neither (ARP, ...) */
};

/* `event_budget`: an endpoint's share of the monitor's ring buffer. While
 * the ring is more than half full, an endpoint may add EVENT_SHARE events,
 * refilled at EVENT_SHARE a second; the rest of its events are counted
 * (endpoint_counters.full[TABLE_EVENTS]) and not sent. */
#define EVENT_SHARE 1024
struct event_budget {
	__u64 stamp;   /* ns of the last refill */
	__u32 tokens;
	__u32 pad;
};

/* `config` (an array of one): switches the agent sets. */
#define CFG_EVENTS 1 /* someone watches: send monitor events */
#define CFG_DNS_KERNEL 2 /* answer A queries found in `dns` in the program */
#define CFG_DNS_RA 4     /* the agent's server forwards: answers say so (RA) */
#define CFG_MESH 8       /* some service is published on the mesh: look for its flows */
struct config {
	__u32 flags;
};

/* Key of the `nets` LPM trie: every Trellis subnet of the cluster. */
struct net_key {
	__u32 prefixlen;
	__u32 ip;
};

/* Key of the `nets6` LPM trie: every IPv6 subnet of a dual-stack network. */
struct net6_key {
	__u32 prefixlen;
	__u8 ip[16];
};

struct net_info {
	__u32 net_id;  /* VNI */
	__u32 flags;
};

/* A service VIP (`vips`, keyed by the VIP): its network, and how many
 * backends its services have (it answers ping while any exists). */
struct vip_info {
	__u32 net_id;
	__u32 backends;
};

/* `services`: VIP, port and protocol → the service. */
struct svc_key {
	__u32 vip;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

struct svc_info {
	__u32 id;          /* key of `maglev` and of `backends` entries */
	__u16 target_port; /* the backends' port (0: the port asked for) */
	__u16 pad;
	__u32 count;       /* backends */
	__u32 revision;    /* of its backend set (the agent's change check) */
};

/* Maglev lookup table size: a prime; each of N backends owns M/N slots
 * (±1), so the spread is even well within 10 % up to ~50 backends. */
#define MAGLEV_M 509

/* `maglev`: service id → backend address per slot (0: none). */
struct maglev_table {
	__u32 ip[MAGLEV_M];
};

/* `backends`: the live backends of a service; a flow whose backend is no
 * longer here is reset (TCP) or sent elsewhere (UDP). */
struct backend_key {
	__u32 svc_id;
	__u32 ip;
};

struct backend_info {
	__u8 mac[6];
	__u16 pad;
};

/* Connection tracking: client flow to a VIP → the backend chosen for it.
 * Every endpoint has tables of its own (`ep_ct`, `ep_rnat`: its veth's
 * ifindex → a hash map made by the agent with the endpoint's quota as its
 * size), so a neighbour opening flows as fast as it can fills only its
 * own; nothing in them is evicted by new flows, the agent removes what
 * went idle (ebpf/src/conntrack.rs). The routing mesh's flows, from
 * clients outside, are in the shared `ct` LRU. */
struct ct_key {
	__u32 client;
	__u32 vip;
	__u16 cport;
	__u16 vport;
	__u8 proto;
	__u8 pad[3];
};

#define CT_OPEN 0        /* UDP, or TCP before the client's first plain ACK */
#define CT_ESTABLISHED 1 /* TCP: the client acknowledged the handshake */
#define CT_CLOSING 2     /* TCP: the client sent a FIN */
struct ct_value {
	__u32 backend;
	__u16 bport;
	__u8 mac[6];
	__u32 svc_id;
	__u8 state;    /* CT_* */
	__u8 pad[3];
	__u64 seen;    /* bpf_ktime_get_coarse_ns of its last packet, to a second */
};

/* `rnat`: the backend's replies → the VIP they must come from. */
struct rnat_key {
	__u32 client;
	__u32 backend;
	__u16 cport;
	__u16 bport;
	__u8 proto;
	__u8 pad[3];
};

/* An endpoint's IPv6 flows (`ep_flows6`, one table per endpoint, both
 * directions in one: the client's address is always the endpoint's own).
 * FLOW6_VIP: its flow to an IPv6 VIP (`addr`, `port`: the VIP and its port)
 * → the backend chosen (`addr`, `port`, `mac`, `svc_id`, `state`), as a
 * ct_value. FLOW6_REPLY: what comes back from `addr`, `port` (a backend,
 * or the gateway's DNS for a query sent on to it) to the endpoint's `cport`
 * → the address and port it must come from (`addr`, `port`; `flags`
 * RNAT_*), as an rnat_value. */
#define FLOW6_VIP 1
#define FLOW6_REPLY 2
struct flow6_key {
	__u8 addr[16];
	__u16 cport;   /* the endpoint's port */
	__u16 port;
	__u8 proto;
	__u8 kind;     /* FLOW6_* */
	__u8 pad[2];
};

struct flow6_value {
	__u8 addr[16];
	__u16 port;
	__u8 mac[6];   /* FLOW6_VIP: the backend's MAC */
	__u32 svc_id;  /* FLOW6_VIP */
	__u8 state;    /* FLOW6_VIP: CT_* */
	__u8 flags;    /* FLOW6_REPLY: RNAT_* */
	__u8 pad[2];
	__u64 seen;    /* bpf_ktime_get_coarse_ns, to a second */
};

/* IPv6 service VIPs (dual-stack networks), as the IPv4 tables: `vips6`
 * (the VIP's 16 bytes → vip_info), `services6`, `maglev6` (service id →
 * backend address per slot, all zero: none) and `backends6`, the service
 * ids those of the same services' IPv4 entries. */
struct svc6_key {
	__u8 vip[16];
	__u16 port;
	__u8 proto;
	__u8 pad;
};

struct maglev6_table {
	__u8 ip[MAGLEV_M][16];
};

struct backend6_key {
	__u32 svc_id;
	__u8 ip[16];
};

#define RNAT_CLOSING 1 /* a reply carried a FIN or a reset */
struct rnat_value {
	__u32 vip;
	__u16 vport;
	__u8 flags;   /* RNAT_* */
	__u8 pad;
	__u64 seen;   /* as ct_value.seen, from the replies */
};

/* A flow's `seen` is rewritten only when it is older than this (ns). */
#define SEEN_STEP 1000000000ULL

/* `svc_stats` (per CPU): per service id. */
struct svc_stats {
	__u64 selections; /* new flows given a backend */
	__u64 resets;     /* flows reset because their backend left */
};

_Static_assert(sizeof(struct flow_event) == 44, "flow_event layout");
_Static_assert(__builtin_offsetof(struct flow_event, proto) == 40, "flow_event.proto");
_Static_assert(sizeof(struct endpoint_info) == 72, "endpoint_info layout");
_Static_assert(__builtin_offsetof(struct endpoint_info, slot) == 64, "endpoint_info.slot");
_Static_assert(__builtin_offsetof(struct endpoint_info, gw6) == 48, "endpoint_info.gw6");
_Static_assert(__builtin_offsetof(struct endpoint_info, ip6) == 32, "endpoint_info.ip6");
_Static_assert(__builtin_offsetof(struct endpoint_info, gw_mac) == 24, "endpoint_info.gw_mac");
_Static_assert(__builtin_offsetof(struct endpoint_info, mac) == 4, "endpoint_info.mac");
_Static_assert(__builtin_offsetof(struct endpoint_info, net_id) == 12, "endpoint_info.net_id");
_Static_assert(sizeof(struct endpoint_counters) == 128, "endpoint_counters layout");
_Static_assert(__builtin_offsetof(struct endpoint_counters, full) == 104, "endpoint_counters.full");
_Static_assert(__builtin_offsetof(struct endpoint_counters, drops) == 32, "endpoint_counters.drops");
_Static_assert(sizeof(struct net_key) == 8, "net_key layout");
_Static_assert(sizeof(struct net6_key) == 20, "net6_key layout");
_Static_assert(sizeof(struct net_info) == 8, "net_info layout");
_Static_assert(sizeof(struct vip_info) == 8, "vip_info layout");
_Static_assert(sizeof(struct svc_key) == 8, "svc_key layout");
_Static_assert(__builtin_offsetof(struct svc_key, proto) == 6, "svc_key.proto");
_Static_assert(sizeof(struct svc_info) == 16, "svc_info layout");
_Static_assert(sizeof(struct maglev_table) == 4 * MAGLEV_M, "maglev_table layout");
_Static_assert(sizeof(struct backend_key) == 8, "backend_key layout");
_Static_assert(sizeof(struct backend_info) == 8, "backend_info layout");
_Static_assert(sizeof(struct ct_key) == 16, "ct_key layout");
_Static_assert(sizeof(struct ct_value) == 32, "ct_value layout");
_Static_assert(__builtin_offsetof(struct ct_value, seen) == 24, "ct_value.seen");
_Static_assert(__builtin_offsetof(struct ct_value, mac) == 6, "ct_value.mac");
_Static_assert(sizeof(struct rnat_key) == 16, "rnat_key layout");
_Static_assert(sizeof(struct rnat_value) == 16, "rnat_value layout");
_Static_assert(sizeof(struct flow6_key) == 24, "flow6_key layout");
_Static_assert(__builtin_offsetof(struct flow6_key, kind) == 21, "flow6_key.kind");
_Static_assert(sizeof(struct flow6_value) == 40, "flow6_value layout");
_Static_assert(__builtin_offsetof(struct flow6_value, seen) == 32, "flow6_value.seen");
_Static_assert(__builtin_offsetof(struct flow6_value, svc_id) == 24, "flow6_value.svc_id");
_Static_assert(sizeof(struct svc6_key) == 20, "svc6_key layout");
_Static_assert(sizeof(struct maglev6_table) == 16 * MAGLEV_M, "maglev6_table layout");
_Static_assert(sizeof(struct backend6_key) == 20, "backend6_key layout");
_Static_assert(sizeof(struct svc_stats) == 16, "svc_stats layout");
_Static_assert(sizeof(struct config) == 4, "config layout");
_Static_assert(sizeof(struct event_budget) == 16, "event_budget layout");

/* The routing mesh: ports every host accepts for a service, from outside.
 * `published`: port and protocol → the service behind it. */
struct pub_key {
	__u16 port;
	__u8 proto;
	__u8 pad;
};

struct pub_info {
	__u32 id;          /* the service: key of `maglev` and `backends` */
	__u16 target_port; /* the backends' port */
	__u16 pad;
	__u32 count;       /* backends */
	__u32 revision;    /* of its backend set (the agent's change check) */
	__u32 bridge;      /* ifindex of the service network's bridge here */
};

/* `mesh_addrs`: this host's addresses the mesh answers on → 1. */

/* `mesh_config` (an array of one): this host's mesh MAC, the source of
 * what it sends into a network for the mesh and where replies come back
 * to (06:7e and its underlay IPv4 address). */
struct mesh_config {
	__u8 mac[6];
	__u16 pad;
};

/* `mesh`: one connection through the mesh, keyed as the backend's replies
 * see it (an rnat_key: client, backend, their ports, protocol). On the
 * host that took it (MESH_INGRESS): the address and port the client asked
 * and the way back to it; on the backend's host when another host took it
 * (MESH_RETURN): that host's mesh MAC. */
#define MESH_INGRESS 1
#define MESH_RETURN 2
struct mesh_flow {
	__u32 addr;       /* ingress: the host address the client asked */
	__u16 port;       /* ingress: the published port */
	__u8 kind;        /* MESH_* */
	__u8 pad;
	__u32 ifindex;    /* ingress: the interface it came in on */
	__u8 peer_mac[6]; /* ingress: the client's (or its router's) MAC; return: the ingress host's mesh MAC */
	__u8 own_mac[6];  /* ingress: this host's MAC on that interface */
};

_Static_assert(sizeof(struct pub_key) == 4, "pub_key layout");
_Static_assert(sizeof(struct pub_info) == 20, "pub_info layout");
_Static_assert(sizeof(struct mesh_config) == 8, "mesh_config layout");
_Static_assert(sizeof(struct mesh_flow) == 24, "mesh_flow layout");
_Static_assert(__builtin_offsetof(struct mesh_flow, peer_mac) == 12, "mesh_flow.peer_mac");

/* The in-kernel DNS fast path: names with exactly one A record (and,
 * apart, names with exactly one AAAA record), per network. `name` is the
 * query name in wire format (length-prefixed labels and the root's 0),
 * lower case, zero-padded; `qtype` the record type asked for (DNS_TYPE_*,
 * host byte order). */
#define DNS_NAME_MAX 64
#define DNS_TYPE_A 1
#define DNS_TYPE_AAAA 28
struct dns_key {
	__u32 net_id;
	__u16 qtype;
	__u16 pad;
	__u8 name[DNS_NAME_MAX];
};

struct dns_answer {
	__u32 ttl;     /* host byte order */
	__u8 addr[16]; /* network byte order: A in the first 4 bytes */
};

/* `dns_stats` (an array of one, per CPU). */
struct dns_stats {
	__u64 answered; /* queries answered by the program */
	__u64 passed;   /* queries it looked at and left to the agent */
};

_Static_assert(sizeof(struct dns_key) == 72, "dns_key layout");
_Static_assert(__builtin_offsetof(struct dns_key, name) == 8, "dns_key.name");
_Static_assert(sizeof(struct dns_answer) == 20, "dns_answer layout");
_Static_assert(sizeof(struct dns_stats) == 16, "dns_stats layout");

#endif
