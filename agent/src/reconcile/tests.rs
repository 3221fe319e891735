//! Tests of the desired state, the diff and the runner, on the fake kernel.

use super::*;
use crate::dataplane::{Action, LinkKind, Observed, Sysctl, Tables};
use crate::dataplane::{FakeDataplane, ObservedLink};
use crate::model::EndpointKind;
use crate::model::{self, EndpointRecord, HostRecord, NetworkRecord, ServiceRecord};
use crate::reconcile::desired::encryption::encryption;
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

fn network(id: &str, subnet: &str, internal: bool) -> NetworkRecord {
    let subnet: IpNet = subnet.parse().unwrap();
    NetworkRecord {
        id: id.into(),
        name: format!("net-{id}"),
        subnet,
        gateway: subnet.hosts().next(),
        vni: 4096,
        mtu: 1450,
        attachable: true,
        internal,
        encrypted: false,
        labels: Default::default(),
        created_unix: 0,
        vxlan_port: None,
        subnet6: None,
        gateway6: None,
    }
}

fn endpoint(id: &str, net: &str, ip: &str, host: &str) -> EndpointRecord {
    EndpointRecord {
        id: id.into(),
        name: id.into(),
        network_id: net.into(),
        network: format!("net-{net}"),
        host: host.into(),
        ip: ip.parse().unwrap(),
        ip6: None,
        mac: "02:00:00:00:00:01".parse().unwrap(),
        netns: format!("/run/netns/{id}").into(),
        ifname: "eth0".into(),
        labels: Default::default(),
        kind: EndpointKind::Adhoc,
        managed_netns: false,
        container_id: String::new(),
        created_unix: 0,
        deleting: false,
        aliases: vec![],
        ports: vec![],
        ready: true,
        drain_until_ms: None,
    }
}

#[test]
fn bridges_keep_a_fixed_mac_derived_from_their_subnet() {
    let me = Identity { vtep_mac: Mac([2, 0, 0, 0, 0, 9]), ..Identity::local("h1") };
    let want = desired(&[network("n1", "10.9.0.0/24", false)], &[], &[], &me);
    let b = &want.bridges[&model::bridge_name("n1")];
    assert_eq!(b.mac, Mac([0x02, 0x42, 10, 9, 0, 0]));
    let acts = diff(&want, &Observed::default());
    assert!(acts.contains(&Action::CreateBridge { name: model::bridge_name("n1"), mtu: b.mtu, mac: b.mac }));
    // A bridge whose MAC followed its ports (or was changed by hand) gets it back.
    let mut obs = Observed::default();
    for a in &acts {
        obs.record(a).unwrap();
    }
    assert!(diff(&want, &obs).is_empty());
    obs.links.get_mut(&model::bridge_name("n1")).unwrap().mac = Some(Mac([0x0e, 1, 2, 3, 4, 5]));
    assert_eq!(diff(&want, &obs), vec![Action::SetMac { link: model::bridge_name("n1"), mac: b.mac }]);
}

#[test]
fn an_engine_moves_docker_containers_ends_which_are_kept_until_then() {
    let me = Identity { vtep_mac: Mac([2, 0, 0, 0, 0, 9]), ..Identity::local("h1") };
    let mut docker = endpoint("d1", "n1", "10.9.0.2", "h1");
    docker.kind = EndpointKind::Docker;
    let adhoc = endpoint("a1", "n1", "10.9.0.3", "h1");
    let want = desired(&[network("n1", "10.9.0.0/24", false)], &[docker.clone(), adhoc], &[], &me);
    let spec = &want.endpoints[&model::host_ifname("d1")];
    assert!(spec.engine_moves, "Docker's endpoints are moved in by the engine");
    assert!(!want.endpoints[&model::host_ifname("a1")].engine_moves);
    // Between Join and the engine's move, the container end sits in the
    // host namespace: it is not a leftover. A stray one is.
    let mut obs = Observed::default();
    for name in [model::peer_ifname("d1"), model::peer_ifname("a1"), model::peer_ifname("x1")] {
        obs.links.insert(name, ObservedLink { kind: LinkKind::Veth, up: true, ..Default::default() });
    }
    let acts = diff(&want, &obs);
    assert!(!acts.contains(&Action::DeleteLink { name: model::peer_ifname("d1") }), "{acts:?}");
    assert!(acts.contains(&Action::DeleteLink { name: model::peer_ifname("a1") }), "{acts:?}");
    assert!(acts.contains(&Action::DeleteLink { name: model::peer_ifname("x1") }), "{acts:?}");
}

struct Fixed(Mutex<(Vec<NetworkRecord>, Vec<EndpointRecord>)>);
#[async_trait::async_trait]
impl DesiredSource for Fixed {
    async fn load(&self) -> Result<Snapshot, String> {
        let (networks, endpoints) = self.0.lock().unwrap().clone();
        Ok(Snapshot { networks: Arc::new(networks), endpoints: endpoints.into(), ..Snapshot::default() })
    }
}

#[test]
fn desired_state_of_a_host() {
    let nets = vec![network("aaaa", "10.1.0.0/24", false), network("bbbb", "10.2.0.0/24", true)];
    let eps = vec![
        endpoint("e1", "aaaa", "10.1.0.2", "h1"),
        endpoint("e2", "bbbb", "10.2.0.2", "h1"),
        endpoint("e3", "aaaa", "10.1.0.3", "h2"),
        endpoint("e4", "gone", "10.9.0.3", "h1"),
    ];
    let d = desired(&nets, &eps, &[], &Identity::local("h1"));
    assert_eq!(d.bridges.len(), 2);
    assert_eq!(d.bridges["trb-aaaa"].addr, Some("10.1.0.1/24".parse().unwrap()));
    let names: Vec<_> = d.endpoints.keys().cloned().collect();
    assert_eq!(names, ["trv-e1", "trv-e2"], "only this host's endpoints of existing networks");
    assert_eq!(d.endpoints["trv-e1"].default_via, Some("10.1.0.1".parse().unwrap()));
    assert_eq!(d.endpoints["trv-e2"].default_via, None, "internal networks get no default route");
    assert_eq!(d.endpoints["trv-e2"].addr, Some("10.2.0.2/24".parse().unwrap()));
}

fn host(id: &str, underlay: &str) -> HostRecord {
    HostRecord {
        id: id.into(),
        hostname: id.into(),
        underlay: underlay.parse().unwrap(),
        vtep_mac: Mac([2, 0, 0, 0, 0xaa, underlay.rsplit('.').next().unwrap().parse::<u8>().unwrap()]),
        vxlan_port: 4789,
        capabilities: Default::default(),
        version: "test".into(),
        started_unix: 0,
        underlay_mtu: 0,
    }
}

#[test]
fn tunnels_reach_every_remote_endpoint_of_local_networks() {
    let nets = vec![network("aaaa", "10.1.0.0/24", false), network("bbbb", "10.2.0.0/24", false)];
    let mut eps = vec![
        endpoint("l1", "aaaa", "10.1.0.2", "h1"),
        endpoint("r1", "aaaa", "10.1.0.3", "h2"),
        endpoint("r2", "aaaa", "10.1.0.4", "h3"),
        endpoint("dead", "aaaa", "10.1.0.5", "h4"),
        endpoint("other", "bbbb", "10.2.0.2", "h2"),
    ];
    eps[1].mac = "02:00:00:00:00:03".parse().unwrap();
    eps[2].mac = "02:00:00:00:00:04".parse().unwrap();
    let hosts = vec![host("h1", "192.0.2.1"), host("h2", "192.0.2.2"), host("h3", "192.0.2.3")];
    let me = Identity { underlay: Some("192.0.2.1".parse().unwrap()), ..Identity::local("h1") };
    let d = desired(&nets, &eps, &hosts, &me);
    assert_eq!(
        d.vxlans.keys().collect::<Vec<_>>(),
        ["trx-aaaa", "trx-probe"],
        "only networks with local endpoints, and the probe tunnel"
    );
    let probe = &d.vxlans["trx-probe"];
    assert_eq!((probe.spec.vni, probe.bridge.as_str(), probe.spec.port), (model::PROBE_VNI, "", 4789));
    let peers: Vec<_> = probe.fdb.iter().map(|(m, ip)| (m.to_string(), ip.to_string())).collect();
    assert_eq!(
        peers,
        [("02:00:00:00:aa:02".to_string(), "192.0.2.2".to_string()), ("02:00:00:00:aa:03".into(), "192.0.2.3".into())],
        "one entry per live peer: its VTEP MAC at its underlay address"
    );
    let mac2 = "02:00:00:00:aa:02".parse::<Mac>().unwrap();
    assert!(probe.neigh.contains(&(IpAddr::V6(mac2.link_local()), mac2)));
    let v = &d.vxlans["trx-aaaa"];
    assert_eq!(v.spec.vni, 4096);
    assert_eq!(v.bridge, "trb-aaaa");
    let fdb: Vec<_> = v.fdb.iter().map(|(m, ip)| (m.to_string(), ip.to_string())).collect();
    assert_eq!(
        fdb,
        [("02:00:00:00:00:03".to_string(), "192.0.2.2".to_string()), ("02:00:00:00:00:04".into(), "192.0.2.3".into())],
        "one entry per remote endpoint of a live host; the dead host's endpoint has none"
    );
    assert_eq!(v.neigh.len(), 2);
    // Without an underlay there are no tunnels at all.
    assert!(desired(&nets, &eps, &hosts, &Identity::local("h1")).vxlans.is_empty());

    // The diff programs the device, then the entries; a host that dies
    // takes its entries with it.
    let acts = diff(&d, &Observed::default());
    assert!(acts.iter().any(|a| matches!(a, Action::CreateVxlan(s) if s.name == "trx-aaaa")));
    assert_eq!(acts.iter().filter(|a| matches!(a, Action::AddFdb { link, .. } if link == "trx-aaaa")).count(), 2);
    assert!(acts.contains(&Action::SetLink { name: "trx-probe".into(), mtu: 1280, master: None }));
    let mut obs = Observed::default();
    for a in &acts {
        obs.record(a).unwrap();
    }
    assert!(diff(&d, &obs).is_empty(), "{:?}", diff(&d, &obs));
    let fewer = desired(&nets, &eps, &hosts[..2], &me);
    let all = diff(&fewer, &obs);
    let mac3 = "02:00:00:00:aa:03".parse::<Mac>().unwrap();
    let dst3: IpAddr = "192.0.2.3".parse().unwrap();
    assert!(all.contains(&Action::DelFdb { link: "trx-probe".into(), mac: mac3, dst: dst3 }), "{all:?}");
    let acts: Vec<Action> = all
        .into_iter()
        .filter(|a| matches!(a, Action::DelFdb { link, .. } | Action::DelNeigh { link, .. } if link == "trx-aaaa"))
        .collect();
    assert_eq!(
        acts,
        vec![
            Action::DelFdb {
                link: "trx-aaaa".into(),
                mac: "02:00:00:00:00:04".parse::<Mac>().unwrap(),
                dst: "192.0.2.3".parse().unwrap()
            },
            Action::DelNeigh {
                link: "trx-aaaa".into(),
                ip: "10.1.0.4".parse().unwrap(),
                mac: "02:00:00:00:00:04".parse::<Mac>().unwrap()
            },
        ]
    );
}

fn service(name: &str, net: &str, vip: &str) -> ServiceRecord {
    ServiceRecord {
        name: name.into(),
        network_id: net.into(),
        network: format!("net-{net}"),
        mode: model::ServiceMode::Vip,
        vip: Some(vip.parse().unwrap()),
        vip6: None,
        ports: vec![model::ServicePort { port: 80, proto: model::Proto::Tcp, target: 8080 }],
        selector: model::default_selector(name),
        created_unix: 0,
        publish: vec![],
    }
}

