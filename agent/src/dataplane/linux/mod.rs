//! The real [`Dataplane`]: rtnetlink for links, addresses and routes,
//! nftables (through the `nft` JSON API) for egress rules. One netlink
//! socket in the agent's namespace, and one per container namespace while
//! an endpoint is plugged in.
//!
//! This file holds the struct, its constructors, the [`Dataplane`] impl
//! (which dispatches to the per-kind modules) and the shared error helpers.
//! The work is done, one object kind per file, in `impl NetlinkDataplane`
//! blocks:
//! * `links`: bridges, generic link set/delete, addresses, the link dump;
//! * `endpoint`: an endpoint's veth pair, plugged in (and the container's
//!   view of it);
//! * `tunnels`: VXLAN devices, their FDB and neighbour entries;
//! * `mesh`: the mesh veths (this host's mesh addresses);
//! * `routes`: the host's routes, the underlay's MTU and address;
//! * `bpf`: the eBPF program's attachments, tables, DNS table, counters;
//! * `nft`: the egress rules.
//!
//! The netlink messages they send are built by the pure functions of
//! `messages` (unit-tested without a kernel).
//!
//! The sysctls written here, and who decides them: host limits
//! ([`Dataplane::prepare_host`], [`sysctl`]); IPv4 forwarding with the
//! egress rules when they ask for it
//! ([`crate::dataplane::egress::EgressRules::forwarding`]); a VXLAN device's
//! own settings right after its creation
//! ([`crate::dataplane::VxlanSpec::sysctls`], the probe device's IPv6);
//! and, as part of plugging an endpoint in, two of the container
//! interface's inside its namespace (`endpoint`).

pub mod events;
pub mod netns;
pub mod probe;
pub mod sysctl;
pub mod xfrm;

mod bpf;
pub use bpf::remove_leftover_datapath;
mod endpoint;
mod links;
mod mesh;
mod messages;
mod nft;
mod nft_generation;
mod ports;
mod routes;
mod tunnels;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::dataplane::{Action, ContainerLink, Dataplane, DataplaneError, LinkKind, Observed, ObservedLink, Result};
use crate::model;

pub use endpoint::BRIDGE_MAX_PORTS;

const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
const EADDRNOTAVAIL: i32 = 99;
const EXFULL: i32 = 54;

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

