//! The key schedule: a network's secret (one per epoch) and, derived from
//! it with HKDF-SHA256, the key and SPI of each direction between two hosts.
//! Both hosts of a pair derive the same values with no exchange; a new
//! epoch, another direction or another pair gives other keys and SPIs.

use std::fmt;
use std::net::IpAddr;

use hkdf::Hkdf;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;

/// AES-256 key plus the 4-byte salt `rfc4106(gcm(aes))` takes.
pub const SA_KEY_LEN: usize = 36;
/// The lowest SPI Trellis uses: 1..=255 are reserved (RFC 4303).
pub const MIN_SPI: u32 = 0x100;
const LABEL: &[u8] = b"trellis esp v1";

/// A network's secret for one epoch: 32 random bytes. Never printed:
/// `Debug` and `Display` show only a fingerprint.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; 32]);

impl Secret {
    /// A new random secret (the operating system's CSPRNG via `rand`).
    pub fn generate() -> Secret {
        Secret(rand::random())
    }

    pub fn from_bytes(b: [u8; 32]) -> Secret {
        Secret(b)
    }

    /// A short, non-reversible identifier to tell secrets apart in logs.
    pub fn fingerprint(&self) -> String {
        let hk = Hkdf::<Sha256>::new(Some(LABEL), &self.0);
        let mut out = [0u8; 4];
        hk.expand(b"fingerprint", &mut out).expect("4 bytes is a valid HKDF length");
        out.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(fp:{})", self.fingerprint())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let bytes: Vec<u8> = (0..s.len())
            .step_by(2)
            .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| serde::de::Error::custom("a network secret is 64 hex digits"))?;
        let arr: [u8; 32] =
            bytes.try_into().map_err(|_| serde::de::Error::custom("a network secret is 64 hex digits"))?;
        Ok(Secret(arr))
    }
}

/// What one direction between two hosts uses in one epoch.
#[derive(Clone, PartialEq, Eq)]
pub struct SaMaterial {
    pub spi: u32,
    pub key: [u8; SA_KEY_LEN],
}

impl fmt::Debug for SaMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SaMaterial {{ spi: {:#010x}, key: <redacted> }}", self.spi)
    }
}

fn octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The key and SPI for packets from `src` to `dst` on the network whose
/// VXLAN traffic uses `port`, in `epoch`. The SPI's top bit is set and it is
/// never below [`MIN_SPI`].
pub fn derive(secret: &Secret, epoch: u32, src: IpAddr, dst: IpAddr, port: u16) -> SaMaterial {
    let hk = Hkdf::<Sha256>::new(Some(LABEL), &secret.0);
    let mut info = Vec::with_capacity(40);
    info.extend_from_slice(&epoch.to_be_bytes());
    info.extend_from_slice(&octets(src));
    info.extend_from_slice(&octets(dst));
    info.extend_from_slice(&port.to_be_bytes());
    let mut okm = [0u8; SA_KEY_LEN + 4];
    hk.expand(&info, &mut okm).expect("40 bytes is a valid HKDF length");
    let mut key = [0u8; SA_KEY_LEN];
    key.copy_from_slice(&okm[..SA_KEY_LEN]);
    let spi = u32::from_be_bytes(okm[SA_KEY_LEN..].try_into().expect("4 bytes")) | 0x8000_0000;
    SaMaterial { spi: spi.max(MIN_SPI), key }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::net::Ipv4Addr;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    #[test]
    fn both_ends_derive_the_same_material() {
        let s = Secret::from_bytes([7; 32]);
        let a = derive(&s, 1, ip(1), ip(2), 4790);
        let b = derive(&s.clone(), 1, ip(1), ip(2), 4790);
        assert_eq!(a, b);
        assert!(a.spi >= 0x8000_0000);
    }

    #[test]
    fn direction_epoch_pair_port_and_secret_all_change_the_material() {
        let s = Secret::from_bytes([7; 32]);
        let base = derive(&s, 1, ip(1), ip(2), 4790);
        for other in [
            derive(&s, 1, ip(2), ip(1), 4790),
            derive(&s, 2, ip(1), ip(2), 4790),
            derive(&s, 1, ip(1), ip(3), 4790),
            derive(&s, 1, ip(1), ip(2), 4791),
            derive(&Secret::from_bytes([8; 32]), 1, ip(1), ip(2), 4790),
        ] {
            assert_ne!(other.key, base.key);
            assert_ne!(other.spi, base.spi);
        }
    }

    #[test]
    fn spis_are_unique_across_a_cluster_of_pairs_and_epochs() {
        let s = Secret::generate();
        let mut seen = BTreeSet::new();
        for epoch in 1..=3 {
            for a in 1..=40u8 {
                for b in 1..=40u8 {
                    if a != b {
                        assert!(seen.insert(derive(&s, epoch, ip(a), ip(b), 4790).spi));
                    }
                }
            }
        }
    }

    #[test]
    fn secrets_are_random_round_trip_as_hex_and_never_print() {
        let a = Secret::generate();
        assert_ne!(a, Secret::generate());
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json.len(), 66);
        assert_eq!(serde_json::from_str::<Secret>(&json).unwrap(), a);
        let shown = format!("{a:?} {:?}", derive(&a, 1, ip(1), ip(2), 1));
        let hex = json.trim_matches('"');
        assert!(!shown.contains(&hex[..8]), "{shown}");
        assert!(shown.contains("redacted"));
        assert!(serde_json::from_str::<Secret>("\"abcd\"").is_err());
        assert!(serde_json::from_str::<Secret>(&format!("\"{}\"", "zz".repeat(32))).is_err());
    }
}
