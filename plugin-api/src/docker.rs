//! Docker's remote network driver and IPAM driver protocols, as values:
//! the request and response bodies of `/NetworkDriver.*`, `/IpamDriver.*`
//! and `/Plugin.Activate` (field names exactly as libnetwork spells them).
//!
//! The engine sends no `Content-Type`: bodies are parsed from bytes with
//! [`parse`], and an empty body counts as `{}`.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The option key under which `docker network create -o k=v` arrive.
pub const GENERIC_OPTIONS: &str = "com.docker.network.generic";
/// The RequestAddress option marking the gateway request.
pub const REQUEST_ADDRESS_TYPE: &str = "RequestAddressType";
pub const GATEWAY_TYPE: &str = "com.docker.network.gateway";

/// Parse a request body; an empty body is the type's default.
pub fn parse<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| format!("malformed request body: {e}"))
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ActivateResponse {
    #[serde(rename = "Implements")]
    pub implements: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CapabilitiesResponse {
    #[serde(rename = "Scope")]
    pub scope: String,
    #[serde(rename = "ConnectivityScope")]
    pub connectivity_scope: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct IpamData {
    #[serde(rename = "AddressSpace", default)]
    pub address_space: String,
    #[serde(rename = "Pool", default)]
    pub pool: String,
    #[serde(rename = "Gateway", default)]
    pub gateway: String,
    #[serde(rename = "AuxAddresses", default)]
    pub aux_addresses: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct CreateNetworkRequest {
    #[serde(rename = "NetworkID", default)]
    pub network_id: String,
    #[serde(rename = "Options", default)]
    pub options: Option<BTreeMap<String, Value>>,
    #[serde(rename = "IPv4Data", default)]
    pub ipv4_data: Option<Vec<IpamData>>,
    #[serde(rename = "IPv6Data", default)]
    pub ipv6_data: Option<Vec<IpamData>>,
}

impl CreateNetworkRequest {
    /// The `-o k=v` options.
    pub fn generic(&self) -> BTreeMap<String, String> {
        let Some(g) = self.options.as_ref().and_then(|o| o.get(GENERIC_OPTIONS)) else { return BTreeMap::new() };
        match g {
            Value::Object(m) => m
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
                .collect(),
            _ => BTreeMap::new(),
        }
    }

    /// A boolean engine option (`com.docker.network.internal`, …).
    pub fn flag(&self, key: &str) -> bool {
        match self.options.as_ref().and_then(|o| o.get(key)) {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => s == "true",
            _ => false,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct NetworkRequest {
    #[serde(rename = "NetworkID", default)]
    pub network_id: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointInterface {
    #[serde(rename = "Address", default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    #[serde(rename = "AddressIPv6", default, skip_serializing_if = "String::is_empty")]
    pub address_ipv6: String,
    #[serde(rename = "MacAddress", default, skip_serializing_if = "String::is_empty")]
    pub mac_address: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct CreateEndpointRequest {
    #[serde(rename = "NetworkID", default)]
    pub network_id: String,
    #[serde(rename = "EndpointID", default)]
    pub endpoint_id: String,
    #[serde(rename = "Interface", default)]
    pub interface: Option<EndpointInterface>,
}

/// The driver may fill only what the engine left empty.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CreateEndpointResponse {
    #[serde(rename = "Interface", skip_serializing_if = "Option::is_none")]
    pub interface: Option<EndpointInterface>,
}

#[derive(Debug, Default, Deserialize)]
pub struct EndpointRequest {
    #[serde(rename = "NetworkID", default)]
    pub network_id: String,
    #[serde(rename = "EndpointID", default)]
    pub endpoint_id: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct JoinRequest {
    #[serde(rename = "NetworkID", default)]
    pub network_id: String,
    #[serde(rename = "EndpointID", default)]
    pub endpoint_id: String,
    #[serde(rename = "SandboxKey", default)]
    pub sandbox_key: String,
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct InterfaceName {
    #[serde(rename = "SrcName")]
    pub src_name: String,
    #[serde(rename = "DstPrefix")]
    pub dst_prefix: String,
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StaticRoute {
    #[serde(rename = "Destination")]
    pub destination: String,
    #[serde(rename = "RouteType")]
    pub route_type: u8,
    #[serde(rename = "NextHop", skip_serializing_if = "String::is_empty", default)]
    pub next_hop: String,
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct JoinResponse {
    #[serde(rename = "InterfaceName")]
    pub interface_name: InterfaceName,
    #[serde(rename = "Gateway", skip_serializing_if = "String::is_empty", default)]
    pub gateway: String,
    #[serde(rename = "GatewayIPv6", skip_serializing_if = "String::is_empty", default)]
    pub gateway_ipv6: String,
    #[serde(rename = "StaticRoutes", skip_serializing_if = "Vec::is_empty", default)]
    pub static_routes: Vec<StaticRoute>,
    #[serde(rename = "DisableGatewayService")]
    pub disable_gateway_service: bool,
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct IpamCapabilitiesResponse {
    #[serde(rename = "RequiresMACAddress")]
    pub requires_mac_address: bool,
    #[serde(rename = "RequiresRequestReplay")]
    pub requires_request_replay: bool,
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddressSpacesResponse {
    #[serde(rename = "LocalDefaultAddressSpace")]
    pub local: String,
    #[serde(rename = "GlobalDefaultAddressSpace")]
    pub global: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct RequestPoolRequest {
    #[serde(rename = "AddressSpace", default)]
    pub address_space: String,
    #[serde(rename = "Pool", default)]
    pub pool: String,
    #[serde(rename = "SubPool", default)]
    pub sub_pool: String,
    #[serde(rename = "Options", default)]
    pub options: Option<BTreeMap<String, String>>,
    #[serde(rename = "V6", default)]
    pub v6: bool,
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RequestPoolResponse {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(rename = "Pool")]
    pub pool: String,
    #[serde(rename = "Data")]
    pub data: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ReleasePoolRequest {
    #[serde(rename = "PoolID", default)]
    pub pool_id: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct RequestAddressRequest {
    #[serde(rename = "PoolID", default)]
    pub pool_id: String,
    #[serde(rename = "Address", default)]
    pub address: String,
    #[serde(rename = "Options", default)]
    pub options: Option<BTreeMap<String, String>>,
}

impl RequestAddressRequest {
    pub fn is_gateway(&self) -> bool {
        self.options.as_ref().and_then(|o| o.get(REQUEST_ADDRESS_TYPE)).is_some_and(|t| t == GATEWAY_TYPE)
    }
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RequestAddressResponse {
    #[serde(rename = "Address")]
    pub address: String,
    #[serde(rename = "Data")]
    pub data: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ReleaseAddressRequest {
    #[serde(rename = "PoolID", default)]
    pub pool_id: String,
    #[serde(rename = "Address", default)]
    pub address: String,
}

/// A semantic failure: HTTP 200 with `{"Err": …}` for the network driver…
pub fn network_error(msg: &str) -> Value {
    serde_json::json!({ "Err": msg })
}

/// …and `{"Error": …}` for the IPAM driver.
pub fn ipam_error(msg: &str) -> Value {
    serde_json::json!({ "Error": msg })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_dockerd_sends() {
        // Recorded from dockerd 20.10 (see reference/docker-plugin-protocol.md).
        let r: RequestPoolRequest =
            parse(br#"{"AddressSpace":"trellis","Pool":"10.99.0.0/24","SubPool":"","Options":{},"V6":false}"#).unwrap();
        assert_eq!((r.pool.as_str(), r.v6), ("10.99.0.0/24", false));
        let a: RequestAddressRequest =
            parse(br#"{"PoolID":"p","Address":"","Options":{"RequestAddressType":"com.docker.network.gateway"}}"#)
                .unwrap();
        assert!(a.is_gateway());
        let c: CreateNetworkRequest = parse(
            br#"{"NetworkID":"n1","Options":{"com.docker.network.enable_ipv6":false,
                "com.docker.network.generic":{"trellis.attachable":"true"}},
                "IPv4Data":[{"AddressSpace":"trellis","Gateway":"10.99.0.1/24","Pool":"10.99.0.0/24"}],"IPv6Data":[]}"#,
        )
        .unwrap();
        assert_eq!(c.generic().get("trellis.attachable").map(String::as_str), Some("true"));
        assert!(!c.flag("com.docker.network.enable_ipv6"));
        assert_eq!(c.ipv4_data.unwrap()[0].gateway, "10.99.0.1/24");
        let e: CreateEndpointRequest = parse(
            br#"{"NetworkID":"n1","EndpointID":"e1","Interface":{"Address":"10.99.0.2/24","AddressIPv6":"","MacAddress":""},
                "Options":{"com.docker.network.endpoint.exposedports":[],"com.docker.network.portmap":[]}}"#,
        )
        .unwrap();
        assert_eq!(e.interface.unwrap().address, "10.99.0.2/24");
        // An empty body is `{}`; garbage is an error, not a panic.
        let n: NetworkRequest = parse(b"").unwrap();
        assert_eq!(n.network_id, "");
        assert!(parse::<NetworkRequest>(b"{\"NetworkID\":").is_err());
        assert!(parse::<NetworkRequest>(br#"{"NetworkID":5}"#).is_err());
        assert!(parse::<NetworkRequest>(b"\"x\"").is_err());
    }

    #[test]
    fn responses_use_libnetwork_names() {
        let j = serde_json::to_value(JoinResponse {
            interface_name: InterfaceName { src_name: "trp-x".into(), dst_prefix: "eth".into() },
            gateway: "10.0.0.1".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            j,
            serde_json::json!({"InterfaceName":{"SrcName":"trp-x","DstPrefix":"eth"},"Gateway":"10.0.0.1","DisableGatewayService":false})
        );
        assert_eq!(network_error("x"), serde_json::json!({"Err":"x"}));
        assert_eq!(ipam_error("x"), serde_json::json!({"Error":"x"}));
        assert_eq!(serde_json::to_value(CreateEndpointResponse::default()).unwrap(), serde_json::json!({}));
    }
}

/// The endpoint option holding `docker run -p` (and `-P`, which dockerd
/// expands into bindings with `HostPort` 0).
pub const PORT_MAP: &str = "com.docker.network.portmap";

/// One binding of [`PORT_MAP`], as libnetwork spells it: `Proto` the IP
/// protocol number, `HostPort` 0 "choose one", `HostPortEnd` > `HostPort` a
/// range.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortBinding {
    #[serde(rename = "Proto", default)]
    pub proto: u8,
    #[serde(rename = "IP", default)]
    pub ip: String,
    #[serde(rename = "Port", default)]
    pub port: u16,
    #[serde(rename = "HostIP", default)]
    pub host_ip: String,
    #[serde(rename = "HostPort", default)]
    pub host_port: u16,
    #[serde(rename = "HostPortEnd", default)]
    pub host_port_end: u16,
}

/// The endpoint option (and EndpointOperInfo key) holding the container's
/// exposed ports: `[{"Proto": 6, "Port": 80}]`.
pub const EXPOSED_PORTS: &str = "com.docker.network.endpoint.exposedports";

/// One entry of [`EXPOSED_PORTS`], as libnetwork spells it
/// (`types.TransportPort`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct TransportPort {
    #[serde(rename = "Proto", default)]
    pub proto: u8,
    #[serde(rename = "Port", default)]
    pub port: u16,
}

/// ProgramExternalConnectivity (and Revoke, whose options are empty).
#[derive(Debug, Default, Deserialize)]
pub struct ExternalConnectivityRequest {
    #[serde(rename = "NetworkID", default)]
    pub network_id: String,
    #[serde(rename = "EndpointID", default)]
    pub endpoint_id: String,
    #[serde(rename = "Options", default)]
    pub options: BTreeMap<String, Value>,
}

impl ExternalConnectivityRequest {
    /// The port bindings asked for (none without the option).
    pub fn port_map(&self) -> Result<Vec<PortBinding>, String> {
        match self.options.get(PORT_MAP) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| format!("malformed {PORT_MAP}: {e}")),
        }
    }
}
