//! The in-process store: one state machine, optionally persisted to redb.
//!
//! All reads are served from memory. A mutation is applied to memory under
//! one lock (which orders it), queued to the persistence writer in that same
//! order, and acknowledged only once the writer has committed it. The
//! writer commits whatever has queued up in one redb transaction (group
//! commit), so concurrent writers share an fsync.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::redb_persist::{PersistOp, Persisted, RedbPersist};
use crate::{
    Compare, EventKind, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError, TxnOutcome, WatchEvent, WatchStream,
};

/// How many past events are kept for watches that start in the past.
const HISTORY_LIMIT: usize = 100_000;
/// How often leases are checked for expiry in the background.
const LEASE_TICK: Duration = Duration::from_millis(50);

#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    pub version: i64,
    pub lease: Option<LeaseId>,
}

impl Entry {
    fn to_kv(&self, key: &str) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: self.value.clone(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            lease: self.lease,
        }
    }
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct Watcher {
    prefix: String,
    tx: mpsc::UnboundedSender<Result<WatchEvent>>,
}

struct State {
    kv: BTreeMap<String, Entry>,
    revision: Revision,
    next_lease: LeaseId,
    leases: HashMap<LeaseId, Lease>,
    history: VecDeque<WatchEvent>,
    /// The oldest revision a watch may start from.
    oldest: Revision,
    watchers: Vec<Watcher>,
}

struct Inner {
    name: &'static str,
    state: Mutex<State>,
    persist: Option<RedbPersist>,
}

/// The memory and embedded (redb) store.
#[derive(Clone)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

impl LocalStore {
    /// A store that lives only in this process.
    pub fn memory() -> LocalStore {
        LocalStore::build("memory", Persisted::default(), None)
    }

    /// The embedded store, persisted in a redb file (created if absent).
    /// Leases restart their TTL when the file is opened again.
    pub fn open_redb(path: &Path) -> Result<LocalStore> {
        let (persist, loaded) = RedbPersist::open(path)?;
        Ok(LocalStore::build("redb", loaded, Some(persist)))
    }

    fn build(name: &'static str, loaded: Persisted, persist: Option<RedbPersist>) -> LocalStore {
        let now = Instant::now();
        let mut leases: HashMap<LeaseId, Lease> = loaded
            .leases
            .iter()
            .map(|(id, ttl)| (*id, Lease { ttl: *ttl, deadline: now + *ttl, keys: BTreeSet::new() }))
            .collect();
        for (key, entry) in &loaded.kv {
            if let Some(lease) = entry.lease.and_then(|l| leases.get_mut(&l)) {
                lease.keys.insert(key.clone());
            }
        }
        let state = State {
            kv: loaded.kv,
            revision: loaded.revision,
            next_lease: loaded.next_lease.max(1),
            leases,
            history: VecDeque::new(),
            oldest: loaded.revision + 1,
            watchers: Vec::new(),
        };
        let inner = Arc::new(Inner { name, state: Mutex::new(state), persist });
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&inner);
            handle.spawn(expire_loop(weak));
        }
        LocalStore { inner }
    }

    /// The current revision.
    pub fn revision(&self) -> Revision {
        self.inner.lock().revision
    }

    async fn commit(&self, ops: Vec<PersistOp>) -> Result<()> {
        match (&self.inner.persist, ops.is_empty()) {
            (Some(p), false) => p.commit(ops).await,
            _ => Ok(()),
        }
    }
}

