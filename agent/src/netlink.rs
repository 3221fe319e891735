//! The real [`Dataplane`]: rtnetlink for links, addresses and routes,
//! nftables (through the `nft` JSON API) for egress rules. One netlink
//! socket in the agent's namespace, and one per container namespace while
//! an endpoint is plugged in.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkExtentMask, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

use crate::dataplane::{
    Action, ContainerLink, Dataplane, DataplaneError, EndpointSpec, LinkKind, Mac, Observed, ObservedLink, Result,
    VxlanSpec,
};
use crate::egress::{self, EgressRules};
use crate::model;
use crate::netns;

/// How long after its Join an engine's endpoint gets its pair created.
const ENGINE_JOIN_GRACE_S: i64 = 10;

const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
const EADDRNOTAVAIL: i32 = 99;
const EXFULL: i32 = 54;

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

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

fn nl(call: &'static str, object: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> DataplaneError {
    let object = object.into();
    move |source| DataplaneError::Netlink { call, object, source }
}

pub struct NetlinkDataplane {
    handle: rtnetlink::Handle,
    /// The eBPF endpoint program, when it could be loaded, and the bpffs
    /// directory of its pinned links.
    bpf: Option<(std::sync::Mutex<trellis_ebpf::Datapath>, std::path::PathBuf)>,
    /// How the programs are attached (tcx where the kernel has it, or
    /// clsact).
    attach_mode: trellis_ebpf::AttachMode,
    /// The eBPF tables as last read back, kept current with every change
    /// applied since, and how many full observations used it: reading
    /// tens of thousands of entries back (two syscalls each) on every
    /// periodic pass cost a cluster with thousands of services a steady
    /// share of a CPU, so they are read back on every tenth.
    tables_seen: std::sync::Mutex<(Option<crate::dataplane::Tables>, u32)>,
    /// The in-kernel DNS table as last written, and a count of syncs: read
    /// back in full on every tenth and after a failure (reading 20,000
    /// names back took two system calls each on every zone rebuild).
    dns_seen: std::sync::Mutex<(Option<BTreeMap<trellis_ebpf::DnsKey, trellis_ebpf::DnsAnswer>>, u32)>,
    /// One dump at a time on the shared socket: the kernel answers a second
    /// concurrent dump on a netlink socket with EBUSY (an API call's route
    /// dump racing the periodic pass's link dump).
    dump: tokio::sync::Mutex<()>,
    /// The monitor's ring buffer, until the daemon takes it.
    events: std::sync::Mutex<Option<aya::maps::RingBuf<aya::maps::MapData>>>,
}

struct LinkSummary {
    index: u32,
    name: String,
    kind: LinkKind,
    master: Option<u32>,
    mtu: u32,
    up: bool,
    vni: Option<u32>,
    mac: Option<Mac>,
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
                s.mac = Some(m);
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

/// With the eBPF datapath off: detach what an earlier run attached for good
/// to the endpoints' veths under the bpffs `dir` (its programs would go on
/// enforcing tables no one updates) and unpin that run's maps.
pub fn remove_leftover_datapath(dir: &std::path::Path) {
    for e in std::fs::read_dir(dir.join("links")).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        match trellis_ebpf::detach_persistent(&name, &e.path()) {
            Ok(()) => tracing::info!(link = %name, "detached the program an earlier run left (the datapath is off)"),
            Err(err) => tracing::warn!(link = %name, error = %err, "detaching a program an earlier run left"),
        }
    }
    for e in std::fs::read_dir(dir.join("maps")).into_iter().flatten().flatten() {
        if let Err(err) = std::fs::remove_file(e.path()) {
            tracing::warn!(map = %e.path().display(), error = %err, "unpinning a map an earlier run left");
        }
    }
}

