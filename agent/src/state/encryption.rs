//! Encrypted networks in the store: each has a key ring (created with the
//! network, in the same transaction) and the acks of the hosts carrying it.
//! Any agent may advance a ring's rotation ([`trellis_ipsec::rotation`]);
//! the compare-and-swap on the ring makes one win. Secrets never reach a
//! log: rings are printed by fingerprint only.

use std::collections::{BTreeMap, BTreeSet};

use trellis_ipsec::{Ack, ClusterKeys, KeyRing, Policy, Step, Triggers};
use trellis_store::{Compare, Op};

use crate::model::{self, EndpointRecord, NetworkRecord};
use crate::state::{AgentError, Cluster, Result, decode, encode};

/// How key rings are kept in the store: sealed under the cluster keys
/// ([`trellis_ipsec::sealed`]). A host without them can read no sealed
/// ring and seals none.
#[derive(Clone, Debug, Default)]
pub struct RingCodec(Option<std::sync::Arc<ClusterKeys>>);

impl RingCodec {
    pub fn new(keys: Option<ClusterKeys>) -> RingCodec {
        RingCodec(keys.map(std::sync::Arc::new))
    }

    pub fn keys(&self) -> Option<&ClusterKeys> {
        self.0.as_deref()
    }

    /// The bytes the store keeps for `ring` of network `network_id`.
    pub fn encode(&self, network_id: &str, ring: &KeyRing) -> Result<Vec<u8>> {
        match self.keys() {
            Some(k) => Ok(k.seal(network_id, ring)),
            None => Err(AgentError::FailedPrecondition(
                "this host has no cluster key (trellisd --cluster-key-file): it cannot seal a network's keys".into(),
            )),
        }
    }

    /// The ring of network `network_id` in `bytes`. A ring stored before
    /// rings were sealed is read as it is (`trellisctl cluster rotate-key`
    /// seals it).
    pub fn decode(&self, network_id: &str, bytes: &[u8]) -> std::result::Result<KeyRing, String> {
        match trellis_ipsec::sealed::sealed_by(bytes) {
            Ok(id) => match self.keys() {
                None => Err(format!(
                    "it is sealed under cluster key {id}, and this host has no cluster key (trellisd --cluster-key-file)"
                )),
                Some(k) => k.open(network_id, bytes).map(|(r, _)| r).map_err(|e| e.to_string()),
            },
            Err(_) => serde_json::from_slice::<KeyRing>(bytes).map_err(|e| e.to_string()),
        }
    }
}

impl Cluster {
    /// Refuse an encrypted network on a host whose kernel cannot do ESP.
    /// And on a host without the cluster key, which could neither seal
    /// nor read the network's keys.
    pub fn require_esp(&self, network: &str) -> Result<()> {
        if self.esp_unsupported.is_none() && self.codec.keys().is_none() {
            return Err(AgentError::FailedPrecondition(format!(
                "network {network:?} is encrypted, but this host has no cluster key (trellisd --cluster-key-file):                  network keys are kept in the store sealed under it, and without it this host can neither make                  nor read them. Nothing was created"
            )));
        }
        match &self.esp_unsupported {
            None => Ok(()),
            Some(why) => Err(AgentError::FailedPrecondition(format!(
                "network {network:?} is encrypted, but this host's kernel cannot do IPsec ESP ({why}); it needs \
                 CONFIG_INET_ESP and CONFIG_XFRM_USER with the rfc4106(gcm(aes)) AEAD. Nothing was created, and no \
                 cleartext was sent"
            ))),
        }
    }

    /// The lowest encrypted-network port no network holds.
    pub(crate) async fn free_esp_port(&self) -> Result<u16> {
        let (taken, _) = self.store.list(&model::esp_ports_prefix()).await?;
        let taken: BTreeSet<String> = taken.into_iter().map(|kv| kv.key).collect();
        model::ESP_PORTS.clone().find(|p| !taken.contains(&model::esp_port_key(*p))).ok_or_else(|| {
            AgentError::FailedPrecondition(format!(
                "every encrypted-network port ({}-{}) is taken: at most {} encrypted networks; remove one first",
                model::ESP_PORTS.start(),
                model::ESP_PORTS.end(),
                model::ESP_PORTS.len()
            ))
        })
    }

