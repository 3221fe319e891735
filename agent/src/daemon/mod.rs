//! `trellisd`: wiring and lifecycle. The agent owns no kernel state in
//! memory: it starts, reconciles (adopting whatever is there), serves, and
//! on SIGTERM stops serving and leaves the datapath exactly as it is.
//!
//! [`run`] builds the parts, spawns every background loop of [`tasks`]
//! into one `JoinSet`, serves the API until a signal, then aborts them all.

pub mod config;
pub mod host;
pub mod simulated;
pub mod tasks;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinSet;
use tokio_stream::wrappers::UnixListenerStream;
use trellis_plugin_api::proto::agent_server::AgentServer;
use trellis_store::Store;

use crate::api::grpc::AgentService;
use crate::app::App;
use crate::daemon::config::Config;
use crate::daemon::host::{
    capabilities, choose_advertise_addr, open_store, read_cluster_keys, refuse_shared_underlay,
    remove_orphan_namespaces, require_ipv4_underlay,
};
use crate::dataplane::Dataplane;
pub use crate::dataplane::HOST_LIMITS;
use crate::dataplane::linux::NetlinkDataplane;
use crate::model;
use crate::model::HostRecord;
use crate::reconcile::{Identity, Reconciler};
use crate::state::Cluster;

/// Run the agent until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("trellisd must run as root: it creates network devices and namespaces");
    }
    let host = prepare_dirs(&cfg)?;
    // Encrypted networks' key rings are sealed under the cluster keys.
    let cluster_keys = match &cfg.cluster_key_file {
        Some(path) => Some(read_cluster_keys(path)?),
        None => {
            tracing::info!("no --cluster-key-file: encrypted networks are refused on this host");
            None
        }
    };
    let codec = crate::state::encryption::RingCodec::new(cluster_keys.clone());
    let store_metrics = crate::telemetry::metrics::StoreMetrics::default();
    let metered: Arc<dyn Store> =
        Arc::new(crate::telemetry::metrics::MeteredStore::new(open_store(&cfg).await?, store_metrics.clone()));
    let (tracked, written) = crate::state::informer::TrackWrites::new(metered);
    let store: Arc<dyn Store> = tracked;
    // Before anything slow: the record a previous run left stays alive.
    let previous_lease = crate::state::hosts::renew_previous(store.as_ref(), &cfg.state_dir).await;
    let (netlink, ebpf) = open_datapath(&cfg)?;
    let mut tasks = JoinSet::new();
    // The one reader of the cluster's records on hot paths and timers.
    let informer = crate::state::informer::Informer::new(store.clone(), written);
    informer.set_codec(codec.clone());
    tasks.spawn(informer.clone().run());
    // Flow and drop events of the eBPF program, for `trellisctl monitor`.
    let ring = netlink.take_event_ring();
    let dataplane: Arc<dyn Dataplane> = Arc::new(netlink);
    dataplane.prepare_host();
    let events = ring.map(|ring| {
        let (tx, _) = tokio::sync::broadcast::channel(4096);
        tasks.spawn(crate::dataplane::linux::events::read_events(ring, tx.clone()));
        tasks.spawn(tasks::events_off_when_unwatched(tx.clone(), dataplane.clone()));
        tx
    });
    let mut cluster = Cluster::new(store.clone(), &host, cfg.default_pool, cfg.default_prefix_len);
    cluster.esp_unsupported = probe_esp(dataplane.clone()).await;
    cluster.codec = codec.clone();
    let cluster = Arc::new(cluster);
    let hostname = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    let underlay = match cfg.advertise_addr {
        Some(a) => {
            require_ipv4_underlay(a).map_err(anyhow::Error::msg)?;
            Some(a)
        }
        None => {
            let candidates = dataplane.underlay_candidates().await.context("finding the underlay address")?;
            choose_advertise_addr(&candidates).map_err(anyhow::Error::msg)?
        }
    };
    let vtep_mac = crate::state::hosts::vtep_mac(&cfg.state_dir).context("reading the VTEP MAC")?;
    // Advertised so every host sizes every network for the smallest wire.
    let underlay_mtu = match dataplane.underlay_mtu().await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "reading the underlay MTU: not advertised");
            0
        }
    };
    let uplink = match underlay {
        Some(a) => dataplane.link_with_addr(a).await.context("finding the uplink interface")?,
        None => None,
    };
    if underlay.is_some() && uplink.is_none() {
        tracing::warn!(underlay = ?underlay, "no interface has the underlay address: the routing mesh takes no outside traffic");
    }
    let identity = Identity {
        uplink,
        dns_intercept: cfg.dns && cfg.dns_port == 53,
        dns_kernel: ebpf && cfg.dns && cfg.dns_port == 53 && cfg.dns_kernel,
        host: host.clone(),
        underlay,
        vtep_mac,
        vxlan_port: cfg.vxlan_port,
        ebpf,
        esp_in_udp: cfg.esp_in_udp,
        esp_udp_port: cfg.esp_udp_port,
    };
    let mut caps = capabilities();
    if cfg.esp_in_udp {
        caps.insert(model::ESP_IN_UDP_CAPABILITY.to_string(), true);
    }
    caps.insert("ebpf".to_string(), ebpf);
    caps.insert("esp".to_string(), cluster.esp_unsupported.is_none());
    for id in cluster_keys.iter().flat_map(|k| k.ids()) {
        caps.insert(model::cluster_key_capability(&id), true);
    }
    // Register this host (the lease renewal runs in the background; a
    // store that is down now is retried there).
    let record = HostRecord {
        id: host.clone(),
        hostname: hostname.clone(),
        underlay: underlay.unwrap_or(std::net::IpAddr::from([0, 0, 0, 0])),
        vtep_mac,
        vxlan_port: cfg.vxlan_port,
        capabilities: caps.clone().into_iter().collect(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_unix: model::now_unix(),
        underlay_mtu,
    };
    refuse_shared_underlay(store.as_ref(), &record, cfg.lease_ttl).await?;
    let lease = match crate::state::hosts::register_under(store.as_ref(), &record, cfg.lease_ttl, previous_lease).await
    {
        Ok(l) => {
            crate::state::hosts::save_lease(&cfg.state_dir, l);
            Some(l)
        }
        Err(e) => {
            tracing::warn!(error = %e, "registering this host failed; retrying in the background");
            None
        }
    };
    tasks.spawn(crate::state::hosts::keep_registered(
        store.clone(),
        record,
        cfg.lease_ttl,
        lease,
        Some(cfg.state_dir.clone()),
    ));
    tracing::info!(host = %host, underlay = ?underlay, uplink = ?identity.uplink, "host identity");
    let dns_kernel = identity.dns_kernel;
    // Probes of every peer's tunnel endpoint, once a second: the data
    // path's word on which hosts are present, beside the store's.
    let prober = Arc::new(crate::telemetry::probe::Prober::default());
    prober.set_own_mtu(underlay_mtu);
    let prober = match dataplane.probe_sockets().and_then(|sockets| prober.start(sockets, Duration::from_secs(1))) {
        Ok(()) => Some(prober),
        Err(e) => {
            tracing::warn!(error = %e, "peer probes unavailable: a peer is present while its registration lives");
            None
        }
    };
    let verdicts: crate::state::liveness::Verdicts = match prober.clone() {
        Some(p) => Arc::new(move |id: &str| p.path(id)),
        None => Arc::new(|_: &str| crate::model::liveness::Path::Unprobed),
    };
    let present = crate::state::liveness::Present::new(informer.clone(), &host, verdicts);
    let reconciler = Arc::new(Reconciler::new(dataplane.clone(), present.clone(), identity));

    // Adopt what the kernel has before serving anything.
    match reconciler.pass().await {
        Ok(r) => tracing::info!(actions = r.actions, errors = r.errors.len(), "initial reconcile"),
        Err(e) => tracing::warn!(error = %e, "initial reconcile failed; retrying in the background"),
    }
    remove_orphan_namespaces(&cluster, dataplane.as_ref(), &cfg.netns_dir()).await;

    let listener = bind_api(&cfg.socket)?;

    let dns_core = cfg.dns.then(|| trellis_dns::Core::new(&cfg.dns_upstream));
    if let Some(core) = &dns_core {
        core.set_client_qps(cfg.dns_client_qps);
    }
    if let Some(p) = &prober {
        tasks.spawn(tasks::probe_peers(
            p.clone(),
            informer.clone(),
            present.clone(),
            reconciler.clone(),
            cluster.clone(),
            dataplane.clone(),
        ));
    }
    let app = Arc::new(App {
        cluster: cluster.clone(),
        reconciler: reconciler.clone(),
        dataplane: dataplane.clone(),
        netns_dir: cfg.netns_dir(),
        hostname,
        capabilities: caps,
        dns: dns_core.clone(),
        events,
        prober: prober.clone(),
        present: prober.is_some().then(|| present.clone()),
        ports_lock: Default::default(),
        drain: cfg.drain,
        drains: Default::default(),
    });
    let service = Arc::new(AgentService { app: app.clone() });
    let docker_socket = match &cfg.docker_plugin {
        Some(path) => start_docker_driver(app.clone(), path, &cfg.docker_host, cfg.resync_interval, &mut tasks).await,
        None => None,
    };

    // The in-kernel DNS path answers as the server does, RA included; off
    // (and emptied: its pinned table outlives the agent) when not wanted.
    let forwards = dns_core.as_ref().is_some_and(|c| c.forwards());
    if let Err(e) = dataplane.dns_config(dns_kernel, forwards) {
        tracing::warn!(error = %e, "the in-kernel DNS path could not be configured");
    }
    if !dns_kernel && let Err(e) = dataplane.sync_dns(&Default::default()) {
        tracing::warn!(error = %e, "emptying the in-kernel DNS table");
    }

    // Service discovery: the zone follows the informer's views.
    if let Some(core) = &dns_core {
        let listeners = trellis_dns::Listeners::new(core.clone(), cfg.dns_port);
        tracing::info!(port = cfg.dns_port, upstreams = ?cfg.dns_upstream.servers, "DNS on every network's gateway");
        let kernel = dns_kernel.then(|| dataplane.clone());
        tasks.spawn(crate::dns::run(informer.clone(), Some(present.clone()), core.clone(), listeners, kernel));
    }

    let xfrm_seen = crate::telemetry::metrics::XfrmSeen::default();
    if let Some(addr) = cfg.metrics_addr {
        let collector = crate::telemetry::metrics::AgentCollector {
            reconciler: reconciler.clone(),
            dns: dns_core.clone(),
            dataplane: dataplane.clone(),
            snapshot: Default::default(),
            prober: prober.clone(),
            esp_seq_threshold: cfg.esp_seq_threshold,
            xfrm: xfrm_seen.clone(),
        };
        start_metrics(
            addr,
            store_metrics,
            collector,
            cluster.clone(),
            informer.clone(),
            cfg.resync_interval,
            &mut tasks,
        )
        .await;
    }

    let every = cfg.resync_interval;
    tasks.spawn(tasks::resync(reconciler.clone(), cluster.clone(), dataplane.clone(), every));
    tasks.spawn(tasks::reclaim_dead_hosts(cluster.clone(), informer.clone(), present, cfg.reclaim_grace, every));
    tasks.spawn(tasks::rotate_keys(
        cluster.clone(),
        informer.clone(),
        dataplane.clone(),
        cfg.key_rotation,
        cfg.esp_seq_threshold,
        xfrm_seen,
    ));
    tasks.spawn(tasks::finish_drains(cluster.clone(), informer.clone(), app.drains.clone(), every));
    tasks.spawn(tasks::sweep_flows(dataplane.clone()));
    tasks.spawn(tasks::follow_store(reconciler, informer, cluster, dataplane));

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping, datapath left in place"),
            _ = int.recv() => tracing::info!("SIGINT: stopping, datapath left in place"),
        }
    };
    tracing::info!(host = %host, socket = %cfg.socket.display(), store = store.backend(), "trellisd serving");
    let served = tonic::transport::Server::builder()
        .add_service(AgentServer::from_arc(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("serving the agent API");
    // The one shutdown path: every loop stops, the sockets go; the
    // datapath stays.
    tasks.shutdown().await;
    if let Some(path) = docker_socket {
        let _ = std::fs::remove_file(path);
    }
    let _ = std::fs::remove_file(&cfg.socket);
    served
}

/// The state and run directories (root only), and this host's id.
fn prepare_dirs(cfg: &Config) -> anyhow::Result<String> {
    for dir in [&cfg.state_dir, &cfg.run_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", dir.display()))?;
    }
    match &cfg.host_id {
        Some(h) => Ok(h.clone()),
        None => crate::daemon::config::host_id(&cfg.state_dir).context("reading the host id"),
    }
}

/// The kernel boundary, with the eBPF endpoint program if it is wanted and
/// loads (maps and links pinned in a bpffs of this agent's own, under its
/// run dir: they outlive the agent); without it, what an earlier run left
/// of it goes.
fn open_datapath(cfg: &Config) -> anyhow::Result<(NetlinkDataplane, bool)> {
    let netlink = NetlinkDataplane::new().context("opening netlink")?;
    let (netlink, ebpf) = if !cfg.ebpf {
        (netlink, false)
    } else {
        match netlink.with_ebpf(&cfg.run_dir.join("bpf"), cfg.ebpf_attach, cfg.flows_per_endpoint) {
            Ok(n) => (n, true),
            Err(e) => {
                tracing::warn!(error = %e, "the eBPF endpoint program is not available; endpoints run without it");
                (NetlinkDataplane::new().context("opening netlink")?, false)
            }
        }
    };
    if !ebpf {
        crate::dataplane::linux::remove_leftover_datapath(&cfg.run_dir.join("bpf"));
    }
    Ok((netlink, ebpf))
}

/// The API's unix socket, root only (a stale one from a killed agent is
/// replaced).
fn bind_api(socket: &std::path::Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing a stale socket {}", socket.display())),
    }
    let listener = UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", socket.display()))?;
    Ok(listener)
}