/// A three-host cluster seen from h1 (eBPF on, uplink `uplink0`): network
/// aaaa with a backend of `web` on h2, web published on 8080 → its port 80
/// (target 8080) in `mode`.
fn mesh_lab(mode: model::PublishMode) -> (Snapshot, Identity) {
    let nets = vec![network("aaaa", "10.1.0.0/24", false)];
    let mut b2 = endpoint("b2", "aaaa", "10.1.0.3", "h2");
    b2.labels.insert(model::SERVICE_LABEL.into(), "web".into());
    b2.mac = "02:42:0a:01:00:03".parse().unwrap();
    let hosts = vec![host("h1", "198.19.0.1"), host("h2", "198.19.0.2"), host("h3", "198.19.0.3")];
    let mut web = service("web", "aaaa", "10.1.0.254");
    web.publish = vec![model::MeshPort { proto: model::Proto::Tcp, host_port: 30080, port: 80, mode }];
    let me = Identity {
        ebpf: true,
        underlay: Some("198.19.0.1".parse().unwrap()),
        uplink: Some("uplink0".into()),
        ..Identity::local("h1")
    };
    let snap = Snapshot {
        networks: Arc::new(nets),
        endpoints: vec![b2].into(),
        hosts: Arc::new(hosts),
        services: Arc::new(vec![web]),
        ..Snapshot::default()
    };
    (snap, me)
}

#[test]
fn a_published_service_is_taken_on_a_host_without_its_backends_and_reached_over_the_tunnel() {
    use trellis_ebpf::{BackendKey, MeshRole, PubKey, be};
    let (snap, me) = mesh_lab(model::PublishMode::Ingress);
    let d = desired::desired_host(&snap, &me);
    // The network's device exists here (no endpoint of it is), with the
    // backend's entries and every other host's mesh MAC.
    let vx = &d.vxlans[&model::vxlan_name("aaaa")];
    let b2_mac: Mac = "02:42:0a:01:00:03".parse().unwrap();
    assert!(vx.fdb.contains(&(b2_mac, "198.19.0.2".parse().unwrap())));
    for (ip, mac) in [("198.19.0.2", [6, 0x7e, 198, 19, 0, 2]), ("198.19.0.3", [6, 0x7e, 198, 19, 0, 3])] {
        assert!(vx.fdb.contains(&(Mac(mac), ip.parse().unwrap())), "{ip}'s mesh MAC: {:?}", vx.fdb);
    }
    assert!(!vx.fdb.iter().any(|(m, _)| m.0 == [6, 0x7e, 198, 19, 0, 1]), "not its own");
    assert_eq!(
        d.mesh_links,
        BTreeMap::from([
            ("uplink0".to_string(), MeshRole::Uplink),
            ("lo".to_string(), MeshRole::Uplink),
            (model::vxlan_name("aaaa"), MeshRole::Tunnel)
        ])
    );
    // 127.0.0.1 on the port, to the host's mesh address.
    assert_eq!(d.egress.mesh_loopback, Some("198.19.0.1".parse().unwrap()));
    assert!(
        d.egress.published.iter().any(|r| r.host_port == 30080 && r.host_ip == Some(std::net::Ipv4Addr::LOCALHOST))
    );
    // The tables: the published port to the service's target, its
    // backends and Maglev table, the host's address and mesh MAC; no VIP
    // (no endpoint here uses it).
    let id = u32::from("10.1.0.254".parse::<std::net::Ipv4Addr>().unwrap());
    let p = &d.tables.published[&PubKey::new(30080, 6)];
    assert_eq!((p.info.id, u16::from_be(p.info.target_port), p.info.count), (id, 8080, 1));
    assert_eq!(p.bridge, model::bridge_name("aaaa"));
    assert!(d.tables.backends.contains_key(&BackendKey { svc_id: id, ip: be("10.1.0.3".parse().unwrap()) }));
    assert_eq!(d.tables.maglev[&id].len(), 1);
    assert!(d.tables.vips.is_empty() && d.tables.services.is_empty());
    assert_eq!(d.tables.mesh_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(), vec!["198.19.0.1"]);
    assert_eq!(d.tables.mesh_mac, Some([6, 0x7e, 198, 19, 0, 1]));

    // From nothing: the device, then its program, then the tables.
    let acts = diff(&d, &Observed::default());
    let pos = |f: &dyn Fn(&Action) -> bool| acts.iter().position(f).unwrap();
    let vxlan = pos(&|a| matches!(a, Action::CreateVxlan(v) if v.name == model::vxlan_name("aaaa")));
    let tunnel = pos(&|a| matches!(a, Action::AttachMesh { role: MeshRole::Tunnel, .. }));
    let uplink = pos(&|a| matches!(a, Action::AttachMesh { ifname, role: MeshRole::Uplink } if ifname == "uplink0"));
    let tables = pos(&|a| matches!(a, Action::UpdateTables(_)));
    assert!(vxlan < tunnel && tunnel < tables && uplink < tables, "{acts:?}");

    // Unpublished: the port and the mesh go, the programs come off; the
    // device with them (no endpoint of the network is here).
    let mut after = snap.clone();
    Arc::make_mut(&mut after.services)[0].publish.clear();
    let d2 = desired::desired_host(&after, &me);
    assert!(d2.tables.published.is_empty() && d2.tables.mesh_mac.is_none() && d2.tables.mesh_addrs.is_empty());
    assert!(d2.mesh_links.is_empty() && !d2.vxlans.contains_key(&model::vxlan_name("aaaa")));
    assert!(d2.egress.mesh_loopback.is_none() && d2.egress.published.is_empty());
    let mut seen = Observed::default();
    for a in &acts {
        seen.record(a).unwrap();
    }
    let acts = diff(&d2, &seen);
    assert!(acts.contains(&Action::DetachMesh { ifname: "uplink0".into() }), "{acts:?}");
    let ops = acts.iter().find_map(|a| if let Action::UpdateTables(o) = a { Some(o) } else { None }).unwrap();
    assert_eq!(ops.del_published, vec![PubKey::new(30080, 6)]);
    assert_eq!(ops.set_mesh, Some(None));
}

#[test]
fn a_port_a_process_of_the_host_holds_is_left_to_it_and_reported() {
    use trellis_ebpf::PubKey;
    let (mut snap, me) = mesh_lab(model::PublishMode::Ingress);
    snap.held_ports.insert((model::Proto::Tcp, 30080));
    let d = desired::desired_host(&snap, &me);
    assert!(!d.tables.published.contains_key(&PubKey::new(30080, 6)), "the mesh would cut the process off");
    assert!(!d.egress.published.iter().any(|r| r.host_port == 30080), "127.0.0.1 too");
    assert_eq!(d.mesh_held.len(), 1);
    assert_eq!((d.mesh_held[0].0.as_str(), d.mesh_held[0].1.host_port), ("web", 30080));
    // The same port over UDP is another port.
    snap.held_ports = [(model::Proto::Udp, 30080)].into();
    assert!(desired::desired_host(&snap, &me).tables.published.contains_key(&PubKey::new(30080, 6)));
}

/// A mesh address of `host` on network aaaa.
fn mesh_addr(host: &str, ip: &str) -> model::MeshAddrRecord {
    model::MeshAddrRecord {
        host: host.into(),
        network_id: "aaaa".into(),
        ip: ip.parse().unwrap(),
        mac: Mac::for_ip(ip.parse().unwrap()),
    }
}

#[test]
fn without_ebpf_a_published_service_goes_through_nftables_from_the_host_s_mesh_address() {
    let (mut snap, me) = mesh_lab(model::PublishMode::Ingress);
    let me = Identity { ebpf: false, ..me };
    // Before its address is allocated: wanted, nothing published yet.
    let d = desired::desired_host(&snap, &me);
    assert_eq!(d.mesh_addrs_wanted, ["aaaa".to_string()].into());
    assert!(d.mesh_veths.is_empty() && d.egress.mesh.is_empty() && d.egress.mesh_snat.is_empty());
    assert_eq!(d.mesh_nft.len(), 1, "said so all the same");
    assert!(d.vxlans.contains_key(&model::vxlan_name("aaaa")), "the backend's host is reached over the device");
    // With it (and h2's): the veth, the rule to the backend, the SNAT.
    snap.mesh_addrs =
        Arc::new(vec![mesh_addr("h1", "10.1.0.40"), mesh_addr("h2", "10.1.0.41"), mesh_addr("h9", "10.1.0.49")]);
    let d = desired::desired_host(&snap, &me);
    let v = &d.mesh_veths[&model::mesh_port_name("aaaa")];
    assert_eq!((v.ifname.as_str(), v.bridge.as_str()), ("trm-aaaa", "trb-aaaa"));
    assert_eq!((v.addr.to_string(), v.mac), ("10.1.0.40".to_string(), Mac::for_ip("10.1.0.40".parse().unwrap())));
    assert!(v.sysctls.iter().any(|s| s.path.ends_with("/trm-aaaa/rp_filter") && s.value == "0"), "{:?}", v.sysctls);
    assert_eq!(
        d.egress.mesh,
        vec![crate::dataplane::egress::MeshRule {
            proto: model::Proto::Tcp,
            host_port: 30080,
            service: "web".into(),
            target: 8080,
            backends: vec!["10.1.0.3".parse().unwrap()],
            hairpin_only: false,
        }]
    );
    assert_eq!(d.egress.mesh_snat.len(), 1);
    assert_eq!(d.egress.mesh_snat[0].addr.to_string(), "10.1.0.40");
    assert_eq!(d.egress.localnet, ["trb-aaaa"], "127.0.0.1 is DNATed out of the bridge");
    // h2's address, as for a remote endpoint; not its own, not a dead host's.
    let vx = &d.vxlans[&model::vxlan_name("aaaa")];
    let h2_mac = Mac::for_ip("10.1.0.41".parse().unwrap());
    assert!(
        vx.fdb.contains(&(h2_mac, "198.19.0.2".parse().unwrap()))
            && vx.neigh.contains(&("10.1.0.41".parse().unwrap(), h2_mac))
    );
    assert!(
        !vx.fdb.iter().any(|(m, _)| *m == v.mac || *m == Mac::for_ip("10.1.0.49".parse().unwrap())),
        "{:?}",
        vx.fdb
    );
    // None of the eBPF mesh.
    assert!(d.tables.published.is_empty() && d.mesh_links.is_empty() && d.egress.mesh_loopback.is_none());
    // A port a process of the host holds stays the process's here too.
    let mut held = snap.clone();
    held.held_ports.insert((model::Proto::Tcp, 30080));
    let dh = desired::desired_host(&held, &me);
    assert!(dh.egress.mesh.is_empty() && dh.mesh_nft.is_empty() && dh.mesh_held.len() == 1, "{:?}", dh.egress.mesh);
    assert!(!vx.fdb.iter().any(|(m, _)| m.0[0] == 6 && m.0[1] == 0x7e), "no mesh MACs: {:?}", vx.fdb);
    // From nothing: the veth after the bridge, the rules after both.
    let acts = diff(&d, &Observed::default());
    let pos = |f: &dyn Fn(&Action) -> bool| acts.iter().position(f).unwrap();
    let bridge = pos(&|a| matches!(a, Action::CreateBridge { name, .. } if name == "trb-aaaa"));
    let veth = pos(&|a| matches!(a, Action::CreateMeshVeth(_)));
    let egress = pos(&|a| matches!(a, Action::ApplyEgress(_)));
    assert!(bridge < veth && veth < egress, "{acts:?}");
    // Unpublished: the veth goes (with its peer), the address is no longer
    // wanted (released after the pass).
    let mut seen = Observed::default();
    for a in &acts {
        seen.record(a).unwrap();
    }
    assert!(diff(&d, &seen).is_empty(), "as desired: nothing to do");
    Arc::make_mut(&mut snap.services)[0].publish.clear();
    let d2 = desired::desired_host(&snap, &me);
    assert!(d2.mesh_addrs_wanted.is_empty() && d2.mesh_veths.is_empty() && d2.egress.mesh.is_empty());
    let acts = diff(&d2, &seen);
    assert!(acts.contains(&Action::DeleteLink { name: "trn-aaaa".into() }), "{acts:?}");
    assert!(!acts.contains(&Action::DeleteLink { name: "trm-aaaa".into() }), "one delete takes both ends: {acts:?}");
    for a in &acts {
        seen.record(a).unwrap();
    }
    assert!(!seen.links.contains_key("trm-aaaa") && !seen.links.contains_key("trn-aaaa"));
}