    /// Every encrypted network's key ring, by network id.
    pub async fn key_rings(&self) -> Result<BTreeMap<String, KeyRing>> {
        let (items, _) = self.store.list(&model::netkeys_prefix()).await?;
        items
            .iter()
            .map(|kv| {
                let id = kv.key.trim_start_matches(&model::netkeys_prefix()).to_string();
                let ring = self.codec.decode(&id, &kv.value).map_err(|e| {
                    AgentError::FailedPrecondition(format!("the key ring of network {id} cannot be read: {e}"))
                })?;
                Ok((id, ring))
            })
            .collect()
    }

    async fn key_ring(&self, net: &NetworkRecord) -> Result<(KeyRing, trellis_store::Revision)> {
        let key = model::netkey_key(&net.id);
        let kv =
            self.store.get(&key).await?.ok_or_else(|| {
                AgentError::Internal(format!("encrypted network {:?} has no key ring ({key})", net.name))
            })?;
        let ring = self.codec.decode(&net.id, &kv.value).map_err(|e| {
            AgentError::FailedPrecondition(format!("the key ring of network {:?} cannot be read: {e}", net.name))
        })?;
        Ok((ring, kv.mod_revision))
    }

    /// Seal every key ring again under this host's current cluster key
    /// (`trellisctl cluster rotate-key`), once every live host holds that
    /// key: (sealed again, already under it).
    pub async fn reseal_key_rings(&self) -> Result<(usize, usize)> {
        let Some(keys) = self.codec.keys() else {
            return Err(AgentError::FailedPrecondition(
                "this host has no cluster key (trellisd --cluster-key-file): it cannot seal key rings".into(),
            ));
        };
        let current = keys.current().to_string();
        let lacking: Vec<String> = crate::state::hosts::live_hosts(self.store.as_ref())
            .await?
            .into_iter()
            .filter(|h| !h.capabilities.get(&model::cluster_key_capability(&current)).copied().unwrap_or(false))
            .map(|h| h.id)
            .collect();
        if !lacking.is_empty() {
            return Err(AgentError::FailedPrecondition(format!(
                "not every live host holds cluster key {current} yet ({}): add it as the first line of their \
                 --cluster-key-file and restart their agents (a restart loses no packet), then try again; nothing \
                 was changed",
                lacking.join(", ")
            )));
        }
        let (items, _) = self.store.list(&model::netkeys_prefix()).await?;
        let (mut resealed, mut already) = (0, 0);
        for kv in items {
            let id = kv.key.trim_start_matches(&model::netkeys_prefix()).to_string();
            if trellis_ipsec::sealed::sealed_by(&kv.value).is_ok_and(|by| by == current) {
                already += 1;
                continue;
            }
            let ring = self.codec.decode(&id, &kv.value).map_err(|e| {
                AgentError::FailedPrecondition(format!("the key ring of network {id} cannot be read: {e}"))
            })?;
            let sealed = keys.seal(&id, &ring);
            let done = self
                .store
                .txn(vec![Compare::ModRevision(kv.key.clone(), kv.mod_revision)], vec![Op::put(kv.key, sealed)])
                .await?;
            if !done.succeeded {
                return Err(AgentError::Unavailable(format!(
                    "the key ring of network {id} changed meanwhile (a key rotation step); try again"
                )));
            }
            resealed += 1;
        }
        tracing::info!(key = %current, resealed, already, "key rings sealed under the current cluster key");
        Ok((resealed, already))
    }

    pub async fn acks(&self, network_id: &str) -> Result<BTreeMap<String, Ack>> {
        let prefix = model::netkey_acks_prefix(network_id);
        let (items, _) = self.store.list(&prefix).await?;
        items
            .iter()
            .map(|kv| decode(&kv.key, &kv.value).map(|a| (kv.key.trim_start_matches(&prefix).to_string(), a)))
            .collect()
    }

    /// Record what this host's kernel has for a network's keys.
    pub async fn write_ack(&self, network_id: &str, ack: Ack) -> Result<()> {
        let key = model::netkey_ack_key(network_id, &self.host);
        self.store.txn(vec![], vec![Op::put(key, encode(&ack))]).await?;
        Ok(())
    }

