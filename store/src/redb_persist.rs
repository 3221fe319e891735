//! Persistence of the local store in a redb file, with group commit.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use crate::local::Entry;
use crate::{LeaseId, Result, Revision, StoreError};

const KV: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<'_, &str, i64> = TableDefinition::new("meta");
const LEASES: TableDefinition<'_, i64, u64> = TableDefinition::new("leases");
/// Most mutations folded into one redb transaction.
const MAX_BATCH: usize = 4096;

pub(crate) enum PersistOp {
    PutKv(String, Entry),
    DelKv(String),
    PutLease(LeaseId, Duration),
    DelLease(LeaseId),
    Meta { revision: Revision, next_lease: LeaseId },
}

#[derive(Default)]
pub(crate) struct Persisted {
    pub kv: BTreeMap<String, Entry>,
    pub revision: Revision,
    pub next_lease: LeaseId,
    pub leases: Vec<(LeaseId, Duration)>,
}

type Job = (Vec<PersistOp>, oneshot::Sender<Result<()>>);

pub(crate) struct RedbPersist {
    tx: std_mpsc::Sender<Job>,
}

fn err(operation: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend { backend: "redb", operation, reason: e.to_string() }
}

fn encode(e: &Entry) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + e.value.len());
    out.extend_from_slice(&e.create_revision.to_le_bytes());
    out.extend_from_slice(&e.mod_revision.to_le_bytes());
    out.extend_from_slice(&e.version.to_le_bytes());
    out.extend_from_slice(&e.lease.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&e.value);
    out
}

fn decode(b: &[u8]) -> Option<Entry> {
    if b.len() < 32 {
        return None;
    }
    let word = |i: usize| i64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let lease = word(3);
    Some(Entry {
        create_revision: word(0),
        mod_revision: word(1),
        version: word(2),
        lease: (lease != 0).then_some(lease),
        value: b[32..].to_vec(),
    })
}

impl RedbPersist {
    pub fn open(path: &Path) -> Result<(RedbPersist, Persisted)> {
        let db = Database::create(path).map_err(|e| err("open", format!("{}: {e}", path.display())))?;
        // Make sure the tables exist so that a fresh file reads as empty.
        let w = db.begin_write().map_err(|e| err("open", e))?;
        {
            w.open_table(KV).map_err(|e| err("open", e))?;
            w.open_table(META).map_err(|e| err("open", e))?;
            w.open_table(LEASES).map_err(|e| err("open", e))?;
        }
        w.commit().map_err(|e| err("open", e))?;

        let mut loaded = Persisted::default();
        let r = db.begin_read().map_err(|e| err("load", e))?;
        let kv = r.open_table(KV).map_err(|e| err("load", e))?;
        for item in kv.iter().map_err(|e| err("load", e))? {
            let (k, v) = item.map_err(|e| err("load", e))?;
            let entry =
                decode(v.value()).ok_or_else(|| err("load", format!("corrupt record for key {:?}", k.value())))?;
            loaded.kv.insert(k.value().to_string(), entry);
        }
        let meta = r.open_table(META).map_err(|e| err("load", e))?;
        loaded.revision = meta.get("revision").map_err(|e| err("load", e))?.map(|v| v.value()).unwrap_or(0);
        loaded.next_lease = meta.get("next_lease").map_err(|e| err("load", e))?.map(|v| v.value()).unwrap_or(1);
        let leases = r.open_table(LEASES).map_err(|e| err("load", e))?;
        for item in leases.iter().map_err(|e| err("load", e))? {
            let (k, v) = item.map_err(|e| err("load", e))?;
            loaded.leases.push((k.value(), Duration::from_millis(v.value())));
        }
        drop((kv, meta, leases, r));

        let (tx, rx) = std_mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("trellis-redb".into())
            .spawn(move || writer(db, rx))
            .map_err(|e| err("start writer", e))?;
        Ok((RedbPersist { tx }, loaded))
    }

    pub async fn commit(&self, ops: Vec<PersistOp>) -> Result<()> {
        let (done, wait) = oneshot::channel();
        self.tx.send((ops, done)).map_err(|_| err("commit", "writer thread has stopped"))?;
        wait.await.map_err(|_| err("commit", "writer thread has stopped"))?
    }
}

fn writer(db: Database, rx: std_mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let result = write_batch(&db, &jobs);
        for (_, done) in jobs {
            let _ = done.send(result.as_ref().map(|_| ()).map_err(|e| err("commit", e)));
        }
    }
}

fn write_batch(db: &Database, jobs: &[Job]) -> std::result::Result<(), String> {
    let w = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut kv = w.open_table(KV).map_err(|e| e.to_string())?;
        let mut meta = w.open_table(META).map_err(|e| e.to_string())?;
        let mut leases = w.open_table(LEASES).map_err(|e| e.to_string())?;
        for op in jobs.iter().flat_map(|(ops, _)| ops) {
            match op {
                PersistOp::PutKv(k, e) => {
                    kv.insert(k.as_str(), encode(e).as_slice()).map_err(|e| e.to_string())?;
                }
                PersistOp::DelKv(k) => {
                    kv.remove(k.as_str()).map_err(|e| e.to_string())?;
                }
                PersistOp::PutLease(id, ttl) => {
                    leases.insert(*id, ttl.as_millis() as u64).map_err(|e| e.to_string())?;
                }
                PersistOp::DelLease(id) => {
                    leases.remove(*id).map_err(|e| e.to_string())?;
                }
                PersistOp::Meta { revision, next_lease } => {
                    meta.insert("revision", *revision).map_err(|e| e.to_string())?;
                    meta.insert("next_lease", *next_lease).map_err(|e| e.to_string())?;
                }
            }
        }
    }
    w.commit().map_err(|e| e.to_string())
}
