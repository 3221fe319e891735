//! The routing mesh's programs on hand-built frames through
//! `BPF_PROG_TEST_RUN` (see `common::RunLab`): a connection to a published
//! port taken on an uplink (DNAT to the backend, sent from the host's mesh
//! MAC), the backend's replies on its host (back out of the uplink with the
//! published address, or back to the mesh MAC of the host that took it),
//! the replies arriving over the tunnel, and what the mesh leaves alone.
//! Root tests (`--run-ignored all`).

use std::net::Ipv4Addr;

use trellis_ebpf::{
    BackendInfo, BackendKey, CFG_MESH, EndpointInfo, MAGLEV_M, MESH_INGRESS, MESH_RETURN, MaglevTable, MeshFlow,
    NetInfo, PubInfo, PubKey, RnatKey, be, mesh_mac,
};
use trellis_integration::require_root;

mod common;
use common::frames::*;
use common::{Prog, RunLab, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};

const NET: u32 = 4096;
/// The backend: the lab's endpoint.
const BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 2);
const BACKEND_MAC: Mac = [2, 0x42, 10, 210, 0, 2];
const GW_MAC: Mac = [2, 0x42, 10, 210, 0, 0];
/// This host's underlay address, and another host's.
const HOST: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const OTHER_HOST: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
const UPLINK_MAC: Mac = [0x52, 0x54, 0, 0, 0, 1];
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 254);
const CLIENT_MAC: Mac = [0x52, 0x54, 0, 0, 0, 0xfe];
const BRIDGE_IFINDEX: u32 = 42;
const SVC: u32 = 7;

fn tcp_frame(
    (dmac, smac): (Mac, Mac),
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    eth(dmac, smac, ETH_P_IP, &ipv4(src, dst, PROTO_TCP, &tcp(src, dst, sport, dport, 1000, 0, flags, payload)))
}

fn udp_frame((dmac, smac): (Mac, Mac), (src, sport): (Ipv4Addr, u16), (dst, dport): (Ipv4Addr, u16)) -> Vec<u8> {
    eth(dmac, smac, ETH_P_IP, &ipv4(src, dst, PROTO_UDP, &udp(src, dst, sport, dport, b"ping")))
}

/// A lab where this host (HOST, its mesh MAC set, CFG_MESH on) publishes
/// port 8080/tcp and 5353/udp of service SVC, whose one backend is the
/// lab's endpoint on port 80 (53 for UDP).
fn lab() -> RunLab {
    require_root();
    let mut lab = RunLab::new();
    lab.dp.set_endpoint(RunLab::IFINDEX, EndpointInfo::new(BACKEND_IP, BACKEND_MAC, NET)).unwrap();
    lab.dp.put_net((Ipv4Addr::new(10, 210, 0, 0), 24), NetInfo { net_id: NET, flags: 0 }).unwrap();
    lab.dp.set_mesh_mac(mesh_mac(HOST)).unwrap();
    lab.dp.put_mesh_addr(HOST).unwrap();
    lab.dp.set_config(CFG_MESH, true).unwrap();
    lab.dp.put_maglev(SVC, &MaglevTable { ip: [be(BACKEND_IP); MAGLEV_M] }).unwrap();
    lab.dp
        .put_backend(BackendKey { svc_id: SVC, ip: be(BACKEND_IP) }, BackendInfo { mac: BACKEND_MAC, pad: 0 })
        .unwrap();
    for (port, proto, target) in [(8080, PROTO_TCP, 80u16), (5353, PROTO_UDP, 53)] {
        let info =
            PubInfo { id: SVC, target_port: target.to_be(), pad: 0, count: 1, revision: 1, bridge: BRIDGE_IFINDEX };
        lab.dp.put_published(PubKey::new(port, proto), info).unwrap();
    }
    lab
}

