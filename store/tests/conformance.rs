//! The store conformance suite, run against the memory and redb backends.

mod memory {
    use std::sync::Arc;
    use trellis_store::Store;
    trellis_store::store_conformance_tests!(async {
        let store: Arc<dyn Store> = Arc::new(trellis_store::LocalStore::memory());
        ((), store)
    });
}

mod redb {
    use std::sync::Arc;
    use trellis_store::Store;
    trellis_store::store_conformance_tests!(async {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(trellis_store::LocalStore::open_redb(&dir.path().join("store.redb")).unwrap());
        (dir, store)
    });
}
