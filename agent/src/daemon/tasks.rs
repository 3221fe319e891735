//! The daemon's background loops, one function each. [`super::run`] spawns
//! them into one `JoinSet` and aborts them all on shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, broadcast};

use crate::app::settle;
use crate::dataplane::Dataplane;
use crate::model;
use crate::reconcile::Reconciler;
use crate::state::Cluster;
use crate::state::informer::Informer;
use crate::state::liveness::Present;
use crate::telemetry::probe::Prober;

/// Monitor events cost the datapath a wakeup of this process each: on
/// while a `trellisctl monitor` watches (the API turns them on), off within
/// a second of the last one leaving.
pub async fn events_off_when_unwatched(tx: broadcast::Sender<trellis_ebpf::FlowEvent>, dp: Arc<dyn Dataplane>) {
    dp.set_events(false);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if tx.receiver_count() == 0 {
            dp.set_events(false);
        }
    }
}

/// How often the endpoints' flow tables are swept: the shortest lifetime
/// (a closed TCP connection's, 10 s) is kept to within this.
pub const FLOW_SWEEP_EVERY: Duration = Duration::from_secs(5);

/// The endpoints' own flow tables keep every flow until this removes it
/// (the programs evict nothing: a full table refuses new flows), so this
/// is what gives a flooded endpoint room again.
pub async fn sweep_flows(dp: Arc<dyn Dataplane>) {
    let mut tick = tokio::time::interval(FLOW_SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let dp = dp.clone();
        match tokio::task::spawn_blocking(move || dp.sweep_flows()).await {
            Ok(Ok(s)) if s.removed_ct + s.removed_rnat > 0 => {
                tracing::debug!(live = s.live, removed = s.removed_ct, reverse = s.removed_rnat, "swept flows")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "sweeping the endpoints' flow tables"),
            Err(e) => tracing::warn!(error = %e, "the flow sweep's thread"),
        }
    }
}

/// The prober follows the present hosts (every peer but this one: the
/// live ones, and those kept while they answer), and a kept host whose
/// probes stop answering (or that registers again) triggers a pass.
pub async fn probe_peers(
    prober: Arc<Prober>,
    informer: Arc<Informer>,
    present: Arc<Present>,
    reconciler: Arc<Reconciler>,
    cluster: Arc<Cluster>,
    dp: Arc<dyn Dataplane>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let v = informer.view();
        // The verdicts first, then the peers: a host that just lost its
        // registration keeps its probe history.
        let (hosts, changed) = present.hosts(&v.hosts);
        prober.set_peers(
            hosts
                .iter()
                .filter(|h| h.id != cluster.host)
                .map(|h| (h.id.clone(), h.underlay, Some(h.vtep_mac), h.underlay_mtu))
                .collect(),
        );
        if changed {
            match reconciler.pass().await {
                Ok(r) => {
                    settle(&cluster, dp.as_ref(), &r).await;
                }
                Err(e) => tracing::warn!(error = %e, "reconcile after a peer's liveness changed failed"),
            }
        }
    }
}

/// Periodic full resync (the kernel read back whole); it also collects
/// endpoints whose namespace died.
pub async fn resync(reconciler: Arc<Reconciler>, cluster: Arc<Cluster>, dp: Arc<dyn Dataplane>, every: Duration) {
    loop {
        let cpu0 = process_cpu();
        match reconciler.full_pass().await {
            Ok(r) => {
                settle(&cluster, dp.as_ref(), &r).await;
            }
            Err(e) => tracing::warn!(error = %e, "periodic reconcile failed"),
        }
        tokio::time::sleep(resync_wait(every, process_cpu().saturating_sub(cpu0))).await;
    }
}

/// The CPU time this process has used: what a pass costs the host. Wall
/// time would count the waits of a loaded machine (on a busy 2-CPU
/// host a 3 ms pass took 25 ms and pushed repairs 5 s out); the process's
/// clock counts the pass and whatever ran beside it, erring towards
/// spacing passes out.
fn process_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID).map(Duration::from).unwrap_or_default()
}

