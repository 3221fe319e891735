//! The endpoint programs on hand-built frames through `BPF_PROG_TEST_RUN`
//! (no veth, no traffic: see `common::RunLab`): the verdict and the frame
//! as the program leaves it, for anti-spoofing, isolation, ARP and ping
//! answers for VIPs, the DNAT to a service's backend and the reverse
//! translation of its replies, TCP resets, and the in-kernel DNS fast path.
//! Expected frames are built from scratch (checksums computed, not
//! patched). Root tests (`--run-ignored all`).

use std::net::{Ipv4Addr, Ipv6Addr};

use trellis_ebpf::{
    Backend6Key, BackendInfo, BackendKey, CFG_DNS_KERNEL, CFG_DNS_RA, CtKey, CtValue, DnsAnswer, DnsKey, DropReason,
    EP_DNS_FAST, EP_INTERNAL, EndpointInfo, FLOW6_REPLY, FLOW6_VIP, MAGLEV_M, Maglev6Table, MaglevTable, NetInfo,
    Svc6Key, SvcInfo, SvcKey, VipInfo, be,
};
use trellis_ebpf::{Table, conntrack};
use trellis_integration::require_root;

mod common;
use common::frames::*;
use common::{RunLab, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

const NET: u32 = 4096;
const OTHER_NET: u32 = 4097;
const EP_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 2);
const EP_MAC: Mac = [2, 0, 0, 0, 0, 2];
/// fe80::/64 and the modified EUI-64 of EP_MAC.
const OWN_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0xff, 0xfe00, 2);
const GW_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 1);
const GW_MAC: Mac = [2, 0, 0, 0, 0, 1];
const VIP: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 100);
/// The MAC the program answers for VIP with: 02:42 and the address.
const VIP_MAC: Mac = [2, 0x42, 10, 210, 0, 100];
const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 9);
const BACKEND_MAC: Mac = [2, 0, 0, 0, 0, 9];
const OTHER_VIP: Ipv4Addr = Ipv4Addr::new(10, 211, 0, 100);

fn endpoint() -> EndpointInfo {
    EndpointInfo::new(EP_IP, EP_MAC, NET)
}

/// A lab whose endpoint (on the runs' ifindex) is EP_IP/EP_MAC in NET
/// (10.210.0.0/24); 10.211.0.0/24 is another network.
fn lab() -> RunLab {
    require_root();
    let mut lab = RunLab::new();
    lab.dp.set_endpoint(RunLab::IFINDEX, endpoint()).unwrap();
    lab.dp.put_net((Ipv4Addr::new(10, 210, 0, 0), 24), NetInfo { net_id: NET, flags: 0 }).unwrap();
    lab.dp.put_net((Ipv4Addr::new(10, 211, 0, 0), 24), NetInfo { net_id: OTHER_NET, flags: 0 }).unwrap();
    lab
}

/// A UDP frame from `src_mac` and `src` (port 40000) to `dst`, through
/// the gateway's MAC.
fn udp_frame(src_mac: Mac, src: Ipv4Addr, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    eth(GW_MAC, src_mac, ETH_P_IP, &ipv4(src, dst, PROTO_UDP, &udp(src, dst, 40000, dport, b"hello")))
}

fn drops(lab: &RunLab, reason: DropReason) -> u64 {
    lab.dp.counters(RunLab::IFINDEX).unwrap().dropped(reason)
}

#[test]
fn frame_builders_compute_textbook_checksums() {
    // RFC 1071 § 3's example sum, and an IPv4 header with a known checksum.
    assert_eq!(sum16(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0), 0xddf2);
    let h = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
        0x00, 0xc7,
    ];
    assert_eq!(checksum(&h), 0xb861);
    let f = udp_frame(EP_MAC, EP_IP, GW_IP, 7);
    assert!(ip_checksum_ok(&f) && l4_checksum_ok(&f));
    let mut bad = f.clone();
    bad[L4 + 8] ^= 1;
    assert!(!l4_checksum_ok(&bad), "a flipped payload bit is seen");
    bad[IP + 8] ^= 1;
    assert!(!ip_checksum_ok(&bad), "a flipped TTL bit is seen");
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn a_dual_stack_endpoint_sends_from_its_ipv6_address_only() {
    let mut lab = lab();
    let own: Ipv6Addr = "fd00:210::2".parse().unwrap();
    lab.dp.set_endpoint(RunLab::IFINDEX, endpoint().with_ip6(own)).unwrap();
    let echo = |src: Ipv6Addr| {
        eth([0x33, 0x33, 0, 0, 0, 1], EP_MAC, ETH_P_IPV6, &ipv6(src, "fd00:210::3".parse().unwrap(), &[128, 0, 0, 0]))
    };
    let f = echo(own);
    let r = lab.send(&f);
    assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &f), "from its own address");
    assert_eq!(lab.send(&echo(OWN_LINK_LOCAL)).verdict, TC_ACT_OK, "from its own link-local address");
    for other in ["fd00:210::99", "fd00:210::2:0", "fd01:210::2", "fe80::2", "fe80::ff:fe00:3"] {
        assert_eq!(lab.send(&echo(other.parse().unwrap())).verdict, TC_ACT_SHOT, "from {other}");
    }
    assert_eq!(drops(&lab, DropReason::SpoofIpv6), 5);
    // Neighbour advertisements for its own addresses only; no router
    // advertisement at all.
    let na = |target: Ipv6Addr| {
        let mut body = vec![136, 0, 0, 0, 0x60, 0, 0, 0];
        body.extend_from_slice(&target.octets());
        eth([0x33, 0x33, 0, 0, 0, 1], EP_MAC, ETH_P_IPV6, &ipv6(OWN_LINK_LOCAL, "ff02::1".parse().unwrap(), &body))
    };
    assert_eq!(lab.send(&na(own)).verdict, TC_ACT_OK, "an advertisement of its own address");
    assert_eq!(lab.send(&na(OWN_LINK_LOCAL)).verdict, TC_ACT_OK, "of its own link-local address");
    assert_eq!(lab.send(&na("fd00:210::3".parse().unwrap())).verdict, TC_ACT_SHOT, "of a neighbour's address");
    let ra = eth(
        [0x33, 0x33, 0, 0, 0, 1],
        EP_MAC,
        ETH_P_IPV6,
        &ipv6(OWN_LINK_LOCAL, "ff02::1".parse().unwrap(), &[134, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    );
    assert_eq!(lab.send(&ra).verdict, TC_ACT_SHOT, "a router advertisement");
    assert_eq!(drops(&lab, DropReason::SpoofIpv6), 7);
}

/// DNS over IPv6 to a resolver outside Trellis: sent to the network's
/// IPv6 gateway (its MAC), the reply's source made the resolver asked
/// again, each frame exactly as built from scratch (checksums computed,
/// not patched); a query from the link-local address, to a Trellis
/// subnet's address or without an IPv6 gateway is left alone.
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn dns_over_ipv6_to_an_outside_resolver_goes_to_the_gateway_and_back() {
    let mut lab = lab();
    let own: Ipv6Addr = "fd00:210::2".parse().unwrap();
    let gw6: Ipv6Addr = "fd00:210::1".parse().unwrap();
    let resolver: Ipv6Addr = "2001:db8:53::53".parse().unwrap();
    let info = endpoint().with_ip6(own).with_dns_at(GW_IP, GW_MAC).with_dns6_at(gw6);
    lab.dp.set_endpoint(RunLab::IFINDEX, info).unwrap();
    let router_mac: Mac = [2, 0, 0, 0, 0, 0x77];
    let q = query_frame(0x1234, 0x0100, "web.app", 28);
    let frame = |dst_mac: Mac, src_mac: Mac, from: Ipv6Addr, to: Ipv6Addr, sport: u16, dport: u16| {
        eth(dst_mac, src_mac, ETH_P_IPV6, &ipv6_udp(from, to, sport, dport, &q[L4 + 8..]))
    };
    let sent = lab.send(&frame(router_mac, EP_MAC, own, resolver, 40000, 53));
    assert_eq!(sent.verdict, TC_ACT_OK);
    assert_eq!(sent.frame, frame(GW_MAC, EP_MAC, own, gw6, 40000, 53), "to the gateway, checksum right");
    let kept = lab.dp.endpoint_flows6(RunLab::IFINDEX).unwrap();
    assert_eq!(kept.len(), 1);
    let (k, v) = kept[0];
    assert_eq!(
        (k.addr, k.cport, k.port, k.proto, k.kind, v.addr, v.port),
        (gw6.octets(), 40000u16.to_be(), 53u16.to_be(), PROTO_UDP, FLOW6_REPLY, resolver.octets(), 53u16.to_be()),
        "replies from the gateway's port 53 to the client's port come from the resolver asked"
    );
    // The gateway's reply comes back from the resolver asked.
    let reply = lab.deliver(&frame(EP_MAC, GW_MAC, gw6, own, 53, 40000));
    assert_eq!(reply.verdict, TC_ACT_OK);
    assert_eq!(reply.frame, frame(EP_MAC, GW_MAC, resolver, own, 53, 40000), "from the resolver, checksum right");
    // A reply to a port that asked nothing, and a reply from elsewhere:
    // untouched.
    for f in [frame(EP_MAC, GW_MAC, gw6, own, 53, 40001), frame(EP_MAC, GW_MAC, resolver, own, 53, 40000)] {
        let r = lab.deliver(&f);
        assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &f));
    }
    // Not intercepted: from the link-local address, to another port, to
    // a multicast address.
    for f in [
        frame(router_mac, EP_MAC, OWN_LINK_LOCAL, resolver, 40002, 53),
        frame(router_mac, EP_MAC, own, resolver, 40003, 5353),
        frame([0x33, 0x33, 0, 0, 0, 0xfb], EP_MAC, own, "ff02::fb".parse().unwrap(), 40004, 53),
    ] {
        let r = lab.send(&f);
        assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &f), "left alone");
    }
    // Without an IPv6 gateway nothing is intercepted.
    lab.dp.set_endpoint(RunLab::IFINDEX, endpoint().with_ip6(own).with_dns_at(GW_IP, GW_MAC)).unwrap();
    let f = frame(router_mac, EP_MAC, own, resolver, 40005, 53);
    let r = lab.send(&f);
    assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &f));
    assert_eq!(lab.dp.endpoint_flows6(RunLab::IFINDEX).unwrap().len(), 1, "nothing new kept");
}

