//! The records Trellis keeps in the cluster store, their keys, and the
//! names of the kernel objects derived from them.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Root of every Trellis key.
pub const ROOT: &str = "/trellis/v1/";

/// The label that makes an endpoint a task of a service: service membership
/// by default, and what lets it join a network created without
/// `--attachable`.
pub const SERVICE_LABEL: &str = "trellis.service";

pub fn networks_prefix() -> String {
    format!("{ROOT}networks/")
}
pub fn network_key(name: &str) -> String {
    format!("{ROOT}networks/{name}")
}
pub fn endpoints_prefix() -> String {
    format!("{ROOT}endpoints/")
}
pub fn endpoint_key(id: &str) -> String {
    format!("{ROOT}endpoints/{id}")
}
/// Uniqueness of endpoint names inside a network.
pub fn endpoint_name_key(network_id: &str, name: &str) -> String {
    format!("{ROOT}endpoint-names/{network_id}/{name}")
}
/// An engine's container's interface on a host → its endpoint id (one
/// attachment per container and interface, and DEL/CHECK find it at once).
pub fn container_key(host: &str, container_id: &str, ifname: &str) -> String {
    format!("{ROOT}containers/{host}/{container_id}/{ifname}")
}

pub fn services_prefix() -> String {
    format!("{ROOT}services/")
}
pub fn service_key(name: &str) -> String {
    format!("{ROOT}services/{name}")
}
/// The IPAM owner of a service's VIP (never reclaimed with a host).
pub fn vip_owner(service: &str) -> String {
    format!("{}{service}", trellis_ipam::SERVICE_OWNER_PREFIX)
}

/// Encrypted networks: the key ring of a network (by id), the acks of the
/// hosts carrying it, and the claim on its VXLAN port.
pub fn netkeys_prefix() -> String {
    format!("{ROOT}netkeys/")
}
pub fn netkey_key(network_id: &str) -> String {
    format!("{ROOT}netkeys/{network_id}")
}
pub fn netkey_acks_prefix(network_id: &str) -> String {
    format!("{ROOT}netkey-acks/{network_id}/")
}
pub fn netkey_ack_key(network_id: &str, host: &str) -> String {
    format!("{ROOT}netkey-acks/{network_id}/{host}")
}
pub fn esp_port_key(port: u16) -> String {
    format!("{ROOT}esp-ports/{port}")
}
/// The UDP ports encrypted networks' VXLAN devices use, one each: xfrm
/// policies select a network's packets by it.
pub const ESP_PORTS: std::ops::RangeInclusive<u16> = 4790..=4889;

pub fn ipam_root() -> String {
    format!("{ROOT}ipam/")
}
pub fn hosts_prefix() -> String {
    format!("{ROOT}hosts/")
}
pub fn host_key(id: &str) -> String {
    format!("{ROOT}hosts/{id}")
}

/// Interface-name prefixes the agent owns in its host namespace: anything
/// carrying them that the desired state does not hold is removed.
pub const BRIDGE_PREFIX: &str = "trb-";
pub const VETH_PREFIX: &str = "trv-";
/// Temporary name of a container-side veth before it moves.
pub const PEER_PREFIX: &str = "trp-";
pub const VXLAN_PREFIX: &str = "trx-";
/// The probe tunnel: a VXLAN device on the hosts' own port with no bridge,
/// whose IPv6 link-local address (EUI-64 of the VTEP MAC) answers the
/// peers' probes — so a probe crosses the same VXLAN port and path as the
/// networks' traffic. Its VNI is above every network's.
pub const PROBE_VXLAN: &str = "trx-probe";
pub const PROBE_VNI: u32 = 0xff_fffe;

/// Every interface-name prefix the agent owns: the reconciler deletes what
/// carries one and is not desired, and the observer reports exactly these
/// (one list, so no kind of device is made and then never removed).
pub const OWNED_PREFIXES: [&str; 4] = [BRIDGE_PREFIX, VETH_PREFIX, PEER_PREFIX, VXLAN_PREFIX];

/// Is `name` one of the agent's interfaces?
pub fn owned_link(name: &str) -> bool {
    OWNED_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The IPv6 link-local address a device with `mac` takes (EUI-64).
pub fn link_local(mac: &[u8; 6]) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        u16::from_be_bytes([mac[0] ^ 0x02, mac[1]]),
        u16::from_be_bytes([mac[2], 0xff]),
        u16::from_be_bytes([0xfe, mac[3]]),
        u16::from_be_bytes([mac[4], mac[5]]),
    )
}

