//! This host in the cluster: its identity (id, VTEP MAC, kept in the state
//! dir) and its registration under a store lease, renewed in the
//! background and re-created if it ever lapsed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use trellis_store::{LeaseId, Op, Store, StoreError};

use crate::model::{self, HostRecord};

/// The VTEP MAC kept in the state dir, created on first start.
pub fn vtep_mac(state_dir: &Path) -> std::io::Result<model::Mac> {
    let path = state_dir.join("vtep-mac");
    match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().parse::<model::Mac>().is_ok() => Ok(s.trim().parse().expect("checked")),
        Ok(_) | Err(_) => {
            let mac = model::Mac::random_local();
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, format!("{mac}\n"))?;
            std::fs::rename(&tmp, &path)?;
            Ok(mac)
        }
    }
}

/// Register `rec` under a new lease of `ttl`.
pub async fn register(store: &dyn Store, rec: &HostRecord, ttl: Duration) -> Result<LeaseId, StoreError> {
    register_under(store, rec, ttl, None).await
}

/// Register `rec` under `previous` (a lease still alive, renewed by
/// [`renew_previous`]) or else under a new lease of `ttl`.
pub async fn register_under(
    store: &dyn Store,
    rec: &HostRecord,
    ttl: Duration,
    previous: Option<LeaseId>,
) -> Result<LeaseId, StoreError> {
    let value = serde_json::to_vec(rec).expect("host record serializes");
    if let Some(lease) = previous {
        match store.txn(vec![], vec![Op::put_with_lease(model::host_key(&rec.id), value.clone(), lease)]).await {
            Ok(_) => return Ok(lease),
            Err(StoreError::LeaseNotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    let lease = store.lease_grant(ttl).await?;
    store.txn(vec![], vec![Op::put_with_lease(model::host_key(&rec.id), value, lease)]).await?;
    Ok(lease)
}

fn lease_path(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("lease")
}

/// The lease the last run of this agent registered under, if it said.
pub fn saved_lease(state_dir: &Path) -> Option<LeaseId> {
    std::fs::read_to_string(lease_path(state_dir)).ok()?.trim().parse().ok()
}

/// Remember `lease` for the next run (best effort: without it a restart
/// registers under a new lease, as before).
pub fn save_lease(state_dir: &Path, lease: LeaseId) {
    let path = lease_path(state_dir);
    let tmp = path.with_extension("tmp");
    if let Err(e) = std::fs::write(&tmp, format!("{lease}\n")).and_then(|()| std::fs::rename(&tmp, &path)) {
        tracing::warn!(error = %e, path = %path.display(), "cannot keep the host's lease for the next start");
    }
}

/// Renew, first thing at start, the lease the previous run of this agent
/// held: this host's record lives under it, and a restart that takes
/// longer than what was left of the lease (a slow or loaded host) would
/// let the record lapse and every peer drop its tunnels to this host,
/// with the traffic, until the new registration. The lease, if alive.
pub async fn renew_previous(store: &dyn Store, state_dir: &Path) -> Option<LeaseId> {
    let lease = saved_lease(state_dir)?;
    match store.lease_keep_alive(lease).await {
        Ok(()) => Some(lease),
        Err(e) => {
            tracing::debug!(lease, error = %e, "the previous run's lease is gone");
            None
        }
    }
}

/// Keep this host registered: renew the lease every third of its TTL;
/// register again if it lapsed (the store was unreachable too long). A new
/// lease is remembered in `state_dir` (when given) for the next start.
pub async fn keep_registered(
    store: Arc<dyn Store>,
    rec: HostRecord,
    ttl: Duration,
    mut lease: Option<LeaseId>,
    state_dir: Option<std::path::PathBuf>,
) {
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = match lease {
            Some(l) => store.lease_keep_alive(l).await,
            None => Err(StoreError::LeaseNotFound(0)),
        };
        match result {
            Ok(()) => {}
            Err(StoreError::LeaseNotFound(_)) => match register(store.as_ref(), &rec, ttl).await {
                Ok(l) => {
                    tracing::info!(lease = l, "host registered");
                    lease = Some(l);
                    if let Some(dir) = &state_dir {
                        save_lease(dir, l);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "registering this host failed; retrying"),
            },
            Err(e) => tracing::warn!(error = %e, "renewing this host's lease failed; retrying"),
        }
    }
}

/// The live hosts with how long ago each last renewed its lease.
pub async fn live_hosts_seen(store: &dyn Store) -> Result<Vec<(HostRecord, Option<Duration>)>, StoreError> {
    let (items, _) = store.list(&model::hosts_prefix()).await?;
    let mut out = Vec::with_capacity(items.len());
    for kv in items {
        let Ok(rec) = serde_json::from_slice::<HostRecord>(&kv.value) else { continue };
        let seen = match kv.lease {
            Some(l) => store.lease_time_to_live(l).await?.map(|(left, granted)| granted.saturating_sub(left)),
            None => None,
        };
        out.push((rec, seen));
    }
    Ok(out)
}

/// The hosts alive in the cluster now.
pub async fn live_hosts(store: &dyn Store) -> Result<Vec<HostRecord>, StoreError> {
    let (items, _) = store.list(&model::hosts_prefix()).await?;
    Ok(items.iter().filter_map(|kv| serde_json::from_slice(&kv.value).ok()).collect())
}
