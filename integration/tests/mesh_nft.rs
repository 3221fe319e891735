//! The routing mesh through nftables on real agents: hosts run with
//! `--ebpf=false` (all of them, or some: a mixed cluster), a published
//! service answers on every host from a client outside the cluster (the
//! underlay's own namespace) and from each host's 127.0.0.1 and own
//! address, TCP and UDP, whether or not the host runs a backend; each
//! backend sees the host's mesh address (SNAT), and the replies come back
//! through the host that took the connection. Ports removed live leave no
//! element behind, and the hosts' mesh addresses are released with the
//! last published service of their network. And hairpin: containers
//! reaching a mesh port through their own host's address and another
//! host's, on eBPF hosts and on hosts without. Root tests (`--run-ignored
//! all`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::Duration;

use trellis_integration::sockets::{Backend, Client, in_ns, read_line};
use trellis_integration::{Host, Lab, UNDERLAY_GATEWAY, netns_of, require_root, underlay_ip, wait_for};

fn at(host: usize, port: u16) -> SocketAddr {
    format!("{}:{port}", underlay_ip(host + 1)).parse().unwrap()
}

fn no_ebpf(_: usize) -> Vec<String> {
    vec!["--ebpf=false".into()]
}

/// Host 1 without eBPF, the others with it.
fn mixed(i: usize) -> Vec<String> {
    if i == 1 { no_ebpf(i) } else { Vec::new() }
}

/// A lab of three hosts (agents' flags from `flags`) with network `edge`
/// and a backend of `web` (TCP and UDP on 8080) on hosts 0 and 1; host 2
/// runs none.
fn lab_with_backends(flags: impl Fn(usize) -> Vec<String>, subnet: &str) -> (Lab, Vec<Backend>) {
    let lab = Lab::with_host_args(3, 3000, flags).unwrap();
    let h = &lab.hosts;
    h[0].ctl(&["network", "create", "edge", "--subnet", subnet, "--attachable"]).unwrap();
    let mut servers = Vec::new();
    for (i, host) in h.iter().enumerate().take(2) {
        let ep = host.attach("edge", &format!("web{i}"), &["--label", "trellis.service=web"]).unwrap();
        servers.push(Backend::start(&netns_of(&ep), 8080, &format!("web{i}")).unwrap());
    }
    (lab, servers)
}

