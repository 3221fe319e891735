//! The informer: the cluster's records as this agent last saw them.
//!
//! It lists the store once, then follows one watch from that revision,
//! and keeps the records decoded (networks, endpoints, services, live
//! hosts, encrypted networks' key rings). Each revision it has applied in
//! full becomes an immutable [`View`], shared by everything that reads the
//! cluster on a hot path or a timer (the reconciler, the DNS zone, the
//! metrics): none of them lists the store. A kind that did not change keeps
//! its `Arc` from one view to the next, so a reader can tell "unchanged" by
//! pointer.
//!
//! A watch that breaks resumes from the next revision; one whose revision
//! was compacted away (or that fell behind) relists and carries on. Retries
//! wait with jittered, growing backoff, so a thousand agents that lost the
//! same etcd do not come back in step.
//!
//! Reading one's own writes: [`Informer::at_least`] waits until a revision
//! is in the view. [`TrackWrites`] wraps the agent's store and remembers
//! the revision of the last transaction it committed, so a pass started
//! after a write sees it ([`Informer::written`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use trellis_store::{EventKind, KeyValue, Revision, Store, StoreError, WatchEvent};

use crate::model::{self, EndpointRecord, HostRecord, NetworkRecord, ServiceRecord};

/// The records at one store revision. Every list is sorted by store key.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// Every change up to this revision is in the view.
    pub revision: Revision,
    pub networks: Arc<Vec<NetworkRecord>>,
    /// By id: a persistent map, so a view after one change shares all
    /// but O(log n) of it with the view before (see [`model::Table`]).
    pub endpoints: model::Table<EndpointRecord>,
    pub hosts: Arc<Vec<HostRecord>>,
    pub services: Arc<Vec<ServiceRecord>>,
    /// Encrypted networks' key rings, by network id.
    pub keys: Arc<BTreeMap<String, trellis_ipsec::KeyRing>>,
    /// The hosts' addresses on networks they publish through nftables.
    pub mesh_addrs: Arc<Vec<model::MeshAddrRecord>>,
}

impl View {
    /// The same records as `other` (each kind the same allocation), whatever
    /// the revisions.
    pub fn same_records(&self, other: &View) -> bool {
        Arc::ptr_eq(&self.networks, &other.networks)
            && self.endpoints.ptr_eq(&other.endpoints)
            && Arc::ptr_eq(&self.hosts, &other.hosts)
            && Arc::ptr_eq(&self.services, &other.services)
            && Arc::ptr_eq(&self.keys, &other.keys)
            && Arc::ptr_eq(&self.mesh_addrs, &other.mesh_addrs)
    }
}

/// The kinds of record the informer keeps, by key prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Network,
    Endpoint,
    Host,
    Service,
    Key,
    MeshAddr,
}

impl Kind {
    const ALL: [Kind; 6] = [Kind::Network, Kind::Endpoint, Kind::Host, Kind::Service, Kind::Key, Kind::MeshAddr];

    /// Its keys' prefix under [`model::ROOT`].
    fn prefix(self) -> &'static str {
        match self {
            Kind::Network => "networks/",
            Kind::Endpoint => "endpoints/",
            Kind::Host => "hosts/",
            Kind::Service => "services/",
            Kind::Key => "netkeys/",
            Kind::MeshAddr => "mesh-addrs/",
        }
    }

    fn of(key: &str) -> Option<(Kind, &str)> {
        let rest = key.strip_prefix(model::ROOT)?;
        Kind::ALL.into_iter().find_map(|kind| Some((kind, rest.strip_prefix(kind.prefix())?)))
    }
}

/// The record inside `r` if it is of `variant`, cloned.
macro_rules! as_variant {
    ($r:expr, $variant:ident) => {
        match $r {
            Record::$variant(x) => Some((**x).clone()),
            _ => None,
        }
    };
}

/// One decoded record (an endpoint is kept in [`Records::endpoints`]
/// only). Boxed: an endpoint's entry, most of them, is a word.
#[derive(Clone, Debug)]
enum Record {
    Network(Box<NetworkRecord>),
    Endpoint,
    Host(Box<HostRecord>),
    Service(Box<ServiceRecord>),
    Key(Box<trellis_ipsec::KeyRing>),
    MeshAddr(Box<model::MeshAddrRecord>),
}

