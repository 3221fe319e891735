//! The kernel boundary: one trait through which the agent observes and
//! changes host networking. The netlink/nftables implementation lives in
//! [`crate::netlink`]; [`FakeDataplane`] records operations for unit tests.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use std::path::PathBuf;
use std::sync::Mutex;
use trellis_ebpf::{BackendInfo, BackendKey, NetInfo, SvcInfo, SvcKey, VipInfo};

use ipnet::IpNet;

use crate::egress::EgressRules;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LinkKind {
    Bridge,
    Veth,
    Vxlan,
    #[default]
    Other,
}

pub type Mac = [u8; 6];

/// A link as the kernel reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObservedLink {
    pub kind: LinkKind,
    pub master: Option<String>,
    pub mtu: u32,
    pub up: bool,
    /// IPv4 addresses and global IPv6 addresses (link-local ones are the
    /// kernel's and ignored).
    pub addrs: Vec<IpNet>,
    /// VXLAN devices: the VNI, the static FDB entries (MAC → remote VTEP)
    /// and the permanent neighbour entries (IP → MAC).
    pub vni: Option<u32>,
    /// Bridges: the MAC (fixed by the agent, so it never follows its ports).
    pub mac: Option<Mac>,
    pub fdb: BTreeSet<(Mac, IpAddr)>,
    pub neigh: BTreeSet<(IpAddr, Mac)>,
}

/// A network's VXLAN device on a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    pub local: IpAddr,
    pub mtu: u32,
    pub mac: Mac,
}

/// The eBPF datapath's tables: what isolation and service load balancing
/// look up. Desired and observed alike; observed Maglev tables are known by
/// service id only (each service entry carries the digest of the backend
/// set its table was built from).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    /// Every Trellis subnet of the cluster → its network.
    pub nets: BTreeMap<(Ipv4Addr, u8), NetInfo>,
    pub vips: BTreeMap<Ipv4Addr, VipInfo>,
    pub services: BTreeMap<SvcKey, SvcInfo>,
    /// Service id → its backends (observed: empty).
    pub maglev: BTreeMap<u32, Vec<Ipv4Addr>>,
    pub backends: BTreeMap<BackendKey, BackendInfo>,
}

/// Changes to the tables, applied in this order: what a service will point
/// to first, the service after; the service's removal first, what it
/// pointed to after. A flow never meets a half-made entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableOps {
    pub put_backends: Vec<(BackendKey, BackendInfo)>,
    pub put_maglev: Vec<(u32, Vec<Ipv4Addr>)>,
    pub put_nets: Vec<((Ipv4Addr, u8), NetInfo)>,
    pub put_services: Vec<(SvcKey, SvcInfo)>,
    pub put_vips: Vec<(Ipv4Addr, VipInfo)>,
    pub del_services: Vec<SvcKey>,
    pub del_vips: Vec<Ipv4Addr>,
    pub del_maglev: Vec<u32>,
    pub del_backends: Vec<BackendKey>,
    pub del_nets: Vec<(Ipv4Addr, u8)>,
}

impl TableOps {
    pub fn is_empty(&self) -> bool {
        *self == TableOps::default()
    }

    /// How many entries change.
    pub fn len(&self) -> usize {
        self.put_backends.len()
            + self.put_maglev.len()
            + self.put_nets.len()
            + self.put_services.len()
            + self.put_vips.len()
            + self.del_services.len()
            + self.del_vips.len()
            + self.del_maglev.len()
            + self.del_backends.len()
            + self.del_nets.len()
    }
}