pub use crate::dataplane::Mac;

/// The VXLAN device of a network on a host with endpoints on it.
pub fn vxlan_name(network_id: &str) -> String {
    format!("{VXLAN_PREFIX}{}", &network_id[..network_id.len().min(10)])
}

/// The bridge of a network on every host.
pub fn bridge_name(network_id: &str) -> String {
    format!("{BRIDGE_PREFIX}{}", &network_id[..network_id.len().min(10)])
}
/// The host side of an endpoint's veth.
pub fn host_ifname(endpoint_id: &str) -> String {
    format!("{VETH_PREFIX}{}", &endpoint_id[..endpoint_id.len().min(10)])
}
pub fn peer_ifname(endpoint_id: &str) -> String {
    format!("{PEER_PREFIX}{}", &endpoint_id[..endpoint_id.len().min(10)])
}

/// A random identifier: 16 hex digits.
pub fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A random locally administered unicast MAC address.
/// An endpoint's MAC, derived from its address (as Docker's overlay does):
/// an address that is released and reused comes back with the same MAC, so
/// the neighbour caches of the containers that talked to its previous
/// holder stay right (no stale-ARP black hole after a reconnect). Unique
/// within a network, which is one L2 domain.
pub fn mac_for_ip(ip: std::net::IpAddr) -> [u8; 6] {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            [0x02, 0x42, o[0], o[1], o[2], o[3]]
        }
        std::net::IpAddr::V6(v6) => {
            let o = v6.octets();
            [0x02, 0x42, o[12], o[13], o[14], o[15]]
        }
    }
}

pub fn new_mac() -> [u8; 6] {
    let mut mac: [u8; 6] = rand::random();
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = s.split(':').map(|p| u8::from_str_radix(p, 16)).collect::<Result<_, _>>().ok()?;
    parts.try_into().ok()
}

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
}

impl NetworkRecord {
    /// The gateway with the subnet's prefix length, as set on the bridge.
    pub fn gateway_cidr(&self) -> Option<IpNet> {
        self.gateway.map(|gw| IpNet::new(gw, self.subnet.prefix_len()).expect("prefix of the subnet"))
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
    pub mac: String,
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
    pub vtep_mac: String,
    pub vxlan_port: u16,
    #[serde(default)]
    pub capabilities: BTreeMap<String, bool>,
    pub version: String,
    pub started_unix: i64,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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
    pub ports: Vec<ServicePort>,
    pub selector: BTreeMap<String, String>,
    pub created_unix: i64,
}

impl ServiceRecord {
    /// Does `e` back this service?
    pub fn selects(&self, e: &EndpointRecord) -> bool {
        e.network_id == self.network_id && !e.deleting && self.selector.iter().all(|(k, v)| e.labels.get(k) == Some(v))
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
    fn link_local_addresses_are_eui64_of_the_mac() {
        assert_eq!(
            link_local(&[0x02, 0x42, 0xac, 0x11, 0x00, 0x02]),
            "fe80::42:acff:fe11:2".parse::<std::net::Ipv6Addr>().unwrap()
        );
        assert_eq!(
            link_local(&[0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
            "fe80::5054:ff:fe12:3456".parse::<std::net::Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn names_fit_linux_interface_names() {
        let id = new_id();
        for n in [bridge_name(&id), host_ifname(&id), peer_ifname(&id)] {
            assert!(n.len() <= 15, "{n} is longer than IFNAMSIZ-1");
        }
        assert!(bridge_name(&id).starts_with(BRIDGE_PREFIX));
    }

    #[test]
    fn every_interface_the_agent_names_is_owned() {
        let id = new_id();
        for n in [bridge_name(&id), host_ifname(&id), peer_ifname(&id), vxlan_name(&id), PROBE_VXLAN.to_string()] {
            assert!(owned_link(&n), "{n} would never be removed");
        }
        assert!(!owned_link("eth0") && !owned_link("tr-other"));
    }

    #[test]
    fn macs_are_local_unicast_and_round_trip() {
        for _ in 0..100 {
            let m = new_mac();
            assert_eq!(mac_for_ip("10.1.2.3".parse().unwrap()), [2, 0x42, 10, 1, 2, 3]);
            assert_eq!(m[0] & 0x01, 0, "unicast");
            assert_eq!(m[0] & 0x02, 0x02, "locally administered");
            assert_eq!(parse_mac(&format_mac(&m)), Some(m));
        }
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("zz:00:00:00:00:00"), None);
    }
}
