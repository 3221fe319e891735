//! Endpoints: the veth pair of an endpoint, its container end configured
//! inside the container's namespace (or left for the engine to move in),
//! its host end plugged into the network's bridge; and the container's
//! interface as the kernel has it.

use std::net::IpAddr;
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use netlink_packet_route::link::{LinkAttribute, LinkFlags};

use super::{EEXIST, ENODEV, ENOENT, EXFULL, NetlinkDataplane, errno, messages, netns, nl};
use crate::dataplane::{ContainerLink, DataplaneError, EndpointSpec, Result};
use crate::model;

/// How long after its Join an engine's endpoint gets its pair created.
const ENGINE_JOIN_GRACE_S: i64 = 10;

/// A Linux bridge has at most this many ports (port numbers 1 to
/// BR_MAX_PORTS - 1).
pub const BRIDGE_MAX_PORTS: usize = 1023;

/// Attaching a port to `bridge`, with the bridge's port limit said plainly.
fn attach_err(host_if: &str, bridge: &str) -> impl FnOnce(rtnetlink::Error) -> DataplaneError {
    let (host_if, bridge) = (host_if.to_string(), bridge.to_string());
    move |e| {
        if errno(&e) == Some(EXFULL) {
            DataplaneError::Io {
                call: "attach veth to bridge",
                object: format!("{host_if} → {bridge}"),
                source: std::io::Error::other(format!(
                    "the network's bridge on this host has {BRIDGE_MAX_PORTS} ports, the Linux bridge's limit \
                     (endpoints and the VXLAN device): this host takes no more endpoints on this network"
                )),
            }
        } else {
            nl("attach veth to bridge", host_if)(e)
        }
    }
}

