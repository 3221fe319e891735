//! What `trellisctl status` and `host ls` show: this host's health and
//! every live host as this one sees it (tunnel entries, probes).

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use super::{AgentError, App, Result};
use crate::model::HostRecord;
use crate::telemetry::probe::MISSED_FOR_DOWN;

/// Whether this host's tunnel entries towards a host are in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelState {
    /// The answering host itself.
    Local,
    /// No network has endpoints on both hosts.
    NoSharedNetworks,
    /// Every FDB entry towards the host is programmed (this many).
    Programmed(usize),
    /// Some are still missing.
    Pending,
}

impl fmt::Display for TunnelState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TunnelState::Local => f.write_str("local"),
            TunnelState::NoSharedNetworks => f.write_str("no shared networks"),
            TunnelState::Programmed(n) => write!(f, "programmed ({n} entries)"),
            TunnelState::Pending => f.write_str("pending"),
        }
    }
}

/// What the active probes say of a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeState {
    Local,
    NoProber,
    NotProbedYet,
    /// Its underlay address does not answer.
    Unreachable {
        missed: u32,
    },
    /// Its underlay answers, its VXLAN tunnel does not.
    TunnelUnreachable {
        missed: u32,
    },
    NotAnsweredYet,
    Ok,
}

impl ProbeState {
    /// Does this make the host unhealthy?
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ProbeState::Unreachable { .. } | ProbeState::TunnelUnreachable { .. })
    }
}

impl fmt::Display for ProbeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeState::Local => f.write_str("local"),
            ProbeState::NoProber => f.write_str("not probed (no prober)"),
            ProbeState::NotProbedYet => f.write_str("not probed yet"),
            ProbeState::Unreachable { missed } => write!(f, "unreachable ({missed} probes unanswered)"),
            ProbeState::TunnelUnreachable { missed } => write!(
                f,
                "unreachable through the VXLAN tunnel ({missed} probes unanswered; its underlay address answers: is the VXLAN port blocked?)"
            ),
            ProbeState::NotAnsweredYet => f.write_str("not answered yet"),
            ProbeState::Ok => f.write_str("ok"),
        }
    }
}

/// A live host as this one sees it.
#[derive(Clone, Debug)]
pub struct HostView {
    pub host: HostRecord,
    pub local: bool,
    /// Since it last renewed its lease.
    pub last_seen: Option<Duration>,
    pub endpoints: u32,
    pub tunnel: TunnelState,
    pub probe: ProbeState,
    pub probe_rtt: Option<Duration>,
    pub tunnel_probe_rtt: Option<Duration>,
    /// No registration, kept while this host's probes of it answer.
    pub kept: bool,
    /// The largest packet the path to it carries, as probed.
    pub path_mtu: Option<u32>,
    /// The largest VXLAN packet the path to it carries, as probed through
    /// the probe tunnel.
    pub tunnel_mtu: Option<u32>,
}

/// This host's health.
#[derive(Clone, Debug)]
pub struct StatusView {
    pub host_id: String,
    pub hostname: String,
    pub store_backend: String,
    /// `Err`: the store cannot be read, and why.
    pub store: std::result::Result<(), String>,
    pub networks: u32,
    pub local_endpoints: u32,
    pub peers: u32,
    pub unreachable_peers: Vec<String>,
    pub datapath_services: u32,
    pub datapath_backends: u32,
    pub datapath_subnets: u32,
    pub datapath_published: u32,
    /// Mesh ports this host leaves to a process of it that holds them.
    pub mesh_ports_held: Vec<String>,
    /// How this host publishes mesh ports: `ebpf` or `nftables`.
    pub mesh_datapath: &'static str,
    /// The mesh ports it publishes through nftables.
    pub mesh_ports_nft: Vec<String>,
    /// Its mesh addresses: (network name, address, interface).
    pub mesh_addresses: Vec<(String, String, String)>,
    /// What keeps the mesh from working here.
    pub mesh_warnings: Vec<String>,
    pub docker_networks: u32,
    pub docker_endpoints: u32,
    pub last_reconcile_at: Option<std::time::SystemTime>,
    pub reconcile_passes: u64,
    pub reconcile_errors: Vec<String>,
    pub last_reconcile_duration: Duration,
    pub last_full_reconcile_us: u64,
    pub capabilities: HashMap<String, bool>,
    /// Why encrypted networks are refused here (empty: they are not).
    pub esp_unsupported: String,
}