#[test]
fn a_mesh_veth_not_as_desired_is_made_again() {
    let (mut snap, me) = mesh_lab(model::PublishMode::Ingress);
    snap.mesh_addrs = Arc::new(vec![mesh_addr("h1", "10.1.0.40")]);
    let d = desired::desired_host(&snap, &Identity { ebpf: false, ..me });
    let mut seen = Observed::default();
    for a in diff(&d, &Observed::default()) {
        seen.record(&a).unwrap();
    }
    let v = d.mesh_veths["trn-aaaa"].clone();
    let remade = vec![Action::DeleteLink { name: "trn-aaaa".into() }, Action::CreateMeshVeth(Box::new(v))];
    for (what, change) in [
        ("address", &(|o: &mut Observed| o.links.get_mut("trm-aaaa").unwrap().addrs.clear()) as &dyn Fn(&mut Observed)),
        ("MAC", &|o: &mut Observed| o.links.get_mut("trm-aaaa").unwrap().mac = Some(Mac([2, 0, 0, 0, 0, 1]))),
        ("FDB entry", &|o: &mut Observed| o.links.get_mut("trn-aaaa").unwrap().static_macs.clear()),
        ("bridge", &|o: &mut Observed| o.links.get_mut("trn-aaaa").unwrap().master = None),
    ] {
        let mut o = seen.clone();
        change(&mut o);
        assert_eq!(diff(&d, &o), remade, "{what}");
    }
    // The host end alone (its port deleted by hand): it goes, both come back.
    let mut o = seen.clone();
    o.links.remove("trn-aaaa");
    let acts = diff(&d, &o);
    assert_eq!(acts[0], Action::DeleteLink { name: "trm-aaaa".into() }, "{acts:?}");
    assert!(matches!(acts[1], Action::CreateMeshVeth(_)), "{acts:?}");
}

#[test]
fn an_ebpf_host_keeps_the_client_s_address_unless_a_backend_runs_without_ebpf() {
    use trellis_ebpf::PubKey;
    let (mut snap, me) = mesh_lab(model::PublishMode::Ingress);
    snap.mesh_addrs = Arc::new(vec![mesh_addr("h1", "10.1.0.40")]);
    // Every backend on an eBPF host: the eBPF mesh, and nftables for the
    // host's containers only (hairpin), from its mesh address.
    let d = desired::desired_host(&snap, &me);
    assert!(d.tables.published.contains_key(&PubKey::new(30080, 6)));
    assert!(d.mesh_nft.is_empty());
    assert_eq!(d.egress.mesh.len(), 1);
    assert!(d.egress.mesh[0].hairpin_only);
    assert!(d.mesh_veths.contains_key("trn-aaaa") && d.egress.mesh_loopback.is_some());
    assert!(d.egress.localnet.is_empty(), "127.0.0.1 takes the eBPF path");
    // The backend's host runs without eBPF: nothing would steer its
    // replies back, so this host publishes the service through nftables.
    Arc::make_mut(&mut snap.hosts)[1].capabilities.insert("ebpf".into(), false);
    let d = desired::desired_host(&snap, &me);
    assert!(!d.tables.published.contains_key(&PubKey::new(30080, 6)), "{:?}", d.tables.published);
    assert_eq!(d.mesh_nft.iter().map(|(s, p)| (s.as_str(), p.host_port)).collect::<Vec<_>>(), [("web", 30080)]);
    assert!(!d.egress.mesh[0].hairpin_only);
    assert!(d.egress.mesh_loopback.is_none() && !d.mesh_links.contains_key("uplink0"));
    // A dead host's capability does not count (its backends are not reached).
    Arc::make_mut(&mut snap.hosts).remove(1);
    let d = desired::desired_host(&snap, &me);
    assert!(d.mesh_nft.is_empty(), "{:?}", d.mesh_nft);
}

#[test]
fn host_mode_publishes_only_where_a_backend_runs_and_nothing_without_ebpf() {
    use trellis_ebpf::PubKey;
    let (mut snap, me) = mesh_lab(model::PublishMode::Host);
    let d = desired::desired_host(&snap, &me);
    assert!(d.tables.published.is_empty(), "h1 runs no backend");
    assert!(!d.mesh_links.contains_key("uplink0"));
    // h2 runs one (its endpoint is local there).
    let h2 = Identity { host: "h2".into(), underlay: Some("198.19.0.2".parse().unwrap()), ..me.clone() };
    let mut b2 = snap.endpoints.iter().next().unwrap().clone();
    b2.netns = "/run/netns/b2".into();
    snap.endpoints.insert(b2);
    let d2 = desired::desired_host(&snap, &h2);
    assert!(d2.tables.published.contains_key(&PubKey::new(30080, 6)), "{:?}", d2.tables.published);
    assert_eq!(d2.tables.mesh_mac, Some([6, 0x7e, 198, 19, 0, 2]));
    // Without the eBPF datapath: no mesh at all.
    let (snap, me) = mesh_lab(model::PublishMode::Ingress);
    let off = desired::desired_host(&snap, &Identity { ebpf: false, ..me });
    assert!(off.tables.published.is_empty() && off.mesh_links.is_empty());
}

#[test]
fn a_vip_service_without_ports_takes_every_port_of_tcp_and_udp() {
    use trellis_ebpf::SvcKey;
    let nets = vec![network("aaaa", "10.1.0.0/24", false)];
    let mut b1 = endpoint("b1", "aaaa", "10.1.0.2", "h1");
    b1.labels.insert(model::SERVICE_LABEL.into(), "any".into());
    let eps = vec![b1];
    let me = Identity { ebpf: true, ..Identity::local("h1") };
    let mut any = service("any", "aaaa", "10.1.0.250");
    any.ports.clear();
    let d = desired(&nets, &eps, &[], &me);
    let t = tables(&nets, &eps, &[], &[any, service("web", "aaaa", "10.1.0.254")], &me, &d);
    let vip: std::net::Ipv4Addr = "10.1.0.250".parse().unwrap();
    let keys: Vec<&SvcKey> = t.services.keys().filter(|k| k.vip == trellis_ebpf::be(vip)).collect();
    assert_eq!(keys, vec![&SvcKey::new(vip, 0, 6), &SvcKey::new(vip, 0, 17)]);
    for k in keys {
        let info = t.services[k];
        assert_eq!((info.target_port, info.count, info.id), (0, 1, u32::from(vip)), "the port asked for, one backend");
    }
    // A service with ports keeps to them: no port-0 entry.
    let web: std::net::Ipv4Addr = "10.1.0.254".parse().unwrap();
    let web_keys: Vec<&SvcKey> = t.services.keys().filter(|k| k.vip == trellis_ebpf::be(web)).collect();
    assert_eq!(web_keys, vec![&SvcKey::new(web, 80, 6)]);
}

#[test]
fn service_tables_hold_reachable_backends_and_change_in_a_safe_order() {
    use trellis_ebpf::{BackendKey, SvcKey, be};
    let nets = vec![network("aaaa", "10.1.0.0/24", false), network("bbbb", "10.2.0.0/24", true)];
    let mut b1 = endpoint("b1", "aaaa", "10.1.0.2", "h1");
    let mut b2 = endpoint("b2", "aaaa", "10.1.0.3", "h2");
    let mut b3 = endpoint("b3", "aaaa", "10.1.0.4", "h3");
    for b in [&mut b1, &mut b2, &mut b3] {
        b.labels.insert(model::SERVICE_LABEL.into(), "web".into());
    }
    let client = endpoint("c1", "aaaa", "10.1.0.9", "h1");
    let eps = vec![b1, b2, b3, client];
    let host = |id: &str, ip: &str| HostRecord {
        id: id.into(),
        hostname: id.into(),
        underlay: ip.parse().unwrap(),
        vtep_mac: "02:00:00:00:00:09".parse().unwrap(),
        vxlan_port: 4789,
        capabilities: Default::default(),
        version: String::new(),
        started_unix: 0,
        underlay_mtu: 0,
    };
    // h3 is not live: its backend is not used.
    let hosts = vec![host("h1", "192.0.2.1"), host("h2", "192.0.2.2")];
    let me = Identity { ebpf: true, underlay: Some("192.0.2.1".parse().unwrap()), ..Identity::local("h1") };
    let svcs = vec![service("web", "aaaa", "10.1.0.254")];
    let d = desired(&nets, &eps, &hosts, &me);
    let t = tables(&nets, &eps, &hosts, &svcs, &me, &d);
    assert_eq!(t.nets.len(), 2, "every subnet, for isolation");
    assert_eq!(t.nets[&("10.2.0.0".parse().unwrap(), 24)].flags, trellis_ebpf::EP_INTERNAL);
    let vip: std::net::Ipv4Addr = "10.1.0.254".parse().unwrap();
    let id = u32::from(vip);
    assert_eq!(t.maglev[&id], vec!["10.1.0.2".parse::<std::net::Ipv4Addr>().unwrap(), "10.1.0.3".parse().unwrap()]);
    let svc = t.services[&SvcKey::new(vip, 80, 6)];
    assert_eq!((svc.id, u16::from_be(svc.target_port), svc.count), (id, 8080, 2));
    assert_eq!(t.vips[&vip].backends, 2);
    assert!(!t.backends.contains_key(&BackendKey { svc_id: id, ip: be("10.1.0.4".parse().unwrap()) }));
    // Without eBPF, or without local endpoints on the network, no tables.
    assert_eq!(tables(&nets, &eps, &hosts, &svcs, &Identity { ebpf: false, ..me.clone() }, &d), Tables::default());
    let lonely = Identity { host: "h9".into(), ..me.clone() };
    assert!(tables(&nets, &eps, &hosts, &svcs, &lonely, &desired(&nets, &eps, &hosts, &lonely)).services.is_empty());

    // From nothing: one table update, after the tunnel entries.
    let want = DesiredHost { tables: t.clone(), ..d.clone() };
    let acts = diff(&want, &Observed::default());
    let pos_tables = acts.iter().position(|a| matches!(a, Action::UpdateTables(_))).unwrap();
    assert!(acts.iter().rposition(|a| matches!(a, Action::AddFdb { .. })).unwrap() < pos_tables);
    let mut obs = Observed::default();
    for a in &acts {
        obs.record(a).unwrap();
    }
    assert!(diff(&want, &obs).is_empty(), "converged: {:?}", diff(&want, &obs));

    // h3 comes alive: its backend joins, the table is rewritten, the
    // service entry follows.
    let hosts3 = vec![hosts[0].clone(), hosts[1].clone(), host("h3", "192.0.2.3")];
    let d3 = desired(&nets, &eps, &hosts3, &me);
    let t3 = tables(&nets, &eps, &hosts3, &svcs, &me, &d3);
    let ops = obs.tables.ops_to(&t3);
    assert_eq!(ops.put_backends.len(), 1);
    assert_eq!(ops.put_maglev.iter().map(|(id, b)| (*id, b.len())).collect::<Vec<_>>(), vec![(id, 3)]);
    assert_eq!(ops.put_services.len(), 1);
    assert!(ops.del_backends.is_empty());
    Arc::make_mut(&mut obs.tables).apply(&ops);
    // The service goes: entries first, then what they pointed to.
    let gone = tables(&nets, &eps, &hosts3, &[], &me, &d3);
    let ops = obs.tables.ops_to(&gone);
    assert_eq!(
        (ops.del_services.len(), ops.del_vips.len(), ops.del_maglev.len(), ops.del_backends.len()),
        (1, 1, 1, 3)
    );
    assert!(ops.put_maglev.is_empty() && ops.del_nets.is_empty());
}

