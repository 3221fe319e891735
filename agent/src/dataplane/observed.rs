//! What the agent sees of its host's kernel, as values: links with their
//! addresses, tunnel entries and programs, the tables, the xfrm state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::action::Action;
use super::tables::Tables;
use super::{DataplaneError, Result};
use crate::model::Mac;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LinkKind {
    Bridge,
    Veth,
    Vxlan,
    #[default]
    Other,
}

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
    /// VXLAN devices: outer packets carry Don't Fragment.
    pub dont_fragment: bool,
    /// Bridges: the MAC (fixed by the agent, so it never follows its
    /// ports); the host end of a mesh veth: its MAC.
    pub mac: Option<Mac>,
    pub fdb: BTreeSet<(Mac, IpAddr)>,
    pub neigh: BTreeSet<(IpAddr, Mac)>,
    /// The bridge end of a mesh veth: the static FDB entries of the bridge
    /// on it (`bridge fdb … master static`).
    pub static_macs: BTreeSet<Mac>,
}

/// What the agent sees of its host's kernel state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub links: BTreeMap<String, ObservedLink>,
    /// Interfaces with the endpoint program attached (pinned links).
    pub programs: BTreeSet<String>,
    /// Their `endpoint_info.flags` as the program sees them.
    pub program_flags: BTreeMap<String, u32>,
    /// Interfaces with a routing mesh program attached.
    pub mesh_links: BTreeSet<String>,
    /// The fingerprint of the installed egress rules, if any are.
    pub egress: Option<String>,
    /// The eBPF tables (empty without the program), shared with the
    /// dataplane's own picture of them.
    pub tables: std::sync::Arc<Tables>,
    /// `tables` is the dataplane's picture at [`Observed::tables_generation`],
    /// not read back from the kernel this time: a pass that found these
    /// same tables clean for the same desired state needs not diff them.
    pub tables_cached: bool,
    /// The dataplane's picture of the tables changes generation with every
    /// read-back and every change it applies.
    pub tables_generation: u64,
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
                    ObservedLink {
                        kind: LinkKind::Vxlan,
                        mtu: v.mtu,
                        vni: Some(v.vni),
                        dont_fragment: v.dont_fragment,
                        ..Default::default()
                    },
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
            // Inside a container: nothing the host's links show.
            Action::SetContainerMtu { .. } => {}
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
                        // Down until a `SetLink` (after its program).
                        up: false,
                        ..Default::default()
                    },
                );
            }
            Action::DeleteLink { name } => {
                self.links.remove(name).ok_or_else(|| missing(name))?;
                self.mesh_links.remove(name);
                // A veth goes whole: the host end of a mesh veth with its port.
                if let Some(net) = name.strip_prefix(crate::model::MESH_PORT_PREFIX) {
                    self.links.remove(&format!("{}{net}", crate::model::MESH_PREFIX));
                }
            }
            Action::CreateMeshVeth(v) => {
                self.links.insert(
                    v.port.clone(),
                    ObservedLink {
                        kind: LinkKind::Veth,
                        master: Some(v.bridge.clone()),
                        mtu: v.mtu,
                        up: true,
                        static_macs: [v.mac].into(),
                        ..Default::default()
                    },
                );
                self.links.insert(
                    v.ifname.clone(),
                    ObservedLink {
                        kind: LinkKind::Veth,
                        mtu: v.mtu,
                        up: true,
                        mac: Some(v.mac),
                        addrs: vec![v.cidr()],
                        ..Default::default()
                    },
                );
            }
            Action::AttachMesh { ifname, .. } => {
                self.mesh_links.insert(ifname.clone());
            }
            Action::DetachMesh { ifname } => {
                self.mesh_links.remove(ifname);
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
            Action::UpdateTables(ops) => {
                std::sync::Arc::make_mut(&mut self.tables).apply(ops);
                // No longer the dataplane's picture at that generation.
                self.tables_cached = false;
            }
            Action::Xfrm { op, .. } => match op {
                trellis_ipsec::XfrmOp::AddSa(sa) => {
                    let seen = trellis_ipsec::xfrm::ObservedSa {
                        src: sa.src,
                        reqid: trellis_ipsec::xfrm::reqid(sa.port),
                        oseq: 0,
                        encap: sa.encap,
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

/// An endpoint's interface inside its container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerLink {
    pub mac: Mac,
    pub mtu: u32,
    pub up: bool,
    pub addrs: Vec<IpNet>,
}