/// Metrics on `addr`, refreshed every `every`; a server that cannot start
/// is logged, not fatal.
async fn start_metrics(
    addr: std::net::SocketAddr,
    store_metrics: crate::telemetry::metrics::StoreMetrics,
    collector: crate::telemetry::metrics::AgentCollector,
    cluster: Arc<Cluster>,
    informer: Arc<crate::state::informer::Informer>,
    every: Duration,
    tasks: &mut JoinSet<()>,
) {
    let mut registry = prometheus_client::registry::Registry::default();
    store_metrics.register(&mut registry);
    let snapshot = collector.snapshot.clone();
    registry.register_collector(Box::new(collector));
    match crate::telemetry::metrics::serve(Arc::new(registry), addr).await {
        Ok(serving) => {
            tracing::info!(%addr, "metrics on /metrics");
            tasks.spawn(serving);
            tasks.spawn(crate::telemetry::metrics::refresh(cluster, informer, snapshot, every));
        }
        Err(e) => tracing::warn!(%addr, error = %e, "the metrics server could not start"),
    }
}

/// Can this host carry encrypted networks? Probed once at start (the
/// reason when not): they are refused clearly without ESP.
async fn probe_esp(dp: Arc<dyn Dataplane>) -> Option<String> {
    let unsupported = match tokio::task::spawn_blocking(move || dp.esp_support()).await {
        Ok(Ok(())) => None,
        Ok(Err(why)) => Some(why),
        Err(e) => Some(format!("the probe failed: {e}")),
    };
    match &unsupported {
        None => tracing::info!("IPsec ESP available: encrypted networks can be carried"),
        Some(why) => tracing::warn!(reason = %why, "no IPsec ESP: encrypted networks will be refused on this host"),
    }
    unsupported
}