/// An endpoint's tables are its own: a new endpoint takes a slot made
/// ready ahead of time (no wait on the attach path), a slot an endpoint
/// left comes back only with fresh tables (nothing of its flows reaches
/// the next endpoint), and an agent restarted finds every endpoint with
/// its slot and its entries.
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn each_endpoint_has_its_own_tables_and_a_left_slot_comes_back_empty() {
    let mut lab = lab();
    let own: Ipv6Addr = "fd00:210::2".parse().unwrap();
    let gw6: Ipv6Addr = "fd00:210::1".parse().unwrap();
    let info = endpoint().with_ip6(own).with_dns_at(GW_IP, GW_MAC).with_dns6_at(gw6);
    lab.dp.set_endpoint(RunLab::IFINDEX, info).unwrap();
    let first = lab.dp.endpoint_slot(RunLab::IFINDEX).unwrap().expect("a slot");
    let q = query_frame(0x1234, 0x0100, "web.app", 28);
    let query =
        eth(GW_MAC, EP_MAC, ETH_P_IPV6, &ipv6_udp(own, "2001:db8::53".parse().unwrap(), 40000, 53, &q[L4 + 8..]));
    assert_eq!(lab.send(&query).verdict, TC_ACT_OK);
    assert_eq!(lab.dp.endpoint_flows6(RunLab::IFINDEX).unwrap().len(), 1);
    // Spare slots are made in the background.
    let t0 = std::time::Instant::now();
    while lab.dp.spare_slots() < trellis_ebpf::slots::SPARE_SLOTS && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(lab.dp.spare_slots(), trellis_ebpf::slots::SPARE_SLOTS);
    // Restarted: the same slot, its entry still there.
    lab.reload();
    assert_eq!(lab.dp.endpoint_slot(RunLab::IFINDEX).unwrap(), Some(first));
    assert_eq!(lab.dp.endpoint_flows6(RunLab::IFINDEX).unwrap().len(), 1, "flows outlive the agent");
    // Gone and back (the same ifindex, as a new veth may get): another
    // slot or the same one prepared again, and empty either way.
    lab.dp.remove_endpoint(RunLab::IFINDEX).unwrap();
    assert_eq!(lab.dp.endpoint_slot(RunLab::IFINDEX).unwrap(), None);
    lab.dp.set_endpoint(RunLab::IFINDEX, info).unwrap();
    assert!(lab.dp.endpoint_slot(RunLab::IFINDEX).unwrap().is_some());
    assert!(lab.dp.endpoint_flows6(RunLab::IFINDEX).unwrap().is_empty(), "a new endpoint sees no old flow");
    // And the program uses the new tables.
    assert_eq!(lab.send(&query).verdict, TC_ACT_OK);
    assert_eq!(lab.dp.endpoint_flows6(RunLab::IFINDEX).unwrap().len(), 1);
}

