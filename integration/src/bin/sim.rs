//! trellis-sim: many simulated hosts in one process against one real etcd.
//!
//! `--agents` of the `--hosts` run the agent's real control plane
//! ([`trellis_agent::daemon::simulated`]: store client, informer,
//! reconciler with its full diff over the fake kernel, IPAM, DNS zone, the
//! host's lease), each with its own etcd connection. The others are
//! registered hosts whose endpoints exist in the store, each with a watch
//! of its own on the endpoints (etcd sends every event to every host, as
//! it would to real agents) that counts what it receives. Simulating every
//! host in full would need each of them to hold the whole cluster in this
//! one process (1,000 hosts × 50,000 endpoints); the agents are a sample,
//! and what is per agent is measured on them.
//!
//! It reports, as a Markdown table and as JSON: how long a new endpoint
//! takes to be programmed on every agent (p50/p99), store requests, watch
//! events and bytes per endpoint change, CPU per change per agent, memory
//! per remote endpoint, a full resync, and the recovery after an etcd
//! restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use futures::StreamExt;
use trellis_agent::daemon::simulated::{SimulatedHost, host_record};
use trellis_agent::model::{EndpointKind, Mac};
use trellis_agent::state::{Cluster, NewEndpoint, NewNetwork};
use trellis_store::{Compare, KeyValue, LeaseId, Op, Revision, Store, StoreError, TxnOutcome, WatchStream};

#[derive(Parser)]
#[command(about = "Simulated Trellis hosts against one real etcd")]
struct Args {
    /// Hosts in the cluster.
    #[arg(long, default_value_t = 100)]
    hosts: u32,
    /// Endpoints on each host.
    #[arg(long, default_value_t = 50)]
    endpoints_per_host: u32,
    /// Hosts running the agent's control plane (the rest only watch).
    #[arg(long, default_value_t = 10)]
    agents: u32,
    /// Endpoint changes timed.
    #[arg(long, default_value_t = 30)]
    changes: u32,
    /// Each agent's full pass period, milliseconds.
    #[arg(long, default_value_t = 2000)]
    resync_ms: u64,
    /// Seconds the agents are watched idle before the changes.
    #[arg(long, default_value_t = 6)]
    idle_s: u64,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
}

/// Requests an agent's store client made, and the watch events and bytes
/// it received.
#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    events: AtomicU64,
    bytes: AtomicU64,
}

struct Counting {
    inner: Arc<dyn Store>,
    c: Arc<Counts>,
}

#[async_trait::async_trait]
impl Store for Counting {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.c.requests.fetch_add(1, Ordering::Relaxed);
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        self.c.requests.fetch_add(1, Ordering::Relaxed);
        let r = self.inner.list(prefix).await?;
        let bytes: usize = r.0.iter().map(|kv| kv.key.len() + kv.value.len()).sum();
        self.c.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(r)
    }
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        self.c.requests.fetch_add(1, Ordering::Relaxed);
        self.inner.txn(compares, ops).await
    }
    async fn watch(&self, prefix: &str, start: Revision) -> Result<WatchStream, StoreError> {
        self.c.requests.fetch_add(1, Ordering::Relaxed);
        let c = self.c.clone();
        let s = self.inner.watch(prefix, start).await?;
        Ok(Box::pin(s.inspect(move |e| {
            if let Ok(e) = e {
                c.events.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add((e.kv.key.len() + e.kv.value.len()) as u64, Ordering::Relaxed);
            }
        })))
    }
    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.c.requests.fetch_add(1, Ordering::Relaxed);
        self.inner.lease_grant(ttl).await
    }
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.c.requests.fetch_add(1, Ordering::Relaxed);
        self.inner.lease_keep_alive(lease).await
    }
    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.c.requests.fetch_add(1, Ordering::Relaxed);
        self.inner.lease_revoke(lease).await
    }
    async fn lease_time_to_live(&self, lease: LeaseId) -> Result<Option<(Duration, Duration)>, StoreError> {
        self.c.requests.fetch_add(1, Ordering::Relaxed);
        self.inner.lease_time_to_live(lease).await
    }
}

async fn connect(url: &str) -> Result<Arc<dyn Store>> {
    let cfg = trellis_store::EtcdConfig::parse(url).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Arc::new(trellis_store::EtcdStore::connect(&cfg).await?))
}

fn cpu_seconds() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

/// An agent on a thread of its own (a current-thread runtime): what its
/// control plane costs is that thread's CPU time, apart from the writer's,
/// the watch-only hosts' and etcd's.
struct AgentThread {
    host: SimulatedHost,
    cpu: tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<f64>>,
}

