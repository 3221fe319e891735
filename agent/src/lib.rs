//! The Trellis agent: `trellisd` (the daemon) and `trellisctl` (its CLI).
//!
//! The modules, in the order data flows through them:
//!
//! * [`model`]: the records kept in the store, their keys, the names of the
//!   kernel objects derived from them. Pure.
//! * [`state`]: the desired state in the store — networks, endpoints,
//!   services, hosts, encryption keys, the hosts' mesh addresses — written
//!   in single transactions.
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
//! The dependency rule (checked by `scripts/check-layers.sh`, which the
//! test script runs):
//! * `model`, `reconcile` but its runner, and `dataplane` but `linux/` and
//!   the fake are pure: they import no `tokio`, netlink, `aya`, `nix`,
//!   `socket2`, `trellis_store` or nftables executor, and do no file or
//!   process I/O;
//! * `api` translates only: it never writes the store or touches the kernel;
//! * only `dataplane::linux` touches the kernel (netlink, `aya`, `socket2`);
//!   everything else asks through a [`dataplane::Dataplane`] method or an
//!   [`dataplane::Action`].

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