/// A full pass costs a host at most 1 / `RESYNC_SHARE` of a CPU: passes
/// that cost more than `every / RESYNC_SHARE` of CPU time (a large
/// cluster's: every remote endpoint's entries read back and compared) are
/// spaced out.
pub const RESYNC_SHARE: u32 = 200;

/// Whatever a pass costs, the next full pass comes within this (or
/// `every`, if longer): a repair is never further away. (A 1,000-host
/// cluster's pass costs 16 ms, well under it; a host as slow as an
/// emulated VM's, where the process's CPU over a pass counts everything
/// else that ran meanwhile, would otherwise wait minutes.)
pub const RESYNC_MAX: Duration = Duration::from_secs(30);

/// The wait after a full pass that cost `cpu`.
pub fn resync_wait(every: Duration, cpu: Duration) -> Duration {
    every.max(cpu * RESYNC_SHARE).min(every.max(RESYNC_MAX))
}

/// The Docker driver's sweep of endpoints the engine forgot (their
/// container went while this agent was down): at start, then every
/// `every`.
pub async fn sweep_docker(driver: Arc<crate::api::docker::DockerDriver>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quiet = false;
    loop {
        tick.tick().await;
        match driver.sweep().await {
            Ok(n) => {
                quiet = false;
                if n > 0 {
                    tracing::info!(
                        endpoints = n,
                        "removed Docker endpoints whose containers went while the agent was down"
                    );
                }
            }
            // Said once until it works again (dockerd may simply not run).
            Err(e) if !quiet => {
                quiet = true;
                tracing::info!(error = %e, "cannot check the Docker endpoints against the engine yet");
            }
            Err(e) => tracing::debug!(error = %e, "cannot check the Docker endpoints against the engine"),
        }
    }
}

/// How often [`reclaim_dead_hosts`] lists the IPAM's blocks.
pub const BLOCKS_EVERY: Duration = Duration::from_secs(30);

/// Dead hosts' addresses, blocks and endpoints are reclaimed once their
/// lease has expired and a grace period passed (any agent may do it; the
/// transaction holds only while the host is still absent).
///
/// A host this agent still reaches ([`Present::is_kept`]: its lease went,
/// its probes answer) is not dead: its grace starts when they stop.
pub async fn reclaim_dead_hosts(
    cluster: Arc<Cluster>,
    informer: Arc<Informer>,
    present: Arc<Present>,
    grace: Duration,
    every: Duration,
) {
    let mut dead_since: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    // Endpoints' owners come from the informer on every tick; the IPAM's
    // blocks (a dead host's that held no endpoint) are listed from the
    // store only every BLOCKS_EVERY.
    let mut block_owners = std::collections::BTreeSet::new();
    let mut blocks_listed: Option<Instant> = None;
    loop {
        tick.tick().await;
        let view = informer.view();
        if blocks_listed.is_none_or(|t| t.elapsed() >= BLOCKS_EVERY) {
            match cluster.block_owners(&view.networks).await {
                Ok(b) => {
                    block_owners = b;
                    blocks_listed = Some(Instant::now());
                }
                Err(e) => tracing::debug!(error = %e, "listing the IPAM's blocks"),
            }
        }
        let mut absent = crate::state::absent_owners(&view, &block_owners, &cluster.host);
        absent.retain(|h| !present.is_kept(h));
        let now = Instant::now();
        dead_since.retain(|h, _| absent.contains(h));
        for h in absent {
            let since = *dead_since.entry(h.clone()).or_insert(now);
            if now.duration_since(since) >= grace {
                match cluster.reclaim_host(&h).await {
                    Ok(n) => {
                        tracing::info!(host = %h, endpoints = n, "reclaimed a dead host's addresses");
                        dead_since.remove(&h);
                        block_owners.remove(&h);
                    }
                    Err(e) => tracing::warn!(host = %h, error = %e, "reclaiming a dead host"),
                }
            }
        }
    }
}