impl Tables {
    /// The operations that turn `self` (observed) into `want`.
    pub fn ops_to(&self, want: &Tables) -> TableOps {
        fn changed<K: Ord + Clone, V: PartialEq + Clone>(have: &BTreeMap<K, V>, want: &BTreeMap<K, V>) -> Vec<(K, V)> {
            want.iter().filter(|(k, v)| have.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect()
        }
        fn gone<K: Ord + Clone, V>(have: &BTreeMap<K, V>, want: &BTreeMap<K, V>) -> Vec<K> {
            have.keys().filter(|k| !want.contains_key(*k)).cloned().collect()
        }
        // A table is rewritten when it is missing or when any of its
        // service's entries records another backend set.
        let stale: BTreeSet<u32> = want
            .services
            .iter()
            .filter(|(k, v)| self.services.get(*k).is_none_or(|o| o.revision != v.revision))
            .map(|(_, v)| v.id)
            .collect();
        let put_maglev = want
            .maglev
            .iter()
            .filter(|(id, _)| !self.maglev.contains_key(*id) || stale.contains(*id))
            .map(|(id, b)| (*id, b.clone()))
            .collect();
        TableOps {
            put_backends: changed(&self.backends, &want.backends),
            put_maglev,
            put_nets: changed(&self.nets, &want.nets),
            put_services: changed(&self.services, &want.services),
            put_vips: changed(&self.vips, &want.vips),
            del_services: gone(&self.services, &want.services),
            del_vips: gone(&self.vips, &want.vips),
            del_maglev: gone(&self.maglev, &want.maglev),
            del_backends: gone(&self.backends, &want.backends),
            del_nets: gone(&self.nets, &want.nets),
        }
    }

    /// The tables after `ops` (Maglev tables by id only).
    pub fn apply(&mut self, ops: &TableOps) {
        self.backends.extend(ops.put_backends.iter().cloned());
        self.maglev.extend(ops.put_maglev.iter().map(|(id, _)| (*id, Vec::new())));
        self.nets.extend(ops.put_nets.iter().cloned());
        self.services.extend(ops.put_services.iter().cloned());
        self.vips.extend(ops.put_vips.iter().cloned());
        for k in &ops.del_services {
            self.services.remove(k);
        }
        for k in &ops.del_vips {
            self.vips.remove(k);
        }
        for k in &ops.del_maglev {
            self.maglev.remove(k);
        }
        for k in &ops.del_backends {
            self.backends.remove(k);
        }
        for k in &ops.del_nets {
            self.nets.remove(k);
        }
    }
}

/// What the agent sees of its host's kernel state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub links: BTreeMap<String, ObservedLink>,
    /// Interfaces with the endpoint program attached (pinned links).
    pub programs: BTreeSet<String>,
    /// Their `endpoint_info.flags` as the program sees them.
    pub program_flags: BTreeMap<String, u32>,
    /// The fingerprint of the installed egress rules, if any are.
    pub egress: Option<String>,
    /// The eBPF tables (empty without the program).
    pub tables: Tables,
    /// Trellis's IPsec SAs and policies.
    pub xfrm: trellis_ipsec::ObservedXfrm,
}

