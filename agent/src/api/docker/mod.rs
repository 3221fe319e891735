//! The Docker remote network driver and IPAM driver `trellis`, served by
//! the agent on `/run/docker/plugins/trellis.sock`.
//!
//! Docker's protocol names neither the network nor the container: a Docker
//! network (local to one engine) is bound to the cluster network of the
//! same name once the engine's API knows the name, and an endpoint learns
//! its container's name, aliases and labels from the engine after Join.
//! The per-host mapping (Docker network → cluster network, Docker endpoint
//! → Trellis endpoint, pools) lives in the store under
//! `docker/hosts/<host>/`, so an agent restart loses nothing.
//!
//! Addresses: Docker asks its IPAM driver for the endpoint's address
//! before it creates the endpoint, so RequestAddress *reserves* an address
//! in the cluster network and Join's attach claims the reservation in the
//! same transaction that writes the endpoint.

pub mod engine;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ipnet::IpNet;
use serde_json::{Value, json};
use trellis_ipam::{AddrRequest, pure};
use trellis_plugin_api::docker as dp;
use trellis_plugin_api::validate;

use crate::api::docker::engine::{Engine, EngineError};
use crate::app::{App, AttachRequest, PortRequest, Unlisted};
use crate::model::{self, EndpointKind, NetworkRecord, Proto};
use crate::state::docker::{DockerEp, DockerNet, DockerPool, DockerRecords};
use crate::state::{AgentError, NewNetwork};

/// Options `docker network create -o` understands.
pub const OPT_ATTACHABLE: &str = "trellis.attachable";
pub const OPT_ENCRYPTED: &str = "trellis.encrypted";
/// Docker's overlay option for the same (`docker network create -o encrypted`).
pub const OPT_DOCKER_ENCRYPTED: &str = "encrypted";
pub const OPT_NETWORK: &str = "trellis.network";
pub const OPT_MTU: &str = "com.docker.network.driver.mtu";
/// The label on cluster networks the driver created (removed with the last
/// Docker network bound to them).
pub const CREATED_BY: &str = "trellis.created-by";

const ADDRESS_SPACE: &str = "trellis";
const DST_PREFIX: &str = "eth";

fn pool_id(n: &IpNet) -> String {
    format!("trellis-{n}")
}

fn parse_pool_id(id: &str) -> Result<IpNet, String> {
    id.strip_prefix("trellis-").and_then(|s| s.parse().ok()).ok_or_else(|| format!("unknown pool {id:?}"))
}

