//! The records Trellis keeps in the cluster store and their enums; their
//! keys ([`keys`]), the names of the kernel objects derived from them
//! ([`names`]), MAC addresses ([`mac`]). Pure: everything imports it, it
//! imports nothing of the agent.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub mod keys;
pub mod liveness;
pub mod mac;
pub mod names;
pub mod table;

pub use keys::*;
pub use mac::Mac;
pub use names::*;
pub use table::{Keyed, Records, Table};

/// A random identifier: 16 hex digits.
pub fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The label that makes an endpoint a task of a service: service membership
/// by default, and what lets it join a network created without
/// `--attachable`.
pub const SERVICE_LABEL: &str = "trellis.service";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub id: String,
    pub name: String,
    pub subnet: IpNet,
    pub gateway: Option<IpAddr>,
    pub vni: u32,
    pub mtu: u32,
    pub attachable: bool,
    pub internal: bool,
    pub encrypted: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub created_unix: i64,
    /// The network's own VXLAN UDP port (encrypted networks); others use
    /// the hosts' port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan_port: Option<u16>,
    /// A dual-stack network's IPv6 subnet and gateway (beside the IPv4
    /// `subnet` and `gateway`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<IpAddr>,
}

impl NetworkRecord {
    /// The gateway with the subnet's prefix length, as set on the bridge.
    pub fn gateway_cidr(&self) -> Option<IpNet> {
        self.gateway.map(|gw| IpNet::new(gw, self.subnet.prefix_len()).expect("prefix of the subnet"))
    }

    /// The IPv6 gateway with its subnet's prefix length.
    pub fn gateway6_cidr(&self) -> Option<IpNet> {
        let (gw, s) = (self.gateway_v6()?, self.subnet_v6()?);
        IpNet::new(gw, s.prefix_len()).ok()
    }

    /// An IPv6-only network: its one subnet (`subnet`) is IPv6.
    pub fn ipv6_only(&self) -> bool {
        self.subnet.network().is_ipv6()
    }

    /// Its IPv4 subnet (none on an IPv6-only network).
    pub fn subnet_v4(&self) -> Option<IpNet> {
        Some(self.subnet).filter(|s| s.network().is_ipv4())
    }

    pub fn gateway_v4(&self) -> Option<IpAddr> {
        self.gateway.filter(|_| !self.ipv6_only())
    }

    /// The IPv4 gateway with the subnet's prefix length.
    pub fn gateway4_cidr(&self) -> Option<IpNet> {
        self.gateway_cidr().filter(|_| !self.ipv6_only())
    }

    /// Its IPv6 subnet: a dual-stack network's second, an IPv6-only
    /// network's only one.
    pub fn subnet_v6(&self) -> Option<IpNet> {
        if self.ipv6_only() { Some(self.subnet) } else { self.subnet6 }
    }

