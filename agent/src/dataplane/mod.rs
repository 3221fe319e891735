//! The kernel boundary: one trait through which the agent observes and
//! changes host networking. The netlink/nftables implementation lives in
//! [`crate::dataplane::linux`]; [`FakeDataplane`] records operations for unit tests.

pub mod action;
pub mod egress;
pub mod fake;
pub mod linux;
pub mod observed;
pub mod tables;

pub use action::{Action, EndpointSpec, MeshVethSpec, ProgramSpec, Sysctl, VxlanSpec};
pub use fake::FakeDataplane;
pub use observed::{ContainerLink, LinkKind, Observed, ObservedLink};
pub use tables::{TableOps, Tables};

pub use crate::model::Mac;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("netlink {call} failed for {object}: {source}")]
    Netlink {
        call: &'static str,
        object: String,
        #[source]
        /// The netlink library's error (its text names the errno).
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{call} failed for {object}: {source}")]
    Io {
        call: &'static str,
        object: String,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace {0} does not exist (the container is gone?)")]
    NetnsGone(PathBuf),
    /// A netns path that is something else: what it is, and what to do.
    #[error("{} is not a network namespace ({what}): {hint}", path.display())]
    NotNetns { path: PathBuf, what: String, hint: String },
    #[error("link {0} not found")]
    LinkNotFound(String),
    #[error("nftables: {0}")]
    Nftables(String),
    #[error("eBPF: {0}")]
    Ebpf(String),
}

pub type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// Kernel limits that are one for the whole host and too small for a
/// thousand endpoints per host, raised (never lowered) when the agent runs
/// in the initial network namespace (elsewhere the files are not writable
/// and the host's settings stand):
/// * the neighbour table (1,024 entries by default, shared by every
///   namespace: each container holds entries for its gateway and peers and
///   the host one per container) — past it ARP fails ("neighbour table
///   overflow");
/// * the per-CPU receive backlog (1,000 packets by default): a broadcast on
///   a bridge is cloned to every port at once, and on a network of a
///   thousand endpoints the clones past the backlog are dropped — ARP to
///   the oldest ports (flooded last) never arrives.
pub const HOST_LIMITS: [(&str, u64); 4] = [
    ("/proc/sys/net/ipv4/neigh/default/gc_thresh1", 1024),
    ("/proc/sys/net/ipv4/neigh/default/gc_thresh2", 8192),
    ("/proc/sys/net/ipv4/neigh/default/gc_thresh3", 16384),
    ("/proc/sys/net/core/netdev_max_backlog", 4096),
];

/// The peer probes' packets: ICMP echoes to the peers' underlay addresses
/// and ICMPv6 echoes through the probe tunnel. Blocking, used from the
/// prober's own thread; every read waits a short while at most.
pub trait ProbeSockets: Send {
    /// Follow the probe device (the reconciler makes and may re-make it):
    /// is there one to probe through now?
    fn refresh_tunnel(&mut self) -> bool;
    fn send_underlay(&mut self, to: std::net::Ipv4Addr, id: u16, seq: u16) -> std::io::Result<()>;
    fn send_tunnel(&mut self, to: std::net::Ipv6Addr, id: u16, seq: u16) -> std::io::Result<()>;
    /// An echo of `size` bytes (IP header included) to `to` that no router
    /// may fragment (Don't Fragment set): the path MTU probe.
    fn send_underlay_sized(&mut self, to: std::net::Ipv4Addr, id: u16, seq: u16, size: u32) -> std::io::Result<()>;
    /// An echo through the probe device whose VXLAN packet (the outer IPv4
    /// datagram) is `size` bytes, never fragmented: the tunnel's path MTU
    /// probe.
    fn send_tunnel_sized(&mut self, to: std::net::Ipv6Addr, id: u16, seq: u16, size: u32) -> std::io::Result<()>;
    /// An echo reply that arrived: (from, id, sequence).
    fn recv_underlay(&mut self) -> Option<(std::net::Ipv4Addr, u16, u16)>;
    fn recv_tunnel(&mut self) -> Option<(std::net::Ipv6Addr, u16, u16)>;
}

/// The kernel boundary.
#[async_trait::async_trait]
pub trait Dataplane: Send + Sync + 'static {
    /// The links and addresses the agent may own and, with `rules`, the
    /// installed egress rules (costlier to read).
    async fn observe(&self, rules: bool) -> Result<Observed>;
    /// Apply one change.
    async fn apply(&self, action: &Action) -> Result<()>;
    /// Destination prefixes of the host's routes that are not the agent's
    /// own (new subnets must not overlap them).
    async fn host_routes(&self) -> Result<Vec<IpNet>>;
    /// MTU of the interface of the default route (1500 without one).
    async fn underlay_mtu(&self) -> Result<u32>;
    /// The addresses this host could advertise to its peers: every IPv4
    /// address of the interfaces of its preferred default route, with the
    /// interface's name.
    async fn underlay_candidates(&self) -> Result<Vec<(String, IpAddr)>>;
    /// The interface that has `addr` (the uplink of the underlay address).
    async fn link_with_addr(&self, addr: IpAddr) -> Result<Option<String>>;
    /// The sockets the peer probes use.
    fn probe_sockets(&self) -> std::io::Result<Box<dyn ProbeSockets>>;
    /// Host-wide settings the agent needs (kernel limits sized for a
    /// thousand endpoints), raised, never lowered, where the agent may.
    fn prepare_host(&self);
    /// Can this kernel carry encrypted networks (ESP with the AEAD)? The
    /// reason when not. Blocking: call it off the runtime.
    fn esp_support(&self) -> std::result::Result<(), String>;
    /// The IPsec SAs and policies the kernel has. Blocking.
    fn observe_xfrm(&self) -> Result<trellis_ipsec::ObservedXfrm>;
    /// Is `path` a network namespace the agent can enter? `NetnsGone` if
    /// nothing is there, `NotNetns` (saying what it is) if it is something
    /// else.
    fn check_netns(&self, path: &std::path::Path) -> Result<()>;
    /// Create an empty network namespace pinned at `path` (as `ip netns
    /// add` does), for an endpoint whose namespace the agent manages.
    fn create_netns(&self, path: &std::path::Path) -> Result<()>;
    /// Remove a namespace made by [`Dataplane::create_netns`]; a missing one
    /// is no error.
    fn remove_netns(&self, path: &std::path::Path) -> Result<()>;
    /// Who holds `proto` port `port` on `ip` (`None`: any address) in the
    /// agent's namespace: a listening TCP socket or a bound UDP socket,
    /// described with its process for a person (`None`: free). Blocking
    /// (reads `/proc`): call it off the runtime.
    fn port_holder(&self, proto: crate::model::Proto, port: u16, ip: Option<IpAddr>) -> Result<Option<String>>;
    /// Every port a process of the host holds (TCP listeners, bound UDP
    /// sockets, any address): the routing mesh leaves those to it.
    fn held_ports(&self) -> Result<std::collections::BTreeSet<(crate::model::Proto, u16)>>;
    /// An interface inside a container's namespace, as the kernel has it
    /// (`None`: no such interface; an error if the namespace is gone).
    async fn container_link(&self, netns: &std::path::Path, ifname: &str) -> Result<Option<ContainerLink>>;
    /// Per-endpoint counters of the eBPF program, by host interface (empty
    /// without the program). Reads maps only: cheap enough for a scrape.
    fn endpoint_counters(&self) -> Vec<(String, trellis_ebpf::EndpointCounters)> {
        Vec::new()
    }
    /// Remove the tracked flows that are over from every endpoint's flow
    /// tables (`trellis_ebpf::conntrack`). Blocking (reads every table):
    /// call it off the runtime.
    fn sweep_flows(&self) -> Result<trellis_ebpf::FlowSweep> {
        Ok(Default::default())
    }
    /// Turn the datapath's monitor events on (someone watches) or off.
    fn set_events(&self, _on: bool) {}
    /// A service's datapath counters on this host (by datapath id).
    /// Make the in-kernel DNS table hold exactly `want`.
    fn sync_dns(&self, _want: &BTreeMap<trellis_ebpf::DnsKey, trellis_ebpf::DnsAnswer>) -> Result<()> {
        Ok(())
    }

    /// Put (`Some`) or remove (`None`) these entries of the in-kernel DNS
    /// table, and nothing else: how one change is followed.
    fn patch_dns(&self, _entries: &[(trellis_ebpf::DnsKey, Option<trellis_ebpf::DnsAnswer>)]) -> Result<()> {
        Ok(())
    }

    /// The in-kernel DNS path on or off, and whether its answers say
    /// recursion is available (as the server's do when it forwards).
    fn dns_config(&self, _kernel: bool, _ra: bool) -> Result<()> {
        Ok(())
    }

    /// What the in-kernel DNS path did (none without the datapath).
    fn dns_stats(&self) -> Option<trellis_ebpf::DnsStats> {
        None
    }

    fn service_stats(&self, _id: u32) -> Option<trellis_ebpf::SvcStats> {
        None
    }

    /// Is the host's reverse-path filter strict for every interface
    /// (`net.ipv4.conf.all.rp_filter = 1`)? The mesh veths cannot lower it.
    fn strict_rp_filter(&self) -> bool {
        false
    }
}
