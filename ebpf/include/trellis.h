/* Map layouts shared by the Trellis eBPF programs and the Rust loader
 * (ebpf/src/lib.rs mirrors every struct with #[repr(C)] and checks the same
 * sizes and offsets in its tests). */
#ifndef TRELLIS_H
#define TRELLIS_H

#include <linux/types.h>

/* What the datapath knows of an endpoint, keyed by the ifindex of its
 * host-side veth. */
struct endpoint_info {
	__u32 ip;      /* IPv4 address, network byte order */
	__u8 mac[6];   /* the endpoint's MAC */
	__u16 pad;
	__u32 net_id;  /* the network's VNI */
	__u32 flags;
};

/* Why a packet was dropped (index into endpoint_counters.drops). */
enum drop_reason {
	DROP_SPOOF_MAC = 0,
	DROP_SPOOF_IP = 1,
	DROP_SPOOF_ARP = 2,
	DROP_SPOOF_IPV6 = 3,
	DROP_MALFORMED = 4,
	DROP_REASONS = 8,
};

/* Per endpoint and per CPU. "from" is traffic the endpoint sends. */
struct endpoint_counters {
	__u64 from_packets;
	__u64 from_bytes;
	__u64 to_packets;
	__u64 to_bytes;
	__u64 drops[DROP_REASONS];
};

/* One event of the monitor ring buffer: a drop, or the start of a flow
 * (a TCP SYN, an ICMP echo request) that passed. Addresses and ports in
 * network byte order. */
struct flow_event {
	__u32 ifindex;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;    /* IP protocol; 0 when not IPv4 */
	__u8 verdict;  /* 0 passed, 1 dropped */
	__u8 reason;   /* enum drop_reason, when dropped */
	__u8 pad;
};

_Static_assert(sizeof(struct flow_event) == 20, "flow_event layout");
_Static_assert(__builtin_offsetof(struct flow_event, proto) == 16, "flow_event.proto");
_Static_assert(sizeof(struct endpoint_info) == 20, "endpoint_info layout");
_Static_assert(__builtin_offsetof(struct endpoint_info, mac) == 4, "endpoint_info.mac");
_Static_assert(__builtin_offsetof(struct endpoint_info, net_id) == 12, "endpoint_info.net_id");
_Static_assert(sizeof(struct endpoint_counters) == 96, "endpoint_counters layout");
_Static_assert(__builtin_offsetof(struct endpoint_counters, drops) == 32, "endpoint_counters.drops");

#endif
