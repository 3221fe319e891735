//! The Trellis agent: `trellisd` (the daemon) and `trellisctl` (its CLI).
//!
//! The modules, in the order data flows through them:
//!
//! * [`model`]: the records kept in the store, their keys, the names of the
//!   kernel objects derived from them. Pure.
//! * [`state`]: the desired state in the store — networks, endpoints,
//!   services, hosts, encryption keys — written in single transactions.
//! * [`reconcile`]: desired state → the kernel state a host should have →
//!   the diff against what it has → actions. Pure but the runner.
//! * [`dataplane`]: the one kernel boundary: the [`dataplane::Dataplane`]
//!   trait, its actions and observations as values, a fake, and the Linux
//!   implementation in [`dataplane::linux`].
//! * [`app`]: the use cases (attach with rollback, detach, networks,
//!   services, status), typed; every front door comes in here.
//! * [`api`]: the gRPC service ([`api::grpc`]) and the Docker network and
//!   IPAM drivers ([`api::docker`]).
//! * [`dns`]: the agent's side of service discovery (zone, server).
//! * [`telemetry`]: metrics, the flow monitor, the peer probes.
//! * [`daemon`]: configuration, wiring and lifecycle of `trellisd`.
//!
//! The dependency rule (checked by `scripts/check-layers.sh`): `model` and
//! the pure parts of `reconcile` and `dataplane` import no `tokio`,
//! `rtnetlink`, `netlink_*`, `aya`, `nftables` or `trellis_store`; only
//! `dataplane::linux` touches the kernel.

pub mod api;
pub mod app;
pub use trellis_plugin_api::client;
pub mod daemon;
pub mod dataplane;
pub mod dns;
pub mod model;
pub mod reconcile;
pub mod state;
pub mod telemetry;
