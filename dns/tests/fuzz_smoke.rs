//! A short fuzzing smoke run of the DNS query handler (stable Rust: a
//! seeded mutator over real queries, no cargo-fuzz): whatever arrives, the
//! handler returns — never panics — and answers only what parses.

use std::net::IpAddr;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use trellis_dns::{Core, Endpoint, Network, Upstreams, Zone};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (name, t, edns) in [
        ("web.", RecordType::A, false),
        ("tasks.svc.app.", RecordType::A, true),
        ("2.0.1.10.in-addr.arpa.", RecordType::PTR, false),
        ("example.com.", RecordType::AAAA, true),
        ("a.b.c.d.e.f.g.", RecordType::ANY, false),
    ] {
        let mut m = Message::new(7, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        if edns {
            m.set_edns(Edns::new());
        }
        out.push(m.to_vec().unwrap());
    }
    out
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(8) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v.truncate(i);
            }
            2 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next() as u8);
            }
            3 if v.len() > 13 => {
                // A compression pointer somewhere, often to itself.
                let i = 12 + rng.below(v.len() - 13);
                let target = if rng.below(2) == 0 { i } else { rng.below(v.len()) };
                v[i] = 0xc0 | ((target >> 8) as u8 & 0x3f);
                v[i + 1] = target as u8;
            }
            4 => v.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
            _ if v.len() > 5 => v[4..6].copy_from_slice(&(rng.next() as u16).to_be_bytes()), // counts
            _ => {}
        }
    }
    v
}

#[test]
fn the_query_handler_survives_mutated_packets() {
    let core = Core::new(&Upstreams { servers: vec![], timeout: Duration::from_millis(10) });
    core.set_zone(Zone::build(
        &[Network { id: "n1".into(), name: "app".into(), subnet: "10.1.0.0/24".parse().unwrap(), subnet6: None }],
        &[Endpoint {
            id: "web".into(),
            name: "web".into(),
            aliases: vec!["www".into()],
            network_id: "n1".into(),
            ip: "10.1.0.2".parse().unwrap(),
            ip6: None,
            sandbox: "s".into(),
            service: Some("svc".into()),
        }],
    ));
    let src: IpAddr = "10.1.0.2".parse().unwrap();
    let seeds = seeds();
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let (mut replies, mut parsed_replies) = (0, 0);
    for i in 0..20_000 {
        let input = mutate(&mut rng, &seeds[i % seeds.len()]);
        match core.udp_step(&input, src) {
            trellis_dns::server::UdpStep::Reply(bytes) => {
                replies += 1;
                // Whatever we send is a well-formed response to that id.
                let m = Message::from_vec(&bytes).expect("our replies parse");
                assert_eq!(m.metadata.message_type, MessageType::Response);
                if input.len() >= 2 {
                    assert_eq!(m.metadata.id, u16::from_be_bytes([input[0], input[1]]));
                }
                parsed_replies += 1;
            }
            trellis_dns::server::UdpStep::Forward(_) | trellis_dns::server::UdpStep::Ignore => {}
        }
    }
    assert!(replies > 1000 && parsed_replies == replies, "{replies} replies");
}
