//! The desired state in the store ([`Cluster`]): networks, endpoints and
//! services, created and removed in single transactions so that a failure
//! leaves nothing behind; hosts under their leases ([`hosts`]); encrypted
//! networks' key rings ([`encryption`]); the hosts' mesh addresses
//! ([`Cluster::sync_mesh_addrs`]); the Docker driver's records
//! ([`docker`]). The reconciler reads it ([`crate::reconcile::DesiredSource`]),
//! the use cases in [`crate::app`] write it.

pub mod docker;
pub mod encryption;
pub mod hosts;
pub mod informer;
pub mod liveness;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::IpNet;
use trellis_ipam::{AddrRequest, Ipam, IpamError, Pool, SubnetRequest};
use trellis_store::{Compare, Op, Store, StoreError};

use crate::model::{self, EndpointKind, EndpointRecord, NetworkRecord};
use crate::reconcile::DesiredSource;

/// Errors of the agent's operations, by what the caller can do about them.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A reconcile pass could not run (the store or the kernel could not be read).
    #[error("reconcile failed: {0}")]
    Reconcile(String),
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for AgentError {
    fn from(e: StoreError) -> Self {
        if e.is_transient() { AgentError::Unavailable(e.to_string()) } else { AgentError::Internal(e.to_string()) }
    }
}

impl From<IpamError> for AgentError {
    fn from(e: IpamError) -> Self {
        match e {
            IpamError::Store(s) => s.into(),
            IpamError::Corrupt { .. } | IpamError::NetworkExists(_) => AgentError::Internal(e.to_string()),
            IpamError::InUse { .. } => AgentError::AlreadyExists(e.to_string()),
            IpamError::Exhausted { .. } | IpamError::PoolExhausted { .. } | IpamError::VniExhausted => {
                AgentError::FailedPrecondition(e.to_string())
            }
            IpamError::Contention(_) | IpamError::CallerConflict => AgentError::Unavailable(e.to_string()),
            _ => AgentError::InvalidArgument(e.to_string()),
        }
    }
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

/// A network to create, already validated at the edge.
#[derive(Clone, Debug, Default)]
pub struct NewNetwork {
    pub name: String,
    pub subnet: Option<IpNet>,
    pub gateway: Option<IpAddr>,
    /// An IPv6 subnet beside the IPv4 one; with `ipv6` and none, a /64 of
    /// the cluster's ULA pool.
    pub subnet6: Option<IpNet>,
    pub gateway6: Option<IpAddr>,
    pub ipv6: bool,
    pub attachable: bool,
    pub internal: bool,
    pub encrypted: bool,
    pub mtu: u32,
    pub labels: BTreeMap<String, String>,
}

/// An endpoint to create, already validated at the edge.
#[derive(Clone, Debug)]
pub struct NewEndpoint {
    pub id: String,
    pub network: String,
    pub name: Option<String>,
    pub ip: Option<IpAddr>,
    pub labels: BTreeMap<String, String>,
    pub netns: PathBuf,
    pub managed_netns: bool,
    pub ifname: String,
    pub kind: EndpointKind,
    pub container_id: String,
    /// The IPv6 address, on a dual-stack network: only as this host's
    /// reservation (with `reserved`), as an engine's IPAM made it.
    pub ip6: Option<IpAddr>,
    /// `ip` (and `ip6`) are this host's reservations, to be claimed.
    pub reserved: bool,
}

/// A service to create, already validated at the edge.
#[derive(Clone, Debug)]
pub struct NewService {
    pub name: String,
    pub network: String,
    pub mode: model::ServiceMode,
    pub ports: Vec<model::ServicePort>,
    /// Empty: `trellis.service=NAME`.
    pub selector: BTreeMap<String, String>,
    /// Ports on the routing mesh (host ports chosen already): each claimed
    /// cluster-wide in the creating transaction.
    pub publish: Vec<model::MeshPort>,
}

/// The cluster-wide state as one host reads and writes it.
pub struct Cluster {
    pub store: Arc<dyn Store>,
    pub ipam: Ipam,
    pub host: String,
    pub default_pool: IpNet,
    pub default_prefix_len: u8,
    /// Endpoint records already decoded, by key and the revision they were
    /// decoded at: every pass lists all endpoints, and decoding them all
    /// again was most of an attach's pass on a host with many.
    decoded: DecodeCache<EndpointRecord>,
    /// The same for service records (a cluster may have thousands).
    decoded_services: DecodeCache<model::ServiceRecord>,
    /// Why this host cannot carry encrypted networks (its kernel has no
    /// ESP), if it cannot.
    pub esp_unsupported: Option<String>,
    /// How key rings are sealed in the store (the cluster keys, if this
    /// host has them: `--cluster-key-file`).
    pub codec: encryption::RingCodec,
    /// The key acks this host last wrote, by network id.
    pub(crate) acked: std::sync::Mutex<BTreeMap<String, trellis_ipsec::Ack>>,
    /// Why this host has no mesh address on a network it needs one on
    /// (by network name), as the last try said (`trellisctl status`).
    pub mesh_addr_errors: std::sync::Mutex<BTreeMap<String, String>>,
}

const CREATE_ATTEMPTS: usize = 16;

pub(crate) fn decode<T: for<'de> serde::Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| AgentError::Internal(format!("corrupt record {key}: {e}")))
}

/// Records decoded, each once per revision: `cache` keeps what the last
/// listing decoded, by key.
type DecodeCache<T> = std::sync::Mutex<std::collections::HashMap<String, (trellis_store::Revision, T)>>;

fn decode_cached<T: Clone + for<'de> serde::Deserialize<'de>>(
    cache: &DecodeCache<T>,
    items: Vec<trellis_store::KeyValue>,
) -> Result<Vec<T>> {
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    let mut fresh = std::collections::HashMap::with_capacity(items.len());
    let mut out = Vec::with_capacity(items.len());
    for kv in items {
        let rec = match cache.remove(&kv.key) {
            Some((rev, rec)) if rev == kv.mod_revision => rec,
            _ => decode(&kv.key, &kv.value)?,
        };
        out.push(rec.clone());
        fresh.insert(kv.key, (kv.mod_revision, rec));
    }
    *cache = fresh;
    Ok(out)
}

pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

impl Cluster {
    pub fn new(store: Arc<dyn Store>, host: &str, default_pool: IpNet, default_prefix_len: u8) -> Cluster {
        Cluster {
            ipam: Ipam::new(store.clone(), model::ipam_root(), host),
            store,
            host: host.to_string(),
            default_pool,
            default_prefix_len,
            decoded: Default::default(),
            decoded_services: Default::default(),
            esp_unsupported: None,
            codec: Default::default(),
            acked: Default::default(),
            mesh_addr_errors: Default::default(),
        }
    }

    pub async fn networks(&self) -> Result<Vec<NetworkRecord>> {
        let (items, _) = self.store.list(&model::networks_prefix()).await?;
        items.iter().map(|kv| decode(&kv.key, &kv.value)).collect()
    }

    /// Every endpoint record, including ones being deleted.
    pub async fn all_endpoints(&self) -> Result<Vec<EndpointRecord>> {
        let (items, _) = self.store.list(&model::endpoints_prefix()).await?;
        decode_cached(&self.decoded, items)
    }