/// The drains of this host's detached endpoints end on time: each one's
/// record becomes a plain detached endpoint at its deadline (then the pass
/// its write triggers removes the devices, and settling the record and
/// address). Drains are records in the store, so a drain under way when
/// the agent stopped ends when it is back (at once if it is overdue). The
/// loop sleeps until the next deadline, wakes when a drain starts
/// (`started`), and looks again every `every` anyway.
pub async fn finish_drains(cluster: Arc<Cluster>, informer: Arc<Informer>, started: Arc<Notify>, every: Duration) {
    let mut views = informer.subscribe();
    let mut eps = views.borrow_and_update().endpoints.clone();
    loop {
        let mut wait = every;
        let now = model::now_ms();
        let (due, next) = model::drains_of(&eps, &cluster.host, now);
        for e in due {
            match cluster.end_drain(&e.id).await {
                Ok(()) => {
                    tracing::info!(endpoint = %e.id, name = %e.name, network = %e.network, "drained: removing it")
                }
                Err(err) => tracing::warn!(endpoint = %e.id, error = %err, "ending a drain"),
            }
        }
        if let Some(next) = next {
            wait = wait.min(Duration::from_millis(next.saturating_sub(now)));
        }
        // Wait for the time, a drain started here, or a change to one of
        // this host's endpoints (a drain may have begun): the others'
        // changes wake nothing (they are most of a large cluster's).
        let here = |v: &crate::state::informer::View| {
            v.endpoints
                .changes(&eps)
                .any(|(before, after)| [before, after].into_iter().flatten().any(|e| e.host == cluster.host))
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = started.notified() => {}
            _ = views.wait_for(|v| !v.endpoints.ptr_eq(&eps) && here(v)) => {}
        }
        eps = views.borrow_and_update().endpoints.clone();
    }
}