    pub fn gateway_v6(&self) -> Option<IpAddr> {
        if self.ipv6_only() { self.gateway } else { self.gateway6 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointKind {
    Adhoc,
    Docker,
    Cni,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub id: String,
    pub name: String,
    pub network_id: String,
    pub network: String,
    pub host: String,
    pub ip: IpAddr,
    /// Its IPv6 address on a dual-stack network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<IpAddr>,
    pub mac: Mac,
    pub netns: PathBuf,
    pub ifname: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub kind: EndpointKind,
    /// The agent created the netns and removes it on detach.
    #[serde(default)]
    pub managed_netns: bool,
    #[serde(default)]
    pub container_id: String,
    pub created_unix: i64,
    /// Detached: the host removes its devices, then the record and the
    /// address go. Until then the address stays taken (no early reuse).
    #[serde(default)]
    pub deleting: bool,
    /// Other names on its network (Docker's network aliases).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Ports of this host published to the endpoint (`docker run -p`):
    /// they go with the record (detach, a vanished namespace's collection).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PublishedPort>,
    /// It may take new connections of the services that select it: its
    /// engine says it is (Docker: healthy, or no HEALTHCHECK). An unready
    /// endpoint backs no service, in the datapath nor in DNS. Records
    /// written before readiness existed are ready.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub ready: bool,
    /// Detached (`deleting`) but draining until then (unix ms, its own
    /// host's clock: only that host ends the drain): it takes no new
    /// connection of its services, the ones it has keep flowing (its
    /// devices, tunnel entries and datapath backend entries stay). `None`
    /// once the drain is over, or if there was none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_until_ms: Option<u64>,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl EndpointRecord {
    /// Its IPv4 address (none on an IPv6-only network).
    pub fn ipv4(&self) -> Option<IpAddr> {
        Some(self.ip).filter(IpAddr::is_ipv4)
    }

    /// Its IPv6 address: on a dual-stack network its second, on an
    /// IPv6-only one its only one.
    pub fn ipv6(&self) -> Option<IpAddr> {
        self.ip6.or(Some(self.ip).filter(IpAddr::is_ipv6))
    }

    /// Detached, its open connections still flowing for a while.
    pub fn draining(&self) -> bool {
        self.deleting && self.drain_until_ms.is_some()
    }

    /// Its devices, programs and tunnel entries belong in the kernel: it is
    /// live, or detached but draining.
    pub fn in_datapath(&self) -> bool {
        !self.deleting || self.draining()
    }

    /// Its drain is over at `now_ms`.
    pub fn drain_due(&self, now_ms: u64) -> bool {
        self.deleting && self.drain_until_ms.is_some_and(|t| t <= now_ms)
    }
}

/// The drains of `host`'s endpoints at `now_ms`: those that are over, and
/// when the next one ends (none: no drain under way).
pub fn drains_of<'a>(
    endpoints: &'a (impl Records<EndpointRecord> + ?Sized),
    host: &str,
    now_ms: u64,
) -> (Vec<&'a EndpointRecord>, Option<u64>) {
    let mine = endpoints.each().filter(|e| e.host == host && e.draining());
    let (due, pending): (Vec<&EndpointRecord>, Vec<&EndpointRecord>) = mine.partition(|e| e.drain_due(now_ms));
    (due, pending.iter().filter_map(|e| e.drain_until_ms).min())
}

/// What an endpoint a service's selector matches is to the service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    /// It takes new connections: in the Maglev table (and DNS), with its
    /// backend entry.
    Serving,
    /// Detached and draining: only the connections it has (its backend
    /// entry stays, the Maglev table and DNS leave it out).
    Draining,
    /// Not ready: nothing (its connections are reset).
    Unready,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Serving => "ready",
            BackendState::Draining => "draining",
            BackendState::Unready => "unready",
        }
    }
}

/// A host port published to an endpoint's port, on the endpoint's host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublishedPort {
    pub proto: Proto,
    /// The host address it answers on; `None`: every address of the host
    /// (127.0.0.1 included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    /// The endpoint's port.
    pub port: u16,
}

impl PublishedPort {
    /// Do `self` and `other` claim the same host socket? The same protocol
    /// and port, and an address in common (`None` is every address).
    pub fn clashes(&self, other: &PublishedPort) -> bool {
        self.proto == other.proto
            && self.host_port == other.host_port
            && (self.host_ip.is_none() || other.host_ip.is_none() || self.host_ip == other.host_ip)
    }
}

impl std::fmt::Display for PublishedPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.host_ip {
            Some(ip) => write!(f, "{ip}:{}/{}", self.host_port, self.proto.as_str()),
            None => write!(f, "{}/{}", self.host_port, self.proto.as_str()),
        }
    }
}

