//! The agent's use cases, typed: attach (with rollback) and detach,
//! networks, services, status and host listings, and what follows a
//! reconcile pass ([`settle`]). The gRPC service, the Docker driver and
//! through the gRPC service the CNI plugin all come in here; none of them
//! writes to the store or the kernel themselves.
//!
//! Every request is validated here (the front doors only turn their wire
//! format into these types), written to the store, and converged by a
//! reconcile pass before the answer goes back; a failure undoes what the
//! request wrote. Errors are [`AgentError`]s: each front door maps the kind
//! to its own protocol (gRPC codes, Docker's `Err` field), keeping the text.

pub mod endpoints;
pub mod networks;
pub mod ports;
pub mod services;
pub mod status;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::dataplane::Dataplane;
use crate::model::EndpointRecord;
use crate::reconcile::{PassReport, Reconciler};
pub use crate::state::AgentError;
use crate::state::Cluster;
use crate::telemetry::probe::Prober;

pub use endpoints::{AttachRequest, Attached, EndpointRef, Unlisted};
pub use networks::NetworkView;
pub use ports::PortRequest;
pub use services::{BackendView, CreateService, MeshPortRequest, ServiceView};
pub use status::{HostView, ProbeState, StatusView, TunnelState};

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

/// Everything a use case needs: the store, the reconciler, the kernel, and
/// what this host runs (DNS, probes, events).
pub struct App {
    pub cluster: Arc<Cluster>,
    pub reconciler: Arc<Reconciler>,
    pub dataplane: Arc<dyn Dataplane>,
    /// Where namespaces the agent manages are created.
    pub netns_dir: PathBuf,
    pub hostname: String,
    pub capabilities: HashMap<String, bool>,
    /// Flow and drop events of the eBPF program (`None` without it).
    pub events: Option<tokio::sync::broadcast::Sender<trellis_ebpf::FlowEvent>>,
    /// The agent's DNS server (on every network's gateway), if it runs.
    pub dns: Option<Arc<trellis_dns::Core>>,
    /// Probes of the peers' tunnel endpoints (`None`: not running).
    pub prober: Option<Arc<Prober>>,
    /// The hosts the data path serves (the live ones, and those kept while
    /// their probes answer): `None` without a prober.
    pub present: Option<Arc<crate::state::liveness::Present>>,
    /// One publication of ports at a time on this host (host ports are
    /// this host's: its agent alone hands them out).
    pub ports_lock: tokio::sync::Mutex<()>,
    /// How long a detached backend of a VIP service keeps its connections
    /// (`--drain-ms`; zero: none, removed at once).
    pub drain: std::time::Duration,
    /// Told when a drain starts (the loop that ends drains looks again).
    pub drains: Arc<tokio::sync::Notify>,
}

impl App {
    /// Converge now; a failing pass is an error of the request. A pass
    /// after which this host's mesh addresses changed (a service it now
    /// publishes needed one) is followed by another, which programs them.
    pub async fn converge(&self) -> Result<Arc<PassReport>> {
        let mut report = self.reconciler.pass().await.map_err(|e| AgentError::Reconcile(e.to_string()))?;
        for _ in 0..2 {
            if !settle(&self.cluster, self.dataplane.as_ref(), &report).await {
                break;
            }
            report = self.reconciler.pass().await.map_err(|e| AgentError::Reconcile(e.to_string()))?;
        }
        Ok(report)
    }

    /// Subscribe to the datapath's flow and drop events (turned on while
    /// someone watches), after checking the filters.
    pub async fn watch_events(
        &self,
        network: Option<&str>,
        verdict: Option<&str>,
    ) -> Result<tokio::sync::broadcast::Receiver<trellis_ebpf::FlowEvent>> {
        let Some(events) = &self.events else {
            return Err(AgentError::FailedPrecondition(
                "no flow events on this host: its eBPF datapath is off (trellisd runs with --ebpf=false, or the program could not load: see `trellisctl status`)".into(),
            ));
        };
        if let Some(v) = verdict
            && v != "dropped"
            && v != "passed"
        {
            return Err(AgentError::InvalidArgument(format!("verdict {v:?}: expected dropped or passed")));
        }
        if let Some(n) = network {
            self.cluster.network(n).await?;
        }
        let rx = events.subscribe();
        self.dataplane.set_events(true);
        Ok(rx)
    }

    /// Remove a namespace the agent made for `e`, if it did.
    fn remove_managed(&self, e: &EndpointRecord) {
        remove_managed(self.dataplane.as_ref(), e);
    }
}

fn remove_managed(dp: &dyn Dataplane, e: &EndpointRecord) {
    if e.managed_netns
        && let Err(err) = dp.remove_netns(&e.netns)
    {
        tracing::warn!(netns = %e.netns.display(), error = %err, "removing a managed netns");
    }
}

/// After a pass: this host's encryption acks are published; endpoints being
/// deleted whose devices are gone lose their records, addresses and managed
/// namespaces; endpoints whose namespace died are collected; this host's
/// mesh addresses are allocated where it needs one and released where it
/// no longer does (whether any were: the next pass programs them).
pub async fn settle(cluster: &Cluster, dp: &dyn Dataplane, report: &PassReport) -> bool {
    if !report.acks.is_empty() {
        cluster.publish_acks(&report.acks).await;
    }
    let mesh_changed = match cluster.sync_mesh_addrs(&report.mesh_addrs_missing, &report.mesh_addrs_releasable).await {
        Ok(changed) => changed,
        Err(err) => {
            tracing::warn!(error = %err, "allocating or releasing this host's mesh addresses");
            false
        }
    };
    for e in &report.finalizable {
        match cluster.finalize(e).await {
            Ok(()) => {
                remove_managed(dp, e);
                tracing::debug!(endpoint = %e.id, "endpoint removed");
            }
            Err(err) => tracing::warn!(endpoint = %e.id, error = %err, "finalizing a detached endpoint"),
        }
    }
    if !report.gone.is_empty() {
        collect_gone(cluster, &report.gone).await;
    }
    mesh_changed
}

