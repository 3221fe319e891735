//! MAC addresses as one type: six octets in memory, `aa:bb:cc:dd:ee:ff` in
//! the store, the API and logs (so stored records stay as they were when
//! MACs were kept as strings).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (expected six hex octets separated by colons, like 02:42:0a:00:00:02)")]
pub struct BadMac(pub String);

impl Mac {
    pub const fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// A random locally administered unicast address.
    pub fn random_local() -> Mac {
        let mut mac: [u8; 6] = rand::random();
        mac[0] = (mac[0] & 0xfc) | 0x02;
        Mac(mac)
    }

    /// An endpoint's MAC, derived from its address (as Docker's overlay
    /// does): an address that is released and reused comes back with the
    /// same MAC, so the neighbour caches of the containers that talked to
    /// its previous holder stay right (no stale-ARP black hole after a
    /// reconnect). Unique within a network, which is one L2 domain.
    pub fn for_ip(ip: IpAddr) -> Mac {
        let o = match ip {
            IpAddr::V4(v4) => v4.octets(),
            IpAddr::V6(v6) => {
                let o = v6.octets();
                [o[12], o[13], o[14], o[15]]
            }
        };
        Mac([0x02, 0x42, o[0], o[1], o[2], o[3]])
    }

    /// The IPv6 link-local address a device with this MAC takes (EUI-64).
    pub fn link_local(&self) -> Ipv6Addr {
        let m = self.0;
        Ipv6Addr::new(
            0xfe80,
            0,
            0,
            0,
            u16::from_be_bytes([m[0] ^ 0x02, m[1]]),
            u16::from_be_bytes([m[2], 0xff]),
            u16::from_be_bytes([0xfe, m[3]]),
            u16::from_be_bytes([m[4], m[5]]),
        )
    }
}

impl From<[u8; 6]> for Mac {
    fn from(o: [u8; 6]) -> Mac {
        Mac(o)
    }
}

impl From<Mac> for [u8; 6] {
    fn from(m: Mac) -> [u8; 6] {
        m.0
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = BadMac;

    fn from_str(s: &str) -> Result<Mac, BadMac> {
        let bad = || BadMac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.is_empty() || p.len() > 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_addresses_are_eui64_of_the_mac() {
        assert_eq!(
            Mac([0x02, 0x42, 0xac, 0x11, 0x00, 0x02]).link_local(),
            "fe80::42:acff:fe11:2".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            Mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]).link_local(),
            "fe80::5054:ff:fe12:3456".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn macs_are_local_unicast_and_round_trip() {
        assert_eq!(Mac::for_ip("10.1.2.3".parse().unwrap()), Mac([2, 0x42, 10, 1, 2, 3]));
        assert_eq!(Mac::for_ip("fd00::a:102:304".parse().unwrap()), Mac([2, 0x42, 1, 2, 3, 4]));
        for _ in 0..100 {
            let m = Mac::random_local();
            assert_eq!(m.0[0] & 0x01, 0, "unicast");
            assert_eq!(m.0[0] & 0x02, 0x02, "locally administered");
            assert_eq!(m.to_string().parse::<Mac>(), Ok(m));
        }
        for bad in
            ["02:00:00:00:00", "zz:00:00:00:00:00", "02:00:00:00:00:00:00", "", "002:00:00:00:00:00", "02::00:00:00:00"]
        {
            assert_eq!(bad.parse::<Mac>(), Err(BadMac(bad.into())), "{bad:?}");
        }
        assert_eq!("02:AB:00:00:00:0F".parse::<Mac>(), Ok(Mac([2, 0xab, 0, 0, 0, 0xf])));
    }

    #[test]
    fn stored_as_the_string_it_always_was() {
        let m = Mac([0x02, 0x42, 0x0a, 0, 0, 0x1f]);
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"02:42:0a:00:00:1f\"");
        assert_eq!(serde_json::from_str::<Mac>("\"02:42:0a:00:00:1f\"").unwrap(), m);
        let err = serde_json::from_str::<Mac>("\"nope\"").unwrap_err().to_string();
        assert!(err.contains("is not a MAC address"), "{err}");
        assert_eq!(format!("{m:?}"), "02:42:0a:00:00:1f");
    }
}
