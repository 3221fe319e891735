//! Faults: the agent killed at random points of attach/detach bursts.

use std::collections::BTreeSet;
use std::time::Duration;

use rand::Rng;
use trellis_integration::{Host, in_netns, require_root, run, wait_for};

fn scrape(h: &Host, series: &str) -> Option<f64> {
    let text = run(&mut in_netns(&h.ns.path(), "curl", &["-sf", "http://127.0.0.1:9473/metrics"])).ok()?;
    text.lines().find(|l| l.starts_with(series))?.rsplit(' ').next()?.parse().ok()
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn kill_9_during_attach_and_detach_bursts_leaks_nothing() {
    require_root();
    let mut h = Host::new().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.61.0.0/22", "--attachable"]).unwrap();
    let mut rng = rand::rng();
    let socket = h.socket();
    for round in 0..100 {
        // A burst: attaches and detaches, running while the agent dies.
        let s = socket.clone();
        let burst = std::thread::spawn(move || {
            for k in 0..4 {
                let name = format!("r{round}k{k}");
                let _ = std::process::Command::new(trellis_integration::bin("trellisctl"))
                    .arg("--socket")
                    .arg(&s)
                    .args(["attach", "app", "--name", &name])
                    .output();
                if k % 2 == 1 {
                    let _ = std::process::Command::new(trellis_integration::bin("trellisctl"))
                        .arg("--socket")
                        .arg(&s)
                        .args(["detach", &name])
                        .output();
                }
            }
        });
        std::thread::sleep(Duration::from_micros(rng.random_range(0..40_000)));
        h.kill9();
        burst.join().unwrap();
        h.start().unwrap();
    }
    // Converged: the kernel, the records and IPAM agree.
    let consistent = || {
        let eps = h.ctl_json(&["endpoint", "ls"]).unwrap();
        let eps = eps.as_array().unwrap().clone();
        let want: BTreeSet<String> = eps.iter().map(|e| e["host_ifname"].as_str().unwrap().to_string()).collect();
        let have: BTreeSet<String> = h.ns.links().unwrap().into_iter().filter(|l| l.starts_with("trv-")).collect();
        let ips: BTreeSet<String> = eps.iter().map(|e| e["address"].as_str().unwrap().to_string()).collect();
        let taken = scrape(&h, "trellis_ipam_addresses_allocated{network=\"app\"}");
        let netns: BTreeSet<String> = std::fs::read_dir(h.run_dir().join("netns"))
            .map(|d| d.flatten().map(|e| e.path().display().to_string()).collect())
            .unwrap_or_default();
        let managed: BTreeSet<String> = eps.iter().map(|e| e["netns"].as_str().unwrap().to_string()).collect();
        (want == have && ips.len() == eps.len() && taken == Some(eps.len() as f64 + 1.0) && netns == managed, eps.len())
    };
    let ok = wait_for(Duration::from_secs(15), || consistent().0);
    let eps = h.ctl_json(&["endpoint", "ls"]).unwrap();
    let links: Vec<String> = h.ns.links().unwrap().into_iter().filter(|l| l.starts_with("trv-")).collect();
    assert!(
        ok,
        "after 100 kills: {} endpoints, {} veths, IPAM {:?}, netns {:?}\n{eps}",
        consistent().1,
        links.len(),
        scrape(&h, "trellis_ipam_addresses_allocated{network=\"app\"}"),
        std::fs::read_dir(h.run_dir().join("netns")).map(|d| d.count()).unwrap_or(0)
    );
    assert!(consistent().1 > 0, "no attach ever completed: the test did not test anything");
}