/// Docker's network and IPAM driver on `socket`; the socket it serves on
/// (removed at shutdown), or none if it could not start (logged: Docker
/// then cannot use Trellis networks on this host).
async fn start_docker_driver(
    app: Arc<App>,
    socket: &std::path::Path,
    docker_host: &std::path::Path,
    resync: std::time::Duration,
    tasks: &mut JoinSet<()>,
) -> Option<std::path::PathBuf> {
    let engine = crate::api::docker::engine::Engine { socket: docker_host.to_path_buf() };
    let driver = crate::api::docker::DockerDriver::new(app, engine);
    match crate::api::docker::serve(driver.clone(), socket).await {
        Ok(serving) => {
            tracing::info!(socket = %socket.display(), "Docker network and IPAM driver \"trellis\" serving");
            tasks.spawn(serving);
            // One engine request per Docker network with endpoints: no
            // more often than every 2 s.
            tasks.spawn(tasks::sweep_docker(driver.clone(), resync.max(std::time::Duration::from_secs(2))));
            // Containers with a HEALTHCHECK back their services while healthy.
            tasks.spawn(driver.follow_health());
            Some(socket.to_path_buf())
        }
        Err(e) => {
            tracing::warn!(socket = %socket.display(), error = %e, "the Docker driver could not start; Docker cannot use Trellis networks on this host");
            None
        }
    }
}
