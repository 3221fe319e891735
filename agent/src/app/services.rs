//! Services: a name on a network and the endpoints its selector matches,
//! behind a VIP the eBPF datapath balances (or DNS round robin).

use std::collections::BTreeMap;

use super::{AgentError, App, Result};
use crate::model::{BackendState, EndpointRecord, MeshPort, Proto, PublishMode, ServiceMode, ServiceRecord};
use crate::state::NewService;

/// Where a mesh host port is picked when none is asked for (`--publish
/// PORT`): Docker swarm's and Kubernetes' NodePort range.
pub const MESH_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

/// One port to publish on the routing mesh, as a front door parsed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshPortRequest {
    pub proto: Proto,
    /// 0: pick one from [`MESH_PORTS`].
    pub host_port: u16,
    /// The service's port.
    pub port: u16,
    pub mode: PublishMode,
}

/// A service to create, with the ports to publish on the mesh.
#[derive(Clone, Debug)]
pub struct CreateService {
    pub service: NewService,
    pub publish: Vec<MeshPortRequest>,
}

/// A service with its backends (every endpoint its selector matches,
/// draining ones too) and this host's view of them.
#[derive(Clone, Debug)]
pub struct ServiceView {
    pub service: ServiceRecord,
    pub backends: Vec<BackendView>,
    pub stats: trellis_ebpf::SvcStats,
}

/// One backend of a service.
#[derive(Clone, Debug)]
pub struct BackendView {
    pub endpoint: EndpointRecord,
    /// Ready (taking new connections), draining or unready.
    pub state: BackendState,
    /// This host's datapath has its backend entry.
    pub programmed: bool,
}

impl App {
    pub async fn create_service(&self, req: CreateService) -> Result<ServiceView> {
        let CreateService { service: mut new, publish } = req;
        trellis_plugin_api::validate::service_name(&new.name)?;
        if new.network.is_empty() {
            return Err(AgentError::InvalidArgument("a network is required (--network)".into()));
        }
        for (i, p) in new.ports.iter().enumerate() {
            if new.ports[..i].iter().any(|q| q.port == p.port && q.proto == p.proto) {
                return Err(AgentError::InvalidArgument(format!(
                    "port {}/{} is given twice",
                    p.port,
                    p.proto.as_str()
                )));
            }
        }
        trellis_plugin_api::validate::labels(&new.selector)?;
        if !publish.is_empty() {
            let net = self.cluster.network(&new.network).await?;
            let probe = ServiceRecord {
                name: new.name.clone(),
                network_id: net.id.clone(),
                network: net.name.clone(),
                mode: new.mode,
                vip: None,
                vip6: None,
                ports: new.ports.clone(),
                selector: BTreeMap::new(),
                created_unix: 0,
                publish: Vec::new(),
            };
            let _one_at_a_time = self.ports_lock.lock().await;
            new.publish = self.mesh_ports(&probe, net.internal, &[], &publish).await?;
            let rec = self.cluster.create_service(new).await?;
            drop(_one_at_a_time);
            self.converge().await?;
            let endpoints = self.cluster.all_endpoints().await?;
            return Ok(self.service_view(rec, &endpoints));
        }
        let rec = self.cluster.create_service(new).await?;
        self.converge().await?;
        let endpoints = self.cluster.all_endpoints().await?;
        Ok(self.service_view(rec, &endpoints))
    }

    /// Every service (of one network).
    pub async fn services(&self, network: Option<&str>) -> Result<Vec<ServiceView>> {
        let net = match network {
            None => None,
            Some(n) => Some(self.cluster.network(n).await?),
        };
        let endpoints = self.cluster.all_endpoints().await?;
        Ok(self
            .cluster
            .services()
            .await?
            .into_iter()
            .filter(|s| net.as_ref().is_none_or(|n| n.id == s.network_id))
            .map(|s| self.service_view(s, &endpoints))
            .collect())
    }