/// Neighbour and router advertisements cannot hide behind extension
/// headers: the program walks hop-by-hop, routing and destination-options
/// headers to the ICMPv6 message; a chain too long to walk or cut short is
/// dropped; other traffic behind extension headers passes.
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn ndp_behind_extension_headers_is_checked_too() {
    let mut lab = lab();
    let own: Ipv6Addr = "fd00:210::2".parse().unwrap();
    lab.dp.set_endpoint(RunLab::IFINDEX, endpoint().with_ip6(own)).unwrap();
    // An IPv6 packet whose first header says `first`, then `exts` (each:
    // its next header, then 6 bytes of padding options: 8 bytes), then
    // `payload`.
    let packet = |first: u8, exts: &[u8], payload: &[u8]| {
        let mut body = Vec::new();
        for (i, _) in exts.iter().enumerate() {
            let next = exts.get(i + 1).copied().unwrap_or(58);
            body.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
        }
        body.extend_from_slice(payload);
        let mut f =
            eth([0x33, 0x33, 0, 0, 0, 1], EP_MAC, ETH_P_IPV6, &ipv6(OWN_LINK_LOCAL, "ff02::1".parse().unwrap(), &body));
        f[14 + 6] = if exts.is_empty() { 58 } else { first };
        f
    };
    let na = |target: Ipv6Addr| {
        let mut b = vec![136, 0, 0, 0, 0x60, 0, 0, 0];
        b.extend_from_slice(&target.octets());
        b
    };
    let ra = [134u8, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let neighbour: Ipv6Addr = "fd00:210::3".parse().unwrap();
    let before = drops(&lab, DropReason::SpoofIpv6);
    // Behind a destination-options header, behind hop-by-hop + routing +
    // destination options: a neighbour's address is still refused.
    for exts in [vec![60u8], vec![0, 43, 60]] {
        assert_eq!(lab.send(&packet(exts[0], &exts, &na(neighbour))).verdict, TC_ACT_SHOT, "{exts:?}");
        assert_eq!(lab.send(&packet(exts[0], &exts, &ra)).verdict, TC_ACT_SHOT, "an RA behind {exts:?}");
        let own_na = packet(exts[0], &exts, &na(own));
        assert_eq!(lab.send(&own_na).verdict, TC_ACT_OK, "its own address behind {exts:?}");
    }
    // A chain longer than the program walks, and one cut short: dropped.
    assert_eq!(lab.send(&packet(60, &[60, 60, 60, 60, 60], &na(own))).verdict, TC_ACT_SHOT, "five headers");
    let mut cut = packet(60, &[60], &na(own));
    cut.truncate(14 + 40 + 1);
    cut[14 + 4..14 + 6].copy_from_slice(&1u16.to_be_bytes());
    assert_eq!(lab.send(&cut).verdict, TC_ACT_SHOT, "an extension header cut short");
    assert_eq!(drops(&lab, DropReason::SpoofIpv6), before + 6);
    // An echo request behind a destination-options header passes.
    let echo = packet(60, &[60], &[128, 0, 0, 0, 0, 1, 0, 1]);
    assert_eq!(lab.send(&echo).verdict, TC_ACT_OK);
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn ipv6_to_another_network_is_dropped_and_an_internal_one_is_sealed() {
    let mut lab = lab();
    let own: Ipv6Addr = "fd00:210::2".parse().unwrap();
    lab.dp.set_endpoint(RunLab::IFINDEX, endpoint().with_ip6(own)).unwrap();
    lab.dp.put_net6(("fd00:210::".parse().unwrap(), 64), NetInfo { net_id: NET, flags: 0 }).unwrap();
    lab.dp.put_net6(("fd00:211::".parse().unwrap(), 64), NetInfo { net_id: NET + 1, flags: 0 }).unwrap();
    let to = |dst: &str| eth([2, 0, 0, 0, 0, 3], EP_MAC, ETH_P_IPV6, &ipv6(own, dst.parse().unwrap(), &[128, 0, 0, 0]));
    assert_eq!(lab.send(&to("fd00:210::3")).verdict, TC_ACT_OK, "its own network");
    assert_eq!(lab.send(&to("fd00:211::3")).verdict, TC_ACT_SHOT, "another network");
    assert_eq!(lab.send(&to("2001:db8::1")).verdict, TC_ACT_OK, "outside, from a plain network");
    assert_eq!(drops(&lab, DropReason::Isolation), 1);
    assert_eq!(lab.dp.nets6().unwrap().len(), 2, "read back");
    // Internal: its own network, link-local and multicast only.
    lab.dp.set_endpoint(RunLab::IFINDEX, endpoint().with_ip6(own).with_flags(trellis_ebpf::EP_INTERNAL)).unwrap();
    assert_eq!(lab.send(&to("fd00:210::3")).verdict, TC_ACT_OK);
    assert_eq!(lab.send(&to("ff02::1")).verdict, TC_ACT_OK, "multicast (neighbour discovery)");
    assert_eq!(lab.send(&to("fe80::1")).verdict, TC_ACT_OK, "link-local");
    assert_eq!(lab.send(&to("2001:db8::1")).verdict, TC_ACT_SHOT, "outside, from an internal network");
    assert_eq!(drops(&lab, DropReason::Isolation), 2);
    lab.dp.remove_net6(("fd00:211::".parse().unwrap(), 64)).unwrap();
    assert_eq!(lab.dp.nets6().unwrap().len(), 1);
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn spoofed_sources_are_dropped_and_the_endpoints_own_pass() {
    let mut lab = lab();
    // The endpoint's own frames pass, untouched.
    let own = udp_frame(EP_MAC, EP_IP, GW_IP, 7);
    let r = lab.send(&own);
    assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &own));
    let arp_own = eth([0xff; 6], EP_MAC, ETH_P_ARP, &arp(1, EP_MAC, EP_IP, [0; 6], GW_IP));
    let r = lab.send(&arp_own);
    assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &arp_own), "an ARP request for the gateway");
    for src in [OWN_LINK_LOCAL, Ipv6Addr::UNSPECIFIED] {
        let f =
            eth([0x33, 0x33, 0, 0, 0, 2], EP_MAC, ETH_P_IPV6, &ipv6(src, "ff02::2".parse().unwrap(), &[133, 0, 0, 0]));
        let r = lab.send(&f);
        assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &f), "IPv6 from {src}");
    }
    assert_eq!(lab.dp.counters(RunLab::IFINDEX).unwrap().drops, [0; trellis_ebpf::DROP_REASONS]);

    // Another source MAC (with the endpoint's IP, or anything).
    let r = lab.send(&udp_frame([2, 0, 0, 0, 0, 0x66], EP_IP, GW_IP, 7));
    assert_eq!(r.verdict, TC_ACT_SHOT, "a foreign source MAC");
    assert_eq!(drops(&lab, DropReason::SpoofMac), 1);
    // Another source IP from the endpoint's MAC.
    let r = lab.send(&udp_frame(EP_MAC, Ipv4Addr::new(10, 210, 0, 99), GW_IP, 7));
    assert_eq!(r.verdict, TC_ACT_SHOT, "a foreign source IP");
    assert_eq!(drops(&lab, DropReason::SpoofIp), 1);
    // ARP claiming another address, or another MAC in its body.
    let arp_ip = eth([0xff; 6], EP_MAC, ETH_P_ARP, &arp(1, EP_MAC, Ipv4Addr::new(10, 210, 0, 99), [0; 6], GW_IP));
    assert_eq!(lab.send(&arp_ip).verdict, TC_ACT_SHOT, "ARP from a foreign sender IP");
    let arp_mac = eth([0xff; 6], EP_MAC, ETH_P_ARP, &arp(2, [2, 0, 0, 0, 0, 0x66], EP_IP, GW_MAC, GW_IP));
    assert_eq!(lab.send(&arp_mac).verdict, TC_ACT_SHOT, "ARP from a foreign sender MAC");
    assert_eq!(drops(&lab, DropReason::SpoofArp), 2);
    // IPv6 from an address it was not given (it has none but link-local).
    let v6 = eth(
        [0x33, 0x33, 0, 0, 0, 1],
        EP_MAC,
        ETH_P_IPV6,
        &ipv6("2001:db8::2".parse().unwrap(), "ff02::1".parse().unwrap(), &[128, 0, 0, 0]),
    );
    assert_eq!(lab.send(&v6).verdict, TC_ACT_SHOT, "IPv6 from a global address");
    assert_eq!(drops(&lab, DropReason::SpoofIpv6), 1);
    let c = lab.dp.counters(RunLab::IFINDEX).unwrap();
    assert_eq!((c.from_packets, c.drops.iter().sum::<u64>()), (9, 5), "{c:?}");

    // An interface the agent did not program: not the program's business.
    lab.dp.remove_endpoint(RunLab::IFINDEX).unwrap();
    let foreign = udp_frame([2, 0, 0, 0, 0, 0x66], Ipv4Addr::new(10, 210, 0, 99), GW_IP, 7);
    let r = lab.send(&foreign);
    assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &foreign));
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn nothing_reaches_another_network_or_leaves_an_internal_one() {
    let mut lab = lab();
    lab.dp.put_vip(OTHER_VIP, VipInfo { net_id: OTHER_NET, backends: 1 }).unwrap();
    let outside = Ipv4Addr::new(192, 0, 2, 1);
    assert_eq!(lab.send(&udp_frame(EP_MAC, EP_IP, GW_IP, 7)).verdict, TC_ACT_OK);
    assert_eq!(lab.send(&udp_frame(EP_MAC, EP_IP, outside, 7)).verdict, TC_ACT_OK);
    for dst in [Ipv4Addr::new(10, 211, 0, 5), OTHER_VIP] {
        assert_eq!(lab.send(&udp_frame(EP_MAC, EP_IP, dst, 7)).verdict, TC_ACT_SHOT, "to {dst}");
    }
    assert_eq!(drops(&lab, DropReason::Isolation), 2);
    // An internal network: its own addresses only.
    lab.dp.set_endpoint(RunLab::IFINDEX, endpoint().with_flags(EP_INTERNAL)).unwrap();
    assert_eq!(lab.send(&udp_frame(EP_MAC, EP_IP, GW_IP, 7)).verdict, TC_ACT_OK);
    assert_eq!(lab.send(&udp_frame(EP_MAC, EP_IP, outside, 7)).verdict, TC_ACT_SHOT);
    assert_eq!(drops(&lab, DropReason::Isolation), 3);
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn arp_requests_for_vips_of_the_network_are_answered() {
    let mut lab = lab();
    lab.dp.put_vip(VIP, VipInfo { net_id: NET, backends: 1 }).unwrap();
    lab.dp.put_vip(OTHER_VIP, VipInfo { net_id: OTHER_NET, backends: 1 }).unwrap();
    let request = eth([0xff; 6], EP_MAC, ETH_P_ARP, &arp(1, EP_MAC, EP_IP, [0; 6], VIP));
    let r = lab.send(&request);
    // Turned into the reply, sent back out of the veth to the endpoint.
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    assert_eq!(r.frame, eth(EP_MAC, VIP_MAC, ETH_P_ARP, &arp(2, VIP_MAC, VIP, EP_MAC, EP_IP)));
    // A request for another network's VIP, a reply to a VIP, a request
    // for an address that is no VIP: left to the kernel, untouched.
    for f in [
        eth([0xff; 6], EP_MAC, ETH_P_ARP, &arp(1, EP_MAC, EP_IP, [0; 6], OTHER_VIP)),
        eth(VIP_MAC, EP_MAC, ETH_P_ARP, &arp(2, EP_MAC, EP_IP, VIP_MAC, VIP)),
        eth([0xff; 6], EP_MAC, ETH_P_ARP, &arp(1, EP_MAC, EP_IP, [0; 6], GW_IP)),
    ] {
        let r = lab.send(&f);
        assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &f));
    }
}

