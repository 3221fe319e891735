//! The store conformance suite, run against the memory and redb backends.

mod memory {
    use std::sync::Arc;
    trellis_store::store_conformance_tests!(async { Arc::new(trellis_store::LocalStore::memory()) });
}

mod redb {
    use std::sync::Arc;
    trellis_store::store_conformance_tests!(async {
        // The directory must outlive the store: leak it for the test's life.
        let dir = tempfile::tempdir().unwrap().keep();
        Arc::new(trellis_store::LocalStore::open_redb(&dir.join("store.redb")).unwrap())
    });
}