fn nl(call: &'static str, object: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> DataplaneError {
    let object = object.into();
    move |source| DataplaneError::Netlink { call, object, source: Box::new(source) }
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
    /// With a generation, bumped on every read-back and change.
    tables_seen: std::sync::Mutex<TablesSeen>,
    /// The in-kernel DNS table as last written, and a count of syncs: read
    /// back in full on every tenth and after a failure (reading 20,000
    /// names back took two system calls each on every zone rebuild).
    dns_seen: std::sync::Mutex<(Option<BTreeMap<trellis_ebpf::DnsKey, trellis_ebpf::DnsAnswer>>, u32)>,
    /// The egress table's fingerprint as last listed, and the ruleset
    /// generation it was listed at (see [`nft::EgressSeen`]).
    egress_seen: std::sync::Mutex<nft::EgressSeen>,
    /// One dump at a time on the shared socket: the kernel answers a second
    /// concurrent dump on a netlink socket with EBUSY (an API call's route
    /// dump racing the periodic pass's link dump).
    dump: tokio::sync::Mutex<()>,
    /// The monitor's ring buffer, until the daemon takes it.
    events: std::sync::Mutex<Option<aya::maps::RingBuf<aya::maps::MapData>>>,
    /// The UDP socket the kernel decapsulates ESP in UDP on, while any SA
    /// of this host's carries it (see [`xfrm::EspUdpSocket`]).
    esp_udp: std::sync::Mutex<Option<xfrm::EspUdpSocket>>,
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
            egress_seen: Default::default(),
            dump: tokio::sync::Mutex::new(()),
            events: Default::default(),
            esp_udp: Default::default(),
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
        flows_per_endpoint: u32,
    ) -> std::result::Result<NetlinkDataplane, String> {
        self.attach_mode = mode;
        trellis_ebpf::mount_bpffs(dir)?;
        let maps = dir.join("maps");
        let links = dir.join("links");
        // Pins of another layout (an agent upgraded across a change of the
        // maps) cannot be reused: the datapath starts afresh, its programs
        // detached here and attached again by the first pass (a connection
        // through a VIP keeps its backend: Maglev chooses it again).
        let stamp = dir.with_extension("layout");
        let pinned = std::fs::read_dir(&maps).map(|d| d.count() > 0).unwrap_or(false);
        let same = std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == trellis_ebpf::MAP_LAYOUT);
        if pinned && !same {
            tracing::warn!(
                layout = trellis_ebpf::MAP_LAYOUT,
                "the datapath's pinned maps are of another layout (an upgrade): starting the datapath afresh"
            );
            bpf::remove_leftover_datapath(dir);
        }
        for d in [&maps, &links, &dir.join("mesh")] {
            std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
        }
        let mut dp = trellis_ebpf::Datapath::load_pinned(&maps).map_err(|e| e.to_string())?;
        if let Err(e) = std::fs::write(&stamp, trellis_ebpf::MAP_LAYOUT) {
            tracing::warn!(path = %stamp.display(), error = %e, "recording the datapath's layout");
        }
        dp.set_flow_quota(flows_per_endpoint);
        match dp.take_events() {
            Ok(ring) => *self.events.lock().unwrap_or_else(|p| p.into_inner()) = Some(ring),
            Err(e) => tracing::warn!(error = %e, "no monitor events"),
        }
        self.bpf = Some((std::sync::Mutex::new(dp), links));
        Ok(self)
    }

    /// The IPsec SAs and policies, read on a blocking thread. A kernel
    /// without xfrm netlink has no SAs to report; an encrypted network's
    /// policies then fail to go in, and its tunnels stay shut.
    async fn observe_xfrm_async(&self) -> Result<trellis_ipsec::ObservedXfrm> {
        match tokio::task::spawn_blocking(|| xfrm::XfrmSocket::open()?.observe()).await {
            Ok(Ok(x)) => Ok(x),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "reading xfrm state");
                Ok(Default::default())
            }
            Err(e) => {
                Err(DataplaneError::Io { call: "xfrm", object: "observe".into(), source: std::io::Error::other(e) })
            }
        }
    }

    /// The ESP-in-UDP socket on `port` (made if this host has none on it):
    /// without it the kernel would answer the peer's encapsulated ESP with
    /// "port unreachable".
    fn ensure_esp_udp(&self, port: u16) -> Result<()> {
        let mut s = self.esp_udp.lock().unwrap_or_else(|p| p.into_inner());
        if s.as_ref().is_some_and(|s| s.port == port) {
            return Ok(());
        }
        *s = Some(xfrm::EspUdpSocket::open(port)?);
        tracing::info!(port, "receiving ESP in UDP");
        Ok(())
    }

    /// One IPsec SA or policy change, on a blocking thread.
    async fn apply_xfrm(&self, op: &trellis_ipsec::XfrmOp) -> Result<()> {
        if let trellis_ipsec::XfrmOp::AddSa(sa) = op
            && let Some(port) = sa.encap
        {
            self.ensure_esp_udp(port)?;
        }
        let op = op.clone();
        tokio::task::spawn_blocking(move || xfrm::XfrmSocket::open()?.apply(&op)).await.map_err(|e| {
            DataplaneError::Io { call: "xfrm", object: "executor".into(), source: std::io::Error::other(e) }
        })?
    }
}

/// The tables as last read back and changed since, how many full
/// observations used them, and their generation.
#[derive(Default)]
pub(super) struct TablesSeen {
    pub tables: Option<std::sync::Arc<crate::dataplane::Tables>>,
    pub uses: u32,
    pub generation: u64,
}

#[async_trait::async_trait]
impl Dataplane for NetlinkDataplane {
    fn prepare_host(&self) {
        sysctl::raise_host_limits();
    }