/// A service of VIP: `port` → `target` on BACKEND_IP alone (every Maglev
/// slot), service id `id`.
fn service(lab: &mut RunLab, id: u32, proto: u8, port: u16, target: u16) {
    lab.dp.put_vip(VIP, VipInfo { net_id: NET, backends: 1 }).unwrap();
    let info = SvcInfo { id, target_port: target.to_be(), pad: 0, count: 1, revision: 1 };
    lab.dp.put_service(SvcKey::new(VIP, port, proto), info).unwrap();
    lab.dp.put_maglev(id, &MaglevTable { ip: [be(BACKEND_IP); MAGLEV_M] }).unwrap();
    lab.dp
        .put_backend(BackendKey { svc_id: id, ip: be(BACKEND_IP) }, BackendInfo { mac: BACKEND_MAC, pad: 0 })
        .unwrap();
}

/// A TCP frame between MACs and addresses.
#[allow(clippy::too_many_arguments)]
fn tcp_frame(
    (dmac, smac): (Mac, Mac),
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    eth(dmac, smac, ETH_P_IP, &ipv4(src, dst, PROTO_TCP, &tcp(src, dst, sport, dport, seq, ack, flags, payload)))
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn tcp_to_a_vip_is_dnated_to_its_backend_and_the_replies_come_from_the_vip() {
    let mut lab = lab();
    service(&mut lab, 7, PROTO_TCP, 80, 8080);
    let to_vip = |seq, ack, flags, payload: &[u8]| {
        tcp_frame((GW_MAC, EP_MAC), (EP_IP, 40000), (VIP, 80), seq, ack, flags, payload)
    };
    let at_backend = |seq, ack, flags, payload: &[u8]| {
        tcp_frame((BACKEND_MAC, EP_MAC), (EP_IP, 40000), (BACKEND_IP, 8080), seq, ack, flags, payload)
    };
    let r = lab.send(&to_vip(1000, 0, SYN, b""));
    assert_eq!(r.verdict, TC_ACT_OK);
    assert_eq!((ip_dst(&r.frame), ports(&r.frame)), (BACKEND_IP, (40000, 8080)));
    assert!(ip_checksum_ok(&r.frame) && l4_checksum_ok(&r.frame), "checksums of {:02x?}", r.frame);
    assert_eq!(r.frame, at_backend(1000, 0, SYN, b""), "the backend's MAC, address and port, nothing else changed");
    // Remembered: the connection, the choice counted once.
    let key = CtKey {
        client: be(EP_IP),
        vip: be(VIP),
        cport: 40000u16.to_be(),
        vport: 80u16.to_be(),
        proto: PROTO_TCP,
        pad: [0; 3],
    };
    let flows = lab.dp.connections().unwrap();
    assert_eq!(flows.len(), 1, "{flows:?}");
    let seen = flows[0].1.seen;
    assert!(seen > 0 && seen <= trellis_ebpf::flow_clock(), "stamped with the monotonic clock: {seen}");
    let want = CtValue {
        backend: be(BACKEND_IP),
        bport: 8080u16.to_be(),
        mac: BACKEND_MAC,
        svc_id: 7,
        state: conntrack::CT_OPEN,
        pad: [0; 3],
        seen,
    };
    assert_eq!(flows, vec![(key, want)]);
    assert_eq!(lab.dp.svc_stats(7).unwrap().selections, 1);

    // The backend's answer leaves as the VIP's.
    let reply = tcp_frame((EP_MAC, BACKEND_MAC), (BACKEND_IP, 8080), (EP_IP, 40000), 5000, 1001, SYN | ACK, b"");
    let r = lab.deliver(&reply);
    assert_eq!(r.verdict, TC_ACT_OK);
    assert!(ip_checksum_ok(&r.frame) && l4_checksum_ok(&r.frame), "checksums of {:02x?}", r.frame);
    assert_eq!(r.frame, tcp_frame((EP_MAC, BACKEND_MAC), (VIP, 80), (EP_IP, 40000), 5000, 1001, SYN | ACK, b""));

    // The rest of the flow (with data) follows its connection entry.
    let r = lab.send(&to_vip(1001, 5001, ACK, b"GET / HTTP/1.0\r\n\r\n"));
    assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &at_backend(1001, 5001, ACK, b"GET / HTTP/1.0\r\n\r\n")));
    assert_eq!(lab.dp.svc_stats(7).unwrap().selections, 1);
    assert_eq!(lab.dp.connections().unwrap()[0].1.state, conntrack::CT_ESTABLISHED, "the handshake was acknowledged");
    // Traffic not from a backend's flow is not rewritten.
    let other = tcp_frame((EP_MAC, GW_MAC), (GW_IP, 8080), (EP_IP, 40000), 1, 1, ACK, b"");
    let r = lab.deliver(&other);
    assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &other));
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn a_service_on_every_port_dnats_each_port_to_the_same_port_and_exact_ports_win() {
    let mut lab = lab();
    // Port 0, target 0: every port, to the port asked for.
    service(&mut lab, 9, PROTO_TCP, 0, 0);
    for port in [22u16, 8443, 65535] {
        let r = lab.send(&tcp_frame((GW_MAC, EP_MAC), (EP_IP, 40001), (VIP, port), 1, 0, SYN, b""));
        assert_eq!(r.verdict, TC_ACT_OK, "port {port}");
        assert_eq!(r.frame, tcp_frame((BACKEND_MAC, EP_MAC), (EP_IP, 40001), (BACKEND_IP, port), 1, 0, SYN, b""));
        assert!(ip_checksum_ok(&r.frame) && l4_checksum_ok(&r.frame), "checksums of {:02x?}", r.frame);
        // The backend's answer leaves as the VIP's, from the same port.
        let reply = tcp_frame((EP_MAC, BACKEND_MAC), (BACKEND_IP, port), (EP_IP, 40001), 7, 2, SYN | ACK, b"");
        let r = lab.deliver(&reply);
        assert_eq!(r.frame, tcp_frame((EP_MAC, BACKEND_MAC), (VIP, port), (EP_IP, 40001), 7, 2, SYN | ACK, b""));
    }
    assert_eq!(lab.dp.svc_stats(9).unwrap().selections, 3);
    // An exact port's entry wins over the every-port one.
    let info = SvcInfo { id: 9, target_port: 8080u16.to_be(), pad: 0, count: 1, revision: 1 };
    lab.dp.put_service(SvcKey::new(VIP, 80, PROTO_TCP), info).unwrap();
    let r = lab.send(&tcp_frame((GW_MAC, EP_MAC), (EP_IP, 40002), (VIP, 80), 1, 0, SYN, b""));
    assert_eq!(ports(&r.frame), (40002, 8080));
    // UDP has no every-port entry here: refused as before.
    let q = eth(GW_MAC, EP_MAC, ETH_P_IP, &ipv4(EP_IP, VIP, PROTO_UDP, &udp(EP_IP, VIP, 40000, 5000, b"x")));
    assert_eq!(lab.send(&q).verdict, TC_ACT_SHOT);
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn udp_to_a_vip_is_dnated_with_its_checksum_and_translated_back() {
    let mut lab = lab();
    service(&mut lab, 8, PROTO_UDP, 53, 5353);
    let query = eth(GW_MAC, EP_MAC, ETH_P_IP, &ipv4(EP_IP, VIP, PROTO_UDP, &udp(EP_IP, VIP, 40000, 53, b"ask")));
    let r = lab.send(&query);
    assert_eq!(r.verdict, TC_ACT_OK);
    assert!(ip_checksum_ok(&r.frame) && l4_checksum_ok(&r.frame), "checksums of {:02x?}", r.frame);
    let at_backend = eth(
        BACKEND_MAC,
        EP_MAC,
        ETH_P_IP,
        &ipv4(EP_IP, BACKEND_IP, PROTO_UDP, &udp(EP_IP, BACKEND_IP, 40000, 5353, b"ask")),
    );
    assert_eq!(r.frame, at_backend);
    let reply = eth(
        EP_MAC,
        BACKEND_MAC,
        ETH_P_IP,
        &ipv4(BACKEND_IP, EP_IP, PROTO_UDP, &udp(BACKEND_IP, EP_IP, 5353, 40000, b"tell")),
    );
    let r = lab.deliver(&reply);
    assert_eq!(r.verdict, TC_ACT_OK);
    assert!(ip_checksum_ok(&r.frame) && l4_checksum_ok(&r.frame));
    assert_eq!(
        r.frame,
        eth(EP_MAC, BACKEND_MAC, ETH_P_IP, &ipv4(VIP, EP_IP, PROTO_UDP, &udp(VIP, EP_IP, 53, 40000, b"tell")))
    );
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn vips_answer_ping_and_reset_tcp_to_ports_without_a_service() {
    let mut lab = lab();
    service(&mut lab, 7, PROTO_TCP, 80, 8080);
    // Ping: answered in place, from the VIP.
    let ping = eth(GW_MAC, EP_MAC, ETH_P_IP, &ipv4(EP_IP, VIP, PROTO_ICMP, &icmp_echo(8, 0x77, 3, b"abcdefgh")));
    let r = lab.send(&ping);
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    assert!(ip_checksum_ok(&r.frame) && icmp_checksum_ok(&r.frame), "checksums of {:02x?}", r.frame);
    assert_eq!(
        r.frame,
        eth(EP_MAC, VIP_MAC, ETH_P_IP, &ipv4(VIP, EP_IP, PROTO_ICMP, &icmp_echo(0, 0x77, 3, b"abcdefgh")))
    );

    // A SYN with data to a port no service has: a reset from the VIP, the
    // frame cut down to the headers.
    let syn = tcp_frame((GW_MAC, EP_MAC), (EP_IP, 40001), (VIP, 81), 1000, 0, SYN, b"xyz");
    let r = lab.send(&syn);
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    let f = &r.frame;
    assert_eq!(f.len(), 14 + 20 + 20, "{f:02x?}");
    assert_eq!((&f[0..6], &f[6..12]), (&EP_MAC[..], &VIP_MAC[..]));
    assert_eq!((ip_src(f), ip_dst(f), ports(f)), (VIP, EP_IP, (81, 40001)));
    assert_eq!((f[IP + 8], f[IP + 9]), (64, PROTO_TCP), "TTL, protocol");
    assert_eq!(u32::from_be_bytes(f[L4 + 4..L4 + 8].try_into().unwrap()), 0, "seq");
    assert_eq!(u32::from_be_bytes(f[L4 + 8..L4 + 12].try_into().unwrap()), 1000 + 3 + 1, "ack: data and SYN");
    assert_eq!(f[L4 + 13], RST | ACK);
    assert!(ip_checksum_ok(f) && l4_checksum_ok(f), "checksums of {f:02x?}");
    assert_eq!(drops(&lab, DropReason::NoService), 1);
    // A reset to an established flow's segment: seq is the segment's ack.
    let r = lab.send(&tcp_frame((GW_MAC, EP_MAC), (EP_IP, 40001), (VIP, 81), 1004, 777, ACK, b""));
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    assert_eq!((u32::from_be_bytes(r.frame[L4 + 4..L4 + 8].try_into().unwrap()), r.frame[L4 + 13]), (777, RST));
    assert!(l4_checksum_ok(&r.frame));
    // UDP there is dropped; a VIP whose services have no backend does not
    // answer ping.
    let r = lab.send(&eth(GW_MAC, EP_MAC, ETH_P_IP, &ipv4(EP_IP, VIP, PROTO_UDP, &udp(EP_IP, VIP, 1, 81, b""))));
    assert_eq!(r.verdict, TC_ACT_SHOT);
    lab.dp.put_vip(VIP, VipInfo { net_id: NET, backends: 0 }).unwrap();
    assert_eq!(lab.send(&ping).verdict, TC_ACT_SHOT);
    assert_eq!((drops(&lab, DropReason::NoService), drops(&lab, DropReason::NoBackend)), (3, 1));
}

/// The reply the agent's DNS server would send to `query` (a plain A
/// query the frame `query` carries): addresses and ports swapped, QR AA
/// (RA when `ra`) and RD as asked, the question as asked, one answer
/// pointing at it.
fn dns_reply(question_frame: &[u8], ip: Ipv4Addr, ttl: u32, ra: bool) -> Vec<u8> {
    let q = &question_frame[L4 + 8..];
    let mut d = q.to_vec();
    d[2] = 0x80 | 0x04 | (q[2] & 0x01);
    d[3] = if ra { 0x80 } else { 0 };
    d[7] = 1; // ANCOUNT
    d.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    d.extend_from_slice(&ttl.to_be_bytes());
    d.extend_from_slice(&[0, 4]);
    d.extend_from_slice(&ip.octets());
    let mut u = Vec::new();
    u.extend_from_slice(&53u16.to_be_bytes());
    u.extend_from_slice(&question_frame[L4..L4 + 2]);
    u.extend_from_slice(&((8 + d.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]); // no checksum (optional over IPv4)
    u.extend_from_slice(&d);
    let src_mac: Mac = question_frame[0..6].try_into().unwrap();
    let dst_mac: Mac = question_frame[6..12].try_into().unwrap();
    eth(dst_mac, src_mac, ETH_P_IP, &ipv4(ip_dst(question_frame), ip_src(question_frame), PROTO_UDP, &u))
}

fn query_frame(id: u16, flags: u16, name: &str, qtype: u16) -> Vec<u8> {
    let d = dns_query(id, flags, name, qtype);
    eth(GW_MAC, EP_MAC, ETH_P_IP, &ipv4(EP_IP, GW_IP, PROTO_UDP, &udp(EP_IP, GW_IP, 40000, 53, &d)))
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn plain_a_queries_are_answered_in_place_by_the_dns_fast_path() {
    let mut lab = lab();
    let ep = endpoint().with_dns_at(GW_IP, GW_MAC);
    lab.dp.set_endpoint(RunLab::IFINDEX, ep.with_flags(ep.flags | EP_DNS_FAST)).unwrap();
    lab.dp.put_dns(DnsKey::new(NET, "web.app").unwrap(), DnsAnswer::new(Ipv4Addr::new(10, 210, 0, 7), 5)).unwrap();
    lab.dp.put_dns(DnsKey::new(OTHER_NET, "db").unwrap(), DnsAnswer::new(Ipv4Addr::new(10, 211, 0, 9), 5)).unwrap();
    let query = query_frame(0x1234, 0x0100, "WeB.app", 1);

    // Off (the agent has not turned it on): left to the agent's server.
    let r = lab.send(&query);
    assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &query));
    lab.dp.set_config(CFG_DNS_KERNEL, true).unwrap();

    // On: the reply, sent straight back into the endpoint's namespace
    // (bpf_redirect_peer), counted as sent to the endpoint.
    let r = lab.send(&query);
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    let want = dns_reply(&query, Ipv4Addr::new(10, 210, 0, 7), 5, false);
    assert_eq!(r.frame, want, "\n got {:02x?}\nwant {want:02x?}", r.frame);
    assert!(ip_checksum_ok(&r.frame));
    // The bytes, spelled out once: header, question as asked, answer.
    assert_eq!(
        &r.frame[L4 + 8..],
        b"\x12\x34\x85\x00\x00\x01\x00\x01\x00\x00\x00\x00\x03WeB\x03app\x00\x00\x01\x00\x01\
          \xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x05\x00\x04\x0a\xd2\x00\x07"
    );
    assert_eq!(lab.dp.dns_stats().unwrap().answered, 1);
    assert_eq!(lab.dp.counters(RunLab::IFINDEX).unwrap().to_packets, 1);
    // RA as the agent's server says; RD as the query asked.
    lab.dp.set_config(CFG_DNS_RA, true).unwrap();
    let no_rd = query_frame(0x4321, 0x0000, "web.app.", 1);
    let r = lab.send(&no_rd);
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    assert_eq!(r.frame, dns_reply(&no_rd, Ipv4Addr::new(10, 210, 0, 7), 5, true));
    assert_eq!(&r.frame[L4 + 10..L4 + 12], b"\x84\x80");

    // Not for the fast path: left to the server, untouched.
    let mut edns = dns_query(0x1111, 0x0100, "web.app", 1);
    edns[11] = 1; // ARCOUNT: an OPT record follows
    edns.extend_from_slice(&[0, 0, 41, 4, 0xd0, 0, 0, 0, 0, 0, 0]);
    let edns = eth(GW_MAC, EP_MAC, ETH_P_IP, &ipv4(EP_IP, GW_IP, PROTO_UDP, &udp(EP_IP, GW_IP, 40000, 53, &edns)));
    for (what, f) in [
        ("an unknown name", query_frame(1, 0x0100, "nope.app", 1)),
        ("another network's name", query_frame(2, 0x0100, "db", 1)),
        ("AAAA", query_frame(3, 0x0100, "web.app", 28)),
        ("a response", query_frame(4, 0x8100, "web.app", 1)),
        ("EDNS", edns),
    ] {
        let r = lab.send(&f);
        assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &f), "{what}");
    }
    let st = lab.dp.dns_stats().unwrap();
    assert_eq!((st.answered, st.passed), (2, 5), "{st:?}");
}

