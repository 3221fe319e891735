//! Prometheus metrics of the agent (`prometheus-client`), served over HTTP
//! on `--metrics-addr`.
//!
//! Counters the agent keeps itself (store calls) are prometheus-client
//! metrics; everything read from elsewhere (the reconciler, DNS counters,
//! the eBPF maps, IPAM usage) is encoded at scrape time by a collector
//! from state that is already in memory — a scrape never waits on the
//! store or the kernel's netlink.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use trellis_store::{Compare, KeyValue, LeaseId, Op, Revision, Store, StoreError, TxnOutcome, WatchStream};

use crate::reconcile::Reconciler;
use crate::state::Cluster;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

/// Store calls: latency and errors by operation.
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    latency: Family<OpLabels, Histogram>,
    errors: Family<OpLabels, Counter>,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        StoreMetrics {
            latency: Family::new_with_constructor(|| {
                Histogram::new([0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0])
            }),
            errors: Family::default(),
        }
    }
}

impl StoreMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("trellis_store_request_duration_seconds", "Store calls by operation.", self.latency.clone());
        registry.register("trellis_store_errors", "Failed store calls by operation.", self.errors.clone());
    }
}

/// A store that measures every call of the one it wraps.
pub struct MeteredStore {
    inner: Arc<dyn Store>,
    m: StoreMetrics,
}

impl MeteredStore {
    pub fn new(inner: Arc<dyn Store>, m: StoreMetrics) -> MeteredStore {
        MeteredStore { inner, m }
    }

    fn done<T>(&self, op: &'static str, t0: Instant, r: &Result<T, StoreError>) {
        let l = OpLabels { op };
        self.m.latency.get_or_create(&l).observe(t0.elapsed().as_secs_f64());
        if r.is_err() {
            self.m.errors.get_or_create(&l).inc();
        }
    }
}

#[async_trait::async_trait]
impl Store for MeteredStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let t0 = Instant::now();
        let r = self.inner.get(key).await;
        self.done("get", t0, &r);
        r
    }
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let t0 = Instant::now();
        let r = self.inner.list(prefix).await;
        self.done("list", t0, &r);
        r
    }
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        let t0 = Instant::now();
        let r = self.inner.txn(compares, ops).await;
        self.done("txn", t0, &r);
        r
    }
    async fn watch(&self, prefix: &str, start: Revision) -> Result<WatchStream, StoreError> {
        let t0 = Instant::now();
        let r = self.inner.watch(prefix, start).await;
        self.done("watch", t0, &r);
        r
    }
    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let t0 = Instant::now();
        let r = self.inner.lease_grant(ttl).await;
        self.done("lease_grant", t0, &r);
        r
    }
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let t0 = Instant::now();
        let r = self.inner.lease_keep_alive(lease).await;
        self.done("lease_keep_alive", t0, &r);
        r
    }
    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let t0 = Instant::now();
        let r = self.inner.lease_revoke(lease).await;
        self.done("lease_revoke", t0, &r);
        r
    }
    async fn lease_time_to_live(&self, lease: LeaseId) -> Result<Option<(Duration, Duration)>, StoreError> {
        let t0 = Instant::now();
        let r = self.inner.lease_time_to_live(lease).await;
        self.done("lease_time_to_live", t0, &r);
        r
    }
}

/// What the collector reports that needs the store to compute: refreshed
/// in the background, read at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Per network: name, addresses taken, addresses usable, endpoints on
    /// this host.
    pub networks: Vec<(String, u64, u64, u64)>,
    pub peers: u64,
    /// VIP services: name and datapath id.
    pub services: Vec<(String, u32)>,
    /// Encrypted networks: name, VXLAN port, the epoch senders use.
    pub keys: Vec<(String, u16, u32)>,
    /// This host's endpoints by host-side interface: endpoint name and
    /// network name (the labels of per-endpoint datapath metrics).
    pub endpoints: std::collections::HashMap<String, (String, String)>,
}

