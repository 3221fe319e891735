//! Services: a name on a network and the endpoints its selector matches,
//! behind a VIP the eBPF datapath balances (or DNS round robin).

use super::{AgentError, App, Result};
use crate::model::{EndpointRecord, ServiceRecord};
use crate::state::NewService;

/// A service with its backends (every endpoint its selector matches) and
/// this host's view of them.
#[derive(Clone, Debug)]
pub struct ServiceView {
    pub service: ServiceRecord,
    /// Each backend, and whether this host's datapath has it programmed.
    pub backends: Vec<(EndpointRecord, bool)>,
    pub stats: trellis_ebpf::SvcStats,
}

impl App {
    pub async fn create_service(&self, new: NewService) -> Result<ServiceView> {
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
        let rec = self.cluster.create_service(new).await?;
        self.converge().await?;
        let endpoints = self.cluster.endpoints().await?;
        Ok(self.service_view(rec, &endpoints))
    }

    /// Every service (of one network).
    pub async fn services(&self, network: Option<&str>) -> Result<Vec<ServiceView>> {
        let net = match network {
            None => None,
            Some(n) => Some(self.cluster.network(n).await?),
        };
        let endpoints = self.cluster.endpoints().await?;
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
        let endpoints = self.cluster.endpoints().await?;
        Ok(self.service_view(s, &endpoints))
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
            .filter(|e| s.selects(e))
            .map(|e| {
                let programmed = match (id, e.ip) {
                    (Some(id), std::net::IpAddr::V4(v4)) => {
                        tables.backends.contains_key(&trellis_ebpf::BackendKey { svc_id: id, ip: trellis_ebpf::be(v4) })
                    }
                    _ => false,
                };
                (e.clone(), programmed)
            })
            .collect();
        let stats = id.and_then(|id| self.dataplane.service_stats(id)).unwrap_or_default();
        ServiceView { service: s, backends, stats }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::testing::{attachable, lab};
    use crate::model::{Proto, ServiceMode, ServicePort};

    fn svc(name: &str, ports: Vec<ServicePort>) -> NewService {
        NewService {
            name: name.into(),
            network: "n".into(),
            mode: ServiceMode::Vip,
            ports,
            selector: Default::default(),
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
}
