//! The names of the kernel objects the agent owns, derived from record ids.
//! Every interface carrying one of [`OWNED_PREFIXES`] in the agent's host
//! namespace is the agent's: one that the desired state does not hold is
//! removed (observed and reconciled with the same list).

/// Interface-name prefixes the agent owns in its host namespace: anything
/// carrying them that the desired state does not hold is removed.
pub const BRIDGE_PREFIX: &str = "trb-";
pub const VETH_PREFIX: &str = "trv-";
/// Temporary name of a container-side veth before it moves.
pub const PEER_PREFIX: &str = "trp-";
pub const VXLAN_PREFIX: &str = "trx-";
/// The host's end of a mesh veth (see [`mesh_ifname`]).
pub const MESH_PREFIX: &str = "trm-";
/// The bridge's end of a mesh veth (see [`mesh_port_name`]).
pub const MESH_PORT_PREFIX: &str = "trn-";
/// Every prefix of [`BRIDGE_PREFIX`], [`VETH_PREFIX`], [`PEER_PREFIX`],
/// [`VXLAN_PREFIX`], [`MESH_PREFIX`] and [`MESH_PORT_PREFIX`]: what the
/// agent observes, and removes when not desired.
pub const OWNED_PREFIXES: [&str; 6] =
    [BRIDGE_PREFIX, VETH_PREFIX, PEER_PREFIX, VXLAN_PREFIX, MESH_PREFIX, MESH_PORT_PREFIX];

/// Is `name` an interface the agent owns? The reconciler deletes what
/// carries one and is not desired, and the observer reports exactly these
/// (one list, so no kind of device is made and then never removed).
pub fn owned_link(name: &str) -> bool {
    OWNED_PREFIXES.iter().any(|p| name.starts_with(p))
}
/// The probe tunnel: a VXLAN device on the hosts' own port with no bridge,
/// whose IPv6 link-local address (EUI-64 of the VTEP MAC) answers the
/// peers' probes — so a probe crosses the same VXLAN port and path as the
/// networks' traffic. Its VNI is above every network's.
pub const PROBE_VXLAN: &str = "trx-probe";
pub const PROBE_VNI: u32 = 0xff_fffe;

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

/// The host's end of the mesh veth of a network: it holds the host's mesh
/// address of the network (a /32) and its MAC (see
/// [`super::MeshAddrRecord`]); its peer, [`mesh_port_name`], is a port of
/// the network's bridge.
pub fn mesh_ifname(network_id: &str) -> String {
    format!("{MESH_PREFIX}{}", &network_id[..network_id.len().min(10)])
}
/// The bridge's end of the mesh veth of a network.
pub fn mesh_port_name(network_id: &str) -> String {
    format!("{MESH_PORT_PREFIX}{}", &network_id[..network_id.len().min(10)])
}