    /// Write the acks of a pass that changed since the last written.
    pub async fn publish_acks(&self, acks: &BTreeMap<String, Ack>) {
        for (net, ack) in acks {
            if self.acked.lock().unwrap_or_else(|p| p.into_inner()).get(net) == Some(ack) {
                continue;
            }
            match self.write_ack(net, *ack).await {
                Ok(()) => {
                    tracing::debug!(network = %net, rx = ack.rx, tx = ack.tx, "keys installed");
                    self.acked.lock().unwrap_or_else(|p| p.into_inner()).insert(net.clone(), *ack);
                }
                Err(e) => tracing::warn!(network = %net, error = %e, "recording installed keys"),
            }
        }
    }

    /// Advance `net`'s ring by `step`, if it still is as read (`rev`).
    async fn advance(
        &self,
        net: &NetworkRecord,
        ring: &KeyRing,
        rev: trellis_store::Revision,
        step: Step,
    ) -> Result<KeyRing> {
        let next = ring.apply(step, trellis_ipsec::Secret::generate, model::now_ms());
        let key = model::netkey_key(&net.id);
        let sealed = self.codec.encode(&net.id, &next)?;
        let done = self.store.txn(vec![Compare::ModRevision(key.clone(), rev)], vec![Op::put(key, sealed)]).await?;
        if !done.succeeded {
            return Err(AgentError::Unavailable(format!(
                "the key ring of network {:?} changed meanwhile; try again",
                net.name
            )));
        }
        tracing::info!(network = %net.name, ?step, tx = next.tx, epochs = next.keys.len(), "key ring advanced");
        Ok(next)
    }

    /// Start a rotation of `net`'s key now (`trellisctl network rotate-key`).
    pub async fn rotate_key(&self, name: &str) -> Result<(NetworkRecord, KeyRing)> {
        let net = self.network(name).await?;
        if !net.encrypted {
            return Err(AgentError::FailedPrecondition(format!(
                "network {:?} is not encrypted: it has no key",
                net.name
            )));
        }
        let (ring, rev) = self.key_ring(&net).await?;
        if ring.rotating() {
            return Err(AgentError::FailedPrecondition(format!(
                "network {:?} is already rotating its key (epoch {} → {}); wait for it to finish",
                net.name,
                ring.tx,
                ring.newest()
            )));
        }
        let step = Step::Rotate { epoch: ring.newest() + 1, reason: trellis_ipsec::Reason::OnDemand };
        let next = self.advance(&net, &ring, rev, step).await?;
        Ok((net, next))
    }

    /// The ring of an encrypted network as it is now.
    pub async fn key_status(&self, net: &NetworkRecord) -> Result<KeyRing> {
        Ok(self.key_ring(net).await?.0)
    }