/// The informer's records (pure: events in, views out).
#[derive(Debug, Default)]
pub struct Records {
    /// By store key: (mod revision, record).
    by_key: BTreeMap<String, (Revision, Record)>,
    /// The endpoints, updated in place: a view takes them as they are.
    endpoints: model::Table<EndpointRecord>,
    /// The kinds changed since the last view.
    dirty: std::collections::BTreeSet<Kind>,
    /// The last view built.
    view: View,
    /// Records that did not decode (kept out of the view, counted).
    pub corrupt: u64,
    /// How key rings are read (sealed under the cluster keys).
    codec: crate::state::encryption::RingCodec,
}

impl Records {
    /// The records of a full listing at `revision`.
    pub fn listed(items: Vec<KeyValue>, revision: Revision) -> Records {
        Records::listed_with(items, revision, Default::default())
    }

    /// The same, key rings read with `codec`.
    pub fn listed_with(
        items: Vec<KeyValue>,
        revision: Revision,
        codec: crate::state::encryption::RingCodec,
    ) -> Records {
        let mut r = Records { codec, ..Records::default() };
        for kv in items {
            r.put(kv);
        }
        r.dirty = Kind::ALL.into();
        r.view.revision = revision;
        r
    }

    fn put(&mut self, kv: KeyValue) -> bool {
        let Some((kind, _)) = Kind::of(&kv.key) else { return false };
        if self.by_key.get(&kv.key).is_some_and(|(rev, _)| *rev >= kv.mod_revision) {
            return false;
        }
        match self.decode(kind, &kv) {
            Ok(rec) => {
                self.by_key.insert(kv.key, (kv.mod_revision, rec));
            }
            Err(e) => {
                tracing::warn!(key = %kv.key, error = %e, "a record in the store does not decode: left out");
                self.corrupt += 1;
                if self.by_key.remove(&kv.key).is_none() {
                    return false;
                }
                self.forget(kind, &kv.key);
            }
        }
        self.dirty.insert(kind);
        true
    }

    /// Apply one watch event; true when it changed a record the view has.
    pub fn apply(&mut self, ev: WatchEvent) -> bool {
        match ev.kind {
            EventKind::Put => self.put(ev.kv),
            EventKind::Delete => {
                let Some((kind, _)) = Kind::of(&ev.kv.key) else { return false };
                // A delete older than what is held (a listing that already
                // saw the key recreated) changes nothing.
                match self.by_key.get(&ev.kv.key) {
                    Some((rev, _)) if *rev <= ev.kv.mod_revision || ev.kv.mod_revision == 0 => {
                        self.by_key.remove(&ev.kv.key);
                        self.forget(kind, &ev.kv.key);
                        self.dirty.insert(kind);
                        true
                    }
                    _ => false,
                }
            }
        }
    }

    /// The record in `kv` (an endpoint goes into the table).
    fn decode(&mut self, kind: Kind, kv: &KeyValue) -> Result<Record, String> {
        self.decode_json(kind, kv).map_err(|e| e.to_string())
    }

    fn decode_json(&mut self, kind: Kind, kv: &KeyValue) -> Result<Record, Box<dyn std::error::Error>> {
        Ok(match kind {
            Kind::Network => Record::Network(Box::new(serde_json::from_slice(&kv.value)?)),
            Kind::Endpoint => {
                self.endpoints.insert(serde_json::from_slice(&kv.value)?);
                Record::Endpoint
            }
            Kind::Host => Record::Host(Box::new(serde_json::from_slice(&kv.value)?)),
            Kind::Service => Record::Service(Box::new(serde_json::from_slice(&kv.value)?)),
            Kind::Key => {
                let network = Kind::of(&kv.key).map_or("", |(_, id)| id);
                Record::Key(Box::new(self.codec.decode(network, &kv.value)?))
            }
            Kind::MeshAddr => Record::MeshAddr(Box::new(serde_json::from_slice(&kv.value)?)),
        })
    }

