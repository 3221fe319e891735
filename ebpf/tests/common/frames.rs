//! Hand-built frames for the program tests (Ethernet, IPv4, TCP, UDP, ICMP
//! echo, ARP, IPv6, DNS queries), every checksum computed from scratch, and
//! the checks of the checksums of a frame the program wrote. IPv4 headers
//! have no options: the IP header is at 14, the L4 header at 34.

use std::net::Ipv4Addr;

pub type Mac = [u8; 6];

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Where the IPv4 header and the L4 header start.
pub const IP: usize = 14;
pub const L4: usize = 34;

/// TCP flags.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// The ones' complement sum of `data` (16-bit big-endian words, an odd
/// last byte padded), folded, not inverted.
pub fn sum16(data: &[u8], mut sum: u32) -> u16 {
    for w in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !sum16(data, 0)
}

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

/// The checksum of a TCP or UDP segment `l4` (its checksum field zero)
/// between `src` and `dst`.
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> u16 {
    let mut all = pseudo(src, dst, proto, l4.len());
    all.extend_from_slice(l4);
    checksum(&all)
}

pub fn eth(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 packet (no options, DF, TTL 64, id 0x4242) around `l4`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0x42, 0x42, 0x40, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(l4);
    p
}

/// A TCP segment (no options, window 64240) with its checksum.
#[allow(clippy::too_many_arguments)]
pub fn tcp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut t = tcp_bare(sport, dport, seq, ack, flags, 64240, payload);
    let c = l4_checksum(src, dst, PROTO_TCP, &t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// A UDP datagram with its checksum.
pub fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = udp_bare(sport, dport, payload);
    let c = l4_checksum(src, dst, PROTO_UDP, &u);
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// An ICMP echo message (`kind` 8: request, 0: reply) with its checksum.
pub fn icmp_echo(kind: u8, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// An ARP packet for IPv4 over Ethernet (`op` 1: request, 2: reply).
pub fn arp(op: u16, sha: Mac, sip: Ipv4Addr, tha: Mac, tip: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sha);
    a.extend_from_slice(&sip.octets());
    a.extend_from_slice(&tha);
    a.extend_from_slice(&tip.octets());
    a
}

/// An IPv6 header (next header ICMPv6, hop limit 255) and `payload`.
pub fn ipv6(src: std::net::Ipv6Addr, dst: std::net::Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[58, 255]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// An IPv6 UDP packet (no extension headers, hop limit 64) from
/// `src`:`sport` to `dst`:`dport`, its checksum computed.
pub fn ipv6_udp(src: std::net::Ipv6Addr, dst: std::net::Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut u = Vec::with_capacity(len);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&(len as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut ph = Vec::with_capacity(40 + len);
    ph.extend_from_slice(&src.octets());
    ph.extend_from_slice(&dst.octets());
    ph.extend_from_slice(&(len as u32).to_be_bytes());
    ph.extend_from_slice(&[0, 0, 0, PROTO_UDP]);
    ph.extend_from_slice(&u);
    let c = match checksum(&ph) {
        0 => 0xffff,
        c => c,
    };
    u[6..8].copy_from_slice(&c.to_be_bytes());
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p.extend_from_slice(&[PROTO_UDP, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&u);
    p
}

/// `name` (dotted, as given: case kept) in DNS wire format.
pub fn dns_name(name: &str) -> Vec<u8> {
    let mut n = Vec::new();
    for label in name.trim_end_matches('.').split('.') {
        n.push(label.len() as u8);
        n.extend_from_slice(label.as_bytes());
    }
    n.push(0);
    n
}

/// A DNS query with one question (`qtype`, class IN) and nothing else;
/// `flags` as on the wire (0x0100: RD).
pub fn dns_query(id: u16, flags: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&flags.to_be_bytes());
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(&dns_name(name));
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

/// The addresses of a frame's IPv4 header.
pub fn ip_src(f: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(f[IP + 12], f[IP + 13], f[IP + 14], f[IP + 15])
}

pub fn ip_dst(f: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(f[IP + 16], f[IP + 17], f[IP + 18], f[IP + 19])
}

/// The source and destination ports of a frame's TCP/UDP header.
pub fn ports(f: &[u8]) -> (u16, u16) {
    (u16::from_be_bytes([f[L4], f[L4 + 1]]), u16::from_be_bytes([f[L4 + 2], f[L4 + 3]]))
}

/// Is the IPv4 header checksum of `f` right?
pub fn ip_checksum_ok(f: &[u8]) -> bool {
    sum16(&f[IP..L4], 0) == 0xffff
}

/// Is the TCP (or UDP, unless it has none) checksum of `f` right? The
/// segment is what the IP header's total length says.
pub fn l4_checksum_ok(f: &[u8]) -> bool {
    let total = u16::from_be_bytes([f[IP + 2], f[IP + 3]]) as usize;
    let proto = f[IP + 9];
    let seg = &f[L4..IP + total];
    if proto == PROTO_UDP && seg[6..8] == [0, 0] {
        return true; // no checksum (optional over IPv4)
    }
    let p = pseudo(ip_src(f), ip_dst(f), proto, seg.len());
    sum16(seg, u32::from(sum16(&p, 0))) == 0xffff
}

/// Is the ICMP checksum of `f` right?
pub fn icmp_checksum_ok(f: &[u8]) -> bool {
    let total = u16::from_be_bytes([f[IP + 2], f[IP + 3]]) as usize;
    sum16(&f[L4..IP + total], 0) == 0xffff
}

/// An IPv6 packet (hop limit `hops`) carrying `l4` of protocol `nexthdr`
/// (TCP, UDP or ICMPv6), whose checksum (its field zero in `l4`) is
/// computed here over the IPv6 pseudo-header.
pub fn ipv6_l4(src: std::net::Ipv6Addr, dst: std::net::Ipv6Addr, nexthdr: u8, hops: u8, l4: &[u8]) -> Vec<u8> {
    let mut l4 = l4.to_vec();
    let mut ph = Vec::with_capacity(40 + l4.len());
    ph.extend_from_slice(&src.octets());
    ph.extend_from_slice(&dst.octets());
    ph.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    ph.extend_from_slice(&[0, 0, 0, nexthdr]);
    ph.extend_from_slice(&l4);
    let at = match nexthdr {
        PROTO_TCP => 16,
        PROTO_UDP => 6,
        _ => 2,
    };
    let c = match checksum(&ph) {
        0 if nexthdr == PROTO_UDP => 0xffff,
        c => c,
    };
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    p.extend_from_slice(&[nexthdr, hops]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&l4);
    p
}

/// A TCP header (no options) and payload, its checksum field zero (for
/// [`ipv6_l4`]).
pub fn tcp_bare(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, window: u16, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(20 + payload.len());
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    t.extend_from_slice(&[5 << 4, flags]);
    t.extend_from_slice(&window.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(payload);
    t
}

/// A UDP header and payload, its checksum field zero (for [`ipv6_l4`]).
pub fn udp_bare(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

pub const PROTO_ICMPV6: u8 = 58;