    /// The live endpoints (not being deleted).
    pub async fn endpoints(&self) -> Result<Vec<EndpointRecord>> {
        Ok(self.all_endpoints().await?.into_iter().filter(|e| !e.deleting).collect())
    }

    /// A network by name or id.
    pub async fn network(&self, name_or_id: &str) -> Result<NetworkRecord> {
        if let Some(kv) = self.store.get(&model::network_key(name_or_id)).await? {
            return decode(&kv.key, &kv.value);
        }
        self.networks()
            .await?
            .into_iter()
            .find(|n| n.id == name_or_id || (name_or_id.len() >= 6 && n.id.starts_with(name_or_id)))
            .ok_or_else(|| AgentError::NotFound(format!("network {name_or_id:?} not found")))
    }

    pub async fn create_network(
        &self,
        req: NewNetwork,
        host_routes: &[IpNet],
        underlay_mtu: u32,
    ) -> Result<NetworkRecord> {
        if req.encrypted {
            self.require_esp(&req.name)?;
        }
        // An IPv6 subnet alone asks for an IPv6-only network; with --ipv6
        // (or an IPv4 subnet) it is the second family of a dual-stack one.
        let v6_subnet = req.subnet6.or(req.subnet.filter(|s| s.network().is_ipv6()));
        let v6_only = v6_subnet.is_some() && !req.subnet.is_some_and(|s| s.network().is_ipv4()) && !req.ipv6;
        if let (Some(first), Some(second)) = (req.subnet.filter(|s| s.network().is_ipv6()), req.subnet6) {
            return Err(AgentError::InvalidArgument(format!(
                "two IPv6 subnets ({first} and {second}): a network has at most one of each family"
            )));
        }
        if req.gateway6.is_some() && v6_subnet.is_none() && !req.ipv6 {
            return Err(AgentError::InvalidArgument(
                "an IPv6 gateway needs an IPv6 subnet (--subnet with an IPv6 CIDR, or --ipv6)".into(),
            ));
        }
        if let (true, Some(gw)) = (v6_only, req.gateway.filter(|g| g.is_ipv4())) {
            return Err(AgentError::InvalidArgument(format!(
                "gateway {gw} is an IPv4 address: the network is IPv6-only (give an IPv4 --subnet for dual stack)"
            )));
        }
        let v6 = match (v6_subnet, req.ipv6) {
            (Some(s), _) => Some(SubnetRequest::Specific(s)),
            (None, true) => Some(SubnetRequest::FromPool { pool: self.ipam.ula_pool().await?, prefix_len: 64 }),
            (None, false) => None,
        }
        .map(|subnet| trellis_ipam::FamilyRequest {
            subnet,
            gateway: req.gateway6.or(req.gateway.filter(|g| g.is_ipv6())),
        });
        let request = match req.subnet.filter(|s| s.network().is_ipv4()) {
            Some(s) => SubnetRequest::Specific(s),
            None => SubnetRequest::FromPool { pool: self.default_pool, prefix_len: self.default_prefix_len },
        };
        let v4 = trellis_ipam::FamilyRequest { subnet: request, gateway: req.gateway };
        let esp = if req.encrypted { trellis_ipsec::xfrm::ESP_OVERHEAD } else { 0 };
        let mtu = if req.mtu == 0 { underlay_mtu.saturating_sub(50 + esp).max(576) } else { req.mtu };
        for _ in 0..CREATE_ATTEMPTS {
            let key = model::network_key(&req.name);
            if self.store.get(&key).await?.is_some() {
                return Err(AgentError::AlreadyExists(format!("network {:?} already exists", req.name)));
            }
            let id = model::new_id();
            // IPv6-only: its one subnet is the record's `subnet` (and its
            // endpoints' one address their `ip`).
            let plan = match (&v6, v6_only) {
                (Some(r), true) => self.ipam.plan_network(&id, &r.subnet, r.gateway, host_routes).await?,
                _ => self.ipam.plan_dual_network(&id, &v4, v6.as_ref(), host_routes).await?,
            };
            let record = NetworkRecord {
                id: id.clone(),
                name: req.name.clone(),
                subnet: plan.subnet,
                gateway: plan.gateway,
                vni: plan.vni,
                mtu,
                attachable: req.attachable,
                internal: req.internal,
                encrypted: req.encrypted,
                labels: req.labels.clone(),
                created_unix: model::now_unix(),
                vxlan_port: None,
                subnet6: plan.subnet6,
                gateway6: plan.gateway6,
            };
            let mut compares = plan.compares;
            compares.push(Compare::Absent(key.clone()));
            let mut ops = plan.ops;
            let mut record = record;
            if req.encrypted {
                // Its own VXLAN port and its first key, generated here once:
                // the transaction holds only if nobody claimed either.
                let port = self.free_esp_port().await?;
                record.vxlan_port = Some(port);
                compares.push(Compare::Absent(model::esp_port_key(port)));
                ops.push(Op::put(model::esp_port_key(port), record.id.clone().into_bytes()));
                let ring = trellis_ipsec::KeyRing::new(trellis_ipsec::Secret::generate(), model::now_ms());
                compares.push(Compare::Absent(model::netkey_key(&record.id)));
                ops.push(Op::put(model::netkey_key(&record.id), self.codec.encode(&record.id, &ring)?));
            }
            ops.push(Op::put(key, encode(&record)));
            if self.store.txn(compares, ops).await?.succeeded {
                tracing::info!(network = %record.name, id = %record.id, subnet = %record.subnet, vni = record.vni, "network created");
                return Ok(record);
            }
            // Lost a race with another creation: look again.
        }
        Err(AgentError::Unavailable("too many concurrent network changes; try again".into()))
    }

    /// Every service (records decoded once per revision).
    pub async fn services(&self) -> Result<Vec<model::ServiceRecord>> {
        let (items, _) = self.store.list(&model::services_prefix()).await?;
        decode_cached(&self.decoded_services, items)
    }

    pub async fn service(&self, name: &str) -> Result<model::ServiceRecord> {
        match self.store.get(&model::service_key(name)).await? {
            Some(kv) => decode(&kv.key, &kv.value),
            None => Err(AgentError::NotFound(format!("service {name:?} not found"))),
        }
    }