    pub async fn service(&self, name: &str) -> Result<ServiceView> {
        let s = self.cluster.service(name).await?;
        let endpoints = self.cluster.all_endpoints().await?;
        Ok(self.service_view(s, &endpoints))
    }

    /// Publish `add` on the mesh and unpublish `rm` (host ports, with
    /// their protocol) of service `name`, live.
    pub async fn update_service_publish(
        &self,
        name: &str,
        add: &[MeshPortRequest],
        rm: &[(Proto, u16)],
    ) -> Result<ServiceView> {
        let _one_at_a_time = self.ports_lock.lock().await;
        let s = self.cluster.service(name).await?;
        for (proto, port) in rm {
            if !s.publish.iter().any(|p| p.proto == *proto && p.host_port == *port) {
                return Err(AgentError::InvalidArgument(format!(
                    "service {name:?} is not published on {port}/{}; it is on: {}",
                    proto.as_str(),
                    published_text(&s.publish)
                )));
            }
        }
        let kept: Vec<MeshPort> = s.publish.iter().filter(|p| !rm.contains(&(p.proto, p.host_port))).copied().collect();
        let internal = self.cluster.network(&s.network_id).await?.internal;
        let added = self.mesh_ports(&s, internal, &kept, add).await?;
        let mut publish = kept;
        publish.extend(added);
        let rec = self.cluster.set_service_publish(name, publish).await?;
        drop(_one_at_a_time);
        self.converge().await?;
        let endpoints = self.cluster.all_endpoints().await?;
        Ok(self.service_view(rec, &endpoints))
    }

