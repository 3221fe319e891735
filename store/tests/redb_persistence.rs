//! What the embedded store keeps across a restart of the process.

use std::time::Duration;

use trellis_store::{LocalStore, Op, Store};

#[tokio::test]
async fn data_revision_and_leases_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let (rev, lease) = {
        let s = LocalStore::open_redb(&path).unwrap();
        s.put("/a", b"1".to_vec()).await.unwrap();
        s.put("/b", b"2".to_vec()).await.unwrap();
        s.delete("/b").await.unwrap();
        let lease = s.lease_grant(Duration::from_secs(1)).await.unwrap();
        let out = s.txn(vec![], vec![Op::put_with_lease("/l", b"x".to_vec(), lease)]).await.unwrap();
        (out.revision, lease)
    };
    // Give the writer thread of the dropped store time to let go of the file.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = LocalStore::open_redb(&path).unwrap();
    assert_eq!(s.get("/a").await.unwrap().unwrap().value, b"1");
    assert_eq!(s.get("/b").await.unwrap(), None);
    assert_eq!(s.revision(), rev, "revision continues where it stopped");
    let kv = s.get("/l").await.unwrap().unwrap();
    assert_eq!(kv.lease, Some(lease));
    // A new lease never reuses an old id.
    let next = s.lease_grant(Duration::from_secs(5)).await.unwrap();
    assert!(next > lease);
    // The old lease still expires (its TTL restarted at open) and takes its key.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(s.get("/l").await.unwrap(), None);
    assert!(s.put("/c", b"3".to_vec()).await.unwrap() > rev);
}

#[tokio::test]
async fn corrupt_path_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-a-db");
    std::fs::write(&path, b"this is not a redb file at all, just text").unwrap();
    let e = LocalStore::open_redb(&path).err().expect("opening garbage must fail");
    let msg = e.to_string();
    assert!(msg.contains("redb") && msg.contains("not-a-db"), "message names backend and file: {msg}");
}
