//! `trellisd`: wiring and lifecycle. The agent owns no kernel state in
//! memory: it starts, reconciles (adopting whatever is there), serves, and
//! on SIGTERM stops serving and leaves the datapath exactly as it is.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;
use trellis_plugin_api::proto::agent_server::AgentServer;
use trellis_store::{EtcdConfig, EtcdStore, LocalStore, Store};

use crate::api::{AgentService, settle};
use crate::cluster::Cluster;
use crate::config::{Config, StoreSpec};
use crate::dataplane::Dataplane;
use crate::model;
use crate::model::HostRecord;
use crate::netlink::NetlinkDataplane;
use crate::reconcile::{Identity, Reconciler};

async fn open_store(cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match &cfg.store {
        StoreSpec::Memory => Arc::new(LocalStore::memory()),
        StoreSpec::Embedded => Arc::new(
            LocalStore::open_redb(&cfg.store_path())
                .with_context(|| format!("opening the embedded store {}", cfg.store_path().display()))?,
        ),
        StoreSpec::Etcd(spec) => {
            let mut ecfg = EtcdConfig::parse(spec)?;
            if let Some(tls) = &cfg.etcd_tls {
                ecfg.tls = Some(tls.clone());
            }
            Arc::new(EtcdStore::connect(&ecfg).await.with_context(|| format!("connecting to {spec}"))?)
        }
    })
}

fn capabilities() -> HashMap<String, bool> {
    let nft = std::process::Command::new("nft").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    HashMap::from([("nftables".to_string(), nft), ("tcx".to_string(), tcx_kernel(&kernel_release()))])
}

fn kernel_release() -> String {
    nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default()
}

/// tcx links (BPF_LINK_TYPE_TCX) came with Linux 6.6.
fn tcx_kernel(release: &str) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    matches!((parts.next(), parts.next()), (Some(major), Some(minor)) if (major, minor) >= (6, 6))
}

/// Namespaces the agent created for attaches that died before their
/// endpoint was written (the agent was killed in between) belong to no
/// endpoint: removed before serving. A store that cannot be read leaves
/// them for the next start.
async fn remove_orphan_namespaces(cluster: &Cluster, dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let owned: std::collections::HashSet<std::path::PathBuf> = match cluster.all_endpoints().await {
        Ok(eps) => eps.into_iter().filter(|e| e.managed_netns).map(|e| e.netns).collect(),
        Err(e) => {
            tracing::debug!(error = %e, "not collecting orphan namespaces: the store is unavailable");
            return;
        }
    };
    for e in entries.flatten() {
        let path = e.path();
        if !owned.contains(&path) {
            match crate::netns::remove(&path) {
                Ok(()) => tracing::info!(netns = %path.display(), "removed a namespace no endpoint owns"),
                Err(err) => tracing::warn!(netns = %path.display(), error = %err, "removing an orphan namespace"),
            }
        }
    }
}

/// Kernel limits that are one for the whole host and too small for a
/// thousand endpoints per host, raised (never lowered) when the agent runs
/// in the initial network namespace (elsewhere the files are not writable
/// and the host's settings stand):
/// * the neighbour table (1,024 entries by default, shared by every
///   namespace: each container holds entries for its gateway and peers and
///   the host one per container) — past it ARP fails ("neighbour table
///   overflow");
/// * the per-CPU receive backlog (1,000 packets by default): a broadcast on
///   a bridge is cloned to every port at once, and on a network of a
///   thousand endpoints the clones past the backlog are dropped — ARP to
///   the oldest ports (flooded last) never arrives.
pub const HOST_LIMITS: [(&str, u64); 4] = [
    ("/proc/sys/net/ipv4/neigh/default/gc_thresh1", 1024),
    ("/proc/sys/net/ipv4/neigh/default/gc_thresh2", 8192),
    ("/proc/sys/net/ipv4/neigh/default/gc_thresh3", 16384),
    ("/proc/sys/net/core/netdev_max_backlog", 4096),
];

fn raise_host_limits() {
    for (path, want) in HOST_LIMITS {
        let Ok(now) = std::fs::read_to_string(path) else { continue };
        let now: u64 = now.trim().parse().unwrap_or(0);
        if now >= want {
            continue;
        }
        match std::fs::write(path, want.to_string()) {
            Ok(()) => tracing::info!(sysctl = path, from = now, to = want, "raised a host limit"),
            Err(e) => tracing::debug!(sysctl = path, error = %e, "cannot raise a host limit here"),
        }
    }
}