    /// The mesh ports for `requests` of service `s` (which keeps `kept`):
    /// checked, and picked where no host port is given. A host port is
    /// refused, naming its holder, when another service has it on the
    /// mesh, an endpoint of any host has it published (`-p`), or a process
    /// of this host holds it.
    async fn mesh_ports(
        &self,
        s: &ServiceRecord,
        internal: bool,
        kept: &[MeshPort],
        requests: &[MeshPortRequest],
    ) -> Result<Vec<MeshPort>> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        if internal {
            return Err(AgentError::InvalidArgument(format!(
                "network {:?} is internal: nothing outside it reaches it, so service {:?} cannot be published",
                s.network, s.name
            )));
        }
        if s.mode == ServiceMode::Dnsrr {
            return Err(AgentError::InvalidArgument(format!(
                "service {:?} is in dnsrr mode: the mesh balances over a VIP's backends; create it in vip mode to publish it",
                s.name
            )));
        }
        let claims = self.cluster.mesh_claims().await?;
        let endpoints = self.cluster.endpoints().await?;
        let mut chosen: Vec<MeshPort> = Vec::new();
        for r in requests {
            if r.port == 0 {
                return Err(AgentError::InvalidArgument("published port 0: the service's port is required".into()));
            }
            if !s.ports.is_empty() && !s.ports.iter().any(|p| p.port == r.port && p.proto == r.proto) {
                let have: Vec<String> = s.ports.iter().map(|p| format!("{}/{}", p.port, p.proto.as_str())).collect();
                return Err(AgentError::InvalidArgument(format!(
                    "service {:?} has no port {}/{} to publish (its ports: {})",
                    s.name,
                    r.port,
                    r.proto.as_str(),
                    have.join(", ")
                )));
            }
            let taken = |host_port: u16, chosen: &[MeshPort]| -> Option<String> {
                if let Some(other) = claims.get(&(r.proto, host_port)).filter(|o| **o != s.name) {
                    return Some(format!("service {other:?} (on the mesh)"));
                }
                if kept.iter().chain(chosen).any(|p| p.proto == r.proto && p.host_port == host_port) {
                    return Some(format!("service {:?} itself (given twice)", s.name));
                }
                endpoints.iter().filter(|e| !e.deleting).find_map(|e| {
                    e.ports.iter().find(|p| p.proto == r.proto && p.host_port == host_port).map(|p| {
                        format!(
                            "Trellis endpoint {:?} on host {} (network {:?}), published as {p}",
                            e.name, e.host, e.network
                        )
                    })
                })
            };
            let host_port = if r.host_port != 0 {
                let why = match taken(r.host_port, &chosen) {
                    Some(why) => Some(why),
                    None => self.host_port_holder(r.proto, r.host_port).await?,
                };
                if let Some(why) = why {
                    return Err(AgentError::AlreadyExists(format!(
                        "port {}/{} cannot be published on the mesh: it is taken by {why}; nothing was published",
                        r.host_port,
                        r.proto.as_str()
                    )));
                }
                r.host_port
            } else {
                let (lo, hi) = (*MESH_PORTS.start() as u32, *MESH_PORTS.end() as u32);
                let span = hi - lo + 1;
                let start = rand::random::<u32>() % span;
                let mut found = None;
                for i in 0..span {
                    let p = (lo + (start + i) % span) as u16;
                    if taken(p, &chosen).is_none() && self.host_port_holder(r.proto, p).await?.is_none() {
                        found = Some(p);
                        break;
                    }
                }
                found.ok_or_else(|| {
                    AgentError::Unavailable(format!(
                        "no free mesh port for {}/{} in {lo}-{hi}",
                        r.port,
                        r.proto.as_str()
                    ))
                })?
            };
            chosen.push(MeshPort { proto: r.proto, host_port, port: r.port, mode: r.mode });
        }
        Ok(chosen)
    }

    /// The process of this host holding `port`, if any.
    async fn host_port_holder(&self, proto: Proto, port: u16) -> Result<Option<String>> {
        let dp = self.dataplane.clone();
        tokio::task::spawn_blocking(move || dp.port_holder(proto, port, None))
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?
            .map_err(|e| AgentError::Internal(format!("checking host port {port}: {e}")))
    }

    pub async fn remove_service(&self, name: &str) -> Result<()> {
        self.cluster.remove_service(name).await?;
        self.converge().await?;
        Ok(())
    }

    fn service_view(&self, s: ServiceRecord, endpoints: &[EndpointRecord]) -> ServiceView {
        let tables = self.reconciler.seen().tables;
        let id = s.datapath_id();
        let backends = endpoints
            .iter()
            .filter_map(|e| Some((e, s.backend_state(e)?)))
            .map(|(e, state)| {
                let programmed = match (id, e.ip) {
                    (Some(id), std::net::IpAddr::V4(v4)) => {
                        tables.backends.contains_key(&trellis_ebpf::BackendKey { svc_id: id, ip: trellis_ebpf::be(v4) })
                    }
                    _ => false,
                };
                BackendView { endpoint: e.clone(), state, programmed }
            })
            .collect();
        let stats = id.and_then(|id| self.dataplane.service_stats(id)).unwrap_or_default();
        ServiceView { service: s, backends, stats }
    }
}

