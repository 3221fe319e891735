//! Service discovery DNS for Trellis networks.
//!
//! * [`zone`]: the scoped names as a value and the rules that answer from
//!   it (pure, unit-tested).
//! * [`limit`]: each client's share of the server (a token bucket per
//!   client address).
//! * [`server`]: the hickory server around it: per-gateway listeners, the
//!   client's scope from its source address, forwarding upstream.

pub mod limit;
pub mod server;
mod udp;
pub mod zone;

pub use server::{Core, Handler, LOCAL_TTL, Listeners, Stats, Upstreams};
pub use zone::{Answer, Endpoint, Network, QType, Service, Zone};
