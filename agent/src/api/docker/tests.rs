//! The Docker driver's flows, driven through [`DockerDriver::handle`] with
//! bodies shaped as dockerd 20.10 sends them (see the plugin protocol
//! reference), over the memory store and the fake kernel: no root, no
//! dockerd. The engine's API points where nothing listens: the networks are
//! named with `-o trellis.network=`, and the background `learn` task fails
//! quietly (checked by `the_background_tasks_without_an_engine_change_nothing`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::{Value, json};
use trellis_ipam::RESERVED;
use trellis_store::{LocalStore, Store};

use super::engine::Engine;
use super::*;
use crate::app::testing::{self, Lab};
use crate::dataplane::Dataplane;
use crate::model::EndpointRecord;

/// Nothing listens here.
const NO_ENGINE: &str = "/nonexistent/trellis-test/docker.sock";
/// A sandbox as dockerd names it; Docker endpoints skip the namespace check.
const SANDBOX: &str = "/var/run/docker/netns/0123456789ab";
const KNOWN_OPTIONS: &str =
    "trellis.attachable, trellis.encrypted, encrypted, trellis.network, com.docker.network.driver.mtu";

struct Host {
    lab: Lab,
    driver: Arc<DockerDriver>,
}

fn on(lab: Lab) -> Host {
    let driver = DockerDriver::new(lab.app.clone(), Engine { socket: NO_ENGINE.into() });
    Host { lab, driver }
}

fn one_host() -> Host {
    on(testing::lab())
}

/// Two hosts of one cluster (one store).
fn two_hosts() -> (Host, Host) {
    let store: Arc<dyn Store> = Arc::new(LocalStore::memory());
    (on(testing::host(store.clone(), "h1", |_| {})), on(testing::host(store, "h2", |_| {})))
}

/// A Docker network being created, as the IPAM driver answered for it.
struct Pool {
    id: String,
    /// The gateway dockerd was given, in CIDR notation (as it sends it back
    /// in CreateNetwork's IPv4Data).
    gateway: String,
}

// ---- Bodies, as dockerd sends them ----

fn request_pool(pool: &str) -> Value {
    json!({ "AddressSpace": "trellis", "Pool": pool, "SubPool": "", "Options": {}, "V6": false })
}

fn gateway_request(pool_id: &str, address: &str) -> Value {
    json!({ "PoolID": pool_id, "Address": address, "Options": { "RequestAddressType": "com.docker.network.gateway" } })
}

fn address_request(pool_id: &str, address: &str) -> Value {
    json!({ "PoolID": pool_id, "Address": address, "Options": {} })
}

fn release_address(pool_id: &str, ip: &str) -> Value {
    json!({ "PoolID": pool_id, "Address": ip })
}

fn release_pool(pool_id: &str) -> Value {
    json!({ "PoolID": pool_id })
}

fn create_network(id: &str, pool: &str, gateway: &str, generic: Value) -> Value {
    json!({
        "NetworkID": id,
        "Options": { "com.docker.network.enable_ipv6": false, "com.docker.network.generic": generic },
        "IPv4Data": [{ "AddressSpace": "trellis", "Gateway": gateway, "Pool": pool }],
        "IPv6Data": [],
    })
}

fn network_id(id: &str) -> Value {
    json!({ "NetworkID": id })
}

fn endpoint_options() -> Value {
    json!({ "com.docker.network.endpoint.exposedports": [], "com.docker.network.portmap": [] })
}

fn create_endpoint(net: &str, ep: &str, address: &str) -> Value {
    json!({
        "NetworkID": net,
        "EndpointID": ep,
        "Interface": { "Address": address, "AddressIPv6": "", "MacAddress": "" },
        "Options": endpoint_options(),
    })
}

fn join(net: &str, ep: &str) -> Value {
    json!({ "NetworkID": net, "EndpointID": ep, "SandboxKey": SANDBOX, "Options": endpoint_options() })
}

fn endpoint_ids(net: &str, ep: &str) -> Value {
    json!({ "NetworkID": net, "EndpointID": ep })
}

/// `-o trellis.network=NAME -o trellis.attachable=true`.
fn named(name: &str) -> Value {
    json!({ "trellis.network": name, "trellis.attachable": "true" })
}

impl Host {
    /// One call as dockerd makes it: no Content-Type, the body as Go's JSON
    /// encoder writes it (with a trailing newline), or none at all.
    async fn call(&self, method: &str, body: &Value) -> (StatusCode, Value) {
        let bytes = if body.is_null() { Vec::new() } else { format!("{body}\n").into_bytes() };
        self.driver.handle(method, &bytes).await.unwrap_or_else(|| panic!("{method} is not implemented"))
    }

    /// A call that must succeed: HTTP 200, neither `Err` nor `Error`.
    async fn ok(&self, method: &str, body: Value) -> Value {
        let (status, v) = self.call(method, &body).await;
        assert_eq!(status, StatusCode::OK, "{method}: {v}");
        assert!(v.get("Err").is_none() && v.get("Error").is_none(), "{method} was refused: {v}");
        v
    }

    /// A refusal: HTTP 200 with `{"Err": …}` (network driver) or
    /// `{"Error": …}` (IPAM driver) and nothing else; its message.
    async fn refused(&self, method: &str, body: Value) -> String {
        let (status, v) = self.call(method, &body).await;
        assert_eq!(status, StatusCode::OK, "{method}: {v}");
        let field = if method.starts_with("IpamDriver.") { "Error" } else { "Err" };
        let obj = v.as_object().unwrap_or_else(|| panic!("{method}: {v} is no object"));
        assert_eq!(obj.keys().collect::<Vec<_>>(), vec![field], "{method}: {v}");
        obj[field].as_str().unwrap_or_else(|| panic!("{method}: {v}")).to_string()
    }

    /// RequestPool and the gateway's RequestAddress, as `docker network
    /// create` starts (`subnet` empty: no --subnet).
    async fn pool(&self, subnet: &str) -> Pool {
        let p = self.ok("IpamDriver.RequestPool", request_pool(subnet)).await;
        let id = p["PoolID"].as_str().unwrap().to_string();
        let gw = self.ok("IpamDriver.RequestAddress", gateway_request(&id, "")).await;
        Pool { id, gateway: gw["Address"].as_str().unwrap().to_string() }
    }

    /// `docker network create -d trellis --ipam-driver trellis [--subnet S]
    /// -o …`: RequestPool, RequestAddress (gateway), CreateNetwork.
    async fn network(&self, docker_id: &str, subnet: &str, generic: Value) -> Pool {
        let p = self.pool(subnet).await;
        let pool = parse_pool_id(&p.id).unwrap().to_string();
        assert_eq!(
            self.ok("NetworkDriver.CreateNetwork", create_network(docker_id, &pool, &p.gateway, generic)).await,
            json!({})
        );
        p
    }

    /// What dockerd sends when CreateNetwork was refused (or the network is
    /// removed): the gateway's ReleaseAddress, then ReleasePool.
    async fn release(&self, p: &Pool) {
        let gw = p.gateway.split('/').next().unwrap();
        assert_eq!(self.ok("IpamDriver.ReleaseAddress", release_address(&p.id, gw)).await, json!({}));
        assert_eq!(self.ok("IpamDriver.ReleasePool", release_pool(&p.id)).await, json!({}));
    }

    /// `docker run --network N`: RequestAddress, CreateEndpoint, Join.
    /// Returns the address (CIDR) and Join's answer.
    async fn run(&self, net: &str, p: &Pool, ep: &str) -> (String, Value) {
        let a = self.ok("IpamDriver.RequestAddress", address_request(&p.id, "")).await;
        let addr = a["Address"].as_str().unwrap().to_string();
        assert_eq!(self.ok("NetworkDriver.CreateEndpoint", create_endpoint(net, ep, &addr)).await, json!({}));
        (addr, self.ok("NetworkDriver.Join", join(net, ep)).await)
    }

    /// The container stops: Leave, DeleteEndpoint, ReleaseAddress (with no
    /// prefix length), with a pass of the agent after Leave.
    async fn stop(&self, net: &str, p: &Pool, ep: &str, addr: &str) {
        assert_eq!(self.ok("NetworkDriver.Leave", endpoint_ids(net, ep)).await, json!({}));
        self.lab.app.converge().await.unwrap();
        assert_eq!(self.ok("NetworkDriver.DeleteEndpoint", endpoint_ids(net, ep)).await, json!({}));
        let ip = addr.split('/').next().unwrap();
        assert_eq!(self.ok("IpamDriver.ReleaseAddress", release_address(&p.id, ip)).await, json!({}));
    }

    /// `docker network rm`: DeleteNetwork, then the gateway's
    /// ReleaseAddress and ReleasePool.
    async fn remove(&self, docker_id: &str, p: &Pool) {
        assert_eq!(self.ok("NetworkDriver.DeleteNetwork", network_id(docker_id)).await, json!({}));
        self.release(p).await;
    }

    async fn keys(&self, prefix: &str) -> Vec<String> {
        let (items, _) = self.lab.store.list(prefix).await.unwrap();
        items.into_iter().map(|kv| kv.key).collect()
    }

    /// Every key of the driver: this host's Docker records and the
    /// cluster's subnet reservations.
    async fn driver_keys(&self) -> Vec<String> {
        let mut k = self.keys(&model::docker_host_prefix(&self.driver.app.cluster.host)).await;
        k.extend(self.keys(&model::docker_reserved_prefix()).await);
        k
    }

    async fn docker_net(&self, docker_id: &str) -> Option<DockerNet> {
        self.driver.records.net(docker_id).await.unwrap()
    }

    async fn network_names(&self) -> Vec<String> {
        self.lab.app.cluster.networks().await.unwrap().into_iter().map(|n| n.name).collect()
    }

    /// The one endpoint record of this host (being deleted or not).
    async fn only_endpoint(&self) -> EndpointRecord {
        let mut all = self.lab.app.cluster.all_endpoints().await.unwrap();
        all.retain(|e| e.host == self.driver.app.cluster.host);
        assert_eq!(all.len(), 1, "{all:?}");
        all.pop().unwrap()
    }