/// Remove the records of endpoints whose namespace is gone (the container
/// died without a detach); a draining endpoint's drain ends (no connection
/// is left to keep).
async fn collect_gone(cluster: &Cluster, gone: &[String]) {
    for id in gone {
        if let Ok(Some(e)) = cluster.endpoint_record(id).await
            && e.draining()
        {
            if !e.netns.exists() {
                match cluster.end_drain(id).await {
                    Ok(()) => {
                        tracing::info!(endpoint = %e.id, netns = %e.netns.display(), "namespace gone: its drain ends")
                    }
                    Err(err) => tracing::warn!(endpoint = %e.id, error = %err, "ending the drain of a gone namespace"),
                }
            }
            continue;
        }
        match cluster.find_endpoint(id, None).await {
            Ok(e) => {
                if e.netns.exists() {
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

/// A validation error of a front door's input, as the agent reports it.
impl From<trellis_plugin_api::validate::ValidationError> for AgentError {
    fn from(e: trellis_plugin_api::validate::ValidationError) -> AgentError {
        AgentError::InvalidArgument(e.to_string())
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! An [`App`] over the memory store and the fake kernel.

    use std::sync::Arc;

    use trellis_store::{LocalStore, Store};

    use super::App;
    use crate::dataplane::FakeDataplane;
    use crate::reconcile::{Identity, Reconciler};
    use crate::state::Cluster;

    pub struct Lab {
        pub app: Arc<App>,
        pub dp: Arc<FakeDataplane>,
        /// The cluster's store (shared by the labs made over it by [`host`]).
        pub store: Arc<dyn Store>,
        /// The host's informer (its loop stops with the lab).
        pub informer: Arc<crate::state::informer::Informer>,
        following: tokio::task::JoinHandle<()>,
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            self.following.abort();
        }
    }

    /// An attachable network to create (a subnet from the pool when none).
    pub fn attachable(name: &str, subnet: Option<&str>) -> crate::state::NewNetwork {
        crate::state::NewNetwork {
            name: name.into(),
            subnet: subnet.map(|s| s.parse().unwrap()),
            gateway: None,
            attachable: true,
            internal: false,
            encrypted: false,
            mtu: 0,
            ..Default::default()
        }
    }

    pub fn lab() -> Lab {
        host(Arc::new(LocalStore::memory()), "h1", |_| {})
    }

    /// A lone host with the eBPF datapath (its tables are computed) and
    /// detached backends draining for `drain`.
    pub fn ebpf_lab(drain: std::time::Duration) -> Lab {
        ebpf_host(Arc::new(LocalStore::memory()), "h1", drain)
    }

    /// Host `name` of the cluster in `store`, with the eBPF datapath and
    /// detached backends draining for `drain`.
    pub fn ebpf_host(store: Arc<dyn Store>, name: &str, drain: std::time::Duration) -> Lab {
        build(store, name, |_| {}, Identity { ebpf: true, ..Identity::local(name) }, drain)
    }

    /// Host `name` of the cluster in `store` with an underlay address (so
    /// it takes part in the routing mesh), eBPF on or off.
    pub fn mesh_host(store: Arc<dyn Store>, name: &str, underlay: &str, ebpf: bool) -> Lab {
        let me = Identity {
            ebpf,
            underlay: Some(underlay.parse().unwrap()),
            uplink: Some("uplink0".into()),
            ..Identity::local(name)
        };
        build(store, name, |_| {}, me, std::time::Duration::ZERO)
    }

    /// Host `name` of the cluster kept in `store` (labs over one store are
    /// hosts of one cluster, each with its own fake kernel); `configure`
    /// sets the host's cluster view up before the app takes it (e.g. its
    /// `esp_unsupported`).
    pub fn host(store: Arc<dyn Store>, name: &str, configure: impl FnOnce(&mut Cluster)) -> Lab {
        build(store, name, configure, Identity::local(name), std::time::Duration::ZERO)
    }

    fn build(
        store: Arc<dyn Store>,
        name: &str,
        configure: impl FnOnce(&mut Cluster),
        me: Identity,
        drain: std::time::Duration,
    ) -> Lab {
        // As the daemon wires it: writes tracked, the reconciler reading an
        // informer (linearizable: labs over one store are hosts of one
        // cluster, and a test's next step expects one host's pass to see
        // what another wrote).
        let (tracked, written) = crate::state::informer::TrackWrites::new(store.clone());
        let tracked: Arc<dyn Store> = tracked;
        let mut cluster = Cluster::new(tracked.clone(), name, "10.0.0.0/8".parse().unwrap(), 24);
        configure(&mut cluster);
        let cluster = Arc::new(cluster);
        let informer = crate::state::informer::Informer::linearizable(tracked, written);
        let following = tokio::spawn(informer.clone().run());
        let dp = Arc::new(FakeDataplane::default());
        let reconciler = Arc::new(Reconciler::new(dp.clone(), informer.clone(), me));
        let app = Arc::new(App {
            cluster,
            reconciler,
            dataplane: dp.clone(),
            netns_dir: "/run/trellis-test/netns".into(),
            hostname: name.into(),
            capabilities: Default::default(),
            events: None,
            dns: None,
            prober: None,
            present: None,
            ports_lock: Default::default(),
            drain,
            drains: Default::default(),
        });
        Lab { app, dp, store, informer, following }
    }
}
