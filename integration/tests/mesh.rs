//! The routing mesh on real agents: a service published on a port answers
//! on that port on every host of a three-host lab, from a client outside
//! the cluster (the underlay's own namespace, which is no Trellis host),
//! whether or not the host runs a backend; each backend sees the client's
//! own address; TCP and UDP; ports added and removed live; a taken port
//! refused with its holder named; a service with no backend refused at
//! once; `--publish-mode host`; an agent killed under published traffic;
//! nothing left in the datapath after removal. Root tests
//! (`--run-ignored all`).

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use trellis_integration::sockets::{Backend, Client, connect_from, in_ns};
use trellis_integration::{Host, Lab, UNDERLAY_GATEWAY, netns_of, require_root, underlay_ip, wait_for};

fn at(host: usize, port: u16) -> SocketAddr {
    format!("{}:{port}", underlay_ip(host + 1)).parse().unwrap()
}

/// `n` requests to `to`: answers by backend, each checked to have seen the
/// outside client's own address.
fn spread(client: &Client, to: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let line = client.request(to).unwrap_or_else(|e| panic!("request {i} to {to}: {e}"));
        let (name, saw) = line.split_once(' ').unwrap_or_else(|| panic!("answer {line:?}"));
        assert_eq!(saw, UNDERLAY_GATEWAY, "the backend must see the outside client's address ({to})");
        *seen.entry(name.to_string()).or_default() += 1;
    }
    seen
}