    fn probe_sockets(&self) -> std::io::Result<Box<dyn crate::dataplane::ProbeSockets>> {
        Ok(Box::new(probe::IcmpSockets::open()?))
    }

    fn esp_support(&self) -> std::result::Result<(), String> {
        xfrm::esp_support()
    }

    fn observe_xfrm(&self) -> Result<trellis_ipsec::ObservedXfrm> {
        xfrm::XfrmSocket::open()?.observe()
    }

    fn held_ports(&self) -> Result<std::collections::BTreeSet<(model::Proto, u16)>> {
        ports::held().map_err(|e| DataplaneError::Io {
            call: "read the sockets of",
            object: "/proc/self/net".into(),
            source: e,
        })
    }

    fn port_holder(&self, proto: model::Proto, port: u16, ip: Option<IpAddr>) -> Result<Option<String>> {
        ports::holder(proto, port, ip).map_err(|e| DataplaneError::Io {
            call: "read the sockets of",
            object: "/proc/self/net".into(),
            source: e,
        })
    }

    fn check_netns(&self, path: &std::path::Path) -> Result<()> {
        netns::open(path).map(drop)
    }

    fn create_netns(&self, path: &std::path::Path) -> Result<()> {
        netns::create(path)
    }

    fn remove_netns(&self, path: &std::path::Path) -> Result<()> {
        netns::remove(path)
    }

    fn strict_rp_filter(&self) -> bool {
        std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter").is_ok_and(|v| v.trim() == "1")
    }

    fn set_events(&self, on: bool) {
        self.set_monitor_events(on)
    }

    fn service_stats(&self, id: u32) -> Option<trellis_ebpf::SvcStats> {
        self.read_service_stats(id)
    }

    fn sync_dns(&self, want: &BTreeMap<trellis_ebpf::DnsKey, trellis_ebpf::DnsAnswer>) -> Result<()> {
        self.sync_dns_table(want)
    }

    fn patch_dns(&self, entries: &[(trellis_ebpf::DnsKey, Option<trellis_ebpf::DnsAnswer>)]) -> Result<()> {
        self.patch_dns_table(entries)
    }

    fn dns_config(&self, kernel: bool, ra: bool) -> Result<()> {
        self.set_dns_config(kernel, ra)
    }

    fn dns_stats(&self) -> Option<trellis_ebpf::DnsStats> {
        self.read_dns_stats()
    }

    fn endpoint_counters(&self) -> Vec<(String, trellis_ebpf::EndpointCounters)> {
        self.read_endpoint_counters()
    }

    fn sweep_flows(&self) -> Result<trellis_ebpf::FlowSweep> {
        let Some((dp, _)) = &self.bpf else { return Ok(Default::default()) };
        let dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        dp.sweep_flows(trellis_ebpf::flow_clock(), &trellis_ebpf::conntrack::Lifetimes::default())
            .map_err(|e| DataplaneError::Ebpf(format!("sweeping flows: {e}")))
    }

    async fn container_link(&self, netns: &std::path::Path, ifname: &str) -> Result<Option<ContainerLink>> {
        self.read_container_link(netns, ifname).await
    }

