//! The etcd backend: the store of a cluster. Every call has a deadline, so
//! an unreachable etcd is an error on the call that needed it, never a hang.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use futures::StreamExt;

use crate::{
    Compare, EventKind, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError, TxnOutcome, WatchEvent, WatchStream,
};

/// TLS client certificates for etcd.
#[derive(Clone, Debug, Default)]
pub struct EtcdTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// How to reach etcd.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub tls: Option<EtcdTls>,
    /// Deadline of every request.
    pub timeout: Duration,
}

impl EtcdConfig {
    /// Parse `etcd://HOST:PORT[,HOST:PORT…]` (or `etcds://` for TLS).
    pub fn parse(spec: &str) -> Result<EtcdConfig> {
        let (scheme, rest) = spec
            .split_once("://")
            .ok_or_else(|| StoreError::Invalid(format!("store {spec:?}: expected etcd://HOST:PORT[,HOST:PORT…]")))?;
        let http = match scheme {
            "etcd" => "http",
            "etcds" => "https",
            other => return Err(StoreError::Invalid(format!("store {spec:?}: unknown scheme {other:?}"))),
        };
        let endpoints: Vec<String> = rest
            .split(',')
            .filter(|e| !e.is_empty())
            .map(|e| {
                if e.contains(':') {
                    Ok(format!("{http}://{e}"))
                } else {
                    Err(StoreError::Invalid(format!("store {spec:?}: endpoint {e:?} needs a port")))
                }
            })
            .collect::<Result<_>>()?;
        if endpoints.is_empty() {
            return Err(StoreError::Invalid(format!("store {spec:?}: no endpoints")));
        }
        Ok(EtcdConfig { endpoints, tls: (http == "https").then(EtcdTls::default), timeout: Duration::from_secs(5) })
    }
}

/// The etcd store.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    timeout: Duration,
    target: String,
}

fn unavailable(target: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable { backend: "etcd", reason: format!("{target}: {e}") }
}

/// Keys per page of a listing: 1,000 endpoint records are about 0.6 MiB.
pub const LIST_PAGE: i64 = 1000;

/// The first key past every key starting with `prefix` (etcd's range end
/// of a prefix; `\0` — every key — for an empty or all-0xff prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl EtcdStore {
    /// Connect (lazily: an unreachable etcd fails the first call, not this).
    pub async fn connect(cfg: &EtcdConfig) -> Result<EtcdStore> {
        let target = cfg.endpoints.join(",");
        let mut opts = ConnectOptions::new()
            .with_timeout(cfg.timeout)
            .with_connect_timeout(cfg.timeout)
            .with_keep_alive(Duration::from_secs(5), cfg.timeout);
        if let Some(tls) = &cfg.tls {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| StoreError::Invalid(format!("reading {}: {e}", p.display())))
            };
            let mut t = TlsOptions::new();
            if let Some(ca) = &tls.ca {
                t = t.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            match (&tls.cert, &tls.key) {
                (Some(c), Some(k)) => t = t.identity(Identity::from_pem(read(c)?, read(k)?)),
                (None, None) => {}
                _ => return Err(StoreError::Invalid("a TLS client certificate needs both cert and key".into())),
            }
            opts = opts.with_tls(t);
        }
        let client = Client::connect(cfg.endpoints.clone(), Some(opts)).await.map_err(|e| unavailable(&target, e))?;
        Ok(EtcdStore { client, timeout: cfg.timeout, target })
    }

    fn map(&self, e: etcd_client::Error) -> StoreError {
        match &e {
            etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::InvalidArgument => {
                StoreError::Invalid(s.message().to_string())
            }
            etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::NotFound => {
                StoreError::Backend { backend: "etcd", operation: "request", reason: s.message().to_string() }
            }
            _ => unavailable(&self.target, e),
        }
    }

    /// Run a request under the store's deadline.
    async fn deadline<T>(&self, fut: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r.map_err(|e| self.map(e)),
            Err(_) => Err(unavailable(&self.target, format!("no answer within {:?}", self.timeout))),
        }
    }
}

fn kv_of(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: (kv.lease() != 0).then_some(kv.lease()),
    }
}

