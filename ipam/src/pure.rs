//! Address arithmetic with no I/O: subnet choice, blocks, reserved and free
//! addresses. IPv4 and IPv6 go through the same code (offsets are u128).

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

/// Whether two prefixes share any address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v) => u32::from(v) as u128,
        IpAddr::V6(v) => u128::from(v),
    }
}

fn from_u128(like: IpAddr, n: u128) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4((n as u32).into()),
        IpAddr::V6(_) => IpAddr::V6(n.into()),
    }
}

/// Offset of `ip` inside `net` (caller checks containment).
pub fn offset(net: &IpNet, ip: IpAddr) -> u128 {
    to_u128(ip) - to_u128(net.network())
}

/// The address at `offset` inside `net`.
pub fn nth(net: &IpNet, offset: u128) -> IpAddr {
    from_u128(net.network(), to_u128(net.network()) + offset)
}

/// Number of addresses in `net` (saturating for huge IPv6 prefixes).
pub fn size(net: &IpNet) -> u128 {
    let bits = net.max_prefix_len() - net.prefix_len();
    if bits >= 128 { u128::MAX } else { 1u128 << bits }
}

/// The first `prefix_len` subnet of `pool` that overlaps nothing in
/// `taken` or `avoid`.
pub fn choose_subnet(pool: &IpNet, prefix_len: u8, taken: &[IpNet], avoid: &[IpNet]) -> Option<IpNet> {
    pool.subnets(prefix_len).ok()?.find(|c| !taken.iter().chain(avoid).any(|t| overlaps(c, t)))
}

/// The block length used for a subnet: the configured block, or the
/// whole subnet when it is smaller than a block.
pub fn block_len(subnet: &IpNet, configured: u8) -> u8 {
    configured.max(subnet.prefix_len()).min(subnet.max_prefix_len())
}

/// The block of `subnet` that holds `ip`.
pub fn block_of(subnet: &IpNet, block_len: u8, ip: IpAddr) -> IpNet {
    let len = block_len.max(subnet.prefix_len());
    IpNet::new(ip, len).expect("block length within the address family").trunc()
}

/// Addresses of `subnet` no endpoint may have: the network address, the
/// IPv4 broadcast address (for prefixes up to /30) and the gateway.
pub fn reserved(subnet: &IpNet, gateway: Option<IpAddr>) -> Vec<IpAddr> {
    let mut r = Vec::with_capacity(3);
    let small = subnet.max_prefix_len() - subnet.prefix_len() < 2;
    if !small {
        r.push(subnet.network());
        if subnet.network().is_ipv4() {
            r.push(subnet.broadcast());
        }
    }
    r.extend(gateway);
    r
}

/// The default gateway of a subnet: its first usable address.
pub fn default_gateway(subnet: &IpNet) -> Option<IpAddr> {
    if size(subnet) < 4 {
        return None;
    }
    Some(nth(subnet, 1))
}

/// The ULA /48 of a 40-bit global id (RFC 4193: `fd` then the id).
pub fn ula_48(id: [u8; 5]) -> IpNet {
    let mut o = [0u8; 16];
    o[0] = 0xfd;
    o[1..6].copy_from_slice(&id);
    IpNet::new(IpAddr::V6(std::net::Ipv6Addr::from(o)), 48).expect("/48 is a valid prefix")
}

/// The first address of `block` neither used nor reserved.
pub fn first_free(block: &IpNet, used: &BTreeSet<IpAddr>, reserved: &[IpAddr]) -> Option<IpAddr> {
    let n = size(block).min(1 << 20);
    (0..n).map(|o| nth(block, o)).find(|ip| !used.contains(ip) && !reserved.contains(ip))
}

/// The address just below `ip` inside `subnet`, if any.
pub fn prev(subnet: &IpNet, ip: IpAddr) -> Option<IpAddr> {
    let off = to_u128(ip).checked_sub(to_u128(subnet.network()))?;
    (off > 0 && subnet.contains(&ip)).then(|| nth(subnet, off - 1))
}