/// A UDP frame from the endpoint to VIP:`vport` from port `sport`.
fn udp_to_vip(sport: u16, vport: u16) -> Vec<u8> {
    eth(GW_MAC, EP_MAC, ETH_P_IP, &ipv4(EP_IP, VIP, PROTO_UDP, &udp(EP_IP, VIP, sport, vport, b"q")))
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn a_full_flow_table_refuses_new_flows_and_keeps_every_old_one() {
    let mut lab = lab();
    // The endpoint again, its tables made with a quota of 4 flows.
    lab.dp.remove_endpoint(RunLab::IFINDEX).unwrap();
    lab.dp.set_flow_quota(4);
    lab.dp.set_endpoint(RunLab::IFINDEX, endpoint()).unwrap();
    service(&mut lab, 7, PROTO_UDP, 0, 0);
    for port in 1..=4 {
        assert_eq!(lab.send(&udp_to_vip(40000, port)).verdict, TC_ACT_OK, "flow {port} of 4");
    }
    let r = lab.send(&udp_to_vip(40000, 5));
    assert_eq!(r.verdict, TC_ACT_SHOT, "a fifth flow does not fit");
    let c = lab.dp.counters(RunLab::IFINDEX).unwrap();
    assert_eq!((c.full(Table::Ct), c.dropped(DropReason::TableFull)), (1, 1), "{c:?}");
    // Nothing was pushed out for it: the four flows still go to the
    // backend, and their replies still come back from the VIP.
    for port in 1..=4 {
        let r = lab.send(&udp_to_vip(40000, port));
        assert_eq!((r.verdict, ip_dst(&r.frame)), (TC_ACT_OK, BACKEND_IP), "flow {port}");
        let reply = eth(
            EP_MAC,
            BACKEND_MAC,
            ETH_P_IP,
            &ipv4(BACKEND_IP, EP_IP, PROTO_UDP, &udp(BACKEND_IP, EP_IP, port, 40000, b"a")),
        );
        assert_eq!(ip_src(&lab.deliver(&reply).frame), VIP, "flow {port}'s reply");
    }
    assert_eq!(lab.dp.endpoint_connections(RunLab::IFINDEX).unwrap().len(), 4);
    assert_eq!(lab.dp.endpoint_reverse_nat(RunLab::IFINDEX).unwrap().len(), 4);

    // A sweep at the current time removes nothing; a minute and more
    // later the idle UDP flows are over and room is made.
    let life = conntrack::Lifetimes::default();
    let now = trellis_ebpf::flow_clock();
    assert_eq!(lab.dp.sweep_flows(now, &life).unwrap().removed_ct, 0);
    let later = now + 61_000_000_000;
    let swept = lab.dp.sweep_flows(later, &life).unwrap();
    assert_eq!((swept.removed_ct, swept.removed_rnat, swept.live), (4, 4, 0), "{swept:?}");
    assert_eq!(lab.send(&udp_to_vip(40000, 5)).verdict, TC_ACT_OK, "room for the fifth flow");
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn a_client_reset_ends_its_flow_at_once_and_established_flows_outlive_idle_udp() {
    let mut lab = lab();
    service(&mut lab, 7, PROTO_TCP, 80, 8080);
    let to_vip = |sport, seq, ack, flags| tcp_frame((GW_MAC, EP_MAC), (EP_IP, sport), (VIP, 80), seq, ack, flags, b"");
    // One connection ended by the client's reset: translated, then gone.
    assert_eq!(lab.send(&to_vip(41000, 1, 0, SYN)).verdict, TC_ACT_OK);
    assert_eq!(lab.dp.endpoint_reverse_nat(RunLab::IFINDEX).unwrap().len(), 1);
    let r = lab.send(&to_vip(41000, 2, 0, RST));
    assert_eq!((r.verdict, ip_dst(&r.frame)), (TC_ACT_OK, BACKEND_IP), "the reset reaches the backend");
    assert!(lab.dp.endpoint_connections(RunLab::IFINDEX).unwrap().is_empty(), "its entries went with it");
    assert!(lab.dp.endpoint_reverse_nat(RunLab::IFINDEX).unwrap().is_empty());
    // One established, one that sent a FIN.
    assert_eq!(lab.send(&to_vip(41001, 1, 0, SYN)).verdict, TC_ACT_OK);
    assert_eq!(lab.send(&to_vip(41001, 2, 1, ACK)).verdict, TC_ACT_OK);
    assert_eq!(lab.send(&to_vip(41002, 1, 0, SYN)).verdict, TC_ACT_OK);
    assert_eq!(lab.send(&to_vip(41002, 2, 1, ACK)).verdict, TC_ACT_OK);
    assert_eq!(lab.send(&to_vip(41002, 2, 1, FIN | ACK)).verdict, TC_ACT_OK);
    let states: std::collections::BTreeMap<u16, u8> = lab
        .dp
        .endpoint_connections(RunLab::IFINDEX)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (u16::from_be(k.cport), v.state))
        .collect();
    assert_eq!(states, [(41001, conntrack::CT_ESTABLISHED), (41002, conntrack::CT_CLOSING)].into());
    // An hour idle: the closed one is over, the established one is not.
    let swept = lab.dp.sweep_flows(trellis_ebpf::flow_clock() + 3_600_000_000_000, &conntrack::Lifetimes::default());
    assert_eq!(swept.unwrap().removed_ct, 1);
    let left: Vec<u16> =
        lab.dp.endpoint_connections(RunLab::IFINDEX).unwrap().iter().map(|(k, _)| u16::from_be(k.cport)).collect();
    assert_eq!(left, vec![41001]);
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn an_endpoint_gets_only_its_share_of_a_monitor_ring_that_is_filling_up() {
    let mut lab = lab();
    lab.dp.set_events(true).unwrap();
    let mut ring = lab.dp.take_events().unwrap();
    // 10,000 new connections (each a flow-start event), no one reading.
    // The ring holds 9,362 events (512 KiB, 56 bytes a record: 44 and
    // the ring's 8-byte header).
    let sent = 10_000u32;
    let started = std::time::Instant::now();
    for i in 0..sent {
        let port = 20000 + (i % 40000) as u16;
        let syn = tcp_frame((GW_MAC, EP_MAC), (EP_IP, port), (GW_IP, 80), 1, 0, SYN, b"");
        assert_eq!(lab.send(&syn).verdict, TC_ACT_OK);
    }
    let took = started.elapsed().as_secs_f64();
    let mut queued = 0u32;
    while ring.next().is_some() {
        queued += 1;
    }
    let full = lab.dp.counters(RunLab::IFINDEX).unwrap().full(Table::Events);
    // Past half the ring (4,681), the endpoint had its share (1,024, and
    // 1,024 more a second of the run: a count, not a timing bound).
    assert_eq!(u64::from(queued) + full, u64::from(sent), "every event was either queued or counted");
    assert!(full > 0, "the endpoint was held to its share ({queued} queued)");
    let share = 9362 / 2 + 1024 + (1024.0 * took).ceil() as u32 + 1;
    assert!(queued <= share, "no more than its share: {queued} queued, {share} allowed over {took:.2} s");
    assert!(queued < 9362, "room is left for other endpoints: {queued} of 9362 queued");
}

const OWN6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x210, 0, 0, 0, 0, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x210, 0, 0, 0xffff, 0xffff, 0xffff, 0xfffe);
/// The MAC VIP6 answers with: 02:42 and its last four bytes.
const VIP6_MAC: Mac = [2, 0x42, 0xff, 0xff, 0xff, 0xfe];
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x210, 0, 0, 0, 0, 0, 9);