/// `host`'s mesh address on `network`, once it has one.
fn mesh_addr(host: &Host, network: &str) -> String {
    let mut addr = None;
    let found = wait_for(Duration::from_secs(20), || {
        let s = host.ctl_json(&["status"]).unwrap();
        addr = s["mesh"]["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["network"] == network)
            .map(|a| a["address"].as_str().unwrap().to_string());
        addr.is_some()
    });
    assert!(found, "no mesh address on {network}; status: {}\nlog:\n{}", host.ctl(&["status"]).unwrap(), host.log());
    addr.unwrap()
}

/// `n` TCP requests from `client` to `to`: answers by backend, each
/// checked to have seen `seen`.
fn spread(client: &Client, to: SocketAddr, n: usize, seen: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for i in 0..n {
        let line = client.request(to).unwrap_or_else(|e| panic!("request {i} to {to}: {e}"));
        let (name, saw) = line.split_once(' ').unwrap_or_else(|| panic!("answer {line:?}"));
        assert_eq!(saw, seen, "{to}: the backend saw {saw}, not {seen}");
        *out.entry(name.to_string()).or_default() += 1;
    }
    out
}

/// Is `to` refused from `client` (a reset, not a timeout)?
fn refused(client: &Client, to: SocketAddr) -> bool {
    matches!(client.connect(to), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// One UDP datagram to `to` from the namespace `from`: the answer, checked
/// to come from the address asked.
fn udp_request(from: &Path, to: SocketAddr) -> Option<String> {
    let s: UdpSocket = Client::udp(from).ok()?;
    s.send_to(b"hi", to).ok()?;
    let mut buf = [0u8; 256];
    let (n, peer) = s.recv_from(&mut buf).ok()?;
    assert_eq!(peer, to, "the answer must come from the address asked");
    Some(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// UDP to `to` from `from` gets ICMP port unreachable (no backend).
fn udp_refused(from: &Path, to: SocketAddr) -> bool {
    let s = in_ns(from, || UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.connect(to).unwrap();
    let mut buf = [0u8; 64];
    matches!(s.send(b"hi").and_then(|_| s.recv(&mut buf)), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// `nft -j list table FAMILY trellis` in `host`'s namespace (`None`: no
/// such table).
fn nft_table(host: &Host, family: &str) -> Option<String> {
    let out = host.ns.cmd("nft").args(["-j", "list", "table", family, "trellis"]).output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The keys of the lab's store under `prefix` (read from the underlay's
/// namespace, where etcd listens).
fn store_keys(lab: &Lab, prefix: &str) -> Vec<String> {
    let (url, prefix) = (lab.etcd.url(), prefix.to_string());
    in_ns(&lab.underlay.path(), move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let cfg = trellis_store::EtcdConfig::parse(&url).unwrap();
            let store = trellis_store::EtcdStore::connect(&cfg).await.unwrap();
            let (items, _) = trellis_store::Store::list(&store, &prefix).await.unwrap();
            items.into_iter().map(|kv| kv.key).collect()
        })
    })
    .unwrap()
}

/// Does the cluster IPAM hold `ip` (of any network)?
fn ipam_holds(lab: &Lab, ip: &str) -> bool {
    store_keys(lab, "/trellis/v1/ipam/addrs/").iter().any(|k| k.ends_with(&format!("/{ip}")))
}

/// Every host answers `port` (TCP) and `uport` (UDP) from the outside
/// client and from itself (its own address and 127.0.0.1), the
/// connections spread over both backends; host `i`'s backends see
/// `seen[i]`.
fn answers_everywhere(lab: &Lab, port: u16, uport: u16, seen: &[String]) {
    let outside = lab.underlay.path();
    let client = Client::new(&outside).unwrap();
    for (i, host) in lab.hosts.iter().enumerate() {
        assert!(
            wait_for(Duration::from_secs(20), || client.request(at(i, port)).is_ok()),
            "host {i} never answered on {port}; its status:\n{}\nlog:\n{}",
            host.ctl(&["status"]).unwrap(),
            host.log()
        );
        let got = spread(&client, at(i, port), 40, &seen[i]);
        assert_eq!(got.len(), 2, "host {i}: 40 connections all went to {got:?}");
        let mut answer = None;
        assert!(
            wait_for(Duration::from_secs(10), || {
                answer = udp_request(&outside, at(i, uport));
                answer.is_some()
            }),
            "no UDP answer from host {i}"
        );
        let a = answer.unwrap();
        assert!(a.starts_with("web") && a.ends_with(&seen[i]), "host {i} answered {a:?} over UDP");
        // The host itself, on its own address and on 127.0.0.1.
        let me = host.ns.path();
        let local = Client::new(&me).unwrap();
        for to in [at(i, port), format!("127.0.0.1:{port}").parse().unwrap()] {
            assert!(wait_for(Duration::from_secs(10), || local.request(to).is_ok()), "host {i}: {to} from itself");
            let got = spread(&local, to, 20, &seen[i]);
            assert_eq!(got.len(), 2, "host {i}: {to} from itself went to {got:?} only");
        }
        let lo: SocketAddr = format!("127.0.0.1:{uport}").parse().unwrap();
        let mut answer = None;
        assert!(
            wait_for(Duration::from_secs(10), || {
                answer = udp_request(&me, lo);
                answer.is_some()
            }),
            "host {i}: no UDP answer on {lo}"
        );
        assert!(answer.unwrap().starts_with("web"));
    }
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn without_ebpf_a_published_service_answers_on_every_host_through_nftables() {
    require_root();
    let (lab, _servers) = lab_with_backends(no_ebpf, "10.75.0.0/24");
    let h = &lab.hosts;
    h[2].ctl(&[
        "service",
        "create",
        "web",
        "--network",
        "edge",
        "--port",
        "80:8080",
        "--port",
        "80/udp:8080",
        "--publish",
        "30680:80",
        "--publish",
        "30681:80/udp",
    ])
    .unwrap();
    // Each host says how it publishes, and has its own address on edge.
    let addrs: Vec<String> = h.iter().map(|host| mesh_addr(host, "edge")).collect();
    assert_eq!(addrs.iter().collect::<BTreeSet<_>>().len(), 3, "one address each: {addrs:?}");
    for (i, host) in h.iter().enumerate() {
        let s = host.ctl_json(&["status"]).unwrap();
        assert_eq!(s["mesh"]["datapath"], "nftables", "host {i}: {s}");
        let text = host.ctl(&["status"]).unwrap();
        assert!(text.contains("mesh        nftables (SNAT: backends see the host's address"), "host {i}: {text}");
        assert!(ipam_holds(&lab, &addrs[i]), "host {i}'s mesh address {} is the IPAM's", addrs[i]);
    }
    // Outside, the host itself, 127.0.0.1; TCP and UDP; host 2 runs no
    // backend. The backends see the host that took the connection.
    answers_everywhere(&lab, 30680, 30681, &addrs);
    let outside = lab.underlay.path();
    let client = Client::new(&outside).unwrap();

    // Taken away by hand (the mesh veth, the bridge table): put back.
    let veth = h[2].ns.links().unwrap().into_iter().find(|l| l.starts_with("trn-")).expect("host 2's mesh veth");
    h[2].ns.ip(&["link", "del", &veth]).unwrap();
    assert!(h[2].ns.cmd("nft").args(["delete", "table", "bridge", "trellis"]).status().unwrap().success());
    assert!(
        wait_for(Duration::from_secs(10), || h[2].ns.links().unwrap().contains(&veth)
            && nft_table(&h[2], "bridge").is_some()),
        "host 2 did not repair its mesh veth and bridge table"
    );
    assert_eq!(spread(&client, at(2, 30680), 20, &addrs[2]).len(), 2, "host 2 after the repair");

    // Host mode: only the hosts of a backend publish.
    h[0].ctl(&[
        "service",
        "create",
        "hweb",
        "--network",
        "edge",
        "--selector",
        "trellis.service=web",
        "--port",
        "80:8080",
        "--publish",
        "30682:80",
        "--publish-mode",
        "host",
    ])
    .unwrap();
    for i in 0..2 {
        assert!(wait_for(Duration::from_secs(20), || client.request(at(i, 30682)).is_ok()), "host {i} (a backend's)");
    }
    assert!(refused(&client, at(2, 30682)), "host 2 runs no backend: it must not publish");

    // A service with no backend: refused at once on every host.
    h[0].ctl(&["network", "create", "other", "--subnet", "10.76.0.0/24"]).unwrap();
    h[1].ctl(&["service", "create", "api", "--network", "other", "--publish", "30683:80", "--publish", "30684:80/udp"])
        .unwrap();
    for i in 0..3 {
        assert!(wait_for(Duration::from_secs(10), || refused(&client, at(i, 30683))), "host {i}: 30683 not refused");
        assert!(udp_refused(&outside, at(i, 30684)), "host {i}: UDP 30684 with no backend is not refused");
    }

    // Removed live: refused everywhere, no element left.
    h[1].ctl(&["service", "update", "web", "--publish-rm", "30680"]).unwrap();
    for (i, host) in h.iter().enumerate() {
        assert!(wait_for(Duration::from_secs(10), || refused(&client, at(i, 30680))), "30680 still open on host {i}");
        let table = nft_table(host, "inet").unwrap();
        assert!(!table.contains("30680") && table.contains("30681"), "host {i}: {table}");
    }
    // The last published service of edge gone: every host's address on it
    // is released (the veth first, then the record and the address).
    h[1].ctl(&["service", "rm", "web"]).unwrap();
    h[1].ctl(&["service", "rm", "hweb"]).unwrap();
    for (i, host) in h.iter().enumerate() {
        assert!(
            wait_for(Duration::from_secs(10), || {
                let s = host.ctl_json(&["status"]).unwrap();
                !s["mesh"]["addresses"].as_array().unwrap().iter().any(|a| a["network"] == "edge")
            }),
            "host {i} keeps its address on edge"
        );
        assert!(!ipam_holds(&lab, &addrs[i]), "host {i}'s address {} is still the IPAM's", addrs[i]);
        let veths: Vec<String> = host.ns.links().unwrap().into_iter().filter(|l| l.starts_with("trm-")).collect();
        assert_eq!(veths.len(), 1, "host {i}: only other's mesh veth is left: {veths:?}");
        let table = nft_table(host, "inet").unwrap();
        assert!(!table.contains("30681") && !table.contains("\"mesh_web"), "host {i}: {table}");
    }
    // Then the rest: no mesh rule, no bridge table, no mesh veth.
    h[1].ctl(&["service", "rm", "api"]).unwrap();
    for (i, host) in h.iter().enumerate() {
        assert!(
            wait_for(Duration::from_secs(10), || nft_table(host, "bridge").is_none()
                && !host.ns.links().unwrap().iter().any(|l| l.starts_with("trm-") || l.starts_with("trn-"))),
            "host {i}: mesh leftovers: {:?}",
            host.ns.links().unwrap()
        );
        let table = nft_table(host, "inet").unwrap();
        assert!(!table.contains("mesh_"), "host {i}: {table}");
    }
    assert!(store_keys(&lab, "/trellis/v1/mesh-addrs/").is_empty(), "mesh address records left");
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn a_mixed_cluster_publishes_on_every_host_through_the_datapath_each_can() {
    require_root();
    // Host 0 and 2 with eBPF, host 1 without; backends on 0 and 1.
    let (lab, mut servers) = lab_with_backends(mixed, "10.77.0.0/24");
    let h = &lab.hosts;
    // web has a backend on host 1, whose replies no program steers: every
    // host publishes it through nftables.
    h[0].ctl(&[
        "service",
        "create",
        "web",
        "--network",
        "edge",
        "--port",
        "80:8080",
        "--port",
        "80/udp:8080",
        "--publish",
        "30780:80",
        "--publish",
        "30781:80/udp",
    ])
    .unwrap();
    let addrs: Vec<String> = h.iter().map(|host| mesh_addr(host, "edge")).collect();
    answers_everywhere(&lab, 30780, 30781, &addrs);
    let s0 = h[0].ctl_json(&["status"]).unwrap();
    assert_eq!(s0["mesh"]["datapath"], "ebpf", "{s0}");
    assert!(
        s0["mesh"]["nftables_ports"].as_array().unwrap().iter().any(|p| p.as_str().unwrap().starts_with("30780/tcp")),
        "host 0 says web goes through nftables: {s0}"
    );
    let text = h[0].ctl(&["status"]).unwrap();
    assert!(
        text.contains("through nftables instead (SNAT: a backend runs on a host without eBPF): 30780/tcp"),
        "{text}"
    );
    assert_eq!(h[1].ctl_json(&["status"]).unwrap()["mesh"]["datapath"], "nftables");

    // api's backends all run on eBPF hosts (host 0): hosts 0 and 2 keep
    // the client's address, host 1 (no eBPF) SNATs to its own.
    let ep = h[0].attach("edge", "api0", &["--label", "trellis.service=api"]).unwrap();
    servers.push(Backend::start(&netns_of(&ep), 8080, "api0").unwrap());
    h[0].ctl(&["service", "create", "api", "--network", "edge", "--port", "80:8080", "--publish", "30782:80"]).unwrap();
    let client = Client::new(&lab.underlay.path()).unwrap();
    for (i, seen) in [(0, UNDERLAY_GATEWAY.to_string()), (1, addrs[1].clone()), (2, UNDERLAY_GATEWAY.to_string())] {
        assert!(wait_for(Duration::from_secs(20), || client.request(at(i, 30782)).is_ok()), "host {i}: api");
        let got = spread(&client, at(i, 30782), 10, &seen);
        assert_eq!(got.keys().collect::<Vec<_>>(), ["api0"], "host {i}");
    }
    let s2 = h[2].ctl_json(&["status"]).unwrap();
    assert!(
        !s2["mesh"]["nftables_ports"].as_array().unwrap().iter().any(|p| p.as_str().unwrap().starts_with("30782/")),
        "{s2}"
    );
}

/// Hairpin in a lab whose agents get `flags`: containers of another
/// network, on host 2 (no backend there) and host 0 (a backend there),
/// reach `web`'s mesh port through their own host's address and another
/// host's. What the backends see: the own host's mesh address (hairpin is
/// SNATed there); through another host, that host's view of the
/// container's host (its underlay address, masqueraded on the way out),
/// kept by the eBPF mesh or SNATed to the other host's mesh address.
fn hairpin(flags: impl Fn(usize) -> Vec<String>, subnet: &str, port: u16, ebpf: bool) {
    require_root();
    let (lab, _servers) = lab_with_backends(flags, subnet);
    let h = &lab.hosts;
    h[0].ctl(&["network", "create", "clients", "--attachable"]).unwrap();
    h[0].ctl(&[
        "service",
        "create",
        "web",
        "--network",
        "edge",
        "--port",
        "80:8080",
        "--publish",
        &format!("{port}:80"),
    ])
    .unwrap();
    let addrs: Vec<String> = h.iter().map(|host| mesh_addr(host, "edge")).collect();
    for from in [2usize, 0] {
        let c = h[from].attach("clients", &format!("c{from}"), &[]).unwrap();
        let ns = netns_of(&c);
        let ask = |to: SocketAddr| -> Result<String, String> {
            let mut conn = trellis_integration::sockets::connect(&ns, to, Duration::from_secs(2))
                .map_err(|e| format!("connect {to}: {e}"))?;
            read_line(&mut conn).map_err(|e| format!("read {to}: {e}"))
        };
        for (to_host, seen) in
            [(from, addrs[from].clone()), (1, if ebpf { underlay_ip(from + 1) } else { addrs[1].clone() })]
        {
            let to = at(to_host, port);
            assert!(
                wait_for(Duration::from_secs(20), || ask(to).is_ok()),
                "container on host {from} never reached {to}: {:?}\nlog of host {from}:\n{}",
                ask(to),
                h[from].log()
            );
            let mut names = BTreeSet::new();
            for _ in 0..30 {
                let line = ask(to).unwrap();
                let (name, saw) = line.split_once(' ').unwrap();
                assert_eq!(saw, seen, "container on host {from} to {to}: the backend saw {saw}");
                names.insert(name.to_string());
            }
            assert_eq!(names.len(), 2, "container on host {from} to {to}: only {names:?}");
        }
    }
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn containers_reach_a_mesh_port_through_their_own_host_and_another_with_ebpf() {
    hairpin(|_| Vec::new(), "10.78.0.0/24", 30880, true);
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn containers_reach_a_mesh_port_through_their_own_host_and_another_without_ebpf() {
    hairpin(no_ebpf, "10.79.0.0/24", 30980, false);
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn an_agent_killed_under_traffic_through_nftables_fails_no_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    require_root();
    let (mut lab, _servers) = lab_with_backends(no_ebpf, "10.80.0.0/24");
    lab.hosts[0]
        .ctl(&["service", "create", "web", "--network", "edge", "--port", "80:8080", "--publish", "31080:80"])
        .unwrap();
    let addr = mesh_addr(&lab.hosts[2], "edge");
    let veth_index = |h: &Host| {
        h.ns.ip(&["-o", "link", "show"])
            .unwrap()
            .lines()
            .find(|l| l.contains(": trm-"))
            .map(|l| l.split(':').next().unwrap().to_string())
    };
    let client = Arc::new(Client::new(&lab.underlay.path()).unwrap());
    // Through host 2: every connection crosses to another host.
    let to = at(2, 31080);
    assert!(wait_for(Duration::from_secs(20), || client.request(to).is_ok()), "host 2 never answered");
    let before = veth_index(&lab.hosts[2]);
    assert!(before.is_some(), "host 2 has a mesh veth");
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let worker = {
        let (client, stop, ok, failed) = (client.clone(), stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match client.request(to) {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.push(e.to_string());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            errors
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // The host that takes the connections, and a backend's host: the
    // rules, the mesh veth and the connections are the kernel's.
    lab.hosts[2].kill9();
    lab.hosts[1].kill9();
    std::thread::sleep(Duration::from_millis(700));
    lab.hosts[2].start().unwrap();
    lab.hosts[1].start().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    let errors = worker.join().unwrap();
    assert!(ok.load(Ordering::Relaxed) > 50, "only {} requests ran", ok.load(Ordering::Relaxed));
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed across the kill: {errors:?}");
    assert_eq!(spread(&client, to, 30, &addr).len(), 2, "both backends still reached after the restarts");
    assert_eq!(veth_index(&lab.hosts[2]), before, "the restarted agent adopted its mesh veth");
    let log = lab.hosts[2].log();
    // (The log is coloured: the escapes go first.)
    let mut parts = log.split('\x1b');
    let mut plain = parts.next().unwrap_or_default().to_string();
    plain.extend(parts.map(|part| part.split_once('m').map_or(part, |(_, rest)| rest)));
    let last = plain.lines().rfind(|l| l.contains("initial reconcile")).unwrap_or_default();
    assert!(last.contains("actions=0"), "the restarted agent changed what it found: {last}");
}
