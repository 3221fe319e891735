//! The agent's gRPC service. Every request is validated here, written to
//! the store, and converged by a reconcile pass before the answer goes
//! back; a failure undoes what the request wrote.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};
use trellis_plugin_api::proto;
use trellis_plugin_api::validate;

use crate::cluster::{AgentError, Cluster, NewEndpoint, NewNetwork, NewService};
use crate::dataplane::Dataplane;
use crate::model::{self, EndpointKind, EndpointRecord, NetworkRecord};
use crate::netns;
use crate::reconcile::Reconciler;

pub struct AgentService {
    pub cluster: Arc<Cluster>,
    pub reconciler: Arc<Reconciler>,
    pub dataplane: Arc<dyn Dataplane>,
    pub netns_dir: PathBuf,
    pub hostname: String,
    pub capabilities: HashMap<String, bool>,
    /// Flow and drop events of the eBPF program (`None` without it).
    pub events: Option<tokio::sync::broadcast::Sender<trellis_ebpf::FlowEvent>>,
    /// The agent's DNS server (on every network's gateway), if it runs.
    pub dns: Option<Arc<trellis_dns::Core>>,
    /// Probes of the peers' tunnel endpoints (`None`: not running).
    pub prober: Option<Arc<crate::probe::Prober>>,
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        let msg = e.to_string();
        match e {
            AgentError::InvalidArgument(_) => Status::invalid_argument(msg),
            AgentError::NotFound(_) => Status::not_found(msg),
            AgentError::AlreadyExists(_) => Status::already_exists(msg),
            AgentError::FailedPrecondition(_) => Status::failed_precondition(msg),
            AgentError::Unavailable(_) => Status::unavailable(msg),
            AgentError::Internal(_) => Status::internal(msg),
        }
    }
}

fn bad(e: validate::ValidationError) -> Status {
    Status::invalid_argument(e.to_string())
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
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
    }
}

/// An encrypted network's key state as the API shows it.
async fn key_state(cluster: &Cluster, n: &NetworkRecord) -> Result<Option<proto::KeyState>, Status> {
    if !n.encrypted {
        return Ok(None);
    }
    let ring = cluster.key_status(n).await?;
    let acks = cluster.acks(&n.id).await?;
    Ok(Some(proto::KeyState {
        tx_epoch: ring.tx,
        epochs: ring.keys.iter().map(|k| k.epoch).collect(),
        rotation: ring.reason.map(|r| format!("{r:?}")).unwrap_or_default(),
        acks: acks.iter().map(|(h, a)| format!("{h} rx={} tx={}", a.rx, a.tx)).collect(),
    }))
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
        gateway: net.and_then(|n| n.gateway).map(|g| g.to_string()).unwrap_or_default(),
        mac: e.mac.clone(),
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
    }
}

/// A service with its backends (every endpoint its selector matches) and
/// this host's view of them.
pub fn service_to_proto(
    s: &model::ServiceRecord,
    endpoints: &[EndpointRecord],
    tables: &crate::dataplane::Tables,
    dp: &dyn Dataplane,
) -> proto::Service {
    let id = s.datapath_id();
    let backends = endpoints
        .iter()
        .filter(|e| s.selects(e))
        .map(|e| proto::ServiceBackend {
            endpoint: e.name.clone(),
            endpoint_id: e.id.clone(),
            ip: e.ip.to_string(),
            host: e.host.clone(),
            programmed: match (id, e.ip) {
                (Some(id), std::net::IpAddr::V4(v4)) => {
                    tables.backends.contains_key(&trellis_ebpf::BackendKey { svc_id: id, ip: trellis_ebpf::be(v4) })
                }
                _ => false,
            },
        })
        .collect();
    let stats = id.and_then(|id| dp.service_stats(id)).unwrap_or_default();
    proto::Service {
        name: s.name.clone(),
        network: s.network.clone(),
        network_id: s.network_id.clone(),
        mode: match s.mode {
            model::ServiceMode::Vip => "vip".into(),
            model::ServiceMode::Dnsrr => "dnsrr".into(),
        },
        vip: s.vip.map(|v| v.to_string()).unwrap_or_default(),
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
        backends,
        created_unix: s.created_unix,
        selections: stats.selections,
        resets: stats.resets,
    }
}

