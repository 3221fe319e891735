//! Tunnels: VXLAN devices, their static FDB entries (MAC → VTEP) and
//! permanent neighbour entries (IP → MAC), and reading those back.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState};

use super::{ENODEV, ENOENT, NetlinkDataplane, errno, messages, nl};
use crate::dataplane::{DataplaneError, Mac, Result, VxlanSpec};

/// FDB entries (MAC, VTEP) and neighbour entries (IP, MAC) of VXLAN
/// devices, and static FDB entries of bridge ports (MAC), by link index.
type TunnelEntries =
    (BTreeMap<u32, BTreeSet<(Mac, IpAddr)>>, BTreeMap<u32, BTreeSet<(IpAddr, Mac)>>, BTreeMap<u32, BTreeSet<Mac>>);

impl NetlinkDataplane {
    pub(super) async fn create_vxlan(&self, v: &VxlanSpec) -> Result<()> {
        let IpAddr::V4(local) = v.local else {
            return Err(DataplaneError::Io {
                call: "create vxlan",
                object: v.name.clone(),
                source: std::io::Error::other("an IPv6 underlay is not supported yet"),
            });
        };
        let msg = messages::vxlan(v, local);
        self.handle.link().add(msg).execute().await.map_err(nl("create vxlan", &v.name))?;
        // The device's own settings, before anything sets it up (best
        // effort, see `VxlanSpec::sysctls`).
        for s in &v.sysctls {
            if let Err(e) = std::fs::write(&s.path, &s.value) {
                tracing::debug!(device = %v.name, path = %s.path, error = %e, "vxlan device sysctl");
            }
        }
        Ok(())
    }

    /// Send `msg` as a new neighbour (or FDB) entry replacing any of the
    /// same key (NLM_F_CREATE | NLM_F_REPLACE): rtnetlink's add request,
    /// carrying the message built in [`messages`].
    async fn replace_neighbour(&self, msg: NeighbourMessage) -> Result<(), rtnetlink::Error> {
        let mut request = self.handle.neighbours().add_bridge(msg.header.ifindex, &[]);
        *request.message_mut() = msg;
        request.replace().execute().await
    }

    pub(super) async fn add_fdb(&self, link: &str, mac: Mac, dst: IpAddr) -> Result<()> {
        let index = Self::require(&self.handle, link).await?;
        self.replace_neighbour(messages::fdb_entry(index, mac, dst))
            .await
            .map_err(nl("add fdb entry", format!("{mac} via {dst} on {link}")))
    }

    /// Remove an FDB entry; one already gone is no error.
    pub(super) async fn del_fdb(&self, link: &str, mac: Mac, dst: IpAddr) -> Result<()> {
        let index = Self::require(&self.handle, link).await?;
        match self.handle.neighbours().del(messages::fdb_delete(index, mac, dst)).execute().await {
            Err(e) if matches!(errno(&e), Some(ENOENT) | Some(ENODEV)) => Ok(()),
            r => r.map_err(nl("delete fdb entry", format!("{mac} on {link}"))),
        }
    }

    pub(super) async fn add_neigh(&self, link: &str, ip: IpAddr, mac: Mac) -> Result<()> {
        let index = Self::require(&self.handle, link).await?;
        self.replace_neighbour(messages::neighbour(index, ip, mac))
            .await
            .map_err(nl("add neighbour", format!("{ip} on {link}")))
    }

    /// Remove a neighbour entry; one already gone is no error.
    pub(super) async fn del_neigh(&self, link: &str, ip: IpAddr) -> Result<()> {
        let index = Self::require(&self.handle, link).await?;
        match self.handle.neighbours().del(messages::neighbour_delete(index, ip)).execute().await {
            Err(e) if matches!(errno(&e), Some(ENOENT) | Some(ENODEV)) => Ok(()),
            r => r.map_err(nl("delete neighbour", format!("{ip} on {link}"))),
        }
    }

