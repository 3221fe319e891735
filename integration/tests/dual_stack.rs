//! Dual stack: networks with an IPv6 subnet beside the IPv4 one, in real
//! namespaces on a two-host lab — addresses from the cluster IPAM, routes,
//! traffic on one host and across the tunnel (static neighbour entries, no
//! multicast NDP over VXLAN), and the datapath's IPv6 anti-spoofing.

use std::time::Duration;

use trellis_integration::{Lab, in_netns, netns_of, ping, require_root, wait_for};

/// The sum of a metric's samples whose labels contain `filter`.
fn metric(h: &trellis_integration::Host, name: &str, filter: &str) -> u64 {
    let out = h.ns.cmd("curl").args(["-s", "http://127.0.0.1:9473/metrics"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// 1 MiB over TCP from namespace `from` to port 7000 of `to` (an IPv6
/// address) in namespace `server_ns`, checked whole: the address the
/// server saw it from.
fn stream_whole(from: &std::path::Path, server_ns: &std::path::Path, to: &str) -> String {
    let server =
        trellis_integration::sockets::in_ns(server_ns, || std::net::TcpListener::bind("[::]:7000")).unwrap().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let (mut s, peer) = server.accept().unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        (buf, peer)
    });
    let addr: std::net::SocketAddr = format!("[{to}]:7000").parse().unwrap();
    let mut conn = trellis_integration::sockets::connect(from, addr, Duration::from_secs(3)).unwrap();
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    std::io::Write::write_all(&mut conn, &data).unwrap();
    drop(conn);
    let (got, peer) = reader.join().unwrap();
    assert!(got == data, "the stream arrived whole ({} of {} bytes)", got.len(), data.len());
    peer.ip().to_string()
}

fn addr6(e: &serde_json::Value) -> String {
    e["address6"].as_str().expect("an IPv6 address").split('/').next().unwrap().to_string()
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn a_dual_stack_network_carries_ipv6_on_a_host_and_across_hosts() {
    require_root();
    let lab = Lab::new(2, 3000).unwrap();
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    let net = h1
        .ctl_json(&["network", "create", "app", "--subnet", "10.94.0.0/24", "--subnet", "fd00:94::/64", "--attachable"])
        .unwrap();
    assert_eq!(
        (net["subnet6"].as_str(), net["gateway6"].as_str()),
        (Some("fd00:94::/64"), Some("fd00:94::1")),
        "{net}"
    );
    let a = h1.attach("app", "a", &[]).unwrap();
    let b = h1.attach("app", "b", &[]).unwrap();
    let c = h2.attach("app", "c", &[]).unwrap();
    let (a6, b6, c6) = (addr6(&a), addr6(&b), addr6(&c));
    assert!([&a6, &b6, &c6].iter().all(|x| x.starts_with("fd00:94::")), "{a6} {b6} {c6}");
    assert!(a6 != b6 && b6 != c6 && a6 != c6, "addresses are unique");
    let ans = netns_of(&a);
    // The container's address is there, not tentative, and the default
    // route goes via the gateway.
    let shown = in_netns(&ans, "ip", &["-6", "addr", "show", "dev", "eth0"]).output().unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(shown.contains(&format!("{a6}/64")) && !shown.contains("tentative"), "{shown}");
    let route = in_netns(&ans, "ip", &["-6", "route", "show", "default"]).output().unwrap();
    assert!(String::from_utf8_lossy(&route.stdout).contains("via fd00:94::1"), "{route:?}");
    // On one host, to the gateway, and across the tunnel.
    for (to, what) in [(b6.as_str(), "b on the same host"), ("fd00:94::1", "the gateway"), (c6.as_str(), "c on host 2")]
    {
        assert!(wait_for(Duration::from_secs(10), || ping(&ans, to, 1)), "a cannot reach {what} ({to}) over IPv6");
    }
    assert!(ping(&netns_of(&c), &a6, 2), "c cannot reach a over IPv6");
    // TCP over IPv6 across the hosts: 1 MiB through, intact.
    assert_eq!(stream_whole(&ans, &netns_of(&c), &c6), a6, "the server sees a's IPv6 address");
    // IPv4 still works beside it.
    let ip4 = |e: &serde_json::Value| e["address"].as_str().unwrap().split('/').next().unwrap().to_string();
    assert!(ping(&ans, &ip4(&c), 2));
    // Host 1's VXLAN device knows c's IPv6 address statically.
    let id = net["id"].as_str().unwrap();
    let dev = format!("trx-{}", &id[..10]);
    let neigh = h1.ns.ip(&["-6", "neigh", "show", "dev", &dev, "nud", "permanent"]).unwrap();
    assert!(neigh.contains(&c6), "{neigh}");
    // A spoofed IPv6 source is dropped by the endpoint's program.
    in_netns(&ans, "ip", &["-6", "addr", "add", "fd00:94::99/64", "dev", "eth0", "nodad"]).status().unwrap();
    let spoofed = in_netns(&ans, "ping", &["-c", "2", "-i", "0.2", "-W", "1", "-I", "fd00:94::99", &b6])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(!spoofed, "a spoofed IPv6 source got through");
    in_netns(&ans, "ip", &["-6", "addr", "del", "fd00:94::99/64", "dev", "eth0"]).status().unwrap();
    // Another dual-stack network on the same host: its IPv6 subnet is out
    // of a's reach, in the program (counted), even with the host
    // forwarding IPv6 (the bridges' nftables rules are the second wall).
    h1.ctl(&["network", "create", "other", "--subnet", "10.99.0.0/24", "--subnet", "fd00:99::/64", "--attachable"])
        .unwrap();
    let x = h1.attach("other", "x", &[]).unwrap();
    let x6 = addr6(&x);
    h1.ns.cmd("sysctl").args(["-qw", "net.ipv6.conf.all.forwarding=1"]).status().unwrap();
    let isolation = || metric(h1, "trellis_endpoint_drops", "reason=\"isolation\"");
    let before = isolation();
    assert!(!ping(&ans, &x6, 2), "a reached another network's endpoint over IPv6");
    let dump = || {
        let out = std::process::Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(h1.run_dir().join("bpf/maps/nets6"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    assert!(
        wait_for(Duration::from_secs(5), || isolation() >= before + 2),
        "dropped by the program: {} (nets6: {})",
        isolation(),
        dump()
    );
    assert!(ping(&netns_of(&x), "fd00:99::1", 1), "x reaches its own gateway");
    let spoofed6 = || metric(h1, "trellis_endpoint_drops", "reason=\"spoofed_ipv6\"");
    assert!(spoofed6() >= 2, "the spoofed echoes were counted: {}", spoofed6());
    // Egress: an IPv6 address outside (on the underlay, which has no
    // route back to the ULA subnet) answers only because host 1
    // masquerades the network's IPv6 subnet (forwarding on: above).
    lab.underlay.ip(&["-6", "addr", "add", "fd00:ffff::254/64", "dev", "ul0", "nodad"]).unwrap();
    h1.ns.ip(&["-6", "addr", "add", "fd00:ffff::1/64", "dev", &lab.uplinks[0], "nodad"]).unwrap();
    h1.ns.ip(&["-6", "route", "add", "default", "via", "fd00:ffff::254"]).unwrap();
    assert!(wait_for(Duration::from_secs(5), || ping(&ans, "fd00:ffff::254", 1)), "no IPv6 egress");
    // DNS: AAAA for endpoint names on this host and others, A beside it,
    // and the IPv6 address's PTR, over the gateway's server.
    let dig = |args: &[&str]| {
        let mut a = vec!["@10.94.0.1", "+short", "+time=1", "+tries=2"];
        a.extend(args);
        let out = in_netns(&ans, "dig", &a).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(wait_for(Duration::from_secs(10), || dig(&["AAAA", "c"]) == c6), "AAAA c: {:?}", dig(&["AAAA", "c"]));
    assert_eq!(dig(&["AAAA", "b.app"]), b6);
    assert_eq!(dig(&["A", "c"]), ip4(&c));
    assert_eq!(dig(&["-x", &c6]), "c.app.");
    // The server listens on the gateway's IPv6 address too.
    let over6 = in_netns(&ans, "dig", &["@fd00:94::1", "+short", "+time=1", "+tries=3", "AAAA", "c"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&over6.stdout).trim(), c6, "AAAA over IPv6");
    // DNS over IPv6 to a resolver outside Trellis (none is there) is sent
    // to the gateway's IPv6 address by the endpoint's program, and the
    // answer comes back from the address asked (dig checks), over UDP and
    // over TCP.
    for proto in ["+notcp", "+tcp"] {
        let out = in_netns(&ans, "dig", &["@2001:db8:53::53", "+short", "+time=1", "+tries=3", proto, "AAAA", "c"])
            .output()
            .unwrap();
        let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(got, c6, "AAAA c via an outside IPv6 resolver ({proto}): {got:?} {:?}", out.stderr);
    }
    let intercepted = in_netns(&ans, "dig", &["@2001:db8:53::53", "+time=1", "+tries=2", "A", "c"]).output().unwrap();
    let intercepted = String::from_utf8_lossy(&intercepted.stdout).into_owned();
    assert!(
        intercepted.contains(&ip4(&c)) && intercepted.contains("SERVER: 2001:db8:53::53#53"),
        "the reply comes from the resolver asked: {intercepted}"
    );
    // Detached: both addresses go back to the pool.
    h1.ctl(&["detach", "b"]).unwrap();
    assert!(wait_for(Duration::from_secs(10), || !h1.ctl(&["endpoint", "ls"]).unwrap().contains(" b ")), "b stayed");
    let again = h1.attach("app", "d", &[]).unwrap();
    assert!(again["address6"].as_str().is_some());
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn ipv6_subnets_from_the_cluster_pool_and_bad_requests_refused() {
    require_root();
    let lab = Lab::new(2, 3000).unwrap();
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    let n1 = h1.ctl_json(&["network", "create", "one", "--subnet", "10.95.0.0/24", "--ipv6"]).unwrap();
    let n2 = h2.ctl_json(&["network", "create", "two", "--subnet", "10.96.0.0/24", "--ipv6"]).unwrap();
    let (s1, s2) = (n1["subnet6"].as_str().unwrap().to_string(), n2["subnet6"].as_str().unwrap().to_string());
    assert!(s1.starts_with("fd") && s1.ends_with("/64") && s2.ends_with("/64"), "{s1} {s2}");
    assert_ne!(s1, s2, "two networks, two /64s");
    let prefix = |s: &str| s.split(':').take(3).collect::<Vec<_>>().join(":");
    assert_eq!(prefix(&s1), prefix(&s2), "one ULA /48 for the cluster, whichever host asks");
    let refused = |args: &[&str], says: &str| {
        let out = h1.ctl_output(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success() && err.contains(says), "{args:?}: {err}");
    };
    refused(&["network", "create", "v6only", "--subnet", "fd00:97::/64", "--gateway", "10.97.0.1"], "IPv6-only");
    refused(
        &["network", "create", "twice", "--subnet", "10.97.0.0/24", "--subnet", "10.98.0.0/24"],
        "once per address family",
    );
    refused(&["network", "create", "clash", "--subnet", "10.97.0.0/24", "--subnet", &s1], "overlaps");
    refused(&["network", "create", "small", "--subnet", "10.97.0.0/24", "--subnet", "fd00:97::/124"], "too small");
    refused(
        &["network", "create", "gw", "--subnet", "10.97.0.0/24", "--subnet", "fd00:97::/64", "--gateway", "fd00:98::1"],
        "not inside subnet",
    );
    // Nothing half-made by the refusals.
    let names: Vec<String> = h1
        .ctl_json(&["network", "ls"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

/// Without the eBPF datapath, DNS over IPv6 to a resolver outside Trellis
/// is still answered by the gateway (nftables DNAT to its IPv6 address),
/// over UDP and TCP, the reply coming from the address asked.
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn without_ebpf_dns_over_ipv6_goes_to_the_gateway_too() {
    require_root();
    let mut h = trellis_integration::Host::bare().unwrap();
    h.extra_args = vec!["--ebpf=false".into()];
    h.start().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.93.0.0/24", "--subnet", "fd00:93::/64", "--attachable"])
        .unwrap();
    let a = h.attach("app", "a", &[]).unwrap();
    let b = h.attach("app", "b", &[]).unwrap();
    let (ans, b6) = (netns_of(&a), addr6(&b));
    for proto in ["+notcp", "+tcp"] {
        let dig = || {
            let out = in_netns(&ans, "dig", &["@2001:db8:53::53", "+time=1", "+tries=2", proto, "AAAA", "b"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert!(
            wait_for(Duration::from_secs(10), || dig().contains(&b6)),
            "AAAA b via an outside IPv6 resolver ({proto}): {}\nlog:\n{}",
            dig(),
            h.log()
        );
        assert!(dig().contains("SERVER: 2001:db8:53::53#53"), "{}", dig());
    }
}

/// A dual-stack network's service has an IPv6 VIP beside its IPv4 one:
/// named by AAAA (its tasks by their IPv6 addresses), answering ping, and
/// balancing TCP over backends on three hosts by Maglev, each backend
/// seeing the client's own IPv6 address; a backend that leaves gets no new
/// connection.
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn an_ipv6_vip_balances_over_backends_on_three_hosts() {
    use trellis_integration::sockets::{Backend, Client};
    require_root();
    let lab = Lab::new(3, 3000).unwrap();
    let h = &lab.hosts;
    h[0].ctl(&["network", "create", "app6", "--subnet", "10.95.0.0/24", "--subnet", "fd00:95::/64"]).unwrap();
    let mut backends = Vec::new();
    let mut servers = Vec::new();
    for (i, host) in h.iter().enumerate() {
        let ep = host.attach("app6", &format!("web{i}"), &["--label", "trellis.service=web"]).unwrap();
        servers.push(Backend::start(&netns_of(&ep), 8080, &format!("web{i}")).unwrap());
        backends.push(ep);
    }
    let svc = h[1].ctl_json(&["service", "create", "web", "--network", "app6", "--port", "80:8080"]).unwrap();
    assert_eq!(svc["vip"], "10.95.0.254");
    let vip6 = svc["vip6"].as_str().unwrap_or_else(|| panic!("no IPv6 VIP: {svc}")).to_string();
    assert_eq!(vip6, "fd00:95::ffff:ffff:ffff:ff7f", "the top of the subnet below its anycast addresses");
    let ls = h[0].ctl(&["service", "ls"]).unwrap();
    assert!(ls.contains(&format!("10.95.0.254,{vip6}")), "both VIPs shown: {ls}");
    let cep = h[0].attach("app6", "client", &["--label", "trellis.service=client"]).unwrap();
    let (cns, c6) = (netns_of(&cep), addr6(&cep));
    let client = Client::new(&cns).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || {
            let s = h[0].ctl_json(&["service", "inspect", "web"]).unwrap();
            s["backends"].as_array().unwrap().iter().filter(|b| b["programmed"] == true).count() == 3
        }),
        "host 0 never programmed all three backends: {}",
        h[0].ctl(&["service", "inspect", "web"]).unwrap()
    );
    // Names: AAAA of the service is its IPv6 VIP, of its tasks their
    // IPv6 addresses; PTR of the VIP is the service.
    let dig = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["@10.95.0.1", "+short", "+time=1", "+tries=2"];
        a.extend(args);
        let out = in_netns(&cns, "dig", &a).output().unwrap();
        let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
        v.sort();
        v
    };
    assert!(
        wait_for(Duration::from_secs(5), || dig(&["AAAA", "web"]) == vec![vip6.clone()]),
        "{:?}",
        dig(&["AAAA", "web"])
    );
    let mut task6: Vec<String> = backends.iter().map(addr6).collect();
    task6.sort();
    assert_eq!(dig(&["AAAA", "tasks.web"]), task6);
    assert_eq!(dig(&["-x", &vip6]), vec!["web.app6.".to_string()]);
    // The VIP answers ping (its neighbour solicitation answered first).
    assert!(ping(&cns, &vip6, 2), "no answer to ping from the IPv6 VIP");
    // 3,000 connections: each backend within ±10 % of a third (a
    // backend's count is binomial, σ ≈ 26: ±100 is 3.9 σ), each seeing the
    // client's own address.
    let to: std::net::SocketAddr = format!("[{vip6}]:80").parse().unwrap();
    let spread = |n: usize| client.spread(to, n, &c6);
    let seen = spread(3000);
    assert_eq!(seen.len(), 3, "{seen:?}");
    for (name, n) in &seen {
        assert!((900..=1100).contains(n), "{name} got {n} of 3000 connections: {seen:?}");
    }
    let inspect = h[0].ctl_json(&["service", "inspect", "web"]).unwrap();
    assert!(inspect["selections"].as_u64().unwrap() >= 3000, "counted by the datapath: {inspect}");
    // A backend leaves: new connections go to the other two.
    h[2].ctl(&["detach", "web2"]).unwrap();
    assert!(wait_for(Duration::from_secs(10), || !spread(30).contains_key("web2")), "web2 still gets connections");
    assert_eq!(spread(200).len(), 2);
    drop(servers);
}

/// An IPv6-only network: endpoints with one IPv6 address (no IPv4 at all,
/// none sent), ping6 and TCP on a host and across hosts, names by AAAA
/// (and PTR) from the gateway's server and through an outside resolver,
/// isolation from another IPv6-only network, dnsrr services, and VIP
/// services refused saying why (published ports too: app::ports' tests).
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn an_ipv6_only_network_carries_traffic_on_a_host_and_across_hosts() {
    require_root();
    let lab = Lab::new(2, 3000).unwrap();
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    let net = h1.ctl_json(&["network", "create", "six", "--subnet", "fd00:96::/64", "--attachable"]).unwrap();
    assert_eq!((net["subnet"].as_str(), net["gateway"].as_str()), (Some("fd00:96::/64"), Some("fd00:96::1")), "{net}");
    let v6 = |e: &serde_json::Value| e["address"].as_str().unwrap().split('/').next().unwrap().to_string();
    let a = h1.attach("six", "a", &[]).unwrap();
    let b = h1.attach("six", "b", &[]).unwrap();
    let c = h2.attach("six", "c", &[]).unwrap();
    let (a6, b6, c6) = (v6(&a), v6(&b), v6(&c));
    assert!([&a6, &b6, &c6].iter().all(|x| x.starts_with("fd00:96::")), "{a6} {b6} {c6}");
    assert_eq!(a["mac"].as_str().unwrap()[..5].to_string(), "02:42", "a MAC of the scheme: {a}");
    let ans = netns_of(&a);
    let v4 = in_netns(&ans, "ip", &["-4", "addr", "show", "dev", "eth0"]).output().unwrap();
    assert!(String::from_utf8_lossy(&v4.stdout).trim().is_empty(), "no IPv4 address: {v4:?}");
    let route = in_netns(&ans, "ip", &["-6", "route", "show", "default"]).output().unwrap();
    assert!(String::from_utf8_lossy(&route.stdout).contains("via fd00:96::1"), "{route:?}");
    for (to, what) in [(b6.as_str(), "b on the same host"), ("fd00:96::1", "the gateway"), (c6.as_str(), "c on host 2")]
    {
        assert!(wait_for(Duration::from_secs(10), || ping(&ans, to, 1)), "a cannot reach {what} ({to})");
    }
    // TCP across the hosts: 1 MiB, whole, from a's address.
    assert_eq!(stream_whole(&ans, &netns_of(&c), &c6), a6);
    // Names: AAAA (and no A), PTR, from the gateway's server; through an
    // outside resolver's address too (the program sends it there).
    let dig = |args: &[&str]| {
        let out = in_netns(&ans, "dig", args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let at = ["@fd00:96::1", "+short", "+time=1", "+tries=3"];
    let ask = |more: &[&str]| dig(&[at.as_slice(), more].concat());
    assert!(
        wait_for(Duration::from_secs(10), || ask(&["AAAA", "c"]) == c6),
        "AAAA c: {:?}",
        dig(&["@fd00:96::1", "+time=1", "+tries=1", "AAAA", "c"])
    );
    assert_eq!(ask(&["A", "c"]), "", "no A record");
    assert_eq!(ask(&["-x", &c6]), "c.six.");
    // A one-address name's AAAA over IPv6 is answered by the endpoint's
    // program (the in-kernel path), as over IPv4 (a plain query, as libc
    // resolvers send: no EDNS).
    let kernel = || metric(h1, "trellis_dns_queries", "path=\"kernel\"");
    let before = kernel();
    assert_eq!(ask(&["+noedns", "AAAA", "b"]), b6);
    assert!(wait_for(Duration::from_secs(3), || kernel() > before), "not answered in the kernel: {}", kernel());
    let outside = dig(&["@2001:db8:53::53", "+short", "+time=1", "+tries=3", "AAAA", "b.six"]);
    assert_eq!(outside, b6, "through an outside resolver's address");
    // Nothing of IPv4 leaves it, not even from an address it gives itself.
    // (A static neighbour: the IPv4 packet itself, not only its ARP.)
    in_netns(&ans, "ip", &["addr", "add", "10.96.0.5/24", "dev", "eth0"]).status().unwrap();
    in_netns(&ans, "ip", &["neigh", "add", "10.96.0.6", "lladdr", b["mac"].as_str().unwrap(), "dev", "eth0"])
        .status()
        .unwrap();
    let spoofed = |why: &str| metric(h1, "trellis_endpoint_drops", &format!("reason=\"{why}\""));
    let (ip_before, arp_before) = (spoofed("spoofed_ip"), spoofed("spoofed_arp"));
    assert!(!ping(&ans, "10.96.0.6", 1));
    // (No neighbour entry for this one: it asks by ARP.)
    assert!(!ping(&ans, "10.96.0.7", 1));
    assert!(
        wait_for(Duration::from_secs(5), || spoofed("spoofed_ip") > ip_before),
        "IPv4 from an IPv6-only endpoint was not dropped"
    );
    assert!(wait_for(Duration::from_secs(5), || spoofed("spoofed_arp") > arp_before), "its ARP was not dropped");
    // Another IPv6-only network is out of reach.
    h1.ctl(&["network", "create", "seven", "--subnet", "fd00:97::/64", "--attachable"]).unwrap();
    let x = h1.attach("seven", "x", &[]).unwrap();
    h1.ns.cmd("sysctl").args(["-qw", "net.ipv6.conf.all.forwarding=1"]).status().unwrap();
    assert!(!ping(&ans, &v6(&x), 2), "a reached another IPv6-only network");
    // Services: dnsrr resolves to the tasks; a VIP is refused, as are
    // published ports.
    let out = h1.ctl_output(&["service", "create", "web", "--network", "six", "--port", "80"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && err.contains("IPv6-only") && err.contains("dnsrr"), "{err}");
    h1.ctl(&["service", "create", "rr", "--network", "six", "--mode", "dnsrr", "--selector", "trellis.service=db"])
        .unwrap();
    let d = h2.attach("six", "d", &["--label", "trellis.service=db"]).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || ask(&["AAAA", "rr"]) == v6(&d)),
        "AAAA rr: {:?}",
        ask(&["AAAA", "rr"])
    );
    let ls = h1.ctl(&["network", "ls"]).unwrap();
    assert!(ls.contains("fd00:96::/64"), "{ls}");
}