fn labels(map: HashMap<String, String>) -> Result<BTreeMap<String, String>, Status> {
    let m: BTreeMap<String, String> = map.into_iter().collect();
    validate::labels(&m).map_err(bad)?;
    Ok(m)
}

impl AgentService {
    /// An endpoint by id or name, or by an engine's container id + ifname.
    async fn find(
        &self,
        endpoint: &str,
        network: &str,
        container_id: &str,
        ifname: &str,
    ) -> Result<EndpointRecord, Status> {
        let network = (!network.is_empty()).then_some(network);
        if !container_id.is_empty() {
            return Ok(self.cluster.find_by_container(container_id, ifname, network).await?);
        }
        if endpoint.is_empty() {
            return Err(Status::invalid_argument("an endpoint (id or name) or a container id is required"));
        }
        Ok(self.cluster.find_endpoint(endpoint, network).await?)
    }

    /// What the probes say of a host.
    fn probe_text(&self, host: &str) -> String {
        if host == self.cluster.host {
            return "local".into();
        }
        match self.prober.as_ref().map(|p| p.health(host)) {
            None => "not probed (no prober)".into(),
            Some(None) => "not probed yet".into(),
            Some(Some(h)) if h.underlay_down(crate::probe::MISSED_FOR_DOWN) => {
                format!("unreachable ({} probes unanswered)", h.missed)
            }
            Some(Some(h)) if h.tunnel_down(crate::probe::MISSED_FOR_DOWN) => format!(
                "unreachable through the VXLAN tunnel ({} probes unanswered; its underlay address answers: is the VXLAN port blocked?)",
                h.tunnel.missed
            ),
            Some(Some(h)) if h.sent == 0 || (h.answered == 0 && h.missed > 0) => "not answered yet".into(),
            Some(Some(_)) => "ok".into(),
        }
    }

    fn remove_managed(&self, e: &EndpointRecord) {
        if e.managed_netns
            && let Err(err) = netns::remove(&e.netns)
        {
            tracing::warn!(netns = %e.netns.display(), error = %err, "removing a managed netns");
        }
    }

    /// Converge now; a failing pass is an error of the request.
    async fn converge(&self) -> Result<Arc<crate::reconcile::PassReport>, Status> {
        let report = self.reconciler.pass().await.map_err(|e| Status::unavailable(format!("reconcile failed: {e}")))?;
        settle(&self.cluster, &report).await;
        Ok(report)
    }