impl Observed {
    /// The state after `action` succeeded: how the reconciler keeps its
    /// picture of the kernel current between full observations, and how the
    /// fake kernel of the unit tests behaves.
    pub fn record(&mut self, action: &Action) -> Result<()> {
        let missing = |name: &str| DataplaneError::LinkNotFound(name.to_string());
        match action {
            Action::CreateBridge { name, mtu, mac } => {
                self.links.insert(
                    name.clone(),
                    ObservedLink { kind: LinkKind::Bridge, mtu: *mtu, mac: Some(*mac), ..Default::default() },
                );
            }
            Action::SetMac { link, mac } => {
                self.links.get_mut(link).ok_or_else(|| missing(link))?.mac = Some(*mac);
            }
            Action::CreateVxlan(v) => {
                self.links.insert(
                    v.name.clone(),
                    ObservedLink { kind: LinkKind::Vxlan, mtu: v.mtu, vni: Some(v.vni), ..Default::default() },
                );
            }
            Action::AddFdb { link, mac, dst } => {
                self.links.get_mut(link).ok_or_else(|| missing(link))?.fdb.insert((*mac, *dst));
            }
            Action::DelFdb { link, mac, dst } => {
                self.links.get_mut(link).ok_or_else(|| missing(link))?.fdb.remove(&(*mac, *dst));
            }
            Action::AddNeigh { link, ip, mac } => {
                self.links.get_mut(link).ok_or_else(|| missing(link))?.neigh.insert((*ip, *mac));
            }
            Action::DelNeigh { link, ip, mac } => {
                self.links.get_mut(link).ok_or_else(|| missing(link))?.neigh.remove(&(*ip, *mac));
            }
            Action::SetLink { name, mtu, master } => {
                let l = self.links.get_mut(name).ok_or_else(|| missing(name))?;
                l.mtu = *mtu;
                l.up = true;
                l.master = master.clone();
            }
            Action::AddAddress { link, addr } => {
                let l = self.links.get_mut(link).ok_or_else(|| missing(link))?;
                if !l.addrs.contains(addr) {
                    l.addrs.push(*addr);
                }
            }
            Action::DelAddress { link, addr } => {
                let l = self.links.get_mut(link).ok_or_else(|| missing(link))?;
                l.addrs.retain(|a| a != addr);
            }
            Action::CreateEndpoint(spec) => {
                self.links.insert(
                    spec.host_if.clone(),
                    ObservedLink {
                        kind: LinkKind::Veth,
                        master: Some(spec.bridge.clone()),
                        mtu: spec.mtu,
                        up: true,
                        ..Default::default()
                    },
                );
            }
            Action::DeleteLink { name } => {
                self.links.remove(name).ok_or_else(|| missing(name))?;
            }
            Action::ApplyEgress(rules) => self.egress = Some(rules.fingerprint()),
            Action::AttachProgram { ifname, program, .. } => {
                self.programs.insert(ifname.clone());
                self.program_flags.insert(ifname.clone(), program.flags());
            }
            Action::DetachProgram { ifname } => {
                self.programs.remove(ifname);
                self.program_flags.remove(ifname);
            }
            Action::UpdateTables(ops) => self.tables.apply(ops),
            Action::Xfrm { op, .. } => match op {
                trellis_ipsec::XfrmOp::AddSa(sa) => {
                    let seen = trellis_ipsec::xfrm::ObservedSa {
                        src: sa.src,
                        reqid: trellis_ipsec::xfrm::reqid(sa.port),
                        oseq: 0,
                    };
                    self.xfrm.sas.insert(sa.id(), seen);
                }
                trellis_ipsec::XfrmOp::DelSa(id) => {
                    self.xfrm.sas.remove(id);
                }
                trellis_ipsec::XfrmOp::AddPolicy(p) => {
                    self.xfrm.policies.insert(*p);
                }
                trellis_ipsec::XfrmOp::DelPolicy(p) => {
                    self.xfrm.policies.remove(p);
                }
            },
        }
        Ok(())
    }
}

/// Everything needed to plug an endpoint in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub endpoint_id: String,
    pub host_if: String,
    pub peer_if: String,
    pub bridge: String,
    pub mtu: u32,
    pub netns: PathBuf,
    pub ifname: String,
    pub mac: [u8; 6],
    pub addr: IpNet,
    /// Default route via this address (none on internal networks).
    pub default_via: Option<IpAddr>,
    /// The engine moves the container end into its sandbox and configures
    /// it (Docker): both ends are created in the host's namespace, the
    /// container end named `peer_if`.
    pub engine_moves: bool,
    /// When the endpoint was created (Unix seconds): an engine's sandbox
    /// namespace appears only after its Join.
    pub created_unix: i64,
}