/// A dual-stack endpoint (OWN6) with an IPv6 VIP of its network whose
/// service 7 takes TCP port 80 to port 8080 of BACKEND6 (every slot), and
/// an IPv6 VIP of another network.
fn lab6() -> RunLab {
    let mut lab = lab();
    lab.dp.set_endpoint(RunLab::IFINDEX, endpoint().with_ip6(OWN6)).unwrap();
    lab.dp.put_net6(("fd00:210::".parse().unwrap(), 64), NetInfo { net_id: NET, flags: 0 }).unwrap();
    lab.dp.put_vip6(VIP6, VipInfo { net_id: NET, backends: 1 }).unwrap();
    lab.dp.put_vip6("fd00:211::ffff".parse().unwrap(), VipInfo { net_id: OTHER_NET, backends: 1 }).unwrap();
    let info = SvcInfo { id: 7, target_port: 8080u16.to_be(), pad: 0, count: 1, revision: 1 };
    lab.dp.put_service6(Svc6Key::new(VIP6, 80, PROTO_TCP), info).unwrap();
    lab.dp.put_maglev6(7, &Maglev6Table { ip: [BACKEND6.octets(); MAGLEV_M] }).unwrap();
    lab.dp
        .put_backend6(Backend6Key { svc_id: 7, ip: BACKEND6.octets() }, BackendInfo { mac: BACKEND_MAC, pad: 0 })
        .unwrap();
    lab
}