/// The highest address of `subnet` that is neither used nor reserved
/// (among its top 2^20: a /64 is not walked to the bottom), below an IPv6
/// subnet's top 128, the subnet anycast addresses of RFC 2526.
pub fn last_free(subnet: &IpNet, used: &BTreeSet<IpAddr>, reserved: &[IpAddr]) -> Option<IpAddr> {
    let anycast = if subnet.network().is_ipv6() && subnet.prefix_len() <= 120 { 128 } else { 0 };
    let top = size(subnet) - anycast;
    let n = top.min(1 << 20);
    (top - n..top).rev().map(|o| nth(subnet, o)).find(|ip| !used.contains(ip) && !reserved.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn last_free_counts_down_past_broadcast_and_used() {
        let used: BTreeSet<IpAddr> = [ip("10.0.0.254")].into();
        let r = reserved(&net("10.0.0.0/24"), Some(ip("10.0.0.1")));
        assert_eq!(last_free(&net("10.0.0.0/24"), &used, &r), Some(ip("10.0.0.253")));
        let tiny = net("10.0.0.0/30");
        let all: BTreeSet<IpAddr> = [ip("10.0.0.1"), ip("10.0.0.2")].into();
        assert_eq!(last_free(&tiny, &all, &reserved(&tiny, None)), None);
        // A /64's top (not the top of its first 2^20 addresses), below
        // its subnet anycast addresses.
        let v6 = net("fd00:1::/64");
        assert_eq!(last_free(&v6, &BTreeSet::new(), &reserved(&v6, None)), Some(ip("fd00:1::ffff:ffff:ffff:ff7f")));
    }

    #[test]
    fn overlap_is_symmetric_and_exact() {
        assert!(overlaps(&net("10.0.0.0/8"), &net("10.1.2.0/24")));
        assert!(overlaps(&net("10.1.2.0/24"), &net("10.0.0.0/8")));
        assert!(overlaps(&net("10.1.2.0/24"), &net("10.1.2.0/24")));
        assert!(!overlaps(&net("10.1.2.0/24"), &net("10.1.3.0/24")));
        assert!(!overlaps(&net("10.1.2.0/25"), &net("10.1.2.128/25")));
    }

    #[test]
    fn subnet_choice_skips_taken_and_host_routes() {
        let pool = net("10.0.0.0/8");
        assert_eq!(choose_subnet(&pool, 24, &[], &[]), Some(net("10.0.0.0/24")));
        let taken = [net("10.0.0.0/24"), net("10.0.1.0/24")];
        let avoid = [net("10.0.2.0/23")];
        assert_eq!(choose_subnet(&pool, 24, &taken, &avoid), Some(net("10.0.4.0/24")));
        // A host route covering the whole pool leaves nothing.
        assert_eq!(choose_subnet(&net("192.168.0.0/23"), 24, &[], &[net("192.168.0.0/16")]), None);
        assert_eq!(choose_subnet(&net("192.168.0.0/24"), 24, &[net("192.168.0.0/24")], &[]), None);
    }

    #[test]
    fn blocks_and_reserved() {
        let s = net("10.30.0.0/24");
        assert_eq!(block_len(&s, 26), 26);
        assert_eq!(block_len(&net("10.30.0.0/28"), 26), 28);
        assert_eq!(block_of(&s, 26, ip("10.30.0.77")), net("10.30.0.64/26"));
        assert_eq!(block_of(&net("10.30.0.0/28"), 28, ip("10.30.0.7")), net("10.30.0.0/28"));
        assert_eq!(default_gateway(&s), Some(ip("10.30.0.1")));
        assert_eq!(reserved(&s, Some(ip("10.30.0.1"))), vec![ip("10.30.0.0"), ip("10.30.0.255"), ip("10.30.0.1")]);
        // /31 and /32 have no network or broadcast address to skip.
        assert!(reserved(&net("10.0.0.0/31"), None).is_empty());
        assert_eq!(default_gateway(&net("10.0.0.0/31")), None);
    }

    #[test]
    fn first_free_skips_used_and_reserved() {
        let b = net("10.30.0.0/30");
        let used: BTreeSet<_> = [ip("10.30.0.2")].into();
        let res = [ip("10.30.0.0"), ip("10.30.0.1")];
        assert_eq!(first_free(&b, &used, &res), Some(ip("10.30.0.3")));
        let used: BTreeSet<_> = [ip("10.30.0.2"), ip("10.30.0.3")].into();
        assert_eq!(first_free(&b, &used, &res), None);
    }

    #[test]
    fn a_ula_48_is_fd_and_the_global_id() {
        assert_eq!(ula_48([0x12, 0x34, 0x56, 0x78, 0x9a]), net("fd12:3456:789a::/48"));
    }

    #[test]
    fn ipv6_arithmetic_works_the_same() {
        let s = net("fd00:1::/64");
        assert_eq!(block_len(&s, 122), 122);
        assert_eq!(nth(&s, 5), ip("fd00:1::5"));
        assert_eq!(offset(&s, ip("fd00:1::5")), 5);
        assert_eq!(block_of(&s, 122, ip("fd00:1::45")), net("fd00:1::40/122"));
        assert_eq!(reserved(&s, Some(ip("fd00:1::1"))), vec![ip("fd00:1::"), ip("fd00:1::1")]);
    }
}