/// Run the agent until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("trellisd must run as root: it creates network devices and namespaces");
    }
    for dir in [&cfg.state_dir, &cfg.run_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", dir.display()))?;
    }
    raise_host_limits();
    let host = match &cfg.host_id {
        Some(h) => h.clone(),
        None => crate::config::host_id(&cfg.state_dir).context("reading the host id")?,
    };
    let store_metrics = crate::metrics::StoreMetrics::default();
    let store: Arc<dyn Store> =
        Arc::new(crate::metrics::MeteredStore::new(open_store(&cfg).await?, store_metrics.clone()));
    let netlink = NetlinkDataplane::new().context("opening netlink")?;
    // The eBPF endpoint program, with maps and links pinned in a bpffs of
    // this agent's own (under its run dir): they outlive the agent.
    let (netlink, ebpf) = if !cfg.ebpf {
        (netlink, false)
    } else {
        match netlink.with_ebpf(&cfg.run_dir.join("bpf"), cfg.ebpf_attach) {
            Ok(n) => (n, true),
            Err(e) => {
                tracing::warn!(error = %e, "the eBPF endpoint program is not available; endpoints run without it");
                (NetlinkDataplane::new().context("opening netlink")?, false)
            }
        }
    };
    if !ebpf {
        crate::netlink::remove_leftover_datapath(&cfg.run_dir.join("bpf"));
    }
    // Flow and drop events of the eBPF program, for `trellisctl monitor`.
    let (events, events_task) = match netlink.take_event_ring() {
        Some(ring) => {
            let (tx, _) = tokio::sync::broadcast::channel(4096);
            (Some(tx.clone()), Some(tokio::spawn(crate::monitor::read_events(ring, tx))))
        }
        None => (None, None),
    };
    let dataplane: Arc<dyn Dataplane> = Arc::new(netlink);
    // Monitor events cost the datapath a wakeup of this process each: on
    // while a `trellisctl monitor` watches (the API turns them on), off
    // within a second of the last one leaving.
    if let Some(tx) = &events {
        let (tx, dp) = (tx.clone(), dataplane.clone());
        dp.set_events(false);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                if tx.receiver_count() == 0 {
                    dp.set_events(false);
                }
            }
        });
    }
    let mut cluster = Cluster::new(store.clone(), &host, cfg.default_pool, cfg.default_prefix_len);
    // Encrypted networks need ESP: probed once, refused clearly without it.
    cluster.esp_unsupported = match tokio::task::spawn_blocking(crate::xfrm::esp_support).await {
        Ok(Ok(())) => None,
        Ok(Err(why)) => Some(why),
        Err(e) => Some(format!("the probe failed: {e}")),
    };
    match &cluster.esp_unsupported {
        None => tracing::info!("IPsec ESP available: encrypted networks can be carried"),
        Some(why) => tracing::warn!(reason = %why, "no IPsec ESP: encrypted networks will be refused on this host"),
    }
    let cluster = Arc::new(cluster);
    let hostname = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    let underlay = match cfg.advertise_addr {
        Some(a) => Some(a),
        None => dataplane.underlay_addr().await.context("finding the underlay address")?,
    };
    let vtep_mac = crate::hosts::vtep_mac(&cfg.state_dir).context("reading the VTEP MAC")?;
    let identity = Identity {
        dns_intercept: cfg.dns && cfg.dns_port == 53,
        dns_kernel: ebpf && cfg.dns && cfg.dns_port == 53 && cfg.dns_kernel,
        host: host.clone(),
        underlay,
        vtep_mac: model::parse_mac(&vtep_mac).expect("vtep_mac() returns a valid MAC"),
        vxlan_port: cfg.vxlan_port,
        ebpf,
    };
    let mut caps = capabilities();
    caps.insert("ebpf".to_string(), ebpf);
    caps.insert("esp".to_string(), cluster.esp_unsupported.is_none());
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
    };
    let lease = match crate::hosts::register(store.as_ref(), &record, cfg.lease_ttl).await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "registering this host failed; retrying in the background");
            None
        }
    };
    let registration = tokio::spawn(crate::hosts::keep_registered(store.clone(), record, cfg.lease_ttl, lease));
    tracing::info!(host = %host, underlay = ?underlay, "host identity");
    let dns_kernel = identity.dns_kernel;
    let reconciler = Arc::new(Reconciler::new(dataplane.clone(), cluster.clone(), identity));

    // Adopt what the kernel has before serving anything.
    match reconciler.pass().await {
        Ok(r) => tracing::info!(actions = r.actions, errors = r.errors.len(), "initial reconcile"),
        Err(e) => tracing::warn!(error = %e, "initial reconcile failed; retrying in the background"),
    }
    remove_orphan_namespaces(&cluster, &cfg.netns_dir()).await;

    if let Some(parent) = cfg.socket.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::remove_file(&cfg.socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing a stale socket {}", cfg.socket.display())),
    }
    let listener = UnixListener::bind(&cfg.socket).with_context(|| format!("binding {}", cfg.socket.display()))?;
    std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", cfg.socket.display()))?;

    let dns_core = cfg.dns.then(|| trellis_dns::Core::new(&cfg.dns_upstream));
    // Probes of every peer's tunnel endpoint, once a second.
    let prober = Arc::new(crate::probe::Prober::default());
    let prober = match prober.start(Duration::from_secs(1)) {
        Ok(()) => {
            let (p, store, me) = (prober.clone(), store.clone(), host.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    if let Ok(hosts) = crate::hosts::live_hosts(store.as_ref()).await {
                        p.set_peers(
                            hosts
                                .into_iter()
                                .filter(|h| h.id != me)
                                .map(|h| {
                                    let mac = model::parse_mac(&h.vtep_mac);
                                    (h.id, h.underlay, mac)
                                })
                                .collect(),
                        );
                    }
                }
            });
            Some(prober)
        }
        Err(e) => {
            tracing::warn!(error = %e, "peer probes unavailable");
            None
        }
    };
    let service = Arc::new(AgentService {
        cluster: cluster.clone(),
        reconciler: reconciler.clone(),
        dataplane: dataplane.clone(),
        netns_dir: cfg.netns_dir(),
        hostname,
        capabilities: caps,
        dns: dns_core.clone(),
        events,
        prober: prober.clone(),
    });
    let docker = match &cfg.docker_plugin {
        None => None,
        Some(path) => {
            let driver = crate::docker::DockerDriver::new(
                service.clone(),
                crate::engine::Engine { socket: cfg.docker_host.clone() },
            );
            match crate::docker::serve(driver, path).await {
                Ok(task) => {
                    tracing::info!(socket = %path.display(), "Docker network and IPAM driver \"trellis\" serving");
                    Some(task)
                }
                Err(e) => {
                    tracing::warn!(socket = %path.display(), error = %e, "the Docker driver could not start; Docker cannot use Trellis networks on this host");
                    None
                }
            }
        }
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

    // Service discovery: the zone follows the store (every change notifies).
    let dns_changed = Arc::new(tokio::sync::Notify::new());
    let dns = dns_core.as_ref().map(|core| {
        let listeners = trellis_dns::Listeners::new(core.clone(), cfg.dns_port);
        tracing::info!(port = cfg.dns_port, upstreams = ?cfg.dns_upstream.servers, "DNS on every network's gateway");
        let kernel = dns_kernel.then(|| dataplane.clone());
        tokio::spawn(crate::dns::run(cluster.clone(), core.clone(), listeners, dns_changed.clone(), kernel))
    });

    // Metrics.
    let metrics = match cfg.metrics_addr {
        None => None,
        Some(addr) => {
            let mut registry = prometheus_client::registry::Registry::default();
            store_metrics.register(&mut registry);
            let snapshot = Arc::new(std::sync::RwLock::new(crate::metrics::Snapshot::default()));
            registry.register_collector(Box::new(crate::metrics::AgentCollector {
                reconciler: reconciler.clone(),
                dns: dns_core.clone(),
                dataplane: dataplane.clone(),
                snapshot: snapshot.clone(),
                prober: prober.clone(),
                esp_seq_threshold: cfg.esp_seq_threshold,
            }));
            let refresher = tokio::spawn(crate::metrics::refresh(cluster.clone(), snapshot, cfg.resync_interval));
            match crate::metrics::serve(Arc::new(registry), addr).await {
                Ok(task) => {
                    tracing::info!(%addr, "metrics on /metrics");
                    Some((task, refresher))
                }
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "the metrics server could not start");
                    refresher.abort();
                    None
                }
            }
        }
    };

    // Periodic full resync; it also collects endpoints whose netns died.
    let resync = {
        let reconciler = reconciler.clone();
        let cluster = cluster.clone();
        let every = cfg.resync_interval;
        let dns_changed = dns_changed.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                dns_changed.notify_one();
                match reconciler.full_pass().await {
                    Ok(r) => settle(&cluster, &r).await,
                    Err(e) => tracing::warn!(error = %e, "periodic reconcile failed"),
                }
            }
        })
    };

    // Dead hosts' addresses, blocks and endpoints are reclaimed once their
    // lease has expired and a grace period passed (any agent may do it; the
    // transaction holds only while the host is still absent).
    let reclaimer = {
        let cluster = cluster.clone();
        let grace = cfg.reclaim_grace;
        let every = cfg.resync_interval;
        tokio::spawn(async move {
            let mut dead_since: HashMap<String, std::time::Instant> = HashMap::new();
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let absent = match cluster.absent_owners().await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!(error = %e, "checking for dead hosts");
                        continue;
                    }
                };
                let now = std::time::Instant::now();
                dead_since.retain(|h, _| absent.contains(h));
                for h in absent {
                    let since = *dead_since.entry(h.clone()).or_insert(now);
                    if now.duration_since(since) >= grace {
                        match cluster.reclaim_host(&h).await {
                            Ok(n) => {
                                tracing::info!(host = %h, endpoints = n, "reclaimed a dead host's addresses");
                                dead_since.remove(&h);
                            }
                            Err(e) => tracing::warn!(host = %h, error = %e, "reclaiming a dead host"),
                        }
                    }
                }
            }
        })
    };

    // Key rotation of encrypted networks: every agent takes due steps (the
    // store's compare-and-swap makes one win); each host's acks come from
    // its passes. The sequence-number trigger reads this host's SAs.
    let rotator = {
        let cluster = cluster.clone();
        let policy = cfg.key_rotation;
        let threshold = cfg.esp_seq_threshold;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Ok(nets) = cluster.networks().await else { continue };
                if !nets.iter().any(|n| n.encrypted) {
                    continue;
                }
                let exhausted = match tokio::task::spawn_blocking(|| crate::xfrm::XfrmSocket::open()?.observe()).await {
                    Ok(Ok(x)) => crate::encryption::exhausted_networks(&nets, &x, threshold),
                    _ => Default::default(),
                };
                match cluster.drive_rotations(&policy, &exhausted).await {
                    Ok(steps) => {
                        for (net, step) in steps {
                            tracing::info!(network = %net, ?step, "key rotation step");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "driving key rotations"),
                }
            }
        })
    };

    // Store changes (from this host or any other) trigger a pass.
    let watcher = {
        let reconciler = reconciler.clone();
        let store = store.clone();
        let cluster = cluster.clone();
        let dns_changed = dns_changed.clone();
        tokio::spawn(async move {
            // Resume after the last event seen, so a broken watch (an etcd
            // restart) misses nothing; if that revision is compacted away,
            // start afresh and reconcile at once.
            let mut next: trellis_store::Revision = 0;
            loop {
                let mut w = match store.watch(model::ROOT, next).await {
                    Ok(w) => w,
                    Err(trellis_store::StoreError::Compacted { .. }) => {
                        next = 0;
                        if let Ok(r) = reconciler.pass().await {
                            settle(&cluster, &r).await;
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "watching the store failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                loop {
                    let ev = match w.next().await {
                        Some(Ok(ev)) => ev,
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "store watch broke; resubscribing");
                            break;
                        }
                        None => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            break;
                        }
                    };
                    next = next.max(ev.kv.mod_revision + 1);
                    // Fold a burst of events into one pass.
                    while let Ok(Some(Ok(ev))) = tokio::time::timeout(Duration::from_millis(1), w.next()).await {
                        next = next.max(ev.kv.mod_revision + 1);
                    }
                    dns_changed.notify_one();
                    match reconciler.pass().await {
                        Ok(r) => settle(&cluster, &r).await,
                        Err(e) => tracing::warn!(error = %e, "reconcile after a store change failed"),
                    }
                }
            }
        })
    };

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping, datapath left in place"),
            _ = int.recv() => tracing::info!("SIGINT: stopping, datapath left in place"),
        }
    };
    tracing::info!(host = %host, socket = %cfg.socket.display(), store = store.backend(), "trellisd serving");
    tonic::transport::Server::builder()
        .add_service(AgentServer::from_arc(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("serving the agent API")?;
    resync.abort();
    watcher.abort();
    registration.abort();
    reclaimer.abort();
    rotator.abort();
    if let Some(task) = dns {
        task.abort();
    }
    if let Some(task) = events_task {
        task.abort();
    }
    if let Some((a, b)) = metrics {
        a.abort();
        b.abort();
    }
    if let Some(task) = docker {
        task.abort();
        if let Some(path) = &cfg.docker_plugin {
            let _ = std::fs::remove_file(path);
        }
    }
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tcx_comes_with_linux_6_6() {
        for (release, tcx) in
            [("6.18.44-fc-v657", true), ("6.6.0", true), ("6.1.0-48-amd64", false), ("5.15.0", false), ("", false)]
        {
            assert_eq!(super::tcx_kernel(release), tcx, "{release}");
        }
    }
}