/// A dual-stack network's service: its IPv6 VIP's tables beside the IPv4
/// ones, with the backends' IPv6 addresses (the live, reachable, serving
/// ones: a draining backend keeps only its backend entry), under the same
/// service id; the IPv6 table is rewritten when its backend set changes,
/// and its entries go first when the service goes.
#[test]
fn a_dual_stack_service_has_ipv6_vip_tables_beside_the_ipv4_ones() {
    use trellis_ebpf::{Backend6Key, Svc6Key};
    let mut net = network("aaaa", "10.1.0.0/24", false);
    net.subnet6 = Some("fd00:1::/64".parse().unwrap());
    net.gateway6 = Some("fd00:1::1".parse().unwrap());
    let nets = vec![net];
    let backend = |id: &str, ip: &str, ip6: &str, host: &str| {
        let mut b = endpoint(id, "aaaa", ip, host);
        b.ip6 = Some(ip6.parse().unwrap());
        b.labels.insert(model::SERVICE_LABEL.into(), "web".into());
        b
    };
    let mut eps = vec![
        backend("b1", "10.1.0.2", "fd00:1::2", "h1"),
        backend("b2", "10.1.0.3", "fd00:1::3", "h2"),
        backend("b3", "10.1.0.4", "fd00:1::4", "h3"),
        endpoint("c1", "aaaa", "10.1.0.9", "h1"),
    ];
    let hosts = vec![host("h1", "192.0.2.1"), host("h2", "192.0.2.2")];
    let me = Identity { ebpf: true, underlay: Some("192.0.2.1".parse().unwrap()), ..Identity::local("h1") };
    let vip6: std::net::Ipv6Addr = "fd00:1::ffff:ffff:ffff:ff7f".parse().unwrap();
    let mut web = service("web", "aaaa", "10.1.0.254");
    web.vip6 = Some(vip6.into());
    let svcs = vec![web];
    let d = desired(&nets, &eps, &hosts, &me);
    let t = tables(&nets, &eps, &hosts, &svcs, &me, &d);
    let id = u32::from("10.1.0.254".parse::<std::net::Ipv4Addr>().unwrap());
    let six = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap();
    assert_eq!(t.maglev6[&id], vec![six("fd00:1::2"), six("fd00:1::3")], "h3 is not live");
    let svc = t.services6[&Svc6Key::new(vip6, 80, 6)];
    assert_eq!((svc.id, u16::from_be(svc.target_port), svc.count), (id, 8080, 2));
    assert_eq!(svc.revision, trellis_ebpf::maglev::digest6(&t.maglev6[&id]));
    assert_eq!(t.vips6[&vip6], trellis_ebpf::VipInfo { net_id: 4096, backends: 2 });
    assert_eq!(
        t.backends6.keys().copied().collect::<Vec<_>>(),
        vec![
            Backend6Key { svc_id: id, ip: six("fd00:1::2").octets() },
            Backend6Key { svc_id: id, ip: six("fd00:1::3").octets() },
        ]
    );
    assert_eq!(t.maglev[&id].len(), 2, "the IPv4 VIP's as before");
    // Converges from nothing.
    let mut obs = Observed::default();
    for a in diff(&DesiredHost { tables: t.clone(), ..d.clone() }, &obs) {
        obs.record(&a).unwrap();
    }
    assert!(obs.tables.ops_to(&t).is_empty());
    // b2 drains: out of the IPv6 Maglev table, its backend entry kept.
    eps[1].drain_until_ms = Some(u64::MAX);
    eps[1].deleting = true;
    let t2 = tables(&nets, &eps, &hosts, &svcs, &me, &d);
    let ops = obs.tables.ops_to(&t2);
    assert_eq!(ops.put_maglev6, vec![(id, vec![six("fd00:1::2")])]);
    assert!(ops.del_backends6.is_empty(), "draining keeps its entry: {ops:?}");
    Arc::make_mut(&mut obs.tables).apply(&ops);
    // The service goes: the IPv6 entries too.
    let ops = obs.tables.ops_to(&tables(&nets, &eps, &hosts, &[], &me, &d));
    assert_eq!(
        (ops.del_services6.len(), ops.del_vips6.len(), ops.del_maglev6.len(), ops.del_backends6.len()),
        (1, 1, 1, 2)
    );
}

#[test]
fn the_endpoint_program_follows_the_veths() {
    let nets = vec![network("aaaa", "10.1.0.0/24", false)];
    let eps = vec![endpoint("e1", "aaaa", "10.1.0.2", "h1"), endpoint("e2", "aaaa", "10.1.0.3", "h1")];
    let me = Identity { ebpf: true, ..Identity::local("h1") };
    let d = desired(&nets, &eps, &[], &me);
    assert_eq!(d.programs.keys().collect::<Vec<_>>(), ["trv-e1", "trv-e2"]);
    // DNS redirection: in the program when it runs, in nftables when not.
    let dns = Identity { dns_intercept: true, ..me.clone() };
    let d2 = desired(&nets, &eps, &[], &dns);
    assert_eq!(
        d2.programs["trv-e1"].dns_at,
        Some(("10.1.0.1".parse().unwrap(), model::Mac::for_ip("10.1.0.0".parse().unwrap())))
    );
    assert!(!d2.egress.dns_intercept, "no nftables DNAT beside the program");
    assert!(d2.egress.dns_notrack, "DNS to the gateway untracked beside the program");
    let no_ebpf = desired(&nets, &eps, &[], &Identity { ebpf: false, ..dns.clone() });
    assert!(no_ebpf.egress.dns_intercept && !no_ebpf.egress.dns_notrack);
    assert!(desired(&nets, &eps, &[], &Identity::local("h1")).programs.is_empty(), "none without eBPF");
    assert_eq!(d2.programs["trv-e1"].dns6_at, None, "an IPv4-only network");
    // On a dual-stack network DNS over IPv6 goes to the IPv6 gateway too.
    let mut dual = nets.clone();
    dual[0].subnet6 = Some("fd00:1::/64".parse().unwrap());
    dual[0].gateway6 = Some("fd00:1::1".parse().unwrap());
    assert_eq!(desired(&dual, &eps, &[], &dns).programs["trv-e1"].dns6_at, Some("fd00:1::1".parse().unwrap()));
    assert_eq!(desired(&dual, &eps, &[], &me).programs["trv-e1"].dns6_at, None, "not without DNS interception");
    let acts = diff(&d, &Observed::default());
    let attach: Vec<_> = acts
        .iter()
        .filter_map(|a| match a {
            Action::AttachProgram { ifname, ip, program, .. } => {
                Some((ifname.as_str(), ip.map(|i| i.to_string()).unwrap_or_default(), program.vni))
            }
            _ => None,
        })
        .collect();
    assert_eq!(attach, [("trv-e1", "10.1.0.2".to_string(), 4096), ("trv-e2", "10.1.0.3".to_string(), 4096)]);
    let pos = |f: &dyn Fn(&Action) -> bool| acts.iter().position(f).unwrap();
    assert!(
        pos(&|a| matches!(a, Action::CreateEndpoint(s) if s.host_if == "trv-e1"))
            < pos(&|a| matches!(a, Action::AttachProgram { ifname, .. } if ifname == "trv-e1")),
        "the veth exists before the program is attached"
    );
    let up = |acts: &[Action], name: &str| {
        acts.iter().position(|a| matches!(a, Action::SetLink { name: n, .. } if n == name))
    };
    let attached = |acts: &[Action], name: &str| {
        acts.iter().position(|a| matches!(a, Action::AttachProgram { ifname, .. } if ifname == name))
    };
    for name in ["trv-e1", "trv-e2"] {
        assert!(up(&acts, name) > attached(&acts, name), "{name} comes up only once its program is on: {acts:?}");
        assert_eq!(acts.iter().filter(|a| matches!(a, Action::SetLink { name: n, .. } if n == name)).count(), 1);
    }
    let mut obs = Observed::default();
    for a in &acts {
        obs.record(a).unwrap();
    }
    assert!(diff(&d, &obs).is_empty());
    // A veth recreated by a repair gets the program again; a stale
    // attachment goes.
    obs.links.remove("trv-e1");
    obs.programs.insert("trv-gone".into());
    let acts = diff(&d, &obs);
    assert!(up(&acts, "trv-e1") > attached(&acts, "trv-e1"), "the repaired veth too: {acts:?}");
    assert!(acts.contains(&Action::DetachProgram { ifname: "trv-gone".into() }), "{acts:?}");
    // A veth found down without its program (an attach that failed):
    // program first, then up; one found down with its program is just
    // brought up.
    let mut half = Observed::default();
    for a in diff(&d, &Observed::default())
        .iter()
        .filter(|a| !matches!(a, Action::SetLink { name, .. } if name.starts_with("trv-")))
    {
        if !matches!(a, Action::AttachProgram { ifname, .. } if ifname == "trv-e1") {
            half.record(a).unwrap();
        }
    }
    assert!(!half.links["trv-e1"].up && !half.links["trv-e2"].up);
    let acts = diff(&d, &half);
    assert!(up(&acts, "trv-e1") > attached(&acts, "trv-e1"), "{acts:?}");
    assert!(attached(&acts, "trv-e2").is_none() && up(&acts, "trv-e2").is_some(), "{acts:?}");
}

/// An attachment that fails leaves its veth down: the endpoint passes no
/// frame unguarded, and comes up with the pass that attaches its program.
#[tokio::test]
async fn a_veth_whose_program_did_not_go_on_stays_down() {
    let dp = Arc::new(FakeDataplane::default());
    dp.failing_attach.store(true, Ordering::Relaxed);
    let src = Arc::new(Fixed(Mutex::new((
        vec![network("aaaa", "10.1.0.0/24", false)],
        vec![endpoint("e1", "aaaa", "10.1.0.2", "h1")],
    ))));
    let r = Reconciler::new(dp.clone(), src, Identity { ebpf: true, ..Identity::local("h1") });
    let report = r.pass().await.unwrap();
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert!(dp.inspect(|s| s.links.contains_key("trv-e1") && !s.links["trv-e1"].up), "the veth is made, and down");
    assert!(!dp.take_log().iter().any(|a| matches!(a, Action::SetLink { name, .. } if name == "trv-e1")));
    dp.failing_attach.store(false, Ordering::Relaxed);
    let report = r.full_pass().await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(dp.inspect(|s| s.links["trv-e1"].up && s.programs.contains("trv-e1")));
    let log = dp.take_log();
    assert!(!log.iter().any(|a| matches!(a, Action::CreateEndpoint(_))), "the veth is kept: {log:?}");
}