fn tcp6_frame(
    (dmac, smac): (Mac, Mac),
    (src, sport): (Ipv6Addr, u16),
    (dst, dport): (Ipv6Addr, u16),
    (seq, ack, flags): (u32, u32, u8),
    payload: &[u8],
) -> Vec<u8> {
    let t = tcp_bare(sport, dport, seq, ack, flags, 64240, payload);
    eth(dmac, smac, ETH_P_IPV6, &ipv6_l4(src, dst, PROTO_TCP, 64, &t))
}

/// An IPv6 VIP answers its neighbour solicitations and pings in place,
/// DNATs TCP to its backend (the replies leaving as the VIP's), resets TCP
/// to a port no service has and a flow whose backend left, refuses UDP
/// there, and is another network's to no one else: every frame exactly as
/// built from scratch, checksums computed, not patched.
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn ipv6_vips_answer_ndp_and_ping_dnat_to_their_backend_and_reset_what_no_backend_takes() {
    let mut lab = lab6();
    // Neighbour solicitation for the VIP → advertisement from it.
    let solicited: Ipv6Addr = "ff02::1:ffff:fffe".parse().unwrap();
    let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
    ns.extend_from_slice(&VIP6.octets());
    ns.extend_from_slice(&[1, 1]);
    ns.extend_from_slice(&EP_MAC);
    let r = lab.send(&eth(
        [0x33, 0x33, 0xff, 0xff, 0xff, 0xfe],
        EP_MAC,
        ETH_P_IPV6,
        &ipv6_l4(OWN6, solicited, 58, 255, &ns),
    ));
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    let mut na = vec![136, 0, 0, 0, 0x60, 0, 0, 0];
    na.extend_from_slice(&VIP6.octets());
    na.extend_from_slice(&[2, 1]);
    na.extend_from_slice(&VIP6_MAC);
    assert_eq!(r.frame, eth(EP_MAC, VIP6_MAC, ETH_P_IPV6, &ipv6_l4(VIP6, OWN6, 58, 255, &na)), "{:02x?}", r.frame);
    // A solicitation for someone else's address is left alone.
    let mut other_ns = ns.clone();
    other_ns[8..24].copy_from_slice(&BACKEND6.octets());
    let f = eth([0x33, 0x33, 0xff, 0, 0, 9], EP_MAC, ETH_P_IPV6, &ipv6_l4(OWN6, solicited, 58, 255, &other_ns));
    let r = lab.send(&f);
    assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &f));

    // Ping → echo reply from the VIP.
    let echo = |kind: u8| {
        let mut m = vec![kind, 0, 0, 0, 0, 0x77, 0, 3];
        m.extend_from_slice(b"abcdefgh");
        m
    };
    let r = lab.send(&eth(GW_MAC, EP_MAC, ETH_P_IPV6, &ipv6_l4(OWN6, VIP6, 58, 64, &echo(128))));
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    assert_eq!(r.frame, eth(EP_MAC, VIP6_MAC, ETH_P_IPV6, &ipv6_l4(VIP6, OWN6, 58, 64, &echo(129))));

    // TCP to the VIP's port 80 → the backend's port 8080, and back.
    let r = lab.send(&tcp6_frame((VIP6_MAC, EP_MAC), (OWN6, 40000), (VIP6, 80), (1000, 0, SYN), b""));
    assert_eq!(r.verdict, TC_ACT_OK);
    assert_eq!(r.frame, tcp6_frame((BACKEND_MAC, EP_MAC), (OWN6, 40000), (BACKEND6, 8080), (1000, 0, SYN), b""));
    let mut kept = lab.dp.endpoint_flows6(RunLab::IFINDEX).unwrap();
    kept.sort_by_key(|(k, _)| k.kind);
    let summary: Vec<_> = kept.iter().map(|(k, v)| (k.kind, k.addr, k.port, k.cport, v.addr, v.port)).collect();
    let (p80, p8080, p40000) = (80u16.to_be(), 8080u16.to_be(), 40000u16.to_be());
    assert_eq!(
        summary,
        vec![
            (FLOW6_VIP, VIP6.octets(), p80, p40000, BACKEND6.octets(), p8080),
            (FLOW6_REPLY, BACKEND6.octets(), p8080, p40000, VIP6.octets(), p80),
        ]
    );
    assert_eq!(lab.dp.svc_stats(7).unwrap().selections, 1);
    let reply = tcp6_frame((EP_MAC, BACKEND_MAC), (BACKEND6, 8080), (OWN6, 40000), (5000, 1001, SYN | ACK), b"");
    let r = lab.deliver(&reply);
    assert_eq!(r.verdict, TC_ACT_OK);
    assert_eq!(r.frame, tcp6_frame((EP_MAC, BACKEND_MAC), (VIP6, 80), (OWN6, 40000), (5000, 1001, SYN | ACK), b""));
    // The flow goes on to the same backend, its choice counted once.
    let data = tcp6_frame((VIP6_MAC, EP_MAC), (OWN6, 40000), (VIP6, 80), (1001, 5001, ACK), b"GET /");
    let r = lab.send(&data);
    assert_eq!(
        r.frame,
        tcp6_frame((BACKEND_MAC, EP_MAC), (OWN6, 40000), (BACKEND6, 8080), (1001, 5001, ACK), b"GET /")
    );
    assert_eq!(lab.dp.svc_stats(7).unwrap().selections, 1);

    // A port no service has: a reset from the VIP (the data and SYN acked).
    let r = lab.send(&tcp6_frame((VIP6_MAC, EP_MAC), (OWN6, 40001), (VIP6, 81), (2000, 0, SYN), b"xyz"));
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    let rst = tcp_bare(81, 40001, 0, 2000 + 3 + 1, RST | ACK, 0, b"");
    assert_eq!(r.frame, eth(EP_MAC, VIP6_MAC, ETH_P_IPV6, &ipv6_l4(VIP6, OWN6, PROTO_TCP, 64, &rst)));
    // UDP there is dropped.
    let u = eth(VIP6_MAC, EP_MAC, ETH_P_IPV6, &ipv6_l4(OWN6, VIP6, PROTO_UDP, 64, &udp_bare(40002, 81, b"x")));
    assert_eq!(lab.send(&u).verdict, TC_ACT_SHOT);
    assert_eq!(drops(&lab, DropReason::NoService), 2);

    // Its backend leaves: the flow's next segment is reset (seq: its ack).
    lab.dp.remove_backend6(Backend6Key { svc_id: 7, ip: BACKEND6.octets() }).unwrap();
    let r = lab.send(&data);
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    let rst = tcp_bare(80, 40000, 5001, 0, RST, 0, b"");
    assert_eq!(r.frame, eth(EP_MAC, VIP6_MAC, ETH_P_IPV6, &ipv6_l4(VIP6, OWN6, PROTO_TCP, 64, &rst)));
    assert_eq!(lab.dp.svc_stats(7).unwrap().resets, 1);
    assert_eq!(drops(&lab, DropReason::NoBackend), 1);

    // Another network's IPv6 VIP: isolation.
    let other =
        tcp6_frame((VIP6_MAC, EP_MAC), (OWN6, 40003), ("fd00:211::ffff".parse().unwrap(), 80), (1, 0, SYN), b"");
    assert_eq!(lab.send(&other).verdict, TC_ACT_SHOT);
    assert_eq!(drops(&lab, DropReason::Isolation), 1);
}