/// One change to the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A bridge with a fixed MAC: a bridge without one takes the lowest
    /// of its ports' MACs, and changes it as ports come and go — leaving
    /// every container's neighbour entry for the gateway stale.
    CreateBridge {
        name: String,
        mtu: u32,
        mac: Mac,
    },
    SetMac {
        link: String,
        mac: Mac,
    },
    /// Make an existing link match: MTU, up, and (for ports) its bridge.
    SetLink {
        name: String,
        mtu: u32,
        master: Option<String>,
    },
    AddAddress {
        link: String,
        addr: IpNet,
    },
    DelAddress {
        link: String,
        addr: IpNet,
    },
    CreateEndpoint(Box<EndpointSpec>),
    CreateVxlan(Box<VxlanSpec>),
    AddFdb {
        link: String,
        mac: Mac,
        dst: IpAddr,
    },
    DelFdb {
        link: String,
        mac: Mac,
        dst: IpAddr,
    },
    AddNeigh {
        link: String,
        ip: IpAddr,
        mac: Mac,
    },
    DelNeigh {
        link: String,
        ip: IpAddr,
        mac: Mac,
    },
    /// Attach the endpoint program to an endpoint's host-side veth and
    /// program its entry (replacing any earlier attachment).
    AttachProgram {
        ifname: String,
        ip: IpAddr,
        mac: Mac,
        program: crate::reconcile::ProgramSpec,
    },
    /// Change the isolation and service tables.
    UpdateTables(Box<TableOps>),
    DetachProgram {
        ifname: String,
    },
    DeleteLink {
        name: String,
    },
    ApplyEgress(EgressRules),
    /// Change an IPsec SA or policy of an encrypted network (whose VXLAN
    /// device is `vxlan`, when the change is for one).
    Xfrm {
        op: trellis_ipsec::XfrmOp,
        vxlan: Option<String>,
    },
}

impl Action {
    /// The endpoint this action is for, if any (to report errors per endpoint).
    pub fn endpoint(&self) -> Option<&str> {
        match self {
            Action::CreateEndpoint(spec) => Some(&spec.endpoint_id),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("netlink {call} failed for {object}: {source}")]
    Netlink {
        call: &'static str,
        object: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{call} failed for {object}: {source}")]
    Io {
        call: &'static str,
        object: String,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace {0} does not exist (the container is gone?)")]
    NetnsGone(PathBuf),
    /// A netns path that is something else: what it is, and what to do.
    #[error("{} is not a network namespace ({what}): {hint}", path.display())]
    NotNetns { path: PathBuf, what: String, hint: String },
    #[error("link {0} not found")]
    LinkNotFound(String),
    #[error("nftables: {0}")]
    Nftables(String),
    #[error("eBPF: {0}")]
    Ebpf(String),
}

pub type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// The kernel boundary.
#[async_trait::async_trait]
pub trait Dataplane: Send + Sync + 'static {
    /// The links and addresses the agent may own and, with `rules`, the
    /// installed egress rules (costlier to read).
    async fn observe(&self, rules: bool) -> Result<Observed>;
    /// Apply one change.
    async fn apply(&self, action: &Action) -> Result<()>;
    /// Destination prefixes of the host's routes that are not the agent's
    /// own (new subnets must not overlap them).
    async fn host_routes(&self) -> Result<Vec<IpNet>>;
    /// MTU of the interface of the default route (1500 without one).
    async fn underlay_mtu(&self) -> Result<u32>;
    /// The first IPv4 address of the default route's interface.
    async fn underlay_addr(&self) -> Result<Option<IpAddr>>;
    /// An interface inside a container's namespace, as the kernel has it
    /// (`None`: no such interface; an error if the namespace is gone).
    async fn container_link(&self, netns: &std::path::Path, ifname: &str) -> Result<Option<ContainerLink>>;
    /// Per-endpoint counters of the eBPF program, by host interface (empty
    /// without the program). Reads maps only: cheap enough for a scrape.
    fn endpoint_counters(&self) -> Vec<(String, trellis_ebpf::EndpointCounters)> {
        Vec::new()
    }
    /// Turn the datapath's monitor events on (someone watches) or off.
    fn set_events(&self, _on: bool) {}
    /// A service's datapath counters on this host (by datapath id).
    /// Make the in-kernel DNS table hold exactly `want`.
    fn sync_dns(&self, _want: &BTreeMap<trellis_ebpf::DnsKey, trellis_ebpf::DnsAnswer>) -> Result<()> {
        Ok(())
    }

    /// The in-kernel DNS path on or off, and whether its answers say
    /// recursion is available (as the server's do when it forwards).
    fn dns_config(&self, _kernel: bool, _ra: bool) -> Result<()> {
        Ok(())
    }

    /// What the in-kernel DNS path did (none without the datapath).
    fn dns_stats(&self) -> Option<trellis_ebpf::DnsStats> {
        None
    }

    fn service_stats(&self, _id: u32) -> Option<trellis_ebpf::SvcStats> {
        None
    }
}

/// An endpoint's interface inside its container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerLink {
    pub mac: Mac,
    pub mtu: u32,
    pub up: bool,
    pub addrs: Vec<IpNet>,
}

/// A dataplane in memory that applies actions to its own [`Observed`] and
/// records them: the reconciler's unit tests run against it.
#[derive(Default)]
pub struct FakeDataplane {
    pub state: Mutex<Observed>,
    pub log: Mutex<Vec<Action>>,
    /// Endpoint ids whose creation fails (their netns "is gone").
    pub failing: Mutex<Vec<String>>,
    /// Every xfrm change fails (a kernel without ESP or xfrm).
    pub failing_xfrm: std::sync::atomic::AtomicBool,
}

impl FakeDataplane {
    pub fn take_log(&self) -> Vec<Action> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
    pub fn with_state<R>(&self, f: impl FnOnce(&mut Observed) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }
}

#[async_trait::async_trait]
impl Dataplane for FakeDataplane {
    async fn observe(&self, rules: bool) -> Result<Observed> {
        // Yield like a real netlink dump would, so concurrency shows in tests.
        tokio::task::yield_now().await;
        let mut o = self.state.lock().unwrap().clone();
        if !rules {
            o.egress = None;
        }
        Ok(o)
    }

