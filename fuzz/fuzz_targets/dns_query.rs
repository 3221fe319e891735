//! The DNS server's UDP query handler: any datagram a client sends gets a
//! well-formed reply to its id, a forward, or nothing — never a panic.
#![no_main]

use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use trellis_dns::{Core, Endpoint, Network, Service, Upstreams, Zone};

fn core() -> &'static std::sync::Arc<Core> {
    static CORE: OnceLock<std::sync::Arc<Core>> = OnceLock::new();
    CORE.get_or_init(|| {
        let core = Core::new(&Upstreams { servers: vec![], timeout: Duration::from_millis(10) });
        core.set_zone(Zone::build_with_services(
            // Dual stack: AAAA and ip6.arpa are answered too.
            &[
                Network {
                    id: "n1".into(),
                    name: "app".into(),
                    subnet: "10.1.0.0/24".parse().unwrap(),
                    subnet6: Some("fd00:1::/64".parse().unwrap()),
                },
                Network {
                    // IPv6-only: its one subnet IPv6.
                    id: "n2".into(),
                    name: "six".into(),
                    subnet: "fd00:2::/64".parse().unwrap(),
                    subnet6: Some("fd00:2::/64".parse().unwrap()),
                },
            ],
            &[
                Endpoint {
                    id: "web".into(),
                    name: "web".into(),
                    aliases: vec!["www".into()],
                    network_id: "n1".into(),
                    ip: "10.1.0.2".parse().unwrap(),
                    ip6: Some("fd00:1::2".parse().unwrap()),
                    sandbox: "s".into(),
                    service: Some("svc".into()),
                },
                Endpoint {
                    id: "db".into(),
                    name: "db".into(),
                    aliases: vec![],
                    network_id: "n2".into(),
                    ip: "fd00:2::2".parse().unwrap(),
                    ip6: Some("fd00:2::2".parse().unwrap()),
                    sandbox: "s2".into(),
                    service: Some("svc6".into()),
                },
            ],
            &[Service {
                name: "api".into(),
                network_id: "n1".into(),
                vip: Some("10.1.0.254".parse().unwrap()),
                backends: vec!["10.1.0.2".parse().unwrap()],
                vip6: Some("fd00:1::ffff:ffff:ffff:ff7f".parse().unwrap()),
                backends6: vec!["fd00:1::2".parse().unwrap()],
            }],
        ));
        core
    })
}

fuzz_target!(|data: &[u8]| {
    let src: IpAddr = "10.1.0.2".parse().unwrap();
    if let trellis_dns::server::UdpStep::Reply(bytes) = core().udp_step(data, src) {
        assert!(bytes.len() >= 12, "a reply has a header");
        if data.len() >= 2 {
            assert_eq!(&bytes[..2], &data[..2], "the reply carries the query's id");
        }
    }
});
