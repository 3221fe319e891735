//! The peer probes' sockets: a raw ICMP socket for echoes to the peers'
//! underlay addresses, and a raw ICMPv6 socket bound to the probe VXLAN
//! device ([`crate::model::PROBE_VXLAN`]) for echoes through the tunnel;
//! and the echo packets as values.

use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::dataplane::ProbeSockets;

/// How long a read waits for a reply.
const READ_TIMEOUT: Duration = Duration::from_millis(20);

pub struct IcmpSockets {
    v4: Socket,
    /// The probe device's socket and the device's index, while it exists.
    tunnel: Option<(Socket, u32)>,
    buf: [MaybeUninit<u8>; 1500],
}

impl IcmpSockets {
    pub fn open() -> std::io::Result<IcmpSockets> {
        let v4 = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
        v4.set_read_timeout(Some(READ_TIMEOUT))?;
        // Its probes are written with their IP header (Don't Fragment set);
        // the kernel fills in the source, id, length and checksum.
        v4.set_header_included_v4(true)?;
        Ok(IcmpSockets { v4, tunnel: None, buf: [MaybeUninit::uninit(); 1500] })
    }

    /// A raw ICMPv6 socket on the probe device.
    fn tunnel_socket() -> Option<(Socket, u32)> {
        let index = nix::net::if_::if_nametoindex(crate::model::PROBE_VXLAN).ok()?;
        let sock = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).ok()?;
        sock.bind_device(Some(crate::model::PROBE_VXLAN.as_bytes())).ok()?;
        // Sized probes are never fragmented: too big is refused (EMSGSIZE).
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::Ipv6DontFrag, &true).ok()?;
        sock.set_read_timeout(Some(READ_TIMEOUT)).ok()?;
        Some((sock, index))
    }
}

impl ProbeSockets for IcmpSockets {
    fn refresh_tunnel(&mut self) -> bool {
        let index = nix::net::if_::if_nametoindex(crate::model::PROBE_VXLAN).ok();
        if self.tunnel.as_ref().map(|(_, i)| *i) != index {
            self.tunnel = Self::tunnel_socket();
        }
        self.tunnel.is_some()
    }

    fn send_underlay(&mut self, to: Ipv4Addr, id: u16, seq: u16) -> std::io::Result<()> {
        let addr: SocketAddr = (IpAddr::V4(to), 0).into();
        self.v4.send_to(&echo_datagram(to, id, seq, 36), &addr.into()).map(drop)
    }

    fn send_underlay_sized(&mut self, to: Ipv4Addr, id: u16, seq: u16, size: u32) -> std::io::Result<()> {
        let addr: SocketAddr = (IpAddr::V4(to), 0).into();
        self.v4.send_to(&echo_datagram(to, id, seq, size as usize), &addr.into()).map(drop)
    }

    fn send_tunnel(&mut self, to: Ipv6Addr, id: u16, seq: u16) -> std::io::Result<()> {
        let Some((s6, index)) = &self.tunnel else {
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no probe device"));
        };
        let addr = SocketAddr::V6(SocketAddrV6::new(to, 0, 0, *index));
        s6.send_to(&echo_request_v6(id, seq), &addr.into()).map(drop)
    }

    fn send_tunnel_sized(&mut self, to: Ipv6Addr, id: u16, seq: u16, size: u32) -> std::io::Result<()> {
        let Some((s6, index)) = &self.tunnel else {
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no probe device"));
        };
        let addr = SocketAddr::V6(SocketAddrV6::new(to, 0, 0, *index));
        s6.send_to(&echo_request_v6_sized(id, seq, size), &addr.into()).map(drop)
    }

    fn recv_underlay(&mut self) -> Option<(Ipv4Addr, u16, u16)> {
        let n = self.v4.recv(&mut self.buf).ok()?;
        // SAFETY: recv initialised the first n bytes.
        let data: Vec<u8> = self.buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
        parse_reply(&data)
    }

    fn recv_tunnel(&mut self) -> Option<(Ipv6Addr, u16, u16)> {
        let (s6, _) = self.tunnel.as_ref()?;
        let (n, from) = s6.recv_from(&mut self.buf).ok()?;
        // SAFETY: recv_from initialised the first n bytes.
        let data: Vec<u8> = self.buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
        let Some(SocketAddr::V6(from)) = from.as_socket() else { return None };
        parse_reply_v6(&data).map(|(id, seq)| (*from.ip(), id, seq))
    }
}