    async fn apply(&self, action: &Action) -> Result<()> {
        self.log.lock().unwrap().push(action.clone());
        if let Action::CreateEndpoint(spec) = action
            && self.failing.lock().unwrap().contains(&spec.endpoint_id)
        {
            return Err(DataplaneError::NetnsGone(spec.netns.clone()));
        }
        if matches!(action, Action::Xfrm { .. }) && self.failing_xfrm.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(DataplaneError::Io {
                call: "add xfrm state",
                object: "fake".into(),
                source: std::io::Error::from_raw_os_error(2),
            });
        }
        self.state.lock().unwrap().record(action)
    }

    async fn host_routes(&self) -> Result<Vec<IpNet>> {
        Ok(vec![])
    }

    async fn underlay_mtu(&self) -> Result<u32> {
        Ok(1500)
    }

    async fn underlay_addr(&self) -> Result<Option<IpAddr>> {
        Ok(None)
    }

    async fn container_link(&self, netns: &std::path::Path, ifname: &str) -> Result<Option<ContainerLink>> {
        // The fake kernel plugs containers perfectly: the container side is
        // what the endpoint's creation asked for, while its host side exists.
        let state = self.state.lock().unwrap();
        let created = self.log.lock().unwrap().iter().rev().find_map(|a| match a {
            Action::CreateEndpoint(s) if s.netns == netns && s.ifname == ifname => Some((**s).clone()),
            _ => None,
        });
        Ok(created.filter(|s| state.links.contains_key(&s.host_if)).map(|s| ContainerLink {
            mac: s.mac,
            mtu: s.mtu,
            up: true,
            addrs: vec![s.addr],
        }))
    }
}