impl AgentThread {
    async fn start(url: String, id: String, n: u32, c: Arc<Counts>, resync: Duration) -> Result<AgentThread> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new().name(id.clone()).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            rt.block_on(async move {
                let started = async {
                    let store: Arc<dyn Store> = Arc::new(Counting { inner: connect(&url).await?, c });
                    SimulatedHost::start(store, &id, n, Duration::from_secs(30), resync).await
                };
                let (cpu_tx, mut cpu_rx) = tokio::sync::mpsc::unbounded_channel::<tokio::sync::oneshot::Sender<f64>>();
                let _ = tx.send(started.await.map(|host| AgentThread { host, cpu: cpu_tx }));
                while let Some(reply) = cpu_rx.recv().await {
                    let _ = reply.send(thread_cpu_seconds());
                }
            });
        })?;
        rx.await.context("the agent's thread ended")?
    }

    /// The CPU time its thread has used.
    async fn cpu_seconds(&self) -> Result<f64> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.cpu.send(tx).map_err(|_| anyhow::anyhow!("the agent's thread ended"))?;
        Ok(rx.await?)
    }
}

fn thread_cpu_seconds() -> f64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).expect("the thread's clock");
    t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn new_endpoint(network: &str, name: String) -> NewEndpoint {
    NewEndpoint {
        id: trellis_agent::model::new_id(),
        network: network.to_string(),
        name: Some(name.clone()),
        ip: None,
        labels: Default::default(),
        netns: format!("/run/trellis-sim/netns/{name}").into(),
        managed_netns: false,
        ifname: "eth0".into(),
        kind: EndpointKind::Cni,
        container_id: name,
        ip6: None,
        reserved: false,
    }
}

