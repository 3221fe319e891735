//! The store conformance suite against a real etcd (Debian `etcd-server`),
//! started here on loopback with random ports and a temporary data dir.
//! Needs no root; fails (never passes vacuously) when etcd is missing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_integration::Etcd;
use trellis_store::{EtcdConfig, EtcdStore, Store, StoreError};

async fn etcd_store() -> (Etcd, Arc<dyn Store>) {
    let etcd = Etcd::start().expect("starting etcd");
    let cfg = EtcdConfig::parse(&etcd.url()).unwrap();
    let store = EtcdStore::connect(&cfg).await.expect("connecting to etcd");
    (etcd, Arc::new(store))
}

mod conformance {
    use super::*;
    trellis_store::store_conformance_tests!(etcd_store());
}

/// An unreachable etcd is a clear, quick error on the call, never a hang.
#[tokio::test]
async fn unreachable_etcd_fails_fast_and_clearly() {
    let port = trellis_integration::free_port();
    let mut cfg = EtcdConfig::parse(&format!("etcd://127.0.0.1:{port}")).unwrap();
    cfg.timeout = Duration::from_secs(2);
    let t0 = Instant::now();
    let result = match EtcdStore::connect(&cfg).await {
        Ok(store) => store.get("/x").await.map(|_| ()),
        Err(e) => Err(e),
    };
    let e = result.expect_err("nothing listens there");
    assert!(t0.elapsed() < Duration::from_secs(8), "took {:?}", t0.elapsed());
    assert!(matches!(e, StoreError::Unavailable { .. }), "{e:?}");
    assert!(e.is_transient());
    assert!(e.to_string().contains(&port.to_string()), "the message names the endpoint: {e}");
}

/// A stopped etcd fails calls quickly, and the same client works again
/// once etcd is back (no reconnect by hand).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_survives_an_etcd_restart() {
    let (mut etcd, store) = etcd_store().await;
    store.put("/r/a", b"1".to_vec()).await.unwrap();
    etcd.stop();
    let t0 = Instant::now();
    let e = store.get("/r/a").await.expect_err("etcd is down");
    assert!(e.is_transient(), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(12));
    etcd.restart().unwrap();
    let mut back = None;
    for _ in 0..100 {
        if let Ok(v) = store.get("/r/a").await {
            back = v;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(back.expect("the value after the restart").value, b"1");
}

/// TLS with client certificates: with the right certificate the store
/// works; without one etcd refuses and the error says the store is
/// unavailable rather than hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_certificates() {
    let etcd = Etcd::start_tls().expect("starting etcd with TLS");
    let certs = etcd.tls.clone().unwrap();
    let mut cfg = EtcdConfig::parse(&etcd.url()).unwrap();
    cfg.tls = Some(trellis_store::EtcdTls {
        ca: Some(certs.join("ca.pem")),
        cert: Some(certs.join("client.pem")),
        key: Some(certs.join("client-key.pem")),
    });
    let store = EtcdStore::connect(&cfg).await.expect("connecting with TLS");
    store.put("/tls/a", b"1".to_vec()).await.unwrap();
    assert_eq!(store.get("/tls/a").await.unwrap().unwrap().value, b"1");

    let mut anon = cfg.clone();
    anon.timeout = Duration::from_secs(2);
    anon.tls = Some(trellis_store::EtcdTls { ca: Some(certs.join("ca.pem")), cert: None, key: None });
    let result = match EtcdStore::connect(&anon).await {
        Ok(s) => s.get("/tls/a").await.map(|_| ()),
        Err(e) => Err(e),
    };
    let e = result.expect_err("etcd demands a client certificate");
    assert!(matches!(e, StoreError::Unavailable { .. }), "{e:?}");
}

/// A listing larger than one gRPC response may be (4 MiB by default: a
/// cluster of 300 hosts × 50 endpoints is past it) comes in whole, at one
/// revision, a change made meanwhile not in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_larger_than_one_response_comes_in_whole_at_one_revision() {
    let (_etcd, store) = etcd_store().await;
    let value = vec![b'x'; 2048];
    use futures::StreamExt;
    let written: Vec<_> = futures::stream::iter(0..3000)
        .map(|i| {
            let (store, value) = (store.clone(), value.clone());
            async move { store.put(&format!("/big/k{i:05}"), value).await }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(written.iter().all(Result::is_ok));
    store.put("/bigger", b"outside the prefix".to_vec()).await.unwrap();
    let (items, revision) = store.list("/big/").await.expect("6 MiB listed");
    assert_eq!(items.len(), 3000);
    assert!(items.windows(2).all(|w| w[0].key < w[1].key), "in key order");
    assert!(items.iter().all(|kv| kv.key.starts_with("/big/") && kv.value.len() == 2048));
    assert!(items.iter().all(|kv| kv.mod_revision <= revision));
}