impl App {
    /// What the probes say of a host.
    pub fn probe_state(&self, host: &str) -> ProbeState {
        if host == self.cluster.host {
            return ProbeState::Local;
        }
        match self.prober.as_ref().map(|p| p.health(host)) {
            None => ProbeState::NoProber,
            Some(None) => ProbeState::NotProbedYet,
            Some(Some(h)) if h.underlay_down(MISSED_FOR_DOWN) => ProbeState::Unreachable { missed: h.missed },
            Some(Some(h)) if h.tunnel_down(MISSED_FOR_DOWN) => {
                ProbeState::TunnelUnreachable { missed: h.tunnel.missed }
            }
            Some(Some(h)) if h.sent == 0 || (h.answered == 0 && h.missed > 0) => ProbeState::NotAnsweredYet,
            Some(Some(_)) => ProbeState::Ok,
        }
    }

    /// Every live host, and every host kept while its data path answers,
    /// with this host's tunnel and probe state for it.
    pub async fn hosts(&self) -> Result<Vec<HostView>> {
        let mut hosts =
            crate::state::hosts::live_hosts_seen(self.cluster.store.as_ref()).await.map_err(AgentError::from)?;
        let kept: Vec<HostRecord> = self.present.as_ref().map(|p| p.kept()).unwrap_or_default();
        let kept: Vec<HostRecord> = kept.into_iter().filter(|k| !hosts.iter().any(|(h, _)| h.id == k.id)).collect();
        let kept_ids: Vec<String> = kept.iter().map(|k| k.id.clone()).collect();
        hosts.extend(kept.into_iter().map(|k| (k, None)));
        let eps = self.cluster.endpoints().await?;
        let want = self.reconciler.last_desired();
        let seen = self.reconciler.seen();
        Ok(hosts
            .into_iter()
            .map(|(h, last_seen)| {
                let local = h.id == self.cluster.host;
                let tunnel = if local {
                    TunnelState::Local
                } else {
                    // Every FDB entry towards this host that should exist, does.
                    let wanted: Vec<_> = want
                        .vxlans
                        .iter()
                        .flat_map(|(name, v)| v.fdb.iter().map(move |f| (name, f)))
                        .filter(|(_, (_, dst))| *dst == h.underlay)
                        .collect();
                    if wanted.is_empty() {
                        TunnelState::NoSharedNetworks
                    } else if wanted.iter().all(|(name, f)| seen.links.get(*name).is_some_and(|l| l.fdb.contains(f))) {
                        TunnelState::Programmed(wanted.len())
                    } else {
                        TunnelState::Pending
                    }
                };
                let health = self.prober.as_ref().and_then(|p| p.health(&h.id));
                HostView {
                    endpoints: eps.iter().filter(|e| e.host == h.id).count() as u32,
                    local,
                    last_seen,
                    tunnel,
                    probe: self.probe_state(&h.id),
                    probe_rtt: health.as_ref().and_then(|x| x.rtt),
                    tunnel_probe_rtt: health.as_ref().and_then(|x| x.tunnel.rtt),
                    kept: kept_ids.contains(&h.id),
                    path_mtu: health.as_ref().and_then(|x| x.mtu.verified),
                    tunnel_mtu: health.as_ref().and_then(|x| x.tunnel.mtu.verified),
                    host: h,
                }
            })
            .collect())
    }

