//! The Docker driver's records in the store: per host, the Docker networks
//! bound to cluster networks, the pools its IPAM driver handed out and the
//! Docker endpoints with their Trellis endpoint; cluster-wide, the subnets
//! reserved for pools not yet bound. Kept in the store so that an agent
//! restart loses nothing. Keys: [`crate::model::keys`].

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use trellis_ipam::{AddrRequest, Pool, RESERVED};
use trellis_store::{Compare, Op, Store};

use super::{AgentError, Cluster, Result};
use crate::model::{self, NetworkRecord};

/// A Docker network on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerNet {
    pub docker_id: String,
    pub pool: IpNet,
    pub gateway: Option<IpAddr>,
    /// The user gave --subnet (else the pool was chosen by the driver).
    pub user_subnet: bool,
    /// The IPv6 pool of a network created with `--ipv6`.
    #[serde(default)]
    pub pool6: Option<IpNet>,
    #[serde(default)]
    pub gateway6: Option<IpAddr>,
    /// The user gave an IPv6 --subnet.
    #[serde(default)]
    pub user_subnet6: bool,
    pub attachable: bool,
    pub internal: bool,
    pub encrypted: bool,
    pub mtu: u32,
    /// Name given with `-o trellis.network=`, else learned from the engine.
    pub name: Option<String>,
    /// The cluster network, once bound.
    pub network_id: Option<String>,
}

/// A pool the IPAM driver handed out on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerPool {
    pub subnet: IpNet,
    pub user_subnet: bool,
}

/// A Docker endpoint on this host, and its Trellis endpoint once joined.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerEp {
    pub docker_id: String,
    pub docker_net: String,
    pub ip: IpAddr,
    /// Its IPv6 address, on a network created with `--ipv6`.
    #[serde(default)]
    pub ip6: Option<IpAddr>,
    pub endpoint_id: Option<String>,
}

/// One host's Docker driver records.
pub struct DockerRecords {
    store: Arc<dyn Store>,
    host: String,
}

impl DockerRecords {
    pub fn new(store: Arc<dyn Store>, host: &str) -> DockerRecords {
        DockerRecords { store, host: host.to_string() }
    }