pub struct DockerDriver {
    app: Arc<App>,
    records: DockerRecords,
    engine: Engine,
    bind_lock: tokio::sync::Mutex<()>,
    /// One reading of a container's health (inspect, then the write) at a
    /// time: the last write is from the latest reading.
    health_lock: tokio::sync::Mutex<()>,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

type Answer = Result<Value, String>;

impl DockerDriver {
    pub fn new(app: Arc<App>, engine: Engine) -> Arc<DockerDriver> {
        let host = app.cluster.host.clone();
        let records = DockerRecords::new(app.cluster.store.clone(), &host);
        Arc::new(DockerDriver {
            app,
            records,
            engine,
            bind_lock: tokio::sync::Mutex::new(()),
            health_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// One request: `None` for a method this driver does not implement
    /// (the engine gets a 404 and skips it).
    pub async fn handle(self: &Arc<Self>, method: &str, body: &[u8]) -> Option<(StatusCode, Value)> {
        let ipam = method.starts_with("IpamDriver.");
        // A body that does not parse is the engine's error (HTTP 400); a
        // refusal is ours (HTTP 200 with Err/Error).
        let answer = match self.dispatch(method, body).await {
            Ok(Some(a)) => a,
            Ok(None) => return None,
            Err(e) => {
                let v = if ipam { dp::ipam_error(&e) } else { dp::network_error(&e) };
                return Some((StatusCode::BAD_REQUEST, v));
            }
        };
        Some(match answer {
            Ok(v) => (StatusCode::OK, v),
            Err(msg) => {
                tracing::warn!(method, error = %msg, "docker driver request refused");
                (StatusCode::OK, if ipam { dp::ipam_error(&msg) } else { dp::network_error(&msg) })
            }
        })
    }

    /// Run one method; `Err` is a body that does not parse, `Ok(None)` a
    /// method this driver does not implement.
    async fn dispatch(self: &Arc<Self>, method: &str, body: &[u8]) -> Result<Option<Answer>, String> {
        Ok(Some(match method {
            "Plugin.Activate" => Ok(json!({ "Implements": ["NetworkDriver", "IpamDriver"] })),
            "NetworkDriver.GetCapabilities" => Ok(json!({ "Scope": "local", "ConnectivityScope": "global" })),
            "NetworkDriver.CreateNetwork" => self.create_network(dp::parse(body)?).await,
            "NetworkDriver.DeleteNetwork" => {
                self.delete_network(&dp::parse::<dp::NetworkRequest>(body)?.network_id).await
            }
            "NetworkDriver.CreateEndpoint" => self.create_endpoint(dp::parse(body)?).await,
            "NetworkDriver.DeleteEndpoint" => {
                self.delete_endpoint(&dp::parse::<dp::EndpointRequest>(body)?.endpoint_id).await
            }
            "NetworkDriver.EndpointOperInfo" => {
                self.oper_info(&dp::parse::<dp::EndpointRequest>(body)?.endpoint_id).await
            }
            "NetworkDriver.Join" => self.join(dp::parse(body)?).await,
            "NetworkDriver.Leave" => self.leave(&dp::parse::<dp::EndpointRequest>(body)?.endpoint_id).await,
            // Connectivity to the outside is the network's egress rule and
            // the endpoint's published ports; node discovery is the
            // store's job.
            "NetworkDriver.ProgramExternalConnectivity" => self.program_external(dp::parse(body)?).await,
            "NetworkDriver.RevokeExternalConnectivity" => {
                self.revoke_external(&dp::parse::<dp::ExternalConnectivityRequest>(body)?.endpoint_id).await
            }
            "NetworkDriver.DiscoverNew" | "NetworkDriver.DiscoverDelete" => Ok(json!({})),
            "IpamDriver.GetCapabilities" => Ok(json!({ "RequiresMACAddress": false, "RequiresRequestReplay": false })),
            "IpamDriver.GetDefaultAddressSpaces" => Ok(json!({
                "LocalDefaultAddressSpace": ADDRESS_SPACE,
                "GlobalDefaultAddressSpace": ADDRESS_SPACE,
            })),
            "IpamDriver.RequestPool" => self.request_pool(dp::parse(body)?).await,
            "IpamDriver.ReleasePool" => self.release_pool(&dp::parse::<dp::ReleasePoolRequest>(body)?.pool_id).await,
            "IpamDriver.RequestAddress" => self.request_address(dp::parse(body)?).await,
            "IpamDriver.ReleaseAddress" => self.release_address(dp::parse(body)?).await,
            _ => return Ok(None),
        }))
    }

    // ---- IPAM ----

    async fn request_pool(&self, r: dp::RequestPoolRequest) -> Answer {
        if !r.sub_pool.is_empty() {
            let flag = if r.v6 { "--ip-range for IPv6" } else { "--ip-range" };
            return Err(format!("{flag} is not supported: Trellis allocates from the whole subnet"));
        }
        let (subnet, user_subnet) = if r.pool.is_empty() {
            (self.reserve_subnet(r.v6).await?, false)
        } else {
            let subnet = validate::subnet(&r.pool).map_err(err)?;
            if subnet.addr().is_ipv6() != r.v6 {
                let want = if r.v6 { "an IPv6" } else { "an IPv4" };
                return Err(format!("subnet {subnet} given where Docker asks for {want} pool"));
            }
            if r.v6 && subnet.prefix_len() > 120 {
                return Err(format!("IPv6 subnet {subnet} is too small: give a /120 or larger (a /64 is usual)"));
            }
            for n in self.app.cluster.networks().await.map_err(err)? {
                for theirs in std::iter::once(n.subnet).chain(n.subnet6) {
                    if theirs != subnet && pure::overlaps(&theirs, &subnet) {
                        return Err(format!("subnet {subnet} overlaps {theirs} of Trellis network {:?}", n.name));
                    }
                }
            }
            (subnet, true)
        };
        self.records.save_pool(&DockerPool { subnet, user_subnet }).await.map_err(err)?;
        Ok(json!({ "PoolID": pool_id(&subnet), "Pool": subnet.to_string(), "Data": {} }))
    }

    /// A subnet from the default pool (IPv6: a /64 of the cluster's ULA
    /// /48), reserved cluster-wide until a network takes it (or the pool
    /// is released).
    async fn reserve_subnet(&self, v6: bool) -> Result<IpNet, String> {
        let c = &self.app.cluster;
        let avoid = self.app.dataplane.host_routes().await.map_err(err)?;
        let (pool, prefix_len) =
            if v6 { (c.ipam.ula_pool().await.map_err(err)?, 64) } else { (c.default_pool, c.default_prefix_len) };
        for _ in 0..16 {
            let mut taken: Vec<IpNet> = c
                .networks()
                .await
                .map_err(err)?
                .iter()
                .flat_map(|n| std::iter::once(n.subnet).chain(n.subnet6))
                .collect();
            taken.extend(self.records.reserved_subnets().await.map_err(err)?);
            let Some(subnet) = pure::choose_subnet(&pool, prefix_len, &taken, &avoid) else {
                return Err(format!("the default pool {pool} has no free /{prefix_len} left"));
            };
            if self.records.reserve_subnet(&subnet).await.map_err(err)? {
                return Ok(subnet);
            }
        }
        Err("subnets kept being taken concurrently; try again".into())
    }

    async fn drop_reservation(&self, subnet: &IpNet) -> Result<(), String> {
        self.records.drop_reservation(subnet).await.map_err(err)
    }

    async fn release_pool(&self, id: &str) -> Answer {
        let subnet = parse_pool_id(id)?;
        self.records.delete_pool(&subnet).await.map_err(err)?;
        self.drop_reservation(&subnet).await?;
        Ok(json!({}))
    }

    /// The Docker network whose pool is `subnet`.
    async fn net_by_pool(&self, subnet: &IpNet) -> Result<Option<DockerNet>, String> {
        self.records.net_by_pool(subnet).await.map_err(err)
    }

    async fn request_address(self: &Arc<Self>, r: dp::RequestAddressRequest) -> Answer {
        let subnet = parse_pool_id(&r.pool_id)?;
        let v6 = subnet.addr().is_ipv6();
        if r.is_gateway() {
            // The network's gateway: the cluster network's if it exists,
            // else the one asked for, else the subnet's first address.
            let networks = self.app.cluster.networks().await.map_err(err)?;
            let existing = networks.into_iter().find_map(|n| match v6 {
                false => (n.subnet == subnet).then_some(n.gateway).flatten(),
                true => (n.subnet6 == Some(subnet)).then_some(n.gateway6).flatten(),
            });
            let gw = match (existing, r.address.is_empty()) {
                (Some(g), _) => g,
                (None, false) => validate::ip("gateway", &r.address).map_err(err)?,
                (None, true) => pure::default_gateway(&subnet).ok_or_else(|| format!("{subnet} has no gateway"))?,
            };
            return Ok(json!({ "Address": format!("{gw}/{}", subnet.prefix_len()), "Data": {} }));
        }
        let Some(dn) = self.net_by_pool(&subnet).await? else {
            return Err(format!("no Docker network uses pool {subnet} on this host"));
        };
        let net = self.bind(&dn.docker_id).await?;
        let request = if r.address.is_empty() {
            AddrRequest::Any
        } else {
            AddrRequest::Specific(validate::ip("address", &r.address).map_err(err)?)
        };
        let ip = self.app.cluster.reserve_address(&net, v6, request).await.map_err(err)?;
        let prefix = if v6 { net.subnet6.map_or(64, |s| s.prefix_len()) } else { net.subnet.prefix_len() };
        Ok(json!({ "Address": format!("{ip}/{prefix}"), "Data": {} }))
    }

    async fn release_address(&self, r: dp::ReleaseAddressRequest) -> Answer {
        let subnet = parse_pool_id(&r.pool_id)?;
        let ip = validate::address("address", &r.address).map_err(err)?;
        let Some(dn) = self.net_by_pool(&subnet).await? else { return Ok(json!({})) };
        let Some(net_id) = dn.network_id else { return Ok(json!({})) };
        let net = match self.app.cluster.network(&net_id).await {
            Ok(n) => n,
            Err(AgentError::NotFound(_)) => return Ok(json!({})),
            Err(e) => return Err(e.to_string()),
        };
        if net.gateway == Some(ip) || net.gateway6 == Some(ip) {
            return Ok(json!({}));
        }
        // Still a reservation (the endpoint never joined): released here;
        // an endpoint's address goes with the endpoint.
        self.app.cluster.release_reservation(&net, ip).await.map_err(err)?;
        Ok(json!({}))
    }

    // ---- Network driver ----

    async fn create_network(self: &Arc<Self>, r: dp::CreateNetworkRequest) -> Answer {
        let v4 = r.ipv4_data.as_ref().and_then(|d| d.first()).cloned().unwrap_or_default();
        if v4.pool.is_empty() {
            return Err("the trellis network driver needs the trellis IPAM driver: add --ipam-driver trellis".into());
        }
        if r.ipv6_data.as_ref().is_some_and(|d| d.iter().filter(|p| !p.pool.is_empty()).count() > 1) {
            return Err("a Trellis network has one IPv6 subnet: give one IPv6 --subnet".into());
        }
        if r.ipv4_data.as_ref().is_some_and(|d| d.len() > 1) {
            return Err("a Trellis network has one IPv4 subnet: give one IPv4 --subnet".into());
        }
        let pool = validate::subnet(&v4.pool).map_err(err)?;
        let Some(p) = self.records.pool(&pool).await.map_err(err)? else {
            return Err(format!("pool {pool} was not allocated by the trellis IPAM driver: add --ipam-driver trellis"));
        };
        // `--ipv6`: the IPv6 pool, from the same IPAM driver.
        let (pool6, gateway6, user_subnet6) =
            match r.ipv6_data.as_ref().and_then(|d| d.iter().find(|p| !p.pool.is_empty())) {
                None => (None, None, false),
                Some(d6) => {
                    let pool6 = validate::subnet(&d6.pool).map_err(err)?;
                    let Some(p6) = self.records.pool(&pool6).await.map_err(err)? else {
                        return Err(format!(
                            "IPv6 pool {pool6} was not allocated by the trellis IPAM driver: add --ipam-driver trellis"
                        ));
                    };
                    let gw = if d6.gateway.is_empty() {
                        None
                    } else {
                        Some(validate::address("IPv6 gateway", &d6.gateway).map_err(err)?)
                    };
                    (Some(pool6), gw, p6.user_subnet)
                }
            };
        let generic = r.generic();
        let known = [OPT_ATTACHABLE, OPT_ENCRYPTED, OPT_DOCKER_ENCRYPTED, OPT_NETWORK, OPT_MTU];
        if let Some(k) = generic.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(format!("unknown option {k:?}: the trellis driver understands {}", known.join(", ")));
        }
        let flag = |k: &str| -> Result<bool, String> {
            match generic.get(k).map(String::as_str) {
                None | Some("false") => Ok(false),
                Some("true") | Some("") => Ok(true),
                Some(v) => Err(format!("option {k}={v:?}: expected true or false")),
            }
        };
        let mtu = match generic.get(OPT_MTU) {
            Some(v) => v.parse::<u32>().map_err(|_| format!("option {OPT_MTU}={v:?} is not a number"))?,
            None => 0,
        };
        validate::mtu(mtu).map_err(err)?;
        let name = generic.get(OPT_NETWORK).cloned();
        if let Some(n) = &name {
            validate::name("network name", n).map_err(err)?;
        }
        let gateway =
            if v4.gateway.is_empty() { None } else { Some(validate::address("gateway", &v4.gateway).map_err(err)?) };
        let dn = DockerNet {
            docker_id: r.network_id.clone(),
            pool,
            gateway,
            user_subnet: p.user_subnet,
            pool6,
            gateway6,
            user_subnet6,
            attachable: flag(OPT_ATTACHABLE)?,
            internal: r.flag("com.docker.network.internal"),
            encrypted: flag(OPT_ENCRYPTED)? || flag(OPT_DOCKER_ENCRYPTED)?,
            mtu,
            name,
            network_id: None,
        };
        if dn.encrypted {
            // Refused now, not when the first container joins.
            self.app.cluster.require_esp(dn.name.as_deref().unwrap_or(&r.network_id)).map_err(err)?;
        }
        self.records.save_net(&dn).await.map_err(err)?;
        // Bind as soon as the engine knows the network's name (right after
        // this call returns); endpoints bind on demand anyway.
        let me = self.clone();
        let id = r.network_id.clone();
        tokio::spawn(async move {
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                match me.bind(&id).await {
                    Ok(_) => return,
                    Err(e) => tracing::debug!(network = %id, error = %e, "binding a Docker network (retrying)"),
                }
            }
        });
        Ok(json!({}))
    }

    /// The cluster network a Docker network stands for, created here if
    /// no host has created it yet.
    async fn bind(&self, docker_id: &str) -> Result<NetworkRecord, String> {
        let _guard = self.bind_lock.lock().await;
        let Some(mut dn) = self.records.net(docker_id).await.map_err(err)? else {
            return Err(format!("Docker network {docker_id} is unknown to the trellis driver"));
        };
        let c = &self.app.cluster;
        if let Some(id) = &dn.network_id {
            return match c.network(id).await {
                Ok(n) => Ok(n),
                Err(AgentError::NotFound(_)) => Err(format!(
                    "Trellis network {:?} was removed from the cluster: remove this Docker network and create it again",
                    dn.name.clone().unwrap_or_default()
                )),
                Err(e) => Err(e.to_string()),
            };
        }
        let mut labels = BTreeMap::new();
        // The engine's record of the network: its name (unless an option
        // gave one), its labels, and Docker's own `--attachable`, none of
        // which the engine passes to the driver.
        let looked = self.engine.network(docker_id).await;
        let name = match &dn.name {
            Some(n) => n.clone(),
            None => {
                let info = looked.as_ref().map_err(err)?;
                labels = info.labels.clone().unwrap_or_default();
                labels.retain(|k, v| validate::labels(&BTreeMap::from([(k.clone(), v.clone())])).is_ok());
                validate::name("network name", &info.name).map_err(err)?;
                info.name.clone()
            }
        };
        match &looked {
            Ok(info) if info.attachable => dn.attachable = true,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(network = %name, error = %e, "the engine's record of the network is unreadable: Docker's --attachable, if given, is not seen (-o trellis.attachable=true is)")
            }
        }
        labels.insert(CREATED_BY.to_string(), "docker".to_string());
        let net = loop {
            match c.network(&name).await {
                Ok(n) => {
                    if dn.user_subnet && n.subnet != dn.pool {
                        return Err(format!(
                            "Trellis network {name:?} already exists with subnet {} (created on another host); create the Docker network with --subnet {} or without --subnet",
                            n.subnet, n.subnet
                        ));
                    }
                    match (dn.pool6, n.subnet6) {
                        (Some(_), None) => {
                            return Err(format!(
                                "Trellis network {name:?} already exists without IPv6 (created on another host); create the Docker network without --ipv6"
                            ));
                        }
                        (Some(mine), Some(theirs)) if dn.user_subnet6 && mine != theirs => {
                            return Err(format!(
                                "Trellis network {name:?} already exists with IPv6 subnet {theirs} (created on another host); create the Docker network with --subnet {theirs} or without an IPv6 --subnet"
                            ));
                        }
                        _ => {}
                    }
                    break n;
                }
                Err(AgentError::NotFound(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
            let new = NewNetwork {
                name: name.clone(),
                subnet: Some(dn.pool),
                gateway: dn.gateway,
                subnet6: dn.pool6,
                gateway6: dn.gateway6,
                ipv6: false,
                attachable: dn.attachable,
                internal: dn.internal,
                encrypted: dn.encrypted,
                mtu: dn.mtu,
                labels: labels.clone(),
            };
            match self.app.create_network(new).await {
                Ok(_) => {}
                Err(AgentError::AlreadyExists(_)) => continue,
                Err(e) => return Err(e.to_string()),
            }
        };
        // The subnet is the network's now (or another one is): the
        // reservation goes.
        if !dn.user_subnet {
            self.drop_reservation(&dn.pool).await?;
        }
        if let Some(p6) = dn.pool6.filter(|_| !dn.user_subnet6) {
            self.drop_reservation(&p6).await?;
        }
        dn.name = Some(net.name.clone());
        dn.network_id = Some(net.id.clone());
        self.records.save_net(&dn).await.map_err(err)?;
        tracing::info!(docker = %docker_id, network = %net.name, subnet = %net.subnet, "Docker network bound");
        Ok(net)
    }

    async fn delete_network(&self, docker_id: &str) -> Answer {
        // Not while a bind of it is under way: one that created the cluster
        // network but has not recorded it yet would leave that network and
        // write this record back after its deletion.
        let _guard = self.bind_lock.lock().await;
        let Some(dn) = self.records.net(docker_id).await.map_err(err)? else { return Ok(json!({})) };
        // Endpoint records of this Docker network (left by a dockerd that
        // died) go with it.
        for e in self.records.eps_of(docker_id).await.map_err(err)? {
            self.records.delete_ep(&e.docker_id).await.map_err(err)?;
        }
        self.records.delete_net(docker_id).await.map_err(err)?;
        if !dn.user_subnet {
            self.drop_reservation(&dn.pool).await?;
        }
        if let Some(p6) = dn.pool6.filter(|_| !dn.user_subnet6) {
            self.drop_reservation(&p6).await?;
        }
        let Some(net_id) = dn.network_id else { return Ok(json!({})) };
        // The cluster network goes with the last Docker network bound to it
        // on any host, if the driver created it and nothing is attached.
        if self.records.bound_anywhere(&net_id).await.map_err(err)? {
            return Ok(json!({}));
        }
        if let Ok(net) = self.app.cluster.network(&net_id).await
            && net.labels.get(CREATED_BY).map(String::as_str) == Some("docker")
            && let Err(e) = self.app.remove_network(&net.id, false).await
        {
            tracing::info!(network = %net.name, reason = %e, "keeping the cluster network");
        }
        Ok(json!({}))
    }

    async fn create_endpoint(&self, r: dp::CreateEndpointRequest) -> Answer {
        let iface = r.interface.unwrap_or_default();
        if iface.address.is_empty() {
            return Err("the endpoint has no address: the trellis network driver needs --ipam-driver trellis".into());
        }
        let ip = validate::address("address", &iface.address).map_err(err)?;
        let ip6 = if iface.address_ipv6.is_empty() {
            None
        } else {
            Some(validate::address("IPv6 address", &iface.address_ipv6).map_err(err)?)
        };
        let Some(dn) = self.records.net(&r.network_id).await.map_err(err)? else {
            return Err(format!("Docker network {} is unknown to the trellis driver", r.network_id));
        };
        if let Some(a) = ip6
            && !dn.pool6.is_some_and(|p| p.contains(&a))
        {
            return Err(match dn.pool6 {
                Some(p) => format!("IPv6 address {a} is not in the network's IPv6 pool {p}"),
                None => format!("IPv6 address {a} on a network created without --ipv6"),
            });
        }
        let de = DockerEp { docker_id: r.endpoint_id.clone(), docker_net: r.network_id, ip, ip6, endpoint_id: None };
        self.records.save_ep(&de).await.map_err(err)?;
        Ok(json!({}))
    }

    async fn join(self: &Arc<Self>, r: dp::JoinRequest) -> Answer {
        let Some(mut de) = self.records.ep(&r.endpoint_id).await.map_err(err)? else {
            return Err(format!("endpoint {} is unknown to the trellis driver", r.endpoint_id));
        };
        if r.sandbox_key.is_empty() {
            return Err("Join without a SandboxKey".into());
        }
        let net = self.bind(&de.docker_net).await?;
        let mut req = AttachRequest::new(&net.id, EndpointKind::Docker);
        req.ip = Some(de.ip);
        req.ip6 = de.ip6;
        req.reserved = true;
        req.netns = Some(r.sandbox_key.clone().into());
        req.ifname = DST_PREFIX.to_string();
        let ep = self.app.attach(req).await.map_err(err)?.endpoint;
        de.endpoint_id = Some(ep.id.clone());
        self.records.save_ep(&de).await.map_err(err)?;
        let me = self.clone();
        let (docker_ep, docker_net, name) = (r.endpoint_id.clone(), de.docker_net.clone(), net.name.clone());
        let endpoint = ep.id.clone();
        tokio::spawn(async move { me.learn(&docker_net, &docker_ep, &endpoint, &name).await });
        Ok(serde_json::to_value(dp::JoinResponse {
            interface_name: dp::InterfaceName { src_name: model::peer_ifname(&ep.id), dst_prefix: DST_PREFIX.into() },
            gateway: if net.internal { String::new() } else { net.gateway.map(|g| g.to_string()).unwrap_or_default() },
            // The IPv6 default route, for a container with an IPv6 address.
            gateway_ipv6: match (net.internal, ep.ip6, net.gateway6) {
                (false, Some(_), Some(g)) => g.to_string(),
                _ => String::new(),
            },
            static_routes: vec![],
            disable_gateway_service: true,
        })
        .expect("serializes"))
    }

    /// Learn the container behind a Docker endpoint (the engine lists it on
    /// the network once Join returned): its name, aliases, labels and
    /// health, written at once (a container with a HEALTHCHECK backs its
    /// services only once healthy).
    async fn learn(&self, docker_net: &str, docker_ep: &str, endpoint: &str, network: &str) {
        for attempt in 0..200u32 {
            tokio::time::sleep(Duration::from_millis(if attempt < 20 { 25 } else { 100 })).await;
            let info = match self.engine.network(docker_net).await {
                Ok(i) => i,
                Err(e) => {
                    tracing::debug!(error = %e, "learning a container's identity");
                    continue;
                }
            };
            let Some(cid) = info
                .containers
                .unwrap_or_default()
                .into_iter()
                .find(|(_, c)| c.endpoint_id == docker_ep)
                .map(|(id, _)| id)
            else {
                continue;
            };
            // The health read and written under the lock the health events
            // take too: an event of this container before the write (which
            // finds no endpoint of it yet) is not lost, the reading after it
            // sees its effect.
            let _health = self.health_lock.lock().await;
            let c = match self.engine.container(&cid).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "inspecting a container");
                    continue;
                }
            };
            let name = Some(c.short_name()).filter(|n| validate::name("endpoint name", n).is_ok());
            let aliases: Vec<String> =
                c.aliases(&info.name).into_iter().filter(|a| validate::name("alias", a).is_ok()).collect();
            let mut labels = c.labels();
            labels.retain(|k, v| validate::labels(&BTreeMap::from([(k.clone(), v.clone())])).is_ok());
            match self.app.cluster.set_identity(endpoint, &cid, name, aliases, labels, c.ready()).await {
                Ok(rec) => {
                    tracing::info!(endpoint = %endpoint, name = %rec.name, network, container = %cid, ready = rec.ready, "learned the container's identity")
                }
                Err(e) => tracing::warn!(endpoint = %endpoint, error = %e, "recording a container's identity"),
            }
            return;
        }
        tracing::warn!(endpoint = %endpoint, "the engine never listed the container of this endpoint");
    }