/// Wait until every agent has programmed `mac`; each agent's delay.
async fn converged(agents: &[&SimulatedHost], mac: Mac, t0: Instant, limit: Duration) -> Vec<Option<f64>> {
    let mut seen: Vec<Option<f64>> = vec![None; agents.len()];
    while seen.iter().any(Option::is_none) && t0.elapsed() < limit {
        for (i, a) in agents.iter().enumerate() {
            if seen[i].is_none() && a.has_remote(mac) {
                seen[i] = Some(t0.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    seen
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    anyhow::ensure!(a.agents >= 1 && a.agents <= a.hosts, "--agents must be between 1 and --hosts");
    let mut etcd = trellis_integration::Etcd::start()?;
    let url = etcd.url();
    let admin_store = connect(&url).await?;
    let admin = Cluster::new(admin_store.clone(), "sim-admin", "10.0.0.0/8".parse()?, 24);
    let net = admin
        .create_network(
            NewNetwork {
                name: "sim".into(),
                subnet: Some("10.64.0.0/12".parse()?),
                gateway: None,
                attachable: true,
                internal: false,
                encrypted: false,
                mtu: 0,
                ..Default::default()
            },
            &[],
            1500,
        )
        .await?;
    let light = a.hosts - a.agents;
    eprintln!("trellis-sim: {} hosts ({} agents), {} endpoints each", a.hosts, a.agents, a.endpoints_per_host);

    // The watch-only hosts: registered, their endpoints written (32 at a
    // time); each watches the endpoints once the cluster is filled (as an
    // agent lists, then watches: the fill's events are no change measured,
    // and fanning every one out to a thousand watchers made the fill
    // etcd-bound on a small machine).
    let lease = admin_store.lease_grant(Duration::from_secs(600)).await?;
    let watched = Arc::new(Counts::default());
    let mut watchers = Vec::new();
    let t_fill = Instant::now();
    for h in 0..light {
        let id = format!("sim{h:04}");
        let rec = host_record(&id, h + 1);
        admin_store
            .txn(
                vec![],
                vec![Op::put_with_lease(trellis_agent::model::host_key(&id), serde_json::to_vec(&rec)?, lease)],
            )
            .await?;
    }
    let fill: Vec<(u32, u32)> = (0..light).flat_map(|h| (0..a.endpoints_per_host).map(move |i| (h, i))).collect();
    let clusters: Vec<Arc<Cluster>> = (0..light)
        .map(|h| Arc::new(Cluster::new(admin_store.clone(), &format!("sim{h:04}"), "10.0.0.0/8".parse().unwrap(), 24)))
        .collect();
    let done = AtomicU64::new(0);
    futures::stream::iter(fill)
        .map(|(h, i)| {
            let c = clusters[h as usize].clone();
            let net = net.id.clone();
            let done = &done;
            async move {
                c.create_endpoint(new_endpoint(&net, format!("e{h}-{i}"))).await.context("writing an endpoint")?;
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_multiple_of(5000) {
                    eprintln!("trellis-sim: {n} endpoints written");
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let fill_s = t_fill.elapsed().as_secs_f64();
    for _ in 0..light {
        let c = watched.clone();
        let mut w = admin_store.watch(&format!("{}endpoints/", trellis_agent::model::ROOT), 0).await?;
        watchers.push(tokio::spawn(async move {
            while let Some(Ok(e)) = w.next().await {
                c.events.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add((e.kv.key.len() + e.kv.value.len()) as u64, Ordering::Relaxed);
            }
        }));
    }

    // The agents' own endpoints are in the store before they start (each
    // agent's first pass programs them, as after a restart): attaching them
    // one by one would make every agent recompute once per attach of every
    // other, which is setup, not the change measured.
    for h in 0..a.agents {
        let c = Cluster::new(admin_store.clone(), &format!("agent{h:04}"), "10.0.0.0/8".parse()?, 24);
        for i in 0..a.endpoints_per_host {
            c.create_endpoint(new_endpoint(&net.id, format!("a{h}-{i}"))).await.context("writing an endpoint")?;
        }
    }
    // The agents: each its own connection.
    let rss0 = rss_bytes();
    let mut threads = Vec::new();
    let mut counts = Vec::new();
    for h in 0..a.agents {
        let c = Arc::new(Counts::default());
        let id = format!("agent{h:04}");
        threads.push(
            AgentThread::start(url.clone(), id, light + h + 1, c.clone(), Duration::from_millis(a.resync_ms)).await?,
        );
        counts.push(c);
    }
    let agents: Vec<&SimulatedHost> = threads.iter().map(|t| &t.host).collect();
    let total = a.hosts as u64 * a.endpoints_per_host as u64;
    // Everyone has everything: every other host's endpoints on each agent.
    let remote = total - a.endpoints_per_host as u64;
    let t = Instant::now();
    while agents.iter().any(|h| h.remotes() as u64 != remote) {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(300),
            "the agents did not converge on the filled cluster: {:?} of {remote} remote endpoints",
            agents.iter().map(|h| h.remotes()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = rss_bytes();
    let mem_per_remote = (rss1.saturating_sub(rss0)) as f64 / (a.agents as f64 * remote as f64);

    // A full pass (the periodic resync) on one agent.
    let t = Instant::now();
    agents[0].app.reconciler.full_pass().await?;
    let full_pass_s = t.elapsed().as_secs_f64();

    // The agents idle (their periodic full passes, lease renewals): what
    // they spend with nothing changing, taken off what the changes cost.
    let mut idle0 = Vec::new();
    for t in &threads {
        idle0.push(t.cpu_seconds().await?);
    }
    let t_idle = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.idle_s)).await;
    let idle_wall = t_idle.elapsed().as_secs_f64();
    let mut idle_share = Vec::new();
    for (t, c0) in threads.iter().zip(&idle0) {
        idle_share.push((t.cpu_seconds().await? - c0) / idle_wall);
    }

    // Endpoint changes, one at a time, on watch-only hosts (or agents when
    // there are none).
    let req0: u64 = counts.iter().map(|c| c.requests.load(Ordering::Relaxed)).sum();
    let ev0: u64 = counts.iter().map(|c| c.events.load(Ordering::Relaxed)).sum();
    let by0: u64 = counts.iter().map(|c| c.bytes.load(Ordering::Relaxed)).sum();
    let wev0 = watched.events.load(Ordering::Relaxed);
    let cpu0 = cpu_seconds();
    let mut agent_cpu0 = Vec::new();
    for t in &threads {
        agent_cpu0.push(t.cpu_seconds().await?);
    }
    let t_changes = Instant::now();
    let (mut every, mut each) = (Vec::new(), Vec::new());
    for i in 0..a.changes {
        let t0 = Instant::now();
        let rec = if light > 0 {
            clusters[(i % light) as usize].create_endpoint(new_endpoint(&net.id, format!("c{i}"))).await?
        } else {
            let mut req = trellis_agent::app::AttachRequest::new("sim", EndpointKind::Cni);
            req.name = Some(format!("c{i}"));
            agents[(i % a.agents) as usize].app.attach(req).await.map_err(|e| anyhow::anyhow!("{e}"))?.endpoint
        };
        let seen = converged(&agents, rec.mac, t0, Duration::from_secs(30)).await;
        let got: Vec<f64> = seen.iter().flatten().copied().collect();
        anyhow::ensure!(
            got.len() == agents.len(),
            "change {i}: {} of {} agents programmed it",
            got.len(),
            agents.len()
        );
        every.push(got.iter().copied().fold(0.0, f64::max));
        each.extend(got);
    }
    let wall = t_changes.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    // Each agent's CPU per change, microseconds: all of it, and what is
    // left once its idle rate over the same time is taken off.
    let (mut agent_us, mut event_us) = (Vec::new(), Vec::new());
    for ((t, c0), idle) in threads.iter().zip(&agent_cpu0).zip(&idle_share) {
        let used = t.cpu_seconds().await? - c0;
        agent_us.push(used * 1e6 / a.changes as f64);
        event_us.push((used - idle * wall).max(0.0) * 1e6 / a.changes as f64);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let n = a.changes as f64;
    let k = a.agents as f64;
    let req = (counts.iter().map(|c| c.requests.load(Ordering::Relaxed)).sum::<u64>() - req0) as f64 / (n * k);
    let ev = (counts.iter().map(|c| c.events.load(Ordering::Relaxed)).sum::<u64>() - ev0) as f64 / (n * k);
    let by = (counts.iter().map(|c| c.bytes.load(Ordering::Relaxed)).sum::<u64>() - by0) as f64 / (n * k);
    let wev = (watched.events.load(Ordering::Relaxed) - wev0) as f64 / n;

    // etcd restarted: every agent programs an endpoint written after it.
    etcd.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    etcd.restart()?;
    let t0 = Instant::now();
    let rec = loop {
        match clusters.first().map(|c| c.create_endpoint(new_endpoint(&net.id, "after-restart".into()))) {
            Some(f) => match f.await {
                Ok(r) => break r,
                Err(_) if t0.elapsed() < Duration::from_secs(60) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => return Err(e.into()),
            },
            None => {
                let mut req = trellis_agent::app::AttachRequest::new("sim", EndpointKind::Cni);
                req.name = Some("after-restart".into());
                match agents[0].app.attach(req).await {
                    Ok(r) => break r.endpoint,
                    Err(_) if t0.elapsed() < Duration::from_secs(60) => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    Err(e) => anyhow::bail!("{e}"),
                }
            }
        }
    };
    let back = converged(&agents, rec.mac, t0, Duration::from_secs(120)).await;
    let recovery = back.iter().map(|s| s.unwrap_or(f64::INFINITY)).fold(0.0, f64::max);

    let report = serde_json::json!({
        "hosts": a.hosts, "agents": a.agents, "endpoints_per_host": a.endpoints_per_host,
        "endpoints": total, "fill_s": fill_s,
        "every_agent_p50_s": percentile(&mut every.clone(), 0.5),
        "every_agent_p99_s": percentile(&mut every, 0.99),
        "each_agent_p50_s": percentile(&mut each.clone(), 0.5),
        "each_agent_p99_s": percentile(&mut each, 0.99),
        "requests_per_change_per_agent": req,
        "watch_events_per_change_per_agent": ev,
        "watch_bytes_per_change_per_agent": by,
        "watch_events_per_change_cluster": wev + ev * k,
        "cpu_us_per_change_per_agent": mean(&agent_us),
        "cpu_us_per_change_per_agent_min": min(&agent_us),
        "cpu_us_per_change_per_agent_max": max(&agent_us),
        "event_cpu_us_per_change_per_agent": mean(&event_us),
        "event_cpu_us_per_change_per_agent_min": min(&event_us),
        "event_cpu_us_per_change_per_agent_max": max(&event_us),
        "idle_cpu_percent_per_agent": mean(&idle_share) * 100.0,
        "idle_cpu_percent_per_agent_max": max(&idle_share) * 100.0,
        "process_cpu_us_per_change": cpu * 1e6 / n,
        "changes_wall_s": wall,
        "memory_bytes_per_remote_endpoint": mem_per_remote,
        "full_pass_s": full_pass_s,
        "etcd_restart_recovery_s": recovery,
    });
    if a.json {
        println!("{report}");
    } else {
        let f = |k: &str| report[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "| hosts (agents) | endpoints | new endpoint on every agent p50 / p99 | store requests / change / agent | watch events (bytes) / change / agent | CPU / change / agent (min–max) | of it the change's (min–max) | idle CPU / agent | memory / remote endpoint | full pass | back after etcd restart |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        println!(
            "| {} ({}) | {} | {:.0} / {:.0} ms | {:.2} | {:.2} ({:.0} B) | {:.0} µs ({:.0}–{:.0}) | {:.0} µs ({:.0}–{:.0}) | {:.2} % | {:.0} B | {:.0} ms | {:.1} s |",
            a.hosts,
            a.agents,
            total,
            f("every_agent_p50_s") * 1e3,
            f("every_agent_p99_s") * 1e3,
            f("requests_per_change_per_agent"),
            f("watch_events_per_change_per_agent"),
            f("watch_bytes_per_change_per_agent"),
            f("cpu_us_per_change_per_agent"),
            f("cpu_us_per_change_per_agent_min"),
            f("cpu_us_per_change_per_agent_max"),
            f("event_cpu_us_per_change_per_agent"),
            f("event_cpu_us_per_change_per_agent_min"),
            f("event_cpu_us_per_change_per_agent_max"),
            f("idle_cpu_percent_per_agent"),
            f("memory_bytes_per_remote_endpoint"),
            f("full_pass_s") * 1e3,
            f("etcd_restart_recovery_s"),
        );
    }
    for w in watchers {
        w.abort();
    }
    drop(agents);
    Ok(())
}