    async fn attach_inner(&self, req: proto::AttachRequest) -> Result<EndpointRecord, Status> {
        if req.network.is_empty() {
            return Err(Status::invalid_argument("a network is required"));
        }
        let name = if req.name.is_empty() {
            None
        } else {
            validate::name("endpoint name", &req.name).map_err(bad)?;
            Some(req.name.clone())
        };
        let ip = if req.ip.is_empty() { None } else { Some(validate::ip("ip", &req.ip).map_err(bad)?) };
        if req.reserved && ip.is_none() {
            return Err(Status::invalid_argument("a reserved address must be named (ip)"));
        }
        let ifname = if req.ifname.is_empty() { "eth0".to_string() } else { req.ifname.clone() };
        validate::ifname(&ifname).map_err(bad)?;
        let labels = labels(req.labels)?;
        let kind = match proto::EndpointKind::try_from(req.kind) {
            Ok(proto::EndpointKind::Adhoc) => EndpointKind::Adhoc,
            Ok(proto::EndpointKind::Docker) => EndpointKind::Docker,
            Ok(proto::EndpointKind::Cni) => EndpointKind::Cni,
            Err(_) => return Err(Status::invalid_argument(format!("unknown endpoint kind {}", req.kind))),
        };
        let id = model::new_id();
        let (netns_path, managed) = if req.netns.is_empty() {
            (self.netns_dir.join(&id), true)
        } else {
            let p = PathBuf::from(&req.netns);
            // An engine's sandbox appears after its Join, and the engine
            // moves the interface in itself (Docker): the agent never enters
            // it. Any other must be a network namespace the agent sees now.
            if kind != EndpointKind::Docker {
                match netns::open(&p) {
                    Ok(_) => {}
                    Err(crate::dataplane::DataplaneError::NetnsGone(_)) => {
                        return Err(Status::invalid_argument(format!(
                            "network namespace {:?} does not exist",
                            req.netns
                        )));
                    }
                    Err(e) => return Err(Status::invalid_argument(e.to_string())),
                }
            }
            (p, false)
        };
        // Check the network before creating anything in the kernel.
        self.cluster.network(&req.network).await?;
        if managed {
            netns::create(&netns_path).map_err(|e| internal(format!("creating a network namespace: {e}")))?;
        }
        let new = NewEndpoint {
            id: id.clone(),
            network: req.network.clone(),
            name,
            ip,
            labels,
            netns: netns_path.clone(),
            managed_netns: managed,
            ifname,
            kind,
            container_id: req.container_id.clone(),
            reserved: req.reserved,
        };
        let rec = match self.cluster.create_endpoint(new).await {
            Ok(r) => r,
            Err(e) => {
                if managed {
                    let _ = netns::remove(&netns_path);
                }
                return Err(e.into());
            }
        };
        let report = self.converge().await;
        let failure = match &report {
            Ok(r) => r.endpoint_error(&id).map(str::to_string),
            Err(e) => Some(e.message().to_string()),
        };
        if let Some(msg) = failure {
            // Undo: records and address, then the kernel side.
            if let Err(e) = self.cluster.remove_endpoint(&rec).await {
                tracing::error!(endpoint = %id, error = %e, "rolling back a failed attach");
            }
            let _ = self.reconciler.pass().await;
            self.remove_managed(&rec);
            return Err(Status::failed_precondition(format!(
                "attaching to network {:?} failed: {msg}; nothing was left behind",
                rec.network
            )));
        }
        tracing::info!(endpoint = %rec.id, name = %rec.name, network = %rec.network, ip = %rec.ip, "attached");
        Ok(rec)
    }
}