/// UDP to an IPv6 VIP: DNATed with its checksum, the reply translated
/// back; a flow's entries leave with the sweep once idle.
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn udp_to_an_ipv6_vip_is_dnated_and_translated_back_and_swept_when_idle() {
    let mut lab = lab6();
    let info = SvcInfo { id: 7, target_port: 5353u16.to_be(), pad: 0, count: 1, revision: 1 };
    lab.dp.put_service6(Svc6Key::new(VIP6, 53, PROTO_UDP), info).unwrap();
    let q = |src, dst, sport, dport, body: &[u8]| ipv6_l4(src, dst, PROTO_UDP, 64, &udp_bare(sport, dport, body));
    let r = lab.send(&eth(VIP6_MAC, EP_MAC, ETH_P_IPV6, &q(OWN6, VIP6, 40000, 53, b"ask")));
    assert_eq!(r.verdict, TC_ACT_OK);
    assert_eq!(r.frame, eth(BACKEND_MAC, EP_MAC, ETH_P_IPV6, &q(OWN6, BACKEND6, 40000, 5353, b"ask")));
    let r = lab.deliver(&eth(EP_MAC, BACKEND_MAC, ETH_P_IPV6, &q(BACKEND6, OWN6, 5353, 40000, b"tell")));
    assert_eq!(r.verdict, TC_ACT_OK);
    assert_eq!(r.frame, eth(EP_MAC, BACKEND_MAC, ETH_P_IPV6, &q(VIP6, OWN6, 53, 40000, b"tell")));
    assert_eq!(lab.dp.endpoint_flows6(RunLab::IFINDEX).unwrap().len(), 2);
    let life = conntrack::Lifetimes::default();
    let swept = lab.dp.sweep_flows(trellis_ebpf::flow_clock(), &life).unwrap();
    assert_eq!((swept.removed_ct, swept.removed_rnat), (0, 0), "fresh: kept");
    let later = trellis_ebpf::flow_clock() + life.other.as_nanos() as u64 + 2_000_000_000;
    let swept = lab.dp.sweep_flows(later, &life).unwrap();
    assert_eq!((swept.removed_ct, swept.removed_rnat), (1, 1), "idle past UDP's lifetime: both directions go");
    assert!(lab.dp.endpoint_flows6(RunLab::IFINDEX).unwrap().is_empty());
}

/// The in-kernel DNS path over IPv6 transport: a plain AAAA (or A) query
/// to the network's IPv6 gateway, or to a resolver outside Trellis, is
/// answered in place with the reply the server would write, its UDP
/// checksum computed (mandatory over IPv6), from the address asked; a
/// query to another endpoint's address (a DNS server of its own) is not.
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn dns_queries_over_ipv6_are_answered_in_place_too() {
    let mut lab = lab();
    let gw6: Ipv6Addr = "fd00:210::1".parse().unwrap();
    let ep = endpoint().with_ip6(OWN6).with_dns_at(GW_IP, GW_MAC).with_dns6_at(gw6);
    lab.dp.set_endpoint(RunLab::IFINDEX, ep.with_flags(ep.flags | EP_DNS_FAST)).unwrap();
    lab.dp.put_net6(("fd00:210::".parse().unwrap(), 64), NetInfo { net_id: NET, flags: 0 }).unwrap();
    let web6: Ipv6Addr = "fd00:210::7".parse().unwrap();
    let aaaa = trellis_ebpf::DNS_TYPE_AAAA;
    lab.dp.put_dns(DnsKey::of_type(NET, "web.app", aaaa).unwrap(), DnsAnswer::new(web6, 5)).unwrap();
    lab.dp.put_dns(DnsKey::new(NET, "web.app").unwrap(), DnsAnswer::new(Ipv4Addr::new(10, 210, 0, 7), 5)).unwrap();
    lab.dp.set_config(CFG_DNS_KERNEL, true).unwrap();
    let query = |to: Ipv6Addr, name: &str, qtype: u16| {
        let d = dns_query(0x2222, 0x0100, name, qtype);
        eth(GW_MAC, EP_MAC, ETH_P_IPV6, &ipv6_l4(OWN6, to, PROTO_UDP, 64, &udp_bare(40000, 53, &d)))
    };
    let reply = |q: &[u8], from: Ipv6Addr, rr: &[u8]| {
        let asked = &q[14 + 40 + 8..];
        let mut d = asked.to_vec();
        d[2] = 0x80 | 0x04 | (asked[2] & 0x01);
        d[3] = 0;
        d[7] = 1;
        d.extend_from_slice(&[0xc0, 0x0c, 0, rr[0], 0, 1, 0, 0, 0, 5, 0, (rr.len() - 1) as u8]);
        d.extend_from_slice(&rr[1..]);
        eth(EP_MAC, GW_MAC, ETH_P_IPV6, &ipv6_l4(from, OWN6, PROTO_UDP, 64, &udp_bare(53, 40000, &d)))
    };
    let mut aaaa_rr = vec![28u8];
    aaaa_rr.extend_from_slice(&web6.octets());
    for (to, what) in [(gw6, "the gateway"), ("2001:db8:53::53".parse().unwrap(), "an outside resolver")] {
        let q = query(to, "WeB.app", aaaa);
        let r = lab.send(&q);
        assert_eq!(r.verdict, TC_ACT_REDIRECT, "to {what}");
        let want = reply(&q, to, &aaaa_rr);
        assert_eq!(r.frame, want, "to {what}\n got {:02x?}\nwant {want:02x?}", r.frame);
    }
    // An A query over IPv6 too (the name's IPv4 address).
    let q = query(gw6, "web.app", 1);
    let r = lab.send(&q);
    assert_eq!((r.verdict, r.frame), (TC_ACT_REDIRECT, reply(&q, gw6, &[1, 10, 210, 0, 7])));
    assert_eq!(lab.dp.dns_stats().unwrap().answered, 3);
    // To another endpoint of the network (its own DNS server): through.
    let q = query("fd00:210::9".parse().unwrap(), "web.app", aaaa);
    let r = lab.send(&q);
    assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &q));
    assert_eq!(lab.dp.dns_stats().unwrap().answered, 3);
}
