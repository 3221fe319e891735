//! The hosts the data path serves: the store's live hosts and those kept
//! after their lease expired while this agent's probes still reach them
//! ([`crate::model::liveness`]). The reconciler reads its snapshots
//! through [`Present`], the prober probes every host it holds, and the
//! reclaim of dead hosts leaves the kept ones alone.

use std::sync::{Arc, Mutex};

use crate::model::HostRecord;
use crate::model::liveness::{Liveness, Path};
use crate::reconcile::{DesiredSource, Snapshot};
use crate::state::informer::View;

type Hosts = Arc<Vec<HostRecord>>;

/// What the probes say of a host.
pub type Verdicts = Arc<dyn Fn(&str) -> Path + Send + Sync>;

/// The store's view of the hosts, completed by the data path's.
pub struct Present {
    source: Arc<dyn DesiredSource>,
    me: String,
    verdicts: Verdicts,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    liveness: Liveness,
    /// The live hosts last merged and the merge (the same allocation while
    /// neither changes, so that a snapshot that did not change stays the
    /// same: [`Snapshot::same`]).
    merged: Option<(Hosts, Hosts)>,
}

impl Present {
    /// `source` gives the live hosts (the informer); `verdicts` the
    /// probes' word (without a prober: every host unprobed, none kept).
    pub fn new(source: Arc<dyn DesiredSource>, me: &str, verdicts: Verdicts) -> Arc<Present> {
        Arc::new(Present { source, me: me.to_string(), verdicts, inner: Mutex::default() })
    }

    /// The live hosts and the kept ones, after following `live` and the
    /// probes; and whether the kept set changed.
    pub fn hosts(&self, live: &Arc<Vec<HostRecord>>) -> (Arc<Vec<HostRecord>>, bool) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let change = inner.liveness.update(live, &self.me, |id| (self.verdicts)(id));
        for id in &change.kept {
            tracing::warn!(peer = %id, "the peer's registration expired but its data path answers: its endpoints stay until both say it is gone");
        }
        for id in &change.released {
            match live.iter().any(|h| &h.id == id) {
                true => tracing::info!(peer = %id, "the peer registered again"),
                false => {
                    tracing::warn!(peer = %id, "the peer's registration expired and its probes go unanswered: it is gone")
                }
            }
        }
        let changed = change.changed();
        if inner.liveness.kept().is_empty() {
            inner.merged = None;
            return (live.clone(), changed);
        }
        if let Some((l, m)) = &inner.merged
            && !changed
            && Arc::ptr_eq(l, live)
        {
            return (m.clone(), false);
        }
        let merged = Arc::new(inner.liveness.present(live));
        inner.merged = Some((live.clone(), merged.clone()));
        (merged, changed)
    }

    /// `v` with the present hosts in place of the live ones (for the
    /// readers of views: service discovery answers for the hosts the data
    /// path serves).
    pub fn view(&self, v: Arc<View>) -> Arc<View> {
        let (hosts, _) = self.hosts(&v.hosts);
        if Arc::ptr_eq(&hosts, &v.hosts) {
            return v;
        }
        Arc::new(View { hosts, ..(*v).clone() })
    }

    /// Is `id` kept (no registration, its data path answering)?
    pub fn is_kept(&self, id: &str) -> bool {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).liveness.is_kept(id)
    }

    /// The hosts kept.
    pub fn kept(&self) -> Vec<HostRecord> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).liveness.kept().values().cloned().collect()
    }
}

#[async_trait::async_trait]
impl DesiredSource for Present {
    async fn load(&self) -> Result<Snapshot, String> {
        let mut s = self.source.load().await?;
        s.hosts = self.hosts(&s.hosts).0;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Fixed(Mutex<Arc<Vec<HostRecord>>>);

    #[async_trait::async_trait]
    impl DesiredSource for Fixed {
        async fn load(&self) -> Result<Snapshot, String> {
            Ok(Snapshot { hosts: self.0.lock().unwrap().clone(), ..Default::default() })
        }
    }

    fn host(id: &str) -> HostRecord {
        HostRecord {
            id: id.into(),
            hostname: id.into(),
            underlay: [10, 0, 0, 1].into(),
            vtep_mac: crate::model::Mac([2, 0, 0, 0, 0, 1]),
            vxlan_port: 4789,
            capabilities: Default::default(),
            version: "t".into(),
            started_unix: 0,
            underlay_mtu: 0,
        }
    }

    #[tokio::test]
    async fn snapshots_hold_kept_hosts_and_stay_the_same_allocation_while_nothing_changes() {
        let src = Arc::new(Fixed(Mutex::new(Arc::new(vec![host("me"), host("a"), host("b")]))));
        let paths: Arc<Mutex<HashMap<String, Path>>> = Arc::default();
        let p2 = paths.clone();
        let present = Present::new(
            src.clone(),
            "me",
            Arc::new(move |id: &str| p2.lock().unwrap().get(id).copied().unwrap_or(Path::Answering)),
        );
        let first = present.load().await.unwrap().hosts;
        assert!(Arc::ptr_eq(&first, &src.0.lock().unwrap()), "nothing kept: the live hosts as they are");
        // b's registration goes while it answers: kept.
        *src.0.lock().unwrap() = Arc::new(vec![host("me"), host("a")]);
        let s1 = present.load().await.unwrap().hosts;
        assert_eq!(s1.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(), ["me", "a", "b"]);
        assert!(present.is_kept("b"));
        let s2 = present.load().await.unwrap().hosts;
        assert!(Arc::ptr_eq(&s1, &s2), "an unchanged view is the same allocation");
        // Its probes stop answering: gone.
        paths.lock().unwrap().insert("b".into(), Path::Silent);
        let (hosts, changed) = present.hosts(&src.0.lock().unwrap().clone());
        assert!(changed);
        assert_eq!(hosts.len(), 2);
        assert!(present.kept().is_empty());
    }
}
