//! Limits said plainly: a Linux bridge takes 1,023 ports (numbers 1 to
//! BR_MAX_PORTS - 1).

use std::time::Duration;

use trellis_integration::{Host, ip_of, netns_of, ping, require_root, wait_for};

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn a_thousand_endpoints_work_and_the_bridge_port_limit_is_explicit() {
    require_root();
    // The neighbour table and the receive backlog are one for the whole
    // kernel and too small for a thousand endpoints: trellisd raises them
    // when it runs in the initial namespace, as on a real host; here it runs
    // in a namespace of its own, so the test does what it would (never
    // lowering a limit).
    for (path, want) in trellis_agent::daemon::HOST_LIMITS {
        let now: u64 = std::fs::read_to_string(path).unwrap().trim().parse().unwrap();
        if now < want {
            std::fs::write(path, want.to_string()).unwrap();
        }
    }
    let h = Host::new().unwrap();
    h.ctl(&["network", "create", "big", "--subnet", "10.60.0.0/20", "--attachable"]).unwrap();
    let mut eps = Vec::with_capacity(1023);
    // No uplink, so no VXLAN port: endpoints may take all 1,023 ports.
    for i in 0..1023 {
        let e = h.attach("big", &format!("e{i}"), &[]);
        eps.push(e.unwrap_or_else(|err| panic!("endpoint {i} of 1023: {err}")));
    }
    for (a, b) in [(0, 999), (1022, 1), (1, 2), (500, 1021)] {
        assert!(
            wait_for(Duration::from_secs(5), || ping(&netns_of(&eps[a]), &ip_of(&eps[b]), 1)),
            "endpoint {a} cannot reach endpoint {b}: {}",
            trellis_integration::run(&mut trellis_integration::in_netns(&netns_of(&eps[a]), "ip", &["neigh"]))
                .unwrap_or_default()
        );
    }
    // The 1,024th: refused, saying why, and nothing left behind.
    let err = h.ctl_err(&["attach", "big", "--name", "one-too-many"]);
    assert!(err.contains("1023 ports") && err.contains("Linux bridge"), "{err}");
    assert!(err.contains("nothing was left behind"), "{err}");
    let listed = h.ctl_json(&["endpoint", "ls"]).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1023);
    assert_eq!(h.ctl_json(&["network", "inspect", "big"]).unwrap()["endpoints"], 1023);
    assert!(
        wait_for(Duration::from_secs(10), || h.ns.links().unwrap().iter().filter(|l| l.starts_with("trv-")).count()
            == 1023),
        "a veth of the refused endpoint is left"
    );
    // Detaching one frees a port: the next attach works.
    h.ctl(&["detach", "e5"]).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || h.ctl_output(&["attach", "big", "--name", "after"]).status.success()),
        "a freed port is not reused"
    );
}
