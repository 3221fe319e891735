//! The conformance suite every [`Store`] backend must pass.
//!
//! Each check takes a store and a key prefix that is unique to the test, so
//! backends shared between tests (one etcd for a whole test run) stay
//! independent. [`store_conformance_tests!`](crate::store_conformance_tests)
//! turns the suite into one `#[tokio::test]` per check for a backend.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use crate::{Compare, EventKind, Op, Store, StoreError, WatchStream};

async fn next_event(w: &mut WatchStream) -> crate::WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("watch event within 10 s")
        .expect("watch stream open")
        .expect("watch event, not an error")
}

pub async fn put_get_delete(s: Arc<dyn Store>, p: &str) {
    let k = format!("{p}a");
    assert_eq!(s.get(&k).await.unwrap(), None);
    let r1 = s.put(&k, b"one".to_vec()).await.unwrap();
    let kv = s.get(&k).await.unwrap().expect("key after put");
    assert_eq!(kv.value, b"one");
    assert_eq!(kv.create_revision, r1);
    assert_eq!(kv.mod_revision, r1);
    assert_eq!(kv.version, 1);
    let r2 = s.put(&k, b"two".to_vec()).await.unwrap();
    assert!(r2 > r1, "revision must grow: {r1} then {r2}");
    let kv = s.get(&k).await.unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.create_revision, kv.mod_revision, kv.version), (&b"two"[..], r1, r2, 2));
    let r3 = s.delete(&k).await.unwrap();
    assert!(r3 > r2);
    assert_eq!(s.get(&k).await.unwrap(), None);
    // Re-creating starts a new life of the key.
    let r4 = s.put(&k, b"three".to_vec()).await.unwrap();
    let kv = s.get(&k).await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.version), (r4, 1));
}

pub async fn list_prefix(s: Arc<dyn Store>, p: &str) {
    for k in ["x/1", "x/2", "x/10", "y/1", "x"] {
        s.put(&format!("{p}{k}"), k.as_bytes().to_vec()).await.unwrap();
    }
    let (items, rev) = s.list(&format!("{p}x/")).await.unwrap();
    let keys: Vec<_> = items.iter().map(|kv| kv.key.strip_prefix(p).unwrap().to_string()).collect();
    assert_eq!(keys, ["x/1", "x/10", "x/2"], "sorted, only under the prefix");
    assert!(rev >= items.iter().map(|kv| kv.mod_revision).max().unwrap());
    let (none, _) = s.list(&format!("{p}z/")).await.unwrap();
    assert!(none.is_empty());
}

pub async fn txn_compare_and_swap(s: Arc<dyn Store>, p: &str) {
    let k = format!("{p}cas");
    let other = format!("{p}other");
    assert!(s.create(&k, b"v1".to_vec()).await.unwrap(), "create on absent key");
    assert!(!s.create(&k, b"v2".to_vec()).await.unwrap(), "create on present key fails");
    let kv = s.get(&k).await.unwrap().unwrap();
    assert_eq!(kv.value, b"v1");

    // A stale revision fails and changes nothing, including the other ops.
    let out = s
        .txn(
            vec![Compare::ModRevision(k.clone(), kv.mod_revision - 1)],
            vec![Op::put(&k, b"bad".to_vec()), Op::put(&other, b"bad".to_vec())],
        )
        .await
        .unwrap();
    assert!(!out.succeeded);
    assert_eq!(s.get(&k).await.unwrap().unwrap().value, b"v1");
    assert_eq!(s.get(&other).await.unwrap(), None);

    // The current revision succeeds and applies every op at one revision.
    let out = s
        .txn(
            vec![Compare::ModRevision(k.clone(), kv.mod_revision), Compare::Absent(other.clone())],
            vec![Op::put(&k, b"v2".to_vec()), Op::put(&other, b"o".to_vec())],
        )
        .await
        .unwrap();
    assert!(out.succeeded);
    let a = s.get(&k).await.unwrap().unwrap();
    let b = s.get(&other).await.unwrap().unwrap();
    assert_eq!(a.mod_revision, out.revision);
    assert_eq!(b.mod_revision, out.revision);

    // Value comparison.
    let out = s.txn(vec![Compare::Value(k.clone(), b"v1".to_vec())], vec![Op::delete(&k)]).await.unwrap();
    assert!(!out.succeeded);
    let out = s.txn(vec![Compare::Value(k.clone(), b"v2".to_vec())], vec![Op::delete(&k)]).await.unwrap();
    assert!(out.succeeded);
    assert_eq!(s.get(&k).await.unwrap(), None);
    // ModRevision on an absent key never holds.
    let out = s.txn(vec![Compare::ModRevision(k.clone(), 0)], vec![Op::put(&k, b"x".to_vec())]).await.unwrap();
    assert!(!out.succeeded);
}

