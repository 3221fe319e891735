//! The agent's Prometheus metrics: scraped from its namespace and checked
//! with promtool (Debian `prometheus`).

use std::process::{Command, Stdio};
use std::time::Duration;

use trellis_integration::{Host, in_netns, ip_of, netns_of, ping, require_root, run, wait_for};

fn scrape(h: &Host) -> String {
    run(&mut in_netns(&h.ns.path(), "curl", &["-sf", "http://127.0.0.1:9473/metrics"])).unwrap_or_default()
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(series))?.rsplit(' ').next()?.parse().ok()
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn metrics_pass_promtool_and_count_what_happens() {
    require_root();
    let mut h = Host::bare().unwrap();
    h.extra_args = vec!["--ebpf".into()];
    h.start().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.58.0.0/24", "--attachable"]).unwrap();
    let a = h.attach("app", "a", &[]).unwrap();
    let b = h.attach("app", "b", &[]).unwrap();
    assert!(ping(&netns_of(&a), &ip_of(&b), 3));
    let _ = run(&mut in_netns(&netns_of(&a), "dig", &["@10.58.0.1", "+short", "+time=1", "b"]));
    let _ = run(&mut in_netns(&netns_of(&a), "dig", &["@10.58.0.1", "+short", "+time=1", "nosuch"]));
    // The snapshot refreshes with the resync interval (500 ms in tests).
    assert!(
        wait_for(Duration::from_secs(5), || value(&scrape(&h), "trellis_ipam_addresses_allocated{network=\"app\"}")
            == Some(3.0)),
        "gateway + 2 endpoints:\n{}",
        scrape(&h)
    );
    let text = scrape(&h);
    assert_eq!(value(&text, "trellis_endpoints_local{network=\"app\"}"), Some(2.0), "{text}");
    assert_eq!(value(&text, "trellis_ipam_addresses_usable{network=\"app\"}"), Some(254.0));
    assert!(value(&text, "trellis_reconcile_passes_total").unwrap_or(0.0) >= 1.0, "{text}");
    assert!(value(&text, "trellis_store_request_duration_seconds_count{op=\"txn\"}").unwrap_or(0.0) >= 3.0, "{text}");
    assert_eq!(value(&text, "trellis_dns_queries_total{path=\"userspace\",outcome=\"local_answered\"}"), Some(1.0));
    assert_eq!(value(&text, "trellis_dns_queries_total{path=\"userspace\",outcome=\"local_nxdomain\"}"), Some(1.0));
    // The eBPF counters of a's veth saw the pings.
    let host_if = a["host_ifname"].as_str().unwrap();
    let sent = value(&text, &format!("trellis_endpoint_packets_out_total{{interface=\"{host_if}\"}}"));
    assert!(sent.unwrap_or(0.0) >= 3.0, "a sent pings: {text}");

    // promtool's linter accepts the whole exposition.
    trellis_integration::promtool_check(&text);
}

