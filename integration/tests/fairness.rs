//! Tenants cannot starve each other on a shared host: a neighbour opening
//! flows as fast as it can fills only its own connection tables, and a
//! client flooding the DNS server is held to its share while others
//! resolve. Real agents, real endpoints, real floods. Root tests
//! (`--run-ignored all`).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use trellis_integration::sockets::in_ns;
use trellis_integration::{Host, Lab, ip_of, netns_of, require_root, wait_for};

/// Sum of metric `name` over the series of a host's /metrics whose labels
/// contain every one of `labels`.
fn metric(h: &Host, name: &str, labels: &[&str]) -> u64 {
    let out = h.ns.cmd("curl").args(["-s", "http://127.0.0.1:9473/metrics"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Sends one UDP datagram to every port of `vip` from each of `sockets`
/// sockets: `sockets × 65,535` flows, as fast as one thread can.
fn udp_flood(netns: &std::path::Path, vip: std::net::Ipv4Addr, sockets: usize) -> (usize, Duration) {
    in_ns(netns, move || {
        let started = Instant::now();
        let mut sent = 0;
        let socks: Vec<UdpSocket> = (0..sockets).map(|_| UdpSocket::bind("0.0.0.0:0").unwrap()).collect();
        for port in 1..=u16::MAX {
            for s in &socks {
                // A refused datagram (a full socket buffer) is one less
                // flow; the count says how many went.
                if s.send_to(b"x", (vip, port)).is_ok() {
                    sent += 1;
                }
            }
        }
        (sent, started.elapsed())
    })
    .unwrap()
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn a_neighbour_flooding_new_flows_leaves_an_idle_connection_through_a_vip_usable_both_ways() {
    require_root();
    let lab = Lab::new(1, 3000).unwrap();
    let h = &lab.hosts[0];
    // Tenant A: the flooder and a service on every port. Tenant B: a
    // client holding one connection to its service, idle.
    h.ctl(&["network", "create", "ta", "--subnet", "10.131.0.0/24"]).unwrap();
    h.ctl(&["network", "create", "tb", "--subnet", "10.132.0.0/24", "--attachable"]).unwrap();
    h.attach("ta", "sink", &["--label", "trellis.service=sink"]).unwrap();
    let sink = h.ctl_json(&["service", "create", "sink", "--network", "ta"]).unwrap();
    let sink_vip: std::net::Ipv4Addr = sink["vip"].as_str().unwrap().parse().unwrap();
    let flooder = h.attach("ta", "flooder", &["--label", "trellis.service=flooder"]).unwrap();
    let server_ep = h.attach("tb", "server", &["--label", "trellis.service=web"]).unwrap();
    let web = h.ctl_json(&["service", "create", "web", "--network", "tb", "--port", "80:8080"]).unwrap();
    let web_vip: SocketAddr = format!("{}:80", web["vip"].as_str().unwrap()).parse().unwrap();
    let victim = h.attach("tb", "victim", &[]).unwrap();

    // The server accepts one connection and then does what it is told:
    // push a line first (the reply direction, unprompted), then echo one.
    let listener = in_ns(&netns_of(&server_ep), || TcpListener::bind("0.0.0.0:8080")).unwrap().unwrap();
    let (push_tx, push_rx) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || -> std::io::Result<String> {
        let (mut conn, peer) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        writeln!(conn, "hello {}", peer.ip())?;
        push_rx.recv().map_err(std::io::Error::other)?;
        writeln!(conn, "pushed")?;
        let mut line = String::new();
        BufReader::new(conn.try_clone()?).read_line(&mut line)?;
        writeln!(conn, "echo {}", line.trim())?;
        Ok(line)
    });
    let vns = netns_of(&victim);
    let mut conn = None;
    assert!(
        wait_for(Duration::from_secs(10), || {
            conn = trellis_integration::sockets::connect(&vns, web_vip, Duration::from_millis(500)).ok();
            conn.is_some()
        }),
        "the victim never reached {web_vip}"
    );
    let conn = conn.unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), format!("hello {}", ip_of(&victim)), "the server sees the victim's own address");

    // The flood: 8 × 65,535 flows to the sink's VIP (twice what the one
    // table every endpoint shared used to hold, 262,144).
    let (sent, took) = udp_flood(&netns_of(&flooder), sink_vip, 8);
    eprintln!("flooder: {sent} new flows in {took:?}");
    assert!(sent > 400_000, "the flood sent {sent} datagrams");
    let refused = metric(h, "trellis_datapath_table_full_total", &["table=\"conntrack\"", "endpoint=\"flooder\""]);
    assert!(refused > 0, "the flooder was held to its quota (65,536) and counted: {refused}");
    assert!(sent as u64 - refused <= 65_536 + 1024, "{sent} sent, {refused} refused: more than its quota got in");
    let victim_full = metric(h, "trellis_datapath_table_full_total", &["endpoint=\"victim\""]);
    assert_eq!(victim_full, 0, "the victim hit no limit of its own");

    // The idle connection, both ways: the server pushes first (its
    // segment must be translated back to the VIP, or the victim's kernel
    // resets it), then the victim sends and reads the echo.
    push_tx.send(()).unwrap();
    line.clear();
    reader.read_line(&mut line).expect("the server's push reaches the victim from the VIP");
    assert_eq!(line.trim(), "pushed");
    writeln!(&conn, "ping").unwrap();
    line.clear();
    reader.read_line(&mut line).expect("the echo comes back");
    assert_eq!(line.trim(), "echo ping");
    assert_eq!(server.join().unwrap().unwrap().trim(), "ping", "the server got the victim's line");
}

/// A DNS query (id `id`, one question, no EDNS) for `name`, type A.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn a_client_flooding_the_dns_server_is_held_to_its_rate_while_another_resolves() {
    require_root();
    let h = Host::new().unwrap();
    h.ctl(&["network", "create", "dq", "--subnet", "10.133.0.0/24", "--attachable"]).unwrap();
    let web = h.attach("dq", "web", &[]).unwrap();
    let flooder = h.attach("dq", "flooder", &[]).unwrap();
    let victim = h.attach("dq", "victim", &[]).unwrap();
    let vns = netns_of(&victim);
    let gw = "10.133.0.1";
    // dig asks with EDNS: the server answers it, not the in-kernel path.
    let resolve = |timeout: &str| {
        let out = trellis_integration::run(&mut trellis_integration::in_netns(
            &vns,
            "dig",
            &[&format!("@{gw}"), "+short", timeout, "+tries=1", "web"],
        ))
        .unwrap_or_default();
        out.trim() == ip_of(&web)
    };
    assert!(wait_for(Duration::from_secs(5), || resolve("+time=1")), "web never resolved");

    // The flood: names nobody has (each one the server's work: parse,
    // look up, NXDOMAIN), from 8 sockets, for 6 s, as fast as one thread
    // sends.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fns = netns_of(&flooder);
    let s = stop.clone();
    let flood = std::thread::spawn(move || {
        in_ns(&fns, move || {
            let socks: Vec<UdpSocket> = (0..8).map(|_| UdpSocket::bind("0.0.0.0:0").unwrap()).collect();
            let mut sent = 0u64;
            let started = Instant::now();
            while !s.load(std::sync::atomic::Ordering::Relaxed) && started.elapsed() < Duration::from_secs(6) {
                for (i, sock) in socks.iter().enumerate() {
                    let q = query(sent as u16, &format!("n{sent}x{i}.nowhere"));
                    if sock.send_to(&q, "10.133.0.1:53").is_ok() {
                        sent += 1;
                    }
                }
            }
            (sent, started.elapsed())
        })
        .unwrap()
    });
    std::thread::sleep(Duration::from_millis(500));
    // Meanwhile the victim resolves, one try each, half a second apiece.
    let mut answered = 0;
    let mut asked = 0;
    let during = Instant::now();
    while during.elapsed() < Duration::from_secs(4) {
        asked += 1;
        if resolve("+time=1") {
            answered += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, took) = flood.join().unwrap();
    let rate = sent as f64 / took.as_secs_f64();
    eprintln!("flooder: {sent} queries in {took:?} ({rate:.0}/s); victim: {answered}/{asked} answered");
    // A flood: many times the client's share (2,000 a second), however
    // busy the machine is.
    assert!(rate > 10_000.0, "the flood was a flood: {rate:.0} queries/s");
    assert_eq!(answered, asked, "every one of the victim's queries was answered within its one try");
    let limited = metric(&h, "trellis_dns_queries_total", &["outcome=\"rate_limited\""]);
    assert!(limited > sent / 2, "the flooder's excess was dropped: {limited} of {sent}");
}
