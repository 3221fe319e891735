//! The netlink messages the agent sends to create and change links,
//! neighbour and FDB entries and routes, built as plain values by pure
//! functions (rtnetlink's `LinkBridge`, `LinkVxlan`, `LinkVeth`,
//! `LinkUnspec` and `RouteMessageBuilder` build values; the neighbour
//! messages are built here by hand). The executor code (the per-kind
//! modules) looks up interface indexes, sends these and maps the errors;
//! what goes to the kernel is decided, and unit-tested, here.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::RawFd;

use netlink_packet_route::AddressFamily;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkMessage, VxlanDf};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteMessage, RouteType};
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

use crate::dataplane::{Mac, VxlanSpec};

/// A new bridge with a fixed MAC (see [`crate::dataplane::Action::CreateBridge`]),
/// up from the start (as rtnetlink's `LinkBridge::new` makes it).
pub fn bridge(name: &str, mtu: u32, mac: Mac) -> LinkMessage {
    LinkBridge::new(name).mtu(mtu).address(mac.0.to_vec()).build()
}

/// Link `index` gets the MAC `mac`.
pub fn set_mac(index: u32, mac: Mac) -> LinkMessage {
    LinkUnspec::new_with_index(index).address(mac.0.to_vec()).build()
}

/// Only the MTU of link `index`.
pub fn set_mtu(index: u32, mtu: u32) -> LinkMessage {
    LinkUnspec::new_with_index(index).mtu(mtu).build()
}

/// Link `index` sized, up, and a port of the bridge `master` when given.
pub fn set_link(index: u32, mtu: u32, master: Option<u32>) -> LinkMessage {
    let mut msg = LinkUnspec::new_with_index(index).mtu(mtu).up();
    if let Some(m) = master {
        msg = msg.controller(m);
    }
    msg.build()
}

/// Link `index` sized and a port of `master`, its up/down state left as
/// it is (a new veth is down).
pub fn port_of(index: u32, mtu: u32, master: u32) -> LinkMessage {
    LinkUnspec::new_with_index(index).mtu(mtu).controller(master).build()
}

/// Link `index` up (nothing else changed).
pub fn up(index: u32) -> LinkMessage {
    LinkUnspec::new_with_index(index).up().build()
}

/// A network's (or the probe's) VXLAN device over the IPv4 underlay
/// address `local`: no learning (the FDB is programmed), ARP answered
/// locally from the neighbour entries (proxy), the host's VTEP MAC.
/// Created down (set up by a later `SetLink`).
pub fn vxlan(v: &VxlanSpec, local: Ipv4Addr) -> LinkMessage {
    let dev = LinkVxlan::new(&v.name, v.vni)
        .port(v.port)
        .local(local)
        .learning(false)
        .proxy(true)
        .mtu(v.mtu)
        .address(v.mac.0.to_vec());
    if v.dont_fragment { dev.df(VxlanDf::Set) } else { dev }.build()
}

/// A veth pair: `host_if` in the agent's namespace, and its peer named
/// `peer` with the endpoint's MAC, both with `mtu`. With `peer_netns` (an
/// open namespace file) the peer is created directly in that namespace;
/// without, next to `host_if` (for an engine to move in).
pub fn veth(host_if: &str, peer: &str, mac: Mac, mtu: u32, peer_netns: Option<RawFd>) -> LinkMessage {
    let mut peer = LinkUnspec::new_with_name(peer).address(mac.0.to_vec()).mtu(mtu);
    if let Some(fd) = peer_netns {
        peer = peer.setns_by_fd(fd);
    }
    LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host_if.to_string())
        .mtu(mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
        .build()
}

fn neighbour_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

/// A static FDB entry of the VXLAN device `index`: frames to `mac` go to
/// the VTEP `dst` (`bridge fdb replace MAC dev DEV dst DST self permanent`;
/// what rtnetlink's `add_bridge(..).destination(..).flags(Own)` builds).
pub fn fdb_entry(index: u32, mac: Mac, dst: IpAddr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.header.kind = RouteType::Unspec;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    msg.attributes.push(NeighbourAttribute::Destination(neighbour_address(dst)));
    msg
}

/// A static FDB entry of the bridge whose port is `index`: frames to `mac`
/// go out of that port (`bridge fdb replace MAC dev PORT master static`).
pub fn port_fdb_static(index: u32, mac: Mac) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Noarp;
    msg.header.kind = RouteType::Unspec;
    msg.header.flags = NeighbourFlags::Controller;
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    msg
}

/// The FDB entry to delete (`bridge fdb del MAC dev DEV dst DST self`):
/// rtnetlink has no builder for a bridge neighbour to delete.
pub fn fdb_delete(index: u32, mac: Mac, dst: IpAddr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    msg.attributes.push(NeighbourAttribute::Destination(neighbour_address(dst)));
    msg
}