/// `trellisctl monitor --json ARGS` against host `h`, its output piped.
fn monitor(h: &Host, args: &[&str]) -> std::process::Child {
    Command::new(trellis_integration::bin("trellisctl"))
        .arg("--socket")
        .arg(h.socket())
        .args(["monitor", "--json"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A monitor's first event.
fn first_line(child: &mut std::process::Child) -> serde_json::Value {
    use std::io::{BufRead, BufReader};
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    serde_json::from_str::<serde_json::Value>(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn monitor_shows_a_spoofed_packets_drop_and_flow_starts() {
    require_root();
    let mut h = Host::bare().unwrap();
    h.extra_args = vec!["--ebpf".into()];
    h.start().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.59.0.0/24", "--attachable"]).unwrap();
    let a = h.attach("app", "a", &[]).unwrap();
    let b = h.attach("app", "b", &[]).unwrap();
    let monitor = |args: &[&str]| monitor(&h, args);
    let mut drops = monitor(&["--verdict", "dropped", "--network", "app", "--count", "1"]);
    let mut passes = monitor(&["--verdict", "passed", "--endpoint", "a", "--count", "1"]);
    std::thread::sleep(Duration::from_millis(500)); // subscribed
    // A legitimate ping (a flow start that passed), then a spoofed one.
    assert!(ping(&netns_of(&a), &ip_of(&b), 1));
    in_netns(&netns_of(&a), "ip", &["addr", "add", "10.59.0.99/24", "dev", "eth0"]).status().unwrap();
    let _ = in_netns(&netns_of(&a), "ping", &["-c", "1", "-W", "1", "-I", "10.59.0.99", &ip_of(&b)])
        .stdout(Stdio::null())
        .status();
    let d = first_line(&mut drops);
    assert_eq!(d["verdict"], "dropped", "{d}");
    assert_eq!(d["reason"], "spoofed_ip", "{d}");
    assert_eq!(d["endpoint_name"], "a");
    assert_eq!(d["network"], "app");
    assert_eq!(d["protocol"], "icmp");
    assert_eq!(d["src"], "10.59.0.99");
    assert_eq!(d["dst"], ip_of(&b));
    let p = first_line(&mut passes);
    assert_eq!((p["verdict"].as_str(), p["src"].as_str()), (Some("passed"), Some(ip_of(&a).as_str())), "{p}");
    assert!(drops.wait().unwrap().success() && passes.wait().unwrap().success(), "--count ends the stream");
    // Without the eBPF datapath, the monitor says why it has nothing.
    let mut plain = Host::bare().unwrap();
    plain.extra_args = vec!["--ebpf=false".into()];
    plain.start().unwrap();
    let err = plain.ctl_err(&["monitor"]);
    assert!(err.contains("--ebpf"), "{err}");
}

/// The monitor shows IPv6 flows with their IPv6 addresses: a ping6 that
/// passed (icmpv6, from the endpoint's address) and a spoofed one dropped.
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn monitor_shows_ipv6_flow_starts_and_drops_with_their_addresses() {
    require_root();
    let mut h = Host::bare().unwrap();
    h.extra_args = vec!["--ebpf".into()];
    h.start().unwrap();
    h.ctl(&["network", "create", "app6", "--subnet", "10.58.0.0/24", "--subnet", "fd00:58::/64", "--attachable"])
        .unwrap();
    let a = h.attach("app6", "a", &[]).unwrap();
    let b = h.attach("app6", "b", &[]).unwrap();
    let v6 = |e: &serde_json::Value| e["address6"].as_str().unwrap().split('/').next().unwrap().to_string();
    let (a6, b6) = (v6(&a), v6(&b));
    let monitor = |args: &[&str]| monitor(&h, args);
    let mut drops = monitor(&["--verdict", "dropped", "--endpoint", "a", "--count", "1"]);
    let mut passes = monitor(&["--verdict", "passed", "--endpoint", "a", "--count", "1"]);
    std::thread::sleep(Duration::from_millis(500)); // subscribed
    assert!(ping(&netns_of(&a), &b6, 1), "a cannot ping b over IPv6");
    in_netns(&netns_of(&a), "ip", &["-6", "addr", "add", "fd00:58::99/64", "dev", "eth0", "nodad"]).status().unwrap();
    let _ = in_netns(&netns_of(&a), "ping", &["-c", "1", "-W", "1", "-I", "fd00:58::99", &b6])
        .stdout(Stdio::null())
        .status();
    let p = first_line(&mut passes);
    assert_eq!(
        (p["protocol"].as_str(), p["src"].as_str(), p["dst"].as_str()),
        (Some("icmpv6"), Some(a6.as_str()), Some(b6.as_str())),
        "{p}"
    );
    let d = first_line(&mut drops);
    assert_eq!(
        (d["reason"].as_str(), d["protocol"].as_str(), d["src"].as_str(), d["dst"].as_str()),
        (Some("spoofed_ipv6"), Some("icmpv6"), Some("fd00:58::99"), Some(b6.as_str())),
        "{d}"
    );
    assert!(drops.wait().unwrap().success() && passes.wait().unwrap().success(), "--count ends the stream");
}