#[test]
fn diff_from_scratch_creates_in_order() {
    let nets = vec![network("aaaa", "10.1.0.0/24", false)];
    let eps = vec![endpoint("e1", "aaaa", "10.1.0.2", "h1")];
    let acts = diff(&desired(&nets, &eps, &[], &Identity::local("h1")), &Observed::default());
    let kinds: Vec<_> = acts
        .iter()
        .map(|a| match a {
            Action::CreateBridge { .. } => "bridge",
            Action::SetLink { .. } => "set",
            Action::AddAddress { .. } => "addr",
            Action::CreateEndpoint(_) => "endpoint",
            Action::ApplyEgress(_) => "egress",
            Action::DeleteLink { .. } => "delete",
            Action::DelAddress { .. } => "deladdr",
            _ => "tunnel",
        })
        .collect();
    assert_eq!(kinds, ["bridge", "set", "addr", "endpoint", "set", "egress"]);
}

#[test]
fn vxlan_devices_no_longer_wanted_are_deleted() {
    let nets = vec![network("aaaa", "10.1.0.0/24", false)];
    let hosts = vec![host("h1", "192.0.2.1"), host("h2", "192.0.2.2")];
    let me = Identity { underlay: Some("192.0.2.1".parse().unwrap()), ..Identity::local("h1") };
    let eps = vec![endpoint("l1", "aaaa", "10.1.0.2", "h1")];
    let mut obs = Observed::default();
    for a in diff(&desired(&nets, &eps, &hosts, &me), &Observed::default()) {
        obs.record(&a).unwrap();
    }
    assert!(obs.links.contains_key("trx-aaaa"));
    // The network's last local endpoint goes: its VXLAN device goes too
    // (the probe device stays), and nothing else is touched.
    let acts = diff(&desired(&nets, &[], &hosts, &me), &obs);
    let deleted: Vec<_> = acts
        .iter()
        .filter_map(|a| match a {
            Action::DeleteLink { name } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(deleted, ["trv-l1", "trx-aaaa"], "{acts:?}");
    // The network goes: its bridge and its VXLAN device.
    let acts = diff(&desired(&[], &[], &hosts, &me), &obs);
    assert!(acts.contains(&Action::DeleteLink { name: "trx-aaaa".into() }), "{acts:?}");
    assert!(acts.contains(&Action::DeleteLink { name: "trb-aaaa".into() }), "{acts:?}");
    assert!(!acts.contains(&Action::DeleteLink { name: model::PROBE_VXLAN.into() }), "{acts:?}");
    // A host without an underlay has no tunnels: the probe device goes.
    let acts = diff(&desired(&nets, &[], &hosts, &Identity::local("h1")), &obs);
    assert!(acts.contains(&Action::DeleteLink { name: model::PROBE_VXLAN.into() }), "{acts:?}");
}

#[test]
fn the_probe_device_gets_its_ipv6_sysctls_before_it_is_up() {
    let nets = vec![network("aaaa", "10.1.0.0/24", false)];
    let hosts = vec![host("h1", "192.0.2.1"), host("h2", "192.0.2.2")];
    let me = Identity { underlay: Some("192.0.2.1".parse().unwrap()), ..Identity::local("h1") };
    let eps = vec![endpoint("l1", "aaaa", "10.1.0.2", "h1")];
    let want = desired(&nets, &eps, &hosts, &me);
    let sysctl = |path: &str| Sysctl { path: path.into(), value: "0".into() };
    let probe = &want.vxlans[model::PROBE_VXLAN].spec;
    assert_eq!(
        probe.sysctls,
        [
            sysctl("/proc/sys/net/ipv6/conf/trx-probe/disable_ipv6"),
            sysctl("/proc/sys/net/ipv6/conf/trx-probe/accept_dad")
        ]
    );
    // A network's device carries IPv4 only.
    assert_eq!(want.vxlans["trx-aaaa"].spec.sysctls, []);
    // They go with the device's creation, which comes before the SetLink
    // that sets it up.
    let acts = diff(&want, &Observed::default());
    let created = acts
        .iter()
        .position(|a| matches!(a, Action::CreateVxlan(v) if v.name == model::PROBE_VXLAN && v.sysctls == probe.sysctls))
        .expect("the probe device is created with its sysctls");
    let up = acts
        .iter()
        .position(|a| matches!(a, Action::SetLink { name, .. } if name == model::PROBE_VXLAN))
        .expect("the probe device is set up");
    assert!(created < up, "{acts:?}");
}

#[test]
fn the_egress_rules_turn_forwarding_on() {
    for nets in [vec![], vec![network("aaaa", "10.1.0.0/24", false)], vec![network("bbbb", "10.2.0.0/24", true)]] {
        let want = desired(&nets, &[], &[], &Identity::local("h1"));
        assert!(want.egress.forwarding, "{nets:?}");
        let acts = diff(&want, &Observed::default());
        assert!(acts.iter().any(|a| matches!(a, Action::ApplyEgress(r) if r.forwarding)), "{acts:?}");
    }
}

#[test]
fn the_ports_published_to_this_host_s_endpoints_are_in_its_egress_rules() {
    use crate::dataplane::egress::PublishedRule;
    use crate::model::{Proto, PublishedPort};
    let nets = vec![network("aaaa", "10.1.0.0/24", false), network("iiii", "10.2.0.0/24", true)];
    let port = |host_port, port| PublishedPort { proto: Proto::Tcp, host_ip: None, host_port, port };
    let mut mine = endpoint("e1", "aaaa", "10.1.0.2", "h1");
    mine.ports = vec![port(8080, 80)];
    let mut elsewhere = endpoint("e2", "aaaa", "10.1.0.3", "h2");
    elsewhere.ports = vec![port(8081, 80)];
    let mut leaving = endpoint("e3", "aaaa", "10.1.0.4", "h1");
    leaving.ports = vec![port(8082, 80)];
    leaving.deleting = true;
    let mut internal = endpoint("e4", "iiii", "10.2.0.2", "h1");
    internal.ports = vec![port(8083, 80)];
    let want = desired(&nets, &[mine, elsewhere, leaving, internal], &[], &Identity::local("h1"));
    assert_eq!(
        want.egress.published,
        [PublishedRule {
            proto: Proto::Tcp,
            host_ip: None,
            host_port: 8080,
            addr: "10.1.0.2".parse().unwrap(),
            port: 80
        }],
        "only this host's, not being detached, not on an internal network"
    );
    assert_eq!(want.egress.localnet, ["trb-aaaa"]);
    let without = desired(&nets, &[], &[], &Identity::local("h1"));
    assert_ne!(want.egress.fingerprint(), without.egress.fingerprint());
}

#[test]
fn diff_repairs_and_removes() {
    let nets = vec![network("aaaa", "10.1.0.0/24", false)];
    let eps = vec![endpoint("e1", "aaaa", "10.1.0.2", "h1")];
    let want = desired(&nets, &eps, &[], &Identity::local("h1"));
    let mut obs = Observed { egress: Some(want.egress.fingerprint()), ..Observed::default() };
    obs.links.insert(
        "trb-aaaa".into(),
        ObservedLink {
            kind: LinkKind::Bridge,
            master: None,
            mtu: 1450,
            up: true,
            addrs: vec!["10.1.0.99/24".parse().unwrap()],
            ..Default::default()
        },
    );
    obs.links.insert(
        "trv-e1".into(),
        ObservedLink { kind: LinkKind::Veth, master: None, mtu: 1450, up: true, addrs: vec![], ..Default::default() },
    );
    for stale in ["trv-old", "trb-old", "trp-e9"] {
        obs.links.insert(
            stale.into(),
            ObservedLink {
                kind: LinkKind::Veth,
                master: None,
                mtu: 1500,
                up: true,
                addrs: vec![],
                ..Default::default()
            },
        );
    }
    // Someone else's link is never touched.
    obs.links.insert(
        "eth0".into(),
        ObservedLink { kind: LinkKind::Other, master: None, mtu: 1500, up: true, addrs: vec![], ..Default::default() },
    );
    let acts = diff(&want, &obs);
    assert_eq!(
        acts,
        vec![
            Action::DeleteLink { name: "trp-e9".into() },
            Action::DeleteLink { name: "trv-old".into() },
            Action::DeleteLink { name: "trb-old".into() },
            Action::DelAddress { link: "trb-aaaa".into(), addr: "10.1.0.99/24".parse().unwrap() },
            Action::AddAddress { link: "trb-aaaa".into(), addr: "10.1.0.1/24".parse().unwrap() },
            Action::SetLink { name: "trv-e1".into(), mtu: 1450, master: Some("trb-aaaa".into()) },
        ]
    );
}

fn encrypted_lab() -> (Vec<NetworkRecord>, Vec<EndpointRecord>, Vec<HostRecord>, Identity) {
    let mut n = network("aaaa", "10.1.0.0/24", false);
    n.encrypted = true;
    n.vxlan_port = Some(4790);
    let mut eps = vec![endpoint("l1", "aaaa", "10.1.0.2", "h1"), endpoint("r1", "aaaa", "10.1.0.3", "h2")];
    eps[1].mac = "02:00:00:00:00:03".parse().unwrap();
    let hosts = vec![host("h1", "192.0.2.1"), host("h2", "192.0.2.2")];
    let me = Identity { underlay: Some("192.0.2.1".parse().unwrap()), ..Identity::local("h1") };
    (vec![n], eps, hosts, me)
}

#[test]
fn encrypted_networks_get_their_port_sas_and_policies_before_any_tunnel_entry() {
    let (nets, eps, hosts, me) = encrypted_lab();
    let ring = trellis_ipsec::KeyRing::new(trellis_ipsec::Secret::from_bytes([1; 32]), 0);
    let keys = BTreeMap::from([("aaaa".to_string(), ring)]);
    let mut d = desired(&nets, &eps, &hosts, &me);
    encryption(&nets, &keys, &[], &mut d, &me);
    assert_eq!(d.vxlans["trx-aaaa"].spec.port, 4790, "an encrypted network's VXLAN uses its own port");
    assert_eq!((d.xfrm.sas.len(), d.xfrm.policies.len()), (2, 2), "in (from anywhere) and out to the peer");
    assert_eq!(d.acks["aaaa"], trellis_ipsec::Ack { rx: 1, tx: 1 });
    let acts = diff(&d, &Observed::default());
    let first_tunnel = acts.iter().position(|a| matches!(a, Action::CreateVxlan(_) | Action::AddFdb { .. })).unwrap();
    let last_xfrm = acts.iter().rposition(|a| matches!(a, Action::Xfrm { .. })).unwrap();
    assert!(last_xfrm < first_tunnel, "SAs and policies go in first: {acts:?}");
    assert!(acts.iter().all(|a| !matches!(a, Action::Xfrm { vxlan, .. } if vxlan.as_deref() != Some("trx-aaaa"))));

    // The peer leaves: its tunnel entries go before its policies and SAs.
    let mut obs = Observed::default();
    for a in &acts {
        obs.record(a).unwrap();
    }
    let mut gone = desired(&nets, &eps[..1], &hosts, &me);
    encryption(&nets, &keys, &[], &mut gone, &me);
    let acts = diff(&gone, &obs);
    let del_fdb = acts.iter().position(|a| matches!(a, Action::DelFdb { .. })).unwrap();
    let first_xfrm = acts.iter().position(|a| matches!(a, Action::Xfrm { .. })).unwrap();
    assert!(del_fdb < first_xfrm, "{acts:?}");
    // The out policy and both SAs go; the in policy stays while the
    // network's VXLAN device does.
    assert_eq!(acts.iter().filter(|a| matches!(a, Action::Xfrm { .. })).count(), 3, "{acts:?}");

    // No key ring: the policies still go in, so traffic stops rather
    // than leave in the clear.
    let mut bare = desired(&nets, &eps, &hosts, &me);
    encryption(&nets, &BTreeMap::new(), &[], &mut bare, &me);
    assert_eq!((bare.xfrm.sas.len(), bare.xfrm.policies.len()), (0, 2));
    // Plain networks get none of it.
    let mut plain = nets.clone();
    plain[0].encrypted = false;
    plain[0].vxlan_port = None;
    let mut p = desired(&plain, &eps, &hosts, &me);
    encryption(&plain, &keys, &[], &mut p, &me);
    assert!(p.xfrm.sas.is_empty() && p.xfrm.policies.is_empty() && p.acks.is_empty());
    assert_eq!(p.vxlans["trx-aaaa"].spec.port, 4789);
}

#[test]
fn an_encrypted_networks_ipsec_state_goes_after_its_device() {
    let (nets, eps, hosts, me) = encrypted_lab();
    let ring = trellis_ipsec::KeyRing::new(trellis_ipsec::Secret::from_bytes([1; 32]), 0);
    let keys = BTreeMap::from([("aaaa".to_string(), ring)]);
    let mut d = desired(&nets, &eps, &hosts, &me);
    encryption(&nets, &keys, &[], &mut d, &me);
    let mut obs = Observed::default();
    for a in diff(&d, &Observed::default()) {
        obs.record(&a).unwrap();
    }
    assert_eq!((obs.xfrm.sas.len(), obs.xfrm.policies.len()), (2, 2));
    // The network goes: every SA and policy of it goes, after its
    // VXLAN device (no packet of it leaves without its policy).
    let mut gone = desired(&[], &[], &hosts, &me);
    encryption(&[], &keys, &[], &mut gone, &me);
    let acts = diff(&gone, &obs);
    let ops: Vec<_> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Xfrm { op, .. } => Some(op),
            _ => None,
        })
        .collect();
    assert_eq!(ops.iter().filter(|o| matches!(o, trellis_ipsec::XfrmOp::DelPolicy(_))).count(), 2, "{acts:?}");
    assert_eq!(ops.iter().filter(|o| matches!(o, trellis_ipsec::XfrmOp::DelSa(_))).count(), 2, "{acts:?}");
    assert_eq!(ops.len(), 4, "{acts:?}");
    let dev = acts.iter().position(|a| *a == Action::DeleteLink { name: "trx-aaaa".into() }).expect("device deleted");
    let first_xfrm = acts.iter().position(|a| matches!(a, Action::Xfrm { .. })).unwrap();
    assert!(dev < first_xfrm, "{acts:?}");
    for a in &acts {
        obs.record(a).unwrap();
    }
    assert!(obs.xfrm.sas.is_empty() && obs.xfrm.policies.is_empty());
}

