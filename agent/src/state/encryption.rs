//! Encrypted networks in the store: each has a key ring (created with the
//! network, in the same transaction) and the acks of the hosts carrying it.
//! Any agent may advance a ring's rotation ([`trellis_ipsec::rotation`]);
//! the compare-and-swap on the ring makes one win. Secrets never reach a
//! log: rings are printed by fingerprint only.

use std::collections::{BTreeMap, BTreeSet};

use trellis_ipsec::{Ack, KeyRing, Policy, Step, Triggers};
use trellis_store::{Compare, Op};

use crate::model::{self, EndpointRecord, NetworkRecord};
use crate::state::{AgentError, Cluster, Result, decode, encode};

impl Cluster {
    /// Refuse an encrypted network on a host whose kernel cannot do ESP.
    pub fn require_esp(&self, network: &str) -> Result<()> {
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
                decode(&kv.key, &kv.value).map(|r| (id, r))
            })
            .collect()
    }

    async fn key_ring(&self, net: &NetworkRecord) -> Result<(KeyRing, trellis_store::Revision)> {
        let key = model::netkey_key(&net.id);
        let kv =
            self.store.get(&key).await?.ok_or_else(|| {
                AgentError::Internal(format!("encrypted network {:?} has no key ring ({key})", net.name))
            })?;
        Ok((decode(&key, &kv.value)?, kv.mod_revision))
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
        let done =
            self.store.txn(vec![Compare::ModRevision(key.clone(), rev)], vec![Op::put(key, encode(&next))]).await?;
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

    fn cluster(esp: bool) -> Cluster {
        let store: Arc<dyn Store> = Arc::new(trellis_store::LocalStore::memory());
        let mut c = Cluster::new(store, "h1", "10.0.0.0/8".parse().unwrap(), 24);
        if !esp {
            c.esp_unsupported = Some("adding an ESP SA failed: Protocol not supported".into());
        }
        c
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
        };
        crate::state::hosts::register(c.store.as_ref(), &rec, std::time::Duration::from_secs(30)).await.unwrap();
        c.create_endpoint(NewEndpoint {
            id: "e1e1e1e1e1e1".into(),
            network: "sec".into(),
            name: None,
            ip: None,
            labels: BTreeMap::new(),
            netns: "/run/netns/x".into(),
            managed_netns: false,
            ifname: "eth0".into(),
            kind: model::EndpointKind::Adhoc,
            container_id: String::new(),
            reserved: false,
        })
        .await
        .unwrap();
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
        let sa =
            trellis_ipsec::xfrm::ObservedSa { src: rec.underlay, reqid: trellis_ipsec::xfrm::reqid(4790), oseq: 10 };
        seen.sas.insert(trellis_ipsec::SaId { dst: "192.0.2.2".parse().unwrap(), spi: 0x8000_0001 }, sa);
        let nets = c.networks().await.unwrap();
        assert_eq!(exhausted_networks(&nets, &seen, 10), BTreeSet::from([net.id.clone()]));
        assert!(exhausted_networks(&nets, &seen, 11).is_empty());
    }
}