pub async fn txn_rejects_duplicate_keys(s: Arc<dyn Store>, p: &str) {
    let k = format!("{p}dup");
    let e = s.txn(vec![], vec![Op::put(&k, b"1".to_vec()), Op::delete(&k)]).await.unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "got {e:?}");
    assert_eq!(s.get(&k).await.unwrap(), None);
}

/// Many writers incrementing one counter with CAS lose no update.
pub async fn concurrent_cas_loses_nothing(s: Arc<dyn Store>, p: &str) {
    let k = format!("{p}counter");
    s.put(&k, b"0".to_vec()).await.unwrap();
    let writers = 8;
    let per = 25;
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let s = s.clone();
        let k = k.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                loop {
                    let kv = s.get(&k).await.unwrap().unwrap();
                    let n: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
                    let out = s
                        .txn(
                            vec![Compare::ModRevision(k.clone(), kv.mod_revision)],
                            vec![Op::put(&k, (n + 1).to_string().into_bytes())],
                        )
                        .await
                        .unwrap();
                    if out.succeeded {
                        break;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let kv = s.get(&k).await.unwrap().unwrap();
    assert_eq!(std::str::from_utf8(&kv.value).unwrap(), (writers * per).to_string());
}

pub async fn watch_prefix_in_order(s: Arc<dyn Store>, p: &str) {
    let mut w = s.watch(&format!("{p}w/"), 0).await.unwrap();
    let r1 = s.put(&format!("{p}w/a"), b"1".to_vec()).await.unwrap();
    s.put(&format!("{p}elsewhere"), b"x".to_vec()).await.unwrap();
    let r2 = s.put(&format!("{p}w/b"), b"2".to_vec()).await.unwrap();
    let r3 = s.delete(&format!("{p}w/a")).await.unwrap();
    let e1 = next_event(&mut w).await;
    assert_eq!((e1.kind, e1.kv.key.clone(), e1.kv.mod_revision), (EventKind::Put, format!("{p}w/a"), r1));
    assert_eq!(e1.kv.value, b"1");
    let e2 = next_event(&mut w).await;
    assert_eq!((e2.kind, e2.kv.key.clone(), e2.kv.mod_revision), (EventKind::Put, format!("{p}w/b"), r2));
    let e3 = next_event(&mut w).await;
    assert_eq!((e3.kind, e3.kv.key.clone(), e3.kv.mod_revision), (EventKind::Delete, format!("{p}w/a"), r3));
}

/// list + watch from `revision + 1` sees every later change exactly once,
/// and a watch from a past revision replays what happened since.
pub async fn watch_resumes_from_revision(s: Arc<dyn Store>, p: &str) {
    let r0 = s.put(&format!("{p}r/0"), b"0".to_vec()).await.unwrap();
    let r1 = s.put(&format!("{p}r/1"), b"1".to_vec()).await.unwrap();
    let (_, listed) = s.list(&format!("{p}r/")).await.unwrap();
    let mut from_past = s.watch(&format!("{p}r/"), r0).await.unwrap();
    let mut from_list = s.watch(&format!("{p}r/"), listed + 1).await.unwrap();
    let r2 = s.put(&format!("{p}r/2"), b"2".to_vec()).await.unwrap();
    let got: Vec<_> =
        [next_event(&mut from_past).await, next_event(&mut from_past).await, next_event(&mut from_past).await]
            .iter()
            .map(|e| e.kv.mod_revision)
            .collect();
    assert_eq!(got, [r0, r1, r2]);
    assert_eq!(next_event(&mut from_list).await.kv.mod_revision, r2);
    // Nothing else is pending on the watch that started after the listing.
    let extra = tokio::time::timeout(Duration::from_millis(200), from_list.next()).await;
    assert!(extra.is_err(), "unexpected extra event {extra:?}");
}

pub async fn lease_expiry_deletes_keys(s: Arc<dyn Store>, p: &str) {
    let k = format!("{p}leased");
    let plain = format!("{p}plain");
    let lease = s.lease_grant(Duration::from_secs(1)).await.unwrap();
    let mut w = s.watch(&k, 0).await.unwrap();
    s.txn(vec![], vec![Op::put_with_lease(&k, b"v".to_vec(), lease), Op::put(&plain, b"v".to_vec())]).await.unwrap();
    assert_eq!(s.get(&k).await.unwrap().unwrap().lease, Some(lease));
    assert_eq!(next_event(&mut w).await.kind, EventKind::Put);
    // Keep it alive past its TTL once.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.lease_keep_alive(lease).await.unwrap();
    }
    assert!(s.get(&k).await.unwrap().is_some(), "kept-alive lease must keep its keys");
    // Then let it lapse: the key goes, with a delete event, the plain key stays.
    let ev = tokio::time::timeout(Duration::from_secs(10), w.next()).await.expect("expiry within 10 s");
    let ev = ev.unwrap().unwrap();
    assert_eq!((ev.kind, ev.kv.key.as_str()), (EventKind::Delete, k.as_str()));
    assert_eq!(s.get(&k).await.unwrap(), None);
    assert!(s.get(&plain).await.unwrap().is_some());
    let e = s.lease_keep_alive(lease).await.unwrap_err();
    assert!(matches!(e, StoreError::LeaseNotFound(_)), "got {e:?}");
    let e = s.txn(vec![], vec![Op::put_with_lease(&k, b"v".to_vec(), lease)]).await.unwrap_err();
    assert!(matches!(e, StoreError::LeaseNotFound(_)), "got {e:?}");
}

pub async fn lease_revoke_deletes_keys(s: Arc<dyn Store>, p: &str) {
    let lease = s.lease_grant(Duration::from_secs(60)).await.unwrap();
    let (left, granted) = s.lease_time_to_live(lease).await.unwrap().expect("a fresh lease is alive");
    assert_eq!(granted, Duration::from_secs(60));
    assert!(left > Duration::from_secs(55) && left <= granted, "{left:?} left of {granted:?}");
    for i in 0..3 {
        s.txn(vec![], vec![Op::put_with_lease(format!("{p}l/{i}"), b"v".to_vec(), lease)]).await.unwrap();
    }
    // Re-putting a key without the lease detaches it.
    s.put(&format!("{p}l/2"), b"v".to_vec()).await.unwrap();
    s.lease_revoke(lease).await.unwrap();
    assert_eq!(s.lease_time_to_live(lease).await.unwrap(), None);
    let (left, _) = s.list(&format!("{p}l/")).await.unwrap();
    let keys: Vec<_> = left.iter().map(|kv| kv.key.strip_prefix(p).unwrap()).collect();
    assert_eq!(keys, ["l/2"]);
}

/// Generates one `#[tokio::test]` per conformance check for a backend.
/// `$make` is an async expression producing `(guard, Arc<dyn Store>)`: the
/// guard (an external server, a temporary directory, or `()`) lives as long
/// as the test.
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:expr) => {
        $crate::store_conformance_tests!(
            $make;
            put_get_delete,
            list_prefix,
            txn_compare_and_swap,
            txn_rejects_duplicate_keys,
            concurrent_cas_loses_nothing,
            watch_prefix_in_order,
            watch_resumes_from_revision,
            lease_expiry_deletes_keys,
            lease_revoke_deletes_keys
        );
    };
    ($make:expr; $($check:ident),+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let (_guard, store): (_, ::std::sync::Arc<dyn $crate::Store>) = $make.await;
                let prefix = format!("/conformance/{}/{}/", stringify!($check), ::std::process::id());
                $crate::conformance::$check(store, &prefix).await;
            }
        )+
    };
}