/// Is `to` refused (a reset, not a timeout)?
fn refused(client: &Client, to: SocketAddr) -> bool {
    matches!(client.connect(to), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// One UDP datagram to `to` from the outside namespace: the answer.
fn udp_request(outside: &std::path::Path, to: SocketAddr) -> Option<String> {
    let s: UdpSocket = Client::udp(outside).ok()?;
    s.send_to(b"hi", to).ok()?;
    let mut buf = [0u8; 256];
    let (n, from) = s.recv_from(&mut buf).ok()?;
    assert_eq!(from, to, "the answer must come from the address asked");
    Some(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// The entries of a pinned map of `host`'s datapath, as bpftool prints them.
fn map_entries(host: &Host, map: &str) -> usize {
    let path = host.run_dir().join("bpf/maps").join(map);
    let out = host.ns.cmd("bpftool").args(["-j", "map", "dump", "pinned"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "bpftool on {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap().as_array().map_or(0, |a| a.len())
}

/// The address of host 0's backend `web0`.
fn web0_ip(h: &Host) -> String {
    let eps = h.ctl_json(&["endpoint", "ls"]).unwrap();
    let e = eps.as_array().unwrap().iter().find(|e| e["name"] == "web0").expect("web0");
    e["address"].as_str().unwrap().split('/').next().unwrap().to_string()
}

/// A lab of three hosts with network `edge` and a backend of `web` (TCP and
/// UDP on 8080) on hosts 0 and 1; host 2 runs none.
fn lab_with_backends() -> (Lab, Vec<Backend>) {
    let lab = Lab::new(3, 3000).unwrap();
    let h = &lab.hosts;
    h[0].ctl(&["network", "create", "edge", "--subnet", "10.73.0.0/24"]).unwrap();
    let mut servers = Vec::new();
    for (i, host) in h.iter().enumerate().take(2) {
        let ep = host.attach("edge", &format!("web{i}"), &["--label", "trellis.service=web"]).unwrap();
        servers.push(Backend::start(&netns_of(&ep), 8080, &format!("web{i}")).unwrap());
    }
    (lab, servers)
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn a_published_service_answers_on_every_host_keeping_the_client_s_address() {
    require_root();
    let (lab, _servers) = lab_with_backends();
    let h = &lab.hosts;
    let svc = h[2]
        .ctl_json(&[
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
            "30080:80",
            "--publish",
            "30081:80/udp",
        ])
        .unwrap();
    assert_eq!(svc["publish"][0]["host_port"], 30080, "{svc}");
    assert_eq!(svc["publish"][1]["protocol"], "udp", "{svc}");
    let outside = lab.underlay.path();
    let client = Client::new(&outside).unwrap();
    // Every host answers, the one without a backend too, and each
    // connection lands on a backend of either host.
    for (i, host) in h.iter().enumerate() {
        assert!(
            wait_for(Duration::from_secs(20), || client.request(at(i, 30080)).is_ok()),
            "host {i} never answered on 30080; its log:\n{}",
            host.log()
        );
        let seen = spread(&client, at(i, 30080), 40);
        assert_eq!(seen.len(), 2, "host {i}: 40 connections all went to {seen:?}");
    }
    // UDP, answered from the address asked.
    for i in 0..3 {
        let mut answer = None;
        assert!(
            wait_for(Duration::from_secs(10), || {
                answer = udp_request(&outside, at(i, 30081));
                answer.is_some()
            }),
            "no UDP answer from host {i}"
        );
        let a = answer.unwrap();
        assert!(a.starts_with("web") && a.ends_with(UNDERLAY_GATEWAY), "host {i} answered {a:?}");
    }
    // A long connection keeps its backend and its address throughout.
    let mut conn = client.connect(at(2, 30080)).unwrap();
    let first = trellis_integration::sockets::read_line(&mut conn).unwrap();
    for _ in 0..5 {
        use std::io::Write;
        conn.write_all(b"again\n").unwrap();
        assert_eq!(trellis_integration::sockets::read_line(&mut conn).unwrap(), first);
    }

    // The client's same address and port, first through the mesh, then
    // straight to the backend (the client routes the subnet through host
    // 0): the straight connection owns them, whatever the mesh remembers.
    lab.underlay.ip(&["route", "add", "10.73.0.0/24", "via", &underlay_ip(1)]).unwrap();
    let web0: SocketAddr = format!("{}:8080", web0_ip(&h[0])).parse().unwrap();
    let mut tried = 0;
    // Below the ephemeral range: no socket of the namespace (etcd's own
    // loopback clients live there) can hold one already.
    for sport in 20001u16..20100 {
        let mut c = connect_from(&outside, sport, at(0, 30080), Duration::from_secs(2)).unwrap();
        let line = trellis_integration::sockets::read_line(&mut c).unwrap();
        // Closed with a reset: no TIME_WAIT holds the client's port.
        socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
        drop(c);
        if !line.starts_with("web0") {
            continue; // (a connection keeps its backend: another port)
        }
        // The same 4-tuple again, straight.
        let mut c = connect_from(&outside, sport, web0, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("straight from port {sport} after the mesh: {e}"));
        assert_eq!(trellis_integration::sockets::read_line(&mut c).unwrap(), format!("web0 {UNDERLAY_GATEWAY}"));
        socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
        tried += 1;
        if tried == 3 {
            break;
        }
    }
    assert_eq!(tried, 3, "too few connections through the mesh landed on web0");

    // Live changes: a port added answers everywhere, one removed nowhere.
    let up = h[0].ctl(&["service", "update", "web", "--publish-add", "30090:80"]).unwrap();
    assert!(up.contains("30090:80/tcp"), "{up}");
    for i in 0..3 {
        assert!(wait_for(Duration::from_secs(10), || client.request(at(i, 30090)).is_ok()), "30090 on host {i}");
    }
    h[0].ctl(&["service", "update", "web", "--publish-rm", "30080"]).unwrap();
    for i in 0..3 {
        assert!(wait_for(Duration::from_secs(10), || refused(&client, at(i, 30080))), "30080 still open on host {i}");
    }
    let e = h[1].ctl_err(&["service", "update", "web", "--publish-rm", "30080"]);
    assert!(e.contains("not published on 30080/tcp") && e.contains("30090:80/tcp"), "{e}");

    // Taken ports are refused, naming who has them: another service, a
    // process of the host, the same request twice.
    h[0].ctl(&["network", "create", "other", "--subnet", "10.74.0.0/24"]).unwrap();
    let e = h[1].ctl_err(&["service", "create", "api", "--network", "other", "--publish", "30090:80"]);
    assert!(e.contains("30090") && e.contains("\"web\""), "{e}");
    let listener = in_ns(&h[1].ns.path(), || std::net::TcpListener::bind("0.0.0.0:30100")).unwrap().unwrap();
    let e = h[1].ctl_err(&["service", "update", "web", "--publish-add", "30100:80"]);
    assert!(e.contains("30100") && e.contains("pid"), "the holder is named: {e}");
    drop(listener);
    // A port a process of another host holds: published from host 0 (it
    // holds nothing), left to the process on host 1, and said so there.
    let listener = in_ns(&h[1].ns.path(), || std::net::TcpListener::bind("0.0.0.0:30110")).unwrap().unwrap();
    h[0].ctl(&["service", "update", "web", "--publish-add", "30110:80"]).unwrap();
    for i in [0, 2] {
        assert!(wait_for(Duration::from_secs(10), || client.request(at(i, 30110)).is_ok()), "30110 on host {i}");
    }
    // (Host 1's own pass may come after the others answer.)
    let held = || {
        let status = h[1].ctl_json(&["status"]).unwrap();
        status["mesh_ports_held"]
            .as_array()
            .is_some_and(|a| a.iter().any(|m| m.as_str().unwrap().contains("30110/tcp")))
    };
    assert!(
        wait_for(Duration::from_secs(10), held),
        "host 1 must say why it does not publish 30110: {}",
        h[1].ctl_json(&["status"]).unwrap()
    );
    let _c = client.connect(at(1, 30110)).unwrap();
    listener.set_nonblocking(false).unwrap();
    let (_, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip().to_string(), UNDERLAY_GATEWAY, "host 1's own process got the connection");
    drop(listener);
    h[0].ctl(&["service", "update", "web", "--publish-rm", "30110"]).unwrap();
    let e = h[1].ctl_err(&[
        "service",
        "create",
        "api",
        "--network",
        "other",
        "--publish",
        "30101:80",
        "--publish",
        "30101:81",
    ]);
    assert!(e.contains("30101") && e.contains("given twice"), "{e}");
    assert!(h[1].ctl_err(&["service", "inspect", "api"]).contains("not found"), "nothing half-created");
    // A service with no backend: refused at once on every host (TCP: a
    // reset; UDP: ICMP port unreachable).
    let picked = h[1]
        .ctl_json(&["service", "create", "api", "--network", "other", "--publish", "80", "--publish", "80/udp"])
        .unwrap();
    let port = picked["publish"][0]["host_port"].as_u64().unwrap() as u16;
    let uport = picked["publish"][1]["host_port"].as_u64().unwrap() as u16;
    assert!((30000..=32767).contains(&port) && (30000..=32767).contains(&uport), "picked {port}, {uport}");
    for i in 0..3 {
        assert!(wait_for(Duration::from_secs(10), || refused(&client, at(i, port))), "host {i}: {port} not refused");
        let to = at(i, uport);
        let s = in_ns(&outside, || UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.connect(to).unwrap();
        let mut buf = [0u8; 64];
        let got = s.send(b"hi").and_then(|_| s.recv(&mut buf));
        assert!(
            matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
            "host {i}: UDP {to} with no backend gave {got:?}, not port unreachable"
        );
    }

    // Removed: nothing answers, nothing is left in any host's datapath,
    // and the ports can be published again.
    h[0].ctl(&["service", "rm", "web"]).unwrap();
    h[0].ctl(&["service", "rm", "api"]).unwrap();
    for (i, host) in h.iter().enumerate() {
        assert!(wait_for(Duration::from_secs(10), || refused(&client, at(i, 30090))), "30090 still open on host {i}");
        assert!(wait_for(Duration::from_secs(10), || map_entries(host, "published") == 0), "host {i}: published");
        assert_eq!(map_entries(host, "mesh_addrs"), 0, "host {i}: mesh addresses left");
    }
    h[2].ctl(&["service", "create", "web2", "--network", "edge", "--publish", "30090:80"]).unwrap();
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn host_mode_publishes_only_on_the_hosts_of_the_backends() {
    require_root();
    let (lab, _servers) = lab_with_backends();
    let h = &lab.hosts;
    h[0].ctl(&[
        "service",
        "create",
        "web",
        "--network",
        "edge",
        "--port",
        "80:8080",
        "--publish",
        "30380:80",
        "--publish-mode",
        "host",
    ])
    .unwrap();
    let client = Client::new(&lab.underlay.path()).unwrap();
    for i in 0..2 {
        assert!(wait_for(Duration::from_secs(20), || client.request(at(i, 30380)).is_ok()), "host {i} (a backend's)");
        assert!(spread(&client, at(i, 30380), 5).len() <= 2);
    }
    assert!(refused(&client, at(2, 30380)), "host 2 runs no backend: it must not publish");
    let out = h[0].ctl(&["service", "ls"]).unwrap();
    assert!(out.contains("30380:80/tcp(host)"), "{out}");
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn an_agent_killed_under_published_traffic_fails_no_request() {
    require_root();
    let (mut lab, _servers) = lab_with_backends();
    lab.hosts[0]
        .ctl(&["service", "create", "web", "--network", "edge", "--port", "80:8080", "--publish", "30480:80"])
        .unwrap();
    let client = Arc::new(Client::new(&lab.underlay.path()).unwrap());
    // Through host 2: every connection crosses the mesh to another host.
    let to = at(2, 30480);
    assert!(wait_for(Duration::from_secs(20), || client.request(to).is_ok()), "host 2 never answered");
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
    // The host that takes the connections, and a backend's host.
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
    assert_eq!(spread(&client, to, 30).len(), 2, "both backends still reached after the restarts");
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn a_host_reaches_the_mesh_on_its_own_addresses_and_127_0_0_1() {
    // (Its replies come back into the loopback from a backend's packet:
    // "other host" frames, martian sources and 127.0.0.1 destinations to
    // the kernel unless the datapath and the loopback's settings see to
    // it; each was a failure of this test first.)
    require_root();
    let (lab, _servers) = lab_with_backends();
    let h = &lab.hosts;
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
        "30580:80",
        "--publish",
        "30581:80/udp",
    ])
    .unwrap();
    // Host 2 runs no backend: its own clients cross the mesh too.
    let me = h[2].ns.path();
    let local = Client::new(&me).unwrap();
    let own: SocketAddr = at(2, 30580);
    let lo: SocketAddr = "127.0.0.1:30580".parse().unwrap();
    for to in [own, lo] {
        assert!(
            wait_for(Duration::from_secs(20), || local.request(to).is_ok()),
            "{to} from the host never answered; its log:\n{}",
            h[2].log()
        );
        let mut names = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let line = local.request(to).unwrap();
            let (name, saw) = line.split_once(' ').unwrap();
            // The host's own address (127.0.0.1 is NATed to it: a backend
            // elsewhere cannot answer loopback).
            assert_eq!(saw, underlay_ip(3), "{to}: the backend saw {saw}");
            names.insert(name.to_string());
        }
        assert_eq!(names.len(), 2, "{to}: connections to both backends");
    }
    // UDP to 127.0.0.1, as a log shipper to udp://127.0.0.1:PORT.
    let mut answer = None;
    assert!(
        wait_for(Duration::from_secs(10), || {
            answer = udp_request(&me, "127.0.0.1:30581".parse().unwrap());
            answer.is_some()
        }),
        "no UDP answer on 127.0.0.1:30581"
    );
    assert!(answer.unwrap().starts_with("web"));
}
