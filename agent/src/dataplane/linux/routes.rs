//! Routes: the host's own routes (which new subnets must not overlap) and
//! the default route's interface, whose MTU and address are the underlay's.

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};

use super::{NetlinkDataplane, messages, nl};
use crate::dataplane::Result;
use crate::model;

const MAIN_TABLE: u32 = 254;

impl NetlinkDataplane {
    /// Destination prefixes of the main table's routes that are not through
    /// one of the agent's bridges (nor the default route).
    pub(super) async fn foreign_routes(&self) -> Result<Vec<IpNet>> {
        let links = self.links().await?;
        let ours: Vec<u32> =
            links.iter().filter(|l| l.name.starts_with(model::BRIDGE_PREFIX)).map(|l| l.index).collect();
        let mut out = Vec::new();
        for r in self.routes().await? {
            if route_table(&r) != MAIN_TABLE || r.header.destination_prefix_length == 0 {
                continue;
            }
            if route_oif(&r).is_some_and(|i| ours.contains(&i)) {
                continue;
            }
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
                _ => None,
            });
            if let Some(dst) = dst
                && let Ok(net) = IpNet::new(dst, r.header.destination_prefix_length)
            {
                out.push(net.trunc());
            }
        }
        Ok(out)
    }

    /// MTU of the default route's interface (1500 without one).
    pub(super) async fn default_route_mtu(&self) -> Result<u32> {
        let default_oif = self.default_oif().await?;
        let Some(oif) = default_oif else { return Ok(1500) };
        Ok(self.links().await?.iter().find(|l| l.index == oif).map(|l| l.mtu).unwrap_or(1500))
    }

    /// Every IPv4 address of the interfaces the main table's preferred
    /// default route leaves by (the lowest metric; every next hop of a
    /// multipath one), with its interface's name: the addresses this host
    /// could advertise to its peers.
    pub(super) async fn default_route_addrs(&self) -> Result<Vec<(String, IpAddr)>> {
        let defaults: Vec<(u32, Vec<u32>)> = self
            .routes()
            .await?
            .iter()
            .filter(|r| route_table(r) == MAIN_TABLE && r.header.destination_prefix_length == 0)
            .map(|r| {
                let metric = r
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Priority(p) => Some(*p),
                        _ => None,
                    })
                    .unwrap_or(0);
                let mut oifs: Vec<u32> = route_oif(r).into_iter().collect();
                for a in &r.attributes {
                    if let RouteAttribute::MultiPath(hops) = a {
                        oifs.extend(hops.iter().map(|h| h.interface_index));
                    }
                }
                (metric, oifs)
            })
            .collect();
        let Some(best) = defaults.iter().map(|(m, _)| *m).min() else { return Ok(Vec::new()) };
        let mut oifs: Vec<u32> = defaults.into_iter().filter(|(m, _)| *m == best).flat_map(|(_, o)| o).collect();
        oifs.sort_unstable();
        oifs.dedup();
        let mut out = Vec::new();
        let _dump = self.dump.lock().await;
        let mut request = self.handle.address().get();
        request.message_mut().header.family = AddressFamily::Inet;
        let mut stream = request.execute();
        while let Some(msg) = stream.try_next().await.map_err(nl("get underlay addresses", "default route"))? {
            if !oifs.contains(&msg.header.index) {
                continue;
            }
            // The local address (on a point-to-point link `Address` is the peer's).
            let local = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                msg.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = addr {
                let name = nix::net::if_::if_indextoname(msg.header.index)
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| format!("if{}", msg.header.index));
                out.push((name, ip));
            }
        }
        Ok(out)
    }

    /// The name of the interface that has `addr`, if any.
    pub(super) async fn link_with_addr(&self, addr: IpAddr) -> Result<Option<String>> {
        let mut index = None;
        {
            let _dump = self.dump.lock().await;
            let mut stream = self.handle.address().get().execute();
            while let Some(msg) = stream.try_next().await.map_err(nl("dump addresses", "uplink"))? {
                if msg.attributes.iter().any(|a| matches!(a, AddressAttribute::Address(ip) if *ip == addr)) {
                    index = Some(msg.header.index);
                }
            }
        }
        let Some(index) = index else { return Ok(None) };
        Ok(nix::net::if_::if_indextoname(index)
            .ok()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty()))
    }

    /// The interface of the main table's default route, if any.
    async fn default_oif(&self) -> Result<Option<u32>> {
        Ok(self
            .routes()
            .await?
            .iter()
            .find(|r| route_table(r) == MAIN_TABLE && r.header.destination_prefix_length == 0)
            .and_then(route_oif))
    }

    async fn routes(&self) -> Result<Vec<RouteMessage>> {
        let mut out = Vec::new();
        let _dump = self.dump.lock().await;
        let mut stream = self.handle.route().get(messages::ipv4_routes()).execute();
        while let Some(r) = stream.try_next().await.map_err(nl("dump routes", "ipv4"))? {
            out.push(r);
        }
        Ok(out)
    }
}

fn route_oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(r.header.table as u32)
}