    /// Follow the engine's health reports for as long as the agent runs:
    /// the event stream of containers' health changes, and on every
    /// (re)connection a reading of every container of this host's Docker
    /// endpoints (what changed while the stream was down). An engine that
    /// is not there is tried again, every few seconds.
    pub async fn follow_health(self: Arc<Self>) {
        let mut retry = Duration::from_secs(1);
        loop {
            match self.engine.events(engine::HEALTH_EVENTS).await {
                Ok(mut events) => {
                    retry = Duration::from_secs(1);
                    tracing::debug!("following the engine's health events");
                    self.resync_health().await;
                    loop {
                        match events.next().await {
                            Ok(Some(ev)) => {
                                if let Some((cid, status)) = ev.health() {
                                    tracing::debug!(container = %cid, status, "health event");
                                    self.refresh_health(cid).await;
                                }
                            }
                            Ok(None) => {
                                tracing::debug!("the engine closed its event stream");
                                break;
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "the engine's event stream broke");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "the engine's event stream is not available"),
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(Duration::from_secs(5));
        }
    }

    /// Read the health of every container of this host's Docker endpoints.
    async fn resync_health(&self) {
        let containers: std::collections::BTreeSet<String> = match self.app.cluster.endpoints().await {
            Ok(eps) => eps
                .into_iter()
                .filter(|e| e.host == self.app.cluster.host && e.kind == EndpointKind::Docker)
                .map(|e| e.container_id)
                .filter(|c| !c.is_empty())
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "listing endpoints to read their health");
                return;
            }
        };
        for cid in containers {
            self.refresh_health(&cid).await;
        }
    }

    /// Read container `cid`'s health from the engine and make its endpoints
    /// here ready or not (nothing to read when it has none).
    async fn refresh_health(&self, cid: &str) {
        let _one = self.health_lock.lock().await;
        let mine = match self.app.cluster.endpoints().await {
            Ok(eps) => eps
                .iter()
                .any(|e| e.host == self.app.cluster.host && e.kind == EndpointKind::Docker && e.container_id == cid),
            Err(e) => {
                tracing::debug!(error = %e, "listing endpoints for a health change");
                return;
            }
        };
        if !mine {
            return;
        }
        let ready = match self.engine.container(cid).await {
            Ok(c) => c.ready(),
            // Removed: its Leave comes.
            Err(engine::EngineError::NotFound { .. }) => return,
            Err(e) => {
                tracing::warn!(container = %cid, error = %e, "reading a container's health");
                return;
            }
        };
        if let Err(e) = self.app.set_container_ready(EndpointKind::Docker, cid, ready).await {
            tracing::warn!(container = %cid, error = %e, "recording a container's health");
        }
    }

    async fn leave(&self, docker_ep: &str) -> Answer {
        let Some(de) = self.records.ep(docker_ep).await.map_err(err)? else { return Ok(json!({})) };
        if let Some(id) = &de.endpoint_id {
            self.app.detach_id(id).await.map_err(err)?;
        }
        Ok(json!({}))
    }

    async fn delete_endpoint(&self, docker_ep: &str) -> Answer {
        if let Some(de) = self.records.ep(docker_ep).await.map_err(err)?
            && let Some(id) = &de.endpoint_id
        {
            self.app.detach_id(id).await.map_err(err)?;
        }
        self.records.delete_ep(docker_ep).await.map_err(err)?;
        Ok(json!({}))
    }

    /// Docker endpoints whose container went while this agent was down:
    /// dockerd gave up on its Leave and DeleteEndpoint calls and forgot the
    /// endpoint, so nothing will call again. Each joined endpoint that the
    /// engine no longer lists on its network goes if the kernel agrees
    /// ([`App::collect_unlisted`]), and its driver record with it. Run at
    /// start and periodically; while the engine does not answer nothing is
    /// decided (once back, dockerd calls DeleteEndpoint for the endpoints it
    /// still has). Returns how many endpoints went.
    pub async fn sweep(&self) -> Result<usize, String> {
        let mut listed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut swept = 0;
        for de in self.records.eps().await.map_err(|e| format!("listing the driver's endpoints: {e}"))? {
            let Some(id) = &de.endpoint_id else { continue };
            if !listed.contains_key(&de.docker_net) {
                let ids = match self.engine.network(&de.docker_net).await {
                    Ok(info) => info.containers.unwrap_or_default().into_values().map(|c| c.endpoint_id).collect(),
                    // The engine no longer has the network, nor its endpoints.
                    Err(EngineError::NotFound { .. }) => BTreeSet::new(),
                    Err(e) => return Err(format!("asking the engine which endpoints it still has: {e}")),
                };
                listed.insert(de.docker_net.clone(), ids);
            }
            if listed[&de.docker_net].contains(&de.docker_id) {
                continue;
            }
            match self.app.collect_unlisted(id).await {
                Ok(Unlisted::Collected(_) | Unlisted::AlreadyGone) => {
                    self.records
                        .delete_ep(&de.docker_id)
                        .await
                        .map_err(|e| format!("removing the record of Docker endpoint {}: {e}", de.docker_id))?;
                    tracing::info!(docker = %de.docker_id, endpoint = %id, "Docker endpoint the engine forgot: removed");
                    swept += 1;
                }
                Ok(Unlisted::Kept(why)) => {
                    tracing::debug!(docker = %de.docker_id, endpoint = %id, why = %why, "the engine does not list this endpoint; kept")
                }
                Err(e) => {
                    tracing::warn!(docker = %de.docker_id, endpoint = %id, error = %e, "collecting an endpoint the engine forgot")
                }
            }
        }
        Ok(swept)
    }

    /// The endpoint's operational data: its Trellis endpoint, and its
    /// published ports as bound (picked host ports filled in) under the
    /// keys and in the shapes libnetwork's bridge driver answers with
    /// ([`dp::PORT_MAP`], [`dp::EXPOSED_PORTS`]).
    ///
    /// dockerd cannot show them (`docker port`, `docker ps`, inspect's
    /// `NetworkSettings.Ports`): it reads them with a Go type assertion,
    /// `driverInfo["com.docker.network.portmap"].([]types.PortBinding)`
    /// (moby `daemon/network.go`, `getEndpointPortMapInfo`: 20.10, 25, 28
    /// and master alike), and the remote driver's answer is JSON decoded into a
    /// `map[string]interface{}` (`api.EndpointInfoResponse.Value`), whose
    /// arrays are `[]interface{}`: the assertion fails without an error
    /// and the ports are dropped. `trellisctl endpoint inspect` shows them.
    async fn oper_info(&self, docker_ep: &str) -> Answer {
        let de = self.records.ep(docker_ep).await.map_err(err)?;
        let id = de.and_then(|d| d.endpoint_id).unwrap_or_default();
        let mut value = serde_json::Map::new();
        value.insert("trellis.endpoint".into(), json!(id));
        if !id.is_empty()
            && let Ok(ep) = self.app.cluster.find_endpoint(&id, None).await
            && !ep.ports.is_empty()
        {
            let map: Vec<dp::PortBinding> = ep
                .ports
                .iter()
                .map(|p| dp::PortBinding {
                    proto: p.proto.number(),
                    ip: ep.ip.to_string(),
                    port: p.port,
                    host_ip: p.host_ip.map(|i| i.to_string()).unwrap_or_else(|| "0.0.0.0".into()),
                    host_port: p.host_port,
                    host_port_end: p.host_port,
                })
                .collect();
            let exposed: BTreeSet<dp::TransportPort> =
                ep.ports.iter().map(|p| dp::TransportPort { proto: p.proto.number(), port: p.port }).collect();
            tracing::debug!(docker = %docker_ep, endpoint = %id, bindings = map.len(), "EndpointOperInfo: the published ports");
            value.insert(dp::PORT_MAP.into(), serde_json::to_value(map).expect("serializes"));
            value.insert(dp::EXPOSED_PORTS.into(), serde_json::to_value(exposed).expect("serializes"));
        }
        Ok(json!({ "Value": value }))
    }

    /// `docker run -p` (and `-P`): the bindings of the portmap option,
    /// all published or none.
    async fn program_external(&self, r: dp::ExternalConnectivityRequest) -> Answer {
        let bindings = r.port_map()?;
        let mut ports = Vec::with_capacity(bindings.len());
        for b in &bindings {
            let proto = match b.proto {
                6 => Proto::Tcp,
                17 => Proto::Udp,
                n => {
                    return Err(format!(
                        "published port {}: IP protocol {n} is not supported (tcp and udp are)",
                        b.port
                    ));
                }
            };
            if b.host_port_end != 0 && b.host_port_end != b.host_port {
                return Err(format!(
                    "-p {}-{}:{}/{}: host port ranges are not supported by the trellis driver yet; publish each port on its own (-p HOSTPORT:PORT)",
                    b.host_port,
                    b.host_port_end,
                    b.port,
                    proto.as_str()
                ));
            }
            let host_ip = match b.host_ip.as_str() {
                "" | "0.0.0.0" => None,
                ip => Some(validate::ip("host address", ip).map_err(err)?),
            };
            ports.push(PortRequest { proto, host_ip, host_port: b.host_port, port: b.port });
        }
        if ports.is_empty() {
            return Ok(json!({}));
        }
        let Some(de) = self.records.ep(&r.endpoint_id).await.map_err(err)? else {
            return Err(format!("endpoint {} is unknown to the trellis driver", r.endpoint_id));
        };
        let Some(id) = de.endpoint_id else {
            return Err(format!("endpoint {} has not joined: no port can be published to it", r.endpoint_id));
        };
        self.app.publish(&id, &ports).await.map_err(err)?;
        Ok(json!({}))
    }

    async fn revoke_external(&self, docker_ep: &str) -> Answer {
        let Some(de) = self.records.ep(docker_ep).await.map_err(err)? else { return Ok(json!({})) };
        if let Some(id) = &de.endpoint_id {
            self.app.unpublish(id).await.map_err(err)?;
        }
        Ok(json!({}))
    }
}

async fn route(State(driver): State<Arc<DockerDriver>>, UrlPath(method): UrlPath<String>, body: Bytes) -> Response {
    match driver.handle(&method, &body).await {
        Some((status, v)) => (status, axum::Json(v)).into_response(),
        None => (StatusCode::NOT_FOUND, format!("{method} is not implemented")).into_response(),
    }
}

/// Bind the driver's socket (an error is the caller's to report); the
/// returned future serves until dropped.
pub async fn serve(
    driver: Arc<DockerDriver>,
    socket: &Path,
) -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(socket)?;
    let app = Router::new().route("/{method}", axum::routing::post(route)).with_state(driver);
    Ok(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the Docker driver stopped");
        }
    })
}

#[cfg(test)]
mod tests;
