//! The agent's gRPC service, translation only: each handler parses its
//! request into a typed use case of [`crate::app`], and turns the answer
//! (or the [`AgentError`], by kind) into its reply.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use trellis_plugin_api::proto;
use trellis_plugin_api::validate;

use crate::app::{self, AgentError, App, AttachRequest, EndpointRef, HostView, ServiceView};
use crate::model::{self, EndpointKind, EndpointRecord, NetworkRecord};
use crate::state::{NewNetwork, NewService};

/// The gRPC service: each handler parses its request into the typed
/// use case of [`crate::app`] and turns the answer into its reply.
pub struct AgentService {
    pub app: Arc<App>,
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        let msg = e.to_string();
        match e {
            AgentError::InvalidArgument(_) => Status::invalid_argument(msg),
            AgentError::NotFound(_) => Status::not_found(msg),
            AgentError::AlreadyExists(_) => Status::already_exists(msg),
            AgentError::FailedPrecondition(_) => Status::failed_precondition(msg),
            AgentError::Unavailable(_) | AgentError::Reconcile(_) => Status::unavailable(msg),
            AgentError::Internal(_) => Status::internal(msg),
        }
    }
}

fn bad(e: validate::ValidationError) -> Status {
    Status::invalid_argument(e.to_string())
}