/// The scrape-time part.
pub struct AgentCollector {
    pub reconciler: Arc<Reconciler>,
    pub dns: Option<Arc<trellis_dns::Core>>,
    pub dataplane: Arc<dyn crate::dataplane::Dataplane>,
    pub snapshot: Arc<RwLock<Snapshot>>,
    pub prober: Option<Arc<crate::telemetry::probe::Prober>>,
    /// Packets an outbound SA may send before its network's key rotates.
    pub esp_seq_threshold: u64,
    /// The SAs as last read back from the kernel (by the key rotation's
    /// loop, twice a second while an encrypted network exists): fresher
    /// than the reconciler's full passes, which a slow host spaces out.
    pub xfrm: XfrmSeen,
}

/// The kernel's SAs and policies as last read, shared.
pub type XfrmSeen = Arc<RwLock<Option<trellis_ipsec::ObservedXfrm>>>;

impl std::fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentCollector")
    }
}

fn counter(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

impl AgentCollector {
    /// Reconcile passes: how many, their repairs, errors and durations.
    fn encode_reconcile(&self, enc: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        let r = &self.reconciler;
        let last = r.last();
        counter(enc, "trellis_reconcile_passes", "Reconcile passes run.", last.generation)?;
        counter(
            enc,
            "trellis_reconcile_repairs",
            "Kernel changes made by reconcile passes.",
            r.repairs.load(Ordering::Relaxed),
        )?;
        gauge(enc, "trellis_reconcile_last_errors", "Errors of the last pass.", last.errors.len() as i64)?;
        {
            let g = ConstGauge::new(last.duration.as_secs_f64());
            g.encode(enc.encode_descriptor(
                "trellis_reconcile_last_duration_seconds",
                "Duration of the last pass.",
                None,
                g.metric_type(),
            )?)?;
            let g = ConstGauge::new(r.last_full_us.load(Ordering::Relaxed) as f64 / 1e6);
            g.encode(enc.encode_descriptor(
                "trellis_reconcile_last_full_duration_seconds",
                "Duration of the last full pass (the kernel read back).",
                None,
                g.metric_type(),
            )?)?;
        }

        Ok(())
    }

    /// Peers and what the probes say of each.
    fn encode_peers(&self, enc: &mut DescriptorEncoder<'_>, snap: &Snapshot) -> std::fmt::Result {
        gauge(enc, "trellis_peers", "Other live hosts of the cluster.", snap.peers as i64)?;
        if let Some(p) = &self.prober {
            let peers = p.all();
            let mut m = enc.encode_descriptor(
                "trellis_peer_reachable",
                "1 while the peer's underlay address (its tunnel endpoint) answers this host's ICMP probes.",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (peer, h) in &peers {
                let up = !h.underlay_down(crate::telemetry::probe::MISSED_FOR_DOWN) as i64;
                ConstGauge::new(up).encode(m.encode_family(&[("peer", peer.as_str())])?)?;
            }
            let mut m = enc.encode_descriptor(
                "trellis_peer_probe_rtt_seconds",
                "Round trip of the last answered probe of the peer's tunnel endpoint.",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (peer, h) in &peers {
                if let Some(rtt) = h.rtt {
                    ConstGauge::new(rtt.as_secs_f64()).encode(m.encode_family(&[("peer", peer.as_str())])?)?;
                }
            }
            let mut m = enc.encode_descriptor(
                "trellis_peer_tunnel_reachable",
                "1 while the peer answers probes sent through the VXLAN tunnel (the probe device).",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (peer, h) in peers.iter().filter(|(_, h)| h.tunnel.sent > 0) {
                let up = !h.tunnel_down(crate::telemetry::probe::MISSED_FOR_DOWN) as i64;
                ConstGauge::new(up).encode(m.encode_family(&[("peer", peer.as_str())])?)?;
            }
            let mut m = enc.encode_descriptor(
                "trellis_peer_tunnel_rtt_seconds",
                "Round trip of the last answered probe through the VXLAN tunnel.",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (peer, h) in &peers {
                if let Some(rtt) = h.tunnel.rtt {
                    ConstGauge::new(rtt.as_secs_f64()).encode(m.encode_family(&[("peer", peer.as_str())])?)?;
                }
            }
        }
        Ok(())
    }

    /// Addresses per network, taken and usable, and local endpoints.
    fn encode_ipam(&self, enc: &mut DescriptorEncoder<'_>, snap: &Snapshot) -> std::fmt::Result {
        for (name, help, idx) in [
            ("trellis_ipam_addresses_allocated", "Addresses taken in a network (cluster-wide).", 0),
            ("trellis_ipam_addresses_usable", "Addresses a network can hand out.", 1),
            ("trellis_endpoints_local", "Endpoints of a network on this host.", 2),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Gauge)?;
            for (net, taken, usable, local) in &snap.networks {
                let v = [*taken, *usable, *local][idx] as i64;
                ConstGauge::new(v).encode(m.encode_family(&[("network", net.as_str())])?)?;
            }
        }

        Ok(())
    }

    fn encode_tunnels(&self, enc: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        let r = &self.reconciler;
        // Tunnel health: FDB entries that should exist vs those that do.
        let want = r.last_desired();
        let seen = r.seen();
        let (mut programmed, mut pending) = (0i64, 0i64);
        for (name, v) in &want.vxlans {
            for f in &v.fdb {
                if seen.links.get(name).is_some_and(|l| l.fdb.contains(f)) {
                    programmed += 1;
                } else {
                    pending += 1;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "trellis_tunnel_entries",
                "FDB entries towards other hosts, by state.",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            ConstGauge::new(programmed).encode(m.encode_family(&[("state", "programmed")])?)?;
            ConstGauge::new(pending).encode(m.encode_family(&[("state", "pending")])?)?;
        }

        Ok(())
    }

    fn encode_encryption(&self, enc: &mut DescriptorEncoder<'_>, snap: &Snapshot) -> std::fmt::Result {
        // Encryption: the key epoch in use, SAs, and how many packets the
        // busiest outbound SA may still send before the key rotates.
        if !snap.keys.is_empty() {
            let mut m = enc.encode_descriptor(
                "trellis_esp_key_epoch",
                "The key epoch senders of an encrypted network use.",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (net, _, epoch) in &snap.keys {
                ConstGauge::new(*epoch as i64).encode(m.encode_family(&[("network", net.as_str())])?)?;
            }
            let want = self.reconciler.last_desired();
            let read = self.xfrm.read().unwrap_or_else(|p| p.into_inner()).clone();
            let xfrm = read.unwrap_or_else(|| self.reconciler.seen().xfrm);
            let me = want.xfrm.sas.values().find(|sa| sa.dir == trellis_ipsec::Dir::Out).map(|sa| sa.src);
            let mut m = enc.encode_descriptor(
                "trellis_esp_sas",
                "IPsec SAs of an encrypted network on this host, by direction.",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (net, port, _) in &snap.keys {
                let reqid = trellis_ipsec::xfrm::reqid(*port);
                let ours: Vec<_> = xfrm.sas.values().filter(|sa| sa.reqid == reqid).collect();
                let out = ours.iter().filter(|sa| Some(sa.src) == me).count() as i64;
                ConstGauge::new(out).encode(m.encode_family(&[("network", net.as_str()), ("direction", "out")])?)?;
                let inb = ours.len() as i64 - out;
                ConstGauge::new(inb).encode(m.encode_family(&[("network", net.as_str()), ("direction", "in")])?)?;
            }
            let mut m = enc.encode_descriptor(
                "trellis_esp_seq_headroom",
                "Packets the busiest outbound SA of a network may send before its key rotates.",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (net, port, _) in &snap.keys {
                let reqid = trellis_ipsec::xfrm::reqid(*port);
                let used = xfrm.sas.values().filter(|sa| sa.reqid == reqid).map(|sa| sa.oseq).max().unwrap_or(0);
                let left = self.esp_seq_threshold.saturating_sub(used).min(i64::MAX as u64) as i64;
                ConstGauge::new(left).encode(m.encode_family(&[("network", net.as_str())])?)?;
            }
        }

        Ok(())
    }

    fn encode_dns(&self, enc: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        if let Some(dns) = &self.dns {
            let mut m = enc.encode_descriptor(
                "trellis_dns_queries",
                "DNS queries by path and outcome.",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (outcome, v) in dns.stats.snapshot() {
                let path = if outcome.starts_with("forward") { "forwarded" } else { "userspace" };
                ConstCounter::new(v).encode(m.encode_family(&[("path", path), ("outcome", outcome)])?)?;
            }
            // Answered in the eBPF program (the rest of what it saw went on
            // to the server and is counted there).
            if let Some(k) = self.dataplane.dns_stats() {
                ConstCounter::new(k.answered)
                    .encode(m.encode_family(&[("path", "kernel"), ("outcome", "local_answered")])?)?;
            }
        }

        Ok(())
    }

    /// Per-endpoint and per-service counters from the eBPF maps.
    fn encode_datapath(&self, enc: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        // Per-endpoint counters from the eBPF maps (none with --ebpf=false).
        let counters = self.dataplane.endpoint_counters();
        if !counters.is_empty() {
            for (name, help, pick) in [
                ("trellis_endpoint_packets_out", "Packets the endpoint sent.", 0usize),
                ("trellis_endpoint_bytes_out", "Bytes the endpoint sent.", 1),
                ("trellis_endpoint_packets_in", "Packets delivered to the endpoint.", 2),
                ("trellis_endpoint_bytes_in", "Bytes delivered to the endpoint.", 3),
            ] {
                let mut m = enc.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Counter)?;
                for (ifname, c) in &counters {
                    let v = [c.from_packets, c.from_bytes, c.to_packets, c.to_bytes][pick];
                    ConstCounter::new(v).encode(m.encode_family(&[("interface", ifname.as_str())])?)?;
                }
            }
            let mut m = enc.encode_descriptor(
                "trellis_endpoint_drops",
                "Packets the endpoint program dropped, by reason.",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (ifname, c) in &counters {
                for r in trellis_ebpf::DropReason::ALL {
                    ConstCounter::new(c.dropped(r))
                        .encode(m.encode_family(&[("interface", ifname.as_str()), ("reason", r.name())])?)?;
                }
            }
            let snap = self.snapshot.read().unwrap_or_else(|p| p.into_inner()).clone();
            let mut m = enc.encode_descriptor(
                "trellis_datapath_table_full",
                "Times an endpoint found its share of a shared table spent: a new flow refused (conntrack, \
                 reverse_nat) or a monitor event not sent (monitor_events).",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (ifname, c) in &counters {
                let (endpoint, network) =
                    snap.endpoints.get(ifname).map(|(e, n)| (e.as_str(), n.as_str())).unwrap_or((ifname.as_str(), ""));
                for t in trellis_ebpf::Table::ALL {
                    ConstCounter::new(c.full(t)).encode(m.encode_family(&[
                        ("table", t.name()),
                        ("endpoint", endpoint),
                        ("network", network),
                        ("interface", ifname.as_str()),
                    ])?)?;
                }
            }
            let services = snap.services.clone();
            let stats: Vec<(String, trellis_ebpf::SvcStats)> =
                services.into_iter().filter_map(|(name, id)| Some((name, self.dataplane.service_stats(id)?))).collect();
            for (name, help, pick) in [
                ("trellis_service_backend_selections", "New flows given a backend by this host's datapath.", 0usize),
                ("trellis_service_flow_resets", "Flows reset because their backend left.", 1),
            ] {
                let mut m = enc.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Counter)?;
                for (svc, st) in &stats {
                    let v = [st.selections, st.resets][pick];
                    ConstCounter::new(v).encode(m.encode_family(&[("service", svc.as_str())])?)?;
                }
            }
        }
        Ok(())
    }
}

impl Collector for AgentCollector {
    /// One function per family of metrics.
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snap = self.snapshot.read().unwrap_or_else(|p| p.into_inner()).clone();
        self.encode_reconcile(&mut enc)?;
        self.encode_peers(&mut enc, &snap)?;
        self.encode_ipam(&mut enc, &snap)?;
        self.encode_tunnels(&mut enc)?;
        self.encode_encryption(&mut enc, &snap)?;
        self.encode_dns(&mut enc)?;
        self.encode_datapath(&mut enc)
    }
}

/// Keep the snapshot current: from the informer's view, looked at every
/// `every`, recomputed when its records changed and at least every
/// [`IPAM_EVERY`] (the IPAM's address counts are listed from the store then).
pub async fn refresh(
    cluster: Arc<Cluster>,
    informer: Arc<crate::state::informer::Informer>,
    snapshot: Arc<RwLock<Snapshot>>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    let mut last: Option<(Arc<crate::state::informer::View>, std::time::Instant)> = None;
    loop {
        tick.tick().await;
        let v = informer.view();
        if last.as_ref().is_some_and(|(l, at)| l.same_records(&v) && at.elapsed() < IPAM_EVERY) {
            continue;
        }
        let mut out = Snapshot::default();
        for n in v.networks.iter() {
            let taken = cluster.ipam.addresses(&n.id).await.map(|a| a.len() as u64).unwrap_or(0);
            let usable = trellis_ipam::pure::size(&n.subnet).saturating_sub(2) as u64;
            let local =
                v.endpoints.iter().filter(|e| !e.deleting && e.network_id == n.id && e.host == cluster.host).count()
                    as u64;
            out.networks.push((n.name.clone(), taken, usable, local));
        }
        out.endpoints = v
            .endpoints
            .iter()
            .filter(|e| e.host == cluster.host)
            .map(|e| (crate::model::host_ifname(&e.id), (e.name.clone(), e.network.clone())))
            .collect();
        out.services = v.services.iter().filter_map(|s| Some((s.name.clone(), s.datapath_id()?))).collect();
        out.keys = v
            .networks
            .iter()
            .filter(|n| n.encrypted)
            .filter_map(|n| Some((n.name.clone(), n.vxlan_port?, v.keys.get(&n.id)?.tx)))
            .collect();
        out.peers = v.hosts.iter().filter(|h| h.id != cluster.host).count() as u64;
        *snapshot.write().unwrap_or_else(|p| p.into_inner()) = out;
        last = Some((v, std::time::Instant::now()));
    }
}

/// The metrics' IPAM counts are listed at least this often.
pub const IPAM_EVERY: Duration = Duration::from_secs(300);

/// OpenMetrics text (what prometheus-client writes) as the Prometheus text
/// format 0.0.4, for clients that do not ask for OpenMetrics (and for
/// `promtool check metrics`): counter families are named with their
/// `_total` suffix in HELP/TYPE, and `# UNIT`/`# EOF` go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{p}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Serve `/metrics` on `addr`: OpenMetrics when the client asks for it,
/// the Prometheus text format otherwise.
/// Binds at once (an error is the caller's to report); the returned future
/// serves until dropped.
pub async fn serve(
    registry: Arc<Registry>,
    addr: SocketAddr,
) -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &registry) {
                    return (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                        format!("encoding metrics: {e}"),
                    );
                }
                let openmetrics = headers
                    .get(axum::http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("application/openmetrics-text"));
                if openmetrics {
                    (
                        axum::http::StatusCode::OK,
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                } else {
                    (
                        axum::http::StatusCode::OK,
                        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                        to_prometheus_text(&body),
                    )
                }
            }
        }),
    );
    Ok(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_counters_become_prometheus_counters() {
        let om = "# HELP a_total_x Things.\n# TYPE a_total_x counter\na_total_x_total{k=\"v\"} 3\n\
                  # HELP g A gauge.\n# TYPE g gauge\n# UNIT g seconds\ng 1.5\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_total_x_total Things.\n# TYPE a_total_x_total counter\na_total_x_total{k=\"v\"} 3\n\
             # HELP g A gauge.\n# TYPE g gauge\ng 1.5\n"
        );
    }
}