    pub async fn status(&self) -> StatusView {
        let last = self.reconciler.last();
        let store = self.cluster.networks().await;
        let eps = self.cluster.endpoints().await.unwrap_or_default();
        let (store, nets) = match store {
            Ok(n) => (Ok(()), n),
            Err(e) => (Err(e.to_string()), Vec::new()),
        };
        let networks = nets.len() as u32;
        let net_name = |id: &str| nets.iter().find(|n| n.id == id).map_or_else(|| id.to_string(), |n| n.name.clone());
        let mesh_addresses: Vec<(String, String, String)> = self
            .cluster
            .mesh_addrs_of(&self.cluster.host)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|m| (net_name(&m.network_id), m.ip.to_string(), crate::model::mesh_ifname(&m.network_id)))
            .collect();
        let desired = self.reconciler.last_desired();
        let mut mesh_warnings: Vec<String> =
            self.cluster.mesh_addr_errors.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        if !desired.mesh_veths.is_empty() && self.dataplane.strict_rp_filter() {
            mesh_warnings.push(
                "net.ipv4.conf.all.rp_filter is 1 (strict): the backends' replies to this host's mesh addresses arrive on its mesh veths and are dropped; set it to 2 (loose) or 0".into(),
            );
        }
        let docker = crate::model::docker_host_prefix(&self.cluster.host);
        let (docker_items, _) = self.cluster.store.list(&docker).await.unwrap_or_default();
        let count =
            |part: &str| docker_items.iter().filter(|kv| kv.key[docker.len()..].starts_with(part)).count() as u32;
        let tables = self.reconciler.seen().tables;
        let peers: Vec<String> = crate::state::hosts::live_hosts(self.cluster.store.as_ref())
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|h| h.id)
            .filter(|id| *id != self.cluster.host)
            .collect();
        let unreachable_peers = peers
            .iter()
            .filter(|id| {
                self.prober.as_ref().and_then(|p| p.health(id)).is_some_and(|h| h.unreachable(MISSED_FOR_DOWN))
            })
            .cloned()
            .collect();
        StatusView {
            host_id: self.cluster.host.clone(),
            hostname: self.hostname.clone(),
            store_backend: self.cluster.store.backend().to_string(),
            store,
            networks,
            local_endpoints: eps.iter().filter(|e| e.host == self.cluster.host).count() as u32,
            peers: peers.len() as u32,
            unreachable_peers,
            datapath_services: tables.services.len() as u32,
            datapath_backends: tables.backends.len() as u32,
            datapath_subnets: tables.nets.len() as u32,
            datapath_published: tables.published.len() as u32,
            mesh_datapath: if self.capabilities.get("ebpf").copied().unwrap_or(false) { "ebpf" } else { "nftables" },
            mesh_ports_nft: desired
                .mesh_nft
                .iter()
                .map(|(service, p)| format!("{}/{} (service {service})", p.host_port, p.proto.as_str()))
                .collect(),
            mesh_addresses,
            mesh_warnings,
            mesh_ports_held: desired
                .mesh_held
                .iter()
                .map(|(service, p)| {
                    format!("{}/{} (service {service}): held by a process of this host", p.host_port, p.proto.as_str())
                })
                .collect(),
            docker_networks: count("nets/"),
            docker_endpoints: count("eps/"),
            last_reconcile_at: last.finished,
            reconcile_passes: last.generation,
            reconcile_errors: last.errors.iter().map(|(_, m)| m.clone()).collect(),
            last_reconcile_duration: last.duration,
            last_full_reconcile_us: self.reconciler.last_full_us.load(std::sync::atomic::Ordering::Relaxed),
            capabilities: self.capabilities.clone(),
            esp_unsupported: self.cluster.esp_unsupported.clone().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::testing::lab;

    #[test]
    fn states_read_as_they_always_did() {
        assert_eq!(TunnelState::Programmed(3).to_string(), "programmed (3 entries)");
        assert_eq!(TunnelState::NoSharedNetworks.to_string(), "no shared networks");
        assert_eq!(ProbeState::Ok.to_string(), "ok");
        assert_eq!(ProbeState::Unreachable { missed: 4 }.to_string(), "unreachable (4 probes unanswered)");
        assert!(
            ProbeState::TunnelUnreachable { missed: 4 }.to_string().starts_with("unreachable through the VXLAN tunnel")
        );
        assert!(ProbeState::TunnelUnreachable { missed: 1 }.is_unreachable());
        assert!(!ProbeState::NotAnsweredYet.is_unreachable());
    }

    #[tokio::test]
    async fn status_of_a_lone_host() {
        let l = lab();
        l.app.converge().await.unwrap();
        let s = l.app.status().await;
        assert_eq!(s.store, Ok(()));
        assert_eq!((s.networks, s.local_endpoints, s.peers), (0, 0, 0));
        assert_eq!(s.reconcile_passes, 1);
        assert!(s.reconcile_errors.is_empty());
        assert_eq!(l.app.probe_state("h1"), ProbeState::Local);
        assert_eq!(l.app.probe_state("h2"), ProbeState::NoProber);
    }
}
