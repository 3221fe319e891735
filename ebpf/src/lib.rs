//! The Trellis eBPF datapath (anti-spoofing, tenant isolation, service VIP
//! load balancing, DNS interception).
//!
//! Not built yet: this crate holds the place the design gives it in the
//! workspace. The programs (C, compiled by `build.rs` with clang-19), the
//! map layouts and the aya loader arrive with the eBPF datapath issue.
