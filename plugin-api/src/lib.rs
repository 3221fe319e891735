//! What engines and clients speak to Trellis.
//!
//! * [`proto`]: the agent's gRPC API (`proto/trellis.proto`).
//! * [`validate`]: checks every request is put through at the edge, so a bad
//!   input becomes a clear message before anything is written.

pub mod validate;

/// The gRPC API of `trellisd`.
pub mod proto {
    tonic::include_proto!("trellis.v1");
}

pub mod client;
pub mod docker;