#[tonic::async_trait]
impl proto::agent_server::Agent for AgentService {
    async fn create_service(
        &self,
        request: Request<proto::CreateServiceRequest>,
    ) -> Result<Response<proto::Service>, Status> {
        let r = request.into_inner();
        validate::service_name(&r.name).map_err(bad)?;
        if r.network.is_empty() {
            return Err(Status::invalid_argument("a network is required (--network)"));
        }
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
            let sp = model::ServicePort { port, proto, target };
            if ports.iter().any(|q: &model::ServicePort| q.port == port && q.proto == proto) {
                return Err(Status::invalid_argument(format!("port {port}/{} is given twice", proto.as_str())));
            }
            ports.push(sp);
        }
        if mode == model::ServiceMode::Vip && ports.is_empty() {
            return Err(Status::invalid_argument("a vip service needs at least one --port PORT[/tcp|/udp][:TARGET]"));
        }
        let selector = labels(r.selector)?;
        let rec =
            self.cluster.create_service(NewService { name: r.name, network: r.network, mode, ports, selector }).await?;
        self.converge().await?;
        let endpoints = self.cluster.endpoints().await?;
        let tables = self.reconciler.seen().tables;
        Ok(Response::new(service_to_proto(&rec, &endpoints, &tables, self.dataplane.as_ref())))
    }

    async fn list_services(
        &self,
        request: Request<proto::ListServicesRequest>,
    ) -> Result<Response<proto::ServiceList>, Status> {
        let r = request.into_inner();
        let net = if r.network.is_empty() { None } else { Some(self.cluster.network(&r.network).await?) };
        let endpoints = self.cluster.endpoints().await?;
        let tables = self.reconciler.seen().tables;
        let services = self
            .cluster
            .services()
            .await?
            .iter()
            .filter(|s| net.as_ref().is_none_or(|n| n.id == s.network_id))
            .map(|s| service_to_proto(s, &endpoints, &tables, self.dataplane.as_ref()))
            .collect();
        Ok(Response::new(proto::ServiceList { services }))
    }

    async fn inspect_service(&self, request: Request<proto::ServiceRef>) -> Result<Response<proto::Service>, Status> {
        let r = request.into_inner();
        let s = self.cluster.service(&r.name).await?;
        let endpoints = self.cluster.endpoints().await?;
        let tables = self.reconciler.seen().tables;
        Ok(Response::new(service_to_proto(&s, &endpoints, &tables, self.dataplane.as_ref())))
    }

    async fn remove_service(
        &self,
        request: Request<proto::ServiceRef>,
    ) -> Result<Response<proto::RemoveServiceResponse>, Status> {
        let r = request.into_inner();
        self.cluster.remove_service(&r.name).await?;
        self.converge().await?;
        Ok(Response::new(proto::RemoveServiceResponse {}))
    }

    type MonitorStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<proto::FlowEvent, Status>> + Send + 'static>>;

    async fn monitor(&self, request: Request<proto::MonitorRequest>) -> Result<Response<Self::MonitorStream>, Status> {
        let Some(events) = &self.events else {
            return Err(Status::failed_precondition(
                "no flow events on this host: its eBPF datapath is off (trellisd runs with --ebpf=false, or the program could not load: see `trellisctl status`)",
            ));
        };
        let r = request.into_inner();
        if !r.verdict.is_empty() && r.verdict != "dropped" && r.verdict != "passed" {
            return Err(Status::invalid_argument(format!("verdict {:?}: expected dropped or passed", r.verdict)));
        }
        if !r.network.is_empty() {
            self.cluster.network(&r.network).await?;
        }
        let rx = events.subscribe();
        self.dataplane.set_events(true);
        let s = crate::monitor::stream(self.cluster.clone(), rx, r);
        Ok(Response::new(Box::pin(s)))
    }

    async fn create_network(
        &self,
        request: Request<proto::CreateNetworkRequest>,
    ) -> Result<Response<proto::Network>, Status> {
        let r = request.into_inner();
        validate::name("network name", &r.name).map_err(bad)?;
        let subnet = if r.subnet.is_empty() { None } else { Some(validate::subnet(&r.subnet).map_err(bad)?) };
        let gateway = if r.gateway.is_empty() { None } else { Some(validate::ip("gateway", &r.gateway).map_err(bad)?) };
        if gateway.is_some() && subnet.is_none() {
            return Err(Status::invalid_argument("--gateway needs --subnet"));
        }
        let mtu = validate::mtu(r.mtu).map_err(bad)?;
        let new = NewNetwork {
            name: r.name,
            subnet,
            gateway,
            attachable: r.attachable,
            internal: r.internal,
            encrypted: r.encrypted,
            mtu,
            labels: labels(r.labels)?,
        };
        let routes = self.dataplane.host_routes().await.map_err(internal)?;
        let underlay = self.dataplane.underlay_mtu().await.map_err(internal)?;
        let net = self.cluster.create_network(new, &routes, underlay).await?;
        let report = self.converge().await?;
        if !report.errors.is_empty() {
            tracing::warn!(errors = ?report.errors, "reconcile after network create reported errors");
        }
        Ok(Response::new(network_to_proto(&net, 0)))
    }

    async fn list_networks(
        &self,
        _: Request<proto::ListNetworksRequest>,
    ) -> Result<Response<proto::NetworkList>, Status> {
        let nets = self.cluster.networks().await?;
        let eps = self.cluster.endpoints().await?;
        let networks = nets
            .iter()
            .map(|n| network_to_proto(n, eps.iter().filter(|e| e.network_id == n.id).count() as u32))
            .collect();
        Ok(Response::new(proto::NetworkList { networks }))
    }

    async fn inspect_network(&self, request: Request<proto::NetworkRef>) -> Result<Response<proto::Network>, Status> {
        let n = self.cluster.network(&request.into_inner().name).await?;
        let count = self.cluster.endpoints().await?.iter().filter(|e| e.network_id == n.id).count();
        let mut out = network_to_proto(&n, count as u32);
        out.key = key_state(&self.cluster, &n).await?;
        Ok(Response::new(out))
    }

    async fn rotate_key(&self, request: Request<proto::NetworkRef>) -> Result<Response<proto::Network>, Status> {
        let (n, _) = self.cluster.rotate_key(&request.into_inner().name).await?;
        let count = self.cluster.endpoints().await?.iter().filter(|e| e.network_id == n.id).count();
        let mut out = network_to_proto(&n, count as u32);
        out.key = key_state(&self.cluster, &n).await?;
        Ok(Response::new(out))
    }

    async fn remove_network(
        &self,
        request: Request<proto::RemoveNetworkRequest>,
    ) -> Result<Response<proto::RemoveNetworkResponse>, Status> {
        let r = request.into_inner();
        let (_, removed) = self.cluster.remove_network(&r.name, r.force).await?;
        self.converge().await?;
        for e in &removed {
            self.remove_managed(e);
        }
        Ok(Response::new(proto::RemoveNetworkResponse { endpoints_removed: removed.len() as u32 }))
    }

    async fn attach(&self, request: Request<proto::AttachRequest>) -> Result<Response<proto::Endpoint>, Status> {
        let rec = self.attach_inner(request.into_inner()).await?;
        let net = self.cluster.network(&rec.network_id).await.ok();
        let mut ep = endpoint_to_proto(&rec, net.as_ref());
        if let (Some(dns), Some(n)) = (&self.dns, &net) {
            // Resolvable, and resolving, before the container's first query.
            dns.add_endpoint(&crate::dns::zone_network(n), &crate::dns::zone_endpoint(&rec));
            ep.dns = ep.gateway.clone();
        }
        Ok(Response::new(ep))
    }

    async fn detach(&self, request: Request<proto::DetachRequest>) -> Result<Response<proto::DetachResponse>, Status> {
        let r = request.into_inner();
        let e = self.find(&r.endpoint, &r.network, &r.container_id, &r.ifname).await?;
        // The endpoint is gone for every user now; its devices go in the
        // next pass (triggered by this write), and only then its address.
        self.cluster.mark_deleting(&e).await?;
        tracing::info!(endpoint = %e.id, name = %e.name, network = %e.network, "detached");
        Ok(Response::new(proto::DetachResponse {}))
    }

    async fn check_endpoint(
        &self,
        request: Request<proto::CheckEndpointRequest>,
    ) -> Result<Response<proto::CheckEndpointResponse>, Status> {
        let r = request.into_inner();
        let e = self.find(&r.endpoint, &r.network, &r.container_id, &r.ifname).await?;
        let net = self.cluster.network(&e.network_id).await?;
        let mut problems = Vec::new();
        if e.host == self.cluster.host {
            let host_if = model::host_ifname(&e.id);
            let bridge = model::bridge_name(&net.id);
            match self.dataplane.observe(false).await.map_err(internal)?.links.get(&host_if) {
                None => problems.push(format!("host interface {host_if} is missing")),
                Some(l) if !l.up => problems.push(format!("host interface {host_if} is down")),
                Some(l) if l.master.as_deref() != Some(bridge.as_str()) => {
                    problems.push(format!("host interface {host_if} is not a port of bridge {bridge}"))
                }
                Some(_) => {}
            }
            let want = ipnet::IpNet::new(e.ip, net.subnet.prefix_len()).map_err(internal)?;
            match self.dataplane.container_link(&e.netns, &e.ifname).await {
                Err(err) => problems.push(err.to_string()),
                Ok(None) => problems.push(format!("interface {} is missing in {}", e.ifname, e.netns.display())),
                Ok(Some(l)) => {
                    if !l.up {
                        problems.push(format!("interface {} is down", e.ifname));
                    }
                    if !l.addrs.contains(&want) {
                        problems.push(format!("interface {} lacks address {want}", e.ifname));
                    }
                    if model::format_mac(&l.mac) != e.mac {
                        problems.push(format!(
                            "interface {} has MAC {}, not {}",
                            e.ifname,
                            model::format_mac(&l.mac),
                            e.mac
                        ));
                    }
                }
            }
        } else {
            problems.push(format!("endpoint {} is on host {}, not this one", e.id, e.host));
        }
        Ok(Response::new(proto::CheckEndpointResponse { endpoint: Some(endpoint_to_proto(&e, Some(&net))), problems }))
    }

    async fn list_endpoints(
        &self,
        request: Request<proto::ListEndpointsRequest>,
    ) -> Result<Response<proto::EndpointList>, Status> {
        let r = request.into_inner();
        let nets = self.cluster.networks().await?;
        let filter = if r.network.is_empty() { None } else { Some(self.cluster.network(&r.network).await?.id) };
        let endpoints = self
            .cluster
            .endpoints()
            .await?
            .iter()
            .filter(|e| filter.as_ref().is_none_or(|f| &e.network_id == f))
            .map(|e| endpoint_to_proto(e, nets.iter().find(|n| n.id == e.network_id)))
            .collect();
        Ok(Response::new(proto::EndpointList { endpoints }))
    }

    async fn list_hosts(&self, _: Request<proto::ListHostsRequest>) -> Result<Response<proto::HostList>, Status> {
        let hosts = crate::hosts::live_hosts_seen(self.cluster.store.as_ref()).await.map_err(AgentError::from)?;
        let eps = self.cluster.endpoints().await?;
        let want = self.reconciler.last_desired();
        let seen = self.reconciler.seen();
        let hosts = hosts
            .iter()
            .map(|(h, last_seen)| {
                let count = eps.iter().filter(|e| e.host == h.id).count() as u32;
                let tunnel = if h.id == self.cluster.host {
                    "local".to_string()
                } else {
                    // Every FDB entry towards this host that should exist, does.
                    let wanted: Vec<(&String, &(model::Mac, std::net::IpAddr))> = want
                        .vxlans
                        .iter()
                        .flat_map(|(name, v)| v.fdb.iter().map(move |f| (name, f)))
                        .filter(|(_, (_, dst))| *dst == h.underlay)
                        .collect();
                    if wanted.is_empty() {
                        "no shared networks".to_string()
                    } else if wanted.iter().all(|(name, f)| seen.links.get(*name).is_some_and(|l| l.fdb.contains(f))) {
                        format!("programmed ({} entries)", wanted.len())
                    } else {
                        "pending".to_string()
                    }
                };
                proto::Host {
                    id: h.id.clone(),
                    hostname: h.hostname.clone(),
                    underlay: h.underlay.to_string(),
                    vtep_mac: h.vtep_mac.clone(),
                    vxlan_port: h.vxlan_port as u32,
                    version: h.version.clone(),
                    started_unix: h.started_unix,
                    local: h.id == self.cluster.host,
                    endpoints: count,
                    tunnel,
                    last_seen_ms: last_seen.map(|d| d.as_millis() as i64).unwrap_or(-1),
                    capabilities: h.capabilities.clone().into_iter().collect(),
                    probe: self.probe_text(&h.id),
                    probe_rtt_us: self
                        .prober
                        .as_ref()
                        .and_then(|p| p.health(&h.id))
                        .and_then(|x| x.rtt)
                        .map(|d| d.as_micros() as u64)
                        .unwrap_or(0),
                    tunnel_probe_rtt_us: self
                        .prober
                        .as_ref()
                        .and_then(|p| p.health(&h.id))
                        .and_then(|x| x.tunnel.rtt)
                        .map(|d| d.as_micros() as u64)
                        .unwrap_or(0),
                }
            })
            .collect();
        Ok(Response::new(proto::HostList { hosts }))
    }

    async fn status(&self, _: Request<proto::StatusRequest>) -> Result<Response<proto::StatusResponse>, Status> {
        let last = self.reconciler.last();
        let store = self.cluster.networks().await;
        let eps = self.cluster.endpoints().await.unwrap_or_default();
        let (store_ok, store_error, networks) = match store {
            Ok(n) => (true, String::new(), n.len() as u32),
            Err(e) => (false, e.to_string(), 0),
        };
        let docker = format!("{}docker/hosts/{}/", model::ROOT, self.cluster.host);
        let count = |items: &[trellis_store::KeyValue], part: &str| {
            items.iter().filter(|kv| kv.key[docker.len()..].starts_with(part)).count() as u32
        };
        let (docker_items, _) = self.cluster.store.list(&docker).await.unwrap_or_default();
        let tables = self.reconciler.seen().tables;
        let peers: Vec<String> = crate::hosts::live_hosts(self.cluster.store.as_ref())
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|h| h.id)
            .filter(|id| *id != self.cluster.host)
            .collect();
        let unreachable_peers: Vec<String> = peers
            .iter()
            .filter(|id| {
                self.prober
                    .as_ref()
                    .and_then(|p| p.health(id))
                    .is_some_and(|h| h.unreachable(crate::probe::MISSED_FOR_DOWN))
            })
            .cloned()
            .collect();
        Ok(Response::new(proto::StatusResponse {
            peers: peers.len() as u32,
            unreachable_peers,
            datapath_services: tables.services.len() as u32,
            datapath_backends: tables.backends.len() as u32,
            datapath_subnets: tables.nets.len() as u32,
            docker_networks: count(&docker_items, "nets/"),
            docker_endpoints: count(&docker_items, "eps/"),
            host_id: self.cluster.host.clone(),
            hostname: self.hostname.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            store_backend: self.cluster.store.backend().to_string(),
            store_ok,
            store_error,
            last_reconcile_unix_ms: last
                .finished
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
            reconcile_passes: last.generation,
            reconcile_errors: last.errors.iter().map(|(_, m)| m.clone()).collect(),
            networks,
            local_endpoints: eps.iter().filter(|e| e.host == self.cluster.host).count() as u32,
            capabilities: self.capabilities.clone(),
            esp_unsupported: self.cluster.esp_unsupported.clone().unwrap_or_default(),
            last_full_reconcile_us: self.reconciler.last_full_us.load(std::sync::atomic::Ordering::Relaxed),
            last_reconcile_us: last.duration.as_micros() as u64,
        }))
    }
}