impl NetlinkDataplane {
    /// A dataplane for the namespace the agent runs in. Must be called
    /// inside a tokio runtime.
    pub fn new() -> Result<NetlinkDataplane> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| DataplaneError::Io {
            call: "netlink socket",
            object: "host namespace".into(),
            source: e,
        })?;
        tokio::spawn(conn);
        Ok(NetlinkDataplane {
            handle,
            bpf: None,
            attach_mode: trellis_ebpf::AttachMode::Auto,
            tables_seen: Default::default(),
            dns_seen: Default::default(),
            dump: tokio::sync::Mutex::new(()),
            events: Default::default(),
        })
    }

    /// The monitor's ring buffer (once; `None` without the eBPF program).
    pub fn take_event_ring(&self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Load the endpoint program with maps and links pinned under `dir`
    /// (a bpffs mount of this agent's, made if absent), so that they
    /// outlive the agent and a restarted agent adopts them.
    pub fn with_ebpf(
        mut self,
        dir: &std::path::Path,
        mode: trellis_ebpf::AttachMode,
    ) -> std::result::Result<NetlinkDataplane, String> {
        self.attach_mode = mode;
        trellis_ebpf::mount_bpffs(dir)?;
        let maps = dir.join("maps");
        let links = dir.join("links");
        for d in [&maps, &links] {
            std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
        }
        let mut dp = trellis_ebpf::Datapath::load_pinned(&maps).map_err(|e| e.to_string())?;
        match dp.take_events() {
            Ok(ring) => *self.events.lock().unwrap_or_else(|p| p.into_inner()) = Some(ring),
            Err(e) => tracing::warn!(error = %e, "no monitor events"),
        }
        self.bpf = Some((std::sync::Mutex::new(dp), links));
        Ok(self)
    }

    /// Drop what the datapath keeps for interfaces that are gone (a
    /// container's veth dies with its namespace, a veth deleted by hand):
    /// attachment markers of names no interface has, and entries and
    /// counters of ifindexes no interface has. `links` (a dump) picks the
    /// candidates; each is checked again now, under the datapath's lock
    /// that attachments take too, so one made since the dump stays.
    fn sweep_gone_interfaces(&self, links: &HashMap<u32, String>) {
        let Some((dp, markers)) = &self.bpf else { return };
        let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        let names: BTreeSet<&str> = links.values().map(String::as_str).collect();
        for name in self.pinned_programs().into_iter().filter(|n| !names.contains(n.as_str())) {
            if nix::net::if_::if_nametoindex(name.as_str()).is_err()
                && let Err(e) = trellis_ebpf::remove_marker(&markers.join(&name))
            {
                tracing::warn!(link = %name, error = %e, "removing the attachment marker of a gone interface");
            }
        }
        let mut indexes: BTreeSet<u32> = dp.endpoint_ifindexes().unwrap_or_default().into_iter().collect();
        indexes.extend(dp.counter_ifindexes().unwrap_or_default());
        for index in indexes.into_iter().filter(|i| !links.contains_key(i)) {
            if !index_exists(index)
                && let Err(e) = dp.remove_endpoint(index)
            {
                tracing::warn!(ifindex = index, error = %e, "removing the datapath entries of a gone interface");
            }
        }
    }

    fn pinned_programs(&self) -> BTreeSet<String> {
        let Some((_, links)) = &self.bpf else { return BTreeSet::new() };
        std::fs::read_dir(links)
            .map(|d| d.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
            .unwrap_or_default()
    }

    async fn attach_program(
        &self,
        ifname: &str,
        ip: IpAddr,
        mac: Mac,
        program: &crate::reconcile::ProgramSpec,
    ) -> Result<()> {
        let Some((dp, links)) = &self.bpf else { return Ok(()) };
        let IpAddr::V4(v4) = ip else { return Ok(()) };
        let index = Self::require(&self.handle, ifname).await?;
        let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        let ebpf = |e: trellis_ebpf::DatapathError| DataplaneError::Ebpf(format!("{ifname}: {e}"));
        let mut info = trellis_ebpf::EndpointInfo::new(v4, mac, program.vni);
        if let Some((gw, gw_mac)) = program.dns_at {
            info = info.with_dns_at(gw, gw_mac);
        }
        let info = info.with_flags(program.flags());
        dp.set_endpoint(index, info).map_err(ebpf)?;
        if links.join(ifname).is_dir() {
            // Attached already (its map entry was what was missing).
            return Ok(());
        }
        dp.attach_persistent(ifname, &links.join(ifname), self.attach_mode).map_err(ebpf)
    }

    fn update_tables(&self, ops: &crate::dataplane::TableOps) -> Result<()> {
        let applied = self.apply_table_ops(ops);
        let mut seen = self.tables_seen.lock().unwrap_or_else(|p| p.into_inner());
        match (&applied, seen.0.as_mut()) {
            (Ok(()), Some(t)) => t.apply(ops),
            // Partly applied: read everything back next time.
            _ => seen.0 = None,
        }
        applied
    }

    fn apply_table_ops(&self, ops: &crate::dataplane::TableOps) -> Result<()> {
        let Some((dp, _)) = &self.bpf else { return Ok(()) };
        let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        let e = |what: &str| {
            let what = what.to_string();
            move |err: trellis_ebpf::DatapathError| DataplaneError::Ebpf(format!("{what}: {err}"))
        };
        for (k, v) in &ops.put_backends {
            dp.put_backend(*k, *v).map_err(e("backend"))?;
        }
        for (id, ips) in &ops.put_maglev {
            dp.put_maglev(*id, &trellis_ebpf::maglev::table(ips)).map_err(e("maglev table"))?;
        }
        for (k, v) in &ops.put_nets {
            dp.put_net(*k, *v).map_err(e("subnet"))?;
        }
        for (k, v) in &ops.put_services {
            dp.put_service(*k, *v).map_err(e("service"))?;
        }
        for (k, v) in &ops.put_vips {
            dp.put_vip(*k, *v).map_err(e("VIP"))?;
        }
        for k in &ops.del_services {
            dp.remove_service(*k).map_err(e("service"))?;
        }
        for k in &ops.del_vips {
            dp.remove_vip(*k).map_err(e("VIP"))?;
        }
        for k in &ops.del_maglev {
            dp.remove_maglev(*k).map_err(e("maglev table"))?;
            dp.remove_svc_stats(*k).map_err(e("service counters"))?;
        }
        for k in &ops.del_backends {
            dp.remove_backend(*k).map_err(e("backend"))?;
        }
        for k in &ops.del_nets {
            dp.remove_net(*k).map_err(e("subnet"))?;
        }
        Ok(())
    }

    /// The tables: read back from the kernel when asked for `fresh` ones
    /// on every tenth call, else as last read and changed since.
    fn observe_tables(&self, fresh: bool) -> Result<crate::dataplane::Tables> {
        if self.bpf.is_none() {
            return Ok(Default::default());
        }
        {
            let mut seen = self.tables_seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.1 = seen.1.wrapping_add(1);
            if let Some(t) = &seen.0
                && !(fresh && seen.1.is_multiple_of(10))
            {
                return Ok(t.clone());
            }
        }
        let t = self.read_tables()?;
        self.tables_seen.lock().unwrap_or_else(|p| p.into_inner()).0 = Some(t.clone());
        Ok(t)
    }

    /// The tables as the kernel has them (Maglev tables by id).
    fn read_tables(&self) -> Result<crate::dataplane::Tables> {
        let Some((dp, _)) = &self.bpf else { return Ok(Default::default()) };
        let dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        let e = |err: trellis_ebpf::DatapathError| DataplaneError::Ebpf(format!("reading the tables: {err}"));
        Ok(crate::dataplane::Tables {
            nets: dp.nets().map_err(e)?.into_iter().collect(),
            vips: dp.vips().map_err(e)?.into_iter().collect(),
            services: dp.services().map_err(e)?.into_iter().collect(),
            maglev: dp.maglev_ids().map_err(e)?.into_iter().map(|id| (id, Vec::new())).collect(),
            backends: dp.backends().map_err(e)?.into_iter().collect(),
        })
    }

    async fn detach_program(&self, ifname: &str) -> Result<()> {
        let Some((dp, links)) = &self.bpf else { return Ok(()) };
        if let Some(index) = Self::index_of(&self.handle, ifname).await? {
            let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
            dp.remove_endpoint(index).map_err(|e| DataplaneError::Ebpf(format!("{ifname}: {e}")))?;
        }
        match trellis_ebpf::remove_marker(&links.join(ifname)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DataplaneError::Io { call: "unpin link", object: ifname.to_string(), source: e }),
        }
    }

    async fn links(&self) -> Result<Vec<LinkSummary>> {
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

    async fn index_of(handle: &rtnetlink::Handle, name: &str) -> Result<Option<u32>> {
        let mut stream = handle.link().get().match_name(name.to_string()).execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(Some(msg.header.index)),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(nl("get link", name)(e)),
        }
    }

    async fn require(handle: &rtnetlink::Handle, name: &str) -> Result<u32> {
        Self::index_of(handle, name).await?.ok_or_else(|| DataplaneError::LinkNotFound(name.to_string()))
    }

    async fn delete_link(&self, name: &str) -> Result<()> {
        let Some(index) = Self::index_of(&self.handle, name).await? else {
            return Ok(());
        };
        // What the datapath keeps for the link goes with it: its entry and
        // counters (keyed by this ifindex, unknown once it is gone) and its
        // attachment marker (a veth made again under the name needs the
        // program attached again).
        if let Some((dp, links)) = &self.bpf {
            let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
            dp.remove_endpoint(index).map_err(|e| DataplaneError::Ebpf(format!("{name}: {e}")))?;
            match trellis_ebpf::remove_marker(&links.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(DataplaneError::Io { call: "unpin link", object: name.to_string(), source: e }),
            }
        }
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(()),
            Err(e) => Err(nl("delete link", name)(e)),
        }
    }

    async fn egress_fingerprint(&self) -> Result<Option<String>> {
        tokio::task::spawn_blocking(|| {
            match nftables::helper::get_current_ruleset_with_args(
                nftables::helper::DEFAULT_NFT,
                ["list", "table", "inet", egress::TABLE],
            ) {
                Ok(set) => Ok(egress::observed_fingerprint(&set)),
                Err(nftables::helper::NftablesError::NftFailed { stderr, .. }) if stderr.contains("No such file") => {
                    Ok(None)
                }
                Err(e) => Err(DataplaneError::Nftables(format!("listing table inet {}: {e}", egress::TABLE))),
            }
        })
        .await
        .map_err(|e| DataplaneError::Nftables(e.to_string()))?
    }

    async fn apply_egress(&self, rules: &EgressRules) -> Result<()> {
        let batch = egress::to_nft_json(&rules.batch())
            .map_err(|e| DataplaneError::Nftables(format!("encoding table inet {}: {e}", egress::TABLE)))?;
        tokio::task::spawn_blocking(move || {
            nftables::helper::apply_ruleset_raw(&batch, nftables::helper::DEFAULT_NFT, std::iter::empty::<&str>())
                .map(drop)
                .map_err(|e| DataplaneError::Nftables(format!("applying table inet {}: {e}", egress::TABLE)))
        })
        .await
        .map_err(|e| DataplaneError::Nftables(e.to_string()))??;
        // Routing between the networks' bridges and the uplink.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1").map_err(|e| DataplaneError::Io {
            call: "enable ip_forward",
            object: "/proc/sys/net/ipv4/ip_forward".into(),
            source: e,
        })
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
        let peer = LinkUnspec::new_with_name(&s.peer_if).address(s.mac.to_vec()).mtu(s.mtu).build();
        let pair = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(s.host_if.clone())
            .mtu(s.mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.handle.link().add(pair).execute().await.map_err(nl("create veth", &s.host_if))?;
        let plugged = self.port_up(s).await;
        if plugged.is_err()
            && let Err(e) = self.delete_link(&s.host_if).await
        {
            tracing::warn!(link = %s.host_if, error = %e, "cleaning up a failed endpoint");
        }
        plugged
    }

    async fn create_endpoint(&self, s: &EndpointSpec) -> Result<()> {
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
        let peer =
            LinkUnspec::new_with_name(&s.ifname).address(s.mac.to_vec()).mtu(s.mtu).setns_by_fd(ns.as_raw_fd()).build();
        let pair = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(s.host_if.clone())
            .mtu(s.mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
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

    async fn plug(&self, s: &EndpointSpec) -> Result<()> {
        // A container that asks for a peer's MAC before its host has the
        // peer programmed gets no answer from the ARP proxy; retry in 20 ms
        // rather than the kernel's default 1 s. ARP never leaves the host
        // (the VXLAN device answers it locally), so retries cost nothing on
        // the wire.
        // Trellis networks have no IPv6 router: the container stops
        // soliciting one (the kernel's default is forever, each
        // solicitation flooded to every port of the bridge — on a network
        // of a thousand endpoints, a storm that fills the backlog).
        // One visit to the namespace: the sysctls, and a netlink socket
        // that stays bound to it.
        let sysctl = format!("/proc/sys/net/ipv4/neigh/{}/retrans_time_ms", s.ifname);
        let rs = format!("/proc/sys/net/ipv6/conf/{}/router_solicitations", s.ifname);
        let rt = tokio::runtime::Handle::current();
        let (conn, c) = netns::run_in(&s.netns, move || {
            std::fs::write(&sysctl, b"20")?;
            // Absent when IPv6 is disabled: nothing to quiet then.
            let _ = std::fs::write(&rs, b"0");
            let _enter = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection()?;
            Ok((conn, handle))
        })?;
        tokio::spawn(conn);
        let object = format!("{} in {}", s.ifname, s.netns.display());
        let inside = Self::require(&c, &s.ifname).await?;
        c.link()
            .set(LinkUnspec::new_with_index(inside).up().build())
            .execute()
            .await
            .map_err(nl("set container interface up", object.clone()))?;
        if let Some(lo) = Self::index_of(&c, "lo").await? {
            c.link()
                .set(LinkUnspec::new_with_index(lo).up().build())
                .execute()
                .await
                .map_err(nl("set lo up", object.clone()))?;
        }
        c.address()
            .add(inside, s.addr.addr(), s.addr.prefix_len())
            .execute()
            .await
            .map_err(nl("add container address", object.clone()))?;
        if let Some(IpAddr::V4(gw)) = s.default_via {
            let route = RouteMessageBuilder::<Ipv4Addr>::new().gateway(gw).output_interface(inside).build();
            c.route().add(route).replace().execute().await.map_err(nl("add default route", object.clone()))?;
        }
        self.port_up(s).await
    }

    /// The endpoint's host veth as a port of its bridge, sized and up.
    async fn port_up(&self, s: &EndpointSpec) -> Result<()> {
        let bridge = Self::require(&self.handle, &s.bridge).await?;
        let host = Self::require(&self.handle, &s.host_if).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(host).controller(bridge).mtu(s.mtu).up().build())
            .execute()
            .await
            .map_err(attach_err(&s.host_if, &s.bridge))
    }

    /// The permanent FDB entries with a remote VTEP and the permanent
    /// neighbour entries of the given VXLAN devices.
    #[allow(clippy::type_complexity)]
    async fn tunnel_entries(
        &self,
        vxlans: &[u32],
    ) -> Result<(BTreeMap<u32, BTreeSet<(Mac, IpAddr)>>, BTreeMap<u32, BTreeSet<(IpAddr, Mac)>>)> {
        let mut fdb: BTreeMap<u32, BTreeSet<(Mac, IpAddr)>> = BTreeMap::new();
        let _dump = self.dump.lock().await;
        let mut stream = self.handle.neighbours().get().set_address_family(AddressFamily::Bridge).execute();
        while let Some(msg) = stream.try_next().await.map_err(nl("dump fdb", "vxlan devices"))? {
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
        Ok((fdb, neigh))
    }

    async fn create_vxlan(&self, v: &VxlanSpec) -> Result<()> {
        let IpAddr::V4(local) = v.local else {
            return Err(DataplaneError::Io {
                call: "create vxlan",
                object: v.name.clone(),
                source: std::io::Error::other("an IPv6 underlay is not supported yet"),
            });
        };
        let msg = LinkVxlan::new(&v.name, v.vni)
            .port(v.port)
            .local(local)
            .learning(false)
            .proxy(true)
            .mtu(v.mtu)
            .address(v.mac.to_vec())
            .build();
        self.handle.link().add(msg).execute().await.map_err(nl("create vxlan", &v.name))?;
        if v.name == model::PROBE_VXLAN {
            // Its link-local address answers probes from the moment it is
            // up: IPv6 on (a host may have it off by default), no DAD wait.
            for (knob, value) in [("disable_ipv6", "0"), ("accept_dad", "0")] {
                let path = format!("/proc/sys/net/ipv6/conf/{}/{knob}", v.name);
                if let Err(e) = std::fs::write(&path, value) {
                    tracing::debug!(%path, error = %e, "probe device sysctl");
                }
            }
        }
        Ok(())
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
        let mut stream = self.handle.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
        while let Some(r) = stream.try_next().await.map_err(nl("dump routes", "ipv4"))? {
            out.push(r);
        }
        Ok(out)
    }
}

/// Does this namespace have an interface of ifindex `index`? (nix's
/// if_indextoname does not fail for a gone one: it names it "".)
fn index_exists(index: u32) -> bool {
    nix::net::if_::if_indextoname(index).is_ok_and(|n| !n.as_bytes().is_empty())
}

fn neighbour_address(ip: IpAddr) -> NeighbourAddress {
    match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }
}

