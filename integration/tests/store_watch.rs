//! The informer against a real etcd: an agent whose watch broke while the
//! store compacted past its revision lists again and converges.

use std::time::Duration;

use trellis_integration::{Lab, ip_of, netns_of, ping, require_root, wait_for};

/// Compact etcd's history up to its current revision (from the underlay,
/// where the lab's etcd listens).
fn compact(lab: &Lab) -> i64 {
    let endpoint = format!("http://{}:{}", lab.etcd.ip, lab.etcd.client_port);
    trellis_integration::sockets::in_ns(&lab.underlay.path(), move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let mut c = etcd_client::Client::connect([endpoint], None).await.unwrap();
            let rev = c.get("/", None).await.unwrap().header().unwrap().revision();
            c.compact(rev, Some(etcd_client::CompactionOptions::new().with_physical())).await.unwrap();
            rev
        })
    })
    .unwrap()
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn an_agent_whose_watch_was_compacted_away_lists_again_and_converges() {
    require_root();
    let mut lab = Lab::new(2, 3000).unwrap();
    lab.hosts[0].ctl(&["network", "create", "cw", "--subnet", "10.61.0.0/24", "--attachable"]).unwrap();
    let b = lab.hosts[1].attach("cw", "b", &[]).unwrap();
    let a1 = lab.hosts[0].attach("cw", "a1", &[]).unwrap();
    assert!(wait_for(Duration::from_secs(10), || ping(&netns_of(&a1), &ip_of(&b), 1)), "a1 -> b before");
    // Host 2's agent stops reading (SIGSTOP) and its connection to etcd
    // dies with an etcd restart; then a new endpoint comes on host 1 and
    // etcd compacts its history past it: host 2 never saw that event, and
    // the revision it would resume from is gone.
    let pid = lab.hosts[1].agent_pid().unwrap().to_string();
    let signal = |sig: &str| assert!(std::process::Command::new("kill").args([sig, &pid]).status().unwrap().success());
    signal("-STOP");
    lab.etcd.restart().unwrap();
    let a2 = lab.hosts[0].attach("cw", "a2", &[]).unwrap();
    // One write more, so that the compaction (up to the current revision,
    // which it keeps) removes a2's.
    lab.hosts[0].attach("cw", "a2b", &[]).unwrap();
    let compacted = compact(&lab);
    eprintln!("compacted at {compacted}");
    signal("-CONT");
    // Host 2 lists again and programs the endpoint it missed.
    assert!(
        wait_for(Duration::from_secs(30), || ping(&netns_of(&a2), &ip_of(&b), 1)),
        "a2 -> b never worked after the relist; host 2's log:\n{}",
        lab.hosts[1].log()
    );
    let log = lab.hosts[1].log();
    assert!(log.contains("listing again"), "no relist in host 2's log:\n{log}");
    eprintln!("compacted at revision {compacted}; host 2 listed again and converged");
    // And it keeps following: an endpoint added after that arrives by the watch.
    let a3 = lab.hosts[0].attach("cw", "a3", &[]).unwrap();
    assert!(wait_for(Duration::from_secs(10), || ping(&netns_of(&a3), &ip_of(&b), 1)), "a3 -> b");
}