    /// The network's allocated addresses but its gateway's: (address,
    /// owner, host).
    async fn addresses(&self, net_id: &str) -> Vec<(String, String, String)> {
        let addrs = self.lab.app.cluster.ipam.addresses(net_id).await.unwrap();
        addrs
            .into_iter()
            .filter(|(_, r)| r.owner != "gateway")
            .map(|(ip, r)| (ip.to_string(), r.owner, r.host))
            .collect()
    }

    /// The fake kernel's interfaces the agent owns.
    fn links(&self) -> Vec<String> {
        self.lab.dp.with_state(|s| s.links.keys().filter(|n| model::owned_link(n)).cloned().collect())
    }

    /// Nothing is left in the cluster's store: no record of the driver's,
    /// no network, endpoint or address; only IPAM's (empty) subnet index.
    async fn nothing_left(&self) {
        let mut all = self.snapshot().await;
        if let Some(index) = all.remove(&self.lab.app.cluster.ipam.index_key()) {
            assert_eq!(serde_json::from_slice::<Value>(&index).unwrap(), json!({ "nets": {} }));
        }
        assert!(all.is_empty(), "left in the store: {:?}", all.keys().collect::<Vec<_>>());
    }

    /// Everything in the store, keys and values.
    async fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        let (items, _) = self.lab.store.list(model::ROOT).await.unwrap();
        items.into_iter().map(|kv| (kv.key, kv.value)).collect()
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

// ---- Handshake ----

#[tokio::test]
async fn activation_and_capabilities_answer_as_dockerd_expects() {
    let h = one_host();
    // dockerd sends these with no body at all.
    assert_eq!(h.ok("Plugin.Activate", Value::Null).await, json!({ "Implements": ["NetworkDriver", "IpamDriver"] }));
    assert_eq!(
        h.ok("NetworkDriver.GetCapabilities", Value::Null).await,
        json!({ "Scope": "local", "ConnectivityScope": "global" })
    );
    assert_eq!(
        h.ok("IpamDriver.GetCapabilities", Value::Null).await,
        json!({ "RequiresMACAddress": false, "RequiresRequestReplay": false })
    );
    assert_eq!(
        h.ok("IpamDriver.GetDefaultAddressSpaces", Value::Null).await,
        json!({ "LocalDefaultAddressSpace": "trellis", "GlobalDefaultAddressSpace": "trellis" })
    );
    for m in [
        "NetworkDriver.ProgramExternalConnectivity",
        "NetworkDriver.RevokeExternalConnectivity",
        "NetworkDriver.DiscoverNew",
        "NetworkDriver.DiscoverDelete",
    ] {
        assert_eq!(h.ok(m, json!({ "NetworkID": "n", "EndpointID": "e", "Options": {} })).await, json!({}), "{m}");
    }
    // Optional methods this driver does not implement: the server answers
    // 404 and dockerd skips them.
    for m in ["NetworkDriver.GwAllocCheck", "NetworkDriver.AllocateNetwork", "IpamDriver.Nope", "Nope"] {
        assert!(h.driver.handle(m, b"{}\n").await.is_none(), "{m}");
    }
    h.nothing_left().await;
}

#[test]
fn pool_ids_round_trip() {
    let n: IpNet = "10.7.0.0/24".parse().unwrap();
    assert_eq!(pool_id(&n), "trellis-10.7.0.0/24");
    assert_eq!(parse_pool_id(&pool_id(&n)).unwrap(), n);
    assert_eq!(parse_pool_id("bogus").unwrap_err(), "unknown pool \"bogus\"");
}

// ---- Lifecycle ----

/// No --subnet: the driver picks the subnet from the default pool and
/// reserves it cluster-wide until the network takes it.
#[tokio::test]
async fn a_container_on_a_network_of_a_chosen_subnet_comes_and_goes_leaving_nothing() {
    let h = one_host();
    let reserved = model::docker_reserved_key(&"10.0.0.0/24".parse().unwrap());

    assert_eq!(
        h.ok("IpamDriver.RequestPool", request_pool("")).await,
        json!({ "PoolID": "trellis-10.0.0.0/24", "Pool": "10.0.0.0/24", "Data": {} })
    );
    assert_eq!(h.lab.store.get(&reserved).await.unwrap().unwrap().value, b"h1");
    assert_eq!(h.keys(&model::docker_host_prefix("h1")).await, s(&["/trellis/v1/docker/hosts/h1/pools/10.0.0.0_24"]));
    // A second network meanwhile gets another subnet.
    assert_eq!(h.ok("IpamDriver.RequestPool", request_pool("")).await["Pool"], "10.0.1.0/24");
    assert_eq!(h.ok("IpamDriver.ReleasePool", release_pool("trellis-10.0.1.0/24")).await, json!({}));

    assert_eq!(
        h.ok("IpamDriver.RequestAddress", gateway_request("trellis-10.0.0.0/24", "")).await,
        json!({ "Address": "10.0.0.1/24", "Data": {} })
    );
    assert_eq!(
        h.ok("NetworkDriver.CreateNetwork", create_network("d1", "10.0.0.0/24", "10.0.0.1/24", named("app"))).await,
        json!({})
    );
    let dn = h.docker_net("d1").await.unwrap();
    assert_eq!((dn.pool.to_string(), dn.user_subnet, dn.attachable), ("10.0.0.0/24".into(), false, true));
    assert_eq!(dn.name.as_deref(), Some("app"));

    // The endpoint's address: the network is bound (created in the cluster)
    // and the address reserved for this host.
    assert_eq!(
        h.ok("IpamDriver.RequestAddress", address_request("trellis-10.0.0.0/24", "")).await,
        json!({ "Address": "10.0.0.2/24", "Data": {} })
    );
    let net = h.lab.app.cluster.network("app").await.unwrap();
    assert_eq!((net.subnet.to_string(), net.gateway), ("10.0.0.0/24".into(), Some("10.0.0.1".parse().unwrap())));
    assert_eq!(net.labels, BTreeMap::from([(CREATED_BY.to_string(), "docker".to_string())]));
    assert!(net.attachable && !net.internal && !net.encrypted);
    assert_eq!(h.docker_net("d1").await.unwrap().network_id.as_deref(), Some(net.id.as_str()));
    assert!(h.lab.store.get(&reserved).await.unwrap().is_none(), "the network took the subnet: no reservation");
    let all = h.lab.app.cluster.ipam.addresses(&net.id).await.unwrap();
    let all: Vec<_> = all.into_iter().map(|(ip, r)| (ip.to_string(), r.owner, r.host)).collect();
    assert_eq!(
        all,
        vec![("10.0.0.1".into(), "gateway".into(), "h1".into()), ("10.0.0.2".into(), RESERVED.into(), "h1".into())]
    );

    assert_eq!(h.ok("NetworkDriver.CreateEndpoint", create_endpoint("d1", "e1", "10.0.0.2/24")).await, json!({}));
    assert!(h.lab.app.cluster.all_endpoints().await.unwrap().is_empty(), "no endpoint before Join");

    let joined = h.ok("NetworkDriver.Join", join("d1", "e1")).await;
    let ep = h.only_endpoint().await;
    assert_eq!(
        joined,
        json!({
            "InterfaceName": { "SrcName": model::peer_ifname(&ep.id), "DstPrefix": "eth" },
            "Gateway": "10.0.0.1",
            "DisableGatewayService": true,
        })
    );
    assert_eq!(ep.ip.to_string(), "10.0.0.2", "the reserved address");
    assert_eq!((ep.network.as_str(), ep.network_id.as_str()), ("app", net.id.as_str()));
    assert_eq!((ep.kind, ep.netns.to_str(), ep.ifname.as_str()), (EndpointKind::Docker, Some(SANDBOX), "eth"));
    assert!(!ep.managed_netns && !ep.deleting);
    assert_eq!(h.addresses(&net.id).await, vec![("10.0.0.2".into(), ep.id.clone(), "h1".into())]);
    assert_eq!(h.lab.app.endpoints(Some("app")).await.unwrap().len(), 1);
    assert!(h.links().contains(&model::host_ifname(&ep.id)), "{:?}", h.links());
    assert_eq!(
        h.ok("NetworkDriver.EndpointOperInfo", endpoint_ids("d1", "e1")).await,
        json!({ "Value": { "trellis.endpoint": ep.id } })
    );
    assert_eq!(h.ok("NetworkDriver.ProgramExternalConnectivity", join("d1", "e1")).await, json!({}));

    // Leave: detached at once, gone after a pass (devices, record, address).
    assert_eq!(h.ok("NetworkDriver.RevokeExternalConnectivity", endpoint_ids("d1", "e1")).await, json!({}));
    assert_eq!(h.ok("NetworkDriver.Leave", endpoint_ids("d1", "e1")).await, json!({}));
    assert!(h.lab.app.endpoints(None).await.unwrap().is_empty(), "still live after Leave");
    assert!(h.only_endpoint().await.deleting);
    h.lab.app.converge().await.unwrap();
    assert!(h.lab.app.cluster.all_endpoints().await.unwrap().is_empty(), "the record is left");
    assert!(!h.links().contains(&model::host_ifname(&ep.id)), "the veth is left");
    assert!(h.addresses(&net.id).await.is_empty(), "the address is left");

    assert_eq!(h.ok("NetworkDriver.DeleteEndpoint", endpoint_ids("d1", "e1")).await, json!({}));
    assert!(h.keys(&format!("{}eps/", model::docker_host_prefix("h1"))).await.is_empty());
    assert_eq!(h.ok("IpamDriver.ReleaseAddress", release_address("trellis-10.0.0.0/24", "10.0.0.2")).await, json!({}));

    // The cluster network goes with the last Docker network bound to it.
    assert_eq!(h.ok("NetworkDriver.DeleteNetwork", network_id("d1")).await, json!({}));
    assert!(h.network_names().await.is_empty());
    assert!(h.links().is_empty(), "{:?}", h.links());
    assert_eq!(h.ok("IpamDriver.ReleaseAddress", release_address("trellis-10.0.0.0/24", "10.0.0.1")).await, json!({}));
    assert_eq!(h.ok("IpamDriver.ReleasePool", release_pool("trellis-10.0.0.0/24")).await, json!({}));
    h.nothing_left().await;
    // The subnet is free again.
    assert_eq!(h.ok("IpamDriver.RequestPool", request_pool("")).await["Pool"], "10.0.0.0/24");
}

/// --subnet, --gateway, --ip, --internal and an MTU; the network is
/// removed before the agent's pass after Leave.
#[tokio::test]
async fn a_container_on_a_network_of_a_given_subnet_comes_and_goes_leaving_nothing() {
    let h = one_host();
    assert_eq!(
        h.ok("IpamDriver.RequestPool", request_pool("10.99.0.0/24")).await,
        json!({ "PoolID": "trellis-10.99.0.0/24", "Pool": "10.99.0.0/24", "Data": {} })
    );
    assert!(h.keys(&model::docker_reserved_prefix()).await.is_empty(), "a given subnet is not reserved");
    assert_eq!(
        h.ok("IpamDriver.RequestAddress", gateway_request("trellis-10.99.0.0/24", "10.99.0.254")).await,
        json!({ "Address": "10.99.0.254/24", "Data": {} })
    );
    let mut body = create_network(
        "d1",
        "10.99.0.0/24",
        "10.99.0.254/24",
        json!({ "trellis.network": "db", "trellis.attachable": "", "com.docker.network.driver.mtu": "1400" }),
    );
    body["Options"]["com.docker.network.internal"] = json!(true);
    assert_eq!(h.ok("NetworkDriver.CreateNetwork", body).await, json!({}));

    assert_eq!(
        h.ok("IpamDriver.RequestAddress", address_request("trellis-10.99.0.0/24", "10.99.0.7")).await,
        json!({ "Address": "10.99.0.7/24", "Data": {} })
    );
    let net = h.lab.app.cluster.network("db").await.unwrap();
    assert_eq!(net.subnet.to_string(), "10.99.0.0/24");
    assert_eq!(net.gateway, Some("10.99.0.254".parse().unwrap()));
    assert_eq!((net.mtu, net.internal, net.attachable), (1400, true, true));
    // Asked again (dockerd replays or another container wants it): taken.
    assert_eq!(
        h.refused("IpamDriver.RequestAddress", address_request("trellis-10.99.0.0/24", "10.99.0.7")).await,
        "address 10.99.0.7 is already in use (by reserved)"
    );

    assert_eq!(h.ok("NetworkDriver.CreateEndpoint", create_endpoint("d1", "e1", "10.99.0.7/24")).await, json!({}));
    let joined = h.ok("NetworkDriver.Join", join("d1", "e1")).await;
    let ep = h.only_endpoint().await;
    // Internal: no gateway, and no docker_gwbridge either.
    assert_eq!(
        joined,
        json!({
            "InterfaceName": { "SrcName": model::peer_ifname(&ep.id), "DstPrefix": "eth" },
            "DisableGatewayService": true,
        })
    );
    assert_eq!(ep.ip.to_string(), "10.99.0.7");

    assert_eq!(h.ok("NetworkDriver.Leave", endpoint_ids("d1", "e1")).await, json!({}));
    assert_eq!(h.ok("NetworkDriver.DeleteEndpoint", endpoint_ids("d1", "e1")).await, json!({}));
    assert_eq!(
        h.ok("IpamDriver.ReleaseAddress", release_address("trellis-10.99.0.0/24", "10.99.0.7")).await,
        json!({})
    );
    // No pass ran since Leave: the endpoint being deleted goes with the
    // network, and so do its devices.
    assert!(h.only_endpoint().await.deleting);
    let p = Pool { id: "trellis-10.99.0.0/24".into(), gateway: "10.99.0.254/24".into() };
    h.remove("d1", &p).await;
    assert!(h.network_names().await.is_empty());
    assert!(h.lab.app.cluster.all_endpoints().await.unwrap().is_empty());
    assert!(h.addresses(&net.id).await.is_empty());
    assert!(h.links().is_empty(), "{:?}", h.links());
    h.nothing_left().await;
}

/// The background tasks (bind after CreateNetwork, learn after Join) find
/// no engine: they change nothing, so no test depends on their timing.
#[tokio::test]
async fn the_background_tasks_without_an_engine_change_nothing() {
    let h = one_host();
    let p = h.network("d1", "", named("app")).await;
    let (addr, _) = h.run("d1", &p, "e1").await;
    let before = h.snapshot().await;
    // Past the bind task's first attempt and several of learn's.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.snapshot().await, before);
    let ep = h.only_endpoint().await;
    assert!(ep.container_id.is_empty() && ep.aliases.is_empty() && ep.labels.is_empty(), "{ep:?}");
    h.stop("d1", &p, "e1", &addr).await;
    h.remove("d1", &p).await;
    h.nothing_left().await;
}

/// Without `-o trellis.network` the name comes from the engine: unreachable,
/// the endpoint's address is refused and nothing is made.
#[tokio::test]
async fn a_network_named_by_the_engine_is_refused_while_the_engine_is_unreachable() {
    let h = one_host();
    let p = h.network("d1", "", json!({})).await;
    let msg = h.refused("IpamDriver.RequestAddress", address_request(&p.id, "")).await;
    assert!(msg.starts_with(&format!("cannot reach the Docker engine at {NO_ENGINE}: ")), "{msg}");
    assert!(h.network_names().await.is_empty());
    assert!(h.docker_net("d1").await.unwrap().network_id.is_none());
    h.remove("d1", &p).await;
    h.nothing_left().await;
}

// ---- Refusals ----

fn request_pool6(pool: &str) -> Value {
    json!({ "AddressSpace": "trellis", "Pool": pool, "SubPool": "", "Options": {}, "V6": true })
}

fn create_endpoint6(net: &str, ep: &str, address: &str, address6: &str) -> Value {
    json!({
        "NetworkID": net,
        "EndpointID": ep,
        "Interface": { "Address": address, "AddressIPv6": address6, "MacAddress": "" },
        "Options": endpoint_options(),
    })
}

impl Host {
    /// `docker network create --ipv6 [--subnet S4] [--subnet S6]`: both
    /// pools and both gateways, then CreateNetwork with both families.
    async fn network6(&self, docker_id: &str, subnet: &str, subnet6: &str, generic: Value) -> (Pool, Pool) {
        let p = self.pool(subnet).await;
        let q = self.ok("IpamDriver.RequestPool", request_pool6(subnet6)).await;
        let id6 = q["PoolID"].as_str().unwrap().to_string();
        let gw6 = self.ok("IpamDriver.RequestAddress", gateway_request(&id6, "")).await;
        let p6 = Pool { id: id6, gateway: gw6["Address"].as_str().unwrap().to_string() };
        let mut body = create_network(docker_id, &parse_pool_id(&p.id).unwrap().to_string(), &p.gateway, generic);
        body["Options"]["com.docker.network.enable_ipv6"] = json!(true);
        body["IPv6Data"] = json!([{
            "AddressSpace": "trellis",
            "Gateway": p6.gateway,
            "Pool": parse_pool_id(&p6.id).unwrap().to_string(),
        }]);
        assert_eq!(self.ok("NetworkDriver.CreateNetwork", body).await, json!({}));
        (p, p6)
    }