/// After a pass: endpoints being deleted whose devices are gone lose their
/// records, addresses and managed namespaces; endpoints whose namespace
/// died are collected.
pub async fn settle(cluster: &Cluster, report: &crate::reconcile::PassReport) {
    if !report.acks.is_empty() {
        cluster.publish_acks(&report.acks).await;
    }
    for e in &report.finalizable {
        match cluster.finalize(e).await {
            Ok(()) => {
                if e.managed_netns
                    && let Err(err) = netns::remove(&e.netns)
                {
                    tracing::warn!(netns = %e.netns.display(), error = %err, "removing a managed netns");
                }
                tracing::debug!(endpoint = %e.id, "endpoint removed");
            }
            Err(err) => tracing::warn!(endpoint = %e.id, error = %err, "finalizing a detached endpoint"),
        }
    }
    if !report.gone.is_empty() {
        collect_gone(cluster, &report.gone).await;
    }
}

/// Remove the records of endpoints whose namespace is gone (the container
/// died without a detach) and their managed namespaces.
pub async fn collect_gone(cluster: &Cluster, gone: &[String]) {
    for id in gone {
        match cluster.find_endpoint(id, None).await {
            Ok(e) => {
                if Path::new(&e.netns).exists() {
                    continue;
                }
                match cluster.remove_endpoint(&e).await {
                    Ok(()) => {
                        tracing::info!(endpoint = %e.id, name = %e.name, netns = %e.netns.display(), "namespace gone: endpoint removed")
                    }
                    Err(err) => {
                        tracing::warn!(endpoint = %e.id, error = %err, "removing an endpoint whose namespace is gone")
                    }
                }
            }
            Err(err) => tracing::debug!(endpoint = %id, error = %err, "gone endpoint already removed"),
        }
    }
}
