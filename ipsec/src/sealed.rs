//! Key rings at rest: sealed (AES-256-GCM) under a cluster key every agent
//! reads from a root-only file, so that someone who can read the store
//! alone learns no ESP key.
//!
//! The file holds one secret per line (blank lines and `#` comments
//! skipped), each at least 32 characters (`openssl rand -hex 32` makes
//! one): the first seals, every line opens — so a new key goes in first on
//! every host, the rings are sealed again under it
//! (`trellisctl cluster rotate-key`), and the old line can go. Each secret
//! is stretched with HKDF-SHA256 into the AEAD key; its id (8 hex digits,
//! from the same HKDF) names it in sealed records and host records, never
//! the key. A sealed ring is bound to its network (the network id is the
//! associated data): copied under another network, it does not open.

use aes_gcm::aead::{Aead, Generate, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::KeyRing;

/// The shortest secret a line may hold.
pub const MIN_SECRET_LEN: usize = 32;

const SALT: &[u8] = b"trellis cluster key v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("the cluster key file holds no key (one secret per line, at least {MIN_SECRET_LEN} characters)")]
    Empty,
    #[error("line {0} of the cluster key file is shorter than {MIN_SECRET_LEN} characters")]
    Short(usize),
    #[error("sealed under cluster key {0}, which this host does not have (add it to its --cluster-key-file)")]
    UnknownKey(String),
    #[error("does not open under cluster key {0}: it was altered, or sealed for another network")]
    Tampered(String),
    #[error("not a key ring: {0}")]
    Corrupt(String),
}

/// One cluster key: its id and the AEAD key.
#[derive(Clone)]
struct ClusterKey {
    id: String,
    key: [u8; 32],
}

impl ClusterKey {
    fn derive(secret: &[u8]) -> ClusterKey {
        let hk = Hkdf::<Sha256>::new(Some(SALT), secret);
        let mut key = [0u8; 32];
        hk.expand(b"seal", &mut key).expect("32 bytes is a valid HKDF length");
        let mut id = [0u8; 4];
        hk.expand(b"id", &mut id).expect("4 bytes is a valid HKDF length");
        ClusterKey { id: id.iter().map(|b| format!("{b:02x}")).collect(), key }
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&Key::<Aes256Gcm>::from(self.key))
    }
}

/// The cluster keys of this host: the first seals, all open.
#[derive(Clone)]
pub struct ClusterKeys {
    keys: Vec<ClusterKey>,
}

impl std::fmt::Debug for ClusterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterKeys({:?})", self.ids())
    }
}

/// A sealed key ring as the store holds it.
#[derive(Serialize, Deserialize)]
struct Sealed {
    /// The id of the cluster key that sealed it.
    sealed: String,
    nonce: String,
    data: String,
}

impl ClusterKeys {
    /// The keys of a cluster key file's text.
    pub fn parse(text: &str) -> Result<ClusterKeys, SealError> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.len() < MIN_SECRET_LEN {
                return Err(SealError::Short(i + 1));
            }
            keys.push(ClusterKey::derive(line.as_bytes()));
        }
        if keys.is_empty() {
            return Err(SealError::Empty);
        }
        Ok(ClusterKeys { keys })
    }

    /// The id of the key that seals.
    pub fn current(&self) -> &str {
        &self.keys[0].id
    }

    /// Every key's id, the sealing one first.
    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.id.clone()).collect()
    }

    /// `ring` of network `network_id`, sealed under the current key: the
    /// bytes the store keeps.
    pub fn seal(&self, network_id: &str, ring: &KeyRing) -> Vec<u8> {
        let k = &self.keys[0];
        let nonce = Nonce::generate();
        let plain = serde_json::to_vec(ring).expect("a key ring serializes");
        let data = k
            .cipher()
            .encrypt(&nonce, Payload { msg: &plain, aad: network_id.as_bytes() })
            .expect("AES-GCM seals any length a ring has");
        let sealed = Sealed { sealed: k.id.clone(), nonce: hex(&nonce), data: hex(&data) };
        serde_json::to_vec(&sealed).expect("a sealed ring serializes")
    }

    /// The ring of network `network_id` in `bytes` (as [`seal`] made them),
    /// and the id of the key that sealed it.
    ///
    /// [`seal`]: ClusterKeys::seal
    pub fn open(&self, network_id: &str, bytes: &[u8]) -> Result<(KeyRing, String), SealError> {
        let s = sealed(bytes)?;
        let k = self.keys.iter().find(|k| k.id == s.sealed).ok_or_else(|| SealError::UnknownKey(s.sealed.clone()))?;
        let nonce: [u8; 12] =
            unhex(&s.nonce).and_then(|n| n.try_into().ok()).ok_or_else(|| SealError::Corrupt("bad nonce".into()))?;
        let data = unhex(&s.data).ok_or_else(|| SealError::Corrupt("bad data".into()))?;
        let plain = k
            .cipher()
            .decrypt(&Nonce::from(nonce), Payload { msg: &data, aad: network_id.as_bytes() })
            .map_err(|_| SealError::Tampered(k.id.clone()))?;
        let ring = serde_json::from_slice(&plain).map_err(|e| SealError::Corrupt(e.to_string()))?;
        Ok((ring, k.id.clone()))
    }
}

