//! What the agent tells about itself and its peers: Prometheus metrics
//! ([`metrics`]), the live flow and drop monitor ([`monitor`]), and the
//! active probes of every peer over the underlay and through the tunnel
//! ([`probe`]).

pub mod metrics;
pub mod monitor;
pub mod probe;
