//! Service discovery DNS, asked with `dig` from container namespaces.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use trellis_integration::{Host, Netns, in_netns, ip_of, netns_of, require_root, run, wait_for};

/// `dig @SERVER ARGS +short` from the namespace at `ns`: the answer lines.
fn dig_short(ns: &Path, server: &str, args: &[&str]) -> Vec<String> {
    let mut a = vec![format!("@{server}"), "+short".into(), "+time=1".into(), "+tries=2".into()];
    a.extend(args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = run(&mut in_netns(ns, "dig", &refs)).unwrap_or_default();
    let mut v: Vec<String> = out.lines().map(str::to_string).filter(|l| !l.is_empty()).collect();
    v.sort();
    v
}

/// The full `dig` output (status line, flags, answer section).
fn dig_full(ns: &Path, server: &str, args: &[&str]) -> String {
    let mut a = vec![format!("@{server}"), "+time=1".into(), "+tries=2".into()];
    a.extend(args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    run(&mut in_netns(ns, "dig", &refs)).unwrap_or_default()
}

fn status_of(out: &str) -> String {
    out.split("status: ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("none").to_string()
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn names_services_tasks_ptr_and_scoping() {
    require_root();
    let h = Host::new().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.52.0.0/24", "--attachable"]).unwrap();
    h.ctl(&["network", "create", "db", "--subnet", "10.53.0.0/24", "--attachable"]).unwrap();
    let web1 = h.attach("app", "web1", &["--label", "trellis.service=web"]).unwrap();
    let web2 = h.attach("app", "web2", &["--label", "trellis.service=web"]).unwrap();
    let client = h.attach("app", "client", &[]).unwrap();
    let pg = h.attach("db", "pg", &[]).unwrap();
    let c = netns_of(&client);
    let gw = "10.52.0.1";
    let (ip1, ip2) = (ip_of(&web1), ip_of(&web2));
    assert!(
        wait_for(Duration::from_secs(5), || dig_short(&c, gw, &["web1"]) == vec![ip1.clone()]),
        "web1 never resolved"
    );
    let mut both = vec![ip1.clone(), ip2.clone()];
    both.sort();
    assert_eq!(dig_short(&c, gw, &["web"]), both, "a service answers every backend");
    assert_eq!(dig_short(&c, gw, &["tasks.web"]), both);
    assert_eq!(dig_short(&c, gw, &["web2.app"]), vec![ip2.clone()], "qualified by network");
    assert_eq!(dig_short(&c, gw, &["+tcp", "web1"]), vec![ip1.clone()], "TCP too");
    assert_eq!(dig_short(&c, gw, &["-x", &ip1]), vec!["web1.app.".to_string()]);
    // A query to any other resolver address is answered by Trellis too
    // (redirected at the gateway), UDP and TCP, scoped the same way.
    assert_eq!(dig_short(&c, "192.0.2.53", &["web1"]), vec![ip1.clone()], "intercepted query");
    assert_eq!(dig_short(&c, "192.0.2.53", &["+tcp", "web2.app"]), vec![ip2.clone()]);
    assert_eq!(status_of(&dig_full(&c, "198.51.100.7", &["pg"])), "NXDOMAIN");
    // It is the eBPF program that redirects them: nftables has no DNS rule.
    let rules = h.ns.cmd("nft").args(["list", "ruleset"]).output().unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        !rules.lines().any(|l| l.contains("dport 53") && l.contains("dnat")),
        "an nftables DNS redirect beside the program:\n{rules}"
    );
    // AAAA: authoritative NODATA, not forwarded.
    let aaaa = dig_full(&c, gw, &["web1", "AAAA"]);
    assert_eq!(status_of(&aaaa), "NOERROR", "{aaaa}");
    assert!(aaaa.contains(" aa") && aaaa.contains("ANSWER: 0"), "{aaaa}");
    // Scoping: db's names do not exist for a client of app only.
    let nx = dig_full(&c, gw, &["pg"]);
    assert_eq!(status_of(&nx), "NXDOMAIN", "{nx}");
    assert_eq!(status_of(&dig_full(&c, gw, &["pg.db"])), "NXDOMAIN");
    assert_eq!(status_of(&dig_full(&c, gw, &["-x", &ip_of(&pg)])), "NXDOMAIN");
    // The client joins db too (a second interface): now it sees both.
    h.ctl(&["attach", "db", "--name", "client-db", "--netns", c.to_str().unwrap(), "--ifname", "eth1"]).unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || dig_short(&c, gw, &["pg"]) == vec![ip_of(&pg)]),
        "a container on two networks sees both"
    );
    // pg sees its own network through its gateway, and not app.
    let p = netns_of(&pg);
    assert_eq!(dig_short(&p, "10.53.0.1", &["client-db"]).len(), 1);
    assert_eq!(status_of(&dig_full(&p, "10.53.0.1", &["web1"])), "NXDOMAIN");
    assert_eq!(dig_short(&c, gw, &["web1"]), vec![ip1]);
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn new_and_removed_endpoints_show_at_once() {
    require_root();
    let h = Host::new().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.54.0.0/24", "--attachable"]).unwrap();
    let client = h.attach("app", "client", &[]).unwrap();
    let c = netns_of(&client);
    assert!(wait_for(Duration::from_secs(5), || dig_short(&c, "10.54.0.1", &["client"]).len() == 1));
    let mut worst = Duration::ZERO;
    for i in 0..10 {
        let name = format!("n{i}");
        let ep = h.attach("app", &name, &[]).unwrap();
        let t0 = Instant::now();
        assert!(wait_for(Duration::from_secs(2), || dig_short(&c, "10.54.0.1", &[&name]) == vec![ip_of(&ep)]));
        worst = worst.max(t0.elapsed());
        h.ctl(&["detach", &name]).unwrap();
        let t0 = Instant::now();
        assert!(
            wait_for(Duration::from_secs(2), || status_of(&dig_full(&c, "10.54.0.1", &[&name])) == "NXDOMAIN"),
            "{name} still answers after its detach: {}\n{}",
            dig_full(&c, "10.54.0.1", &[&name]),
            h.log()
        );
        worst = worst.max(t0.elapsed());
    }
    eprintln!("slowest: {worst:?} (the benchmark measures freshness; this test checks it happens)");
}

/// A real upstream resolver (dnsmasq) in its own namespace.
struct Upstream {
    ns: Netns,
    child: Child,
}

impl Upstream {
    fn start(h: &Host, ip: &str, peer_ip: &str) -> Upstream {
        let ns = Netns::new("trdns").unwrap();
        let (a, b) = (trellis_integration::unique("tda"), trellis_integration::unique("tdb"));
        run(Command::new("ip")
            .args(["link", "add", &a, "netns", &h.ns.name, "type", "veth", "peer", "name", &b, "netns", &ns.name]))
        .unwrap();
        h.ns.ip(&["addr", "add", &format!("{peer_ip}/24"), "dev", &a]).unwrap();
        h.ns.ip(&["link", "set", &a, "up"]).unwrap();
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", &b]).unwrap();
        ns.ip(&["link", "set", &b, "up"]).unwrap();
        let child = ns
            .cmd("dnsmasq")
            .args([
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                &format!("--listen-address={ip}"),
                "--port=53",
                "--local-ttl=60",
                "--address=/example.test/192.0.2.10",
                "--address=/nx.test/",
                "--log-queries",
                "--log-facility=-",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting dnsmasq (dnsmasq-base)");
        std::thread::sleep(Duration::from_millis(300));
        Upstream { ns, child }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.ns;
    }
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn other_names_are_forwarded_cached_and_fail_over() {
    require_root();
    let mut h = Host::bare().unwrap();
    // The first upstream does not exist (failover), the second is dnsmasq.
    h.extra_args = vec!["--dns-upstream".into(), "198.18.7.99,198.18.7.2".into()];
    h.start().unwrap();
    let mut up = Upstream::start(&h, "198.18.7.2", "198.18.7.1");
    h.ctl(&["network", "create", "app", "--subnet", "10.55.0.0/24", "--attachable"]).unwrap();
    let client = h.attach("app", "client", &[]).unwrap();
    let c = netns_of(&client);
    let gw = "10.55.0.1";
    let a = dig_short(&c, gw, &["+time=5", "www.example.test"]);
    assert_eq!(a, vec!["192.0.2.10".to_string()], "forwarded through the second upstream");
    let nx = dig_full(&c, gw, &["+time=5", "x.nx.test"]);
    assert_eq!(status_of(&nx), "NXDOMAIN", "the upstream's NXDOMAIN comes back: {nx}");
    assert!(!nx.contains(" aa"), "a forwarded answer is not authoritative: {nx}");
    // Trellis names never reach the upstream.
    let _ = dig_full(&c, gw, &["client"]);
    let _ = dig_full(&c, gw, &["nosuchname"]);
    // The upstream goes away: the cached answer still comes (TTL 60).
    let _ = up.child.kill();
    let _ = up.child.wait();
    let mut log = String::new();
    if let Some(mut e) = up.child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut log);
    }
    assert!(log.contains("www.example.test") && log.contains("x.nx.test"), "dnsmasq saw the forwarded queries: {log}");
    assert!(!log.contains("nosuchname") && !log.contains("query[A] client"), "a Trellis name went upstream: {log}");
    assert_eq!(dig_short(&c, gw, &["www.example.test"]), vec!["192.0.2.10".to_string()], "served from the cache");
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn names_resolve_across_hosts_and_leave_with_a_dead_host() {
    require_root();
    let mut lab = trellis_integration::Lab::new(3, 3000).unwrap();
    lab.hosts[0].ctl(&["network", "create", "app", "--subnet", "10.56.0.0/24", "--attachable"]).unwrap();
    let client = lab.hosts[0].attach("app", "client", &[]).unwrap();
    let far = lab.hosts[1].attach("app", "far", &["--label", "trellis.service=api"]).unwrap();
    let doomed = lab.hosts[2].attach("app", "doomed", &["--label", "trellis.service=api"]).unwrap();
    let c = netns_of(&client);
    let gw = "10.56.0.1";
    assert!(
        wait_for(Duration::from_secs(5), || dig_short(&c, gw, &["far"]) == vec![ip_of(&far)]),
        "a name on another host does not resolve"
    );
    let mut both = vec![ip_of(&far), ip_of(&doomed)];
    both.sort();
    assert_eq!(dig_short(&c, gw, &["tasks.api"]), both, "a service's tasks on every host");
    // A debugging shell on another host than the network's creator, by name.
    let out =
        lab.hosts[1].ctl_output(&["attach", "app", "--", "sh", "-c", "ping -c1 -W2 client >/dev/null && echo reached"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("reached"),
        "a debugging shell on host2 cannot reach client on host1 by name: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Host 3 dies: its endpoints leave every answer within the lease TTL.
    let t0 = Instant::now();
    lab.hosts[2].kill9();
    lab.hosts[2].ns.ip(&["link", "set", &lab.uplinks[2], "down"]).unwrap();
    assert!(
        wait_for(Duration::from_secs(8), || dig_short(&c, gw, &["tasks.api"]) == vec![ip_of(&far)]),
        "the dead host's task is still answered"
    );
    let took = t0.elapsed();
    assert_eq!(status_of(&dig_full(&c, gw, &["doomed"])), "NXDOMAIN");
    eprintln!("dead host's names gone after {took:?} (lease TTL 3 s)");
}

fn dns_kernel(h: &Host, on: bool) {
    trellis_integration::set_dns_kernel(&h.run_dir(), on).unwrap();
}

/// What a client sees of an answer: status, flags and the answer section
/// (names compared without regard to case, as DNS compares them).
fn answer_of(ns: &Path, gw: &str, q: &[&str]) -> String {
    let mut args = vec!["+noedns", "+tries=2", "+time=1"];
    args.extend_from_slice(q);
    let out = dig_full(ns, gw, &args);
    let flags = out.split("flags: ").nth(1).and_then(|s| s.split(';').next()).unwrap_or("").to_string();
    let mut answers: Vec<String> = out
        .split(";; ANSWER SECTION:\n")
        .nth(1)
        .map(|s| s.split("\n\n").next().unwrap_or("").lines().map(|l| l.to_lowercase()).collect())
        .unwrap_or_default();
    answers.sort();
    format!("status={} flags={flags} answers={answers:?}", status_of(&out))
}

fn kernel_answered(h: &Host) -> u64 {
    let out = h.ns.cmd("curl").args(["-s", "http://127.0.0.1:9473/metrics"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("trellis_dns_queries_total{path=\"kernel\",outcome=\"local_answered\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The in-kernel path answers plain A and AAAA queries for names with one
/// address of the family exactly as the server does: every query of a
/// generated set is asked with the kernel path off (the server answers)
/// and on, and the answers compared; queries it must not take
/// (two-network clients, several addresses, other types, unknown and other
/// networks' names, AAAA of IPv4-only names) still answer the same, from
/// the server. `app` is dual-stack, `db` IPv4-only.
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn kernel_and_userspace_paths_give_identical_answers() {
    require_root();
    let h = Host::new().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.54.0.0/24", "--subnet", "fd00:54::/64", "--attachable"])
        .unwrap();
    h.ctl(&["network", "create", "db", "--subnet", "10.55.0.0/24", "--attachable"]).unwrap();
    h.attach("app", "web1", &["--label", "trellis.service=web"]).unwrap();
    h.attach("app", "web2", &["--label", "trellis.service=web", "--label", "team=a"]).unwrap();
    h.attach("app", "dup", &[]).unwrap();
    h.attach("db", "dup", &[]).unwrap();
    h.attach("db", "pg", &[]).unwrap();
    let client = h.attach("app", "client", &[]).unwrap();
    // A container on both networks: its names span both; never the kernel's.
    let both = h.attach("app", "both", &[]).unwrap();
    let both_ns = netns_of(&both);
    h.attach("db", "both-db", &["--netns", both_ns.to_str().unwrap(), "--ifname", "eth1"]).unwrap();
    h.ctl(&["service", "create", "front", "--network", "app", "--port", "80", "--selector", "team=a"]).unwrap();
    h.ctl(&["service", "create", "rr", "--network", "app", "--port", "80", "--mode", "dnsrr", "--selector", "team=a"])
        .unwrap();
    let c = netns_of(&client);
    let gw = "10.54.0.1";
    assert!(wait_for(Duration::from_secs(5), || dig_short(&c, gw, &["front"]).len() == 1), "front never resolved");

    // The query set: every name in a few spellings, several types, two
    // clients, to the gateway and to another resolver (intercepted).
    let names = [
        "web1",
        "WEB1",
        "Web2.App",
        "web2.app.",
        "web",
        "tasks.web",
        "front",
        "FRONT.app",
        "rr",
        "dup",
        "dup.app",
        "dup.db",
        "pg",
        "pg.db",
        "client",
        "both",
        "both-db",
        "nope",
        "nope.app",
        "app",
    ];
    let mut queries: Vec<(std::path::PathBuf, &str, Vec<&str>)> = Vec::new();
    for (i, n) in names.iter().enumerate() {
        // Over IPv4 and over IPv6 transport (the gateway's IPv6 address,
        // an outside IPv6 resolver's).
        for (ns, server) in [(&c, gw), (&both_ns, gw), (&c, "192.0.2.53"), (&c, "fd00:54::1"), (&c, "2001:db8:53::53")]
        {
            let qtype = ["A", "A", "AAAA", "ANY"][i % 4];
            queries.push((ns.clone(), server, vec![*n, "A"]));
            queries.push((ns.clone(), server, vec![*n, "AAAA"]));
            if qtype != "A" && qtype != "AAAA" {
                queries.push((ns.clone(), server, vec![*n, qtype]));
            }
        }
    }
    queries.push((c.clone(), gw, vec!["-x", "10.54.0.2"]));

    dns_kernel(&h, false);
    let before = kernel_answered(&h);
    let userspace: Vec<String> = queries.iter().map(|(ns, s, q)| answer_of(ns, s, q)).collect();
    assert_eq!(kernel_answered(&h), before, "the kernel path answered while off");
    dns_kernel(&h, true);
    let kernel: Vec<String> = queries.iter().map(|(ns, s, q)| answer_of(ns, s, q)).collect();
    let answered = kernel_answered(&h) - before;
    eprintln!("{} queries, {answered} answered in the kernel", queries.len());
    for (i, (u, k)) in userspace.iter().zip(&kernel).enumerate() {
        assert_eq!(u, k, "query {:?} to {}: the paths differ", queries[i].2, queries[i].1);
    }
    // The kernel took the plain A queries of one-network names from the
    // one-network client: web1, WEB1, Web2.App, web2.app., front,
    // FRONT.app, dup, dup.app, client (to the gateway and intercepted).
    assert!(answered >= 18 + 14, "the kernel path answered {answered} queries");
    // AAAA on its own: the one-network client's AAAA queries for app's
    // one-address names (web1, WEB1, Web2.App, web2.app., dup, dup.app,
    // client: to the gateway and intercepted) are the kernel's.
    let before6 = kernel_answered(&h);
    let aaaa: Vec<String> = queries
        .iter()
        .filter(|(ns, _, q)| ns == &c && q.get(1) == Some(&"AAAA"))
        .map(|(ns, s, q)| answer_of(ns, s, q))
        .collect();
    let answered6 = kernel_answered(&h) - before6;
    assert!(answered6 >= 14, "the kernel answered {answered6} AAAA queries: {aaaa:#?}");
    assert!(aaaa.iter().any(|a| a.contains(r"\tin\taaaa\tfd00:54::")), "{aaaa:#?}");
    // Over IPv6 transport the one-network client's plain queries are the
    // kernel's as well.
    let before_v6 = kernel_answered(&h);
    for server in ["fd00:54::1", "2001:db8:53::53"] {
        for t in ["A", "AAAA"] {
            assert!(answer_of(&c, server, &["web1", t]).contains("status=NOERROR"), "web1 {t} via {server}");
        }
    }
    let over_v6 = kernel_answered(&h) - before_v6;
    assert_eq!(over_v6, 4, "the kernel answered {over_v6} of 4 queries over IPv6 transport");
    assert!(userspace.iter().any(|a| a.contains("status=NXDOMAIN")), "the set has misses too");
    assert!(userspace.iter().filter(|a| a.contains(r"\tin\ta\t")).count() >= 20, "and hits: {userspace:#?}");
    assert!(userspace.iter().filter(|a| a.contains(r"\tin\taaaa\t")).count() >= 14, "AAAA hits: {userspace:#?}");
    assert!(
        userspace.iter().any(|a| a.contains("status=NOERROR") && a.contains("answers=[]")),
        "and NODATA (AAAA of IPv4-only names): {userspace:#?}"
    );
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn dns_to_the_gateway_is_not_connection_tracked() {
    require_root();
    let h = Host::new().unwrap();
    h.ctl(&["network", "create", "ct", "--subnet", "10.57.0.0/24", "--attachable"]).unwrap();
    let client = h.attach("ct", "client", &[]).unwrap();
    let c = netns_of(&client);
    // dig's queries carry EDNS: the server answers them, not the kernel path.
    assert!(wait_for(Duration::from_secs(5), || dig_short(&c, "10.57.0.1", &["client"]).len() == 1));
    for _ in 0..5 {
        assert_eq!(dig_short(&c, "10.57.0.1", &["client"]), vec![ip_of(&client)]);
    }
    assert_eq!(kernel_answered(&h), 0, "the server answered them all");
    let tracked = |proto: &str| run(h.ns.cmd("conntrack").args(["-L", "-p", proto])).unwrap_or_default();
    // Connection tracking is on in the host (the agent's NAT table): a ping
    // to the gateway is tracked...
    assert!(trellis_integration::ping(&c, "10.57.0.1", 1));
    let icmp = tracked("icmp");
    assert!(icmp.contains("dst=10.57.0.1"), "conntrack is on here: {icmp}");
    // ...and the queries are not (no entry per client port, no insert race).
    let udp = tracked("udp");
    let table = run(h.ns.cmd("nft").args(["list", "table", "inet", "trellis"])).unwrap_or_default();
    assert!(!udp.contains("dport=53"), "DNS to the gateway was tracked: {udp}\n{table}");
}

/// The agent keeps what it wrote to the in-kernel DNS table and reads the
/// table back only now and then: a name removed from it by hand comes back.
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn a_name_removed_from_the_kernel_table_comes_back() {
    require_root();
    let h = Host::new().unwrap();
    h.ctl(&["network", "create", "kt", "--subnet", "10.58.0.0/24", "--attachable"]).unwrap();
    h.attach("kt", "web", &[]).unwrap();
    h.attach("kt", "client", &[]).unwrap();
    let map = h.run_dir().join("bpf/maps/dns");
    let map = map.to_str().unwrap().to_string();
    let dump = || -> Vec<serde_json::Value> {
        let out = run(Command::new("bpftool").args(["-j", "map", "dump", "pinned", &map])).unwrap_or_default();
        serde_json::from_str(&out).unwrap_or_default()
    };
    // "web" and "web.kt" (and the client's names): 4 entries.
    assert!(wait_for(Duration::from_secs(5), || dump().len() == 4), "{:?}", dump());
    let key: Vec<String> =
        dump()[0]["key"].as_array().unwrap().iter().map(|b| b.as_str().unwrap().to_string()).collect();
    let mut args = vec!["map", "delete", "pinned", map.as_str(), "key", "hex"];
    let hex: Vec<String> = key.iter().map(|b| b.trim_start_matches("0x").to_string()).collect();
    args.extend(hex.iter().map(String::as_str));
    run(Command::new("bpftool").args(&args)).unwrap();
    assert_eq!(dump().len(), 3, "deleted by hand");
    assert!(wait_for(Duration::from_secs(15), || dump().len() == 4), "the name never came back: {:?}", dump());
}
