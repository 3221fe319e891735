//! The daemon's background loops, one function each. [`super::run`] spawns
//! them into one `JoinSet` and aborts them all on shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{Notify, broadcast};
use trellis_store::Store;

use crate::app::settle;
use crate::dataplane::Dataplane;
use crate::model;
use crate::reconcile::Reconciler;
use crate::state::Cluster;
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

/// The prober follows the live hosts (every peer but this one).
pub async fn probe_peers(prober: Arc<Prober>, store: Arc<dyn Store>, me: String) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Ok(hosts) = crate::state::hosts::live_hosts(store.as_ref()).await {
            prober.set_peers(
                hosts.into_iter().filter(|h| h.id != me).map(|h| (h.id, h.underlay, Some(h.vtep_mac))).collect(),
            );
        }
    }
}

/// Periodic full resync (the kernel read back whole); it also collects
/// endpoints whose namespace died.
pub async fn resync(
    reconciler: Arc<Reconciler>,
    cluster: Arc<Cluster>,
    dp: Arc<dyn Dataplane>,
    every: Duration,
    dns_changed: Arc<Notify>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        dns_changed.notify_one();
        match reconciler.full_pass().await {
            Ok(r) => settle(&cluster, dp.as_ref(), &r).await,
            Err(e) => tracing::warn!(error = %e, "periodic reconcile failed"),
        }
    }
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

/// Dead hosts' addresses, blocks and endpoints are reclaimed once their
/// lease has expired and a grace period passed (any agent may do it; the
/// transaction holds only while the host is still absent).
pub async fn reclaim_dead_hosts(cluster: Arc<Cluster>, grace: Duration, every: Duration) {
    let mut dead_since: HashMap<String, Instant> = HashMap::new();
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
        let now = Instant::now();
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
}

/// Key rotation of encrypted networks: every agent takes due steps (the
/// store's compare-and-swap makes one win); each host's acks come from its
/// passes. The sequence-number trigger reads this host's SAs.
pub async fn rotate_keys(cluster: Arc<Cluster>, dp: Arc<dyn Dataplane>, policy: trellis_ipsec::Policy, threshold: u64) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(nets) = cluster.networks().await else { continue };
        if !nets.iter().any(|n| n.encrypted) {
            continue;
        }
        let dp = dp.clone();
        let exhausted = match tokio::task::spawn_blocking(move || dp.observe_xfrm()).await {
            Ok(Ok(x)) => crate::state::encryption::exhausted_networks(&nets, &x, threshold),
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

/// Store changes (from this host or any other) trigger a pass, and a
/// rebuild of the DNS zone.
pub async fn watch_store(
    reconciler: Arc<Reconciler>,
    store: Arc<dyn Store>,
    cluster: Arc<Cluster>,
    dp: Arc<dyn Dataplane>,
    dns_changed: Arc<Notify>,
) {
    // Resume after the last event seen, so a broken watch (an etcd restart)
    // misses nothing; if that revision is compacted away, start afresh and
    // reconcile at once.
    let mut next: trellis_store::Revision = 0;
    loop {
        let mut w = match store.watch(model::ROOT, next).await {
            Ok(w) => w,
            Err(trellis_store::StoreError::Compacted { .. }) => {
                next = 0;
                if let Ok(r) = reconciler.pass().await {
                    settle(&cluster, dp.as_ref(), &r).await;
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
                Ok(r) => settle(&cluster, dp.as_ref(), &r).await,
                Err(e) => tracing::warn!(error = %e, "reconcile after a store change failed"),
            }
        }
    }
}