    /// A record of `kind` under `key` is gone.
    fn forget(&mut self, kind: Kind, key: &str) {
        if kind == Kind::Endpoint
            && let Some(id) = key.strip_prefix(model::ROOT).and_then(|k| k.strip_prefix(Kind::Endpoint.prefix()))
        {
            self.endpoints.remove(id);
        }
    }

    /// The view at `revision`: the kinds that changed rebuilt (the
    /// endpoints taken as they are, sharing what did not change), the
    /// others shared with the previous view.
    pub fn view(&mut self, revision: Revision) -> View {
        let mut v = self.view.clone();
        v.revision = v.revision.max(revision);
        for kind in std::mem::take(&mut self.dirty) {
            match kind {
                Kind::Network => v.networks = self.collect(kind, |_, r| as_variant!(r, Network)),
                Kind::Endpoint => v.endpoints = self.endpoints.clone(),
                Kind::Host => v.hosts = self.collect(kind, |_, r| as_variant!(r, Host)),
                Kind::Service => v.services = self.collect(kind, |_, r| as_variant!(r, Service)),
                Kind::MeshAddr => v.mesh_addrs = self.collect(kind, |_, r| as_variant!(r, MeshAddr)),
                Kind::Key => v.keys = self.collect(kind, |id, r| Some((id.to_string(), as_variant!(r, Key)?))),
            }
        }
        self.view = v.clone();
        v
    }

    /// The records of `kind` (its keys are one range of the sorted map),
    /// each as `pick` makes it from its id and record.
    fn collect<T, C: FromIterator<T>>(&self, kind: Kind, pick: impl Fn(&str, &Record) -> Option<T>) -> Arc<C> {
        let prefix = format!("{}{}", model::ROOT, kind.prefix());
        Arc::new(
            self.by_key
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .filter_map(|(k, (_, r))| pick(&k[prefix.len()..], r))
                .collect(),
        )
    }
}

/// What the informer has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct InformerStats {
    /// Full listings (the first one included).
    pub lists: AtomicU64,
    /// Watches opened (the first one included).
    pub watches: AtomicU64,
    /// Watch events received.
    pub events: AtomicU64,
    /// Views published.
    pub views: AtomicU64,
}

/// One per agent: see the module's documentation.
pub struct Informer {
    store: Arc<dyn Store>,
    tx: tokio::sync::watch::Sender<Arc<View>>,
    /// Set once the first listing is in.
    ready: tokio::sync::watch::Sender<bool>,
    written: Arc<AtomicI64>,
    /// Every load asks the store for its revision first (see
    /// [`Informer::linearizable`]).
    linearizable: bool,
    pub stats: InformerStats,
    /// How key rings are read (set before [`Informer::run`]).
    codec: std::sync::Mutex<crate::state::encryption::RingCodec>,
}

/// A prefix no key has: listing it reads the store's revision.
const NO_KEY: &str = "/trellis/v1/\u{0}revision";

/// How long [`Informer::at_least`] waits before it says the informer is
/// behind.
pub const CATCH_UP: Duration = Duration::from_secs(10);

impl Informer {
    /// An informer over `store`, whose writes `written` tracks (see
    /// [`TrackWrites`]). Nothing is read before [`Informer::run`].
    pub fn new(store: Arc<dyn Store>, written: Arc<AtomicI64>) -> Arc<Informer> {
        Arc::new(Informer {
            store,
            tx: tokio::sync::watch::channel(Arc::new(View::default())).0,
            ready: tokio::sync::watch::channel(false).0,
            written,
            linearizable: false,
            stats: InformerStats::default(),
            codec: Default::default(),
        })
    }

    /// Read key rings with `codec` (the cluster keys): before [`Informer::run`].
    pub fn set_codec(&self, codec: crate::state::encryption::RingCodec) {
        *self.codec.lock().unwrap_or_else(|p| p.into_inner()) = codec;
    }