    /// Take every encrypted network's rotation one step further where one
    /// is due. `members` of a network are the live hosts with endpoints on
    /// it; `seq_exhausted` names networks whose outbound SAs on this host
    /// passed the sequence-number threshold.
    pub async fn drive_rotations(
        &self,
        policy: &Policy,
        seq_exhausted: &BTreeSet<String>,
    ) -> Result<Vec<(String, Step)>> {
        let nets: Vec<NetworkRecord> = self.networks().await?.into_iter().filter(|n| n.encrypted).collect();
        if nets.is_empty() {
            return Ok(vec![]);
        }
        let live: BTreeSet<String> =
            crate::state::hosts::live_hosts(self.store.as_ref()).await?.into_iter().map(|h| h.id).collect();
        let endpoints: Vec<EndpointRecord> = self.endpoints().await?;
        let mut done = Vec::new();
        for net in nets {
            let members: BTreeSet<String> = endpoints
                .iter()
                .filter(|e| e.network_id == net.id && live.contains(&e.host))
                .map(|e| e.host.clone())
                .collect();
            let (ring, rev) = self.key_ring(&net).await?;
            let acks = self.acks(&net.id).await?;
            let triggers = Triggers { requested: false, seq_exhausted: seq_exhausted.contains(&net.id) };
            if let Some(step) = ring.next_step(&members, &acks, model::now_ms(), policy, triggers) {
                match self.advance(&net, &ring, rev, step).await {
                    Ok(_) => done.push((net.name.clone(), step)),
                    // Another agent took the step first.
                    Err(AgentError::Unavailable(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(done)
    }
}

/// Networks (by id) with an outbound SA on this host that has sent at least
/// `threshold` packets.
pub fn exhausted_networks(
    nets: &[NetworkRecord],
    seen: &trellis_ipsec::ObservedXfrm,
    threshold: u64,
) -> BTreeSet<String> {
    let by_reqid: BTreeMap<u32, &str> =
        nets.iter().filter_map(|n| n.vxlan_port.map(|p| (trellis_ipsec::xfrm::reqid(p), n.id.as_str()))).collect();
    seen.sas
        .values()
        .filter(|sa| sa.oseq >= threshold)
        .filter_map(|sa| by_reqid.get(&sa.reqid).map(|id| id.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{NewEndpoint, NewNetwork};
    use std::sync::Arc;
    use trellis_ipsec::Reason;
    use trellis_store::Store;

    const KEY_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const KEY_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn cluster(esp: bool) -> Cluster {
        let store: Arc<dyn Store> = Arc::new(trellis_store::LocalStore::memory());
        let mut c = host_of(store, "h1", Some(KEY_A));
        if !esp {
            c.esp_unsupported = Some("adding an ESP SA failed: Protocol not supported".into());
        }
        c
    }

    /// Host `id` of the cluster in `store`, with the cluster key file `keys`.
    fn host_of(store: Arc<dyn Store>, id: &str, keys: Option<&str>) -> Cluster {
        let mut c = Cluster::new(store, id, "10.0.0.0/8".parse().unwrap(), 24);
        c.codec = RingCodec::new(keys.map(|k| ClusterKeys::parse(k).unwrap()));
        c
    }

    async fn register(c: &Cluster, id: &str, keys: &[&str]) {
        let rec = crate::model::HostRecord {
            id: id.into(),
            hostname: id.into(),
            underlay: "192.0.2.1".parse().unwrap(),
            vtep_mac: "02:00:00:00:00:01".parse().unwrap(),
            vxlan_port: 4789,
            capabilities: keys.iter().map(|k| (model::cluster_key_capability(k), true)).collect(),
            version: "t".into(),
            started_unix: 0,
            underlay_mtu: 0,
        };
        crate::state::hosts::register(c.store.as_ref(), &rec, std::time::Duration::from_secs(30)).await.unwrap();
    }

    #[tokio::test]
    async fn key_rings_are_sealed_at_rest_and_a_host_without_the_cluster_key_refuses_encrypted_networks() {
        let c = cluster(true);
        let net = c.create_network(encrypted("sec"), &[], 1500).await.unwrap();
        let ring = c.key_rings().await.unwrap().remove(&net.id).unwrap();
        // What someone who reads the store sees: no secret of the ring.
        let (items, _) = c.store.list(model::ROOT).await.unwrap();
        let raw: String = items.iter().map(|kv| String::from_utf8_lossy(&kv.value).into_owned()).collect();
        let secrets: Vec<String> =
            serde_json::to_string(&ring).unwrap().split('"').filter(|s| s.len() == 64).map(str::to_string).collect();
        assert!(!secrets.is_empty());
        for secret in &secrets {
            assert!(!raw.contains(&secret[..16]), "a network secret is in the store");
        }
        // The informer reads it with the key, and leaves it out without.
        let listed = || items.iter().filter(|kv| kv.key.starts_with(&model::netkeys_prefix())).cloned().collect();
        let mut with = crate::state::informer::Records::listed_with(listed(), 9, c.codec.clone());
        assert_eq!(with.view(9).keys.get(&net.id), Some(&ring));
        let mut without = crate::state::informer::Records::listed(listed(), 9);
        assert!(without.view(9).keys.is_empty());
        assert_eq!(without.corrupt, 1);
        // A host without the cluster key neither creates nor joins one.
        let other = host_of(c.store.clone(), "h2", None);
        let err = other.create_network(encrypted("sec2"), &[], 1500).await.unwrap_err().to_string();
        assert!(err.contains("no cluster key") && err.contains("--cluster-key-file"), "{err}");
        let mut req = endpoint_on("sec", "e2e2e2e2e2e2");
        let err = other.create_endpoint(req.clone()).await.unwrap_err().to_string();
        assert!(err.contains("no cluster key"), "{err}");
        let err = other.key_rings().await.unwrap_err().to_string();
        assert!(err.contains("sealed under cluster key") && err.contains("--cluster-key-file"), "{err}");
        // A host with another cluster key cannot read it either.
        let stranger = host_of(c.store.clone(), "h3", Some(KEY_B));
        let err = stranger.key_rings().await.unwrap_err().to_string();
        assert!(err.contains("does not have"), "{err}");
        req.id = "e1e1e1e1e1e1".into();
        c.create_endpoint(req).await.unwrap();
    }

    #[tokio::test]
    async fn the_cluster_key_rotates_once_every_live_host_holds_the_new_one() {
        let old = cluster(true);
        let net = old.create_network(encrypted("sec"), &[], 1500).await.unwrap();
        let ring = old.key_rings().await.unwrap().remove(&net.id).unwrap();
        // The new key goes first in h1's file; h2 still has only the old one.
        let new = host_of(old.store.clone(), "h1", Some(&format!("{KEY_B}\n{KEY_A}\n")));
        let (a, b) = (old.codec.keys().unwrap().current().to_string(), new.codec.keys().unwrap().current().to_string());
        register(&new, "h1", &[&b, &a]).await;
        register(&new, "h2", &[&a]).await;
        let err = new.reseal_key_rings().await.unwrap_err().to_string();
        assert!(err.contains("h2") && err.contains(&b) && err.contains("nothing was changed"), "{err}");
        let raw = || async { new.store.get(&model::netkey_key(&net.id)).await.unwrap().unwrap().value };
        assert_eq!(trellis_ipsec::sealed::sealed_by(&raw().await).unwrap(), a);
        // h2 restarted with the new file: the rings are sealed again.
        register(&new, "h2", &[&b, &a]).await;
        assert_eq!(new.reseal_key_rings().await.unwrap(), (1, 0));
        assert_eq!(trellis_ipsec::sealed::sealed_by(&raw().await).unwrap(), b);
        assert_eq!(new.reseal_key_rings().await.unwrap(), (0, 1), "already under it");
        assert_eq!(new.key_rings().await.unwrap()[&net.id], ring, "the same ring, sealed anew");
        // The old key alone no longer opens it: its line can go.
        assert!(old.key_rings().await.unwrap_err().to_string().contains("does not have"));
        // A host without any key cannot reseal.
        let none = host_of(old.store.clone(), "h3", None);
        assert!(none.reseal_key_rings().await.unwrap_err().to_string().contains("no cluster key"));
    }

    fn endpoint_on(network: &str, id: &str) -> NewEndpoint {
        NewEndpoint {
            id: id.into(),
            network: network.into(),
            name: None,
            ip: None,
            labels: BTreeMap::new(),
            netns: "/run/netns/x".into(),
            managed_netns: false,
            ifname: "eth0".into(),
            kind: model::EndpointKind::Adhoc,
            container_id: String::new(),
            ip6: None,
            reserved: false,
        }
    }

    fn encrypted(name: &str) -> NewNetwork {
        NewNetwork { name: name.into(), attachable: true, encrypted: true, ..NewNetwork::default() }
    }

    #[tokio::test]
    async fn without_esp_encrypted_networks_are_refused_and_nothing_is_written() {
        let c = cluster(false);
        let err = c.create_network(encrypted("sec"), &[], 1500).await.unwrap_err().to_string();
        assert!(err.contains("cannot do IPsec ESP") && err.contains("Protocol not supported"), "{err}");
        assert!(c.networks().await.unwrap().is_empty());
        assert!(c.key_rings().await.unwrap().is_empty());
        // A plain network is fine on the same host.
        c.create_network(NewNetwork { name: "plain".into(), ..NewNetwork::default() }, &[], 1500).await.unwrap();
    }

    #[tokio::test]
    async fn encrypted_networks_get_a_port_a_key_ring_and_a_smaller_mtu_and_give_them_back() {
        let c = cluster(true);
        let a = c.create_network(encrypted("a"), &[], 1500).await.unwrap();
        let b = c.create_network(encrypted("b"), &[], 1500).await.unwrap();
        let plain =
            c.create_network(NewNetwork { name: "p".into(), ..NewNetwork::default() }, &[], 1500).await.unwrap();
        assert_eq!((a.vxlan_port, b.vxlan_port, plain.vxlan_port), (Some(4790), Some(4791), None));
        assert_eq!((a.mtu, plain.mtu), (1500 - 50 - trellis_ipsec::xfrm::ESP_OVERHEAD, 1450));
        let rings = c.key_rings().await.unwrap();
        assert_eq!(rings.len(), 2);
        assert_ne!(rings[&a.id].key(1), rings[&b.id].key(1), "every network has its own secret");
        c.remove_network("a", false).await.unwrap();
        assert_eq!(c.key_rings().await.unwrap().len(), 1);
        let again = c.create_network(encrypted("c"), &[], 1500).await.unwrap();
        assert_eq!(again.vxlan_port, Some(4790), "a removed network's port is free again");
    }

    #[tokio::test]
    async fn a_rotation_on_demand_waits_for_every_member_then_completes() {
        let c = cluster(true);
        let net = c.create_network(encrypted("sec"), &[], 1500).await.unwrap();
        // This host carries the network (an endpoint; a live host record).
        let rec = crate::model::HostRecord {
            id: "h1".into(),
            hostname: "h1".into(),
            underlay: "192.0.2.1".parse().unwrap(),
            vtep_mac: "02:00:00:00:00:01".parse().unwrap(),
            vxlan_port: 4789,
            capabilities: Default::default(),
            version: "t".into(),
            started_unix: 0,
            underlay_mtu: 0,
        };
        crate::state::hosts::register(c.store.as_ref(), &rec, std::time::Duration::from_secs(30)).await.unwrap();
        c.create_endpoint(endpoint_on("sec", "e1e1e1e1e1e1")).await.unwrap();
        assert!(c.rotate_key("plain-missing").await.is_err());
        let policy = Policy { interval_ms: 0, grace_ms: 0 };
        let (_, ring) = c.rotate_key("sec").await.unwrap();
        assert_eq!((ring.tx, ring.newest(), ring.reason), (1, 2, Some(Reason::OnDemand)));
        let again = c.rotate_key("sec").await.unwrap_err().to_string();
        assert!(again.contains("already rotating"), "{again}");
        // No ack from the member yet: nothing moves.
        assert!(c.drive_rotations(&policy, &BTreeSet::new()).await.unwrap().is_empty());
        c.publish_acks(&BTreeMap::from([(net.id.clone(), Ack { rx: 2, tx: 1 })])).await;
        assert_eq!(
            c.drive_rotations(&policy, &BTreeSet::new()).await.unwrap(),
            vec![("sec".into(), Step::Switch { to: 2 })]
        );
        assert!(c.drive_rotations(&policy, &BTreeSet::new()).await.unwrap().is_empty(), "senders have not switched");
        c.publish_acks(&BTreeMap::from([(net.id.clone(), Ack { rx: 2, tx: 2 })])).await;
        assert_eq!(
            c.drive_rotations(&policy, &BTreeSet::new()).await.unwrap(),
            vec![("sec".into(), Step::Retire { epoch: 1 })]
        );
        let ring = c.key_status(&net).await.unwrap();
        assert_eq!((ring.tx, ring.keys.len(), ring.rotating()), (2, 1, false));
        // The sequence-number trigger starts the next one.
        let exhausted = BTreeSet::from([net.id.clone()]);
        assert_eq!(
            c.drive_rotations(&policy, &exhausted).await.unwrap(),
            vec![("sec".into(), Step::Rotate { epoch: 3, reason: Reason::SequenceNumbers })]
        );
        // Outbound SAs past the threshold name their network.
        let mut seen = trellis_ipsec::ObservedXfrm::default();
        let sa = trellis_ipsec::xfrm::ObservedSa {
            src: rec.underlay,
            reqid: trellis_ipsec::xfrm::reqid(4790),
            oseq: 10,
            encap: None,
        };
        seen.sas.insert(trellis_ipsec::SaId { dst: "192.0.2.2".parse().unwrap(), spi: 0x8000_0001 }, sa);
        let nets = c.networks().await.unwrap();
        assert_eq!(exhausted_networks(&nets, &seen, 10), BTreeSet::from([net.id.clone()]));
        assert!(exhausted_networks(&nets, &seen, 11).is_empty());
    }
}
