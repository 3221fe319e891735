//! Level-triggered reconciliation: the kernel state a host should have is
//! computed from the whole desired state in the store ([`mod@desired`]), compared
//! with what the kernel has ([`mod@diff`]), and the difference applied. Both
//! steps are pure; the [`Reconciler`] ([`runner`]) runs them against a
//! [`crate::dataplane::Dataplane`]. Between full passes, the commonest
//! change of a large cluster (another host's endpoint) patches the last
//! desired state and applies only its own entries ([`incremental`]).

pub mod desired;
pub mod diff;
pub mod incremental;
pub mod runner;
#[cfg(test)]
mod tests;

pub use desired::tables::tables;
pub use desired::{DesiredBridge, DesiredHost, DesiredVxlan, desired, desired_host};
pub use diff::diff;
pub use runner::{DesiredSource, PassReport, ReconcileError, Reconciler, Snapshot};

use std::net::IpAddr;

use crate::dataplane::Mac;

/// Who this host is, as the desired state needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub host: String,
    /// Underlay address; without one the host builds no tunnels.
    pub underlay: Option<IpAddr>,
    /// The interface that has the underlay address: outside clients reach
    /// the routing mesh's ports there.
    pub uplink: Option<String>,
    pub vtep_mac: Mac,
    pub vxlan_port: u16,
    /// The eBPF endpoint program could be loaded: attach it everywhere.
    pub ebpf: bool,
    /// This host answers DNS on the gateways: endpoints' queries to any
    /// other resolver are redirected there.
    pub dns_intercept: bool,
    /// The datapath answers plain A queries itself (the in-kernel DNS path).
    pub dns_kernel: bool,
    /// This host's encrypted tunnels carry ESP in UDP (`--encryption-transport
    /// udp`): towards every peer. Towards a peer that asks for it, they do
    /// either way.
    pub esp_in_udp: bool,
    /// The cluster's ESP-in-UDP port.
    pub esp_udp_port: u16,
}

impl Identity {
    /// An identity with no underlay (single host, tests).
    pub fn local(host: &str) -> Identity {
        Identity {
            host: host.to_string(),
            underlay: None,
            uplink: None,
            vtep_mac: Mac([2, 0, 0, 0, 0, 1]),
            vxlan_port: 4789,
            ebpf: false,
            dns_intercept: false,
            dns_kernel: false,
            esp_in_udp: false,
            esp_udp_port: trellis_ipsec::xfrm::ESP_IN_UDP_PORT,
        }
    }
}