impl NetlinkDataplane {
    pub(super) async fn create_endpoint(&self, s: &EndpointSpec) -> Result<()> {
        if s.engine_moves {
            return self.create_engine_endpoint(s).await;
        }
        let ns = netns::open(&s.netns)?;
        // A leftover from an attempt that died half-way (older agents named
        // the peer in the host first).
        self.delete_link(&s.peer_if).await?;
        // The container end is created directly inside the container's
        // namespace, already named, addressed and sized: moving a device
        // between namespaces costs an RCU grace period (tens of ms).
        let pair = messages::veth(&s.host_if, &s.ifname, s.mac, s.mtu, Some(ns.as_raw_fd()));
        match self.handle.link().add(pair).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(EEXIST) => {
                return Err(DataplaneError::Io {
                    call: "create veth",
                    object: format!("{} / {} in {}", s.host_if, s.ifname, s.netns.display()),
                    source: std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "an interface of that name already exists (in the namespace, choose another interface name)",
                    ),
                });
            }
            Err(e) => return Err(nl("create veth", &s.host_if)(e)),
        }
        let result = self.plug(s).await;
        if result.is_err() {
            // Nothing half-created: the pair goes (both ends with one delete).
            if let Err(e) = self.delete_link(&s.host_if).await {
                tracing::warn!(link = %s.host_if, error = %e, "cleaning up a failed endpoint");
            }
        }
        result
    }

    /// Both ends in this namespace, the container end left for the engine
    /// to move into its sandbox, rename and address (Docker's Join).
    ///
    /// Only a young endpoint gets a pair: the engine moves the interface
    /// in right after its Join (the sandbox may not even exist yet). An
    /// older one whose pair is gone cannot be repaired (the engine will not
    /// move a new pair in): with its sandbox gone, its container is gone.
    async fn create_engine_endpoint(&self, s: &EndpointSpec) -> Result<()> {
        if model::now_unix() - s.created_unix > ENGINE_JOIN_GRACE_S {
            if !s.netns.exists() {
                return Err(DataplaneError::NetnsGone(s.netns.clone()));
            }
            return Err(DataplaneError::Io {
                call: "create veth",
                object: format!("{} for {}", s.host_if, s.netns.display()),
                source: std::io::Error::other(
                    "the container's interface is gone and its engine does not move a new one in: reconnect the container",
                ),
            });
        }
        self.delete_link(&s.peer_if).await?;
        let pair = messages::veth(&s.host_if, &s.peer_if, s.mac, s.mtu, None);
        self.handle.link().add(pair).execute().await.map_err(nl("create veth", &s.host_if))?;
        let plugged = self.plug_port(s).await;
        if plugged.is_err()
            && let Err(e) = self.delete_link(&s.host_if).await
        {
            tracing::warn!(link = %s.host_if, error = %e, "cleaning up a failed endpoint");
        }
        plugged
    }

    /// The container end configured inside the container's namespace, then
    /// the host end plugged in.
    ///
    /// Two sysctls of the container's interface are written here, inside
    /// its namespace, as part of plugging the endpoint in (they exist only
    /// once the interface does, and only that namespace can write them):
    /// * `net.ipv4.neigh.<if>.retrans_time_ms = 20`: a container that asks
    ///   for a peer's MAC before its host has the peer programmed gets no
    ///   answer from the ARP proxy; retry in 20 ms rather than the kernel's
    ///   default 1 s. ARP never leaves the host (the VXLAN device answers
    ///   it locally), so retries cost nothing on the wire.
    /// * `net.ipv6.conf.<if>.router_solicitations = 0` (best effort: absent
    ///   with IPv6 off): Trellis networks have no IPv6 router, so the
    ///   container stops soliciting one (the kernel's default is forever,
    ///   each solicitation flooded to every port of the bridge — on a
    ///   network of a thousand endpoints, a storm that fills the backlog).
    async fn plug(&self, s: &EndpointSpec) -> Result<()> {
        // One visit to the namespace: the sysctls, and a netlink socket
        // that stays bound to it.
        let sysctl = format!("/proc/sys/net/ipv4/neigh/{}/retrans_time_ms", s.ifname);
        let rs = format!("/proc/sys/net/ipv6/conf/{}/router_solicitations", s.ifname);
        let ra = format!("/proc/sys/net/ipv6/conf/{}/accept_ra", s.ifname);
        let dad = format!("/proc/sys/net/ipv6/conf/{}/accept_dad", s.ifname);
        let gen_mode = format!("/proc/sys/net/ipv6/conf/{}/addr_gen_mode", s.ifname);
        let v6 = s.addr6.is_some();
        let rt = tokio::runtime::Handle::current();
        let (conn, c) = netns::run_in(&s.netns, move || {
            std::fs::write(&sysctl, b"20")?;
            // Absent when IPv6 is disabled: nothing to quiet then.
            let _ = std::fs::write(&rs, b"0");
            // Addresses and routes come from the agent only: no router
            // advertisement changes them; the addresses are the cluster
            // IPAM's, unique by construction, so no duplicate detection
            // holds them tentative.
            let _ = std::fs::write(&ra, b"0");
            // Its link-local address from its MAC (EUI-64), the one the
            // endpoint program lets it send from.
            let _ = std::fs::write(&gen_mode, b"0");
            if v6 {
                std::fs::write(&dad, b"0")?;
            }
            let _enter = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection()?;
            Ok((conn, handle))
        })?;
        tokio::spawn(conn);
        let object = format!("{} in {}", s.ifname, s.netns.display());
        let inside = Self::require(&c, &s.ifname).await?;
        c.link().set(messages::up(inside)).execute().await.map_err(nl("set container interface up", object.clone()))?;
        if let Some(lo) = Self::index_of(&c, "lo").await? {
            c.link().set(messages::up(lo)).execute().await.map_err(nl("set lo up", object.clone()))?;
        }
        if let Some(a) = s.addr {
            c.address()
                .add(inside, a.addr(), a.prefix_len())
                .execute()
                .await
                .map_err(nl("add container address", object.clone()))?;
        }
        if let Some(IpAddr::V4(gw)) = s.default_via {
            c.route()
                .add(messages::default_route(gw, inside))
                .replace()
                .execute()
                .await
                .map_err(nl("add default route", object.clone()))?;
        }
        if let Some(a6) = s.addr6 {
            let mut req = c.address().add(inside, a6.addr(), a6.prefix_len());
            req.message_mut().attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
            req.execute().await.map_err(nl("add container IPv6 address", object.clone()))?;
        }
        if let Some(IpAddr::V6(gw)) = s.default_via6 {
            c.route()
                .add(messages::default_route6(gw, inside))
                .replace()
                .execute()
                .await
                .map_err(nl("add IPv6 default route", object.clone()))?;
        }
        self.plug_port(s).await
    }

    /// The endpoint's host veth as a port of its bridge, sized, and left
    /// down: the reconciler brings it up once its program is on (or at
    /// once when it has none), with a `SetLink`.
    async fn plug_port(&self, s: &EndpointSpec) -> Result<()> {
        let bridge = Self::require(&self.handle, &s.bridge).await?;
        let host = Self::require(&self.handle, &s.host_if).await?;
        self.handle
            .link()
            .set(messages::port_of(host, s.mtu, bridge))
            .execute()
            .await
            .map_err(attach_err(&s.host_if, &s.bridge))
    }

    /// Set the MTU of interface `ifname` inside the namespace `netns` (a
    /// namespace gone with its container is no error: its endpoint goes).
    pub(super) async fn set_container_mtu(&self, netns: &std::path::Path, ifname: &str, mtu: u32) -> Result<()> {
        if !netns.exists() {
            return Ok(());
        }
        let c = netns::handle_in(netns)?;
        let object = format!("{ifname} in {}", netns.display());
        let Some(index) = Self::index_of(&c, ifname).await? else { return Ok(()) };
        c.link().set(messages::set_mtu(index, mtu)).execute().await.map_err(nl("set container MTU", object))
    }

    /// The interface `ifname` inside the namespace `netns`: its MAC, MTU,
    /// state and IPv4 addresses.
    pub(super) async fn read_container_link(
        &self,
        netns: &std::path::Path,
        ifname: &str,
    ) -> Result<Option<ContainerLink>> {
        let c = netns::handle_in(netns)?;
        let object = format!("{ifname} in {}", netns.display());
        let mut stream = c.link().get().match_name(ifname.to_string()).execute();
        let msg = match stream.try_next().await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(None),
            Err(e) if matches!(errno(&e), Some(ENODEV) | Some(ENOENT)) => return Ok(None),
            Err(e) => return Err(nl("get container interface", object)(e)),
        };
        let mut link = ContainerLink { up: msg.header.flags.contains(LinkFlags::Up), ..ContainerLink::default() };
        for a in &msg.attributes {
            match a {
                LinkAttribute::Mtu(m) => link.mtu = *m,
                LinkAttribute::Address(mac) if mac.len() == 6 => link.mac.0.copy_from_slice(mac),
                _ => {}
            }
        }
        // Both families (an IPv6-only endpoint's address is IPv6).
        let mut addrs = c.address().get().set_link_index_filter(msg.header.index).execute();
        while let Some(m) = addrs.try_next().await.map_err(nl("dump container addresses", object.clone()))? {
            for a in &m.attributes {
                if let AddressAttribute::Address(ip) = a
                    && let Ok(net) = IpNet::new(*ip, m.header.prefix_len)
                {
                    link.addrs.push(net);
                }
            }
        }
        Ok(Some(link))
    }
}