    /// The permanent FDB entries with a remote VTEP and the permanent
    /// neighbour entries of the given VXLAN devices, and the static FDB
    /// entries on the given bridge ports.
    pub(super) async fn tunnel_entries(&self, vxlans: &[u32], ports: &[u32]) -> Result<TunnelEntries> {
        let mut fdb: BTreeMap<u32, BTreeSet<(Mac, IpAddr)>> = BTreeMap::new();
        let mut statics: BTreeMap<u32, BTreeSet<Mac>> = BTreeMap::new();
        let _dump = self.dump.lock().await;
        let mut stream = self.handle.neighbours().get().set_address_family(AddressFamily::Bridge).execute();
        while let Some(msg) = stream.try_next().await.map_err(nl("dump fdb", "vxlan devices"))? {
            if ports.contains(&msg.header.ifindex) && msg.header.state == NeighbourState::Noarp {
                if let (Some(mac), _) = neighbour_parts(&msg.attributes) {
                    statics.entry(msg.header.ifindex).or_default().insert(mac);
                }
                continue;
            }
            if !vxlans.contains(&msg.header.ifindex) {
                continue;
            }
            let (mac, dst) = neighbour_parts(&msg.attributes);
            if let (Some(mac), Some(dst)) = (mac, dst) {
                fdb.entry(msg.header.ifindex).or_default().insert((mac, dst));
            }
        }
        let mut neigh: BTreeMap<u32, BTreeSet<(IpAddr, Mac)>> = BTreeMap::new();
        // IPv4 for the networks, IPv6 for the probe device.
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut stream = self.handle.neighbours().get().set_address_family(family).execute();
            while let Some(msg) = stream.try_next().await.map_err(nl("dump neighbours", "vxlan devices"))? {
                if !vxlans.contains(&msg.header.ifindex) || msg.header.state != NeighbourState::Permanent {
                    continue;
                }
                let (mac, dst) = neighbour_parts(&msg.attributes);
                if let (Some(mac), Some(ip)) = (mac, dst) {
                    neigh.entry(msg.header.ifindex).or_default().insert((ip, mac));
                }
            }
        }
        Ok((fdb, neigh, statics))
    }
}

/// The link-layer address and destination of a neighbour message.
fn neighbour_parts(attrs: &[NeighbourAttribute]) -> (Option<Mac>, Option<IpAddr>) {
    let mut mac = None;
    let mut dst = None;
    for a in attrs {
        match a {
            NeighbourAttribute::LinkLayerAddress(l) => mac = <[u8; 6]>::try_from(l.as_slice()).ok().map(Mac),
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => dst = Some(IpAddr::V4(*v4)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => dst = Some(IpAddr::V6(*v6)),
            // An FDB entry (family AF_BRIDGE) carries its VTEP as raw bytes:
            // netlink-packet-route parses NDA_DST by the message's family.
            NeighbourAttribute::Destination(NeighbourAddress::Other(raw)) => {
                dst = match raw.len() {
                    4 => <[u8; 4]>::try_from(raw.as_slice()).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(raw.as_slice()).ok().map(IpAddr::from),
                    _ => None,
                }
            }
            _ => {}
        }
    }
    (mac, dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_fdb_entry_s_vtep_is_read_whatever_the_message_s_family() {
        let mac = NeighbourAttribute::LinkLayerAddress(vec![2, 0x42, 10, 1, 0, 2]);
        // As netlink-packet-route parses an AF_BRIDGE dump: raw bytes.
        let fdb = [mac.clone(), NeighbourAttribute::Destination(NeighbourAddress::Other(vec![198, 19, 0, 2]))];
        assert_eq!(neighbour_parts(&fdb), (Some(Mac([2, 0x42, 10, 1, 0, 2])), Some("198.19.0.2".parse().unwrap())));
        let neigh = [NeighbourAttribute::Destination(NeighbourAddress::Inet("10.1.0.2".parse().unwrap())), mac];
        assert_eq!(neighbour_parts(&neigh).1, Some("10.1.0.2".parse().unwrap()));
    }
}