/// The id of the cluster key `bytes` (a stored ring) were sealed under.
pub fn sealed_by(bytes: &[u8]) -> Result<String, SealError> {
    Ok(sealed(bytes)?.sealed)
}

fn sealed(bytes: &[u8]) -> Result<Sealed, SealError> {
    serde_json::from_slice(bytes).map_err(|_| SealError::Corrupt("not a sealed key ring".into()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Secret;

    const A: &str = "0123456789abcdef0123456789abcdef-first";
    const B: &str = "fedcba9876543210fedcba9876543210-second";

    fn ring() -> KeyRing {
        KeyRing::new(Secret::generate(), 1_000)
    }

    #[test]
    fn a_sealed_ring_holds_no_key_and_opens_for_its_network_only() {
        let keys = ClusterKeys::parse(&format!("# the cluster's key\n\n{A}\n")).unwrap();
        let r = ring();
        let sealed = keys.seal("net1", &r);
        let text = String::from_utf8_lossy(&sealed);
        let plain = serde_json::to_string(&r).unwrap();
        // No secret's hex (nor any part of the ring's JSON) is in the record.
        for secret in plain.split('"').filter(|s| s.len() == 64) {
            assert!(!text.contains(secret), "{text}");
            assert!(!text.contains(&secret[..16]), "{text}");
        }
        assert_eq!(keys.open("net1", &sealed).unwrap(), (r, keys.current().to_string()));
        assert_eq!(keys.open("net2", &sealed).unwrap_err(), SealError::Tampered(keys.current().into()));
        // Sealed twice: different nonces, different bytes.
        assert_ne!(keys.seal("net1", &ring()), keys.seal("net1", &ring()));
    }

    #[test]
    fn the_first_key_seals_and_every_key_opens() {
        let old = ClusterKeys::parse(A).unwrap();
        let both = ClusterKeys::parse(&format!("{B}\n{A}\n")).unwrap();
        assert_eq!(both.ids(), vec![both.current().to_string(), old.current().to_string()]);
        assert_ne!(both.current(), old.current());
        let r = ring();
        let by_old = old.seal("n", &r);
        assert_eq!(both.open("n", &by_old).unwrap(), (r.clone(), old.current().to_string()));
        let by_new = both.seal("n", &r);
        assert_eq!(sealed_by(&by_new).unwrap(), both.current());
        assert_eq!(old.open("n", &by_new).unwrap_err(), SealError::UnknownKey(both.current().into()));
    }

    #[test]
    fn altered_records_and_bad_key_files_are_refused_clearly() {
        let keys = ClusterKeys::parse(A).unwrap();
        let mut s: serde_json::Value = serde_json::from_slice(&keys.seal("n", &ring())).unwrap();
        let data = s["data"].as_str().unwrap().to_string();
        let flipped = format!("{}{}", if data.starts_with('0') { "1" } else { "0" }, &data[1..]);
        s["data"] = flipped.into();
        let err = keys.open("n", &serde_json::to_vec(&s).unwrap()).unwrap_err();
        assert!(matches!(err, SealError::Tampered(_)), "{err}");
        let plain = serde_json::to_vec(&ring()).unwrap();
        assert!(matches!(keys.open("n", &plain).unwrap_err(), SealError::Corrupt(_)));
        assert_eq!(ClusterKeys::parse("# nothing\n\n").unwrap_err(), SealError::Empty);
        assert_eq!(ClusterKeys::parse(&format!("{A}\nshort\n")).unwrap_err(), SealError::Short(2));
        assert!(SealError::UnknownKey("ab12cd34".into()).to_string().contains("--cluster-key-file"));
    }
}