/// `8080:80/tcp, 8443:443/tcp` (or "nothing").
pub fn published_text(ps: &[MeshPort]) -> String {
    if ps.is_empty() {
        return "nothing".into();
    }
    ps.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::testing::{attachable, lab};
    use crate::model::ServicePort;

    fn svc(name: &str, ports: Vec<ServicePort>) -> CreateService {
        published(name, ports, vec![])
    }

    fn published(name: &str, ports: Vec<ServicePort>, publish: Vec<MeshPortRequest>) -> CreateService {
        CreateService {
            service: NewService {
                name: name.into(),
                network: "n".into(),
                mode: ServiceMode::Vip,
                ports,
                selector: Default::default(),
                publish: vec![],
            },
            publish,
        }
    }

    #[tokio::test]
    async fn services_are_validated_then_created_with_a_vip() {
        let l = lab();
        l.app.create_network(attachable("n", Some("10.8.0.0/24"))).await.unwrap();
        let p80 = ServicePort { port: 80, proto: Proto::Tcp, target: 80 };
        for (bad, why) in [(svc("web", vec![p80, p80]), "given twice"), (svc("-web", vec![p80]), "service name")] {
            let err = l.app.create_service(bad).await.unwrap_err();
            assert!(matches!(err, AgentError::InvalidArgument(_)) && err.to_string().contains(why), "{err}");
        }
        let v = l.app.create_service(svc("web", vec![p80])).await.unwrap();
        assert!(v.service.vip.is_some_and(|ip| "10.8.0.0/24".parse::<ipnet::IpNet>().unwrap().contains(&ip)));
        assert!(v.backends.is_empty());
        assert_eq!(l.app.services(Some("n")).await.unwrap().len(), 1);
        l.app.remove_service("web").await.unwrap();
        // Without --port: a VIP on every port.
        let any = l.app.create_service(svc("any", vec![])).await.unwrap();
        assert!(any.service.vip.is_some() && any.service.ports.is_empty());
        assert!(matches!(l.app.service("web").await.unwrap_err(), AgentError::NotFound(_)));
    }

    /// A service on a dual-stack network gets an IPv6 VIP too (the top of
    /// the IPv6 subnet below its anycast addresses), taken in the same
    /// transaction, each service its own; removing the service gives both
    /// back; a v4-only network's service has none.
    #[tokio::test]
    async fn a_dual_stack_networks_service_gets_an_ipv6_vip_and_gives_it_back() {
        let l = lab();
        let mut req = attachable("n", Some("10.8.1.0/24"));
        req.subnet6 = Some("fd00:81::/64".parse().unwrap());
        let net = l.app.create_network(req).await.unwrap();
        let taken = || async { l.app.cluster.ipam.addresses(&net.id).await.unwrap().len() };
        let before = taken().await;
        let p80 = ServicePort { port: 80, proto: Proto::Tcp, target: 80 };
        let web = l.app.create_service(svc("web", vec![p80])).await.unwrap().service;
        let api = l.app.create_service(svc("api", vec![p80])).await.unwrap().service;
        let vip6 = |s: &crate::model::ServiceRecord| s.vip6.map(|v| v.to_string());
        assert_eq!(vip6(&web).as_deref(), Some("fd00:81::ffff:ffff:ffff:ff7f"));
        assert_eq!(vip6(&api).as_deref(), Some("fd00:81::ffff:ffff:ffff:ff7e"), "each its own");
        assert!(web.vip.is_some_and(|v| v.is_ipv4()));
        assert_eq!(taken().await, before + 4, "two VIPs each");
        assert_eq!(l.app.service("web").await.unwrap().service.vip6, web.vip6, "stored with the record");
        l.app.remove_service("web").await.unwrap();
        assert_eq!(taken().await, before + 2, "both of web's back");
        let again = l.app.create_service(svc("web", vec![p80])).await.unwrap().service;
        assert_eq!(again.vip6, web.vip6, "the freed one is the top again");
        l.app.create_network(attachable("v4", Some("10.8.2.0/24"))).await.unwrap();
        let mut v4 = svc("only4", vec![p80]);
        v4.service.network = "v4".into();
        assert_eq!(l.app.create_service(v4).await.unwrap().service.vip6, None);
    }

    /// On an IPv6-only network a VIP service is refused saying why (and
    /// what to do instead); a dnsrr one is made, with no VIP.
    #[tokio::test]
    async fn an_ipv6_only_network_takes_dnsrr_services_and_refuses_vips() {
        let l = lab();
        l.app.create_network(attachable("n", Some("fd00:82::/64"))).await.unwrap();
        let p80 = ServicePort { port: 80, proto: Proto::Tcp, target: 80 };
        let err = l.app.create_service(svc("web", vec![p80])).await.unwrap_err();
        assert!(matches!(err, AgentError::FailedPrecondition(_)), "{err}");
        assert!(err.to_string().contains("IPv6-only") && err.to_string().contains("dnsrr"), "{err}");
        assert!(matches!(l.app.service("web").await.unwrap_err(), AgentError::NotFound(_)), "nothing half-made");
        let mut rr = svc("rr", vec![]);
        rr.service.mode = ServiceMode::Dnsrr;
        let made = l.app.create_service(rr).await.unwrap().service;
        assert_eq!((made.vip, made.vip6), (None, None));
    }

    /// Register host `id` (underlay `ip`, eBPF or not) in `store`, as its
    /// agent would.
    async fn register(store: &std::sync::Arc<dyn trellis_store::Store>, id: &str, ip: &str, ebpf: bool) {
        let rec = crate::model::HostRecord {
            id: id.into(),
            hostname: id.into(),
            underlay: ip.parse().unwrap(),
            vtep_mac: crate::model::Mac([2, 0, 0, 0, 0, 1]),
            vxlan_port: 4789,
            capabilities: [("ebpf".to_string(), ebpf)].into(),
            version: "test".into(),
            started_unix: 0,
            underlay_mtu: 0,
        };
        let value = serde_json::to_vec(&rec).unwrap();
        store.txn(vec![], vec![trellis_store::Op::put(crate::model::host_key(id), value)]).await.unwrap();
    }

    #[tokio::test]
    async fn publishing_gives_each_host_a_mesh_address_released_after_its_veth() {
        use crate::app::testing::mesh_host;
        let store: std::sync::Arc<dyn trellis_store::Store> = std::sync::Arc::new(trellis_store::LocalStore::memory());
        register(&store, "h1", "198.19.0.1", false).await;
        register(&store, "h2", "198.19.0.2", false).await;
        let h1 = mesh_host(store.clone(), "h1", "198.19.0.1", false);
        let h2 = mesh_host(store.clone(), "h2", "198.19.0.2", false);
        h1.app.create_network(attachable("n", Some("10.8.1.0/24"))).await.unwrap();
        let mut req = crate::app::AttachRequest::new("n", crate::model::EndpointKind::Adhoc);
        req.labels.insert(crate::model::SERVICE_LABEL.into(), "web".into());
        h2.app.attach(req).await.unwrap();
        let publish =
            vec![MeshPortRequest { proto: Proto::Tcp, host_port: 30080, port: 80, mode: PublishMode::Ingress }];
        let p80 = ServicePort { port: 80, proto: Proto::Tcp, target: 8080 };
        h1.app.create_service(published("web", vec![p80], publish)).await.unwrap();
        // The request's own converge allocated h1's address and programmed
        // it: the record, the IPAM's address, the veth, the rules.
        let mine = h1.app.cluster.mesh_addrs_of("h1").await.unwrap();
        assert_eq!(mine.len(), 1, "{mine:?}");
        let net = h1.app.cluster.network("n").await.unwrap();
        let ipam = h1.app.cluster.ipam.addresses(&net.id).await.unwrap();
        let owner = ipam.iter().find(|(ip, _)| *ip == mine[0].ip).map(|(_, r)| r.clone()).unwrap();
        assert_eq!((owner.owner.as_str(), owner.host.as_str()), ("mesh:h1", "h1"));
        let port = crate::model::mesh_port_name(&net.id);
        assert!(h1.dp.with_state(|o| o.links.contains_key(&port) && o.egress.is_some()));
        let status = h1.app.status().await;
        assert_eq!(status.mesh_datapath, "nftables");
        assert_eq!(
            status.mesh_addresses,
            vec![("n".to_string(), mine[0].ip.to_string(), crate::model::mesh_ifname(&net.id))]
        );
        // h2 gets its own, and h1's entries in its device.
        h2.app.converge().await.unwrap();
        let theirs = h2.app.cluster.mesh_addrs_of("h2").await.unwrap();
        assert_eq!(theirs.len(), 1);
        assert_ne!(theirs[0].ip, mine[0].ip);
        h2.app.converge().await.unwrap();
        let vx = crate::model::vxlan_name(&net.id);
        assert!(h2.dp.with_state(|o| o.links[&vx].neigh.contains(&(mine[0].ip, mine[0].mac))));
        // Unpublished: the veth goes in the pass, the address after it.
        h1.app.update_service_publish("web", &[], &[(Proto::Tcp, 30080)]).await.unwrap();
        assert!(h1.app.cluster.mesh_addrs_of("h1").await.unwrap().is_empty());
        assert!(!h1.app.cluster.ipam.addresses(&net.id).await.unwrap().iter().any(|(ip, _)| *ip == mine[0].ip));
        assert!(h1.dp.with_state(|o| !o.links.contains_key(&port)));
        let deleted = h1
            .dp
            .take_log()
            .iter()
            .position(|a| matches!(a, crate::dataplane::Action::DeleteLink { name } if *name == port));
        assert!(deleted.is_some(), "the veth was deleted by a pass");
    }

    #[tokio::test]
    async fn a_dead_host_s_mesh_address_is_reclaimed_with_it() {
        use crate::app::testing::mesh_host;
        let store: std::sync::Arc<dyn trellis_store::Store> = std::sync::Arc::new(trellis_store::LocalStore::memory());
        register(&store, "h1", "198.19.0.1", false).await;
        let h1 = mesh_host(store.clone(), "h1", "198.19.0.1", false);
        h1.app.create_network(attachable("n", Some("10.8.2.0/24"))).await.unwrap();
        let net = h1.app.cluster.network("n").await.unwrap();
        // h2 took an address and died (no host record: its lease expired).
        let h2 = crate::state::Cluster::new(store.clone(), "h2", "10.0.0.0/8".parse().unwrap(), 24);
        assert!(h2.sync_mesh_addrs(&[net.id.clone()].into(), &[]).await.unwrap());
        let theirs = h2.mesh_addrs_of("h2").await.unwrap();
        assert_eq!(theirs.len(), 1);
        assert!(
            crate::state::absent_owners(&h1.informer.current().await.unwrap(), &Default::default(), "h1")
                .contains("h2")
        );
        h1.app.cluster.reclaim_host("h2").await.unwrap();
        assert!(h1.app.cluster.mesh_addrs().await.unwrap().is_empty());
        assert!(!h1.app.cluster.ipam.addresses(&net.id).await.unwrap().iter().any(|(ip, _)| *ip == theirs[0].ip));
        assert!(
            !crate::state::absent_owners(&h1.informer.current().await.unwrap(), &Default::default(), "h1")
                .contains("h2")
        );
    }

    #[tokio::test]
    async fn a_full_network_says_why_the_host_has_no_mesh_address() {
        use crate::app::testing::mesh_host;
        let store: std::sync::Arc<dyn trellis_store::Store> = std::sync::Arc::new(trellis_store::LocalStore::memory());
        register(&store, "h1", "198.19.0.1", false).await;
        let h1 = mesh_host(store.clone(), "h1", "198.19.0.1", false);
        // A /30: the gateway and one address, which the VIP takes.
        h1.app.create_network(attachable("tiny", Some("10.8.3.0/30"))).await.unwrap();
        let mut req = published(
            "web",
            vec![],
            vec![MeshPortRequest { proto: Proto::Tcp, host_port: 30081, port: 80, mode: PublishMode::Ingress }],
        );
        req.service.network = "tiny".into();
        h1.app.create_service(req).await.unwrap();
        let status = h1.app.status().await;
        assert!(status.mesh_addresses.is_empty());
        assert!(
            status.mesh_warnings.iter().any(|w| w.contains("\"tiny\"") && w.contains("no free address")),
            "{:?}",
            status.mesh_warnings
        );
        // Removed: nothing to warn of any more.
        h1.app.remove_service("web").await.unwrap();
        assert!(h1.app.status().await.mesh_warnings.is_empty());
    }
}
