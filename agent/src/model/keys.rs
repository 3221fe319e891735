//! Every key Trellis keeps in the store, in one place: the cluster's
//! records, the IPAM's root, encryption, and the Docker driver's per-host
//! mapping. Changing one changes the store format.

use ipnet::IpNet;

/// Root of every Trellis key.
pub const ROOT: &str = "/trellis/v1/";

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
/// The claim of a host port on the routing mesh (cluster-wide: every
/// host accepts it); its value is the service's name.
pub fn mesh_port_key(proto: super::Proto, port: u16) -> String {
    format!("{ROOT}mesh-ports/{}/{port}", proto.as_str())
}
pub fn mesh_ports_prefix() -> String {
    format!("{ROOT}mesh-ports/")
}
/// A host's mesh address on a network (see [`super::MeshAddrRecord`]).
pub fn mesh_addr_key(network_id: &str, host: &str) -> String {
    format!("{ROOT}mesh-addrs/{network_id}/{host}")
}
pub fn mesh_addrs_prefix() -> String {
    format!("{ROOT}mesh-addrs/")
}
/// Every host's mesh address on one network.
pub fn mesh_addrs_of_network(network_id: &str) -> String {
    format!("{ROOT}mesh-addrs/{network_id}/")
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

/// The Docker driver's records of one host (networks, pools, endpoints).
pub fn docker_host_prefix(host: &str) -> String {
    format!("{ROOT}docker/hosts/{host}/")
}
/// Every host's Docker driver records.
pub fn docker_hosts_prefix() -> String {
    format!("{ROOT}docker/hosts/")
}
/// A Docker network bound on `host` (by Docker's network id).
pub fn docker_net_key(host: &str, docker_id: &str) -> String {
    format!("{}nets/{docker_id}", docker_host_prefix(host))
}
/// The pools a host's Docker IPAM driver handed out.
pub fn docker_pool_key(host: &str, subnet: &IpNet) -> String {
    format!("{}pools/{}", docker_host_prefix(host), subnet_part(subnet))
}
/// A Docker endpoint on `host` (by Docker's endpoint id).
pub fn docker_ep_key(host: &str, docker_id: &str) -> String {
    format!("{}eps/{docker_id}", docker_host_prefix(host))
}
/// Addresses Docker's IPAM reserved in a subnet (cluster-wide).
pub fn docker_reserved_prefix() -> String {
    format!("{ROOT}docker/reserved/")
}
pub fn docker_reserved_key(subnet: &IpNet) -> String {
    format!("{}{}", docker_reserved_prefix(), subnet_part(subnet))
}
/// A subnet as one key segment.
fn subnet_part(n: &IpNet) -> String {
    n.to_string().replace('/', "_")
}
/// The claim on an encrypted network's VXLAN port.
pub fn esp_ports_prefix() -> String {
    format!("{ROOT}esp-ports/")
}

/// The capability a host record holds for each cluster key its agent has
/// (by id, never the key): `trellisctl cluster rotate-key` waits for every
/// live host to hold the new one.
pub fn cluster_key_capability(id: &str) -> String {
    format!("cluster_key:{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_the_store_format() {
        let n: IpNet = "10.1.0.0/24".parse().unwrap();
        assert_eq!(network_key("a"), "/trellis/v1/networks/a");
        assert_eq!(endpoint_name_key("n1", "web"), "/trellis/v1/endpoint-names/n1/web");
        assert_eq!(container_key("h", "c", "eth0"), "/trellis/v1/containers/h/c/eth0");
        assert_eq!(docker_net_key("h", "d1"), "/trellis/v1/docker/hosts/h/nets/d1");
        assert_eq!(docker_pool_key("h", &n), "/trellis/v1/docker/hosts/h/pools/10.1.0.0_24");
        assert_eq!(docker_ep_key("h", "e1"), "/trellis/v1/docker/hosts/h/eps/e1");
        assert_eq!(docker_reserved_key(&n), "/trellis/v1/docker/reserved/10.1.0.0_24");
        assert_eq!(esp_port_key(4790), "/trellis/v1/esp-ports/4790");
        assert!(esp_port_key(4790).starts_with(&esp_ports_prefix()));
        assert!(docker_ep_key("h", "e").starts_with(&docker_host_prefix("h")));
        assert_eq!(mesh_addr_key("n1", "h1"), "/trellis/v1/mesh-addrs/n1/h1");
        assert!(mesh_addr_key("n1", "h1").starts_with(&mesh_addrs_of_network("n1")));
        assert!(mesh_addrs_of_network("n1").starts_with(&mesh_addrs_prefix()));
    }
}
