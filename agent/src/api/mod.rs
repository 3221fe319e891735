//! The agent's front doors, translation only: the gRPC service that
//! `trellisctl` and `trellis-cni` use ([`grpc`]) and the Docker remote
//! network and IPAM drivers ([`docker`]).

pub mod docker;
pub mod grpc;