    /// An informer whose loads see every write committed anywhere before
    /// they started, at the cost of one store request each (the store's
    /// revision, read by listing a prefix no key has). For tests where
    /// several hosts share a store and one host's pass must see another's
    /// write; an agent reads its own writes with [`Informer::new`] and
    /// learns of the others' through the watch.
    pub fn linearizable(store: Arc<dyn Store>, written: Arc<AtomicI64>) -> Arc<Informer> {
        let mut i = Arc::into_inner(Informer::new(store, written)).expect("just made");
        i.linearizable = true;
        Arc::new(i)
    }

    /// The newest view (empty before the first listing).
    pub fn view(&self) -> Arc<View> {
        self.tx.borrow().clone()
    }

    /// Follow the views as they come.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<View>> {
        self.tx.subscribe()
    }

    /// The first view with the store's records in it (waits as long as
    /// the store takes to answer).
    pub async fn listed(&self) -> Arc<View> {
        let mut ready = self.ready.subscribe();
        // The sender lives in `self`: the wait ends only with a listing.
        let _ = ready.wait_for(|r| *r).await;
        self.view()
    }

    /// The revision of this agent's last committed write.
    pub fn written(&self) -> Revision {
        self.written.load(Ordering::SeqCst)
    }

    /// A view holding every change up to `revision` (and the first
    /// listing), waiting at most [`CATCH_UP`] for it.
    pub async fn at_least(&self, revision: Revision) -> Result<Arc<View>, String> {
        let mut ready = self.ready.subscribe();
        let mut rx = self.tx.subscribe();
        let wait = async {
            ready.wait_for(|r| *r).await.map_err(|_| "the informer stopped".to_string())?;
            let v = rx.wait_for(|v| v.revision >= revision).await.map_err(|_| "the informer stopped".to_string())?;
            Ok::<_, String>(v.clone())
        };
        match tokio::time::timeout(CATCH_UP, wait).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "the store's changes are not coming in: at revision {} after {}s, waiting for {revision}",
                self.view().revision,
                CATCH_UP.as_secs()
            )),
        }
    }

    /// A view with this agent's own writes in it (and, linearizable, every
    /// write committed before the call).
    pub async fn current(&self) -> Result<Arc<View>, String> {
        let revision = if self.linearizable {
            self.store.list(NO_KEY).await.map_err(|e| e.to_string())?.1
        } else {
            self.written()
        };
        self.at_least(revision).await
    }

    fn publish(&self, records: &mut Records, revision: Revision) {
        let v = Arc::new(records.view(revision));
        self.stats.views.fetch_add(1, Ordering::Relaxed);
        self.tx.send_replace(v);
        self.ready.send_replace(true);
    }

    /// List, then watch, forever.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Backoff::default();
        'list: loop {
            let (items, revision) = match self.store.list(model::ROOT).await {
                Ok(l) => l,
                Err(e) => {
                    let wait = backoff.wait();
                    tracing::warn!(error = %e, retry_ms = wait.as_millis() as u64, "listing the store failed");
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            self.stats.lists.fetch_add(1, Ordering::Relaxed);
            let codec = self.codec.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut records = Records::listed_with(items, revision, codec);
            // Keep the views' kinds that did not change shared with the
            // old records (a relist after compaction changes little).
            let old = self.view();
            let mut next = records.view(revision);
            share_unchanged(&old, &mut next);
            records.endpoints = next.endpoints.clone();
            records.view = next.clone();
            self.stats.views.fetch_add(1, Ordering::Relaxed);
            self.tx.send_replace(Arc::new(next));
            self.ready.send_replace(true);
            let mut seen = revision;
            loop {
                tracing::debug!(from = seen + 1, "watching the store");
                let mut w = match self.store.watch(model::ROOT, seen + 1).await {
                    Ok(w) => w,
                    Err(StoreError::Compacted { .. }) => {
                        tracing::info!(
                            revision = seen,
                            "the store compacted past this agent's revision: listing again"
                        );
                        continue 'list;
                    }
                    Err(e) => {
                        let wait = backoff.wait();
                        tracing::warn!(error = %e, retry_ms = wait.as_millis() as u64, "watching the store failed");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                };
                self.stats.watches.fetch_add(1, Ordering::Relaxed);
                loop {
                    let ev = match w.next().await {
                        Some(Ok(ev)) => ev,
                        Some(Err(StoreError::Compacted { .. } | StoreError::WatchLagged(_))) => {
                            tracing::info!(revision = seen, "the store's watch fell behind: listing again");
                            continue 'list;
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "the store's watch broke: resuming");
                            break;
                        }
                        None => break,
                    };
                    backoff = Backoff::default();
                    // Apply what is ready with it (the rest of its
                    // revision comes in the same response), then publish.
                    let mut changed = false;
                    let mut apply = |ev: WatchEvent, seen: &mut Revision| {
                        self.stats.events.fetch_add(1, Ordering::Relaxed);
                        *seen = (*seen).max(ev.kv.mod_revision);
                        changed |= records.apply(ev);
                    };
                    apply(ev, &mut seen);
                    let mut broke = false;
                    while let Some(more) = w.next().now_or_never() {
                        match more {
                            Some(Ok(ev)) => apply(ev, &mut seen),
                            Some(Err(StoreError::Compacted { .. } | StoreError::WatchLagged(_))) => continue 'list,
                            _ => {
                                broke = true;
                                break;
                            }
                        }
                    }
                    if changed {
                        self.publish(&mut records, seen);
                    } else if self.view().revision < seen {
                        // Nothing the view keeps changed, but the revision
                        // moves on (a reader may wait for its own write to
                        // a key the view does not keep). The kinds' `Arc`s
                        // stay: followers see nothing changed.
                        self.publish(&mut records, seen);
                    }
                    if broke {
                        break;
                    }
                }
                // A broken watch: wait a little (jittered) and resume.
                tokio::time::sleep(backoff.wait()).await;
            }
        }
    }
}

