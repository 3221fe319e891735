//! Faults: the agent killed at random points of attach/detach bursts.

use std::collections::BTreeSet;
use std::process::Command;
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

/// Wait for `repaired`, returning how long it took.
fn time_to(what: &str, repaired: impl FnMut() -> bool) -> Duration {
    let t0 = std::time::Instant::now();
    assert!(wait_for(Duration::from_secs(10), repaired), "{what} was not repaired within 10 s");
    let took = t0.elapsed();
    eprintln!("time to repair {what}: {took:?}");
    took
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn hand_tampering_is_repaired() {
    require_root();
    let lab = trellis_integration::Lab::with_args(2, 3000, &["--ebpf"]).unwrap();
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    h1.ctl(&["network", "create", "app", "--subnet", "10.62.0.0/24", "--attachable"]).unwrap();
    let a = h1.attach("app", "a", &[]).unwrap();
    let b = h2.attach("app", "b", &[]).unwrap();
    let (an, bip) = (trellis_integration::netns_of(&a), trellis_integration::ip_of(&b));
    assert!(wait_for(Duration::from_secs(5), || trellis_integration::ping(&an, &bip, 1)));
    let on_h1 = |program: &str, args: &[&str]| run(&mut in_netns(&h1.ns.path(), program, args)).unwrap_or_default();
    let vxlan = h1
        .ns
        .links()
        .unwrap()
        .into_iter()
        .find(|l| l.starts_with("trx-") && l != "trx-probe")
        .expect("the network's VXLAN device");

    // The VXLAN device.
    h1.ns.ip(&["link", "del", &vxlan]).unwrap();
    time_to("a deleted VXLAN device", || trellis_integration::ping(&an, &bip, 1));

    // One FDB entry towards the other host.
    let bmac = b["mac"].as_str().unwrap().to_string();
    let h2ip = trellis_integration::underlay_ip(2);
    let tunnel_entry =
        || on_h1("bridge", &["fdb", "show", "dev", &vxlan]).lines().any(|l| l.starts_with(&bmac) && l.contains(&h2ip));
    // (A successful delete proves the entry was there; the next full pass
    // may put it back before we look, so its absence is not asserted.)
    run(&mut in_netns(&h1.ns.path(), "bridge", &["fdb", "del", &bmac, "dev", &vxlan, "dst", &h2ip])).unwrap();
    time_to("a deleted FDB entry", tunnel_entry);
    assert!(trellis_integration::ping(&an, &bip, 1));

    // The endpoint's entry in the eBPF program's map (pinned by trellisd).
    let host_if = a["host_ifname"].as_str().unwrap();
    let link: serde_json::Value = serde_json::from_str(&h1.ns.ip(&["-j", "link", "show", host_if]).unwrap()).unwrap();
    let ifindex = link[0]["ifindex"].as_u64().unwrap() as u32;
    let key: Vec<String> = ifindex.to_le_bytes().iter().map(|b| b.to_string()).collect();
    let map = h1.run_dir().join("bpf/maps/endpoints").display().to_string();
    let mut args = vec!["map", "delete", "pinned", map.as_str(), "key"];
    args.extend(key.iter().map(String::as_str));
    run(Command::new("bpftool").args(&args)).expect("bpftool map delete");
    let mut lookup = vec!["map", "lookup", "pinned", map.as_str(), "key"];
    lookup.extend(key.iter().map(String::as_str));
    time_to("a deleted eBPF map entry", || run(Command::new("bpftool").args(&lookup)).is_ok());

    // A rule of the agent's nftables table.
    let rules = |h: &Host| {
        run(&mut in_netns(&h.ns.path(), "nft", &["-a", "list", "table", "inet", "trellis"]))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("comment \"trellis:"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let before = rules(h1);
    let (chain_rule, handle) = before
        .iter()
        .find_map(|l| l.rsplit_once("# handle ").map(|(_, h)| (l.clone(), h.trim().to_string())))
        .expect("a rule with a handle");
    let chain = ["prerouting", "forward", "postrouting", "input"]
        .into_iter()
        .find(|c| {
            run(&mut in_netns(&h1.ns.path(), "nft", &["-a", "list", "chain", "inet", "trellis", c]))
                .unwrap_or_default()
                .contains(&chain_rule)
        })
        .unwrap();
    run(&mut in_netns(&h1.ns.path(), "nft", &["delete", "rule", "inet", "trellis", chain, "handle", &handle])).unwrap();
    time_to("a deleted nftables rule", || rules(h1).len() == before.len());
    assert!(trellis_integration::ping(&an, &bip, 1));
}
