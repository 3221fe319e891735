//! The Trellis cluster store.
//!
//! One trait, [`Store`], with the semantics of etcd's v3 API reduced to what
//! Trellis needs: a flat key space of byte values, a global revision that
//! increases with every change, compare-and-swap transactions, prefix
//! watches that can resume from a revision, and leases whose expiry deletes
//! the keys attached to them.
//!
//! Backends: [`LocalStore::memory`] (tests, pure logic) and
//! [`LocalStore::open_redb`] (the embedded store of a single host). The etcd
//! backend lives with the agent's cluster code and passes the same
//! [`conformance`] suite.

mod etcd;
mod local;
mod redb_persist;

pub mod conformance;

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;

pub use etcd::{EtcdConfig, EtcdStore, EtcdTls};
pub use local::LocalStore;

/// A store revision. Every successful mutation increases it by one.
pub type Revision = i64;
/// A lease identifier, never 0.
pub type LeaseId = i64;

/// A key with its value and bookkeeping, as etcd reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision at which the key was (last) created.
    pub create_revision: Revision,
    /// Revision of the last change to the key.
    pub mod_revision: Revision,
    /// Number of changes since creation (1 after the create).
    pub version: i64,
    pub lease: Option<LeaseId>,
}

/// A condition of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(String),
    /// The key exists with exactly this modification revision.
    ModRevision(String, Revision),
    /// The key exists with exactly this value.
    Value(String, Vec<u8>),
}

/// A mutation inside a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Vec<u8>, lease: Option<LeaseId> },
    Delete { key: String },
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Op {
        Op::Put { key: key.into(), value: value.into(), lease: None }
    }
    pub fn put_with_lease(key: impl Into<String>, value: impl Into<Vec<u8>>, lease: LeaseId) -> Op {
        Op::Put { key: key.into(), value: value.into(), lease: Some(lease) }
    }
    pub fn delete(key: impl Into<String>) -> Op {
        Op::Delete { key: key.into() }
    }
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// The outcome of a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Whether every comparison held and the operations were applied.
    pub succeeded: bool,
    /// The store revision after the transaction (unchanged when it failed
    /// or changed nothing).
    pub revision: Revision,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch. For a delete, `kv.value` is empty and
/// `kv.mod_revision` is the revision of the deletion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub kv: KeyValue,
}

/// A stream of changes under a prefix, in revision order.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, StoreError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable ({backend}): {reason}")]
    Unavailable { backend: &'static str, reason: String },
    #[error("revision {requested} has been compacted (oldest available is {oldest})")]
    Compacted { requested: Revision, oldest: Revision },
    #[error("lease {0} not found or expired")]
    LeaseNotFound(LeaseId),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("watch fell behind by {0} events and was closed; list and watch again")]
    WatchLagged(u64),
    #[error("{backend} backend failed during {operation}: {reason}")]
    Backend { backend: &'static str, operation: &'static str, reason: String },
}

impl StoreError {
    /// Whether retrying the same call later may succeed (the store was
    /// unreachable rather than the request wrong).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. } | StoreError::WatchLagged(_))
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The cluster store.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// A short name of the backend for messages and metrics.
    fn backend(&self) -> &'static str;

    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Every key starting with `prefix`, in key order, and the store
    /// revision the listing reflects (watch from `revision + 1` to follow on
    /// without a gap).
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)>;

    /// Apply `ops` atomically if every comparison holds.
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome>;

    /// Changes of keys under `prefix` with revision ≥ `start_revision`
    /// (0: from now on).
    async fn watch(&self, prefix: &str, start_revision: Revision) -> Result<WatchStream>;

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId>;
    /// Refresh a lease; fails with [`StoreError::LeaseNotFound`] once it has
    /// expired, after which its keys are gone.
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<()>;
    /// Revoke a lease and delete its keys now.
    async fn lease_revoke(&self, lease: LeaseId) -> Result<()>;
    /// The time a lease has left and the TTL it was granted with; `None`
    /// once it has expired.
    async fn lease_time_to_live(&self, lease: LeaseId) -> Result<Option<(Duration, Duration)>>;

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        Ok(self.txn(vec![], vec![Op::put(key, value)]).await?.revision)
    }

    async fn delete(&self, key: &str) -> Result<Revision> {
        Ok(self.txn(vec![], vec![Op::delete(key)]).await?.revision)
    }

    /// Create `key` only if it does not exist; `false` if it did.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<bool> {
        Ok(self.txn(vec![Compare::Absent(key.to_string())], vec![Op::put(key, value)]).await?.succeeded)
    }
}
