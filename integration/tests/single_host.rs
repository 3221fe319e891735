//! One host, real kernel objects: each test runs its own `trellisd` inside a
//! network namespace it made (never the root namespace).
//!
//! Root tests are `#[ignore]`d so that without root they show as ignored;
//! the suite runs them as root with `--run-ignored all` (see .ci/run).

use std::process::Command;
use std::time::Duration;

use trellis_integration::{Host, Netns, Uplink, in_netns, ip_of, netns_of, ping, require_root, wait_for};

fn links_with_prefix(h: &Host, prefix: &str) -> Vec<String> {
    h.ns.links().unwrap().into_iter().filter(|l| l.starts_with(prefix)).collect()
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn network_lifecycle_bridge_gateway_and_rm() {
    require_root();
    let h = Host::new().unwrap();
    let net = h
        .ctl_json(&["network", "create", "app", "--subnet", "10.30.0.0/24", "--attachable", "--label", "team=a"])
        .unwrap();
    let bridge = net["bridge"].as_str().unwrap().to_string();
    assert_eq!(net["gateway"], "10.30.0.1");
    assert_eq!(net["mtu"], 1450, "no uplink: 1500 - 50");
    // The bridge exists, is up, and holds the gateway address.
    let addr = h.ns.ip(&["-br", "addr", "show", "dev", &bridge]).unwrap();
    assert!(addr.contains("10.30.0.1/24"), "{addr}");
    let detail = h.ns.ip(&["-d", "link", "show", &bridge]).unwrap();
    assert!(detail.contains("bridge") && detail.contains("mtu 1450") && detail.contains(",UP"), "{detail}");

    let inspected = h.ctl(&["network", "inspect", "app"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(v["subnet"], "10.30.0.0/24");
    assert_eq!(v["labels"]["team"], "a");
    assert_eq!(v["attachable"], true);
    let ls = h.ctl_json(&["network", "ls"]).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 1);

    // rm is refused while an endpoint exists, and then --force takes both.
    let ep = h.attach("app", "a", &[]).unwrap();
    let err = h.ctl_err(&["network", "rm", "app"]);
    assert!(err.contains("endpoint") && err.contains("--force"), "{err}");
    assert!(h.ns.links().unwrap().contains(&bridge), "a refused rm leaves the bridge");
    h.ctl(&["network", "rm", "app", "--force"]).unwrap();
    assert!(!h.ns.links().unwrap().contains(&bridge));
    assert!(links_with_prefix(&h, "trv-").is_empty(), "the endpoint's veth went too");
    assert!(!netns_of(&ep).exists(), "the managed netns was removed");
    assert!(h.ctl_json(&["network", "ls"]).unwrap().as_array().unwrap().is_empty());
    let err = h.ctl_err(&["network", "inspect", "app"]);
    assert!(err.contains("not found"), "{err}");
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn default_pool_skips_host_routes() {
    require_root();
    let h = Host::new().unwrap();
    // The host already routes 10.0.0.0/23 somewhere: the pool must skip it.
    h.ns.ip(&["link", "add", "lab-route", "type", "bridge"]).unwrap();
    h.ns.ip(&["link", "set", "lab-route", "up"]).unwrap();
    h.ns.ip(&["addr", "add", "10.0.0.1/23", "dev", "lab-route"]).unwrap();
    let a = h.ctl_json(&["network", "create", "one"]).unwrap();
    let b = h.ctl_json(&["network", "create", "two"]).unwrap();
    assert_eq!(a["subnet"], "10.0.2.0/24");
    assert_eq!(b["subnet"], "10.0.3.0/24");
    assert_ne!(a["vni"].as_u64().expect("vni"), b["vni"].as_u64().expect("vni"));
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn two_endpoints_talk_with_ip_mac_route_and_mtu() {
    require_root();
    let h = Host::new().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.31.0.0/24", "--attachable", "--mtu", "1400"]).unwrap();
    let a = h.attach("app", "a", &["--label", "role=web"]).unwrap();
    // A namespace the test made itself, attached with --netns.
    let own = Netns::new("trc").unwrap();
    let own_path = own.path();
    let b = h.attach("app", "b", &["--netns", own_path.to_str().unwrap(), "--ip", "10.31.0.77"]).unwrap();
    assert_eq!(ip_of(&b), "10.31.0.77");
    assert_eq!(a["labels"]["role"], "web");

    let inside = in_netns(&netns_of(&a), "ip", &["-d", "addr", "show", "eth0"]).output().unwrap();
    let inside = String::from_utf8_lossy(&inside.stdout);
    assert!(inside.contains(&format!("inet {}", a["address"].as_str().unwrap())), "{inside}");
    assert!(inside.contains(a["mac"].as_str().unwrap()), "{inside}");
    assert!(inside.contains("mtu 1400"), "{inside}");
    let routes =
        String::from_utf8_lossy(&in_netns(&netns_of(&a), "ip", &["route"]).output().unwrap().stdout).into_owned();
    assert!(routes.contains("default via 10.31.0.1 dev eth0"), "{routes}");

    assert!(ping(&netns_of(&a), &ip_of(&b), 3), "a cannot reach b");
    assert!(ping(&own_path, &ip_of(&a), 3), "b cannot reach a");
    assert!(ping(&own_path, "10.31.0.1", 1), "b cannot reach its gateway");

    let eps = h.ctl_json(&["endpoint", "ls", "--network", "app"]).unwrap();
    assert_eq!(eps.as_array().unwrap().len(), 2);
    h.ctl(&["detach", "b"]).unwrap();
    // Detach returns at once; the devices go in the pass it triggers.
    assert!(wait_for(Duration::from_secs(5), || links_with_prefix(&h, "trv-").len() == 1), "b's veth is not gone");
    assert!(wait_for(Duration::from_secs(5), || !own.links().unwrap().contains(&"eth0".to_string())));
    // The name is free at once; the address once the devices are gone and
    // the record is dropped.
    assert!(
        wait_for(Duration::from_secs(5), || h
            .ctl_output(&["attach", "app", "--name", "b", "--ip", "10.31.0.77"])
            .status
            .success()),
        "the detached endpoint's address never came free"
    );
    assert!(own_path.exists(), "a netns the agent did not create is never removed");
    // The reused address comes with the same MAC (derived from it): a's
    // neighbour entry for it is still right, the new holder answers at once.
    assert!(ping(&netns_of(&a), "10.31.0.77", 1), "a stale neighbour entry black-holes the reused address");
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn only_attachable_networks_take_adhoc_endpoints() {
    require_root();
    let h = Host::new().unwrap();
    h.ctl(&["network", "create", "closed", "--subnet", "10.32.0.0/24"]).unwrap();
    let err = h.ctl_err(&["attach", "closed", "--name", "x"]);
    assert!(err.contains("not attachable") && err.contains("--attachable"), "{err}");
    assert!(links_with_prefix(&h, "trv-").is_empty());
    assert!(h.ctl_json(&["endpoint", "ls"]).unwrap().as_array().unwrap().is_empty());
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn debug_shell_runs_inside_the_network_and_leaves_nothing() {
    require_root();
    let h = Host::new().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.33.0.0/24", "--attachable"]).unwrap();
    let peer = h.attach("app", "peer", &[]).unwrap();
    let out = Command::new(trellis_integration::bin("trellisctl"))
        .arg("--socket")
        .arg(h.socket())
        .args(["attach", "app", "--name", "shell", "--", "sh", "-c"])
        .arg(format!(
            "ip -br addr show eth0 && ping -c1 -W1 {} >/dev/null && grep '^nameserver 10.33.0.1$' /etc/resolv.conf \
             && dig +short +time=1 peer && exit 7",
            ip_of(&peer)
        ))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "the command's exit code comes back; stdout {stdout} stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("10.33.0."), "{stdout}");
    assert!(stdout.contains(&ip_of(&peer)), "the shell resolves the network's names: {stdout}");
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    assert!(!host_resolv.contains("10.33.0.1"), "the host's resolv.conf is untouched");
    let eps = h.ctl_json(&["endpoint", "ls"]).unwrap();
    let names: Vec<_> = eps.as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["peer"], "the shell's endpoint is detached when it exits");
    assert!(wait_for(Duration::from_secs(5), || links_with_prefix(&h, "trv-").len() == 1));
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn egress_masquerades_and_internal_is_cut_off() {
    require_root();
    let h = Host::new().unwrap();
    let up = Uplink::new(&h.ns, 7).unwrap();
    h.ctl(&["network", "create", "open", "--subnet", "10.34.0.0/24", "--attachable"]).unwrap();
    h.ctl(&["network", "create", "closed", "--subnet", "10.35.0.0/24", "--attachable", "--internal"]).unwrap();
    let o = h.attach("open", "o", &[]).unwrap();
    let i = h.attach("closed", "i", &[]).unwrap();
    let i2 = h.attach("closed", "i2", &[]).unwrap();
    // The outside has no route to 10.34.0.0/24: a reply proves masquerade.
    assert!(ping(&netns_of(&o), &up.outside_ip, 3), "open network cannot reach the outside");
    // Internal: nothing outside the network, not even the host's other address.
    assert!(!ping(&netns_of(&i), &up.outside_ip, 2), "internal network reached the outside");
    assert!(!ping(&netns_of(&i), &up.host_ip, 1), "internal network reached the host's uplink address");
    assert!(!ping(&netns_of(&i), &ip_of(&o), 1), "internal network reached another network");
    assert!(!ping(&netns_of(&o), &ip_of(&i), 1), "another network reached the internal one");
    let routes =
        String::from_utf8_lossy(&in_netns(&netns_of(&i), "ip", &["route"]).output().unwrap().stdout).into_owned();
    assert!(!routes.contains("default"), "internal endpoints get no default route: {routes}");
    // Inside the internal network all is well.
    assert!(ping(&netns_of(&i), &ip_of(&i2), 2));
    assert!(ping(&netns_of(&i), "10.35.0.1", 1), "the gateway (DNS address) stays reachable");
}

/// How long a repair may take: the periodic full pass (every 2 s) reads
/// the kernel back, and on a machine running the whole suite in parallel
/// a pass of a debug build can take seconds.
const REPAIR: Duration = Duration::from_secs(15);

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn hand_deleted_objects_are_repaired() {
    require_root();
    let h = Host::new().unwrap();
    let net = h.ctl_json(&["network", "create", "app", "--subnet", "10.36.0.0/24", "--attachable"]).unwrap();
    let bridge = net["bridge"].as_str().unwrap().to_string();
    let a = h.attach("app", "a", &[]).unwrap();
    let b = h.attach("app", "b", &[]).unwrap();
    let veth_a = a["host_ifname"].as_str().unwrap().to_string();
    assert!(ping(&netns_of(&a), &ip_of(&b), 1));

    // A veth: both ends vanish; the agent re-plugs the endpoint.
    h.ns.ip(&["link", "del", &veth_a]).unwrap();
    assert!(wait_for(REPAIR, || h.ns.links().unwrap().contains(&veth_a)), "veth not repaired");
    assert!(wait_for(REPAIR, || ping(&netns_of(&a), &ip_of(&b), 1)), "traffic after veth repair");

    // The bridge: recreated, address back, ports re-attached.
    h.ns.ip(&["link", "del", &bridge]).unwrap();
    assert!(
        wait_for(REPAIR, || h
            .ns
            .ip(&["-br", "addr", "show", "dev", &bridge])
            .is_ok_and(|o| o.contains("10.36.0.1/24"))),
        "bridge not repaired"
    );
    assert!(wait_for(REPAIR, || ping(&netns_of(&a), &ip_of(&b), 1)), "traffic after bridge repair");

    // The gateway address.
    h.ns.ip(&["addr", "del", "10.36.0.1/24", "dev", &bridge]).unwrap();
    assert!(
        wait_for(REPAIR, || h
            .ns
            .ip(&["-br", "addr", "show", "dev", &bridge])
            .is_ok_and(|o| o.contains("10.36.0.1/24"))),
        "address not repaired"
    );

    // The nftables table.
    let nft = |args: &[&str]| h.ns.cmd("nft").args(args).output().unwrap();
    assert!(nft(&["list", "table", "inet", "trellis"]).status.success());
    assert!(nft(&["delete", "table", "inet", "trellis"]).status.success());
    assert!(
        wait_for(REPAIR, || {
            let o = nft(&["list", "table", "inet", "trellis"]);
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("masquerade")
        }),
        "nftables table not repaired"
    );
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn kill9_under_traffic_loses_nothing_and_duplicates_nothing() {
    require_root();
    let mut h = Host::new().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.37.0.0/24", "--attachable"]).unwrap();
    let a = h.attach("app", "a", &[]).unwrap();
    let b = h.attach("app", "b", &[]).unwrap();
    let links_before = h.ns.links().unwrap();
    let pinger = in_netns(&netns_of(&a), "ping", &["-q", "-c", "150", "-i", "0.02", "-W", "1", &ip_of(&b)])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    h.kill9();
    std::thread::sleep(Duration::from_millis(300));
    h.start().unwrap();
    let out = pinger.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("150 received") && summary.contains(" 0% packet loss"), "{summary}");
    // The restarted agent adopted everything: same links, no duplicates.
    let mut before = links_before.clone();
    let mut after = h.ns.links().unwrap();
    before.sort();
    after.sort();
    assert_eq!(before, after);
    let status = h.ctl_json(&["status"]).unwrap();
    assert_eq!(status["local_endpoints"], 2);
    assert_eq!(status["healthy"], true, "{status}");
    assert_eq!(h.ctl_json(&["endpoint", "ls"]).unwrap().as_array().unwrap().len(), 2);
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn sigterm_leaves_the_datapath_running() {
    require_root();
    let mut h = Host::new().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.38.0.0/24", "--attachable"]).unwrap();
    let a = h.attach("app", "a", &[]).unwrap();
    let b = h.attach("app", "b", &[]).unwrap();
    let status = h.terminate().expect("agent was running");
    assert!(status.success(), "SIGTERM is a clean exit: {status}");
    assert!(!h.socket().exists(), "the socket is removed on exit");
    assert!(ping(&netns_of(&a), &ip_of(&b), 2), "traffic continues without the agent");
    assert_eq!(links_with_prefix(&h, "trv-").len(), 2);
    // Back up, with the same state.
    h.start().unwrap();
    assert_eq!(h.ctl_json(&["endpoint", "ls"]).unwrap().as_array().unwrap().len(), 2);
    assert!(ping(&netns_of(&a), &ip_of(&b), 1));
}

/// Every kind of bad input: a clear message, a non-zero exit, and nothing
/// half-created (no device, no address, no record, no namespace).
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn bad_input_is_refused_cleanly() {
    require_root();
    let h = Host::new().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.39.0.0/24", "--attachable"]).unwrap();
    h.ctl(&["network", "create", "tiny", "--subnet", "10.40.0.0/30", "--attachable"]).unwrap();
    let links = h.ns.links().unwrap();
    let netns_dir = h.run_dir().join("netns");
    let managed = || std::fs::read_dir(&netns_dir).map(|d| d.count()).unwrap_or(0);

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["network", "create", "x", "--subnet", "10.41.0.0"], "CIDR"),
        (vec!["network", "create", "x", "--subnet", "10.41.0.7/24"], "did you mean 10.41.0.0/24"),
        (vec!["network", "create", "x", "--subnet", "10.39.0.128/25"], "overlaps 10.39.0.0/24"),
        (vec!["network", "create", "app", "--subnet", "10.42.0.0/24"], "already exists"),
        (vec!["network", "create", "bad name"], "network name"),
        (vec!["network", "create", "x", "--subnet", "10.43.0.0/24", "--gateway", "10.44.0.1"], "not inside"),
        (vec!["network", "create", "x", "--subnet", "10.43.0.0/24", "--mtu", "100"], "mtu"),
        (vec!["network", "rm", "nope"], "not found"),
        (vec!["attach", "nope", "--name", "x"], "not found"),
        (vec!["attach", "app", "--name", "x", "--ip", "10.39.0"], "IP address"),
        (vec!["attach", "app", "--name", "x", "--ip", "10.50.0.5"], "not inside subnet"),
        (vec!["attach", "app", "--name", "x", "--ip", "10.39.0.1"], "in use"),
        (vec!["attach", "app", "--name", "x", "--netns", "/nonexistent/netns"], "does not exist"),
        (vec!["attach", "app", "--name", "x", "--label", "novalue"], "key=value"),
        (vec!["detach", "nope"], "not found"),
    ];
    for (args, expect) in &cases {
        let err = h.ctl_err(args);
        assert!(err.contains(expect), "trellisctl {args:?}: expected {expect:?} in {err:?}");
    }
    // Exhaustion: a /30 has one address after the gateway.
    h.attach("tiny", "t1", &[]).unwrap();
    let err = h.ctl_err(&["attach", "tiny", "--name", "t2"]);
    assert!(err.contains("no free address"), "{err}");
    // Duplicate endpoint name.
    h.attach("app", "dup", &[]).unwrap();
    let err = h.ctl_err(&["attach", "app", "--name", "dup"]);
    assert!(err.contains("already exists"), "{err}");

    // Nothing half-created: only the two good endpoints exist.
    let mut now = h.ns.links().unwrap();
    now.retain(|l| !l.starts_with("trv-"));
    let mut before = links.clone();
    before.retain(|l| !l.starts_with("trv-"));
    assert_eq!(now, before, "no stray devices");
    assert_eq!(links_with_prefix(&h, "trv-").len(), 2);
    assert_eq!(managed(), 2, "no stray namespaces");
    assert_eq!(h.ctl_json(&["endpoint", "ls"]).unwrap().as_array().unwrap().len(), 2);
    assert_eq!(h.ctl_json(&["network", "ls"]).unwrap().as_array().unwrap().len(), 2);
    // No address leaked: the next endpoint gets the lowest free one.
    let next = h.attach("app", "next", &[]).unwrap();
    assert_eq!(ip_of(&next), "10.39.0.3", "dup took .2; every failed attempt released its address");

    // A non-root caller is told why.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(trellis_integration::bin("trellisctl"))
        .arg("--socket")
        .arg(h.socket())
        .args(["network", "ls"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("run trellisctl as root") || err.contains("permission denied"), "{err}");
    // An agent that is not running is told apart.
    let out = Command::new(trellis_integration::bin("trellisctl"))
        .args(["--socket", "/nonexistent/trellisd.sock", "status"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("is trellisd running"));
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn endpoints_whose_namespace_died_are_collected() {
    require_root();
    let h = Host::new().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.45.0.0/24", "--attachable"]).unwrap();
    let own = Netns::new("trc").unwrap();
    let path = own.path();
    h.attach("app", "short", &["--netns", path.to_str().unwrap()]).unwrap();
    drop(own); // the "container" dies without a detach
    assert!(
        wait_for(Duration::from_secs(10), || h.ctl_json(&["endpoint", "ls"]).unwrap().as_array().unwrap().is_empty()),
        "the endpoint of a dead namespace was not collected"
    );
    assert!(links_with_prefix(&h, "trv-").is_empty());
    // Its address is free again.
    let again = h.attach("app", "again", &[]).unwrap();
    assert_eq!(ip_of(&again), "10.45.0.2");
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn config_file_sets_defaults_and_agent_needs_root() {
    require_root();
    let mut h = Host::bare().unwrap();
    let cfg = h.dir.path().join("trellisd.toml");
    std::fs::write(&cfg, "default_pool = \"172.29.0.0/16\"\ndefault_prefix_len = 26\n").unwrap();
    h.extra_args = vec!["--config".into(), cfg.display().to_string()];
    h.start().unwrap();
    let n = h.ctl_json(&["network", "create", "fromfile"]).unwrap();
    assert_eq!(n["subnet"], "172.29.0.0/26");
    // The agent refuses to start without root, saying so.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(trellis_integration::bin("trellisd"))
        .args(["--state-dir", "/nonexistent/state", "--run-dir", "/nonexistent/run"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("must run as root"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The agent attaches the eBPF endpoint program to every endpoint veth:
/// a spoofed source address is dropped, and the program (pinned) stays
/// attached through a kill -9 of the agent, which adopts it on restart.
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn endpoints_cannot_spoof_and_the_program_outlives_the_agent() {
    require_root();
    let mut h = Host::bare().unwrap();
    h.extra_args = vec!["--ebpf".into()];
    h.start().unwrap();
    let status = h.ctl_json(&["status"]).unwrap();
    assert_eq!(status["capabilities"]["ebpf"], true, "{status}");
    h.ctl(&["network", "create", "app", "--subnet", "10.46.0.0/24", "--attachable"]).unwrap();
    let a = h.attach("app", "a", &[]).unwrap();
    let b = h.attach("app", "b", &[]).unwrap();
    let pins = h.run_dir().join("bpf/links");
    let pinned = || {
        let mut v: Vec<String> =
            std::fs::read_dir(&pins).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).collect();
        v.sort();
        v
    };
    let mut want = vec![a["host_ifname"].as_str().unwrap().to_string(), b["host_ifname"].as_str().unwrap().to_string()];
    want.sort();
    assert_eq!(pinned(), want);
    in_netns(&netns_of(&a), "ip", &["addr", "add", "10.46.0.99/24", "dev", "eth0"]).status().unwrap();
    let spoof = || {
        in_netns(&netns_of(&a), "ping", &["-c", "1", "-W", "1", "-I", "10.46.0.99", &ip_of(&b)])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(ping(&netns_of(&a), &ip_of(&b), 1), "legitimate traffic passes");
    assert!(!spoof(), "a spoofed source address got through");
    h.kill9();
    assert!(!spoof(), "without the agent, the pinned program still drops spoofed packets");
    assert!(ping(&netns_of(&a), &ip_of(&b), 1));
    h.start().unwrap();
    assert_eq!(pinned(), want, "the restarted agent adopted the pinned links");
    assert!(!spoof());
    // Detached endpoints lose their program.
    h.ctl(&["detach", "b"]).unwrap();
    assert!(wait_for(Duration::from_secs(5), || pinned().len() == 1), "{:?}", pinned());
}

/// A host with an underlay builds a VXLAN device for each network it has
/// endpoints on: the device goes with the network's last local endpoint,
/// and with the network (the probe device stays).
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn a_vxlan_device_goes_with_its_last_local_endpoint_and_with_its_network() {
    require_root();
    let mut h = Host::bare().unwrap();
    // A default route: the host has an underlay address, so it builds tunnels.
    let _up = Uplink::new(&h.ns, 9).unwrap();
    h.start().unwrap();
    let net = h.ctl_json(&["network", "create", "app", "--subnet", "10.90.0.0/24", "--attachable"]).unwrap();
    let id = net["id"].as_str().expect("id in the network's JSON");
    let dev = format!("trx-{}", &id[..10]);
    let has = |name: &str| h.ns.links().unwrap().iter().any(|l| l == name);
    assert!(has("trx-probe"), "the host has an underlay: {:?}", h.ns.links().unwrap());
    assert!(!has(&dev), "no VXLAN device before a local endpoint");

    h.attach("app", "a", &[]).unwrap();
    h.attach("app", "b", &[]).unwrap();
    assert!(has(&dev), "the network's VXLAN device: {:?}", h.ns.links().unwrap());
    h.ctl(&["detach", "a"]).unwrap();
    assert!(wait_for(Duration::from_secs(5), || links_with_prefix(&h, "trv-").len() == 1), "a's veth is not gone");
    assert!(has(&dev), "b is still on the network here");
    h.ctl(&["detach", "b"]).unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || !has(&dev)),
        "the VXLAN device outlived the network's last local endpoint: {:?}",
        h.ns.links().unwrap()
    );
    assert!(has("trx-probe"));

    // The network removed with an endpoint on it: the device goes with it
    // (`network rm` converges before it answers).
    h.attach("app", "c", &[]).unwrap();
    assert!(has(&dev));
    h.ctl(&["network", "rm", "app", "--force"]).unwrap();
    assert!(!has(&dev), "the VXLAN device outlived its network: {:?}", h.ns.links().unwrap());
    assert!(links_with_prefix(&h, "trv-").is_empty() && links_with_prefix(&h, "trb-").is_empty());
    assert_eq!(links_with_prefix(&h, "trx-"), ["trx-probe"]);
}

/// A `--netns` that is no network namespace is refused before anything is
/// made, saying what it is and what to do: a plain file (what a namespace
/// pinned in another mount namespace looks like from the agent's), a
/// directory, a namespace of another kind.
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn a_netns_path_that_is_no_network_namespace_is_refused_up_front() {
    require_root();
    let h = Host::new().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.91.0.0/24", "--attachable"]).unwrap();
    let links = h.ns.links().unwrap();
    let plain = h.dir.path().join("plain");
    std::fs::write(&plain, b"").unwrap();
    let dir = h.dir.path().join("a-dir");
    std::fs::create_dir(&dir).unwrap();
    let mnt = std::path::PathBuf::from("/proc/self/ns/mnt");
    let share = "if trellisd runs in a container, share /run/netns with it (bind mount with rshared propagation";
    let cases =
        [(&plain, "a plain file", share), (&dir, "a directory", "/proc/PID/ns/net"), (&mnt, "a mnt namespace", "")];
    for (path, what, hint) in cases {
        let err = h.ctl_err(&["attach", "app", "--name", "x", "--netns", path.to_str().unwrap()]);
        assert!(err.contains(&format!("{} is not a network namespace ({what})", path.display())), "{err}");
        assert!(err.contains(hint), "{err}");
        assert!(!err.contains("Invalid argument"), "{err}");
    }
    // A namespace pinned in a mount namespace the agent does not see (as
    // when trellisd runs in a container without /run/netns shared): the
    // caller sees a namespace, the agent an empty file.
    let name = trellis_integration::unique("trhid");
    let hidden = std::path::PathBuf::from(format!("/run/netns/{name}"));
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _remove = Remove(hidden.clone());
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "--", "sh", "-c"])
        .arg(format!(
            "ip netns add {name} && exec {} --socket {} attach app --name y --netns {}",
            trellis_integration::bin("trellisctl").display(),
            h.socket().display(),
            hidden.display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("{} is not a network namespace (a plain file)", hidden.display())), "{err}");
    assert!(err.contains(share), "{err}");

    // Nothing half-created: no endpoint, no device, no address kept.
    assert!(h.ctl_json(&["endpoint", "ls"]).unwrap().as_array().unwrap().is_empty());
    assert_eq!(h.ns.links().unwrap(), links, "no stray devices");
    let next = h.attach("app", "next", &[]).unwrap();
    assert_eq!(ip_of(&next), "10.91.0.2", "every refused attach released its address (or never took one)");
}

/// The u32 keys of one of the datapath's pinned hash maps.
fn map_keys(h: &Host, map: &str) -> Vec<u32> {
    let path = h.run_dir().join("bpf/maps").join(map);
    let out = Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut keys: Vec<u32> = v
        .as_array()
        .expect("a list of entries")
        .iter()
        .map(|e| {
            let bytes: Vec<u8> = e["key"]
                .as_array()
                .expect("key bytes")
                .iter()
                .map(|b| u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
                .collect();
            u32::from_le_bytes(bytes[..4].try_into().unwrap())
        })
        .collect();
    keys.sort();
    keys
}

/// The ifindex of a link in the host's namespace.
fn ifindex(h: &Host, link: &str) -> u32 {
    let out = h.ns.ip(&["-o", "link", "show", "dev", link]).unwrap();
    out.split(':').next().unwrap().trim().parse().unwrap()
}

/// What the datapath holds for an endpoint (its entry and counters, keyed
/// by its veth's ifindex, and its attachment marker) goes with the veth:
/// when it is detached, when its container dies without a detach, and when
/// its veth is deleted by hand (the repaired veth gets the program again).
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn an_endpoints_datapath_state_goes_with_its_veth() {
    require_root();
    for mode in ["clsact", "tcx"] {
        let mut h = Host::bare().unwrap();
        h.extra_args = vec!["--ebpf".into(), "--ebpf-attach".into(), mode.into()];
        h.start().unwrap();
        h.ctl(&["network", "create", "app", "--subnet", "10.92.0.0/24", "--attachable"]).unwrap();
        let a = h.attach("app", "a", &[]).unwrap();
        let b = h.attach("app", "b", &[]).unwrap();
        let own = Netns::new("trc").unwrap();
        let c = h.attach("app", "c", &["--netns", own.path().to_str().unwrap()]).unwrap();
        let d = h.attach("app", "d", &[]).unwrap();
        let veth = |e: &serde_json::Value| e["host_ifname"].as_str().expect("host_ifname").to_string();
        let pins = h.run_dir().join("bpf/links");
        let pinned = || {
            let mut v: Vec<String> =
                std::fs::read_dir(&pins).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).collect();
            v.sort();
            v
        };
        for to in [&b, &c, &d] {
            assert!(ping(&netns_of(&a), &ip_of(to), 1), "{mode}: a cannot reach {}", to["name"]);
        }
        let idx = |e: &serde_json::Value| ifindex(&h, &veth(e));
        let sorted = |mut v: Vec<u32>| {
            v.sort();
            v
        };
        let all = sorted(vec![idx(&a), idx(&b), idx(&c), idx(&d)]);
        assert_eq!(map_keys(&h, "endpoints"), all, "{mode}");
        assert_eq!(map_keys(&h, "counters"), all, "{mode}: every endpoint has passed traffic");
        assert_eq!(pinned().len(), 4, "{mode}");

        // Detached.
        let (ia, ib, ic, id) = (idx(&a), idx(&b), idx(&c), idx(&d));
        h.ctl(&["detach", "b"]).unwrap();
        let left = sorted(vec![ia, ic, id]);
        assert!(
            wait_for(Duration::from_secs(5), || pinned().len() == 3
                && map_keys(&h, "endpoints") == left
                && map_keys(&h, "counters") == left),
            "{mode}: b's datapath state outlived its detach: pins {:?}, endpoints {:?}, counters {:?} (b was {ib})",
            pinned(),
            map_keys(&h, "endpoints"),
            map_keys(&h, "counters")
        );

        // The container dies without a detach: its veth goes with its
        // namespace, the endpoint is collected, and its state goes.
        drop(own);
        let left = sorted(vec![ia, id]);
        assert!(
            wait_for(Duration::from_secs(10), || h.ctl_json(&["endpoint", "ls"]).unwrap().as_array().unwrap().len()
                == 2
                && pinned() == sorted_names(&[veth(&a), veth(&d)])
                && map_keys(&h, "endpoints") == left
                && map_keys(&h, "counters") == left),
            "{mode}: a dead container's datapath state stayed: pins {:?}, endpoints {:?}, counters {:?} (c was {ic})",
            pinned(),
            map_keys(&h, "endpoints"),
            map_keys(&h, "counters")
        );

        // a's veth deleted by hand: the repaired veth has the program (a
        // spoofed source is dropped again), the old one's state is gone.
        h.ns.ip(&["link", "del", &veth(&a)]).unwrap();
        assert!(wait_for(REPAIR, || h.ns.links().unwrap().contains(&veth(&a))), "{mode}: a's veth not repaired");
        assert!(wait_for(REPAIR, || ping(&netns_of(&a), &ip_of(&d), 1)), "{mode}: no traffic after a's veth's repair");
        let ia2 = idx(&a);
        assert_ne!(ia2, ia);
        in_netns(&netns_of(&a), "ip", &["addr", "add", "10.92.0.99/24", "dev", "eth0"]).status().unwrap();
        let spoofed = in_netns(&netns_of(&a), "ping", &["-c", "1", "-W", "1", "-I", "10.92.0.99", &ip_of(&d)])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(!spoofed, "{mode}: the repaired veth has no program: a spoofed source got through");
        let left = sorted(vec![ia2, id]);
        assert!(
            wait_for(Duration::from_secs(5), || map_keys(&h, "endpoints") == left && map_keys(&h, "counters") == left),
            "{mode}: the deleted veth's state stayed: endpoints {:?}, counters {:?} (a was {ia}, is {ia2})",
            map_keys(&h, "endpoints"),
            map_keys(&h, "counters")
        );
        assert_eq!(pinned(), sorted_names(&[veth(&a), veth(&d)]), "{mode}");
    }
}

fn sorted_names(names: &[String]) -> Vec<String> {
    let mut v = names.to_vec();
    v.sort();
    v
}

/// How many entries one of the datapath's pinned maps holds.
fn map_len(h: &Host, map: &str) -> usize {
    let path = h.run_dir().join("bpf/maps").join(map);
    let out = Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "bpftool {map}: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().expect("a list of entries").len()
}

/// Everything the agent makes in the kernel for networks, endpoints and
/// services goes when they do: devices, the datapath's entries, tables,
/// counters and markers, nftables rules, routes, managed namespaces; and a
/// host that lost its underlay loses its probe device.
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn nothing_the_agent_made_stays_once_it_is_no_longer_wanted() {
    require_root();
    let mut h = Host::bare().unwrap();
    let _up = Uplink::new(&h.ns, 10).unwrap();
    h.extra_args = vec!["--ebpf".into()];
    h.start().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.93.0.0/24", "--attachable"]).unwrap();
    let a = h.attach("app", "a", &[]).unwrap();
    let b = h.attach("app", "b", &["--label", "trellis.service=web"]).unwrap();
    h.ctl(&["service", "create", "web", "--network", "app", "--port", "80"]).unwrap();
    assert!(ping(&netns_of(&a), &ip_of(&b), 1));
    let tables = ["nets", "vips", "services", "maglev", "backends"];
    for m in tables.iter().chain(&["endpoints", "counters"]) {
        assert!(map_len(&h, m) > 0, "{m} is empty to begin with");
    }
    let nft = || {
        String::from_utf8_lossy(&h.ns.cmd("nft").args(["list", "table", "inet", "trellis"]).output().unwrap().stdout)
            .into_owned()
    };
    assert!(nft().contains("10.93.0.0/24"), "{}", nft());
    let routes = || h.ns.ip(&["route", "show", "table", "all"]).unwrap();
    assert!(routes().contains("10.93.0.0/24"), "{}", routes());
    let managed = || std::fs::read_dir(h.run_dir().join("netns")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(managed(), 2);

    // A detached endpoint's managed namespace goes (file and mount).
    h.ctl(&["detach", "a"]).unwrap();
    let mounted = |p: &std::path::Path| {
        std::fs::read_to_string("/proc/self/mountinfo").unwrap().contains(&format!(" {} ", p.display()))
    };
    assert!(
        wait_for(Duration::from_secs(5), || !netns_of(&a).exists() && !mounted(&netns_of(&a))),
        "a's managed namespace outlived its detach"
    );
    h.ctl(&["service", "rm", "web"]).unwrap();
    h.ctl(&["network", "rm", "app", "--force"]).unwrap();
    assert!(!netns_of(&b).exists() && !mounted(&netns_of(&b)), "b's managed namespace outlived its network");
    assert_eq!(managed(), 0);
    for prefix in ["trb-", "trv-", "trp-"] {
        assert!(links_with_prefix(&h, prefix).is_empty(), "{prefix}: {:?}", h.ns.links().unwrap());
    }
    assert_eq!(links_with_prefix(&h, "trx-"), ["trx-probe"]);
    for m in tables.iter().chain(&["endpoints", "counters", "svc_stats"]) {
        assert_eq!(map_len(&h, m), 0, "{m} keeps entries");
    }
    assert!(wait_for(Duration::from_secs(5), || map_len(&h, "dns") == 0), "the dns table keeps names");
    assert!(std::fs::read_dir(h.run_dir().join("bpf/links")).unwrap().next().is_none(), "attachment markers stay");
    assert!(!nft().contains("10.93."), "nftables rules of the removed network: {}", nft());
    assert!(!routes().contains("10.93."), "routes of the removed network: {}", routes());
    assert_eq!(h.ns.ip(&["xfrm", "state"]).unwrap().trim(), "");
    assert_eq!(h.ns.ip(&["xfrm", "policy"]).unwrap().trim(), "");

    // The host loses its underlay (no default route): no tunnels, so the
    // probe device goes too.
    h.kill9();
    h.ns.ip(&["route", "del", "default"]).unwrap();
    h.start().unwrap();
    assert!(links_with_prefix(&h, "trx-").is_empty(), "{:?}", h.ns.links().unwrap());
}

/// An agent restarted with its eBPF datapath off detaches the programs an
/// earlier run left on the endpoints' veths (they would enforce tables no
/// one updates any more) and unpins that run's maps and links.
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn a_datapath_turned_off_leaves_no_program_or_pinned_map() {
    require_root();
    for mode in ["clsact", "tcx"] {
        let mut h = Host::bare().unwrap();
        h.extra_args = vec!["--ebpf".into(), "--ebpf-attach".into(), mode.into()];
        h.start().unwrap();
        h.ctl(&["network", "create", "app", "--subnet", "10.94.0.0/24", "--attachable"]).unwrap();
        let a = h.attach("app", "a", &[]).unwrap();
        let b = h.attach("app", "b", &[]).unwrap();
        in_netns(&netns_of(&a), "ip", &["addr", "add", "10.94.0.99/24", "dev", "eth0"]).status().unwrap();
        let spoof = || {
            in_netns(&netns_of(&a), "ping", &["-c", "1", "-W", "1", "-I", "10.94.0.99", &ip_of(&b)])
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap()
                .success()
        };
        assert!(!spoof(), "{mode}: the program drops a spoofed source");
        let ns = h.ns.path();
        let filters = |veth: &str| {
            let out = in_netns(&ns, "tc", &["filter", "show", "dev", veth, "ingress"]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let veth = a["host_ifname"].as_str().expect("host_ifname").to_string();
        if mode == "clsact" {
            assert!(filters(&veth).contains("trellis_from_endpoint"), "{}", filters(&veth));
        }
        h.kill9();
        h.extra_args = vec!["--ebpf=false".into()];
        h.start().unwrap();
        assert!(!filters(&veth).contains("trellis"), "{mode}: a filter stayed: {}\nlog:\n{}", filters(&veth), h.log());
        assert!(spoof(), "{mode}: a program stayed on {veth} with the datapath off");
        assert!(ping(&netns_of(&a), &ip_of(&b), 1), "{mode}: traffic without the datapath");
        let pinned = |sub: &str| {
            std::fs::read_dir(h.run_dir().join("bpf").join(sub))
                .map(|d| d.flatten().map(|e| e.file_name().into_string().unwrap()).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        assert!(pinned("links").is_empty(), "{mode}: {:?}", pinned("links"));
        assert!(pinned("maps").is_empty(), "{mode}: {:?}", pinned("maps"));
    }
}

/// An agent upgraded across a change of the datapath's map layouts (what
/// an older agent pinned cannot be used by the new programs) starts the
/// datapath afresh instead of running without it: here the old layout is
/// made by hand — the pinned `counters` map replaced by one with the older
/// 96-byte value, and no layout stamp (older agents wrote none).
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn an_agent_upgraded_across_a_map_layout_change_starts_the_datapath_afresh() {
    require_root();
    let mut h = Host::new().unwrap();
    h.ctl(&["network", "create", "upg", "--subnet", "10.47.0.0/24", "--attachable"]).unwrap();
    let a = h.attach("upg", "a", &[]).unwrap();
    let b = h.attach("upg", "b", &[]).unwrap();
    assert!(ping(&netns_of(&a), &ip_of(&b), 1));
    h.kill9();
    let counters = h.run_dir().join("bpf/maps/counters");
    std::fs::remove_file(&counters).unwrap();
    let made = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&counters)
        .args(["type", "percpu_hash", "key", "4", "value", "96", "entries", "65536", "name", "counters"])
        .output()
        .unwrap();
    assert!(made.status.success(), "bpftool: {}", String::from_utf8_lossy(&made.stderr));
    let _ = std::fs::remove_file(h.run_dir().join("bpf.layout"));
    h.start().unwrap();
    let status = h.ctl_json(&["status"]).unwrap();
    assert_eq!(status["capabilities"]["ebpf"], true, "the datapath loaded: {status}");
    let log = std::fs::read_to_string(h.log_path()).unwrap();
    assert!(log.contains("of another layout"), "the agent said why it started the datapath afresh");
    // The endpoints have the new programs (with the new maps): traffic
    // flows and is counted, and a spoofed source is dropped again.
    let ifname = a["host_ifname"].as_str().unwrap().to_string();
    assert!(
        wait_for(Duration::from_secs(10), || {
            ping(&netns_of(&a), &ip_of(&b), 1) && map_keys(&h, "counters").contains(&ifindex(&h, &ifname))
        }),
        "a's traffic is not counted by the new program"
    );
    in_netns(&netns_of(&a), "ip", &["addr", "add", "10.47.0.99/24", "dev", "eth0"]).status().unwrap();
    let spoofed = in_netns(&netns_of(&a), "ping", &["-c", "1", "-W", "1", "-I", "10.47.0.99", &ip_of(&b)])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(!spoofed, "a spoofed source got through after the upgrade");
}