fn key(client: (Ipv4Addr, u16), backend: (Ipv4Addr, u16), proto: u8) -> RnatKey {
    RnatKey {
        client: be(client.0),
        backend: be(backend.0),
        cport: client.1.to_be(),
        bport: backend.1.to_be(),
        proto,
        pad: [0; 3],
    }
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn a_published_port_is_dnated_into_the_bridge_and_its_replies_leave_by_the_uplink() {
    let lab = lab();
    let syn = tcp_frame((UPLINK_MAC, CLIENT_MAC), (CLIENT, 40000), (HOST, 8080), SYN, b"");
    let r = lab.run(Prog::FromUplink, &syn);
    assert_eq!(r.verdict, TC_ACT_REDIRECT, "sent into the network's bridge");
    assert!(ip_checksum_ok(&r.frame) && l4_checksum_ok(&r.frame), "checksums of {:02x?}", r.frame);
    assert_eq!(
        r.frame,
        tcp_frame((BACKEND_MAC, mesh_mac(HOST)), (CLIENT, 40000), (BACKEND_IP, 80), SYN, b""),
        "to the backend's MAC, address and port, from the host's mesh MAC; the client's address kept"
    );
    let flows = lab.dp.mesh_flows().unwrap();
    let k = key((CLIENT, 40000), (BACKEND_IP, 80), PROTO_TCP);
    let want = MeshFlow {
        addr: be(HOST),
        port: 8080u16.to_be(),
        kind: MESH_INGRESS,
        pad: 0,
        ifindex: RunLab::IFINDEX,
        peer_mac: CLIENT_MAC,
        own_mac: UPLINK_MAC,
    };
    assert_eq!(flows, vec![(k, want)]);
    assert_eq!(lab.dp.svc_stats(SVC).unwrap().selections, 1);

    // The backend (on this host) answers: the reply leaves by the uplink,
    // from the published address and port, to the client's MAC.
    let reply = tcp_frame((GW_MAC, BACKEND_MAC), (BACKEND_IP, 80), (CLIENT, 40000), SYN | ACK, b"");
    let r = lab.send(&reply);
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    assert!(ip_checksum_ok(&r.frame) && l4_checksum_ok(&r.frame));
    assert_eq!(r.frame, tcp_frame((CLIENT_MAC, UPLINK_MAC), (HOST, 8080), (CLIENT, 40000), SYN | ACK, b""));

    // The same arriving over a tunnel (a backend on another host sent it
    // back to this host's mesh MAC).
    let over = tcp_frame((mesh_mac(HOST), BACKEND_MAC), (BACKEND_IP, 80), (CLIENT, 40000), ACK, b"hi");
    let r = lab.run(Prog::FromTunnel, &over);
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    assert_eq!(r.frame, tcp_frame((CLIENT_MAC, UPLINK_MAC), (HOST, 8080), (CLIENT, 40000), ACK, b"hi"));
    // To this mesh MAC but no connection of the mesh: dropped, not flooded.
    let stray = tcp_frame((mesh_mac(HOST), BACKEND_MAC), (BACKEND_IP, 80), (CLIENT, 40001), ACK, b"");
    assert_eq!(lab.run(Prog::FromTunnel, &stray).verdict, TC_ACT_SHOT);
    // Any other frame over the tunnel is the bridge's.
    let other = tcp_frame((GW_MAC, BACKEND_MAC), (BACKEND_IP, 80), (CLIENT, 40001), ACK, b"");
    let r = lab.run(Prog::FromTunnel, &other);
    assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &other));
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn udp_is_published_too_and_what_is_not_published_is_the_hosts() {
    let mut lab = lab();
    let q = udp_frame((UPLINK_MAC, CLIENT_MAC), (CLIENT, 40000), (HOST, 5353));
    let r = lab.run(Prog::FromUplink, &q);
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    assert!(ip_checksum_ok(&r.frame) && l4_checksum_ok(&r.frame));
    assert_eq!(r.frame, udp_frame((BACKEND_MAC, mesh_mac(HOST)), (CLIENT, 40000), (BACKEND_IP, 53)));
    let a = udp_frame((GW_MAC, BACKEND_MAC), (BACKEND_IP, 53), (CLIENT, 40000));
    let r = lab.send(&a);
    assert_eq!(
        (r.verdict, r.frame),
        (TC_ACT_REDIRECT, udp_frame((CLIENT_MAC, UPLINK_MAC), (HOST, 5353), (CLIENT, 40000)))
    );

    // Left alone: a port not published, another protocol on the port, an
    // address that is not the host's, a TCP segment past the SYN of no
    // connection of the mesh (a reply to one of the host's own).
    for f in [
        tcp_frame((UPLINK_MAC, CLIENT_MAC), (CLIENT, 40009), (HOST, 8080), ACK, b"not ours"),
        tcp_frame((UPLINK_MAC, CLIENT_MAC), (CLIENT, 40009), (HOST, 8080), SYN | ACK, b""),
        tcp_frame((UPLINK_MAC, CLIENT_MAC), (CLIENT, 40000), (HOST, 8081), SYN, b""),
        udp_frame((UPLINK_MAC, CLIENT_MAC), (CLIENT, 40000), (HOST, 8080)),
        tcp_frame((UPLINK_MAC, CLIENT_MAC), (CLIENT, 40000), (Ipv4Addr::new(198, 19, 0, 9), 8080), SYN, b""),
    ] {
        let r = lab.run(Prog::FromUplink, &f);
        assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &f));
    }
    // A service whose backends are gone: left to the host, which refuses
    // it (nothing listens on the port there).
    let info = PubInfo { id: SVC, target_port: 80u16.to_be(), pad: 0, count: 0, revision: 2, bridge: BRIDGE_IFINDEX };
    lab.dp.put_published(PubKey::new(8080, PROTO_TCP), info).unwrap();
    let f = tcp_frame((UPLINK_MAC, CLIENT_MAC), (CLIENT, 40002), (HOST, 8080), SYN, b"");
    let r = lab.run(Prog::FromUplink, &f);
    assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &f));
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn a_backend_sends_replies_back_to_the_host_that_took_the_connection() {
    let lab = lab();
    // Another host took this connection: it arrives from its mesh MAC.
    let there = mesh_mac(OTHER_HOST);
    let syn = tcp_frame((BACKEND_MAC, there), (CLIENT, 41000), (BACKEND_IP, 80), SYN, b"");
    let r = lab.deliver(&syn);
    assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &syn), "delivered as it came");
    let k = key((CLIENT, 41000), (BACKEND_IP, 80), PROTO_TCP);
    let flows = lab.dp.mesh_flows().unwrap();
    assert_eq!(flows.len(), 1);
    assert_eq!((flows[0].0, flows[0].1.kind, flows[0].1.peer_mac), (k, MESH_RETURN, there));
    // The reply goes to that MAC (over the tunnel), addresses untouched.
    let reply = tcp_frame((GW_MAC, BACKEND_MAC), (BACKEND_IP, 80), (CLIENT, 41000), SYN | ACK, b"");
    let r = lab.send(&reply);
    assert_eq!(r.verdict, TC_ACT_OK);
    assert_eq!(r.frame, tcp_frame((there, BACKEND_MAC), (BACKEND_IP, 80), (CLIENT, 41000), SYN | ACK, b""));
    // The same addresses and ports, now a connection straight to the
    // backend (routed by the host, from the gateway's MAC): it owns them,
    // its replies are not steered.
    let straight = tcp_frame((BACKEND_MAC, GW_MAC), (CLIENT, 41000), (BACKEND_IP, 80), SYN, b"");
    assert_eq!(lab.deliver(&straight).verdict, TC_ACT_OK);
    assert!(lab.dp.mesh_flows().unwrap().is_empty(), "the stale mesh entry is gone");
    let r = lab.send(&reply);
    assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &reply), "a reply of the straight connection goes as it is");
    // A connection another host takes with addresses this host took once:
    // the newer host's.
    lab.run(Prog::FromUplink, &tcp_frame((UPLINK_MAC, CLIENT_MAC), (CLIENT, 41000), (HOST, 8080), SYN, b""));
    assert_eq!(lab.dp.mesh_flows().unwrap()[0].1.kind, MESH_INGRESS);
    lab.deliver(&syn);
    let flows = lab.dp.mesh_flows().unwrap();
    assert_eq!((flows[0].1.kind, flows[0].1.peer_mac), (MESH_RETURN, there), "{flows:?}");
    // Traffic of the endpoint's own to the outside is not touched.
    let own = tcp_frame((GW_MAC, BACKEND_MAC), (BACKEND_IP, 80), (CLIENT, 41001), ACK, b"");
    let r = lab.send(&own);
    assert_eq!((r.verdict, &r.frame), (TC_ACT_OK, &own));
}