/// Keep `old`'s `Arc` of every kind equal in `next` (pointer equality then
/// means "unchanged" across a relist too).
fn share_unchanged(old: &View, next: &mut View) {
    if old.networks == next.networks {
        next.networks = old.networks.clone();
    }
    // The endpoints: the old table with what differs applied, so that it
    // shares what did not change with the old one.
    let mut endpoints = old.endpoints.clone();
    for (before, after) in next.endpoints.changes(&old.endpoints) {
        match (before, after) {
            (_, Some(after)) => endpoints.insert_arc(after.clone()),
            (Some(before), None) => {
                endpoints.remove(&before.id);
            }
            (None, None) => {}
        }
    }
    next.endpoints = endpoints;
    if old.hosts == next.hosts {
        next.hosts = old.hosts.clone();
    }
    if old.services == next.services {
        next.services = old.services.clone();
    }
    if old.keys == next.keys {
        next.keys = old.keys.clone();
    }
    if old.mesh_addrs == next.mesh_addrs {
        next.mesh_addrs = old.mesh_addrs.clone();
    }
}

/// Jittered exponential backoff: 100 ms doubling to 5 s, each wait drawn
/// from [half, full] of the step so that agents spread out.
#[derive(Debug)]
pub struct Backoff {
    step: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { step: Duration::from_millis(100) }
    }
}

impl Backoff {
    pub const MAX: Duration = Duration::from_secs(5);

    pub fn wait(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(Backoff::MAX);
        let half = step / 2;
        half + Duration::from_micros(rand::random::<u64>() % (half.as_micros() as u64 + 1))
    }
}

/// The reconciler reads the informer: a pass sees every write this agent
/// made before it started, and no store request is made.
#[async_trait::async_trait]
impl crate::reconcile::DesiredSource for Informer {
    async fn load(&self) -> Result<crate::reconcile::Snapshot, String> {
        let v = self.current().await?;
        Ok(crate::reconcile::Snapshot {
            revision: v.revision,
            networks: v.networks.clone(),
            endpoints: v.endpoints.clone(),
            hosts: v.hosts.clone(),
            services: v.services.clone(),
            keys: v.keys.clone(),
            held_ports: Default::default(),
            mesh_addrs: v.mesh_addrs.clone(),
        })
    }
}

