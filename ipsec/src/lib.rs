//! Encrypted networks as pure logic: the key schedule ([`keys`]), the
//! rotation state machine ([`rotation`]) and the kernel IPsec state a host
//! should have, with the xfrm netlink messages that program it ([`xfrm`]).
//! The agent keeps the rings in the store and sends the messages.

pub mod keys;
pub mod rotation;
pub mod sealed;
pub mod xfrm;

pub use keys::{SaMaterial, Secret};
pub use rotation::{Ack, KeyRing, Policy, Reason, Step, Triggers};
pub use sealed::{ClusterKeys, SealError};
pub use xfrm::{Dir, EncryptedNet, ObservedXfrm, PolicyId, SaId, SaSpec, XfrmDiff, XfrmOp, XfrmState};