/// A host of the cluster, registered under its lease: it disappears when
/// the host stops renewing it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub id: String,
    pub hostname: String,
    /// Underlay address: the outer source and destination of tunnels.
    pub underlay: IpAddr,
    /// MAC of the host's VXLAN devices (kept across restarts).
    pub vtep_mac: Mac,
    pub vxlan_port: u16,
    #[serde(default)]
    pub capabilities: BTreeMap<String, bool>,
    pub version: String,
    pub started_unix: i64,
    /// MTU of its underlay (the interface of its default route), 0 when
    /// not known (an older agent): every network's MTU is the smallest
    /// any host's underlay carries ([`network_mtu`]).
    #[serde(default)]
    pub underlay_mtu: u32,
}

/// VXLAN's overhead on an IPv4 underlay: outer Ethernet is not counted,
/// outer IPv4 (20), UDP (8), VXLAN (8) and the inner Ethernet header (14).
pub const VXLAN_OVERHEAD: u32 = 50;
/// The smallest MTU a network gets (IPv4's minimum reassembly size).
pub const MIN_NETWORK_MTU: u32 = 576;

/// The MTU network `n` runs with given the cluster's `hosts`: its record's
/// (the creating host's underlay less the overhead, or the operator's
/// `--mtu`), lowered to what the smallest underlay among the hosts
/// carries, so a frame one host's endpoint sends fits every other host's
/// wire (jumbo frames on some hosts, a 1400-byte VPN on others). It
/// follows the hosts: lower as soon as a smaller host joins, back up when
/// it leaves.
pub fn network_mtu(n: &NetworkRecord, hosts: &[HostRecord]) -> u32 {
    use trellis_ipsec::xfrm::{ESP_IN_UDP_OVERHEAD, ESP_OVERHEAD};
    // ESP in UDP adds its 8 bytes where any host carries it (the record's
    // MTU left room for ESP alone).
    let udp_extra =
        if n.encrypted && hosts.iter().any(asks_esp_in_udp) { ESP_IN_UDP_OVERHEAD - ESP_OVERHEAD } else { 0 };
    let record = if udp_extra > 0 { n.mtu.saturating_sub(udp_extra).max(MIN_NETWORK_MTU) } else { n.mtu };
    let overhead = VXLAN_OVERHEAD + if n.encrypted { ESP_OVERHEAD + udp_extra } else { 0 };
    hosts
        .iter()
        .filter(|h| h.underlay_mtu > 0)
        .map(|h| h.underlay_mtu.saturating_sub(overhead).max(MIN_NETWORK_MTU))
        .min()
        .map_or(record, |m| record.min(m))
}

/// The capability a host advertises when its encrypted tunnels carry ESP
/// in UDP (`--encryption-transport udp`).
pub const ESP_IN_UDP_CAPABILITY: &str = "esp_in_udp";

/// Does host `h` ask for ESP in UDP?
pub fn asks_esp_in_udp(h: &HostRecord) -> bool {
    h.capabilities.get(ESP_IN_UDP_CAPABILITY).copied().unwrap_or(false)
}

/// A host's own address on a network, for the routing mesh's nftables
/// path (`--ebpf=false` hosts, and every host's hairpin): connections it
/// takes on a published port are SNATed to it, so that the backends'
/// replies, on any host, come back to it over the network's VXLAN (the
/// gateway is anycast, and the host's underlay address is routed out of
/// the backend's host). Allocated from the cluster IPAM (owned
/// [`mesh_addr_owner`], from the host's blocks: reclaimed with the host),
/// one per (host, network) while the host publishes a service of that
/// network; its own record kind, so it is no endpoint (not in DNS,
/// `endpoint ls` or any service's backends).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MeshAddrRecord {
    pub host: String,
    pub network_id: String,
    pub ip: IpAddr,
    /// Derived from the address, as endpoints' MACs are ([`Mac::for_ip`]).
    pub mac: Mac,
}

/// The IPAM owner of `host`'s mesh addresses.
pub fn mesh_addr_owner(host: &str) -> String {
    format!("mesh:{host}")
}