    async fn load<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.store.get(key).await? {
            Some(kv) => serde_json::from_slice(&kv.value)
                .map(Some)
                .map_err(|e| AgentError::Internal(format!("corrupt record {key}: {e}"))),
            None => Ok(None),
        }
    }

    async fn save<T: Serialize>(&self, key: String, v: &T) -> Result<()> {
        let bytes = serde_json::to_vec(v).expect("records serialize");
        self.store.txn(vec![], vec![Op::put(key, bytes)]).await?;
        Ok(())
    }

    async fn delete(&self, key: String) -> Result<()> {
        self.store.txn(vec![], vec![Op::delete(key)]).await?;
        Ok(())
    }

    async fn list<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>> {
        let (items, _) = self.store.list(prefix).await?;
        Ok(items.iter().filter_map(|kv| serde_json::from_slice(&kv.value).ok()).collect())
    }

    pub async fn net(&self, docker_id: &str) -> Result<Option<DockerNet>> {
        self.load(&model::docker_net_key(&self.host, docker_id)).await
    }
    pub async fn save_net(&self, n: &DockerNet) -> Result<()> {
        self.save(model::docker_net_key(&self.host, &n.docker_id), n).await
    }
    pub async fn delete_net(&self, docker_id: &str) -> Result<()> {
        self.delete(model::docker_net_key(&self.host, docker_id)).await
    }
    /// This host's Docker network whose pool (of either family) is `subnet`.
    pub async fn net_by_pool(&self, subnet: &IpNet) -> Result<Option<DockerNet>> {
        let prefix = format!("{}nets/", model::docker_host_prefix(&self.host));
        Ok(self.list::<DockerNet>(&prefix).await?.into_iter().find(|n| &n.pool == subnet || n.pool6 == Some(*subnet)))
    }
    /// Is a Docker network on any host bound to the cluster network `id`?
    pub async fn bound_anywhere(&self, network_id: &str) -> Result<bool> {
        let (all, _) = self.store.list(&model::docker_hosts_prefix()).await?;
        Ok(all.iter().any(|kv| {
            kv.key.contains("/nets/")
                && serde_json::from_slice::<DockerNet>(&kv.value)
                    .is_ok_and(|n| n.network_id.as_deref() == Some(network_id))
        }))
    }

    pub async fn pool(&self, subnet: &IpNet) -> Result<Option<DockerPool>> {
        self.load(&model::docker_pool_key(&self.host, subnet)).await
    }
    pub async fn save_pool(&self, p: &DockerPool) -> Result<()> {
        self.save(model::docker_pool_key(&self.host, &p.subnet), p).await
    }
    pub async fn delete_pool(&self, subnet: &IpNet) -> Result<()> {
        self.delete(model::docker_pool_key(&self.host, subnet)).await
    }

    pub async fn ep(&self, docker_id: &str) -> Result<Option<DockerEp>> {
        self.load(&model::docker_ep_key(&self.host, docker_id)).await
    }
    pub async fn save_ep(&self, e: &DockerEp) -> Result<()> {
        self.save(model::docker_ep_key(&self.host, &e.docker_id), e).await
    }
    pub async fn delete_ep(&self, docker_id: &str) -> Result<()> {
        self.delete(model::docker_ep_key(&self.host, docker_id)).await
    }
    /// This host's Docker endpoints.
    pub async fn eps(&self) -> Result<Vec<DockerEp>> {
        self.list::<DockerEp>(&format!("{}eps/", model::docker_host_prefix(&self.host))).await
    }
    /// This host's Docker endpoints of the Docker network `docker_net`.
    pub async fn eps_of(&self, docker_net: &str) -> Result<Vec<DockerEp>> {
        Ok(self.eps().await?.into_iter().filter(|e| e.docker_net == docker_net).collect())
    }

    /// Subnets reserved for pools not bound yet, by any host.
    pub async fn reserved_subnets(&self) -> Result<Vec<IpNet>> {
        let (reserved, _) = self.store.list(&model::docker_reserved_prefix()).await?;
        Ok(reserved
            .iter()
            .filter_map(|kv| kv.key.rsplit('/').next()?.replace('_', "/").parse::<IpNet>().ok())
            .collect())
    }
    /// Reserve `subnet` for this host; false if another reservation has it.
    pub async fn reserve_subnet(&self, subnet: &IpNet) -> Result<bool> {
        let key = model::docker_reserved_key(subnet);
        let done = self
            .store
            .txn(vec![Compare::Absent(key.clone())], vec![Op::put(key, self.host.clone().into_bytes())])
            .await?;
        Ok(done.succeeded)
    }
    /// Drop this host's reservation of `subnet` (another host's stays).
    pub async fn drop_reservation(&self, subnet: &IpNet) -> Result<()> {
        let key = model::docker_reserved_key(subnet);
        self.store
            .txn(vec![Compare::Value(key.clone(), self.host.clone().into_bytes())], vec![Op::delete(key)])
            .await?;
        Ok(())
    }
}

impl Cluster {
    /// The pool of `net` of `subnet`'s family (its IPv4 or IPv6 one).
    pub fn pool_of_family(net: &NetworkRecord, v6: bool) -> Result<Pool> {
        if !v6 {
            return Ok(Cluster::pool(net));
        }
        Cluster::pool6(net).ok_or_else(|| {
            AgentError::FailedPrecondition(format!(
                "Trellis network {:?} has no IPv6 subnet (it was created without one)",
                net.name
            ))
        })
    }

    /// Reserve an address in `net` for an endpoint Docker will create (its
    /// IPAM asks before the endpoint exists): the attach claims it. `v6`:
    /// from the network's IPv6 subnet.
    pub async fn reserve_address(&self, net: &NetworkRecord, v6: bool, request: AddrRequest) -> Result<IpAddr> {
        let pool = Self::pool_of_family(net, v6)?;
        Ok(self.ipam.allocate(&pool, request, RESERVED, |_| (vec![], vec![])).await?)
    }

    /// Release a reservation that no endpoint claimed (false: there was none).
    pub async fn release_reservation(&self, net: &NetworkRecord, ip: IpAddr) -> Result<bool> {
        let pool = Self::pool_of_family(net, ip.is_ipv6())?;
        Ok(self.ipam.release_reservation(&pool, ip).await?)
    }
}