/// The link-layer address and destination of a neighbour message.
fn neighbour_parts(attrs: &[NeighbourAttribute]) -> (Option<Mac>, Option<IpAddr>) {
    let mut mac = None;
    let mut dst = None;
    for a in attrs {
        match a {
            NeighbourAttribute::LinkLayerAddress(l) => mac = <[u8; 6]>::try_from(l.as_slice()).ok(),
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => dst = Some(IpAddr::V4(*v4)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => dst = Some(IpAddr::V6(*v6)),
            _ => {}
        }
    }
    (mac, dst)
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

const MAIN_TABLE: u32 = 254;

#[async_trait::async_trait]
impl Dataplane for NetlinkDataplane {
    fn set_events(&self, on: bool) {
        if let Some((dp, _)) = &self.bpf {
            let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
            if dp.events_on().ok() != Some(on)
                && let Err(e) = dp.set_events(on)
            {
                tracing::warn!(error = %e, "switching monitor events");
            }
        }
    }

    fn service_stats(&self, id: u32) -> Option<trellis_ebpf::SvcStats> {
        let (dp, _) = self.bpf.as_ref()?;
        dp.lock().unwrap_or_else(|p| p.into_inner()).svc_stats(id).ok()
    }

    fn sync_dns(&self, want: &BTreeMap<trellis_ebpf::DnsKey, trellis_ebpf::DnsAnswer>) -> Result<()> {
        let Some((dp, _)) = &self.bpf else { return Ok(()) };
        let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        let ebpf = |e: trellis_ebpf::DatapathError| DataplaneError::Ebpf(format!("dns table: {e}"));
        let mut seen = self.dns_seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.1 = seen.1.wrapping_add(1);
        let have = match seen.0.take() {
            Some(h) if !seen.1.is_multiple_of(10) => h,
            _ => dp.dns_entries().map_err(ebpf)?.into_iter().collect(),
        };
        // New and changed names first, then the ones that went.
        let applied = (|| {
            for (k, v) in want {
                if have.get(k) != Some(v) {
                    dp.put_dns(*k, *v)?;
                }
            }
            for k in have.keys().filter(|k| !want.contains_key(k)) {
                dp.remove_dns(*k)?;
            }
            Ok(())
        })();
        seen.0 = applied.is_ok().then(|| want.clone());
        applied.map_err(ebpf)
    }

    fn dns_config(&self, kernel: bool, ra: bool) -> Result<()> {
        let Some((dp, _)) = &self.bpf else { return Ok(()) };
        let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        let ebpf = |e: trellis_ebpf::DatapathError| DataplaneError::Ebpf(format!("dns config: {e}"));
        dp.set_config(trellis_ebpf::CFG_DNS_KERNEL, kernel).map_err(ebpf)?;
        dp.set_config(trellis_ebpf::CFG_DNS_RA, ra).map_err(ebpf)
    }

    fn dns_stats(&self) -> Option<trellis_ebpf::DnsStats> {
        let (dp, _) = self.bpf.as_ref()?;
        dp.lock().unwrap_or_else(|p| p.into_inner()).dns_stats().ok()
    }

    fn endpoint_counters(&self) -> Vec<(String, trellis_ebpf::EndpointCounters)> {
        let Some((dp, _)) = &self.bpf else { return Vec::new() };
        let dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(indexes) = dp.endpoint_ifindexes() else { return Vec::new() };
        indexes
            .into_iter()
            .filter_map(|i| {
                let name = nix::net::if_::if_indextoname(i).ok()?.to_string_lossy().into_owned();
                if name.is_empty() {
                    return None; // gone (nix names a gone index "")
                }
                Some((name, dp.counters(i).ok()?))
            })
            .collect()
    }

    async fn container_link(&self, netns: &std::path::Path, ifname: &str) -> Result<Option<ContainerLink>> {
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
                LinkAttribute::Address(mac) if mac.len() == 6 => link.mac.copy_from_slice(mac),
                _ => {}
            }
        }
        let mut request = c.address().get().set_link_index_filter(msg.header.index);
        request.message_mut().header.family = AddressFamily::Inet;
        let mut addrs = request.execute();
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

    async fn observe(&self, rules: bool) -> Result<Observed> {
        let links = self.links().await?;
        let names: HashMap<u32, String> = links.iter().map(|l| (l.index, l.name.clone())).collect();
        let owned: HashMap<u32, &LinkSummary> =
            links.iter().filter(|l| model::owned_link(&l.name)).map(|l| (l.index, l)).collect();
        let mut addrs: BTreeMap<u32, Vec<IpNet>> = BTreeMap::new();
        // IPv4 only: the agent configures no IPv6 yet, and every veth has
        // an IPv6 link-local address that would double the dump.
        {
            let _dump = self.dump.lock().await;
            let mut request = self.handle.address().get();
            request.message_mut().header.family = AddressFamily::Inet;
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
        let vxlans: Vec<u32> = owned.values().filter(|l| l.kind == LinkKind::Vxlan).map(|l| l.index).collect();
        let (mut fdb, mut neigh) = (BTreeMap::new(), BTreeMap::new());
        if !vxlans.is_empty() {
            (fdb, neigh) = self.tunnel_entries(&vxlans).await?;
        }
        let egress = if rules { self.egress_fingerprint().await? } else { None };
        self.sweep_gone_interfaces(&names);
        // An endpoint has its program when it is attached (its marker) and
        // its entry is in the map (an entry deleted by hand is repaired).
        let mut programs = self.pinned_programs();
        let mut program_flags = BTreeMap::new();
        if let Some((dp, _)) = &self.bpf {
            let in_map: BTreeMap<u32, u32> = dp
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .endpoint_entries()
                .map(|v| v.into_iter().map(|(i, info)| (i, info.flags)).collect())
                .unwrap_or_default();
            let index: HashMap<&str, u32> = links.iter().map(|l| (l.name.as_str(), l.index)).collect();
            programs.retain(|name| index.get(name.as_str()).is_some_and(|i| in_map.contains_key(i)));
            for name in &programs {
                if let Some(f) = index.get(name.as_str()).and_then(|i| in_map.get(i)) {
                    program_flags.insert(name.clone(), *f);
                }
            }
        }
        let tables = self.observe_tables(rules)?;
        // A kernel without xfrm netlink has no SAs to report; an encrypted
        // network's policies then fail to go in, and its tunnels stay shut.
        let xfrm = match tokio::task::spawn_blocking(|| crate::xfrm::XfrmSocket::open()?.observe()).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "reading xfrm state");
                Default::default()
            }
            Err(e) => {
                return Err(DataplaneError::Io {
                    call: "xfrm",
                    object: "observe".into(),
                    source: std::io::Error::other(e),
                });
            }
        };
        let mut observed = Observed { egress, programs, program_flags, tables, xfrm, ..Observed::default() };
        for (index, l) in owned {
            observed.links.insert(
                l.name.clone(),
                ObservedLink {
                    kind: l.kind,
                    master: l.master.and_then(|m| names.get(&m).cloned()),
                    mtu: l.mtu,
                    up: l.up,
                    addrs: addrs.remove(&index).unwrap_or_default(),
                    vni: l.vni,
                    mac: if l.kind == LinkKind::Bridge { l.mac } else { None },
                    fdb: fdb.remove(&index).unwrap_or_default(),
                    neigh: neigh.remove(&index).unwrap_or_default(),
                },
            );
        }
        Ok(observed)
    }

    async fn apply(&self, action: &Action) -> Result<()> {
        match action {
            Action::CreateBridge { name, mtu, mac } => self
                .handle
                .link()
                .add(LinkBridge::new(name).mtu(*mtu).address(mac.to_vec()).build())
                .execute()
                .await
                .map_err(nl("create bridge", name)),
            Action::SetMac { link, mac } => {
                let index = Self::require(&self.handle, link).await?;
                self.handle
                    .link()
                    .set(LinkUnspec::new_with_index(index).address(mac.to_vec()).build())
                    .execute()
                    .await
                    .map_err(nl("set MAC", link))
            }
            Action::SetLink { name, mtu, master } => {
                let index = Self::require(&self.handle, name).await?;
                let mut msg = LinkUnspec::new_with_index(index).mtu(*mtu).up();
                if let Some(m) = master {
                    msg = msg.controller(Self::require(&self.handle, m).await?);
                }
                self.handle.link().set(msg.build()).execute().await.map_err(nl("set link", name))
            }
            Action::AddAddress { link, addr } => {
                let index = Self::require(&self.handle, link).await?;
                match self.handle.address().add(index, addr.addr(), addr.prefix_len()).execute().await {
                    Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
                    r => r.map_err(nl("add address", format!("{addr} on {link}"))),
                }
            }
            Action::DelAddress { link, addr } => {
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
            Action::CreateEndpoint(spec) => self.create_endpoint(spec).await,
            Action::AttachProgram { ifname, ip, mac, program } => self.attach_program(ifname, *ip, *mac, program).await,
            Action::UpdateTables(ops) => self.update_tables(ops),
            Action::DetachProgram { ifname } => self.detach_program(ifname).await,
            Action::CreateVxlan(v) => self.create_vxlan(v).await,
            Action::AddFdb { link, mac, dst } => {
                let index = Self::require(&self.handle, link).await?;
                self.handle
                    .neighbours()
                    .add_bridge(index, mac)
                    .destination(*dst)
                    .flags(NeighbourFlags::Own)
                    .replace()
                    .execute()
                    .await
                    .map_err(nl("add fdb entry", format!("{} via {dst} on {link}", model::format_mac(mac))))
            }
            Action::DelFdb { link, mac, dst } => {
                let index = Self::require(&self.handle, link).await?;
                let mut msg = NeighbourMessage::default();
                msg.header.family = AddressFamily::Bridge;
                msg.header.ifindex = index;
                msg.header.flags = NeighbourFlags::Own;
                msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
                msg.attributes.push(NeighbourAttribute::Destination(neighbour_address(*dst)));
                match self.handle.neighbours().del(msg).execute().await {
                    Err(e) if matches!(errno(&e), Some(ENOENT) | Some(ENODEV)) => Ok(()),
                    r => r.map_err(nl("delete fdb entry", format!("{} on {link}", model::format_mac(mac)))),
                }
            }
            Action::AddNeigh { link, ip, mac } => {
                let index = Self::require(&self.handle, link).await?;
                self.handle
                    .neighbours()
                    .add(index, *ip)
                    .link_layer_address(mac)
                    .replace()
                    .execute()
                    .await
                    .map_err(nl("add neighbour", format!("{ip} on {link}")))
            }
            Action::DelNeigh { link, ip, .. } => {
                let index = Self::require(&self.handle, link).await?;
                let mut msg = NeighbourMessage::default();
                msg.header.family = if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
                msg.header.ifindex = index;
                msg.attributes.push(NeighbourAttribute::Destination(neighbour_address(*ip)));
                match self.handle.neighbours().del(msg).execute().await {
                    Err(e) if matches!(errno(&e), Some(ENOENT) | Some(ENODEV)) => Ok(()),
                    r => r.map_err(nl("delete neighbour", format!("{ip} on {link}"))),
                }
            }
            Action::DeleteLink { name } => self.delete_link(name).await,
            Action::ApplyEgress(rules) => self.apply_egress(rules).await,
            Action::Xfrm { op, .. } => {
                let op = op.clone();
                tokio::task::spawn_blocking(move || crate::xfrm::XfrmSocket::open()?.apply(&op)).await.map_err(|e| {
                    DataplaneError::Io { call: "xfrm", object: "executor".into(), source: std::io::Error::other(e) }
                })?
            }
        }
    }

    async fn host_routes(&self) -> Result<Vec<IpNet>> {
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

    async fn underlay_mtu(&self) -> Result<u32> {
        let default_oif = self.default_oif().await?;
        let Some(oif) = default_oif else { return Ok(1500) };
        Ok(self.links().await?.iter().find(|l| l.index == oif).map(|l| l.mtu).unwrap_or(1500))
    }

    async fn underlay_addr(&self) -> Result<Option<IpAddr>> {
        let default_oif = self.default_oif().await?;
        let Some(oif) = default_oif else { return Ok(None) };
        let _dump = self.dump.lock().await;
        let mut request = self.handle.address().get().set_link_index_filter(oif);
        request.message_mut().header.family = AddressFamily::Inet;
        let mut stream = request.execute();
        while let Some(msg) = stream.try_next().await.map_err(nl("get underlay address", "default route"))? {
            for a in &msg.attributes {
                if let AddressAttribute::Address(ip) = a {
                    return Ok(Some(*ip));
                }
            }
        }
        Ok(None)
    }
}