/// A store that remembers the revision of its last committed transaction
/// (see [`Informer::at_least`]); everything else passes through.
pub struct TrackWrites {
    inner: Arc<dyn Store>,
    written: Arc<AtomicI64>,
}

impl TrackWrites {
    pub fn new(inner: Arc<dyn Store>) -> (Arc<TrackWrites>, Arc<AtomicI64>) {
        let written = Arc::new(AtomicI64::new(0));
        (Arc::new(TrackWrites { inner, written: written.clone() }), written)
    }
}

#[async_trait::async_trait]
impl Store for TrackWrites {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn get(&self, key: &str) -> trellis_store::Result<Option<KeyValue>> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> trellis_store::Result<(Vec<KeyValue>, Revision)> {
        self.inner.list(prefix).await
    }
    async fn txn(
        &self,
        compares: Vec<trellis_store::Compare>,
        ops: Vec<trellis_store::Op>,
    ) -> trellis_store::Result<trellis_store::TxnOutcome> {
        let writes = !ops.is_empty();
        let out = self.inner.txn(compares, ops).await?;
        if out.succeeded && writes {
            self.written.fetch_max(out.revision, Ordering::SeqCst);
        }
        Ok(out)
    }
    async fn watch(&self, prefix: &str, start: Revision) -> trellis_store::Result<trellis_store::WatchStream> {
        self.inner.watch(prefix, start).await
    }
    async fn lease_grant(&self, ttl: Duration) -> trellis_store::Result<trellis_store::LeaseId> {
        self.inner.lease_grant(ttl).await
    }
    async fn lease_keep_alive(&self, lease: trellis_store::LeaseId) -> trellis_store::Result<()> {
        self.inner.lease_keep_alive(lease).await
    }
    async fn lease_revoke(&self, lease: trellis_store::LeaseId) -> trellis_store::Result<()> {
        self.inner.lease_revoke(lease).await
    }
    async fn lease_time_to_live(
        &self,
        lease: trellis_store::LeaseId,
    ) -> trellis_store::Result<Option<(Duration, Duration)>> {
        self.inner.lease_time_to_live(lease).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use trellis_store::{LocalStore, Op};

    use super::*;

    fn kv(key: &str, value: serde_json::Value, rev: Revision) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: serde_json::to_vec(&value).unwrap(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: None,
        }
    }

    fn host(id: &str) -> serde_json::Value {
        serde_json::json!({
            "id": id, "hostname": id, "underlay": "192.0.2.1", "vtep_mac": "02:00:00:00:00:01",
            "vxlan_port": 4789, "version": "0", "started_unix": 0,
        })
    }

    fn service(name: &str) -> serde_json::Value {
        serde_json::json!({
            "name": name, "network_id": "n1", "network": "app", "mode": "vip", "vip": "10.1.0.200",
            "ports": [], "selector": {}, "created_unix": 0,
        })
    }

    fn put(kv: KeyValue) -> WatchEvent {
        WatchEvent { kind: EventKind::Put, kv }
    }
    fn del(key: &str, rev: Revision) -> WatchEvent {
        WatchEvent { kind: EventKind::Delete, kv: KeyValue { value: vec![], ..kv(key, serde_json::json!(null), rev) } }
    }

    #[test]
    fn a_view_shares_what_did_not_change_and_ignores_other_keys() {
        let mut r = Records::listed(
            vec![kv(&model::host_key("h1"), host("h1"), 3), kv(&model::service_key("web"), service("web"), 4)],
            5,
        );
        let v1 = r.view(5);
        assert_eq!((v1.hosts.len(), v1.services.len(), v1.revision), (1, 1, 5));
        // A key no view holds changes nothing but the revision.
        assert!(!r.apply(put(kv(&format!("{}ipam/x", model::ROOT), serde_json::json!({}), 6))));
        let v2 = r.view(6);
        assert!(v1.same_records(&v2) && v2.revision == 6);
        // A new service: the services are new, the hosts the same allocation.
        assert!(r.apply(put(kv(&model::service_key("api"), service("api"), 7))));
        let v3 = r.view(7);
        assert!(!v2.same_records(&v3));
        assert!(Arc::ptr_eq(&v2.hosts, &v3.hosts) && !Arc::ptr_eq(&v2.services, &v3.services));
        assert_eq!(v3.services.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["api", "web"]);
        // The earlier view is untouched (views are immutable).
        assert_eq!(v2.services.len(), 1);
        assert!(r.apply(del(&model::host_key("h1"), 8)));
        assert!(r.view(8).hosts.is_empty());
    }