    /// Create a service and, in `vip` mode, its VIP (the highest free
    /// address of its network, owned by the service cluster-wide), in one
    /// transaction.
    pub async fn create_service(&self, req: NewService) -> Result<model::ServiceRecord> {
        let net = self.network(&req.network).await?;
        let key = model::service_key(&req.name);
        if self.store.get(&key).await?.is_some() {
            return Err(AgentError::AlreadyExists(format!("service {:?} already exists", req.name)));
        }
        let selector = if req.selector.is_empty() { model::default_selector(&req.name) } else { req.selector };
        let base = model::ServiceRecord {
            name: req.name.clone(),
            network_id: net.id.clone(),
            network: net.name.clone(),
            mode: req.mode,
            vip: None,
            vip6: None,
            ports: req.ports,
            selector,
            created_unix: model::now_unix(),
            publish: req.publish.clone(),
        };
        let claims: Vec<(String, Compare, Op)> = req
            .publish
            .iter()
            .map(|p| {
                let k = model::mesh_port_key(p.proto, p.host_port);
                (k.clone(), Compare::Absent(k.clone()), Op::put(k, req.name.as_bytes().to_vec()))
            })
            .collect();
        let claim_compares: Vec<Compare> = claims.iter().map(|(_, c, _)| c.clone()).collect();
        let claim_ops: Vec<Op> = claims.iter().map(|(_, _, o)| o.clone()).collect();
        let with_vip = |vip: Option<IpAddr>| {
            let mut rec = base.clone();
            rec.vip = vip;
            rec
        };
        let rec = match req.mode {
            model::ServiceMode::Dnsrr => {
                let rec = with_vip(None);
                let mut compares = vec![Compare::Absent(key.clone())];
                compares.extend(claim_compares.iter().cloned());
                let mut ops = vec![Op::put(key, encode(&rec))];
                ops.extend(claim_ops.iter().cloned());
                if !self.store.txn(compares, ops).await?.succeeded {
                    self.mesh_claims_free(&req.publish).await?;
                    return Err(AgentError::AlreadyExists(format!("service {:?} already exists", req.name)));
                }
                rec
            }
            model::ServiceMode::Vip if net.ipv6_only() => {
                return Err(AgentError::FailedPrecondition(format!(
                    "network {:?} is IPv6-only: VIP services need an IPv4 VIP beside the IPv6 one for now (the datapath keys a service by it); use --mode dnsrr, or a dual-stack network",
                    net.name
                )));
            }
            model::ServiceMode::Vip => {
                let owner = model::vip_owner(&req.name);
                let pool6 = Self::pool6(&net);
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    // A dual-stack network's service has an IPv6 VIP too,
                    // taken in the same transaction (the top free address
                    // of the IPv6 subnet: another taking it first fails the
                    // transaction, and the choice is made again).
                    let six = match &pool6 {
                        Some(p) => match self.ipam.pick_top_for_txn(p, &owner).await {
                            Ok(picked) => Some(picked),
                            Err(IpamError::Exhausted { .. }) => {
                                self.mesh_claims_free(&req.publish).await?;
                                return Err(AgentError::FailedPrecondition(format!(
                                    "network {:?} ({}) has no free IPv6 address left for the VIP of service {:?}",
                                    net.name, p.subnet, req.name
                                )));
                            }
                            Err(e) => return Err(e.into()),
                        },
                        None => None,
                    };
                    let vip6 = six.as_ref().map(|(ip, _, _)| *ip);
                    let extra = |ip: IpAddr| {
                        let mut compares = vec![Compare::Absent(key.clone())];
                        compares.extend(claim_compares.iter().cloned());
                        let mut rec = with_vip(Some(ip));
                        rec.vip6 = vip6;
                        let mut ops = vec![Op::put(key.clone(), encode(&rec))];
                        ops.extend(claim_ops.iter().cloned());
                        if let Some((_, c, o)) = &six {
                            compares.extend(c.iter().cloned());
                            ops.extend(o.iter().cloned());
                        }
                        (compares, ops)
                    };
                    match self.ipam.allocate(&Self::pool(&net), AddrRequest::Top, &owner, extra).await {
                        Ok(ip) => {
                            let mut rec = with_vip(Some(ip));
                            rec.vip6 = vip6;
                            break rec;
                        }
                        Err(IpamError::CallerConflict) => {
                            // The IPv6 VIP taken meanwhile (the service
                            // itself not): choose again.
                            if vip6.is_some() && attempts < 8 && self.store.get(&key).await?.is_none() {
                                continue;
                            }
                            self.mesh_claims_free(&req.publish).await?;
                            return Err(AgentError::AlreadyExists(format!("service {:?} already exists", req.name)));
                        }
                        Err(IpamError::Exhausted { .. }) => {
                            return Err(AgentError::FailedPrecondition(format!(
                                "network {:?} ({}) has no free address left for the VIP of service {:?}",
                                net.name, net.subnet, req.name
                            )));
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        };
        tracing::info!(service = %rec.name, network = %net.name, vip = ?rec.vip, vip6 = ?rec.vip6, "service created");
        Ok(rec)
    }

    /// Remove a service and release its VIP, in one transaction.
    pub async fn remove_service(&self, name: &str) -> Result<model::ServiceRecord> {
        let key = model::service_key(name);
        let kv =
            self.store.get(&key).await?.ok_or_else(|| AgentError::NotFound(format!("service {name:?} not found")))?;
        let rec: model::ServiceRecord = decode(&kv.key, &kv.value)?;
        let mut ops = vec![Op::delete(key.clone())];
        for vip in rec.vip.iter().chain(&rec.vip6) {
            ops.push(self.ipam.release_op(&rec.network_id, *vip));
        }
        ops.extend(rec.publish.iter().map(|p| Op::delete(model::mesh_port_key(p.proto, p.host_port))));
        if !self.store.txn(vec![Compare::ModRevision(key, kv.mod_revision)], ops).await?.succeeded {
            return Err(AgentError::Unavailable(format!("service {name:?} changed while removing it; try again")));
        }
        tracing::info!(service = %name, "service removed");
        Ok(rec)
    }

    /// Replace the mesh ports of service `name` with `publish` (host ports
    /// chosen already): new ones claimed, dropped ones released, in one
    /// transaction against the record as read.
    pub async fn set_service_publish(&self, name: &str, publish: Vec<model::MeshPort>) -> Result<model::ServiceRecord> {
        let key = model::service_key(name);
        let kv =
            self.store.get(&key).await?.ok_or_else(|| AgentError::NotFound(format!("service {name:?} not found")))?;
        let mut rec: model::ServiceRecord = decode(&kv.key, &kv.value)?;
        let held = |ps: &[model::MeshPort]| -> std::collections::BTreeSet<(model::Proto, u16)> {
            ps.iter().map(|p| (p.proto, p.host_port)).collect()
        };
        let (before, after) = (held(&rec.publish), held(&publish));
        let added: Vec<model::MeshPort> =
            publish.iter().filter(|p| !before.contains(&(p.proto, p.host_port))).copied().collect();
        let mut compares = vec![Compare::ModRevision(key.clone(), kv.mod_revision)];
        let mut ops = Vec::new();
        for p in &added {
            let k = model::mesh_port_key(p.proto, p.host_port);
            compares.push(Compare::Absent(k.clone()));
            ops.push(Op::put(k, name.as_bytes().to_vec()));
        }
        for (proto, port) in before.difference(&after) {
            ops.push(Op::delete(model::mesh_port_key(*proto, *port)));
        }
        rec.publish = publish;
        ops.push(Op::put(key, encode(&rec)));
        if !self.store.txn(compares, ops).await?.succeeded {
            self.mesh_claims_free(&added).await?;
            return Err(AgentError::Unavailable(format!("service {name:?} changed while updating it; try again")));
        }
        tracing::info!(service = %name, publish = ?rec.publish.iter().map(|p| p.to_string()).collect::<Vec<_>>(), "service's published ports updated");
        Ok(rec)
    }

    /// The service holding each mesh port claimed cluster-wide.
    pub async fn mesh_claims(&self) -> Result<BTreeMap<(model::Proto, u16), String>> {
        let (items, _) = self.store.list(&model::mesh_ports_prefix()).await?;
        let mut out = BTreeMap::new();
        for kv in items {
            let rest = kv.key.trim_start_matches(&model::mesh_ports_prefix()).to_string();
            let (proto, port) = rest.split_once('/').unwrap_or_default();
            let proto = match proto {
                "tcp" => model::Proto::Tcp,
                "udp" => model::Proto::Udp,
                _ => continue,
            };
            if let Ok(port) = port.parse() {
                out.insert((proto, port), String::from_utf8_lossy(&kv.value).into_owned());
            }
        }
        Ok(out)
    }

    /// After a failed claim: a port another service claimed meanwhile is
    /// named (else the failure was something else).
    async fn mesh_claims_free(&self, ports: &[model::MeshPort]) -> Result<()> {
        for p in ports {
            if let Some(kv) = self.store.get(&model::mesh_port_key(p.proto, p.host_port)).await? {
                return Err(AgentError::AlreadyExists(format!(
                    "port {}/{} is published on the mesh by service {:?} already",
                    p.host_port,
                    p.proto.as_str(),
                    String::from_utf8_lossy(&kv.value)
                )));
            }
        }
        Ok(())
    }

    /// Remove a network; with `force` its endpoints go too. Returns the
    /// endpoints removed.
    pub async fn remove_network(&self, name_or_id: &str, force: bool) -> Result<(NetworkRecord, Vec<EndpointRecord>)> {
        let net = self.network(name_or_id).await?;
        let all: Vec<EndpointRecord> =
            self.all_endpoints().await?.into_iter().filter(|e| e.network_id == net.id).collect();
        let eps: Vec<EndpointRecord> = all.iter().filter(|e| !e.deleting).cloned().collect();
        if !eps.is_empty() && !force {
            let names: Vec<_> = eps.iter().take(5).map(|e| e.name.as_str()).collect();
            return Err(AgentError::FailedPrecondition(format!(
                "network {:?} has {} endpoint(s) ({}{}); detach them first or use --force",
                net.name,
                eps.len(),
                names.join(", "),
                if eps.len() > 5 { ", …" } else { "" }
            )));
        }
        let services: Vec<model::ServiceRecord> =
            self.services().await?.into_iter().filter(|s| s.network_id == net.id).collect();
        if !services.is_empty() && !force {
            let names: Vec<_> = services.iter().take(5).map(|s| s.name.as_str()).collect();
            return Err(AgentError::FailedPrecondition(format!(
                "network {:?} has {} service(s) ({}{}); remove them first or use --force",
                net.name,
                services.len(),
                names.join(", "),
                if services.len() > 5 { ", …" } else { "" }
            )));
        }
        let (mut compares, mut ops) = self.ipam.plan_network_release(&net.id).await?;
        ops.extend(services.iter().map(|s| Op::delete(model::service_key(&s.name))));
        ops.extend(
            services
                .iter()
                .flat_map(|s| s.publish.iter().map(|p| Op::delete(model::mesh_port_key(p.proto, p.host_port)))),
        );
        let net_key = model::network_key(&net.name);
        let current = self
            .store
            .get(&net_key)
            .await?
            .ok_or_else(|| AgentError::NotFound(format!("network {:?} not found", net.name)))?;
        compares.push(Compare::ModRevision(net_key.clone(), current.mod_revision));
        ops.push(Op::delete(net_key));
        if let Some(port) = net.vxlan_port {
            ops.push(Op::delete(model::esp_port_key(port)));
        }
        if net.encrypted {
            ops.push(Op::delete(model::netkey_key(&net.id)));
            let (acks, _) = self.store.list(&model::netkey_acks_prefix(&net.id)).await?;
            ops.extend(acks.into_iter().map(|kv| Op::delete(kv.key)));
        }
        // The hosts' mesh addresses on it (their addresses go with the
        // network's IPAM records above).
        let (mesh, _) = self.store.list(&model::mesh_addrs_of_network(&net.id)).await?;
        ops.extend(mesh.into_iter().map(|kv| Op::delete(kv.key)));
        for e in &all {
            ops.push(Op::delete(model::endpoint_key(&e.id)));
            if !e.deleting {
                ops.push(Op::delete(model::endpoint_name_key(&e.network_id, &e.name)));
                if let Some(k) = Self::container_key_of(e) {
                    ops.push(Op::delete(k));
                }
            }
        }
        if !self.store.txn(compares, ops).await?.succeeded {
            return Err(AgentError::Unavailable(format!(
                "network {:?} changed while removing it; try again",
                net.name
            )));
        }
        self.ipam.forget_network(&net.id);
        tracing::info!(network = %net.name, endpoints = eps.len(), "network removed");
        Ok((net, eps))
    }

    pub fn pool(net: &NetworkRecord) -> Pool {
        Pool { net_id: net.id.clone(), subnet: net.subnet, gateway: net.gateway }
    }

    /// A dual-stack network's IPv6 pool.
    pub fn pool6(net: &NetworkRecord) -> Option<Pool> {
        Some(Pool { net_id: net.id.clone(), subnet: net.subnet6?, gateway: net.gateway6 })
    }

    /// Write an endpoint and its address in one transaction.
    pub async fn create_endpoint(&self, req: NewEndpoint) -> Result<EndpointRecord> {
        let net = self.network(&req.network).await?;
        if net.encrypted {
            self.require_esp(&net.name)?;
        }
        if !net.attachable && !req.labels.contains_key(model::SERVICE_LABEL) {
            return Err(AgentError::FailedPrecondition(format!(
                "network {:?} is not attachable: without --attachable a network accepts only service tasks (endpoints labelled {}=NAME); standalone containers, debugging shells and ad-hoc attaches need a network created with --attachable",
                net.name,
                model::SERVICE_LABEL
            )));
        }
        let name = req.name.clone().unwrap_or_else(|| format!("ep-{}", &req.id[..8]));
        let name_key = model::endpoint_name_key(&net.id, &name);
        let template = EndpointRecord {
            id: req.id.clone(),
            name: name.clone(),
            network_id: net.id.clone(),
            network: net.name.clone(),
            host: self.host.clone(),
            ip: IpAddr::from([0, 0, 0, 0]),
            ip6: None,
            mac: model::Mac::default(),
            netns: req.netns.clone(),
            ifname: req.ifname.clone(),
            labels: req.labels.clone(),
            kind: req.kind,
            managed_netns: req.managed_netns,
            container_id: req.container_id.clone(),
            created_unix: model::now_unix(),
            deleting: false,
            aliases: Vec::new(),
            ports: Vec::new(),
            ready: true,
            drain_until_ms: None,
        };
        let net_key = model::network_key(&net.name);
        let request = match req.ip {
            Some(ip) if req.reserved => AddrRequest::Claim(ip),
            Some(ip) => AddrRequest::Specific(ip),
            None => AddrRequest::Any,
        };
        let container_key = Self::container_key_of(&template);
        // A dual-stack network's IPv6 address: chosen here (or the
        // engine's reservation claimed), taken in the transaction that
        // writes the endpoint and its IPv4 address (one commit; nothing is
        // left half-made if it fails). An engine that configures the
        // container's interface itself (Docker) gets none it did not ask
        // its IPAM driver for: an address the container does not have must
        // not resolve.
        let pool6 = Self::pool6(&net);
        let (ip6, claim6, picked) = match (&pool6, req.ip6) {
            (None, Some(a)) => {
                return Err(AgentError::InvalidArgument(format!(
                    "IPv6 address {a}: network {:?} has no IPv6 subnet",
                    net.name
                )));
            }
            (Some(p), Some(a)) => {
                if !p.subnet.contains(&a) {
                    return Err(AgentError::InvalidArgument(format!(
                        "IPv6 address {a} is not in network {:?}'s subnet {}",
                        net.name, p.subnet
                    )));
                }
                if !req.reserved {
                    return Err(AgentError::InvalidArgument(
                        "an IPv6 address can be named only as this host's reservation".into(),
                    ));
                }
                let (c, o) = self.ipam.claim_for_txn(p, a, &req.id);
                (Some(a), Some((c, o)), false)
            }
            (Some(p), None) if req.kind != EndpointKind::Docker => {
                let (a, c, o) = self.ipam.pick_for_txn(p, &req.id).await?;
                (Some(a), Some((c, o)), true)
            }
            _ => (None, None, false),
        };
        let template = EndpointRecord { ip6, ..template };
        let build = |ip: IpAddr| {
            let mut rec = template.clone();
            rec.ip = ip;
            rec.mac = model::Mac::for_ip(ip);
            let mut compares = vec![Compare::Absent(name_key.clone()), Compare::Absent(model::endpoint_key(&rec.id))];
            let mut ops = vec![
                Op::put(name_key.clone(), rec.id.clone().into_bytes()),
                Op::put(model::endpoint_key(&rec.id), encode(&rec)),
            ];
            if let Some((c, o)) = &claim6 {
                compares.extend(c.iter().cloned());
                ops.extend(o.iter().cloned());
            }
            if let Some(k) = &container_key {
                compares.push(Compare::Absent(k.clone()));
                ops.push(Op::put(k.clone(), rec.id.clone().into_bytes()));
            }
            (compares, ops)
        };
        let result = self.ipam.allocate(&Self::pool(&net), request, &req.id, build).await;
        if result.is_err()
            && picked
            && let (Some(p), Some(a)) = (&pool6, ip6)
        {
            self.ipam.unpick(p, a);
        }
        let ip = match result {
            Ok(ip) => ip,
            Err(IpamError::CallerConflict) => {
                // The IPv6 reservation, if one was claimed, may be what
                // failed the transaction.
                if !picked
                    && let (Some(p), Some(a)) = (&pool6, ip6)
                    && let Some(e) = self.ipam.claim_failure(p, a).await?
                {
                    return Err(e.into());
                }
                if let Some(k) = &container_key
                    && let Some(kv) = self.store.get(k).await?
                {
                    return Err(AgentError::AlreadyExists(format!(
                        "container {} already has interface {} (endpoint {})",
                        req.container_id,
                        req.ifname,
                        String::from_utf8_lossy(&kv.value)
                    )));
                }
                if self.store.get(&name_key).await?.is_some() {
                    return Err(AgentError::AlreadyExists(format!(
                        "an endpoint named {name:?} already exists on network {:?}",
                        net.name
                    )));
                }
                return Err(AgentError::AlreadyExists(format!("endpoint {} already exists", req.id)));
            }
            Err(e) => return Err(e.into()),
        };
        // The network may have been removed while we allocated: then undo.
        if self.store.get(&net_key).await?.is_none() {
            let mut rec = template.clone();
            rec.ip = ip;
            rec.mac = model::Mac::for_ip(ip);
            self.delete_endpoint_records(&net, &rec).await?;
            return Err(AgentError::NotFound(format!("network {:?} was removed", net.name)));
        }
        let mut rec = template;
        rec.ip = ip;
        rec.mac = model::Mac::for_ip(ip);
        Ok(rec)
    }

    /// Remove an endpoint's records and release its address, atomically.
    pub async fn delete_endpoint_records(&self, net: &NetworkRecord, e: &EndpointRecord) -> Result<()> {
        let mut ops = vec![Op::delete(model::endpoint_key(&e.id)), self.ipam.release_op(&e.network_id, e.ip)];
        ops.extend(e.ip6.map(|a| self.ipam.release_op(&e.network_id, a)));
        self.store.txn(vec![], ops).await?;
        self.ipam.released(&Self::pool(net), e.ip);
        if let (Some(p), Some(a)) = (Self::pool6(net), e.ip6) {
            self.ipam.released(&p, a);
        }
        self.release_name(e).await
    }

    /// The container key of an engine's endpoint (CNI); Docker's endpoints
    /// are found through the driver's own records.
    fn container_key_of(e: &EndpointRecord) -> Option<String> {
        (!e.container_id.is_empty() && e.kind != EndpointKind::Docker)
            .then(|| model::container_key(&e.host, &e.container_id, &e.ifname))
    }

    /// Free an endpoint's name (and container key), unless another
    /// endpoint holds it by now.
    async fn release_name(&self, e: &EndpointRecord) -> Result<()> {
        let key = model::endpoint_name_key(&e.network_id, &e.name);
        self.store.txn(vec![Compare::Value(key.clone(), e.id.clone().into_bytes())], vec![Op::delete(key)]).await?;
        if let Some(k) = Self::container_key_of(e) {
            self.store.txn(vec![Compare::Value(k.clone(), e.id.clone().into_bytes())], vec![Op::delete(k)]).await?;
        }
        Ok(())
    }

    /// Detach, first phase: the endpoint is marked for deletion and its
    /// name freed; its devices go in the next reconcile pass and only then
    /// its record and address ([`Cluster::finalize`]).
    pub async fn mark_deleting(&self, e: &EndpointRecord) -> Result<()> {
        self.mark_detached(e, None).await
    }

    /// Detach, first phase, with a drain: as [`Cluster::mark_deleting`]
    /// (gone for users at once, its name freed), but with `drain_until_ms`
    /// its devices and datapath backend entries stay until this host ends
    /// the drain ([`Cluster::end_drain`]).
    pub async fn mark_detached(&self, e: &EndpointRecord, drain_until_ms: Option<u64>) -> Result<()> {
        let key = model::endpoint_key(&e.id);
        for _ in 0..CREATE_ATTEMPTS {
            let Some(kv) = self.store.get(&key).await? else { return Ok(()) };
            let mut rec: EndpointRecord = decode(&kv.key, &kv.value)?;
            if rec.deleting {
                return Ok(());
            }
            rec.deleting = true;
            rec.drain_until_ms = drain_until_ms;
            let name_key = model::endpoint_name_key(&rec.network_id, &rec.name);
            // One transaction: marked, and its name freed (the name key
            // points at this endpoint as long as it is live).
            let out = self
                .store
                .txn(
                    vec![
                        Compare::ModRevision(key.clone(), kv.mod_revision),
                        Compare::Value(name_key.clone(), rec.id.clone().into_bytes()),
                    ],
                    vec![Op::put(key.clone(), encode(&rec)), Op::delete(name_key)],
                )
                .await?;
            if out.succeeded {
                // Its container may attach again at once (CNI DEL, ADD).
                if let Some(k) = Self::container_key_of(&rec) {
                    self.store
                        .txn(vec![Compare::Value(k.clone(), rec.id.clone().into_bytes())], vec![Op::delete(k)])
                        .await?;
                }
                return Ok(());
            }
            if self.store.get(&key).await?.is_some_and(|now| now.mod_revision == kv.mod_revision) {
                // The name key was not ours (it should be): mark only.
                let out = self
                    .store
                    .txn(
                        vec![Compare::ModRevision(key.clone(), kv.mod_revision)],
                        vec![Op::put(key.clone(), encode(&rec))],
                    )
                    .await?;
                if out.succeeded {
                    return Ok(());
                }
            }
        }
        Err(AgentError::Unavailable(format!("endpoint {} kept changing; try again", e.id)))
    }

    /// The end of an endpoint's drain: a plain detached endpoint now, whose
    /// devices go in the next pass. Nothing to do if it is not draining (or
    /// gone).
    pub async fn end_drain(&self, id: &str) -> Result<()> {
        self.update_endpoint(id, |rec| {
            if !rec.draining() {
                return false;
            }
            rec.drain_until_ms = None;
            true
        })
        .await
        .map(|_| ())
    }

    /// Mark endpoint `id` ready or not (its engine's health). `Ok(false)`
    /// when nothing changed (already so, detached, or gone).
    pub async fn set_ready(&self, id: &str, ready: bool) -> Result<bool> {
        self.update_endpoint(id, |rec| {
            if rec.ready == ready || rec.deleting {
                return false;
            }
            rec.ready = ready;
            true
        })
        .await
    }

    /// Change endpoint `id`'s record with `f` (which says whether it
    /// changed anything) in a transaction against the record as read;
    /// whether it was written.
    async fn update_endpoint(&self, id: &str, f: impl Fn(&mut EndpointRecord) -> bool) -> Result<bool> {
        let key = model::endpoint_key(id);
        for _ in 0..CREATE_ATTEMPTS {
            let Some(kv) = self.store.get(&key).await? else { return Ok(false) };
            let mut rec: EndpointRecord = decode(&kv.key, &kv.value)?;
            if !f(&mut rec) {
                return Ok(false);
            }
            let compares = vec![Compare::ModRevision(key.clone(), kv.mod_revision)];
            if self.store.txn(compares, vec![Op::put(key.clone(), encode(&rec))]).await?.succeeded {
                return Ok(true);
            }
        }
        Err(AgentError::Unavailable(format!("endpoint {id} kept changing; try again")))
    }

    /// An endpoint's record by id, detached ones included.
    pub async fn endpoint_record(&self, id: &str) -> Result<Option<EndpointRecord>> {
        match self.store.get(&model::endpoint_key(id)).await? {
            Some(kv) => Ok(Some(decode(&kv.key, &kv.value)?)),
            None => Ok(None),
        }
    }

    /// Detach, second phase: the devices are gone; drop the record and
    /// release the address.
    pub async fn finalize(&self, e: &EndpointRecord) -> Result<()> {
        self.remove_endpoint(e).await
    }

    /// Find an endpoint by id, id prefix, or name (within `network` if given).
    pub async fn find_endpoint(&self, endpoint: &str, network: Option<&str>) -> Result<EndpointRecord> {
        if let Some(kv) = self.store.get(&model::endpoint_key(endpoint)).await? {
            let e: EndpointRecord = decode(&kv.key, &kv.value)?;
            if !e.deleting {
                return Ok(e);
            }
        }
        let net_id = match network {
            Some(n) => Some(self.network(n).await?.id),
            None => None,
        };
        let matches: Vec<EndpointRecord> = self
            .endpoints()
            .await?
            .into_iter()
            .filter(|e| net_id.as_ref().is_none_or(|n| &e.network_id == n))
            .filter(|e| e.name == endpoint || (endpoint.len() >= 6 && e.id.starts_with(endpoint)))
            .collect();
        match matches.len() {
            0 => Err(AgentError::NotFound(format!("endpoint {endpoint:?} not found"))),
            1 => Ok(matches.into_iter().next().expect("one")),
            n => Err(AgentError::InvalidArgument(format!(
                "{n} endpoints are named {endpoint:?} (on networks {}); name the network with --network",
                matches.iter().map(|e| e.network.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// Give an endpoint the identity its engine knows it by: container id,
    /// name (if free on its network), aliases, labels and readiness (in
    /// one write: it never backs a service it matches before its engine
    /// said whether it is ready).
    pub async fn set_identity(
        &self,
        id: &str,
        container_id: &str,
        name: Option<&str>,
        aliases: Vec<String>,
        labels: BTreeMap<String, String>,
        ready: bool,
    ) -> Result<EndpointRecord> {
        let key = model::endpoint_key(id);
        for _ in 0..CREATE_ATTEMPTS {
            let Some(kv) = self.store.get(&key).await? else {
                return Err(AgentError::NotFound(format!("endpoint {id} not found")));
            };
            let old: EndpointRecord = decode(&kv.key, &kv.value)?;
            let mut rec = old.clone();
            rec.container_id = container_id.to_string();
            rec.aliases = aliases.clone();
            rec.labels = labels.clone();
            rec.ready = ready;
            let mut compares = vec![Compare::ModRevision(key.clone(), kv.mod_revision)];
            let mut ops = Vec::new();
            if let Some(n) = name.filter(|n| *n != old.name) {
                let new_key = model::endpoint_name_key(&old.network_id, n);
                if self.store.get(&new_key).await?.is_none() {
                    rec.name = n.to_string();
                    compares.push(Compare::Absent(new_key.clone()));
                    ops.push(Op::put(new_key, rec.id.clone().into_bytes()));
                    ops.push(Op::delete(model::endpoint_name_key(&old.network_id, &old.name)));
                } else {
                    tracing::warn!(endpoint = %id, name = n, network = %old.network, "name taken on the network; keeping the generated one");
                }
            }
            ops.push(Op::put(key.clone(), encode(&rec)));
            if self.store.txn(compares, ops).await?.succeeded {
                return Ok(rec);
            }
        }
        Err(AgentError::Unavailable(format!("endpoint {id} kept changing; try again")))
    }

    /// Replace the ports published to endpoint `id` (not one being
    /// deleted), in one transaction on its record.
    pub async fn set_ports(&self, id: &str, ports: Vec<model::PublishedPort>) -> Result<EndpointRecord> {
        let key = model::endpoint_key(id);
        for _ in 0..CREATE_ATTEMPTS {
            let Some(kv) = self.store.get(&key).await? else {
                return Err(AgentError::NotFound(format!("endpoint {id} not found")));
            };
            let mut rec: EndpointRecord = decode(&kv.key, &kv.value)?;
            if rec.deleting && !ports.is_empty() {
                return Err(AgentError::FailedPrecondition(format!("endpoint {id} is being detached")));
            }
            rec.ports = ports.clone();
            let compares = vec![Compare::ModRevision(key.clone(), kv.mod_revision)];
            if self.store.txn(compares, vec![Op::put(key.clone(), encode(&rec))]).await?.succeeded {
                return Ok(rec);
            }
        }
        Err(AgentError::Unavailable(format!("endpoint {id} kept changing; try again")))
    }

    /// This host's endpoint of an engine's container by interface name
    /// (within `network` if given).
    pub async fn find_by_container(
        &self,
        container_id: &str,
        ifname: &str,
        network: Option<&str>,
    ) -> Result<EndpointRecord> {
        let missing =
            || AgentError::NotFound(format!("container {container_id} has no endpoint {ifname:?} on this host"));
        let Some(kv) = self.store.get(&model::container_key(&self.host, container_id, ifname)).await? else {
            return Err(missing());
        };
        let id = String::from_utf8_lossy(&kv.value).into_owned();
        let Some(ep) = self.store.get(&model::endpoint_key(&id)).await? else { return Err(missing()) };
        let e: EndpointRecord = decode(&ep.key, &ep.value)?;
        if e.deleting {
            return Err(missing());
        }
        if let Some(n) = network
            && e.network != n
            && e.network_id != n
        {
            return Err(missing());
        }
        Ok(e)
    }

    /// Remove an endpoint from the store (the reconciler then removes its
    /// kernel objects).
    pub async fn remove_endpoint(&self, e: &EndpointRecord) -> Result<()> {
        let net = match self.network(&e.network_id).await {
            Ok(n) => n,
            Err(AgentError::NotFound(_)) => {
                // The network went with --force; drop what is left.
                self.store.txn(vec![], vec![Op::delete(model::endpoint_key(&e.id))]).await?;
                return self.release_name(e).await;
            }
            Err(err) => return Err(err),
        };
        self.delete_endpoint_records(&net, e).await
    }
}

impl Cluster {
    /// Every host's mesh addresses (see [`model::MeshAddrRecord`]).
    pub async fn mesh_addrs(&self) -> Result<Vec<model::MeshAddrRecord>> {
        let (items, _) = self.store.list(&model::mesh_addrs_prefix()).await?;
        items.iter().map(|kv| decode(&kv.key, &kv.value)).collect()
    }

    /// `host`'s mesh addresses.
    pub async fn mesh_addrs_of(&self, host: &str) -> Result<Vec<model::MeshAddrRecord>> {
        Ok(self.mesh_addrs().await?.into_iter().filter(|m| m.host == host).collect())
    }

    /// Give this host a mesh address on each network of `missing` (ids),
    /// and release `releasable` (addresses it no longer needs whose kernel
    /// objects are gone: never reused while still in use). Whether anything
    /// changed. A network with no free address is remembered in
    /// [`Cluster::mesh_addr_errors`] (and logged) until it has one; other
    /// failures are returned.
    pub async fn sync_mesh_addrs(
        &self,
        missing: &std::collections::BTreeSet<String>,
        releasable: &[model::MeshAddrRecord],
    ) -> Result<bool> {
        if missing.is_empty() && releasable.is_empty() {
            self.mesh_addr_errors.lock().unwrap_or_else(|p| p.into_inner()).clear();
            return Ok(false);
        }
        let mut changed = false;
        for m in releasable.iter().filter(|m| m.host == self.host && !missing.contains(&m.network_id)) {
            let key = model::mesh_addr_key(&m.network_id, &m.host);
            let out = self
                .store
                .txn(
                    vec![Compare::Value(key.clone(), encode(m))],
                    vec![Op::delete(key), self.ipam.release_op(&m.network_id, m.ip)],
                )
                .await?;
            if out.succeeded {
                changed = true;
                if let Ok(net) = self.network(&m.network_id).await {
                    self.ipam.released(&Self::pool(&net), m.ip);
                }
                tracing::info!(network = %m.network_id, address = %m.ip, "mesh address released");
            }
        }
        let mut errors = BTreeMap::new();
        let networks = if missing.is_empty() { Vec::new() } else { self.networks().await? };
        for net_id in missing {
            let Some(net) = networks.iter().find(|n| &n.id == net_id) else { continue };
            // The network as read: the allocation holds only while it exists.
            let Some(net_kv) = self.store.get(&model::network_key(&net.name)).await? else { continue };
            let key = model::mesh_addr_key(&net.id, &self.host);
            let host = self.host.clone();
            let network_id = net.id.clone();
            let build = |ip: IpAddr| {
                let rec = model::MeshAddrRecord {
                    host: host.clone(),
                    network_id: network_id.clone(),
                    ip,
                    mac: model::Mac::for_ip(ip),
                };
                (
                    vec![Compare::Absent(key.clone()), Compare::ModRevision(net_kv.key.clone(), net_kv.mod_revision)],
                    vec![Op::put(key.clone(), encode(&rec))],
                )
            };
            let owner = model::mesh_addr_owner(&self.host);
            match self.ipam.allocate(&Self::pool(net), AddrRequest::Any, &owner, build).await {
                Ok(ip) => {
                    changed = true;
                    tracing::info!(network = %net.name, address = %ip, "mesh address allocated");
                }
                // Written meanwhile (another settle of this host), or the
                // network changed: the next pass looks again.
                Err(IpamError::CallerConflict) => {}
                Err(IpamError::Exhausted { .. }) => {
                    let why = format!(
                        "network {:?} ({}) has no free address left for this host's mesh address: its services are not published here",
                        net.name, net.subnet
                    );
                    tracing::warn!(network = %net.name, "{why}");
                    errors.insert(net.name.clone(), why);
                }
                Err(e) => return Err(e.into()),
            }
        }
        *self.mesh_addr_errors.lock().unwrap_or_else(|p| p.into_inner()) = errors;
        Ok(changed)
    }
}

impl Cluster {
    /// Reclaim everything a dead host held: per network, in one
    /// transaction that holds only while the host is still absent, its
    /// blocks, addresses and endpoint records. Returns the endpoints removed.
    pub async fn reclaim_host(&self, host: &str) -> Result<usize> {
        let mut removed = 0;
        let eps = self.all_endpoints().await?;
        let mesh = self.mesh_addrs().await?;
        for net in self.networks().await? {
            let (mut compares, mut ops) = self.ipam.plan_host_release(&net.id, host).await?;
            compares.push(Compare::Absent(model::host_key(host)));
            // Its mesh address there (the address itself is one of the
            // host's, released by the plan).
            if mesh.iter().any(|m| m.host == host && m.network_id == net.id) {
                ops.push(Op::delete(model::mesh_addr_key(&net.id, host)));
            }
            let mine: Vec<&EndpointRecord> = eps.iter().filter(|e| e.host == host && e.network_id == net.id).collect();
            for e in &mine {
                ops.push(Op::delete(model::endpoint_key(&e.id)));
                if !e.deleting {
                    let name_key = model::endpoint_name_key(&e.network_id, &e.name);
                    compares.push(Compare::Value(name_key.clone(), e.id.clone().into_bytes()));
                    ops.push(Op::delete(name_key));
                    if let Some(k) = Self::container_key_of(e) {
                        ops.push(Op::delete(k));
                    }
                }
            }
            if ops.is_empty() {
                continue;
            }
            if self.store.txn(compares, ops).await?.succeeded {
                removed += mine.len();
                self.ipam.forget_network(&net.id);
            }
        }
        Ok(removed)
    }

    /// The hosts that hold IPAM blocks in `networks` (listed from the store).
    pub async fn block_owners(&self, networks: &[NetworkRecord]) -> Result<std::collections::BTreeSet<String>> {
        let mut owners = std::collections::BTreeSet::new();
        for net in networks {
            owners.extend(self.ipam.blocks(&net.id).await?.into_iter().map(|(_, r, _)| r.host));
        }
        Ok(owners)
    }
}

/// Hosts other than `me` that hold endpoints or mesh addresses in `view` or are among
/// `block_owners`, with no live registration in `view`.
pub fn absent_owners(
    view: &crate::state::informer::View,
    block_owners: &std::collections::BTreeSet<String>,
    me: &str,
) -> std::collections::BTreeSet<String> {
    let live: std::collections::BTreeSet<&str> = view.hosts.iter().map(|h| h.id.as_str()).collect();
    view.endpoints
        .iter()
        .map(|e| e.host.as_str())
        .chain(view.mesh_addrs.iter().map(|m| m.host.as_str()))
        .chain(block_owners.iter().map(String::as_str))
        .filter(|h| *h != me && !live.contains(h))
        .map(str::to_string)
        .collect()
}

#[async_trait::async_trait]
impl DesiredSource for Cluster {
    async fn load(&self) -> std::result::Result<crate::reconcile::Snapshot, String> {
        let networks = self.networks().await.map_err(|e| e.to_string())?;
        let endpoints = self.all_endpoints().await.map_err(|e| e.to_string())?;
        let hosts = crate::state::hosts::live_hosts(self.store.as_ref()).await.map_err(|e| e.to_string())?;
        let services = self.services().await.map_err(|e| e.to_string())?;
        let keys = if networks.iter().any(|n| n.encrypted) {
            self.key_rings().await.map_err(|e| e.to_string())?
        } else {
            Default::default()
        };
        let mesh_addrs = self.mesh_addrs().await.map_err(|e| e.to_string())?;
        Ok(crate::reconcile::Snapshot {
            revision: 0,
            networks: Arc::new(networks),
            endpoints: endpoints.into(),
            hosts: Arc::new(hosts),
            services: Arc::new(services),
            keys: Arc::new(keys),
            held_ports: Default::default(),
            mesh_addrs: Arc::new(mesh_addrs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listed_endpoints_follow_every_change_through_the_decode_cache() {
        let store: Arc<dyn Store> = Arc::new(trellis_store::LocalStore::memory());
        let c = Cluster::new(store, "h1", "10.0.0.0/8".parse().unwrap(), 24);
        let new = NewNetwork { name: "app".into(), attachable: true, mtu: 1450, ..NewNetwork::default() };
        c.create_network(new, &[], 1500).await.unwrap();
        let mk = endpoint;
        let a = c.create_endpoint(mk("a")).await.unwrap();
        c.create_endpoint(mk("b")).await.unwrap();
        assert_eq!(c.all_endpoints().await.unwrap().len(), 2);
        // Changed: the cached copy is not served.
        c.mark_deleting(&a).await.unwrap();
        let now = c.all_endpoints().await.unwrap();
        assert!(now.iter().find(|e| e.id == "a").unwrap().deleting);
        c.set_identity("b", "cid", Some("bee"), vec!["al".into()], BTreeMap::new(), true).await.unwrap();
        let now = c.all_endpoints().await.unwrap();
        let b = now.iter().find(|e| e.id == "b").unwrap();
        assert_eq!((b.name.as_str(), b.aliases.clone()), ("bee", vec!["al".to_string()]));
        // Removed: gone from the list.
        c.remove_endpoint(&now.iter().find(|e| e.id == "a").unwrap().clone()).await.unwrap();
        assert_eq!(c.all_endpoints().await.unwrap().len(), 1);
    }

    fn endpoint(id: &str) -> NewEndpoint {
        NewEndpoint {
            id: id.into(),
            network: "app".into(),
            name: Some(id.into()),
            ip: None,
            labels: BTreeMap::new(),
            netns: "/run/netns/x".into(),
            managed_netns: false,
            ifname: "eth0".into(),
            kind: EndpointKind::Adhoc,
            container_id: String::new(),
            ip6: None,
            reserved: false,
        }
    }

    async fn register(store: &Arc<dyn Store>, id: &str) {
        let rec = model::HostRecord {
            id: id.into(),
            hostname: id.into(),
            underlay: [10, 0, 0, 2].into(),
            vtep_mac: model::Mac([2, 0, 0, 0, 0, 2]),
            vxlan_port: 4789,
            capabilities: Default::default(),
            version: "t".into(),
            started_unix: 0,
            underlay_mtu: 0,
        };
        crate::state::hosts::register(store.as_ref(), &rec, std::time::Duration::from_secs(60)).await.unwrap();
    }

    /// Fencing, both orders of a returning host and a reclaim of it: back
    /// first, the reclaim takes nothing; reclaimed first, the host's
    /// endpoints and addresses are gone, and what it still caches of its
    /// old block hands out no address another host took meanwhile.
    #[tokio::test]
    async fn a_returning_host_and_a_reclaim_of_it_never_share_an_address() {
        let store: Arc<dyn Store> = Arc::new(trellis_store::LocalStore::memory());
        let h1 = Cluster::new(store.clone(), "h1", "10.0.0.0/8".parse().unwrap(), 24);
        let h2 = Cluster::new(store.clone(), "h2", "10.0.0.0/8".parse().unwrap(), 24);
        let new = NewNetwork {
            name: "app".into(),
            subnet: Some("10.9.0.0/24".parse().unwrap()),
            attachable: true,
            ..NewNetwork::default()
        };
        h1.create_network(new, &[], 1500).await.unwrap();
        // h2 attached, then lost its lease (no host record).
        let e = h2.create_endpoint(endpoint("e")).await.unwrap();
        // Back before the reclaim: the reclaim takes nothing.
        register(&store, "h2").await;
        assert_eq!(h1.reclaim_host("h2").await.unwrap(), 0);
        assert!(h1.endpoint_record(&e.id).await.unwrap().is_some());
        let net = h1.network("app").await.unwrap();
        assert!(h1.ipam.addresses(&net.id).await.unwrap().iter().any(|(ip, r)| *ip == e.ip && r.host == "h2"));
        // Its lease goes again, and this time the reclaim is first.
        store.delete(&model::host_key("h2")).await.unwrap();
        assert_eq!(h1.reclaim_host("h2").await.unwrap(), 1);
        assert!(h1.endpoint_record(&e.id).await.unwrap().is_none());
        // h1 takes h2's old address; h2, back with its stale cache,
        // attaches again and gets another one.
        let mut taker = endpoint("taker");
        taker.ip = Some(e.ip);
        assert_eq!(h1.create_endpoint(taker).await.unwrap().ip, e.ip);
        register(&store, "h2").await;
        let again = h2.create_endpoint(endpoint("again")).await.unwrap();
        assert_ne!(again.ip, e.ip);
        let owners: Vec<_> = h1.ipam.addresses(&net.id).await.unwrap();
        let of = |ip| owners.iter().filter(|(a, _)| *a == ip).count();
        assert_eq!((of(e.ip), of(again.ip)), (1, 1));
    }
}