/// etcd answers an unknown lease with NOT_FOUND "requested lease not found".
fn is_lease_not_found(e: &StoreError) -> bool {
    matches!(e, StoreError::Backend { reason, .. } if reason.contains("lease not found"))
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    fn backend(&self) -> &'static str {
        "etcd"
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let mut c = self.client.clone();
        let resp = self.deadline(c.get(key, None)).await?;
        Ok(resp.kvs().first().map(kv_of))
    }

    /// In pages of [`LIST_PAGE`] keys, every page at the first one's
    /// revision: a response is at most 4 MiB (the client's limit), and a
    /// large cluster's listing is past that.
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let mut c = self.client.clone();
        let end = prefix_end(prefix.as_bytes());
        let mut from = if prefix.is_empty() { vec![0] } else { prefix.as_bytes().to_vec() };
        let mut out = Vec::new();
        let mut revision = 0;
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(LIST_PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = self.deadline(c.get(from.clone(), Some(opts))).await?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            out.extend(resp.kvs().iter().map(kv_of));
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    // The next page starts just past the last key.
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((out, revision)),
            }
        }
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome> {
        let when: Vec<EtcdCompare> = compares
            .into_iter()
            .map(|c| match c {
                Compare::Absent(k) => EtcdCompare::version(k, CompareOp::Equal, 0),
                // etcd gives an absent key mod_revision 0; ours never holds then.
                Compare::ModRevision(k, r) if r <= 0 => EtcdCompare::create_revision(k, CompareOp::Less, 0),
                Compare::ModRevision(k, r) => EtcdCompare::mod_revision(k, CompareOp::Equal, r),
                Compare::Value(k, v) => EtcdCompare::value(k, CompareOp::Equal, v),
            })
            .collect();
        let lease = ops.iter().find_map(|op| match op {
            Op::Put { lease: Some(l), .. } => Some(*l),
            _ => None,
        });
        let then: Vec<TxnOp> = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => TxnOp::put(key, value, lease.map(|l| PutOptions::new().with_lease(l))),
                Op::Delete { key } => TxnOp::delete(key, None),
            })
            .collect();
        let mut c = self.client.clone();
        let resp = self
            .deadline(c.txn(Txn::new().when(when).and_then(then)))
            .await
            .map_err(|e| if is_lease_not_found(&e) { StoreError::LeaseNotFound(lease.unwrap_or(0)) } else { e })?;
        Ok(TxnOutcome { succeeded: resp.succeeded(), revision: resp.header().map(|h| h.revision()).unwrap_or(0) })
    }

    async fn watch(&self, prefix: &str, start_revision: Revision) -> Result<WatchStream> {
        let mut c = self.client.clone();
        let mut opts = WatchOptions::new().with_prefix();
        if start_revision > 0 {
            opts = opts.with_start_revision(start_revision);
        }
        let mut stream = self.deadline(c.watch(prefix, Some(opts))).await?;
        // The first message confirms creation or says the revision is gone.
        let first = self.deadline(stream.message()).await?;
        if let Some(r) = &first
            && (r.compact_revision() > 0 || r.canceled())
        {
            return Err(StoreError::Compacted { requested: start_revision, oldest: r.compact_revision() });
        }
        let target = self.target.clone();
        let events = futures::stream::unfold((stream, first), move |(mut stream, pending)| {
            let target = target.clone();
            async move {
                let resp = match pending {
                    Some(r) if !r.events().is_empty() => Ok(Some(r)),
                    _ => stream.message().await,
                };
                match resp {
                    Ok(Some(r)) => {
                        // etcd confirms the watch first and says the start
                        // revision was compacted away in the next message.
                        if r.compact_revision() > 0 {
                            let e = StoreError::Compacted { requested: start_revision, oldest: r.compact_revision() };
                            return Some((vec![Err(e)], (stream, None)));
                        }
                        if r.canceled() {
                            let e = StoreError::Unavailable {
                                backend: "etcd",
                                reason: format!("{target}: watch canceled: {}", r.cancel_reason()),
                            };
                            return Some((vec![Err(e)], (stream, None)));
                        }
                        let evs: Vec<Result<WatchEvent>> = r
                            .events()
                            .iter()
                            .filter_map(|ev| {
                                let kv = ev.kv()?;
                                let mut k = kv_of(kv);
                                let kind = match ev.event_type() {
                                    EventType::Put => EventKind::Put,
                                    EventType::Delete => {
                                        k.value.clear();
                                        EventKind::Delete
                                    }
                                };
                                Some(Ok(WatchEvent { kind, kv: k }))
                            })
                            .collect();
                        Some((evs, (stream, None)))
                    }
                    Ok(None) => None,
                    Err(e) => Some((vec![Err(unavailable(&target, e))], (stream, None))),
                }
            }
        })
        .flat_map(futures::stream::iter);
        Ok(Box::pin(events))
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("lease TTL must be positive".into()));
        }
        let secs = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let mut c = self.client.clone();
        Ok(self.deadline(c.lease_grant(secs, None)).await?.id())
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<()> {
        let mut c = self.client.clone();
        let gone = |e: StoreError| {
            if is_lease_not_found(&e)
                || matches!(&e, StoreError::Unavailable { reason, .. } if reason.contains("lease not found"))
            {
                StoreError::LeaseNotFound(lease)
            } else {
                e
            }
        };
        let (mut keeper, mut stream) = self.deadline(c.lease_keep_alive(lease)).await.map_err(gone)?;
        self.deadline(keeper.keep_alive()).await.map_err(gone)?;
        match self.deadline(stream.message()).await.map_err(gone)? {
            Some(r) if r.ttl() > 0 => Ok(()),
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn lease_time_to_live(&self, lease: LeaseId) -> Result<Option<(Duration, Duration)>> {
        let mut c = self.client.clone();
        match self.deadline(c.lease_time_to_live(lease, None)).await {
            Ok(r) if r.ttl() > 0 => {
                Ok(Some((Duration::from_secs(r.ttl() as u64), Duration::from_secs(r.granted_ttl().max(0) as u64))))
            }
            Ok(_) => Ok(None),
            Err(e) if is_lease_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        let mut c = self.client.clone();
        match self.deadline(c.lease_revoke(lease)).await {
            Ok(_) => Ok(()),
            Err(e) if is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(lease)),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_prefix_s_range_ends_past_its_last_key() {
        assert_eq!(super::prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(super::prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(super::prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(super::prefix_end(b""), vec![0]);
    }

    use super::*;

    #[test]
    fn parse_specs() {
        let c = EtcdConfig::parse("etcd://10.0.0.5:2379,10.0.0.6:2379").unwrap();
        assert_eq!(c.endpoints, ["http://10.0.0.5:2379", "http://10.0.0.6:2379"]);
        assert!(c.tls.is_none());
        let c = EtcdConfig::parse("etcds://e1:2379").unwrap();
        assert_eq!(c.endpoints, ["https://e1:2379"]);
        assert!(c.tls.is_some());
        for bad in ["10.0.0.5:2379", "zk://a:1", "etcd://", "etcd://hostonly"] {
            assert!(EtcdConfig::parse(bad).is_err(), "{bad}");
        }
    }
}