fn labels(map: HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

fn optional(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

pub fn network_to_proto(n: &NetworkRecord, endpoints: u32) -> proto::Network {
    proto::Network {
        id: n.id.clone(),
        name: n.name.clone(),
        subnet: n.subnet.to_string(),
        gateway: n.gateway.map(|g| g.to_string()).unwrap_or_default(),
        vni: n.vni,
        mtu: n.mtu,
        attachable: n.attachable,
        internal: n.internal,
        encrypted: n.encrypted,
        labels: n.labels.clone().into_iter().collect(),
        created_unix: n.created_unix,
        bridge: model::bridge_name(&n.id),
        endpoints,
        vxlan_port: n.vxlan_port.unwrap_or(0) as u32,
        key: None,
        subnet6: n.subnet6.map(|s| s.to_string()).unwrap_or_default(),
        gateway6: n.gateway6.map(|g| g.to_string()).unwrap_or_default(),
    }
}

pub fn endpoint_to_proto(e: &EndpointRecord, net: Option<&NetworkRecord>) -> proto::Endpoint {
    let prefix = net.map(|n| n.subnet.prefix_len()).unwrap_or(32);
    proto::Endpoint {
        id: e.id.clone(),
        name: e.name.clone(),
        network: e.network.clone(),
        network_id: e.network_id.clone(),
        host: e.host.clone(),
        address: format!("{}/{prefix}", e.ip),
        address6: match (e.ip6, net.and_then(|n| n.subnet6)) {
            (Some(a), Some(s)) => format!("{a}/{}", s.prefix_len()),
            _ => String::new(),
        },
        gateway6: net.and_then(|n| n.gateway6).map(|g| g.to_string()).unwrap_or_default(),
        gateway: net.and_then(|n| n.gateway).map(|g| g.to_string()).unwrap_or_default(),
        mac: e.mac.to_string(),
        mtu: net.map(|n| n.mtu).unwrap_or(0),
        netns: e.netns.display().to_string(),
        ifname: e.ifname.clone(),
        host_ifname: model::host_ifname(&e.id),
        labels: e.labels.clone().into_iter().collect(),
        kind: match e.kind {
            EndpointKind::Adhoc => proto::EndpointKind::Adhoc,
            EndpointKind::Docker => proto::EndpointKind::Docker,
            EndpointKind::Cni => proto::EndpointKind::Cni,
        } as i32,
        managed_netns: e.managed_netns,
        container_id: e.container_id.clone(),
        aliases: e.aliases.clone(),
        internal: net.is_some_and(|n| n.internal),
        dns: String::new(),
        ports: e
            .ports
            .iter()
            .map(|p| proto::PortMapping {
                host_port: p.host_port.into(),
                container_port: p.port.into(),
                protocol: p.proto.as_str().to_string(),
                host_ip: p.host_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            })
            .collect(),
        ready: e.ready,
    }
}

fn key_to_proto(k: &app::networks::KeyView) -> proto::KeyState {
    proto::KeyState {
        tx_epoch: k.ring.tx,
        epochs: k.ring.keys.iter().map(|k| k.epoch).collect(),
        rotation: k.ring.reason.map(|r| format!("{r:?}")).unwrap_or_default(),
        acks: k.acks.iter().map(|(h, a)| format!("{h} rx={} tx={}", a.rx, a.tx)).collect(),
    }
}

fn view_to_proto(v: &app::NetworkView) -> proto::Network {
    let mut out = network_to_proto(&v.network, v.endpoints);
    out.key = v.key.as_ref().map(key_to_proto);
    out
}

pub fn service_to_proto(v: &ServiceView) -> proto::Service {
    let s = &v.service;
    proto::Service {
        name: s.name.clone(),
        network: s.network.clone(),
        network_id: s.network_id.clone(),
        mode: match s.mode {
            model::ServiceMode::Vip => "vip".into(),
            model::ServiceMode::Dnsrr => "dnsrr".into(),
        },
        vip: s.vip.map(|v| v.to_string()).unwrap_or_default(),
        vip6: s.vip6.map(|v| v.to_string()).unwrap_or_default(),
        ports: s
            .ports
            .iter()
            .map(|p| proto::ServicePort {
                port: p.port as u32,
                protocol: p.proto.as_str().into(),
                target: p.target as u32,
            })
            .collect(),
        selector: s.selector.clone().into_iter().collect(),
        backends: v
            .backends
            .iter()
            .map(|b| proto::ServiceBackend {
                endpoint: b.endpoint.name.clone(),
                endpoint_id: b.endpoint.id.clone(),
                ip: b.endpoint.ip.to_string(),
                host: b.endpoint.host.clone(),
                programmed: b.programmed,
                ready: b.endpoint.ready,
                draining: b.state == model::BackendState::Draining,
            })
            .collect(),
        created_unix: s.created_unix,
        selections: v.stats.selections,
        resets: v.stats.resets,
        publish: s
            .publish
            .iter()
            .map(|p| proto::MeshPort {
                host_port: p.host_port as u32,
                port: p.port as u32,
                protocol: p.proto.as_str().into(),
                mode: p.mode.as_str().into(),
            })
            .collect(),
    }
}

fn proto_of(protocol: &str) -> Result<model::Proto, Status> {
    match protocol {
        "" | "tcp" => Ok(model::Proto::Tcp),
        "udp" => Ok(model::Proto::Udp),
        other => Err(Status::invalid_argument(format!("protocol {other:?}: expected tcp or udp"))),
    }
}

fn port_of(what: &str, n: u32) -> Result<u16, Status> {
    u16::try_from(n).map_err(|_| Status::invalid_argument(format!("{what} {n}: expected a port (1-65535)")))
}

/// The mesh ports of a request.
fn mesh_requests(ports: &[proto::MeshPort]) -> Result<Vec<app::MeshPortRequest>, Status> {
    ports
        .iter()
        .map(|p| {
            let mode = match p.mode.as_str() {
                "" | "ingress" => model::PublishMode::Ingress,
                "host" => model::PublishMode::Host,
                other => {
                    return Err(Status::invalid_argument(format!("publish mode {other:?}: expected ingress or host")));
                }
            };
            Ok(app::MeshPortRequest {
                proto: proto_of(&p.protocol)?,
                host_port: port_of("host port", p.host_port)?,
                port: port_of("port", p.port)?,
                mode,
            })
        })
        .collect()
}

fn host_to_proto(v: &HostView) -> proto::Host {
    let h = &v.host;
    let us = |d: Option<std::time::Duration>| d.map(|d| d.as_micros() as u64).unwrap_or(0);
    proto::Host {
        id: h.id.clone(),
        hostname: h.hostname.clone(),
        underlay: h.underlay.to_string(),
        vtep_mac: h.vtep_mac.to_string(),
        vxlan_port: h.vxlan_port as u32,
        version: h.version.clone(),
        started_unix: h.started_unix,
        local: v.local,
        endpoints: v.endpoints,
        tunnel: v.tunnel.to_string(),
        last_seen_ms: v.last_seen.map(|d| d.as_millis() as i64).unwrap_or(-1),
        capabilities: h.capabilities.clone().into_iter().collect(),
        probe: v.probe.to_string(),
        probe_rtt_us: us(v.probe_rtt),
        tunnel_probe_rtt_us: us(v.tunnel_probe_rtt),
        probe_state: probe_state(v.probe) as i32,
        tunnel_state: tunnel_state(v.tunnel) as i32,
        kept: v.kept,
        underlay_mtu: h.underlay_mtu,
        path_mtu: v.path_mtu.unwrap_or(0),
        tunnel_mtu: v.tunnel_mtu.unwrap_or(0),
    }
}

fn probe_state(p: app::ProbeState) -> proto::ProbeState {
    use app::ProbeState as P;
    match p {
        P::Local => proto::ProbeState::ProbeLocal,
        P::NoProber | P::NotProbedYet => proto::ProbeState::ProbeNotProbed,
        P::Unreachable { .. } => proto::ProbeState::ProbeUnreachable,
        P::TunnelUnreachable { .. } => proto::ProbeState::ProbeTunnelUnreachable,
        P::NotAnsweredYet => proto::ProbeState::ProbeNotAnswered,
        P::Ok => proto::ProbeState::ProbeOk,
    }
}

fn tunnel_state(t: app::TunnelState) -> proto::TunnelState {
    use app::TunnelState as T;
    match t {
        T::Local => proto::TunnelState::TunnelLocal,
        T::NoSharedNetworks => proto::TunnelState::TunnelNoSharedNetworks,
        T::Programmed(_) => proto::TunnelState::TunnelProgrammed,
        T::Pending => proto::TunnelState::TunnelPending,
    }
}

fn attach_request(r: proto::AttachRequest) -> Result<AttachRequest, Status> {
    let kind = match proto::EndpointKind::try_from(r.kind) {
        Ok(proto::EndpointKind::Adhoc) => EndpointKind::Adhoc,
        Ok(proto::EndpointKind::Docker) => EndpointKind::Docker,
        Ok(proto::EndpointKind::Cni) => EndpointKind::Cni,
        Err(_) => return Err(Status::invalid_argument(format!("unknown endpoint kind {}", r.kind))),
    };
    Ok(AttachRequest {
        network: r.network,
        name: optional(&r.name).map(str::to_string),
        ip: optional(&r.ip).map(|ip| validate::ip("ip", ip)).transpose().map_err(bad)?,
        ip6: None,
        reserved: r.reserved,
        ifname: r.ifname,
        labels: labels(r.labels),
        kind,
        netns: optional(&r.netns).map(PathBuf::from),
        container_id: r.container_id,
        publish: r.publish.iter().map(port_request).collect::<Result<_, _>>()?,
    })
}

/// A host port to publish, as the wire has it.
fn port_request(p: &proto::PortMapping) -> Result<app::ports::PortRequest, Status> {
    let proto = match p.protocol.to_ascii_lowercase().as_str() {
        "" | "tcp" => model::Proto::Tcp,
        "udp" => model::Proto::Udp,
        other => {
            return Err(Status::invalid_argument(format!(
                "port mapping {}: protocol {other:?} is not supported (tcp or udp)",
                p.container_port
            )));
        }
    };
    let port = |what: &str, v: u32, zero: bool| -> Result<u16, Status> {
        match u16::try_from(v) {
            Ok(n) if n > 0 || zero => Ok(n),
            _ => Err(Status::invalid_argument(format!("port mapping: {what} {v} is not a port (1-65535)"))),
        }
    };
    Ok(app::ports::PortRequest {
        proto,
        host_ip: optional(&p.host_ip).map(|ip| validate::ip("hostIP", ip)).transpose().map_err(bad)?,
        host_port: port("hostPort", p.host_port, true)?,
        port: port("containerPort", p.container_port, false)?,
    })
}

fn endpoint_ref<'a>(endpoint: &'a str, network: &'a str, container_id: &'a str, ifname: &'a str) -> EndpointRef<'a> {
    let network = optional(network);
    if container_id.is_empty() {
        EndpointRef::Name { endpoint, network }
    } else {
        EndpointRef::Container { container_id, ifname, network }
    }
}

#[tonic::async_trait]
impl proto::agent_server::Agent for AgentService {
    async fn create_service(
        &self,
        request: Request<proto::CreateServiceRequest>,
    ) -> Result<Response<proto::Service>, Status> {
        let r = request.into_inner();
        let mode = match r.mode.as_str() {
            "" | "vip" => model::ServiceMode::Vip,
            "dnsrr" => model::ServiceMode::Dnsrr,
            other => return Err(Status::invalid_argument(format!("mode {other:?}: expected vip or dnsrr"))),
        };
        let mut ports = Vec::new();
        for p in &r.ports {
            let spec = format!("{}/{}:{}", p.port, if p.protocol.is_empty() { "tcp" } else { &p.protocol }, p.target);
            let (port, proto, target) = validate::service_port(&spec).map_err(bad)?;
            let proto = if proto == "udp" { model::Proto::Udp } else { model::Proto::Tcp };
            ports.push(model::ServicePort { port, proto, target });
        }
        let publish = mesh_requests(&r.publish)?;
        let service =
            NewService { name: r.name, network: r.network, mode, ports, selector: labels(r.selector), publish: vec![] };
        Ok(Response::new(service_to_proto(&self.app.create_service(app::CreateService { service, publish }).await?)))
    }

    async fn update_service(
        &self,
        request: Request<proto::UpdateServiceRequest>,
    ) -> Result<Response<proto::Service>, Status> {
        let r = request.into_inner();
        let add = mesh_requests(&r.publish_add)?;
        let rm = r
            .publish_rm
            .iter()
            .map(|p| Ok((proto_of(&p.protocol)?, port_of("host port", p.host_port)?)))
            .collect::<Result<Vec<_>, Status>>()?;
        Ok(Response::new(service_to_proto(&self.app.update_service_publish(&r.name, &add, &rm).await?)))
    }

    async fn list_services(
        &self,
        request: Request<proto::ListServicesRequest>,
    ) -> Result<Response<proto::ServiceList>, Status> {
        let r = request.into_inner();
        let services = self.app.services(optional(&r.network)).await?.iter().map(service_to_proto).collect();
        Ok(Response::new(proto::ServiceList { services }))
    }

    async fn inspect_service(&self, request: Request<proto::ServiceRef>) -> Result<Response<proto::Service>, Status> {
        Ok(Response::new(service_to_proto(&self.app.service(&request.into_inner().name).await?)))
    }

    async fn remove_service(
        &self,
        request: Request<proto::ServiceRef>,
    ) -> Result<Response<proto::RemoveServiceResponse>, Status> {
        self.app.remove_service(&request.into_inner().name).await?;
        Ok(Response::new(proto::RemoveServiceResponse {}))
    }

    type MonitorStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<proto::FlowEvent, Status>> + Send + 'static>>;

    async fn monitor(&self, request: Request<proto::MonitorRequest>) -> Result<Response<Self::MonitorStream>, Status> {
        let r = request.into_inner();
        let rx = self.app.watch_events(optional(&r.network), optional(&r.verdict)).await?;
        let s = crate::telemetry::monitor::stream(self.app.cluster.clone(), rx, r);
        Ok(Response::new(Box::pin(s)))
    }

    async fn create_network(
        &self,
        request: Request<proto::CreateNetworkRequest>,
    ) -> Result<Response<proto::Network>, Status> {
        let r = request.into_inner();
        let new = NewNetwork {
            subnet: optional(&r.subnet).map(validate::subnet).transpose().map_err(bad)?,
            gateway: optional(&r.gateway).map(|g| validate::ip("gateway", g)).transpose().map_err(bad)?,
            subnet6: optional(&r.subnet6).map(validate::subnet).transpose().map_err(bad)?,
            gateway6: optional(&r.gateway6).map(|g| validate::ip("gateway", g)).transpose().map_err(bad)?,
            ipv6: r.ipv6,
            name: r.name,
            attachable: r.attachable,
            internal: r.internal,
            encrypted: r.encrypted,
            mtu: r.mtu,
            labels: labels(r.labels),
        };
        Ok(Response::new(network_to_proto(&self.app.create_network(new).await?, 0)))
    }

    async fn list_networks(
        &self,
        _: Request<proto::ListNetworksRequest>,
    ) -> Result<Response<proto::NetworkList>, Status> {
        let networks = self.app.networks().await?.iter().map(view_to_proto).collect();
        Ok(Response::new(proto::NetworkList { networks }))
    }

    async fn inspect_network(&self, request: Request<proto::NetworkRef>) -> Result<Response<proto::Network>, Status> {
        Ok(Response::new(view_to_proto(&self.app.network(&request.into_inner().name).await?)))
    }

    async fn rotate_cluster_key(
        &self,
        _: Request<proto::RotateClusterKeyRequest>,
    ) -> Result<Response<proto::RotateClusterKeyResponse>, Status> {
        let (resealed, already) = self.app.cluster.reseal_key_rings().await?;
        let key_id = self.app.cluster.codec.keys().map(|k| k.current().to_string()).unwrap_or_default();
        Ok(Response::new(proto::RotateClusterKeyResponse {
            key_id,
            resealed: resealed as u32,
            already: already as u32,
        }))
    }

    async fn rotate_key(&self, request: Request<proto::NetworkRef>) -> Result<Response<proto::Network>, Status> {
        Ok(Response::new(view_to_proto(&self.app.rotate_key(&request.into_inner().name).await?)))
    }

    async fn remove_network(
        &self,
        request: Request<proto::RemoveNetworkRequest>,
    ) -> Result<Response<proto::RemoveNetworkResponse>, Status> {
        let r = request.into_inner();
        let removed = self.app.remove_network(&r.name, r.force).await?;
        Ok(Response::new(proto::RemoveNetworkResponse { endpoints_removed: removed as u32 }))
    }

    async fn attach(&self, request: Request<proto::AttachRequest>) -> Result<Response<proto::Endpoint>, Status> {
        let a = self.app.attach(attach_request(request.into_inner())?).await?;
        let mut ep = endpoint_to_proto(&a.endpoint, a.network.as_ref());
        ep.dns = a.dns.map(|d| d.to_string()).unwrap_or_default();
        Ok(Response::new(ep))
    }

    async fn detach(&self, request: Request<proto::DetachRequest>) -> Result<Response<proto::DetachResponse>, Status> {
        let r = request.into_inner();
        let e = self.app.find(endpoint_ref(&r.endpoint, &r.network, &r.container_id, &r.ifname)).await?;
        let drain = self.app.detach(&e).await?;
        Ok(Response::new(proto::DetachResponse { drain_ms: drain.map_or(0, |d| d.as_millis() as u64) }))
    }

    async fn check_endpoint(
        &self,
        request: Request<proto::CheckEndpointRequest>,
    ) -> Result<Response<proto::CheckEndpointResponse>, Status> {
        let r = request.into_inner();
        let e = self.app.find(endpoint_ref(&r.endpoint, &r.network, &r.container_id, &r.ifname)).await?;
        let (net, problems) = self.app.check(&e).await?;
        Ok(Response::new(proto::CheckEndpointResponse { endpoint: Some(endpoint_to_proto(&e, Some(&net))), problems }))
    }

    async fn list_endpoints(
        &self,
        request: Request<proto::ListEndpointsRequest>,
    ) -> Result<Response<proto::EndpointList>, Status> {
        let r = request.into_inner();
        let endpoints = self
            .app
            .endpoints(optional(&r.network))
            .await?
            .iter()
            .map(|(e, n)| endpoint_to_proto(e, n.as_ref()))
            .collect();
        Ok(Response::new(proto::EndpointList { endpoints }))
    }

    async fn list_hosts(&self, _: Request<proto::ListHostsRequest>) -> Result<Response<proto::HostList>, Status> {
        let hosts = self.app.hosts().await?.iter().map(host_to_proto).collect();
        Ok(Response::new(proto::HostList { hosts }))
    }

    async fn status(&self, _: Request<proto::StatusRequest>) -> Result<Response<proto::StatusResponse>, Status> {
        let s = self.app.status().await;
        Ok(Response::new(proto::StatusResponse {
            peers: s.peers,
            unreachable_peers: s.unreachable_peers,
            datapath_services: s.datapath_services,
            datapath_backends: s.datapath_backends,
            datapath_subnets: s.datapath_subnets,
            datapath_published: s.datapath_published,
            mesh_ports_held: s.mesh_ports_held.clone(),
            mesh_datapath: s.mesh_datapath.to_string(),
            mesh_ports_nft: s.mesh_ports_nft.clone(),
            mesh_addresses: s
                .mesh_addresses
                .iter()
                .map(|(network, address, interface)| proto::MeshAddress {
                    network: network.clone(),
                    address: address.clone(),
                    interface: interface.clone(),
                })
                .collect(),
            mesh_warnings: s.mesh_warnings.clone(),
            docker_networks: s.docker_networks,
            docker_endpoints: s.docker_endpoints,
            host_id: s.host_id,
            hostname: s.hostname,
            version: env!("CARGO_PKG_VERSION").to_string(),
            store_backend: s.store_backend,
            store_ok: s.store.is_ok(),
            store_error: s.store.err().unwrap_or_default(),
            last_reconcile_unix_ms: s
                .last_reconcile_at
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
            reconcile_passes: s.reconcile_passes,
            reconcile_errors: s.reconcile_errors,
            networks: s.networks,
            local_endpoints: s.local_endpoints,
            capabilities: s.capabilities,
            esp_unsupported: s.esp_unsupported,
            last_full_reconcile_us: s.last_full_reconcile_us,
            last_reconcile_us: s.last_reconcile_duration.as_micros() as u64,
        }))
    }
}