struct WithKeys(Snapshot);
#[async_trait::async_trait]
impl DesiredSource for WithKeys {
    async fn load(&self) -> Result<Snapshot, String> {
        Ok(self.0.clone())
    }
}

/// [`encrypted_lab`] with its network's key ring, as a desired-state source.
fn encrypted_source() -> (Arc<WithKeys>, Identity) {
    let (networks, endpoints, hosts, me) = encrypted_lab();
    let ring = trellis_ipsec::KeyRing::new(trellis_ipsec::Secret::from_bytes([1; 32]), 0);
    let keys = BTreeMap::from([("aaaa".to_string(), ring)]);
    let snapshot = Snapshot {
        networks: Arc::new(networks),
        endpoints: endpoints.into(),
        hosts: Arc::new(hosts),
        keys: Arc::new(keys),
        ..Snapshot::default()
    };
    (Arc::new(WithKeys(snapshot)), me)
}

#[tokio::test]
async fn a_failed_policy_holds_an_encrypted_networks_tunnel_entries_back() {
    let (src, me) = encrypted_source();
    let dp = Arc::new(FakeDataplane::default());
    dp.failing_xfrm.store(true, Ordering::Relaxed);
    let r = Reconciler::new(dp.clone(), src, me);
    let report = r.pass().await.unwrap();
    assert!(!report.errors.is_empty());
    assert!(report.acks.is_empty(), "nothing acked while SAs are missing");
    let log = dp.take_log();
    assert!(log.iter().any(|a| matches!(a, Action::CreateEndpoint(_))), "local endpoints still come up");
    let net_tunnel = |a: &Action| match a {
        Action::CreateVxlan(v) => v.name == "trx-aaaa",
        Action::AddFdb { link, .. } | Action::AddNeigh { link, .. } => link == "trx-aaaa",
        _ => false,
    };
    assert!(!log.iter().any(net_tunnel), "no tunnel to a peer without its policy: {log:?}");
    // Once xfrm works the tunnel comes up and the host acks its keys.
    dp.failing_xfrm.store(false, Ordering::Relaxed);
    let report = r.full_pass().await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.acks["aaaa"], trellis_ipsec::Ack { rx: 1, tx: 1 });
    assert!(dp.with_state(|s| s.links["trx-aaaa"].fdb.len()) == 1);
}

/// An outbound SA deleted behind the agent's back is put back continuing
/// past the sequence numbers it was seen to send: from 0 the peer's
/// anti-replay window would drop every packet (the VM test saw traffic
/// never come back after `ip xfrm state deleteall`).
#[tokio::test]
async fn a_vanished_outbound_sa_comes_back_past_what_it_sent() {
    let (src, me) = encrypted_source();
    let dp = Arc::new(FakeDataplane::default());
    let r = Reconciler::new(dp.clone(), src, me);
    r.pass().await.unwrap();
    let out_sa = |log: &[Action]| {
        log.iter()
            .find_map(|a| match a {
                Action::Xfrm { op: trellis_ipsec::XfrmOp::AddSa(sa), .. }
                    if sa.dir == trellis_ipsec::xfrm::Dir::Out =>
                {
                    Some(sa.clone())
                }
                _ => None,
            })
            .expect("an outbound SA added")
    };
    let first = out_sa(&dp.take_log());
    assert_eq!(first.start_seq, 0, "a new SA starts from 0");
    // It sent 500 packets, read back by a full pass; then it vanished.
    dp.with_state(|s| s.xfrm.sas.get_mut(&first.id()).unwrap().oseq = 500);
    r.full_pass().await.unwrap();
    dp.with_state(|s| s.xfrm.sas.remove(&first.id()));
    r.full_pass().await.unwrap();
    let again = out_sa(&dp.take_log());
    assert_eq!(again.id(), first.id());
    assert_eq!(again.start_seq, 500 + (1 << 24));
}

#[tokio::test]
async fn passes_converge_and_then_do_nothing() {
    let dp = Arc::new(FakeDataplane::default());
    let src = Arc::new(Fixed(Mutex::new((
        vec![network("aaaa", "10.1.0.0/24", false)],
        vec![endpoint("e1", "aaaa", "10.1.0.2", "h1"), endpoint("e2", "aaaa", "10.1.0.3", "h1")],
    ))));
    let r = Reconciler::new(dp.clone(), src.clone(), Identity::local("h1"));
    let first = r.pass().await.unwrap();
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    assert_eq!(first.actions, 8);
    let second = r.pass().await.unwrap();
    assert_eq!(second.actions, 0, "a converged host needs nothing: {:?}", dp.take_log());
    assert!(second.generation > first.generation);

    // A veth deleted by hand: a fast pass trusts its picture of the
    // kernel and does not see it; the full pass repairs it.
    dp.with_state(|s| s.links.remove("trv-e1"));
    assert_eq!(r.pass().await.unwrap().actions, 0);
    // A removed endpoint goes with the same full pass.
    src.0.lock().unwrap().1.retain(|e| e.id != "e2");
    dp.take_log();
    r.full_pass().await.unwrap();
    let log = dp.take_log();
    assert!(log.iter().any(|a| matches!(a, Action::CreateEndpoint(s) if s.endpoint_id == "e1")), "{log:?}");
    assert!(log.contains(&Action::DeleteLink { name: "trv-e2".into() }), "{log:?}");
    assert_eq!(r.pass().await.unwrap().actions, 0);
}

#[tokio::test]
async fn deleting_endpoints_lose_their_devices_then_become_final() {
    let dp = Arc::new(FakeDataplane::default());
    let src = Arc::new(Fixed(Mutex::new((
        vec![network("aaaa", "10.1.0.0/24", false)],
        vec![endpoint("e1", "aaaa", "10.1.0.2", "h1"), endpoint("e2", "aaaa", "10.1.0.3", "h1")],
    ))));
    let r = Reconciler::new(dp.clone(), src.clone(), Identity::local("h1"));
    assert!(r.pass().await.unwrap().finalizable.is_empty());
    src.0.lock().unwrap().1[0].deleting = true;
    let rep = r.pass().await.unwrap();
    assert!(!dp.with_state(|s| s.links.contains_key("trv-e1")), "the device goes first");
    let ids: Vec<_> = rep.finalizable.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["e1"], "then the record may go");
    assert!(dp.with_state(|s| s.links.contains_key("trv-e2")));
}

#[tokio::test]
async fn a_gone_netns_is_reported_and_others_proceed() {
    let dp = Arc::new(FakeDataplane::default());
    dp.failing.lock().unwrap().push("e1".into());
    let src = Arc::new(Fixed(Mutex::new((
        vec![network("aaaa", "10.1.0.0/24", false)],
        vec![endpoint("e1", "aaaa", "10.1.0.2", "h1"), endpoint("e2", "aaaa", "10.1.0.3", "h1")],
    ))));
    let r = Reconciler::new(dp.clone(), src, Identity::local("h1"));
    let rep = r.pass().await.unwrap();
    assert_eq!(rep.gone, ["e1"]);
    assert!(rep.endpoint_error("e1").unwrap().contains("does not exist"));
    assert!(rep.endpoint_error("e2").is_none());
    assert!(dp.with_state(|s| s.links.contains_key("trv-e2")));
}

/// A source whose first load waits until the test lets it go, and
/// that counts its loads (one per pass).
struct Gated {
    inner: Fixed,
    loads: AtomicU64,
    gate: tokio::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}
#[async_trait::async_trait]
impl DesiredSource for Gated {
    async fn load(&self) -> Result<Snapshot, String> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        let gate = self.gate.lock().await.take();
        if let Some(gate) = gate {
            gate.await.map_err(|e| e.to_string())?;
        }
        self.inner.load().await
    }
}

#[tokio::test]
async fn concurrent_callers_share_passes() {
    let dp = Arc::new(FakeDataplane::default());
    let (open, gate) = tokio::sync::oneshot::channel();
    let src = Arc::new(Gated {
        inner: Fixed(Mutex::new((vec![network("aaaa", "10.1.0.0/24", false)], vec![]))),
        loads: AtomicU64::new(0),
        gate: tokio::sync::Mutex::new(Some(gate)),
    });
    let r = Arc::new(Reconciler::new(dp, src.clone(), Identity::local("h1")));
    // The first caller's pass starts, and is held in its load.
    let first = {
        let r = r.clone();
        tokio::spawn(async move { r.pass().await.unwrap().generation })
    };
    while src.loads.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    // Nineteen callers ask while it runs: it started before they asked,
    // so it cannot answer them; one more pass answers them all.
    let mut tasks = Vec::new();
    for _ in 0..19 {
        let r = r.clone();
        tasks.push(tokio::spawn(async move { r.pass().await.unwrap().generation }));
    }
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    open.send(()).unwrap();
    assert_eq!(first.await.unwrap(), 1);
    let mut gens = Vec::new();
    for t in tasks {
        gens.push(t.await.unwrap());
    }
    assert_eq!(gens, [2; 19], "every later caller gets the one pass that started after it asked");
    assert_eq!(r.last().generation, 2, "20 callers, 2 passes");
    assert_eq!(src.loads.load(Ordering::SeqCst), 2, "one load of the desired state per pass");
}

