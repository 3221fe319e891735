//! The server on loopback (no root): answers, truncation with TCP
//! fallback, EDNS, and bad input that must not stop it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_dns::{Core, Endpoint, Listeners, Network, Upstreams, Zone};

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A zone where this test's client (127.0.0.1) is endpoint `client` of
/// network `lo`, with a service `big` of `backends` tasks.
fn zone(backends: u8) -> Zone {
    let mut eps = vec![Endpoint {
        id: "client".into(),
        name: "client".into(),
        aliases: vec![],
        network_id: "n1".into(),
        ip: "127.0.0.1".parse().unwrap(),
        ip6: None,
        sandbox: "s-client".into(),
        service: None,
    }];
    for i in 0..backends {
        eps.push(Endpoint {
            id: format!("b{i}"),
            name: format!("b{i}"),
            aliases: vec![],
            network_id: "n1".into(),
            ip: IpAddr::from([127, 0, 1, i]),
            ip6: None,
            sandbox: format!("s{i}"),
            service: Some("big".into()),
        });
    }
    Zone::build(
        &[Network { id: "n1".into(), name: "lo".into(), subnet: "127.0.0.0/8".parse().unwrap(), subnet6: None }],
        &eps,
    )
}

async fn server(backends: u8) -> (SocketAddr, Listeners) {
    let core = Core::new(&Upstreams { servers: vec![], timeout: Duration::from_secs(1) });
    core.set_zone(zone(backends));
    let port = free_port();
    let mut l = Listeners::new(core, port);
    assert!(l.set(&["127.0.0.1".parse().unwrap()]).is_empty());
    (SocketAddr::from(([127, 0, 0, 1], port)), l)
}

fn query(name: &str, t: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    m.metadata.recursion_desired = true;
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

async fn udp(addr: SocketAddr, packet: &[u8]) -> Option<Message> {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(packet, addr).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(Duration::from_secs(1), s.recv(&mut buf)).await.ok()?.ok()?;
    Message::from_vec(&buf[..n]).ok()
}

async fn tcp(addr: SocketAddr, packet: &[u8]) -> Message {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&(packet.len() as u16).to_be_bytes()).await.unwrap();
    s.write_all(packet).await.unwrap();
    let len = s.read_u16().await.unwrap() as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

fn addrs(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn answers_over_udp_and_tcp() {
    let (addr, _l) = server(2).await;
    let m = udp(addr, &query("b0.", RecordType::A, None)).await.expect("an answer");
    assert_eq!(m.metadata.id, 0x4242);
    assert!(m.metadata.authoritative);
    assert_eq!(addrs(&m), vec!["127.0.1.0"]);
    let m = tcp(addr, &query("tasks.big.lo.", RecordType::A, None)).await;
    assert_eq!(addrs(&m), vec!["127.0.1.0", "127.0.1.1"]);
    let m = udp(addr, &query("nosuch.", RecordType::A, None)).await.unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // Not ours and no upstream configured: refused, not a guess.
    let m = udp(addr, &query("example.com.", RecordType::A, None)).await.unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn large_answers_truncate_over_udp_and_come_whole_over_tcp_or_edns() {
    let (addr, _l) = server(120).await;
    let plain = udp(addr, &query("big.", RecordType::A, None)).await.unwrap();
    assert!(plain.metadata.truncation, "120 A records do not fit 512 bytes: TC set");
    assert!(plain.answers.len() < 120);
    let whole = tcp(addr, &query("big.", RecordType::A, None)).await;
    assert!(!whole.metadata.truncation);
    assert_eq!(whole.answers.len(), 120);
    let edns = udp(addr, &query("big.", RecordType::A, Some(4096))).await.unwrap();
    assert!(!edns.metadata.truncation, "EDNS0 with 4096 bytes holds them");
    assert_eq!(edns.answers.len(), 120);
}

#[tokio::test]
async fn bad_packets_never_stop_the_server() {
    let (addr, _l) = server(1).await;
    let good = query("b0.", RecordType::A, None);
    // A compression pointer pointing at itself (a loop), as the name.
    let mut looped = good[..12].to_vec();
    looped.extend_from_slice(&[0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01]);
    let mut oversized = good.clone();
    oversized.resize(4000, 0xff);
    let mut many_queries = good.clone();
    many_queries[5] = 0xff; // QDCOUNT 255, one present
    let junk: Vec<Vec<u8>> = vec![
        vec![],
        vec![0x00],
        good[..5].to_vec(),
        good[..good.len() - 3].to_vec(),
        looped,
        oversized,
        many_queries,
        vec![0xff; 512],
        // A response, not a query.
        {
            let mut r = good.clone();
            r[2] |= 0x80;
            r
        },
    ];
    for j in &junk {
        let _ = udp(addr, j).await;
    }
    // TCP: a length prefix longer than what follows, then a hang-up.
    if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
        let _ = s.write_all(&[0x10, 0x00, 0x01, 0x02]).await;
    }
    let m = udp(addr, &good).await.expect("still answering");
    assert_eq!(addrs(&m), vec!["127.0.1.0"]);
    let m = tcp(addr, &good).await;
    assert_eq!(addrs(&m), vec!["127.0.1.0"]);
}

/// Threads of this process whose name starts with `prefix`.
fn threads(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with(prefix))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_answered_each_to_its_sender_and_a_removed_address_stops() {
    let (addr, mut l) = server(3).await;
    // A thread names itself once it runs.
    let t0 = std::time::Instant::now();
    while threads("trellis-dns-udp") == 0 && t0.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(threads("trellis-dns-udp"), 1, "one UDP thread for the one address");
    // 40 clients each send 5 queries at once (ids per client and query):
    // the server takes them in batches and must answer each to its sender
    // with its own id.
    let mut tasks = Vec::new();
    for c in 0..40u16 {
        tasks.push(tokio::spawn(async move {
            let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let names = ["b0", "b1", "b2", "client", "nope"];
            for (q, name) in names.iter().enumerate() {
                let mut m = Message::new(c * 16 + q as u16, MessageType::Query, OpCode::Query);
                m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
                s.send_to(&m.to_vec().unwrap(), addr).await.unwrap();
            }
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 4096];
            while seen.len() < names.len() {
                let n = tokio::time::timeout(Duration::from_secs(3), s.recv(&mut buf))
                    .await
                    .expect("every query answered")
                    .unwrap();
                let m = Message::from_vec(&buf[..n]).unwrap();
                let id = m.metadata.id;
                assert_eq!(id / 16, c, "an answer for another client");
                let q = (id % 16) as usize;
                let asked = m.queries[0].name().to_ascii();
                assert!(asked.starts_with(names[q]), "answer {id} is for {asked}, asked {}", names[q]);
                if names[q] == "nope" {
                    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
                } else {
                    assert_eq!(addrs(&m).len(), 1, "{m:?}");
                }
                seen.push(q);
            }
            seen.sort();
            assert_eq!(seen, vec![0, 1, 2, 3, 4]);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // The address removed: its thread ends and nothing answers there.
    assert!(l.set(&[]).is_empty());
    let t0 = std::time::Instant::now();
    while threads("trellis-dns-udp") > 0 {
        assert!(t0.elapsed() < Duration::from_millis(500), "the UDP thread did not stop on removal");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(udp(addr, &query("client", RecordType::A, None)).await.is_none());
    // And back: answered again.
    assert!(l.set(&["127.0.0.1".parse().unwrap()]).is_empty());
    let m = udp(addr, &query("client", RecordType::A, None)).await.expect("answered again");
    assert_eq!(addrs(&m), vec!["127.0.0.1"]);
}