/// How a service's name resolves and how its clients reach it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceMode {
    /// One virtual IP, load-balanced by the eBPF datapath.
    #[default]
    Vip,
    /// DNS round robin: the name resolves to every backend.
    Dnsrr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// A published port: clients use `port`, backends listen on `target`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServicePort {
    pub port: u16,
    pub proto: Proto,
    pub target: u16,
}

/// A service: a name on one network, and the endpoints it balances over
/// (those whose labels match its selector, on any host).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub name: String,
    pub network_id: String,
    pub network: String,
    pub mode: ServiceMode,
    /// `vip` mode only.
    pub vip: Option<IpAddr>,
    /// `vip` mode on a dual-stack network: its IPv6 VIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip6: Option<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub selector: BTreeMap<String, String>,
    pub created_unix: i64,
    /// Ports published on the routing mesh (every host, or the hosts of
    /// its backends in [`PublishMode::Host`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<MeshPort>,
}

/// Where a service's published port is accepted (Docker's `mode=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// On every live host of the cluster: the routing mesh.
    #[default]
    Ingress,
    /// Only on the hosts that run a backend of the service.
    Host,
}

impl PublishMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PublishMode::Ingress => "ingress",
            PublishMode::Host => "host",
        }
    }
}

/// A port a service is published on: `host_port` on the hosts' addresses
/// to the service's `port` (its backends' target for that port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MeshPort {
    pub proto: Proto,
    pub host_port: u16,
    pub port: u16,
    #[serde(default)]
    pub mode: PublishMode,
}

impl std::fmt::Display for MeshPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.host_port, self.port, self.proto.as_str())?;
        if self.mode == PublishMode::Host {
            write!(f, " (mode host)")?;
        }
        Ok(())
    }
}

impl ServiceRecord {
    /// The backends' port for clients of `port`/`proto`: its `--port`'s
    /// target, else the same port (a service without `--port` forwards
    /// every port).
    pub fn target_of(&self, port: u16, proto: Proto) -> u16 {
        self.ports.iter().find(|p| p.port == port && p.proto == proto).map_or(port, |p| p.target)
    }

    /// Does the selector match `e` (on the service's network), whatever
    /// its state?
    pub fn matches(&self, e: &EndpointRecord) -> bool {
        e.network_id == self.network_id && self.selector.iter().all(|(k, v)| e.labels.get(k) == Some(v))
    }

    /// Is `e` a live (not detached) endpoint of this service, ready or not?
    pub fn selects(&self, e: &EndpointRecord) -> bool {
        !e.deleting && self.matches(e)
    }

    /// What `e` is to this service: `None` when it is none of its backends
    /// (not matched, or detached and not draining).
    pub fn backend_state(&self, e: &EndpointRecord) -> Option<BackendState> {
        if !self.matches(e) || !e.in_datapath() {
            return None;
        }
        Some(if !e.ready {
            BackendState::Unready
        } else if e.draining() {
            BackendState::Draining
        } else {
            BackendState::Serving
        })
    }

    /// Does `e` take new connections of this service?
    pub fn serves(&self, e: &EndpointRecord) -> bool {
        self.backend_state(e) == Some(BackendState::Serving)
    }

    /// The datapath's id of the service: its VIP as a number (unique, as
    /// subnets do not overlap).
    pub fn datapath_id(&self) -> Option<u32> {
        match self.vip {
            Some(IpAddr::V4(v4)) => Some(u32::from(v4)),
            _ => None,
        }
    }
}