/// A three-host view from h1 (eBPF on) of service `web` (VIP 10.1.0.254)
/// with backends b1 (h1), b2 (h2), b3 (h3) and a client c1 on h1.
fn readiness_lab() -> (Vec<NetworkRecord>, Vec<EndpointRecord>, Vec<HostRecord>, Vec<ServiceRecord>, Identity) {
    let nets = vec![network("aaaa", "10.1.0.0/24", false)];
    let mut eps = Vec::new();
    for (i, h) in ["h1", "h2", "h3"].iter().enumerate() {
        let mut b = endpoint(&format!("b{}", i + 1), "aaaa", &format!("10.1.0.{}", i + 2), h);
        b.labels.insert(model::SERVICE_LABEL.into(), "web".into());
        eps.push(b);
    }
    eps.push(endpoint("c1", "aaaa", "10.1.0.9", "h1"));
    let hosts = vec![host("h1", "192.0.2.1"), host("h2", "192.0.2.2"), host("h3", "192.0.2.3")];
    let me = Identity { ebpf: true, underlay: Some("192.0.2.1".parse().unwrap()), ..Identity::local("h1") };
    (nets, eps, hosts, vec![service("web", "aaaa", "10.1.0.254")], me)
}

fn backend_key(ip: &str) -> trellis_ebpf::BackendKey {
    trellis_ebpf::BackendKey {
        svc_id: u32::from("10.1.0.254".parse::<std::net::Ipv4Addr>().unwrap()),
        ip: trellis_ebpf::be(ip.parse().unwrap()),
    }
}

#[test]
fn unready_backends_get_no_connection_and_draining_ones_keep_theirs() {
    use trellis_ebpf::SvcKey;
    let (nets, mut eps, hosts, svcs, me) = readiness_lab();
    let vip: std::net::Ipv4Addr = "10.1.0.254".parse().unwrap();
    let id = u32::from(vip);
    let ip = |s: &str| s.parse::<std::net::Ipv4Addr>().unwrap();
    let snap = |eps: &[EndpointRecord]| Snapshot {
        networks: Arc::new(nets.clone()),
        endpoints: eps.to_vec().into(),
        hosts: Arc::new(hosts.clone()),
        services: Arc::new(svcs.clone()),
        ..Snapshot::default()
    };
    let all = desired_host(&snap(&eps), &me);
    assert_eq!(all.tables.maglev[&id], vec![ip("10.1.0.2"), ip("10.1.0.3"), ip("10.1.0.4")]);
    assert_eq!(all.tables.backends.len(), 3);

    // b2 (on h2) is not ready, b3 (on h3) drains, b1 (here) drains too.
    eps[1].ready = false;
    eps[2].deleting = true;
    eps[2].drain_until_ms = Some(1);
    eps[0].deleting = true;
    eps[0].drain_until_ms = Some(1);
    let d = desired_host(&snap(&eps), &me);
    let t = &d.tables;
    assert_eq!(t.maglev[&id], Vec::<std::net::Ipv4Addr>::new(), "no new connection to any of them");
    assert_eq!(t.services[&SvcKey::new(vip, 80, 6)].count, 0);
    assert_eq!(t.vips[&vip].backends, 0);
    assert!(!t.backends.contains_key(&backend_key("10.1.0.3")), "the unready one loses its connections too");
    assert!(t.backends.contains_key(&backend_key("10.1.0.4")), "a draining one keeps its backend entry");
    assert!(t.backends.contains_key(&backend_key("10.1.0.2")), "here too");
    // ... and what its connections flow through: its veth and program
    // here, the tunnel entries towards it on the others.
    assert!(d.endpoints.contains_key(&model::host_ifname("b1")) && d.programs.contains_key(&model::host_ifname("b1")));
    let vx = &d.vxlans[&model::vxlan_name("aaaa")];
    assert!(vx.neigh.contains(&("10.1.0.4".parse().unwrap(), eps[2].mac)), "{:?}", vx.neigh);
    assert!(vx.neigh.contains(&("10.1.0.3".parse().unwrap(), eps[1].mac)), "an unready endpoint is still reachable");

    // From the converged tables of `all`: the Maglev table is rewritten
    // (its revision changed), the draining entries are not deleted.
    let mut obs = Observed::default();
    for a in diff(&all, &Observed::default()) {
        obs.record(&a).unwrap();
    }
    let ops = obs.tables.ops_to(t);
    assert_eq!(ops.put_maglev, vec![(id, vec![])]);
    assert_eq!(ops.del_backends, vec![backend_key("10.1.0.3")]);

    // The drains end: the entries go; a detached endpoint that did not
    // drain has none.
    eps[0].drain_until_ms = None;
    eps[2].drain_until_ms = None;
    let d = desired_host(&snap(&eps), &me);
    assert!(d.tables.backends.is_empty(), "{:?}", d.tables.backends);
    assert!(!d.endpoints.contains_key(&model::host_ifname("b1")));
    assert!(!d.vxlans[&model::vxlan_name("aaaa")].neigh.iter().any(|(a, _)| a.to_string() == "10.1.0.4"));
    // Ready again: b2 is back in both.
    eps[1].ready = true;
    let d = desired_host(&snap(&eps), &me);
    assert_eq!(d.tables.maglev[&id], vec![ip("10.1.0.3")]);
    assert!(d.tables.backends.contains_key(&backend_key("10.1.0.3")));
}

#[test]
fn a_draining_endpoint_keeps_its_veth_but_not_its_published_ports() {
    let nets = vec![network("aaaa", "10.1.0.0/24", false)];
    let mut e = endpoint("e1", "aaaa", "10.1.0.2", "h1");
    e.ports = vec![model::PublishedPort { proto: model::Proto::Tcp, host_ip: None, host_port: 18080, port: 80 }];
    let me = Identity::local("h1");
    let d = desired(&nets, std::slice::from_ref(&e), &[], &me);
    assert!(d.egress.published.iter().any(|p| p.host_port == 18080));
    e.deleting = true;
    e.drain_until_ms = Some(10);
    let d = desired(&nets, std::slice::from_ref(&e), &[], &me);
    assert!(d.endpoints.contains_key(&model::host_ifname("e1")));
    assert!(d.egress.published.is_empty(), "its host ports went with the detach");
}

#[tokio::test]
async fn a_draining_endpoint_is_not_final_until_its_drain_ends() {
    let dp = Arc::new(FakeDataplane::default());
    let src = Arc::new(Fixed(Mutex::new((
        vec![network("aaaa", "10.1.0.0/24", false)],
        vec![endpoint("e1", "aaaa", "10.1.0.2", "h1")],
    ))));
    let r = Reconciler::new(dp.clone(), src.clone(), Identity::local("h1"));
    r.pass().await.unwrap();
    {
        let mut s = src.0.lock().unwrap();
        s.1[0].deleting = true;
        s.1[0].drain_until_ms = Some(model::now_ms() + 60_000);
    }
    let rep = r.pass().await.unwrap();
    assert!(rep.finalizable.is_empty(), "its record stays while it drains");
    assert!(dp.with_state(|s| s.links.contains_key("trv-e1")), "so does its device");
    src.0.lock().unwrap().1[0].drain_until_ms = None;
    let rep = r.pass().await.unwrap();
    assert!(!dp.with_state(|s| s.links.contains_key("trv-e1")));
    assert_eq!(rep.finalizable.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["e1"]);
}

/// A source handing out the same records every time, as an informer does
/// while nothing changes.
struct Unchanged(Snapshot);
#[async_trait::async_trait]
impl DesiredSource for Unchanged {
    async fn load(&self) -> Result<Snapshot, String> {
        Ok(self.0.clone())
    }
}

#[tokio::test]
async fn an_unchanged_view_reuses_its_desired_state_and_skips_clean_tables_until_they_change() {
    let (snap, me) = mesh_lab(model::PublishMode::Ingress);
    let dp = Arc::new(FakeDataplane::default());
    let r = Reconciler::new(dp.clone(), Arc::new(Unchanged(snap)), me);
    let first = r.pass().await.unwrap();
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    assert!(dp.take_log().iter().any(|a| matches!(a, Action::UpdateTables(_))), "the tables went in");
    // The full passes that follow: computed once, then reused; the tables
    // compared once more (they changed in the first pass), then skipped.
    for _ in 0..3 {
        assert_eq!(r.full_pass().await.unwrap().actions, 0, "{:?}", dp.take_log());
    }
    assert_eq!((r.computed.load(Ordering::Relaxed), r.reused.load(Ordering::Relaxed)), (1, 3));
    assert_eq!(r.tables_skipped.load(Ordering::Relaxed), 2);
    // A published port's entry gone from the kernel (read back: a new
    // generation): the next full pass compares again and puts it back.
    let key = dp.with_state(|s| s.tables.published.keys().next().copied()).expect("a published entry");
    dp.with_state(|s| Arc::make_mut(&mut s.tables).published.remove(&key));
    let repaired = r.full_pass().await.unwrap();
    assert_eq!(repaired.actions, 1);
    let log = dp.take_log();
    assert!(
        log.iter().any(|a| matches!(a, Action::UpdateTables(ops) if ops.put_published.iter().any(|(k, _)| *k == key))),
        "{log:?}"
    );
    assert_eq!(r.tables_skipped.load(Ordering::Relaxed), 2, "not skipped with a new generation");
}