    #[test]
    fn events_older_than_what_is_held_change_nothing() {
        // The listing at 10 already has web rewritten at 9.
        let mut r = Records::listed(vec![kv(&model::service_key("web"), service("web"), 9)], 10);
        let v = r.view(10);
        // A put from before it (a watch resumed from an older revision) and
        // a delete from before it are stale.
        assert!(!r.apply(put(kv(&model::service_key("web"), service("web"), 8))));
        assert!(!r.apply(del(&model::service_key("web"), 7)));
        assert!(r.view(10).same_records(&v));
        assert_eq!(r.view(10).services.len(), 1);
        // A later delete holds.
        assert!(r.apply(del(&model::service_key("web"), 11)));
        assert!(r.view(11).services.is_empty());
    }

    #[test]
    fn a_record_that_does_not_decode_is_left_out_and_counted() {
        let mut r = Records::listed(vec![kv(&model::host_key("h1"), host("h1"), 2)], 2);
        assert_eq!(r.view(2).hosts.len(), 1);
        assert!(r.apply(put(kv(&model::host_key("h1"), serde_json::json!({"id": 1}), 3))));
        assert!(r.view(3).hosts.is_empty(), "a corrupt rewrite replaces the old record");
        assert_eq!(r.corrupt, 1);
    }

    #[tokio::test]
    async fn reads_wait_for_the_agents_own_writes_and_follow_the_others() {
        let raw: Arc<dyn Store> = Arc::new(LocalStore::memory());
        let (tracked, written) = TrackWrites::new(raw.clone());
        let inf = Informer::new(tracked.clone(), written);
        let task = tokio::spawn(inf.clone().run());
        tracked
            .txn(vec![], vec![Op::put(model::service_key("web"), serde_json::to_vec(&service("web")).unwrap())])
            .await
            .unwrap();
        // Right after the write, a load sees it (it waits for its revision).
        let v = inf.current().await.unwrap();
        assert_eq!(v.services.len(), 1);
        assert!(v.revision >= inf.written() && inf.written() > 0);
        // Another host's write arrives through the watch.
        let mut views = inf.subscribe();
        raw.txn(vec![], vec![Op::put(model::host_key("h2"), serde_json::to_vec(&host("h2")).unwrap())]).await.unwrap();
        let v = tokio::time::timeout(Duration::from_secs(5), views.wait_for(|v| v.hosts.len() == 1))
            .await
            .unwrap()
            .unwrap()
            .clone();
        assert!(Arc::ptr_eq(&v.services, &inf.view().services), "services unchanged: the same allocation");
        assert_eq!((inf.stats.lists.load(Ordering::Relaxed), inf.stats.watches.load(Ordering::Relaxed)), (1, 1));
        task.abort();
    }

    /// A store whose watches can be made to fail as etcd's do.
    struct Failing {
        inner: Arc<dyn Store>,
        /// The next watch call answers this.
        next_watch: Mutex<Option<StoreError>>,
        /// Listings made.
        lists: AtomicU64,
    }

