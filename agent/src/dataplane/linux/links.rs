//! Links in general: the link dump and its summaries, looking a link up by
//! name, bridges, setting and deleting any link, and addresses.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkExtentMask, LinkFlags, LinkInfo, LinkMessage, VxlanDf,
};

use super::{EADDRNOTAVAIL, EEXIST, ENODEV, ENOENT, ESRCH, NetlinkDataplane, errno, messages, nl};
use crate::dataplane::{DataplaneError, LinkKind, Mac, Result};

/// What the agent reads of a link in the dump.
pub(super) struct LinkSummary {
    pub(super) index: u32,
    pub(super) name: String,
    pub(super) kind: LinkKind,
    pub(super) master: Option<u32>,
    pub(super) mtu: u32,
    pub(super) up: bool,
    pub(super) vni: Option<u32>,
    pub(super) dont_fragment: bool,
    pub(super) mac: Option<Mac>,
}

fn summarize(msg: &LinkMessage) -> LinkSummary {
    let mut s = LinkSummary {
        index: msg.header.index,
        name: String::new(),
        kind: LinkKind::Other,
        master: None,
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
        vni: None,
        dont_fragment: false,
        mac: None,
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => s.name = n.clone(),
            LinkAttribute::Mtu(m) => s.mtu = *m,
            LinkAttribute::Controller(m) => s.master = Some(*m),
            LinkAttribute::Address(a) if a.len() == 6 => {
                let mut m = [0u8; 6];
                m.copy_from_slice(a);
                s.mac = Some(Mac(m));
            }
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => {
                            s.kind = match k {
                                InfoKind::Bridge => LinkKind::Bridge,
                                InfoKind::Veth => LinkKind::Veth,
                                InfoKind::Vxlan => LinkKind::Vxlan,
                                _ => LinkKind::Other,
                            };
                        }
                        LinkInfo::Data(InfoData::Vxlan(data)) => {
                            s.vni = data.iter().find_map(|d| match d {
                                InfoVxlan::Id(id) => Some(*id),
                                _ => None,
                            });
                            s.dont_fragment = data.contains(&InfoVxlan::Df(VxlanDf::Set));
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    s
}

impl NetlinkDataplane {
    /// Every link of the agent's namespace, summarized.
    pub(super) async fn links(&self) -> Result<Vec<LinkSummary>> {
        let mut out = Vec::new();
        let _dump = self.dump.lock().await;
        // Statistics are the bulk of a link dump and unused here.
        let mut stream =
            self.handle.link().get().set_filter_mask(AddressFamily::Unspec, vec![LinkExtentMask::SkipStats]).execute();
        while let Some(msg) = stream.try_next().await.map_err(nl("dump links", "all"))? {
            out.push(summarize(&msg));
        }
        Ok(out)
    }

    /// The addresses of the `owned` links, by link index.
    pub(super) async fn addresses_of(&self, owned: &HashMap<u32, &LinkSummary>) -> Result<BTreeMap<u32, Vec<IpNet>>> {
        let mut addrs: BTreeMap<u32, Vec<IpNet>> = BTreeMap::new();
        // IPv4 only: the agent configures no IPv6 yet, and every veth has
        // an IPv6 link-local address that would double the dump.
        let _dump = self.dump.lock().await;
        // Both families; IPv6 link-local addresses are the kernel's.
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut request = self.handle.address().get();
            request.message_mut().header.family = family;
            let mut stream = request.execute();
            while let Some(msg) = stream.try_next().await.map_err(nl("dump addresses", "all"))? {
                if !owned.contains_key(&msg.header.index) {
                    continue;
                }
                for a in &msg.attributes {
                    if let AddressAttribute::Address(ip) = a {
                        let link_local = matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
                        if !link_local && let Ok(net) = IpNet::new(*ip, msg.header.prefix_len) {
                            addrs.entry(msg.header.index).or_default().push(net);
                        }
                    }
                }
            }
        }
        Ok(addrs)
    }

    /// The index of the link `name` on `handle`'s namespace, if it exists.
    pub(super) async fn index_of(handle: &rtnetlink::Handle, name: &str) -> Result<Option<u32>> {
        let mut stream = handle.link().get().match_name(name.to_string()).execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(Some(msg.header.index)),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(nl("get link", name)(e)),
        }
    }

    /// The index of the link `name`, which must exist.
    pub(super) async fn require(handle: &rtnetlink::Handle, name: &str) -> Result<u32> {
        Self::index_of(handle, name).await?.ok_or_else(|| DataplaneError::LinkNotFound(name.to_string()))
    }

    pub(super) async fn create_bridge(&self, name: &str, mtu: u32, mac: Mac) -> Result<()> {
        self.handle.link().add(messages::bridge(name, mtu, mac)).execute().await.map_err(nl("create bridge", name))
    }

    pub(super) async fn set_mac(&self, link: &str, mac: Mac) -> Result<()> {
        let index = Self::require(&self.handle, link).await?;
        self.handle.link().set(messages::set_mac(index, mac)).execute().await.map_err(nl("set MAC", link))
    }

    /// The link `name` with this MTU, up, and (for a port) in `master`.
    pub(super) async fn set_link(&self, name: &str, mtu: u32, master: Option<&str>) -> Result<()> {
        let index = Self::require(&self.handle, name).await?;
        let master = match master {
            Some(m) => Some(Self::require(&self.handle, m).await?),
            None => None,
        };
        self.handle.link().set(messages::set_link(index, mtu, master)).execute().await.map_err(nl("set link", name))
    }

    /// Delete the link `name`; a missing one is no error.
    pub(super) async fn delete_link(&self, name: &str) -> Result<()> {
        let Some(index) = Self::index_of(&self.handle, name).await? else {
            return Ok(());
        };
        self.forget_link(index, name)?;
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(()),
            Err(e) => Err(nl("delete link", name)(e)),
        }
    }

    /// Add `addr` to `link`; one already there is no error.
    pub(super) async fn add_address(&self, link: &str, addr: &IpNet) -> Result<()> {
        let index = Self::require(&self.handle, link).await?;
        let mut req = self.handle.address().add(index, addr.addr(), addr.prefix_len());
        if addr.addr().is_ipv6() {
            // The agent owns the address cluster-wide: no duplicate address
            // detection (it would leave the gateway tentative for a second).
            req.message_mut().attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match req.execute().await {
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            r => r.map_err(nl("add address", format!("{addr} on {link}"))),
        }
    }

    /// Remove `addr` from `link`; one already gone is no error.
    pub(super) async fn del_address(&self, link: &str, addr: &IpNet) -> Result<()> {
        let index = Self::require(&self.handle, link).await?;
        let _dump = self.dump.lock().await;
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(addr.addr())
            .set_prefix_length_filter(addr.prefix_len())
            .execute();
        while let Some(msg) = stream.try_next().await.map_err(nl("get address", link))? {
            match self.handle.address().del(msg).execute().await {
                Err(e) if matches!(errno(&e), Some(EADDRNOTAVAIL) | Some(ENOENT) | Some(ESRCH)) => {}
                r => r.map_err(nl("delete address", format!("{addr} on {link}")))?,
            }
        }
        Ok(())
    }
}