/// The incremental path against the full one, over random event sequences
/// from h1's point of view: three networks (h1 has endpoints on aaaa and
/// cccc; cccc has a service, bbbb none here), three other hosts. Every
/// step a random change: another host's endpoint added, removed, moved to
/// another network, host or address, detached, drained or made unready
/// (addresses from a small pool, so entries more than one endpoint gives
/// come and go), or — now and then — a change of another kind (one of h1's
/// endpoints, a host leaving or coming back). Whenever the incremental
/// path takes a step, its desired state must equal the full computation's
/// and its actions the full diff's against the kernel as it is; the
/// kernel then takes the actions and must match the desired state.
#[test]
fn incremental_passes_equal_full_ones_over_random_events() {
    use rand::{Rng, SeedableRng};
    let me = Identity {
        underlay: Some("198.19.0.1".parse().unwrap()),
        ebpf: true,
        dns_intercept: true,
        ..Identity::local("h1")
    };
    // Two plain networks, one a service lives on, one encrypted (its
    // tunnel entries' hosts are its IPsec peers).
    let nets: Vec<NetworkRecord> = ["aaaa", "bbbb", "cccc", "dddd"]
        .iter()
        .enumerate()
        .map(|(i, id)| NetworkRecord {
            vni: 4096 + i as u32,
            encrypted: *id == "dddd",
            ..network(id, &format!("10.{}.0.0/24", i + 1), false)
        })
        .collect();
    let keys = Arc::new(BTreeMap::from([(
        "dddd".to_string(),
        trellis_ipsec::KeyRing::new(trellis_ipsec::Secret::from_bytes([7; 32]), 0),
    )]));
    let all_hosts: Vec<HostRecord> = (1..=4).map(|i| host(&format!("h{i}"), &format!("198.19.0.{i}"))).collect();
    let services = Arc::new(vec![service("web", "cccc", "10.3.0.250")]);
    let labelled = |mut e: EndpointRecord| {
        if e.network_id == "cccc" {
            e.labels.insert(model::SERVICE_LABEL.into(), "web".into());
        }
        e
    };
    let address = |rng: &mut rand::rngs::StdRng, net: usize| -> (std::net::IpAddr, Mac) {
        let ip: std::net::IpAddr = format!("10.{}.0.{}", net + 1, rng.random_range(2..12)).parse().unwrap();
        // Mostly the address's MAC; now and then one of a few others.
        let mac = if rng.random_bool(0.8) { Mac::for_ip(ip) } else { Mac([2, 0, 0, 0, 1, rng.random_range(0..3)]) };
        (ip, mac)
    };
    let (mut patched, mut computed) = (0, 0);
    for seed in 0..8u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut next_id = 0;
        let mut fresh = |rng: &mut rand::rngs::StdRng, net: usize, host: &str| {
            next_id += 1;
            let (ip, mac) = address(rng, net);
            let mut e = endpoint(&format!("e{next_id:03}"), &nets[net].id, &ip.to_string(), host);
            e.mac = mac;
            labelled(e)
        };
        let mut eps: model::Table<EndpointRecord> = Default::default();
        eps.insert(fresh(&mut rng, 0, "h1"));
        eps.insert(fresh(&mut rng, 2, "h1"));
        eps.insert(fresh(&mut rng, 3, "h1"));
        for _ in 0..12 {
            let (net, h) = (rng.random_range(0..nets.len()), rng.random_range(2..=4));
            eps.insert(fresh(&mut rng, net, &format!("h{h}")));
        }
        let mut snap = Snapshot {
            networks: Arc::new(nets.clone()),
            endpoints: eps,
            hosts: Arc::new(all_hosts.clone()),
            services: services.clone(),
            keys: keys.clone(),
            ..Snapshot::default()
        };
        let mut want = Arc::new(desired::desired_host(&snap, &me));
        let mut kernel = Observed::default();
        for a in diff(&want, &kernel) {
            kernel.record(&a).unwrap();
        }
        assert!(diff(&want, &kernel).is_empty(), "the fake kernel converges");
        let mut index = super::incremental::Index::default();
        for step in 0..300 {
            let mut next = snap.clone();
            let remote: Vec<EndpointRecord> = next.endpoints.iter().filter(|e| e.host != "h1").cloned().collect();
            let pick = |rng: &mut rand::rngs::StdRng| remote[rng.random_range(0..remote.len())].clone();
            match rng.random_range(0..100) {
                0..30 => {
                    let (net, h) = (rng.random_range(0..nets.len()), rng.random_range(2..=4));
                    next.endpoints.insert(fresh(&mut rng, net, &format!("h{h}")));
                }
                30..50 if !remote.is_empty() => {
                    next.endpoints.remove(&pick(&mut rng).id);
                }
                50..90 if !remote.is_empty() => {
                    let mut e = pick(&mut rng);
                    match rng.random_range(0..6) {
                        0 => e.host = format!("h{}", rng.random_range(2..=4)),
                        1 => {
                            let net = rng.random_range(0..nets.len());
                            e.network_id = nets[net].id.clone();
                            (e.ip, e.mac) = address(&mut rng, net);
                            e = labelled(e);
                        }
                        2 => e.deleting = !e.deleting,
                        3 => {
                            e.deleting = true;
                            e.drain_until_ms = Some(1);
                        }
                        4 => e.ready = !e.ready,
                        _ => (e.ip, e.mac) = address(&mut rng, nets.iter().position(|n| n.id == e.network_id).unwrap()),
                    }
                    next.endpoints.insert(e);
                }
                90..94 => {
                    let net = rng.random_range(0..nets.len());
                    next.endpoints.insert(fresh(&mut rng, net, "h1"));
                }
                94..97 => {
                    let hosts: Vec<HostRecord> = all_hosts.iter().filter(|h| h.id != "h4").cloned().collect();
                    next.hosts = Arc::new(hosts);
                }
                _ => next.hosts = Arc::new(all_hosts.clone()),
            }
            let full = desired::desired_host(&next, &me);
            let mut mine = want.clone();
            let acts = match super::incremental::remote_endpoints(&snap, &next, &mut mine, &kernel, &me, &mut index) {
                Some(acts) => {
                    patched += 1;
                    assert_eq!(*mine, full, "seed {seed} step {step}: the patched desired state");
                    assert_eq!(acts, diff(&full, &kernel), "seed {seed} step {step}: the actions");
                    acts
                }
                None => {
                    computed += 1;
                    mine = Arc::new(full.clone());
                    diff(&full, &kernel)
                }
            };
            for a in &acts {
                kernel.record(a).unwrap();
            }
            assert!(diff(&full, &kernel).is_empty(), "seed {seed} step {step}: converged");
            (snap, want) = (next, mine);
        }
    }
    // Both paths were taken, the incremental one most.
    assert!(patched > 1000, "{patched} patched steps");
    assert!(computed > 100, "{computed} computed steps");
}

#[test]
fn a_host_with_a_smaller_underlay_sizes_every_network_down_and_the_containers_follow() {
    // Created on a jumbo-frame host (9000 - 50), then a host on a
    // 1400-byte VPN joins.
    let mut net = network("aaaa", "10.1.0.0/24", false);
    net.mtu = 8950;
    let big = HostRecord { underlay_mtu: 9000, ..host("h1", "198.19.0.1") };
    let small = HostRecord { underlay_mtu: 1400, ..host("h2", "198.19.0.2") };
    let me = Identity { underlay: Some("198.19.0.1".parse().unwrap()), ..Identity::local("h1") };
    let eps: Vec<EndpointRecord> =
        vec![endpoint("e1", "aaaa", "10.1.0.2", "h1"), endpoint("e2", "aaaa", "10.1.0.3", "h2")];
    let snap = |hosts: Vec<HostRecord>| Snapshot {
        networks: Arc::new(vec![net.clone()]),
        endpoints: eps.clone().into(),
        hosts: Arc::new(hosts),
        ..Snapshot::default()
    };
    let alone = desired::desired_host(&snap(vec![big.clone()]), &me);
    assert_eq!(alone.bridges["trb-aaaa"].mtu, 8950, "alone, the record's MTU");
    let d = desired::desired_host(&snap(vec![big.clone(), small.clone()]), &me);
    assert_eq!(d.bridges["trb-aaaa"].mtu, 1350, "the bridge");
    assert_eq!(d.endpoints["trv-e1"].mtu, 1350, "the endpoint's veth");
    assert_eq!(d.vxlans[&model::vxlan_name("aaaa")].spec.mtu, 1350, "the VXLAN device");
    // The kernel has the old size: the container's end is set first.
    let mut obs = Observed::default();
    obs.links.insert(
        "trv-e1".into(),
        ObservedLink {
            kind: LinkKind::Veth,
            up: true,
            mtu: 8950,
            master: Some("trb-aaaa".into()),
            ..Default::default()
        },
    );
    let mut acts = Vec::new();
    crate::reconcile::diff::links::endpoints(&d, &obs, &mut acts);
    let spec = &d.endpoints["trv-e1"];
    assert_eq!(
        acts,
        vec![
            Action::SetContainerMtu { netns: spec.netns.clone(), ifname: spec.ifname.clone(), mtu: 1350 },
            Action::SetLink { name: "trv-e1".into(), mtu: 1350, master: Some("trb-aaaa".into()) },
        ]
    );
    // The small host leaves: back to the record's.
    let after = desired::desired_host(&snap(vec![big.clone()]), &me);
    assert_eq!(after.endpoints["trv-e1"].mtu, 8950);
    // The probe device is as large as this host's underlay carries, its
    // packets never fragmented; a network's device fragments.
    let probe = &d.vxlans[model::PROBE_VXLAN].spec;
    assert_eq!((probe.mtu, probe.dont_fragment), (8950, true));
    assert!(!d.vxlans[&model::vxlan_name("aaaa")].spec.dont_fragment);
    let unknown = desired::desired_host(&snap(vec![HostRecord { underlay_mtu: 0, ..big.clone() }]), &me);
    assert_eq!(unknown.vxlans[model::PROBE_VXLAN].spec.mtu, 1280, "IPv6's minimum when this host's is not known");
    // A probe device of an older agent (fragmenting) is made again.
    let mut obs = Observed::default();
    for a in diff(&d, &Observed::default()) {
        obs.record(&a).unwrap();
    }
    assert!(diff(&d, &obs).is_empty());
    obs.links.get_mut(model::PROBE_VXLAN).unwrap().dont_fragment = false;
    let acts = diff(&d, &obs);
    assert!(acts.contains(&Action::DeleteLink { name: model::PROBE_VXLAN.into() }), "{acts:?}");
    assert!(acts.iter().any(|a| matches!(a, Action::CreateVxlan(v) if v.dont_fragment)), "{acts:?}");
}

#[test]
fn a_network_is_sized_for_the_smallest_underlay_that_advertises_one() {
    let mut net = network("aaaa", "10.1.0.0/24", false);
    net.mtu = 8950;
    let h = |mtu| HostRecord { underlay_mtu: mtu, ..host("h", "198.19.0.1") };
    assert_eq!(model::network_mtu(&net, &[]), 8950);
    assert_eq!(model::network_mtu(&net, &[h(9000), h(0)]), 8950, "0: an older agent, not known");
    assert_eq!(model::network_mtu(&net, &[h(9000), h(1400), h(1500)]), 1350);
    net.encrypted = true;
    assert_eq!(model::network_mtu(&net, &[h(9000), h(1400)]), 1310, "ESP's overhead too");
    net.encrypted = false;
    net.mtu = 1200;
    assert_eq!(model::network_mtu(&net, &[h(1500)]), 1200, "an operator's smaller --mtu stays");
    net.mtu = 8950;
    assert_eq!(model::network_mtu(&net, &[h(600)]), 576, "never below 576");
}

#[test]
fn a_host_that_asks_for_esp_in_udp_gets_it_from_every_peer() {
    let (nets, eps, mut hosts, me) = encrypted_lab();
    let ring = trellis_ipsec::KeyRing::new(trellis_ipsec::Secret::from_bytes([1; 32]), 0);
    let keys = BTreeMap::from([("aaaa".to_string(), ring)]);
    let encaps = |hosts: &[HostRecord], me: &Identity| {
        let mut d = desired(&nets, &eps, hosts, me);
        encryption(&nets, &keys, hosts, &mut d, me);
        d.xfrm.sas.values().map(|sa| sa.encap).collect::<Vec<_>>()
    };
    assert_eq!(encaps(&hosts, &me), vec![None, None], "plain ESP unless someone asks");
    // The peer asks (its record says so): this host follows.
    hosts[1].capabilities.insert(model::ESP_IN_UDP_CAPABILITY.into(), true);
    assert_eq!(encaps(&hosts, &me), vec![Some(4500), Some(4500)]);
    // This host asks: towards every peer.
    hosts[1].capabilities.clear();
    let asking = Identity { esp_in_udp: true, esp_udp_port: 14500, ..me.clone() };
    assert_eq!(encaps(&hosts, &asking), vec![Some(14500), Some(14500)]);
    // The MTU leaves room for the UDP header where anyone carries it.
    let mut n = nets[0].clone();
    n.mtu = 1410;
    hosts[0].capabilities.insert(model::ESP_IN_UDP_CAPABILITY.into(), true);
    assert_eq!(model::network_mtu(&n, &hosts), 1402);
    let sized: Vec<HostRecord> = hosts.iter().map(|h| HostRecord { underlay_mtu: 1500, ..h.clone() }).collect();
    assert_eq!(model::network_mtu(&n, &sized), 1402, "1500 - 50 - 48");
}