/// The selector a service gets when none is given.
pub fn default_selector(service: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(SERVICE_LABEL.to_string(), service.to_string())])
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_linux_interface_names() {
        let id = new_id();
        for n in [bridge_name(&id), host_ifname(&id), peer_ifname(&id), mesh_ifname(&id), mesh_port_name(&id)] {
            assert!(n.len() <= 15, "{n} is longer than IFNAMSIZ-1");
        }
        assert!(bridge_name(&id).starts_with(BRIDGE_PREFIX));
    }

    fn endpoint(id: &str, host: &str) -> EndpointRecord {
        serde_json::from_value(serde_json::json!({
            "id": id, "name": id, "network_id": "n1", "network": "app", "host": host, "ip": "10.1.0.2",
            "mac": "02:42:0a:01:00:02", "netns": "/run/netns/x", "ifname": "eth0", "kind": "adhoc",
            "created_unix": 0, "labels": {"trellis.service": "web"},
        }))
        .unwrap()
    }

    #[test]
    fn records_written_before_readiness_are_ready_and_not_draining() {
        let e = endpoint("e1", "h1");
        assert!(e.ready && e.drain_until_ms.is_none() && !e.draining() && e.in_datapath());
        // Written back, a ready record is the same bytes as before.
        let v = serde_json::to_value(&e).unwrap();
        assert!(v.get("ready").is_none() && v.get("drain_until_ms").is_none(), "{v}");
        let mut unready = e.clone();
        unready.ready = false;
        let back: EndpointRecord = serde_json::from_value(serde_json::to_value(&unready).unwrap()).unwrap();
        assert!(!back.ready);
    }

    #[test]
    fn a_service_backend_is_serving_draining_or_unready() {
        let s = ServiceRecord {
            name: "web".into(),
            network_id: "n1".into(),
            network: "app".into(),
            mode: ServiceMode::Vip,
            vip: Some("10.1.0.254".parse().unwrap()),
            vip6: None,
            ports: vec![],
            selector: default_selector("web"),
            created_unix: 0,
            publish: vec![],
        };
        let mut e = endpoint("e1", "h1");
        assert_eq!(s.backend_state(&e), Some(BackendState::Serving));
        assert!(s.serves(&e) && s.selects(&e));
        e.ready = false;
        assert_eq!(s.backend_state(&e), Some(BackendState::Unready));
        assert!(!s.serves(&e) && s.selects(&e), "still its task, not taking clients");
        e.ready = true;
        e.deleting = true;
        assert_eq!(s.backend_state(&e), None, "detached without a drain: gone");
        e.drain_until_ms = Some(5);
        assert_eq!(s.backend_state(&e), Some(BackendState::Draining));
        assert!(!s.serves(&e) && !s.selects(&e), "gone for users");
        e.labels.clear();
        assert_eq!(s.backend_state(&e), None, "not matched");
    }

    #[test]
    fn drains_end_on_their_hosts_deadline() {
        let mut eps: Vec<EndpointRecord> = ["a", "b", "c", "d"].iter().map(|id| endpoint(id, "h1")).collect();
        for (e, until) in eps.iter_mut().zip([Some(100), Some(200), Some(50), None]) {
            e.deleting = true;
            e.drain_until_ms = until;
        }
        eps[2].host = "h2".into();
        let (due, next) = drains_of(&eps, "h1", 100);
        assert_eq!(due.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["a"], "h2's is h2's to end");
        assert_eq!(next, Some(200));
        let (due, next) = drains_of(&eps, "h1", 99);
        assert!(due.is_empty() && next == Some(100));
        let (due, next) = drains_of(&eps, "h1", 1000);
        assert_eq!((due.len(), next), (2, None));
        // A live endpoint with a stale deadline (it cannot have one) never drains.
        eps[0].deleting = false;
        assert!(!eps[0].drain_due(1000) && !eps[0].draining());
    }

    #[test]
    fn every_interface_the_agent_names_is_owned() {
        let id = new_id();
        for n in [
            bridge_name(&id),
            host_ifname(&id),
            peer_ifname(&id),
            vxlan_name(&id),
            PROBE_VXLAN.to_string(),
            mesh_ifname(&id),
            mesh_port_name(&id),
        ] {
            assert!(owned_link(&n), "{n} would never be removed");
        }
        assert!(!owned_link("eth0") && !owned_link("tr-other"));
    }
}