/// Key rotation of encrypted networks: every agent takes due steps (the
/// store's compare-and-swap makes one win); each host's acks come from its
/// passes. The sequence-number trigger reads this host's SAs.
pub async fn rotate_keys(
    cluster: Arc<Cluster>,
    informer: Arc<Informer>,
    dp: Arc<dyn Dataplane>,
    policy: trellis_ipsec::Policy,
    threshold: u64,
    xfrm_seen: crate::telemetry::metrics::XfrmSeen,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let nets = informer.view().networks.clone();
        if !nets.iter().any(|n| n.encrypted) {
            continue;
        }
        let dp = dp.clone();
        let exhausted = match tokio::task::spawn_blocking(move || dp.observe_xfrm()).await {
            Ok(Ok(x)) => {
                let exhausted = crate::state::encryption::exhausted_networks(&nets, &x, threshold);
                *xfrm_seen.write().unwrap_or_else(|p| p.into_inner()) = Some(x);
                exhausted
            }
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
}

/// Changes of the records the reconciler reads (from this host or any
/// other, as the informer's views bring them) trigger a pass; a view that
/// only moved the revision (a write to a key no pass reads) does not.
pub async fn follow_store(
    reconciler: Arc<Reconciler>,
    informer: Arc<crate::state::informer::Informer>,
    cluster: Arc<Cluster>,
    dp: Arc<dyn Dataplane>,
) {
    let mut views = informer.subscribe();
    let mut last = views.borrow_and_update().clone();
    loop {
        if views.changed().await.is_err() {
            return;
        }
        // Fold a burst of views into one pass.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let v = views.borrow_and_update().clone();
        let same = last.same_records(&v);
        last = v;
        if same {
            continue;
        }
        match reconciler.pass().await {
            Ok(r) => {
                settle(&cluster, dp.as_ref(), &r).await;
            }
            Err(e) => tracing::warn!(error = %e, "reconcile after a store change failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::app::testing::ebpf_host;
    use crate::app::{AttachRequest, CreateService};
    use crate::model::EndpointKind;

    #[tokio::test]
    async fn a_drain_under_way_when_the_agent_stopped_ends_after_its_restart() {
        let store: Arc<dyn trellis_store::Store> = Arc::new(trellis_store::LocalStore::memory());
        let drain = Duration::from_millis(300);
        let before = ebpf_host(store.clone(), "h1", drain);
        before.app.create_network(crate::app::testing::attachable("n", Some("10.7.10.0/24"))).await.unwrap();
        let mut req = AttachRequest::new("n", EndpointKind::Adhoc);
        req.labels.insert(model::SERVICE_LABEL.into(), "web".into());
        let b = before.app.attach(req).await.unwrap().endpoint;
        let svc = crate::state::NewService {
            name: "web".into(),
            network: "n".into(),
            mode: model::ServiceMode::Vip,
            ports: vec![],
            selector: Default::default(),
            publish: vec![],
        };
        before.app.create_service(CreateService { service: svc, publish: vec![] }).await.unwrap();
        assert_eq!(before.app.detach(&b).await.unwrap(), Some(drain));
        // The agent stops mid-drain (nothing runs its drains) and comes back
        // after the deadline: the drain ends at once, then everything goes.
        drop(before);
        tokio::time::sleep(drain + Duration::from_millis(100)).await;
        let after = ebpf_host(store, "h1", drain);
        let e = after.app.cluster.endpoint_record(&b.id).await.unwrap().unwrap();
        assert!(e.draining() && e.drain_due(model::now_ms()), "{e:?}");
        let looping = tokio::spawn(finish_drains(
            after.app.cluster.clone(),
            after.informer.clone(),
            after.app.drains.clone(),
            Duration::from_secs(60),
        ));
        let mut ended = false;
        for _ in 0..100 {
            if after.app.cluster.endpoint_record(&b.id).await.unwrap().is_some_and(|e| !e.draining()) {
                ended = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(ended, "the overdue drain was not ended");
        after.app.converge().await.unwrap();
        assert!(after.app.cluster.endpoint_record(&b.id).await.unwrap().is_none(), "the record is left");
        assert!(after.app.cluster.all_endpoints().await.unwrap().is_empty());
        looping.abort();
    }

    #[tokio::test]
    async fn drains_end_on_time_woken_when_one_starts() {
        let store: Arc<dyn trellis_store::Store> = Arc::new(trellis_store::LocalStore::memory());
        let drain = Duration::from_millis(400);
        let l = ebpf_host(store, "h1", drain);
        l.app.create_network(crate::app::testing::attachable("n", Some("10.7.11.0/24"))).await.unwrap();
        let mut req = AttachRequest::new("n", EndpointKind::Adhoc);
        req.labels.insert(model::SERVICE_LABEL.into(), "web".into());
        let b = l.app.attach(req).await.unwrap().endpoint;
        let svc = crate::state::NewService {
            name: "web".into(),
            network: "n".into(),
            mode: model::ServiceMode::Vip,
            ports: vec![],
            selector: Default::default(),
            publish: vec![],
        };
        l.app.create_service(CreateService { service: svc, publish: vec![] }).await.unwrap();
        // The loop is idle (its fallback look is a minute away) when the
        // drain starts: the detach wakes it, and it ends the drain on time.
        let looping = tokio::spawn(finish_drains(
            l.app.cluster.clone(),
            l.informer.clone(),
            l.app.drains.clone(),
            Duration::from_secs(60),
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t0 = Instant::now();
        l.app.detach(&b).await.unwrap();
        let draining = || async { l.app.cluster.endpoint_record(&b.id).await.unwrap().is_some_and(|e| e.draining()) };
        tokio::time::sleep(drain / 2).await;
        assert!(draining().await, "ended early");
        while draining().await {
            assert!(t0.elapsed() < drain * 3, "not ended on time");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(t0.elapsed() >= drain, "ended after {:?}", t0.elapsed());
        looping.abort();
    }

    #[test]
    fn full_passes_are_spaced_out_to_half_a_percent_of_a_cpu() {
        let every = Duration::from_secs(2);
        assert_eq!(resync_wait(every, Duration::from_millis(3)), every);
        assert_eq!(resync_wait(every, Duration::from_millis(10)), every);
        assert_eq!(resync_wait(every, Duration::from_millis(25)), Duration::from_secs(5));
        // Never further away than RESYNC_MAX (unless the period is longer).
        assert_eq!(resync_wait(every, Duration::from_millis(900)), RESYNC_MAX);
        assert_eq!(resync_wait(Duration::from_secs(60), Duration::from_millis(900)), Duration::from_secs(60));
    }
}
