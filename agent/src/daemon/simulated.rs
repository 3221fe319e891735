//! A simulated host: the agent's control plane wired as the daemon wires
//! it (store client with tracked writes, informer, reconciler following
//! the store and resyncing periodically, the DNS zone rebuilt from every
//! view, the host's lease kept) over the fake kernel, which records what
//! it is told. `trellis-sim` (in `integration`) runs many in one process
//! against one real etcd to measure what a cluster of hundreds of hosts
//! costs each agent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use trellis_store::Store;

use crate::app::App;
use crate::dataplane::{FakeDataplane, Mac};
use crate::model::{self, HostRecord};
use crate::reconcile::{Identity, Reconciler};
use crate::state::Cluster;
use crate::state::informer::{Informer, TrackWrites};

/// One simulated host (its tasks stop when it is dropped).
pub struct SimulatedHost {
    pub app: Arc<App>,
    pub dp: Arc<FakeDataplane>,
    pub informer: Arc<Informer>,
    /// DNS zone rebuilds done.
    pub zone_builds: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for SimulatedHost {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The record a simulated host registers: underlay 198.18.x.y from its
/// index, a VTEP MAC from the same.
pub fn host_record(id: &str, index: u32) -> HostRecord {
    let [_, _, a, b] = index.to_be_bytes();
    HostRecord {
        id: id.to_string(),
        hostname: id.to_string(),
        underlay: std::net::IpAddr::from([198, 18, a, b]),
        vtep_mac: Mac([2, 0x5e, 0, 0, a, b]),
        vxlan_port: 4789,
        capabilities: Default::default(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_unix: model::now_unix(),
        underlay_mtu: 0,
    }
}

impl SimulatedHost {
    /// Host `index` named `id`, registered under a lease of `lease_ttl`,
    /// its full pass every `resync`.
    pub async fn start(
        store: Arc<dyn Store>,
        id: &str,
        index: u32,
        lease_ttl: Duration,
        resync: Duration,
    ) -> anyhow::Result<SimulatedHost> {
        let (tracked, written) = TrackWrites::new(store);
        let tracked: Arc<dyn Store> = tracked;
        let record = host_record(id, index);
        let lease = crate::state::hosts::register(tracked.as_ref(), &record, lease_ttl).await?;
        let cluster = Arc::new(Cluster::new(tracked.clone(), id, "10.0.0.0/8".parse()?, 24));
        let informer = Informer::new(tracked, written);
        let me = Identity {
            host: id.to_string(),
            underlay: Some(record.underlay),
            uplink: None,
            vtep_mac: record.vtep_mac,
            vxlan_port: 4789,
            ebpf: false,
            esp_in_udp: false,
            esp_udp_port: trellis_ipsec::xfrm::ESP_IN_UDP_PORT,
            dns_intercept: false,
            dns_kernel: false,
        };
        let dp = Arc::new(FakeDataplane::default());
        let reconciler = Arc::new(Reconciler::new(dp.clone(), informer.clone(), me));
        let app = Arc::new(App {
            cluster: cluster.clone(),
            reconciler: reconciler.clone(),
            dataplane: dp.clone(),
            netns_dir: "/run/trellis-sim/netns".into(),
            hostname: id.to_string(),
            capabilities: Default::default(),
            events: None,
            dns: None,
            prober: None,
            present: None,
            ports_lock: Default::default(),
            drain: Duration::ZERO,
            drains: Default::default(),
        });
        let zone_builds = Arc::new(AtomicU64::new(0));
        let store = cluster.store.clone();
        let tasks = vec![
            tokio::spawn(informer.clone().run()),
            tokio::spawn(crate::state::hosts::keep_registered(store, record, lease_ttl, Some(lease), None)),
            tokio::spawn(super::tasks::follow_store(reconciler.clone(), informer.clone(), cluster.clone(), dp.clone())),
            tokio::spawn(super::tasks::resync(reconciler, cluster, dp.clone(), resync)),
            tokio::spawn(zone(informer.clone(), zone_builds.clone())),
        ];
        Ok(SimulatedHost { app, dp, informer, zone_builds, tasks })
    }

    /// How many remote endpoints this host's kernel has tunnel entries
    /// for (on the networks' VXLAN devices, not the probe device's).
    pub fn remotes(&self) -> usize {
        self.dp.inspect(|o| {
            o.links
                .iter()
                .filter(|(name, _)| name.as_str() != crate::model::PROBE_VXLAN)
                .map(|(_, l)| l.fdb.len())
                .sum()
        })
    }

    /// Has this host's kernel a tunnel entry for `mac` (programmed for a
    /// remote endpoint)?
    pub fn has_remote(&self, mac: Mac) -> bool {
        let first = (mac, std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        self.dp.inspect(|o| o.links.values().any(|l| l.fdb.range(first..).next().is_some_and(|(m, _)| *m == mac)))
    }
}

/// The DNS zone as the daemon keeps it (its server's zone, without the
/// sockets or the in-kernel table): followed change by change where it can
/// be, else rebuilt (see [`crate::dns::ZoneFollower`]).
async fn zone(informer: Arc<Informer>, builds: Arc<AtomicU64>) {
    let core = trellis_dns::Core::new(&trellis_dns::Upstreams { servers: Vec::new(), timeout: Duration::from_secs(1) });
    let mut views = informer.subscribe();
    let mut follower = crate::dns::ZoneFollower::default();
    loop {
        let v = views.borrow_and_update().clone();
        if !follower.current(&v) {
            match follower.changes(&v) {
                Some(changes) => core.update_zone(|z| follower.apply(z, &v, &changes)),
                None => {
                    let hosts: Vec<String> = v.hosts.iter().map(|h| h.id.clone()).collect();
                    core.set_zone(crate::dns::zone_of(&v.networks, &v.endpoints, &hosts, &v.services));
                    follower.rebuilt(&v);
                }
            }
            builds.fetch_add(1, Ordering::Relaxed);
        }
        if views.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