/// A permanent neighbour entry `ip` → `mac` on link `index` (`ip neigh
/// replace IP lladdr MAC dev DEV nud permanent`; what rtnetlink's
/// `add(..).link_layer_address(..)` builds).
pub fn neighbour(index: u32, ip: IpAddr, mac: Mac) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.header.kind = RouteType::Unspec;
    msg.attributes.push(NeighbourAttribute::Destination(neighbour_address(ip)));
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    msg
}

/// The neighbour entry for `ip` on link `index`, to delete.
pub fn neighbour_delete(index: u32, ip: IpAddr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    msg.header.ifindex = index;
    msg.attributes.push(NeighbourAttribute::Destination(neighbour_address(ip)));
    msg
}

/// A container's default route: via `gw` out of its interface `oif`.
pub fn default_route(gw: Ipv4Addr, oif: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new().gateway(gw).output_interface(oif).build()
}

/// The IPv6 default route via `gw` out of `oif`.
pub fn default_route6(gw: std::net::Ipv6Addr, oif: u32) -> RouteMessage {
    RouteMessageBuilder::<std::net::Ipv6Addr>::new().gateway(gw).output_interface(oif).build()
}

/// The request for the IPv4 routes of every table (a dump).
pub fn ipv4_routes() -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new().build()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use netlink_packet_route::link::{InfoVxlan, LinkAttribute, LinkFlags, LinkInfo};
    use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader};

    use super::*;

    const MAC: Mac = Mac([0x02, 0x42, 0x0a, 0x01, 0x00, 0x02]);

    fn has(msg: &LinkMessage, want: &LinkAttribute) -> bool {
        msg.attributes.contains(want)
    }

    /// The kind and kind-specific data of a link message.
    fn info(msg: &LinkMessage) -> (Option<InfoKind>, Option<InfoData>) {
        let mut kind = None;
        let mut data = None;
        for a in &msg.attributes {
            if let LinkAttribute::LinkInfo(infos) = a {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => kind = Some(k.clone()),
                        LinkInfo::Data(d) => data = Some(d.clone()),
                        _ => {}
                    }
                }
            }
        }
        (kind, data)
    }

    fn is_up(msg: &LinkMessage) -> bool {
        msg.header.flags.contains(LinkFlags::Up) && msg.header.change_mask.contains(LinkFlags::Up)
    }

    #[test]
    fn bridge_has_name_mtu_and_fixed_mac() {
        let msg = bridge("trb-aaaa", 1450, MAC);
        assert!(has(&msg, &LinkAttribute::IfName("trb-aaaa".into())), "{msg:?}");
        assert!(has(&msg, &LinkAttribute::Mtu(1450)), "{msg:?}");
        assert!(has(&msg, &LinkAttribute::Address(MAC.0.to_vec())), "{msg:?}");
        assert_eq!(info(&msg).0, Some(InfoKind::Bridge));
        // rtnetlink's LinkBridge::new asks for it up at once.
        assert!(is_up(&msg), "{msg:?}");
    }

    #[test]
    fn set_mac_changes_only_the_address() {
        let msg = set_mac(7, MAC);
        assert_eq!(msg.header.index, 7);
        assert_eq!(msg.attributes, vec![LinkAttribute::Address(MAC.0.to_vec())]);
        assert!(!is_up(&msg));
    }

    #[test]
    fn set_link_sizes_and_ups_and_attaches_to_a_bridge_when_given() {
        let port = set_link(7, 1450, Some(3));
        assert_eq!(port.header.index, 7);
        assert!(is_up(&port), "{port:?}");
        assert!(has(&port, &LinkAttribute::Mtu(1450)), "{port:?}");
        assert!(has(&port, &LinkAttribute::Controller(3)), "{port:?}");
        let alone = set_link(7, 1280, None);
        assert!(is_up(&alone));
        assert_eq!(alone.attributes, vec![LinkAttribute::Mtu(1280)]);
    }

    #[test]
    fn a_port_is_plugged_without_touching_its_state() {
        let port = port_of(7, 1450, 3);
        assert_eq!(port.header.index, 7);
        assert!(!is_up(&port) && port.header.change_mask.is_empty(), "{port:?}");
        assert_eq!(port.attributes, vec![LinkAttribute::Mtu(1450), LinkAttribute::Controller(3)]);
    }

    #[test]
    fn up_changes_only_the_up_flag() {
        let msg = up(5);
        assert_eq!(msg.header.index, 5);
        assert!(is_up(&msg));
        assert_eq!(msg.header.change_mask, LinkFlags::Up);
        assert!(msg.attributes.is_empty(), "{msg:?}");
    }

    #[test]
    fn vxlan_has_vni_port_local_address_and_learning_off() {
        let spec = VxlanSpec {
            name: "trx-aaaa".into(),
            vni: 4097,
            port: 4789,
            local: "192.0.2.1".parse().unwrap(),
            mtu: 1450,
            mac: MAC,
            sysctls: Vec::new(),
            dont_fragment: false,
        };
        let msg = vxlan(&spec, Ipv4Addr::new(192, 0, 2, 1));
        assert!(has(&msg, &LinkAttribute::IfName("trx-aaaa".into())), "{msg:?}");
        assert!(has(&msg, &LinkAttribute::Mtu(1450)), "{msg:?}");
        assert!(has(&msg, &LinkAttribute::Address(MAC.0.to_vec())), "{msg:?}");
        let (kind, data) = info(&msg);
        assert_eq!(kind, Some(InfoKind::Vxlan));
        let Some(InfoData::Vxlan(data)) = data else { panic!("no vxlan data: {msg:?}") };
        for want in [
            InfoVxlan::Id(4097),
            InfoVxlan::Port(4789),
            InfoVxlan::Local(Ipv4Addr::new(192, 0, 2, 1)),
            InfoVxlan::Learning(false),
            InfoVxlan::Proxy(true),
        ] {
            assert!(data.contains(&want), "{want:?} missing from {data:?}");
        }
        // Created down: its sysctls are written before SetLink sets it up.
        assert!(!is_up(&msg), "{msg:?}");
        // Unicast only: no multicast group, no remote.
        assert!(!data.iter().any(|d| matches!(d, InfoVxlan::Group(_) | InfoVxlan::Group6(_))), "{data:?}");
        // The kernel's default (unset) unless asked: the probe device's
        // packets carry Don't Fragment.
        assert!(!data.iter().any(|d| matches!(d, InfoVxlan::Df(_))), "{data:?}");
        let probe = vxlan(&VxlanSpec { dont_fragment: true, ..spec }, Ipv4Addr::new(192, 0, 2, 1));
        let (_, Some(InfoData::Vxlan(data))) = info(&probe) else { panic!("no vxlan data: {probe:?}") };
        assert!(data.contains(&InfoVxlan::Df(VxlanDf::Set)), "{data:?}");
    }

    /// The peer end of a veth message.
    fn peer_of(msg: &LinkMessage) -> LinkMessage {
        match info(msg) {
            (Some(InfoKind::Veth), Some(InfoData::Veth(InfoVeth::Peer(p)))) => p,
            other => panic!("not a veth pair: {other:?}"),
        }
    }

    #[test]
    fn veth_into_a_namespace_creates_the_peer_there_named_and_addressed() {
        let msg = veth("trv-e1", "eth0", MAC, 1450, Some(42));
        assert!(has(&msg, &LinkAttribute::IfName("trv-e1".into())), "{msg:?}");
        assert!(has(&msg, &LinkAttribute::Mtu(1450)), "{msg:?}");
        // The host end keeps a kernel-chosen MAC.
        assert!(!msg.attributes.iter().any(|a| matches!(a, LinkAttribute::Address(_))), "{msg:?}");
        let peer = peer_of(&msg);
        assert!(has(&peer, &LinkAttribute::IfName("eth0".into())), "{peer:?}");
        assert!(has(&peer, &LinkAttribute::Address(MAC.0.to_vec())), "{peer:?}");
        assert!(has(&peer, &LinkAttribute::Mtu(1450)), "{peer:?}");
        assert!(has(&peer, &LinkAttribute::NetNsFd(42)), "{peer:?}");
    }

    #[test]
    fn veth_for_an_engine_leaves_both_ends_here() {
        let msg = veth("trv-e1", "trp-e1", MAC, 1500, None);
        let peer = peer_of(&msg);
        assert!(has(&peer, &LinkAttribute::IfName("trp-e1".into())), "{peer:?}");
        assert!(has(&peer, &LinkAttribute::Address(MAC.0.to_vec())), "{peer:?}");
        assert!(!peer.attributes.iter().any(|a| matches!(a, LinkAttribute::NetNsFd(_))), "{peer:?}");
    }

    #[test]
    fn fdb_entry_is_a_permanent_self_entry_with_the_vtep() {
        let msg = fdb_entry(9, MAC, "192.0.2.2".parse().unwrap());
        assert_eq!(msg.header.family, AddressFamily::Bridge);
        assert_eq!(msg.header.ifindex, 9);
        assert_eq!(msg.header.state, NeighbourState::Permanent);
        assert_eq!(msg.header.flags, NeighbourFlags::Own, "NTF_SELF: the VXLAN device's own FDB");
        assert_eq!(
            msg.attributes,
            vec![
                NeighbourAttribute::LinkLayerAddress(MAC.0.to_vec()),
                NeighbourAttribute::Destination(NeighbourAddress::Inet(Ipv4Addr::new(192, 0, 2, 2))),
            ]
        );
    }

    #[test]
    fn a_mesh_port_s_fdb_entry_is_the_bridge_s_static_one_without_a_vtep() {
        let msg = port_fdb_static(7, MAC);
        assert_eq!(msg.header.family, AddressFamily::Bridge);
        assert_eq!(msg.header.ifindex, 7);
        assert_eq!(msg.header.state, NeighbourState::Noarp, "static: never aged out, never learned over");
        assert_eq!(msg.header.flags, NeighbourFlags::Controller, "NTF_MASTER: the bridge's FDB, not the port's");
        assert_eq!(msg.attributes, vec![NeighbourAttribute::LinkLayerAddress(MAC.0.to_vec())]);
    }

    #[test]
    fn fdb_delete_names_the_entry_by_mac_and_vtep() {
        let msg = fdb_delete(9, MAC, "192.0.2.2".parse().unwrap());
        assert_eq!(msg.header.family, AddressFamily::Bridge);
        assert_eq!(msg.header.ifindex, 9);
        assert_eq!(msg.header.flags, NeighbourFlags::Own);
        assert_eq!(msg.attributes, fdb_entry(9, MAC, "192.0.2.2".parse().unwrap()).attributes);
    }

    #[test]
    fn neighbour_entries_are_permanent_in_the_address_family() {
        let v4 = neighbour(9, "10.1.0.3".parse().unwrap(), MAC);
        assert_eq!(v4.header.family, AddressFamily::Inet);
        assert_eq!(v4.header.ifindex, 9);
        assert_eq!(v4.header.state, NeighbourState::Permanent);
        assert!(v4.attributes.contains(&NeighbourAttribute::LinkLayerAddress(MAC.0.to_vec())), "{v4:?}");
        assert!(
            v4.attributes
                .contains(&NeighbourAttribute::Destination(NeighbourAddress::Inet(Ipv4Addr::new(10, 1, 0, 3)))),
            "{v4:?}"
        );
        let ll = MAC.link_local();
        let v6 = neighbour(9, IpAddr::V6(ll), MAC);
        assert_eq!(v6.header.family, AddressFamily::Inet6);
        assert!(v6.attributes.contains(&NeighbourAttribute::Destination(NeighbourAddress::Inet6(ll))), "{v6:?}");
        let del = neighbour_delete(9, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(del.header.family, AddressFamily::Inet6);
        assert_eq!(del.attributes, vec![NeighbourAttribute::Destination(NeighbourAddress::Inet6(Ipv6Addr::LOCALHOST))]);
    }

    /// The neighbour messages built here are the ones rtnetlink's add
    /// requests built before (the executor sends these through them).
    /// Opens an unbound netlink socket only: no privilege, no change.
    #[tokio::test]
    async fn neighbour_messages_match_rtnetlinks_builders() {
        let (_conn, handle, _) = rtnetlink::new_connection().expect("a netlink socket");
        let dst: IpAddr = "192.0.2.2".parse().unwrap();
        let mut req = handle.neighbours().add_bridge(9, &MAC.0).destination(dst).flags(NeighbourFlags::Own);
        assert_eq!(&fdb_entry(9, MAC, dst), req.message_mut());
        let ip: IpAddr = "10.1.0.3".parse().unwrap();
        let mut req = handle.neighbours().add(9, ip).link_layer_address(&MAC.0);
        assert_eq!(&neighbour(9, ip, MAC), req.message_mut());
    }

    #[test]
    fn default_route_goes_via_the_gateway_out_of_the_interface() {
        let r = default_route(Ipv4Addr::new(10, 1, 0, 1), 2);
        assert_eq!(r.header.address_family, AddressFamily::Inet);
        assert_eq!(r.header.destination_prefix_length, 0);
        assert_eq!(r.header.table, RouteHeader::RT_TABLE_MAIN);
        assert!(r.attributes.contains(&RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(10, 1, 0, 1)))));
        assert!(r.attributes.contains(&RouteAttribute::Oif(2)));
        assert!(!r.attributes.iter().any(|a| matches!(a, RouteAttribute::Destination(_))), "{r:?}");
    }

    #[test]
    fn the_route_dump_asks_for_ipv4() {
        let r = ipv4_routes();
        assert_eq!(r.header.address_family, AddressFamily::Inet);
        assert!(r.attributes.is_empty(), "{r:?}");
    }
}
