//! Networks: create (checked against the host's routes and underlay MTU),
//! remove (with `force`, the endpoints on it too), list, inspect, and an
//! encrypted network's key rotation.

use std::collections::BTreeMap;

use trellis_plugin_api::validate;

use super::{AgentError, App, Result};
use crate::model::NetworkRecord;
use crate::state::NewNetwork;

/// A network with its endpoint count and, encrypted, its key state.
#[derive(Clone, Debug)]
pub struct NetworkView {
    pub network: NetworkRecord,
    pub endpoints: u32,
    pub key: Option<KeyView>,
}

/// An encrypted network's key ring and its hosts' acks.
#[derive(Clone, Debug)]
pub struct KeyView {
    pub ring: trellis_ipsec::KeyRing,
    pub acks: BTreeMap<String, trellis_ipsec::Ack>,
}

impl App {
    /// Create a network (on every host: each makes its bridge in its next
    /// pass) and converge this host.
    pub async fn create_network(&self, new: NewNetwork) -> Result<NetworkRecord> {
        validate::name("network name", &new.name)?;
        if let (Some(gw), None) = (new.gateway, new.subnet) {
            return Err(AgentError::InvalidArgument(if new.subnet6.is_some() {
                format!(
                    "gateway {gw} is an IPv4 address: the network is IPv6-only (give an IPv4 --subnet for dual stack)"
                )
            } else {
                format!("--gateway {gw} needs a --subnet of its family")
            }));
        }
        validate::mtu(new.mtu)?;
        validate::labels(&new.labels)?;
        let routes = self.dataplane.host_routes().await.map_err(|e| AgentError::Internal(e.to_string()))?;
        let underlay = self.dataplane.underlay_mtu().await.map_err(|e| AgentError::Internal(e.to_string()))?;
        let net = self.cluster.create_network(new, &routes, underlay).await?;
        let report = self.converge().await?;
        if !report.errors.is_empty() {
            tracing::warn!(errors = ?report.errors, "reconcile after network create reported errors");
        }
        Ok(net)
    }

    /// Remove a network; with `force`, its endpoints first. Returns how
    /// many endpoints went with it.
    pub async fn remove_network(&self, name: &str, force: bool) -> Result<usize> {
        let (_, removed) = self.cluster.remove_network(name, force).await?;
        self.converge().await?;
        for e in &removed {
            self.remove_managed(e);
        }
        Ok(removed.len())
    }

    pub async fn networks(&self) -> Result<Vec<NetworkView>> {
        let nets = self.cluster.networks().await?;
        let eps = self.cluster.endpoints().await?;
        Ok(nets
            .into_iter()
            .map(|n| {
                let endpoints = eps.iter().filter(|e| e.network_id == n.id).count() as u32;
                NetworkView { network: n, endpoints, key: None }
            })
            .collect())
    }

    /// One network, with its key state if it is encrypted.
    pub async fn network(&self, name: &str) -> Result<NetworkView> {
        let n = self.cluster.network(name).await?;
        self.view(n).await
    }

    /// Start a key rotation of an encrypted network (every host follows).
    pub async fn rotate_key(&self, name: &str) -> Result<NetworkView> {
        let (n, _) = self.cluster.rotate_key(name).await?;
        self.view(n).await
    }

    async fn view(&self, n: NetworkRecord) -> Result<NetworkView> {
        let endpoints = self.cluster.endpoints().await?.iter().filter(|e| e.network_id == n.id).count() as u32;
        let key = if n.encrypted {
            Some(KeyView { ring: self.cluster.key_status(&n).await?, acks: self.cluster.acks(&n.id).await? })
        } else {
            None
        };
        Ok(NetworkView { network: n, endpoints, key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::testing::lab;
    use crate::app::{AttachRequest, EndpointRef};
    use crate::model::{self, EndpointKind};

    fn new(name: &str) -> NewNetwork {
        crate::app::testing::attachable(name, None)
    }

    #[tokio::test]
    async fn a_network_gets_its_bridge_and_goes_with_its_endpoints_when_forced() {
        let l = lab();
        let n = l.app.create_network(new("app")).await.unwrap();
        assert!(l.dp.with_state(|s| s.links.contains_key(&model::bridge_name(&n.id))), "no bridge");
        let a = l.app.attach(AttachRequest::new("app", EndpointKind::Adhoc)).await.unwrap();
        let err = l.app.remove_network("app", false).await.unwrap_err();
        assert!(matches!(err, AgentError::FailedPrecondition(_)), "{err:?}");
        assert_eq!(l.app.remove_network("app", true).await.unwrap(), 1);
        assert!(l.dp.with_state(|s| !s.links.contains_key(&model::bridge_name(&n.id))), "the bridge is left");
        assert!(!l.dp.namespaces.lock().unwrap().contains(&a.endpoint.netns), "the managed namespace is left");
        let gone = l.app.find(EndpointRef::Name { endpoint: &a.endpoint.id, network: None }).await.unwrap_err();
        assert!(matches!(gone, AgentError::NotFound(_)), "{gone:?}");
    }

    #[tokio::test]
    async fn bad_networks_are_refused_before_anything_is_written() {
        let l = lab();
        let mut gw = new("gw");
        gw.gateway = Some("10.9.0.1".parse().unwrap());
        let mut mtu = new("mtu");
        mtu.mtu = 100;
        let mut labels = new("labels");
        labels.labels.insert("".into(), "x".into());
        for n in [new("bad name"), gw, mtu, labels] {
            let err = l.app.create_network(n.clone()).await.unwrap_err();
            assert!(matches!(err, AgentError::InvalidArgument(_)), "{}: {err:?}", n.name);
        }
        assert!(l.app.networks().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn networks_list_with_their_endpoint_counts() {
        let l = lab();
        l.app.create_network(new("a")).await.unwrap();
        l.app.create_network(new("b")).await.unwrap();
        l.app.attach(AttachRequest::new("b", EndpointKind::Adhoc)).await.unwrap();
        let views = l.app.networks().await.unwrap();
        let counts: Vec<(String, u32)> = views.iter().map(|v| (v.network.name.clone(), v.endpoints)).collect();
        assert_eq!(counts, vec![("a".to_string(), 0), ("b".to_string(), 1)]);
        assert!(l.app.network("a").await.unwrap().key.is_none(), "a plain network has no key state");
    }
}