    async fn observe(&self, rules: bool) -> Result<Observed> {
        let links = self.links().await?;
        let names: HashMap<u32, String> = links.iter().map(|l| (l.index, l.name.clone())).collect();
        let owned: HashMap<u32, &links::LinkSummary> =
            links.iter().filter(|l| model::owned_link(&l.name)).map(|l| (l.index, l)).collect();
        let mut addrs = self.addresses_of(&owned).await?;
        let vxlans: Vec<u32> = owned.values().filter(|l| l.kind == LinkKind::Vxlan).map(|l| l.index).collect();
        let mesh_ports: Vec<u32> =
            owned.values().filter(|l| l.name.starts_with(model::MESH_PORT_PREFIX)).map(|l| l.index).collect();
        let (mut fdb, mut neigh, mut statics) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        if !vxlans.is_empty() || !mesh_ports.is_empty() {
            (fdb, neigh, statics) = self.tunnel_entries(&vxlans, &mesh_ports).await?;
        }
        let egress = if rules { self.egress_fingerprint().await? } else { None };
        self.sweep_gone_interfaces(&names);
        let (programs, program_flags) = self.observe_programs(&links);
        let mesh_links = self.observe_mesh_links(&links);
        let (tables, tables_cached, tables_generation) = self.observe_tables(rules)?;
        let xfrm = self.observe_xfrm_async().await?;
        // SAs an earlier run made carry ESP in UDP: receive it again.
        if let Some(port) = xfrm.sas.values().find_map(|sa| sa.encap)
            && let Err(e) = self.ensure_esp_udp(port)
        {
            tracing::warn!(port, error = %e, "the ESP-in-UDP socket");
        }
        let mut observed = Observed {
            egress,
            programs,
            program_flags,
            mesh_links,
            tables,
            tables_cached,
            tables_generation,
            xfrm,
            ..Observed::default()
        };
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
                    dont_fragment: l.dont_fragment,
                    mac: if l.kind == LinkKind::Bridge || l.name.starts_with(model::MESH_PREFIX) {
                        l.mac
                    } else {
                        None
                    },
                    fdb: fdb.remove(&index).unwrap_or_default(),
                    neigh: neigh.remove(&index).unwrap_or_default(),
                    static_macs: statics.remove(&index).unwrap_or_default(),
                },
            );
        }
        Ok(observed)
    }

    async fn apply(&self, action: &Action) -> Result<()> {
        match action {
            Action::CreateBridge { name, mtu, mac } => self.create_bridge(name, *mtu, *mac).await,
            Action::SetMac { link, mac } => self.set_mac(link, *mac).await,
            Action::SetLink { name, mtu, master } => self.set_link(name, *mtu, master.as_deref()).await,
            Action::SetContainerMtu { netns, ifname, mtu } => self.set_container_mtu(netns, ifname, *mtu).await,
            Action::AddAddress { link, addr } => self.add_address(link, addr).await,
            Action::DelAddress { link, addr } => self.del_address(link, addr).await,
            Action::CreateEndpoint(spec) => self.create_endpoint(spec).await,
            Action::CreateMeshVeth(v) => self.create_mesh_veth(v).await,
            Action::AttachProgram { ifname, ip, ip6, mac, program } => {
                self.attach_program(ifname, *ip, *ip6, *mac, program).await
            }
            Action::UpdateTables(ops) => self.update_tables(ops),
            Action::DetachProgram { ifname } => self.detach_program(ifname).await,
            Action::AttachMesh { ifname, role } => self.attach_mesh(ifname, *role),
            Action::DetachMesh { ifname } => self.detach_mesh(ifname),
            Action::CreateVxlan(v) => self.create_vxlan(v).await,
            Action::AddFdb { link, mac, dst } => self.add_fdb(link, *mac, *dst).await,
            Action::DelFdb { link, mac, dst } => self.del_fdb(link, *mac, *dst).await,
            Action::AddNeigh { link, ip, mac } => self.add_neigh(link, *ip, *mac).await,
            Action::DelNeigh { link, ip, .. } => self.del_neigh(link, *ip).await,
            Action::DeleteLink { name } => self.delete_link(name).await,
            Action::ApplyEgress(rules) => self.apply_egress(rules).await,
            Action::Xfrm { op, .. } => self.apply_xfrm(op).await,
        }
    }

    async fn host_routes(&self) -> Result<Vec<IpNet>> {
        self.foreign_routes().await
    }

    async fn underlay_mtu(&self) -> Result<u32> {
        self.default_route_mtu().await
    }

    async fn underlay_candidates(&self) -> Result<Vec<(String, IpAddr)>> {
        self.default_route_addrs().await
    }

    async fn link_with_addr(&self, addr: IpAddr) -> Result<Option<String>> {
        self.link_with_addr(addr).await
    }
}
