//! The Trellis agent: `trellisd` (the daemon) and `trellisctl` (its CLI).
//!
//! * [`cluster`]: desired state in the store (networks, endpoints).
//! * [`reconcile`]: desired vs observed → diff → apply, pure diff.
//! * [`dataplane`]: the one kernel boundary; [`netlink`] implements it.
//! * [`egress`]: nftables rules as values.
//! * [`api`]: the gRPC service; [`daemon`]: wiring and lifecycle.

pub mod api;
pub use trellis_plugin_api::client;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod dns;
pub mod docker;
pub mod egress;
pub mod encryption;
pub mod engine;
pub mod hosts;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod netlink;
pub mod netns;
pub mod probe;
pub mod reconcile;
pub mod xfrm;