/// An IPv4 datagram of `size` bytes (at least header and echo) carrying
/// an echo request, Don't Fragment set; source, id, total length and
/// header checksum left for the kernel (a raw socket with IP_HDRINCL fills
/// them in).
pub fn echo_datagram(to: Ipv4Addr, id: u16, seq: u16, size: usize) -> Vec<u8> {
    let size = size.max(36);
    let mut d = vec![0u8; size];
    d[0] = 0x45;
    d[6] = 0x40; // DF
    d[8] = 64;
    d[9] = 1; // ICMP
    d[16..20].copy_from_slice(&to.octets());
    let icmp = &mut d[20..];
    icmp[0] = 8;
    icmp[4..6].copy_from_slice(&id.to_be_bytes());
    icmp[6..8].copy_from_slice(&seq.to_be_bytes());
    icmp[8..16].copy_from_slice(b"trellis!");
    let sum = checksum(icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    d
}

/// The Internet checksum.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo reply in a raw IPv4 datagram: (source, id, sequence).
pub fn parse_reply(datagram: &[u8]) -> Option<(Ipv4Addr, u16, u16)> {
    let ihl = (*datagram.first()? & 0x0f) as usize * 4;
    let icmp = datagram.get(ihl..ihl + 8)?;
    if icmp[0] != 0 || icmp[1] != 0 {
        return None;
    }
    let src = Ipv4Addr::new(datagram[12], datagram[13], datagram[14], datagram[15]);
    Some((src, u16::from_be_bytes([icmp[4], icmp[5]]), u16::from_be_bytes([icmp[6], icmp[7]])))
}

/// An ICMPv6 echo request (RFC 4443): type 128; the kernel fills in the
/// checksum of a raw ICMPv6 socket's packets.
pub fn echo_request_v6(id: u16, seq: u16) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0] = 128;
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(b"trellis!");
    p
}

/// The ICMPv6 echo request whose VXLAN packet is `size` bytes: the outer
/// IPv4, UDP and VXLAN headers and the inner Ethernet header
/// ([`crate::model::VXLAN_OVERHEAD`]) and IPv6 header (40) around it.
pub fn echo_request_v6_sized(id: u16, seq: u16, size: u32) -> Vec<u8> {
    let len = (size.saturating_sub(crate::model::VXLAN_OVERHEAD + IPV6_HEADER) as usize).max(16);
    let mut p = vec![0u8; len];
    p[..16].copy_from_slice(&echo_request_v6(id, seq));
    p
}

/// An IPv6 header's size.
const IPV6_HEADER: u32 = 40;

/// An ICMPv6 echo reply as a raw ICMPv6 socket reads it: (id, sequence).
pub fn parse_reply_v6(icmp: &[u8]) -> Option<(u16, u16)> {
    let h = icmp.get(..8)?;
    (h[0] == 129 && h[1] == 0).then(|| (u16::from_be_bytes([h[4], h[5]]), u16::from_be_bytes([h[6], h[7]])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sized_echoes_are_whole_datagrams_with_dont_fragment() {
        let d = echo_datagram(Ipv4Addr::new(192, 0, 2, 7), 0x8001, 9, 1400);
        assert_eq!(d.len(), 1400);
        assert_eq!((d[0], d[6] & 0x40, d[9]), (0x45, 0x40, 1), "IPv4, DF, ICMP");
        assert_eq!(&d[16..20], &[192, 0, 2, 7]);
        assert_eq!(checksum(&d[20..]), 0, "the echo's checksum covers its padding");
        assert_eq!(echo_datagram(Ipv4Addr::LOCALHOST, 1, 1, 0).len(), 36, "never shorter than header and echo");
    }

    #[test]
    fn echo_requests_carry_a_valid_checksum() {
        let d = echo_datagram(Ipv4Addr::LOCALHOST, 0x1234, 7, 36);
        let p = &d[20..];
        assert_eq!(checksum(p), 0, "a packet with its checksum sums to zero");
        assert_eq!((p[0], u16::from_be_bytes([p[4], p[5]]), u16::from_be_bytes([p[6], p[7]])), (8, 0x1234, 7));
    }

    #[test]
    fn replies_are_read_from_raw_datagrams() {
        let mut d = vec![0x45u8, 0, 0, 36, 0, 0, 0, 0, 64, 1, 0, 0, 198, 19, 0, 2, 198, 19, 0, 1];
        let mut icmp = echo_datagram(Ipv4Addr::LOCALHOST, 9, 3, 36)[20..].to_vec();
        icmp[0] = 0;
        d.extend_from_slice(&icmp);
        assert_eq!(parse_reply(&d), Some((Ipv4Addr::new(198, 19, 0, 2), 9, 3)));
        d[20] = 8; // a request, not a reply
        assert_eq!(parse_reply(&d), None);
        assert_eq!(parse_reply(&d[..22]), None, "truncated");
    }

    #[test]
    fn a_sized_tunnel_probe_makes_a_vxlan_packet_of_that_size() {
        let p = echo_request_v6_sized(5, 6, 1500);
        // 1500 = 20 IPv4 + 8 UDP + 8 VXLAN + 14 Ethernet + 40 IPv6 + ICMPv6.
        assert_eq!(p.len(), 1410);
        assert_eq!(&p[..16], &echo_request_v6(5, 6));
        assert_eq!(echo_request_v6_sized(5, 6, 0).len(), 16, "never shorter than an echo");
    }

    #[test]
    fn tunnel_probes_are_icmpv6_echoes_and_replies() {
        let p = echo_request_v6(5, 6);
        assert_eq!((p[0], p[1]), (128, 0));
        let mut r = p;
        r[0] = 129;
        assert_eq!(parse_reply_v6(&r), Some((5, 6)));
        assert_eq!(parse_reply_v6(&p), None, "a request is not a reply");
        assert_eq!(parse_reply_v6(&r[..7]), None, "truncated");
    }
}