    #[async_trait::async_trait]
    impl Store for Failing {
        fn backend(&self) -> &'static str {
            "failing"
        }
        async fn get(&self, key: &str) -> trellis_store::Result<Option<KeyValue>> {
            self.inner.get(key).await
        }
        async fn list(&self, prefix: &str) -> trellis_store::Result<(Vec<KeyValue>, Revision)> {
            self.lists.fetch_add(1, Ordering::SeqCst);
            self.inner.list(prefix).await
        }
        async fn txn(
            &self,
            c: Vec<trellis_store::Compare>,
            o: Vec<Op>,
        ) -> trellis_store::Result<trellis_store::TxnOutcome> {
            self.inner.txn(c, o).await
        }
        async fn watch(&self, prefix: &str, start: Revision) -> trellis_store::Result<trellis_store::WatchStream> {
            if let Some(e) = self.next_watch.lock().unwrap().take() {
                return Err(e);
            }
            self.inner.watch(prefix, start).await
        }
        async fn lease_grant(&self, ttl: Duration) -> trellis_store::Result<trellis_store::LeaseId> {
            self.inner.lease_grant(ttl).await
        }
        async fn lease_keep_alive(&self, l: trellis_store::LeaseId) -> trellis_store::Result<()> {
            self.inner.lease_keep_alive(l).await
        }
        async fn lease_revoke(&self, l: trellis_store::LeaseId) -> trellis_store::Result<()> {
            self.inner.lease_revoke(l).await
        }
        async fn lease_time_to_live(
            &self,
            l: trellis_store::LeaseId,
        ) -> trellis_store::Result<Option<(Duration, Duration)>> {
            self.inner.lease_time_to_live(l).await
        }
    }

    #[tokio::test]
    async fn a_compacted_watch_relists_and_an_unavailable_one_resumes() {
        let raw: Arc<dyn Store> = Arc::new(LocalStore::memory());
        let store = Arc::new(Failing { inner: raw.clone(), next_watch: Mutex::new(None), lists: AtomicU64::new(0) });
        // The first watch finds its revision compacted away: list again.
        *store.next_watch.lock().unwrap() = Some(StoreError::Compacted { requested: 1, oldest: 5 });
        let inf = Informer::new(store.clone(), Arc::new(AtomicI64::new(0)));
        let task = tokio::spawn(inf.clone().run());
        raw.txn(vec![], vec![Op::put(model::host_key("h1"), serde_json::to_vec(&host("h1")).unwrap())]).await.unwrap();
        let mut views = inf.subscribe();
        tokio::time::timeout(Duration::from_secs(5), views.wait_for(|v| v.hosts.len() == 1)).await.unwrap().unwrap();
        assert_eq!(store.lists.load(Ordering::SeqCst), 2, "listed again after the compaction");
        assert_eq!(inf.stats.watches.load(Ordering::Relaxed), 1);
        task.abort();

        // A store that is down when the watch opens: retried (backoff), no
        // second listing, and nothing missed in between.
        let store = Arc::new(Failing { inner: raw.clone(), next_watch: Mutex::new(None), lists: AtomicU64::new(0) });
        *store.next_watch.lock().unwrap() = Some(StoreError::Unavailable { backend: "test", reason: "down".into() });
        let inf = Informer::new(store.clone(), Arc::new(AtomicI64::new(0)));
        let task = tokio::spawn(inf.clone().run());
        let mut views = inf.subscribe();
        tokio::time::timeout(Duration::from_secs(5), views.wait_for(|v| v.hosts.len() == 1)).await.unwrap().unwrap();
        raw.txn(vec![], vec![Op::put(model::host_key("h2"), serde_json::to_vec(&host("h2")).unwrap())]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), views.wait_for(|v| v.hosts.len() == 2)).await.unwrap().unwrap();
        assert_eq!(store.lists.load(Ordering::SeqCst), 1, "resumed, not listed again");
        task.abort();
    }

    #[test]
    fn backoff_grows_to_its_cap_and_spreads() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..10).map(|_| b.wait()).collect();
        assert!(waits[0] >= Duration::from_millis(50) && waits[0] <= Duration::from_millis(100), "{waits:?}");
        assert!(waits.iter().all(|w| *w <= Backoff::MAX), "{waits:?}");
        assert!(waits[9] >= Backoff::MAX / 2, "{waits:?}");
        // Jittered: a hundred agents starting together do not all wait alike.
        let firsts: std::collections::BTreeSet<Duration> = (0..100).map(|_| Backoff::default().wait()).collect();
        assert!(firsts.len() > 50, "{} distinct first waits", firsts.len());
    }
}