    /// Everything in the store but the cluster's ULA /48 (chosen once and
    /// kept, by design).
    async fn nothing_left_but_the_ula_pool(&self) {
        let ula = format!("{}ula48", model::ipam_root());
        self.lab.store.txn(vec![], vec![trellis_store::Op::delete(ula)]).await.unwrap();
        self.nothing_left().await;
    }
}

/// `docker network create --ipv6` and `docker run` on it: a pool of each
/// family (the IPv6 one a /64 of the cluster's ULA /48 when no subnet is
/// given), an address of each family reserved, then claimed by the
/// endpoint in one transaction, the IPv6 gateway in Join's answer, and
/// everything released as dockerd tears it down.
#[tokio::test]
async fn docker_ipv6_networks_give_each_container_both_families() {
    let h = one_host();
    let (p, p6) = h.network6("d1", "", "", named("app")).await;
    let subnet6 = parse_pool_id(&p6.id).unwrap();
    let ula = h.lab.app.cluster.ipam.ula_pool().await.unwrap();
    assert!(subnet6.prefix_len() == 64 && ula.contains(&subnet6), "{subnet6} is not a /64 of {ula}");
    assert_eq!(p6.gateway, format!("{}/64", trellis_ipam::pure::default_gateway(&subnet6).unwrap()));
    // The IPv6 subnet is reserved cluster-wide until the network binds.
    let reserved = h.driver.records.reserved_subnets().await.unwrap();
    assert!(reserved.contains(&subnet6), "{reserved:?}");

    let a4 =
        h.ok("IpamDriver.RequestAddress", address_request(&p.id, "")).await["Address"].as_str().unwrap().to_string();
    let a6 =
        h.ok("IpamDriver.RequestAddress", address_request(&p6.id, "")).await["Address"].as_str().unwrap().to_string();
    assert!(a6.ends_with("/64"), "{a6}");
    let ip6: IpAddr = a6.split('/').next().unwrap().parse().unwrap();
    assert!(subnet6.contains(&ip6));
    let net = h.lab.app.cluster.network("app").await.unwrap();
    assert_eq!(net.subnet6, Some(subnet6), "the cluster network is dual-stack");
    assert_eq!(net.gateway6.map(|g| format!("{g}/64")), Some(p6.gateway.clone()));
    assert!(h.driver.records.reserved_subnets().await.unwrap().is_empty(), "reservations stay after the bind");
    assert!(
        h.addresses(&net.id).await.contains(&(ip6.to_string(), RESERVED.to_string(), "h1".to_string())),
        "the IPv6 address is reserved"
    );

    assert_eq!(h.ok("NetworkDriver.CreateEndpoint", create_endpoint6("d1", "e1", &a4, &a6)).await, json!({}));
    let joined = h.ok("NetworkDriver.Join", join("d1", "e1")).await;
    assert_eq!(joined["GatewayIPv6"], json!(net.gateway6.unwrap().to_string()), "{joined}");
    assert_eq!(joined["Gateway"], json!(net.gateway.unwrap().to_string()), "{joined}");
    let ep = h.only_endpoint().await;
    assert_eq!(ep.ip6, Some(ip6), "the endpoint has the address Docker gave the container");
    let owners = h.addresses(&net.id).await;
    assert_eq!(
        owners.iter().filter(|(_, o, _)| o == &ep.id).count(),
        2,
        "both addresses are the endpoint's, none still a reservation: {owners:?}"
    );

    // Torn down as dockerd does: both addresses released.
    assert_eq!(h.ok("NetworkDriver.Leave", endpoint_ids("d1", "e1")).await, json!({}));
    h.lab.app.converge().await.unwrap();
    assert_eq!(h.ok("NetworkDriver.DeleteEndpoint", endpoint_ids("d1", "e1")).await, json!({}));
    for (pool, a) in [(&p, &a4), (&p6, &a6)] {
        let ip = a.split('/').next().unwrap();
        assert_eq!(h.ok("IpamDriver.ReleaseAddress", release_address(&pool.id, ip)).await, json!({}));
    }
    assert!(h.addresses(&net.id).await.is_empty(), "{:?}", h.addresses(&net.id).await);
    assert_eq!(h.ok("NetworkDriver.DeleteNetwork", network_id("d1")).await, json!({}));
    h.release(&p).await;
    h.release(&p6).await;
    assert!(h.network_names().await.is_empty(), "the driver's cluster network went with it");
    h.nothing_left_but_the_ula_pool().await;
}

/// A user's IPv6 subnet is the network's; the IPv6 address Docker names
/// (`--ip6`) is the container's.
#[tokio::test]
async fn a_docker_ipv6_subnet_and_a_named_ipv6_address_are_honoured() {
    let h = one_host();
    let (_, p6) = h.network6("d1", "10.97.0.0/24", "fd00:97::/64", named("app")).await;
    assert_eq!(p6.id, "trellis-fd00:97::/64");
    let a4 = h.ok("IpamDriver.RequestAddress", address_request("trellis-10.97.0.0/24", "")).await["Address"]
        .as_str()
        .unwrap()
        .to_string();
    let a6 = h.ok("IpamDriver.RequestAddress", address_request(&p6.id, "fd00:97::99")).await;
    assert_eq!(a6["Address"], json!("fd00:97::99/64"));
    h.ok("NetworkDriver.CreateEndpoint", create_endpoint6("d1", "e1", &a4, "fd00:97::99/64")).await;
    h.ok("NetworkDriver.Join", join("d1", "e1")).await;
    assert_eq!(h.only_endpoint().await.ip6, Some("fd00:97::99".parse().unwrap()));
    // Taken: asked again, refused naming the holder.
    let again = h.refused("IpamDriver.RequestAddress", address_request(&p6.id, "fd00:97::99")).await;
    assert!(again.contains("fd00:97::99") && again.contains("in use"), "{again}");
}

/// What a user can get wrong, refused before anything is half-made: the
/// wrong family's subnet, an IPv6 --ip-range, a too-small IPv6 subnet, an
/// overlap with another network's IPv6 subnet, an IPv6 address on a
/// network without IPv6, an IPv6 reservation gone before the Join
/// (nothing of the endpoint written), and `--ipv6` on a host whose
/// cluster network another host created without IPv6.
#[tokio::test]
async fn docker_ipv6_mistakes_are_refused_and_leave_nothing_half_made() {
    let (h, h2) = two_hosts();
    assert_eq!(
        h.refused("IpamDriver.RequestPool", request_pool6("10.96.0.0/24")).await,
        "subnet 10.96.0.0/24 given where Docker asks for an IPv6 pool"
    );
    assert_eq!(
        h.refused("IpamDriver.RequestPool", request_pool("fd00:96::/64")).await,
        "subnet fd00:96::/64 given where Docker asks for an IPv4 pool"
    );
    let range = json!({ "AddressSpace": "trellis", "Pool": "fd00:96::/64", "SubPool": "fd00:96::/80", "Options": {}, "V6": true });
    assert_eq!(
        h.refused("IpamDriver.RequestPool", range).await,
        "--ip-range for IPv6 is not supported: Trellis allocates from the whole subnet"
    );
    assert_eq!(
        h.refused("IpamDriver.RequestPool", request_pool6("fd00:96::/126")).await,
        "IPv6 subnet fd00:96::/126 is too small: give a /120 or larger (a /64 is usual)"
    );
    h.nothing_left().await;

    let (p, p6) = h.network6("d1", "10.96.0.0/24", "fd00:96::/64", named("app")).await;
    let a4 =
        h.ok("IpamDriver.RequestAddress", address_request(&p.id, "")).await["Address"].as_str().unwrap().to_string();
    assert_eq!(
        h2.refused("IpamDriver.RequestPool", request_pool6("fd00:96:0:0:8000::/65")).await,
        "subnet fd00:96:0:0:8000::/65 overlaps fd00:96::/64 of Trellis network \"app\""
    );
    // An IPv6 reservation released (or never made) before the Join: the
    // attach fails saying so, and no endpoint record is left.
    let a6 =
        h.ok("IpamDriver.RequestAddress", address_request(&p6.id, "")).await["Address"].as_str().unwrap().to_string();
    h.ok("NetworkDriver.CreateEndpoint", create_endpoint6("d1", "e1", &a4, &a6)).await;
    h.ok("IpamDriver.ReleaseAddress", release_address(&p6.id, a6.split('/').next().unwrap())).await;
    let refused = h.refused("NetworkDriver.Join", join("d1", "e1")).await;
    assert!(refused.contains("was not reserved"), "{refused}");
    assert!(h.lab.app.cluster.all_endpoints().await.unwrap().is_empty());
    let net = h.lab.app.cluster.network("app").await.unwrap();
    let left = h.addresses(&net.id).await;
    assert_eq!(left, vec![(a4.split('/').next().unwrap().to_string(), RESERVED.to_string(), "h1".to_string())]);
    // An IPv6 address outside the network's IPv6 pool.
    assert_eq!(
        h.refused("NetworkDriver.CreateEndpoint", create_endpoint6("d1", "e2", &a4, "fd00:95::2/64")).await,
        "IPv6 address fd00:95::2 is not in the network's IPv6 pool fd00:96::/64"
    );

    // A network without --ipv6: an IPv6 address for it is refused.
    let q = h.network("d2", "10.95.0.0/24", named("plain")).await;
    let b4 =
        h.ok("IpamDriver.RequestAddress", address_request(&q.id, "")).await["Address"].as_str().unwrap().to_string();
    assert_eq!(
        h.refused("NetworkDriver.CreateEndpoint", create_endpoint6("d2", "e3", &b4, "fd00:96::3/64")).await,
        "IPv6 address fd00:96::3 on a network created without --ipv6"
    );
    // The other host's `--ipv6` network of the same name as this host's
    // IPv4-only one: refused when it binds, saying why.
    let (r, r6) = h2.network6("x2", "", "", named("plain")).await;
    let refused = h2.refused("IpamDriver.RequestAddress", address_request(&r.id, "")).await;
    assert_eq!(
        refused,
        "Trellis network \"plain\" already exists without IPv6 (created on another host); create the Docker network without --ipv6"
    );
    assert_eq!(h2.ok("NetworkDriver.DeleteNetwork", network_id("x2")).await, json!({}));
    h2.release(&r).await;
    h2.release(&r6).await;
    assert!(h2.driver_keys().await.is_empty(), "{:?}", h2.driver_keys().await);
}

#[tokio::test]
async fn ip_range_and_overlapping_subnets_are_refused_before_anything_is_written() {
    let h = one_host();
    let sub = json!({ "AddressSpace": "trellis", "Pool": "10.99.0.0/24", "SubPool": "10.99.0.128/25", "Options": {}, "V6": false });
    assert_eq!(
        h.refused("IpamDriver.RequestPool", sub).await,
        "--ip-range is not supported: Trellis allocates from the whole subnet"
    );
    assert_eq!(
        h.refused("IpamDriver.RequestPool", request_pool("10.99.0.1/24")).await,
        "invalid subnet \"10.99.0.1/24\": host bits are set; did you mean 10.99.0.0/24?"
    );
    h.nothing_left().await;
    let p = h.network("d1", "10.99.0.0/24", named("app")).await;
    h.ok("IpamDriver.RequestAddress", address_request(&p.id, "")).await;
    assert_eq!(
        h.refused("IpamDriver.RequestPool", request_pool("10.99.0.0/16")).await,
        "subnet 10.99.0.0/16 overlaps 10.99.0.0/24 of Trellis network \"app\""
    );
    assert_eq!(h.keys(&format!("{}pools/", model::docker_host_prefix("h1"))).await.len(), 1);
}

/// `docker network create -o …` refused: no Docker record, no cluster
/// network, and dockerd's ReleaseAddress + ReleasePool leave nothing
/// (the chosen subnet's reservation goes with the pool).
#[tokio::test]
async fn bad_options_are_refused_and_dockerd_s_rollback_leaves_nothing() {
    let h = one_host();
    let cases = [
        (
            json!({ "trellis.network": "app", "foo": "bar" }),
            format!("unknown option \"foo\": the trellis driver understands {KNOWN_OPTIONS}"),
        ),
        (
            json!({ "trellis.network": "app", "com.docker.network.driver.mtu": "big" }),
            "option com.docker.network.driver.mtu=\"big\" is not a number".to_string(),
        ),
        (
            json!({ "trellis.network": "app", "com.docker.network.driver.mtu": "100" }),
            "invalid mtu \"100\": must be between 576 and 9216".to_string(),
        ),
        (
            json!({ "trellis.network": "app", "trellis.attachable": "yes" }),
            "option trellis.attachable=\"yes\": expected true or false".to_string(),
        ),
        (
            json!({ "trellis.network": "my app" }),
            "invalid network name \"my app\": character ' ' is not allowed (letters, digits, '_', '.', '-')"
                .to_string(),
        ),
    ];
    for (generic, want) in cases {
        let p = h.pool("").await;
        assert_eq!(p.id, "trellis-10.0.0.0/24", "{want}: the last case's subnet was not released");
        let body = create_network("d1", "10.0.0.0/24", &p.gateway, generic);
        assert_eq!(h.refused("NetworkDriver.CreateNetwork", body).await, want);
        assert!(h.docker_net("d1").await.is_none(), "{want}");
        h.release(&p).await;
        h.nothing_left().await;
    }
    assert!(h.network_names().await.is_empty());
}

#[tokio::test]
async fn an_encrypted_network_is_refused_at_create_on_a_host_without_esp() {
    let store: Arc<dyn Store> = Arc::new(LocalStore::memory());
    // As the daemon does: the kernel's ESP probe says why not.
    let no_esp = crate::dataplane::FakeDataplane::default().esp_support().unwrap_err();
    let h = on(testing::host(store, "h1", |c| c.esp_unsupported = Some(no_esp)));
    // Trellis's option, and Docker's overlay option (`-o encrypted`) alike.
    for generic in [
        json!({ "trellis.network": "secret", "trellis.encrypted": "true" }),
        json!({ "trellis.network": "secret", "encrypted": "" }),
    ] {
        let p = h.pool("").await;
        assert_eq!(
            h.refused("NetworkDriver.CreateNetwork", create_network("d1", "10.0.0.0/24", &p.gateway, generic)).await,
            "network \"secret\" is encrypted, but this host's kernel cannot do IPsec ESP (the fake kernel has no ESP); \
             it needs CONFIG_INET_ESP and CONFIG_XFRM_USER with the rfc4106(gcm(aes)) AEAD. Nothing was created, and no \
             cleartext was sent"
        );
        assert!(h.docker_net("d1").await.is_none());
        assert!(h.network_names().await.is_empty());
        h.release(&p).await;
        h.nothing_left().await;
    }
}

/// An engine's API on a unix socket that knows one network, as
/// `GET /networks/{id}` answers it.
async fn fake_engine(dir: &std::path::Path, network: Value) -> Engine {
    let socket = dir.join("docker.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let app = axum::Router::new().route(
        "/networks/{id}",
        axum::routing::get(move || {
            let network = network.clone();
            async move { axum::Json(network) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Engine { socket }
}

#[tokio::test]
async fn dockers_own_attachable_flag_makes_the_network_attachable() {
    for (attachable, want) in [(true, true), (false, false)] {
        let dir = tempfile::tempdir().unwrap();
        let lab = testing::lab();
        let engine =
            fake_engine(dir.path(), json!({ "Name": "app", "Attachable": attachable, "Labels": {"team": "a"} })).await;
        let h = Host { driver: DockerDriver::new(lab.app.clone(), engine), lab };
        // `docker network create -d trellis --ipam-driver trellis
        // [--attachable] app`: no option names the network or makes it
        // attachable; the engine's record does.
        let p = h.network("d1", "10.0.0.0/24", json!({})).await;
        let (_, joined) = if want {
            h.run("d1", &p, "e1").await
        } else {
            let a = h.ok("IpamDriver.RequestAddress", address_request(&p.id, "")).await;
            let addr = a["Address"].as_str().unwrap().to_string();
            h.ok("NetworkDriver.CreateEndpoint", create_endpoint("d1", "e1", &addr)).await;
            let err = h.refused("NetworkDriver.Join", join("d1", "e1")).await;
            assert!(err.contains("not attachable"), "{err}");
            (addr, Value::Null)
        };
        let net = h.lab.app.cluster.network("app").await.unwrap();
        assert_eq!(net.attachable, want);
        assert_eq!(net.labels.get("team").map(String::as_str), Some("a"), "the engine's labels");
        if want {
            assert_eq!(joined["Gateway"], "10.0.0.1");
        }
    }
}

#[tokio::test]
async fn a_network_without_the_trellis_ipam_is_refused() {
    let h = one_host();
    // --ipam-driver default: a pool the trellis IPAM never gave.
    let body = json!({
        "NetworkID": "d1",
        "Options": { "com.docker.network.enable_ipv6": false, "com.docker.network.generic": named("app") },
        "IPv4Data": [{ "AddressSpace": "LocalDefault", "Gateway": "172.18.0.1/16", "Pool": "172.18.0.0/16" }],
        "IPv6Data": [],
    });
    assert_eq!(
        h.refused("NetworkDriver.CreateNetwork", body).await,
        "pool 172.18.0.0/16 was not allocated by the trellis IPAM driver: add --ipam-driver trellis"
    );
    let none = json!({ "NetworkID": "d1", "Options": {}, "IPv4Data": [], "IPv6Data": [] });
    assert_eq!(
        h.refused("NetworkDriver.CreateNetwork", none).await,
        "the trellis network driver needs the trellis IPAM driver: add --ipam-driver trellis"
    );
    h.nothing_left().await;
    assert!(h.network_names().await.is_empty());
}

#[tokio::test]
async fn endpoints_the_driver_does_not_know_are_refused() {
    let h = one_host();
    assert_eq!(
        h.refused("NetworkDriver.Join", join("d1", "ghost")).await,
        "endpoint ghost is unknown to the trellis driver"
    );
    assert_eq!(
        h.refused("NetworkDriver.CreateEndpoint", create_endpoint("nope", "e1", "10.0.0.2/24")).await,
        "Docker network nope is unknown to the trellis driver"
    );
    assert_eq!(
        h.refused("IpamDriver.RequestAddress", address_request("trellis-10.0.0.0/24", "")).await,
        "no Docker network uses pool 10.0.0.0/24 on this host"
    );
    assert_eq!(h.refused("IpamDriver.ReleasePool", release_pool("bogus")).await, "unknown pool \"bogus\"");
    let p = h.network("d1", "", named("app")).await;
    let no_address = json!({ "NetworkID": "d1", "EndpointID": "e1", "Interface": { "Address": "", "AddressIPv6": "", "MacAddress": "" } });
    assert_eq!(
        h.refused("NetworkDriver.CreateEndpoint", no_address).await,
        "the endpoint has no address: the trellis network driver needs --ipam-driver trellis"
    );
    let a = h.ok("IpamDriver.RequestAddress", address_request(&p.id, "")).await;
    let addr = a["Address"].as_str().unwrap().to_string();
    h.ok("NetworkDriver.CreateEndpoint", create_endpoint("d1", "e1", &addr)).await;
    let no_sandbox = json!({ "NetworkID": "d1", "EndpointID": "e1", "SandboxKey": "" });
    assert_eq!(h.refused("NetworkDriver.Join", no_sandbox).await, "Join without a SandboxKey");
    assert!(h.lab.app.cluster.all_endpoints().await.unwrap().is_empty());
    assert_eq!(
        h.keys(&format!("{}eps/", model::docker_host_prefix("h1"))).await,
        s(&["/trellis/v1/docker/hosts/h1/eps/e1"])
    );
    // dockerd's rollback after a failed Join.
    h.stop("d1", &p, "e1", &addr).await;
    h.remove("d1", &p).await;
    h.nothing_left().await;
    assert!(h.network_names().await.is_empty());
}

/// Join refused by the cluster (a network without trellis.attachable) or
/// failed in the kernel: no endpoint, and dockerd's rollback (Leave,
/// DeleteEndpoint, ReleaseAddress) frees the reserved address.
#[tokio::test]
async fn a_failed_join_leaves_nothing_after_dockerd_s_rollback() {
    let h = one_host();
    let p = h.network("d1", "", json!({ "trellis.network": "app" })).await;
    let a = h.ok("IpamDriver.RequestAddress", address_request(&p.id, "")).await;
    let addr = a["Address"].as_str().unwrap().to_string();
    h.ok("NetworkDriver.CreateEndpoint", create_endpoint("d1", "e1", &addr)).await;
    let msg = h.refused("NetworkDriver.Join", join("d1", "e1")).await;
    assert!(msg.starts_with("network \"app\" is not attachable: without --attachable"), "{msg}");
    let net = h.lab.app.cluster.network("app").await.unwrap();
    assert!(h.lab.app.cluster.all_endpoints().await.unwrap().is_empty());
    assert_eq!(h.addresses(&net.id).await, vec![("10.0.0.2".into(), RESERVED.into(), "h1".into())]);
    h.stop("d1", &p, "e1", &addr).await;
    assert!(h.addresses(&net.id).await.is_empty(), "the reservation is left");
    h.remove("d1", &p).await;
    h.nothing_left().await;

    let p = h.network("d2", "", named("app")).await;
    let a = h.ok("IpamDriver.RequestAddress", address_request(&p.id, "")).await;
    let addr = a["Address"].as_str().unwrap().to_string();
    h.ok("NetworkDriver.CreateEndpoint", create_endpoint("d2", "e2", &addr)).await;
    h.lab.dp.fail_every_endpoint.store(true, std::sync::atomic::Ordering::Relaxed);
    let msg = h.refused("NetworkDriver.Join", join("d2", "e2")).await;
    assert!(msg.starts_with("attaching to network \"app\" failed: "), "{msg}");
    assert!(msg.ends_with("; nothing was left behind"), "{msg}");
    h.lab.dp.fail_every_endpoint.store(false, std::sync::atomic::Ordering::Relaxed);
    let net = h.lab.app.cluster.network("app").await.unwrap();
    assert!(h.lab.app.cluster.all_endpoints().await.unwrap().is_empty());
    h.stop("d2", &p, "e2", &addr).await;
    assert!(h.addresses(&net.id).await.is_empty());
    assert!(h.links().iter().all(|l| !l.starts_with(model::VETH_PREFIX)), "{:?}", h.links());
    h.remove("d2", &p).await;
    h.nothing_left().await;
    assert!(h.network_names().await.is_empty());
}

/// A body that does not parse is dockerd's error (HTTP 400, still in the
/// driver's error field); a refusal is ours (HTTP 200).
#[tokio::test]
async fn a_body_that_does_not_parse_is_a_400_not_a_refusal() {
    let h = one_host();
    let (status, v) = h.driver.handle("NetworkDriver.CreateNetwork", b"{\"NetworkID\":").await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let msg = v["Err"].as_str().unwrap();
    assert!(msg.starts_with("malformed request body: "), "{v}");
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
    let (status, v) = h.driver.handle("IpamDriver.RequestPool", br#"{"V6":"yes"}"#).await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(v["Error"].as_str().unwrap().starts_with("malformed request body: "), "{v}");
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
    let (status, v) = h.driver.handle("NetworkDriver.Join", b"[1,2]").await.unwrap();
    assert_eq!((status, v["Err"].as_str().is_some()), (StatusCode::BAD_REQUEST, true), "{v}");
    // The same method with a body that parses: a refusal, HTTP 200.
    let (status, v) = h.call("NetworkDriver.Join", &join("d1", "e1")).await;
    assert_eq!((status, v), (StatusCode::OK, json!({ "Err": "endpoint e1 is unknown to the trellis driver" })));
    h.nothing_left().await;
}

// ---- Two hosts, one cluster ----

#[tokio::test]
async fn a_network_made_on_one_host_is_joined_on_another_and_goes_with_the_last() {
    let (a, b) = two_hosts();
    let pa = a.network("da", "", named("app")).await;
    let (addr_a, _) = a.run("da", &pa, "ea").await;
    let net = a.lab.app.cluster.network("app").await.unwrap();
    assert_eq!(net.subnet.to_string(), "10.0.0.0/24");

    // Host B, with the same --subnet: the gateway is the network's, whatever
    // was asked.
    let p = b.ok("IpamDriver.RequestPool", request_pool("10.0.0.0/24")).await;
    assert_eq!(p, json!({ "PoolID": "trellis-10.0.0.0/24", "Pool": "10.0.0.0/24", "Data": {} }));
    assert_eq!(
        b.ok("IpamDriver.RequestAddress", gateway_request("trellis-10.0.0.0/24", "10.0.0.254")).await,
        json!({ "Address": "10.0.0.1/24", "Data": {} })
    );
    let pb = Pool { id: "trellis-10.0.0.0/24".into(), gateway: "10.0.0.1/24".into() };
    b.ok("NetworkDriver.CreateNetwork", create_network("db", "10.0.0.0/24", "10.0.0.1/24", named("app"))).await;
    let (addr_b, joined) = b.run("db", &pb, "eb").await;
    // Joined, not re-created.
    let nets = b.lab.app.cluster.networks().await.unwrap();
    assert_eq!(nets.iter().map(|n| (&n.name, &n.id)).collect::<Vec<_>>(), vec![(&net.name, &net.id)]);
    assert_eq!(b.docker_net("db").await.unwrap().network_id.as_deref(), Some(net.id.as_str()));
    let eb = b.only_endpoint().await;
    assert_eq!((eb.network_id.as_str(), eb.host.as_str()), (net.id.as_str(), "h2"));
    assert_eq!(format!("{}/24", eb.ip), addr_b);
    assert_ne!(addr_a, addr_b);
    assert_eq!(joined["Gateway"], "10.0.0.1");
    assert!(b.links().contains(&model::host_ifname(&eb.id)));

    // B's container stops; A's Docker network goes first: the network
    // stays, bound to B's Docker network although nothing is attached.
    b.stop("db", &pb, "eb", &addr_b).await;
    a.stop("da", &pa, "ea", &addr_a).await;
    a.remove("da", &pa).await;
    assert_eq!(a.network_names().await, s(&["app"]));
    assert!(a.lab.app.cluster.all_endpoints().await.unwrap().is_empty());
    assert!(a.driver_keys().await.is_empty(), "{:?}", a.driver_keys().await);
    // B still uses it.
    let (addr_b, _) = b.run("db", &pb, "eb2").await;
    assert_eq!(b.only_endpoint().await.network_id, net.id);

    // B's goes last: so does the network.
    b.stop("db", &pb, "eb2", &addr_b).await;
    b.remove("db", &pb).await;
    assert!(b.network_names().await.is_empty());
    b.nothing_left().await;
    assert!(b.links().is_empty(), "{:?}", b.links());
    // A's bridge goes in A's next pass.
    a.lab.app.converge().await.unwrap();
    assert!(a.links().is_empty(), "{:?}", a.links());
}

/// Host B without --subnet: the driver chose another subnet for its pool,
/// but the network is the existing one (its subnet, its addresses) and the
/// chosen subnet's reservation goes.
#[tokio::test]
async fn a_network_made_elsewhere_is_joined_without_subnet() {
    let (a, b) = two_hosts();
    let pa = a.network("da", "", named("app")).await;
    a.ok("IpamDriver.RequestAddress", address_request(&pa.id, "")).await;
    let net = a.lab.app.cluster.network("app").await.unwrap();

    let pb = b.network("db", "", named("app")).await;
    assert_eq!(pb.id, "trellis-10.0.1.0/24");
    assert_eq!(b.keys(&model::docker_reserved_prefix()).await, s(&["/trellis/v1/docker/reserved/10.0.1.0_24"]));
    let (addr_b, joined) = b.run("db", &pb, "eb").await;
    let ip: IpAddr = addr_b.split('/').next().unwrap().parse().unwrap();
    assert!(net.subnet.contains(&ip) && addr_b.ends_with("/24"), "{addr_b}");
    assert_eq!(joined["Gateway"], "10.0.0.1");
    assert_eq!(b.network_names().await, s(&["app"]));
    assert!(b.keys(&model::docker_reserved_prefix()).await.is_empty(), "the chosen subnet is still reserved");

    b.stop("db", &pb, "eb", &addr_b).await;
    b.remove("db", &pb).await;
    assert_eq!(a.network_names().await, s(&["app"]), "A's network went with B's");
    assert!(b.driver_keys().await.is_empty(), "{:?}", b.driver_keys().await);
}

#[tokio::test]
async fn another_subnet_than_the_existing_network_s_is_refused_with_what_to_do() {
    let (a, b) = two_hosts();
    let pa = a.network("da", "", named("app")).await;
    a.ok("IpamDriver.RequestAddress", address_request(&pa.id, "")).await;
    let net = a.lab.app.cluster.network("app").await.unwrap();
    let before = a.addresses(&net.id).await;

    let pb = b.network("db", "10.50.0.0/24", named("app")).await;
    assert_eq!(pb.gateway, "10.50.0.1/24");
    let want = "Trellis network \"app\" already exists with subnet 10.0.0.0/24 (created on another host); \
                create the Docker network with --subnet 10.0.0.0/24 or without --subnet";
    assert_eq!(b.refused("IpamDriver.RequestAddress", address_request(&pb.id, "")).await, want);
    // Nothing half-made: the network as it was, no address for B.
    let nets = b.lab.app.cluster.networks().await.unwrap();
    assert_eq!(nets.len(), 1);
    assert_eq!((nets[0].id.as_str(), nets[0].subnet), (net.id.as_str(), net.subnet));
    assert_eq!(a.addresses(&net.id).await, before);
    assert!(b.docker_net("db").await.unwrap().network_id.is_none());
    // B's removal does not take A's network.
    b.remove("db", &pb).await;
    assert_eq!(a.network_names().await, s(&["app"]));
    assert!(b.driver_keys().await.is_empty(), "{:?}", b.driver_keys().await);
}

// ---- What dockerd retries or sends late ----

#[tokio::test]
async fn removals_of_what_is_unknown_or_already_gone_answer_empty() {
    let h = one_host();
    assert_eq!(h.ok("NetworkDriver.Leave", endpoint_ids("nope", "ghost")).await, json!({}));
    assert_eq!(h.ok("NetworkDriver.DeleteEndpoint", endpoint_ids("nope", "ghost")).await, json!({}));
    assert_eq!(h.ok("NetworkDriver.DeleteNetwork", network_id("nope")).await, json!({}));
    assert_eq!(h.ok("IpamDriver.ReleaseAddress", release_address("trellis-10.9.0.0/24", "10.9.0.5")).await, json!({}));
    assert_eq!(h.ok("IpamDriver.ReleasePool", release_pool("trellis-10.9.0.0/24")).await, json!({}));
    assert_eq!(
        h.ok("NetworkDriver.EndpointOperInfo", endpoint_ids("nope", "ghost")).await,
        json!({ "Value": { "trellis.endpoint": "" } })
    );
    h.nothing_left().await;

    let p = h.network("d1", "", named("app")).await;
    let (addr, _) = h.run("d1", &p, "e1").await;
    // Leave twice (before the pass), then everything again once gone.
    assert_eq!(h.ok("NetworkDriver.Leave", endpoint_ids("d1", "e1")).await, json!({}));
    h.stop("d1", &p, "e1", &addr).await;
    h.stop("d1", &p, "e1", &addr).await;
    // DeleteEndpoint without Leave (dockerd restarted) detaches.
    let (addr, _) = h.run("d1", &p, "e2").await;
    assert_eq!(h.ok("NetworkDriver.DeleteEndpoint", endpoint_ids("d1", "e2")).await, json!({}));
    assert!(h.lab.app.endpoints(None).await.unwrap().is_empty());
    assert_eq!(h.ok("NetworkDriver.Leave", endpoint_ids("d1", "e2")).await, json!({}));
    h.lab.app.converge().await.unwrap();
    assert_eq!(
        h.ok("IpamDriver.ReleaseAddress", release_address(&p.id, addr.split('/').next().unwrap())).await,
        json!({})
    );
    h.remove("d1", &p).await;
    assert!(h.network_names().await.is_empty());
    h.remove("d1", &p).await;
    h.nothing_left().await;
    assert!(h.lab.app.cluster.all_endpoints().await.unwrap().is_empty());
}

/// `docker network rm` right after `docker network create`, while the
/// background bind is between creating the cluster network (its reconcile
/// pass yields) and recording the binding: the cluster network must not
/// outlive the Docker network, nor the Docker network's record come back.
#[tokio::test]
async fn a_network_removed_while_it_is_being_bound_leaves_nothing() {
    let h = one_host();
    let p = h.network("d1", "", named("app")).await;
    // What the background task runs, and dockerd's DeleteNetwork, on one
    // task: the bind runs first, up to its first yield.
    let body = network_id("d1");
    let (bound, deleted) = tokio::join!(h.driver.bind("d1"), h.call("NetworkDriver.DeleteNetwork", &body));
    assert_eq!(deleted, (StatusCode::OK, json!({})));
    // The bind finished first, and DeleteNetwork removed what it made.
    assert_eq!(bound.map(|n| n.name), Ok("app".to_string()));
    h.release(&p).await;
    assert!(h.docker_net("d1").await.is_none(), "the Docker network's record came back");
    assert!(h.network_names().await.is_empty(), "the cluster network outlived the Docker network");
    h.nothing_left().await;
}

// ---- Published ports ----

/// ProgramExternalConnectivity's body as dockerd 20.10 sends it for `docker
/// run -p 18080:8080 -p 127.0.0.1:5353:53/udp -p 9000` (see the reference).
fn program(net: &str, ep: &str, portmap: Value) -> Value {
    json!({
        "NetworkID": net,
        "EndpointID": ep,
        "Options": {
            "com.docker.network.endpoint.exposedports": [{"Proto":6,"Port":8080},{"Proto":17,"Port":53},{"Proto":6,"Port":9000}],
            "com.docker.network.portmap": portmap,
        },
    })
}

fn reference_portmap() -> Value {
    json!([
        {"Proto":6,"IP":"","Port":8080,"HostIP":"","HostPort":18080,"HostPortEnd":18080},
        {"Proto":17,"IP":"","Port":53,"HostIP":"127.0.0.1","HostPort":5353,"HostPortEnd":5353},
        {"Proto":6,"IP":"","Port":9000,"HostIP":"","HostPort":0,"HostPortEnd":0}
    ])
}

#[tokio::test]
async fn published_ports_are_programmed_reported_revoked_and_go_with_the_container() {
    let h = one_host();
    let p = h.network("dn1", "10.60.0.0/24", named("app")).await;
    let (addr, _) = h.run("dn1", &p, "ep1").await;
    assert_eq!(
        h.ok("NetworkDriver.ProgramExternalConnectivity", program("dn1", "ep1", reference_portmap())).await,
        json!({})
    );
    let ports = h.only_endpoint().await.ports;
    assert_eq!(ports.len(), 3, "{ports:?}");
    let picked = ports.iter().find(|q| q.port == 9000).unwrap().host_port;
    assert!(crate::app::ports::EPHEMERAL.contains(&picked));
    // What `docker port` shows: the host ports actually bound.
    let info = h.ok("NetworkDriver.EndpointOperInfo", endpoint_ids("dn1", "ep1")).await;
    let map = info["Value"]["com.docker.network.portmap"].as_array().unwrap().clone();
    let ip = addr.split('/').next().unwrap();
    assert!(
        map.contains(&json!({"Proto":6,"IP":ip,"Port":8080,"HostIP":"0.0.0.0","HostPort":18080,"HostPortEnd":18080})),
        "{info}"
    );
    assert!(
        map.contains(&json!({"Proto":17,"IP":ip,"Port":53,"HostIP":"127.0.0.1","HostPort":5353,"HostPortEnd":5353})),
        "{info}"
    );
    assert!(
        map.contains(&json!({"Proto":6,"IP":ip,"Port":9000,"HostIP":"0.0.0.0","HostPort":picked,"HostPortEnd":picked})),
        "{info}"
    );
    assert_eq!(map.len(), 3, "{info}");
    assert_eq!(
        info["Value"]["com.docker.network.endpoint.exposedports"],
        json!([{"Proto":6,"Port":8080},{"Proto":6,"Port":9000},{"Proto":17,"Port":53}]),
        "{info}"
    );

    // A second container asking for a taken port is refused, naming it,
    // with none of its ports published.
    let (addr2, _) = h.run("dn1", &p, "ep2").await;
    let clash = json!([
        {"Proto":6,"IP":"","Port":80,"HostIP":"","HostPort":18081,"HostPortEnd":18081},
        {"Proto":6,"IP":"","Port":80,"HostIP":"","HostPort":18080,"HostPortEnd":18080}
    ]);
    let msg = h.refused("NetworkDriver.ProgramExternalConnectivity", program("dn1", "ep2", clash)).await;
    assert!(msg.contains("18080/tcp") && msg.contains("taken by Trellis endpoint"), "{msg}");
    let ep2 = h.driver.records.ep("ep2").await.unwrap().unwrap().endpoint_id.unwrap();
    assert!(h.lab.app.cluster.find_endpoint(&ep2, None).await.unwrap().ports.is_empty());
    // Ranges are refused naming the option.
    let range = json!([{"Proto":6,"IP":"","Port":80,"HostIP":"","HostPort":8000,"HostPortEnd":8010}]);
    let msg = h.refused("NetworkDriver.ProgramExternalConnectivity", program("dn1", "ep2", range)).await;
    assert!(msg.contains("-p 8000-8010:80/tcp") && msg.contains("ranges are not supported"), "{msg}");
    let sctp = json!([{"Proto":132,"IP":"","Port":80,"HostIP":"","HostPort":8000,"HostPortEnd":8000}]);
    assert!(h.refused("NetworkDriver.ProgramExternalConnectivity", program("dn1", "ep2", sctp)).await.contains("132"));
    h.stop("dn1", &p, "ep2", &addr2).await;

    // Revoke (before Leave, on `docker stop`) carries only the ids.
    assert_eq!(h.ok("NetworkDriver.RevokeExternalConnectivity", endpoint_ids("dn1", "ep1")).await, json!({}));
    assert!(h.only_endpoint().await.ports.is_empty());
    let info = h.ok("NetworkDriver.EndpointOperInfo", endpoint_ids("dn1", "ep1")).await;
    assert!(info["Value"].get("com.docker.network.portmap").is_none(), "{info}");
    assert!(info["Value"].get("com.docker.network.endpoint.exposedports").is_none(), "{info}");
    // Programmed again, then the container goes without a Revoke (dockerd
    // killed): the ports go with the endpoint.
    h.ok("NetworkDriver.ProgramExternalConnectivity", program("dn1", "ep1", reference_portmap())).await;
    h.stop("dn1", &p, "ep1", &addr).await;
    let rules = h.lab.dp.take_log().into_iter().rev().find_map(|a| match a {
        crate::dataplane::Action::ApplyEgress(r) => Some(r),
        _ => None,
    });
    assert!(rules.is_some_and(|r| r.published.is_empty()), "the last rules applied publish nothing");
    // Revoke of what is unknown or gone answers empty.
    assert_eq!(h.ok("NetworkDriver.RevokeExternalConnectivity", endpoint_ids("dn1", "ep1")).await, json!({}));
    h.remove("dn1", &p).await;
    h.nothing_left().await;
}

// ---- Endpoints the engine forgot ----

/// An engine's API whose answer to `GET /networks/{id}` the test sets
/// (`None`: 404, a network the engine no longer has).
async fn engine_answering(dir: &std::path::Path, answer: Arc<std::sync::Mutex<Option<Value>>>) -> Engine {
    let socket = dir.join("docker.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let app = axum::Router::new().route(
        "/networks/{id}",
        axum::routing::get(move || {
            let answer = answer.lock().unwrap().clone();
            async move {
                match answer {
                    Some(v) => axum::Json(v).into_response(),
                    None => (StatusCode::NOT_FOUND, "network not found").into_response(),
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Engine { socket }
}

/// Make the Trellis endpoint of Docker endpoint `docker_ep` `secs` older.
async fn age(h: &Host, docker_ep: &str, secs: i64) -> String {
    let id = h.driver.records.ep(docker_ep).await.unwrap().unwrap().endpoint_id.unwrap();
    let key = model::endpoint_key(&id);
    let kv = h.lab.store.get(&key).await.unwrap().unwrap();
    let mut e: EndpointRecord = serde_json::from_slice(&kv.value).unwrap();
    e.created_unix -= secs;
    h.lab.store.txn(vec![], vec![trellis_store::Op::put(key, serde_json::to_vec(&e).unwrap())]).await.unwrap();
    id
}

/// The network as `GET /networks/{id}` answers it, listing these endpoints.
fn listing(endpoints: &[&str]) -> Option<Value> {
    let containers: serde_json::Map<String, Value> =
        endpoints.iter().map(|e| (format!("container-of-{e}"), json!({ "EndpointID": e }))).collect();
    Some(json!({ "Name": "app", "Containers": containers }))
}

#[tokio::test]
async fn endpoints_the_engine_forgot_while_the_agent_was_down_are_swept() {
    let dir = tempfile::tempdir().unwrap();
    let answer = Arc::new(std::sync::Mutex::new(listing(&[])));
    let lab = testing::lab();
    let engine = engine_answering(dir.path(), answer.clone()).await;
    let h = Host { driver: DockerDriver::new(lab.app.clone(), engine), lab };
    let p = h.network("dn1", "10.60.1.0/24", named("app")).await;
    // ep1 publishes ports; ep2's sandbox is a namespace the kernel has.
    h.run("dn1", &p, "ep1").await;
    h.ok("NetworkDriver.ProgramExternalConnectivity", program("dn1", "ep1", reference_portmap())).await;
    let live = dir.path().join("live-sandbox");
    h.lab.dp.namespaces.lock().unwrap().insert(live.clone());
    let a = h.ok("IpamDriver.RequestAddress", address_request(&p.id, "")).await;
    let addr2 = a["Address"].as_str().unwrap().to_string();
    h.ok("NetworkDriver.CreateEndpoint", create_endpoint("dn1", "ep2", &addr2)).await;
    let join2 = json!({ "NetworkID": "dn1", "EndpointID": "ep2", "SandboxKey": live, "Options": endpoint_options() });
    h.ok("NetworkDriver.Join", join2).await;

    // Just joined, unlisted (the engine may not have stored them yet):
    // nothing goes.
    assert_eq!(h.driver.sweep().await, Ok(0));
    let id1 = age(&h, "ep1", 60).await;
    let id2 = age(&h, "ep2", 60).await;
    // Listed: nothing goes, however old.
    *answer.lock().unwrap() = listing(&["ep1", "ep2"]);
    assert_eq!(h.driver.sweep().await, Ok(0));

    // ep1's container was removed while the agent was down: the engine
    // forgot it and its sandbox is gone. It goes, with its ports, its
    // address and the driver's record.
    *answer.lock().unwrap() = listing(&["ep2"]);
    assert_eq!(h.driver.sweep().await, Ok(1));
    assert!(matches!(h.lab.app.cluster.find_endpoint(&id1, None).await, Err(AgentError::NotFound(_))));
    assert!(h.driver.records.ep("ep1").await.unwrap().is_none(), "the driver's record is left");
    let rules = h.lab.dp.take_log().into_iter().rev().find_map(|a| match a {
        crate::dataplane::Action::ApplyEgress(r) => Some(r),
        _ => None,
    });
    assert!(rules.is_some_and(|r| r.published.is_empty()), "ep1's ports are still published");
    let ep2 = h.lab.app.cluster.find_endpoint(&id2, None).await.unwrap();

    // Unlisted, or its network unknown to the engine, but its sandbox
    // lives with its interface inside: kept (an engine socket pointing at
    // another engine removes nothing).
    *answer.lock().unwrap() = listing(&[]);
    assert_eq!(h.driver.sweep().await, Ok(0));
    *answer.lock().unwrap() = None;
    assert_eq!(h.driver.sweep().await, Ok(0));
    assert!(h.lab.app.cluster.find_endpoint(&id2, None).await.is_ok());
    // An engine that does not answer decides nothing.
    let blind = DockerDriver::new(h.lab.app.clone(), Engine { socket: NO_ENGINE.into() });
    let err = blind.sweep().await.unwrap_err();
    assert!(err.contains("asking the engine") && err.contains(NO_ENGINE), "{err}");

    // dockerd, once the agent is back, stops ep2 as usual; then the network goes.
    h.lab.dp.namespaces.lock().unwrap().remove(&live);
    h.stop("dn1", &p, "ep2", &ep2.ip.to_string()).await;
    h.lab.app.converge().await.unwrap();
    h.remove("dn1", &p).await;
    h.nothing_left().await;
}

// ---- Health (a fake engine API on a unix socket) ----

/// An engine API that knows one container (`CID`, endpoint `dep1` on
/// Docker network `dnet`) whose health the test sets, and streams the
/// events the test sends.
#[derive(Default)]
struct FakeEngine {
    health: Option<String>,
    events: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    /// Event streams opened so far.
    subscriptions: usize,
}

const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

type Shared = Arc<std::sync::Mutex<FakeEngine>>;

async fn health_engine(socket: &std::path::Path) -> Shared {
    use axum::extract::State as St;
    let shared: Shared = Default::default();
    async fn network(UrlPath(_id): UrlPath<String>) -> axum::Json<Value> {
        axum::Json(json!({ "Name": "app", "Containers": { CID: { "EndpointID": "dep1" } } }))
    }
    async fn container(St(s): St<Shared>, UrlPath(id): UrlPath<String>) -> Response {
        if id != CID {
            return (StatusCode::NOT_FOUND, "no such container").into_response();
        }
        let health = s.lock().unwrap().health.clone();
        let mut state = json!({ "Status": "running", "Running": true });
        if let Some(h) = health {
            state["Health"] = json!({ "Status": h, "FailingStreak": 0 });
        }
        axum::Json(json!({
            "Id": CID, "Name": "/web1", "Config": { "Labels": { "trellis.service": "web" } },
            "NetworkSettings": { "Networks": { "app": { "Aliases": [], "EndpointID": "dep1" } } },
            "State": state,
        }))
        .into_response()
    }
    async fn events(St(s): St<Shared>) -> Response {
        use futures::StreamExt;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        {
            let mut s = s.lock().unwrap();
            s.events = Some(tx);
            s.subscriptions += 1;
        }
        let body = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
            .map(|line| Ok::<_, std::convert::Infallible>(Bytes::from(line)));
        axum::body::Body::from_stream(body).into_response()
    }
    let app = axum::Router::new()
        .route("/networks/{id}", axum::routing::get(network))
        .route("/containers/{id}/json", axum::routing::get(container))
        .route("/events", axum::routing::get(events))
        .with_state(shared.clone());
    let listener = tokio::net::UnixListener::bind(socket).unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    shared
}

/// A health event as dockerd 20.10 writes it, split in two writes.
fn send_health(e: &Shared, status: &str) {
    e.lock().unwrap().health = Some(status.into());
    let line = format!(
        r#"{{"status":"health_status: {status}","id":"{CID}","from":"trellis-busybox","Type":"container","Action":"health_status: {status}","Actor":{{"ID":"{CID}","Attributes":{{"name":"web1"}}}},"scope":"local","time":1,"timeNano":1}}"#
    );
    let (a, b) = line.split_at(40);
    let s = e.lock().unwrap();
    let tx = s.events.as_ref().expect("the driver follows the events");
    tx.send(a.to_string()).unwrap();
    tx.send(format!("{b}\n")).unwrap();
}

async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("never: {what}");
}

#[tokio::test]
async fn a_container_with_a_healthcheck_backs_its_service_only_while_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docker.sock");
    let engine = health_engine(&socket).await;
    engine.lock().unwrap().health = Some("starting".into());
    let lab = testing::ebpf_lab(std::time::Duration::ZERO);
    let h = Host { driver: DockerDriver::new(lab.app.clone(), Engine { socket: socket.clone() }), lab };
    tokio::spawn(h.driver.clone().follow_health());
    let p = h.network("dnet", "10.7.20.0/24", named("app")).await;
    eventually("the driver follows the engine's events", async || engine.lock().unwrap().events.is_some()).await;
    // The first Join binds the cluster network.
    let (addr, _) = h.run("dnet", &p, "dep1").await;
    let svc = crate::state::NewService {
        name: "web".into(),
        network: "app".into(),
        mode: model::ServiceMode::Vip,
        ports: vec![],
        selector: Default::default(),
        publish: vec![],
    };
    h.lab.app.create_service(crate::app::CreateService { service: svc, publish: vec![] }).await.unwrap();
    let ip: std::net::Ipv4Addr = addr.split('/').next().unwrap().parse().unwrap();
    // Learned with its labels, but starting: no backend yet.
    eventually("the container's identity is learned", async || h.only_endpoint().await.container_id == CID).await;
    let e = h.only_endpoint().await;
    assert!(!e.ready, "a starting container is not ready");
    let maglev = || async {
        h.lab.app.converge().await.unwrap();
        h.lab.app.reconciler.last_desired().tables.maglev.values().next().cloned().unwrap_or_default()
    };
    assert!(maglev().await.is_empty());
    let view = h.lab.app.service("web").await.unwrap();
    assert_eq!(view.backends.len(), 1);
    assert_eq!(view.backends[0].state, model::BackendState::Unready);
    // Healthy: a backend.
    send_health(&engine, "healthy");
    eventually("healthy makes it ready", async || h.only_endpoint().await.ready).await;
    assert_eq!(maglev().await, vec![ip]);
    // Unhealthy: out again.
    send_health(&engine, "unhealthy");
    eventually("unhealthy makes it unready", async || !h.only_endpoint().await.ready).await;
    assert!(maglev().await.is_empty());
    // The stream breaks and the health changes meanwhile: on reconnecting
    // the driver reads it.
    {
        let mut s = engine.lock().unwrap();
        s.events = None;
        s.health = Some("healthy".into());
    }
    eventually("the driver reconnects", async || engine.lock().unwrap().subscriptions >= 2).await;
    eventually("what changed meanwhile is read", async || h.only_endpoint().await.ready).await;
    assert_eq!(maglev().await, vec![ip]);
    h.stop("dnet", &p, "dep1", &addr).await;
}

#[tokio::test]
async fn a_leaving_backend_drains_without_keeping_docker_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docker.sock");
    // No HEALTHCHECK: ready once its labels are known.
    let _engine = health_engine(&socket).await;
    let lab = testing::ebpf_lab(std::time::Duration::from_secs(30));
    let h = Host { driver: DockerDriver::new(lab.app.clone(), Engine { socket: socket.clone() }), lab };
    let p = h.network("dnet", "10.7.21.0/24", named("app")).await;
    let (addr, _) = h.run("dnet", &p, "dep1").await;
    let svc = crate::state::NewService {
        name: "web".into(),
        network: "app".into(),
        mode: model::ServiceMode::Vip,
        ports: vec![],
        selector: Default::default(),
        publish: vec![],
    };
    h.lab.app.create_service(crate::app::CreateService { service: svc, publish: vec![] }).await.unwrap();
    eventually("the container's identity is learned", async || h.only_endpoint().await.container_id == CID).await;
    let e = h.only_endpoint().await;
    assert!(e.ready, "no HEALTHCHECK: ready");
    let net_id = e.network_id.clone();
    // `docker stop`: Leave, DeleteEndpoint, ReleaseAddress, each answered
    // at once; the endpoint drains behind them.
    let t0 = std::time::Instant::now();
    assert_eq!(h.ok("NetworkDriver.Leave", endpoint_ids("dnet", "dep1")).await, json!({}));
    assert_eq!(h.ok("NetworkDriver.DeleteEndpoint", endpoint_ids("dnet", "dep1")).await, json!({}));
    let ip = addr.split('/').next().unwrap();
    assert_eq!(h.ok("IpamDriver.ReleaseAddress", release_address(&p.id, ip)).await, json!({}));
    assert!(t0.elapsed() < std::time::Duration::from_secs(5), "Docker was kept waiting {:?}", t0.elapsed());
    let e = h.only_endpoint().await;
    assert!(e.draining(), "{e:?}");
    assert!(h.links().contains(&model::host_ifname(&e.id)), "its veth is kept while it drains");
    let holds = |addrs: Vec<(String, String, String)>| addrs.iter().any(|(a, owner, _)| a == ip && *owner == e.id);
    assert!(holds(h.addresses(&net_id).await), "its address is not reused while it drains");
    assert!(h.lab.app.reconciler.last_desired().tables.maglev.values().all(|ips| ips.is_empty()));
    // The drain ends: nothing is left.
    h.lab.app.cluster.end_drain(&e.id).await.unwrap();
    h.lab.app.converge().await.unwrap();
    assert!(h.lab.app.cluster.all_endpoints().await.unwrap().is_empty());
    assert!(!holds(h.addresses(&net_id).await), "its address is kept");
    assert!(!h.links().iter().any(|l| l.starts_with(model::VETH_PREFIX)), "{:?}", h.links());
}