async fn expire_loop(weak: Weak<Inner>) {
    let mut tick = tokio::time::interval(LEASE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        let ops = {
            let mut st = inner.lock();
            st.expire_due(Instant::now())
        };
        if let (Some(p), false) = (&inner.persist, ops.is_empty())
            && let Err(e) = p.commit(ops).await
        {
            tracing::warn!(error = %e, "persisting lease expiry failed");
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state consistent (every
        // mutation is validated before it is applied), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn holds(&self, c: &Compare) -> bool {
        match c {
            Compare::Absent(k) => !self.kv.contains_key(k),
            Compare::ModRevision(k, r) => self.kv.get(k).is_some_and(|e| e.mod_revision == *r),
            Compare::Value(k, v) => self.kv.get(k).is_some_and(|e| &e.value == v),
        }
    }

    fn emit(&mut self, event: WatchEvent) {
        self.watchers.retain(|w| {
            if event.kv.key.starts_with(&w.prefix) { w.tx.send(Ok(event.clone())).is_ok() } else { !w.tx.is_closed() }
        });
        self.history.push_back(event);
        while self.history.len() > HISTORY_LIMIT {
            if let Some(old) = self.history.pop_front() {
                self.oldest = old.kv.mod_revision + 1;
            }
        }
    }

    /// Remove `key` at revision `rev`; returns what to persist.
    fn remove_key(&mut self, key: &str, rev: Revision, out: &mut Vec<PersistOp>) {
        if let Some(old) = self.kv.remove(key) {
            if let Some(lease) = old.lease.and_then(|l| self.leases.get_mut(&l)) {
                lease.keys.remove(key);
            }
            out.push(PersistOp::DelKv(key.to_string()));
            self.emit(WatchEvent {
                kind: EventKind::Delete,
                kv: KeyValue {
                    key: key.to_string(),
                    value: Vec::new(),
                    create_revision: old.create_revision,
                    mod_revision: rev,
                    version: 0,
                    lease: None,
                },
            });
        }
    }

    fn expire_due(&mut self, now: Instant) -> Vec<PersistOp> {
        let due: Vec<LeaseId> = self.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
        let mut out = Vec::new();
        for id in due {
            self.revoke(id, &mut out);
        }
        out
    }

    fn revoke(&mut self, id: LeaseId, out: &mut Vec<PersistOp>) -> bool {
        let Some(lease) = self.leases.remove(&id) else {
            return false;
        };
        out.push(PersistOp::DelLease(id));
        if !lease.keys.is_empty() {
            self.revision += 1;
            let rev = self.revision;
            for key in &lease.keys {
                self.remove_key(key, rev, out);
            }
            out.push(PersistOp::Meta { revision: self.revision, next_lease: self.next_lease });
        }
        true
    }

    fn apply_txn(&mut self, compares: &[Compare], ops: Vec<Op>) -> Result<(TxnOutcome, Vec<PersistOp>)> {
        let mut seen = HashSet::new();
        for op in &ops {
            if op.key().is_empty() {
                return Err(StoreError::Invalid("empty key".into()));
            }
            if !seen.insert(op.key()) {
                return Err(StoreError::Invalid(format!("key {:?} appears twice in one transaction", op.key())));
            }
            if let Op::Put { lease: Some(l), .. } = op
                && !self.leases.contains_key(l)
            {
                return Err(StoreError::LeaseNotFound(*l));
            }
        }
        if !compares.iter().all(|c| self.holds(c)) {
            return Ok((TxnOutcome { succeeded: false, revision: self.revision }, Vec::new()));
        }
        let changes = ops.iter().any(|op| match op {
            Op::Put { .. } => true,
            Op::Delete { key } => self.kv.contains_key(key),
        });
        let mut out = Vec::new();
        if changes {
            self.revision += 1;
            let rev = self.revision;
            for op in ops {
                match op {
                    Op::Delete { key } => self.remove_key(&key, rev, &mut out),
                    Op::Put { key, value, lease } => {
                        let (create_revision, version, old_lease) = match self.kv.get(&key) {
                            Some(e) => (e.create_revision, e.version + 1, e.lease),
                            None => (rev, 1, None),
                        };
                        if old_lease != lease {
                            if let Some(l) = old_lease.and_then(|l| self.leases.get_mut(&l)) {
                                l.keys.remove(&key);
                            }
                            if let Some(l) = lease.and_then(|l| self.leases.get_mut(&l)) {
                                l.keys.insert(key.clone());
                            }
                        }
                        let entry = Entry { value, create_revision, mod_revision: rev, version, lease };
                        out.push(PersistOp::PutKv(key.clone(), entry.clone()));
                        let kv = entry.to_kv(&key);
                        self.kv.insert(key, entry);
                        self.emit(WatchEvent { kind: EventKind::Put, kv });
                    }
                }
            }
            out.push(PersistOp::Meta { revision: self.revision, next_lease: self.next_lease });
        }
        Ok((TxnOutcome { succeeded: true, revision: self.revision }, out))
    }
}

#[async_trait::async_trait]
impl Store for LocalStore {
    fn backend(&self) -> &'static str {
        self.inner.name
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let st = self.inner.lock();
        Ok(st.kv.get(key).map(|e| e.to_kv(key)))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let st = self.inner.lock();
        let items = st
            .kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| e.to_kv(k))
            .collect();
        Ok((items, st.revision))
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome> {
        let (outcome, persist) = {
            let mut st = self.inner.lock();
            let mut expired = st.expire_due(Instant::now());
            let (outcome, persist) = st.apply_txn(&compares, ops)?;
            expired.extend(persist);
            (outcome, expired)
        };
        self.commit(persist).await?;
        Ok(outcome)
    }

    async fn watch(&self, prefix: &str, start_revision: Revision) -> Result<WatchStream> {
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut st = self.inner.lock();
            if start_revision > 0 && start_revision <= st.revision {
                if start_revision < st.oldest {
                    return Err(StoreError::Compacted { requested: start_revision, oldest: st.oldest });
                }
                for ev in st.history.iter() {
                    if ev.kv.mod_revision >= start_revision && ev.kv.key.starts_with(prefix) {
                        let _ = tx.send(Ok(ev.clone()));
                    }
                }
            }
            // Events of revisions after `start_revision` that have not
            // happened yet arrive through the registered channel.
            st.watchers.push(Watcher { prefix: prefix.to_string(), tx });
        }
        let min = start_revision;
        Ok(Box::pin(
            UnboundedReceiverStream::new(rx)
                .filter(move |ev| ev.as_ref().map(|e| e.kv.mod_revision >= min).unwrap_or(true)),
        ))
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("lease TTL must be positive".into()));
        }
        let (id, ops) = {
            let mut st = self.inner.lock();
            let id = st.next_lease;
            st.next_lease += 1;
            st.leases.insert(id, Lease { ttl, deadline: Instant::now() + ttl, keys: BTreeSet::new() });
            (
                id,
                vec![
                    PersistOp::PutLease(id, ttl),
                    PersistOp::Meta { revision: st.revision, next_lease: st.next_lease },
                ],
            )
        };
        self.commit(ops).await?;
        Ok(id)
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<()> {
        let ops = {
            let mut st = self.inner.lock();
            let now = Instant::now();
            let ops = st.expire_due(now);
            match st.leases.get_mut(&lease) {
                Some(l) => {
                    l.deadline = now + l.ttl;
                    Ok(ops)
                }
                None => Err((StoreError::LeaseNotFound(lease), ops)),
            }
        };
        match ops {
            Ok(ops) => self.commit(ops).await,
            Err((e, ops)) => {
                self.commit(ops).await?;
                Err(e)
            }
        }
    }

    async fn lease_time_to_live(&self, lease: LeaseId) -> Result<Option<(Duration, Duration)>> {
        let st = self.inner.lock();
        let now = Instant::now();
        Ok(st.leases.get(&lease).filter(|l| l.deadline > now).map(|l| (l.deadline - now, l.ttl)))
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        let (found, ops) = {
            let mut st = self.inner.lock();
            let mut ops = Vec::new();
            (st.revoke(lease, &mut ops), ops)
        };
        self.commit(ops).await?;
        if found { Ok(()) } else { Err(StoreError::LeaseNotFound(lease)) }
    }
}
