//! Level-triggered reconciliation: the kernel state a host should have is
//! computed from the whole desired state in the store ([`desired`]), compared
//! with what the kernel has ([`diff`]), and the difference applied. Both
//! steps are pure; [`Reconciler`] runs them against a [`Dataplane`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::dataplane::{Action, Dataplane, DataplaneError, EndpointSpec, LinkKind, Mac, Observed, Tables, VxlanSpec};
use crate::egress::{EgressNet, EgressRules};
use crate::model::{self, EndpointRecord, HostRecord, NetworkRecord, ServiceRecord};

/// Who this host is, as the desired state needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub host: String,
    /// Underlay address; without one the host builds no tunnels.
    pub underlay: Option<IpAddr>,
    pub vtep_mac: Mac,
    pub vxlan_port: u16,
    /// The eBPF endpoint program could be loaded: attach it everywhere.
    pub ebpf: bool,
    /// This host answers DNS on the gateways: endpoints' queries to any
    /// other resolver are redirected there.
    pub dns_intercept: bool,
    /// The datapath answers plain A queries itself (the in-kernel DNS path).
    pub dns_kernel: bool,
}

impl Identity {
    /// An identity with no underlay (single host, tests).
    pub fn local(host: &str) -> Identity {
        Identity {
            host: host.to_string(),
            underlay: None,
            vtep_mac: [2, 0, 0, 0, 0, 1],
            vxlan_port: 4789,
            ebpf: false,
            dns_intercept: false,
            dns_kernel: false,
        }
    }
}

/// A network's VXLAN device with its static entries for remote endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredVxlan {
    pub spec: VxlanSpec,
    /// The bridge it is a port of (empty: none, the probe device).
    pub bridge: String,
    pub fdb: BTreeSet<(Mac, IpAddr)>,
    pub neigh: BTreeSet<(IpAddr, Mac)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBridge {
    pub mtu: u32,
    pub addr: Option<IpNet>,
    pub mac: Mac,
}

/// What an endpoint's programs know of its network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramSpec {
    pub vni: u32,
    pub internal: bool,
    /// DNS to resolvers outside Trellis goes to this gateway (and MAC).
    pub dns_at: Option<(std::net::Ipv4Addr, Mac)>,
    /// Its container is on this network only: plain A queries for names
    /// with one address may be answered in the kernel.
    pub dns_fast: bool,
}

impl ProgramSpec {
    /// `endpoint_info.flags` as the program has them.
    pub fn flags(&self) -> u32 {
        let mut f = 0;
        if self.internal {
            f |= trellis_ebpf::EP_INTERNAL;
        }
        if self.dns_at.is_some() {
            f |= trellis_ebpf::EP_DNS;
        }
        if self.dns_fast {
            f |= trellis_ebpf::EP_DNS_FAST;
        }
        f
    }
}

/// The kernel state one host should have.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredHost {
    pub bridges: BTreeMap<String, DesiredBridge>,
    /// Keyed by host-side interface name.
    pub endpoints: BTreeMap<String, EndpointSpec>,
    /// Keyed by device name.
    pub vxlans: BTreeMap<String, DesiredVxlan>,
    /// Endpoint veths that carry the endpoint programs, with what the
    /// programs need to know of the endpoint's network.
    pub programs: BTreeMap<String, ProgramSpec>,
    pub egress: EgressRules,
    /// The eBPF datapath's isolation and service tables.
    pub tables: Tables,
    /// IPsec SAs and policies of the encrypted networks' tunnels.
    pub xfrm: trellis_ipsec::XfrmState,
    /// The VXLAN device of each encrypted network's port (to hold its
    /// tunnel entries back while its policies fail).
    pub esp_vxlans: BTreeMap<u16, String>,
    /// What this host acks for each encrypted network it carries once a
    /// pass installed all of `xfrm`.
    pub acks: BTreeMap<String, trellis_ipsec::Ack>,
}

/// What `host` should have, from every network and endpoint of the cluster.
/// Every network gets its bridge on every host (cheap, and a network is
/// usable on a host before its first endpoint lands there).
pub fn desired(
    networks: &[NetworkRecord],
    endpoints: &[EndpointRecord],
    hosts: &[HostRecord],
    me: &Identity,
) -> DesiredHost {
    let host = me.host.as_str();
    let mut d = DesiredHost::default();
    let mut by_id = BTreeMap::new();
    let mut egress = Vec::new();
    for n in networks {
        let bridge = model::bridge_name(&n.id);
        // The same on every host (the gateway is anycast), never an
        // endpoint's (no endpoint has the subnet's network address).
        let mac = model::mac_for_ip(n.subnet.network());
        d.bridges.insert(bridge.clone(), DesiredBridge { mtu: n.mtu, addr: n.gateway_cidr(), mac });
        egress.push(EgressNet { bridge, subnet: n.subnet, gateway: n.gateway, internal: n.internal });
        by_id.insert(n.id.as_str(), n);
    }
    d.egress = EgressRules::new(egress);
    // The eBPF program redirects DNS itself; nftables does without it.
    d.egress.dns_intercept = me.dns_intercept && !me.ebpf;
    // With the program's redirect (no NAT to undo), DNS over UDP to the
    // gateway is kept out of connection tracking.
    d.egress.dns_notrack = me.dns_intercept && me.ebpf;
    for e in endpoints.iter().filter(|e| e.host == host && !e.deleting) {
        let Some(n) = by_id.get(e.network_id.as_str()) else {
            continue;
        };
        let Some(mac) = model::parse_mac(&e.mac) else {
            continue;
        };
        let host_if = model::host_ifname(&e.id);
        d.endpoints.insert(
            host_if.clone(),
            EndpointSpec {
                endpoint_id: e.id.clone(),
                host_if,
                peer_if: model::peer_ifname(&e.id),
                bridge: model::bridge_name(&n.id),
                mtu: n.mtu,
                netns: e.netns.clone(),
                ifname: e.ifname.clone(),
                mac,
                addr: IpNet::new(e.ip, n.subnet.prefix_len()).expect("prefix of the subnet"),
                default_via: if n.internal { None } else { n.gateway },
                engine_moves: e.kind == model::EndpointKind::Docker,
                created_unix: e.created_unix,
            },
        );
    }
    if me.ebpf {
        let net_of: BTreeMap<&str, &str> = endpoints.iter().map(|e| (e.id.as_str(), e.network_id.as_str())).collect();
        // Containers (namespaces) of this host on more than one network see
        // the names of all of them: their queries go to the server.
        let mut nets_of_sandbox: BTreeMap<&std::path::Path, BTreeSet<&str>> = BTreeMap::new();
        for e in endpoints.iter().filter(|e| e.host == host && !e.deleting) {
            nets_of_sandbox.entry(e.netns.as_path()).or_default().insert(e.network_id.as_str());
        }
        for (name, spec) in &d.endpoints {
            let Some(n) = net_of.get(spec.endpoint_id.as_str()).and_then(|id| by_id.get(id)) else { continue };
            let dns_at = match (me.dns_intercept, n.gateway) {
                (true, Some(IpAddr::V4(gw))) => Some((gw, model::mac_for_ip(n.subnet.network()))),
                _ => None,
            };
            let alone = nets_of_sandbox.get(spec.netns.as_path()).is_none_or(|s| s.len() <= 1);
            let dns_fast = me.dns_kernel && dns_at.is_some() && alone;
            d.programs.insert(name.clone(), ProgramSpec { vni: n.vni, internal: n.internal, dns_at, dns_fast });
        }
    }
    // Tunnels: on a host with endpoints on a network, a VXLAN device with a
    // static FDB entry (MAC → VTEP) and neighbour entry (IP → MAC) for
    // every endpoint of that network on every other live host.
    if let Some(local) = me.underlay {
        let live: BTreeMap<&str, &HostRecord> =
            hosts.iter().filter(|h| h.id != host).map(|h| (h.id.as_str(), h)).collect();
        // The probe tunnel to every peer (see [`model::PROBE_VXLAN`]).
        let mut probe = DesiredVxlan {
            spec: VxlanSpec {
                name: model::PROBE_VXLAN.into(),
                vni: model::PROBE_VNI,
                port: me.vxlan_port,
                local,
                mtu: 1280,
                mac: me.vtep_mac,
            },
            bridge: String::new(),
            fdb: BTreeSet::new(),
            neigh: BTreeSet::new(),
        };
        for h in live.values() {
            if let Some(mac) = model::parse_mac(&h.vtep_mac) {
                probe.fdb.insert((mac, h.underlay));
                probe.neigh.insert((IpAddr::V6(model::link_local(&mac)), mac));
            }
        }
        d.vxlans.insert(model::PROBE_VXLAN.into(), probe);
        let local_nets: BTreeSet<&str> = d
            .endpoints
            .values()
            .map(|e| e.endpoint_id.as_str())
            .filter_map(|id| endpoints.iter().find(|e| e.id == id).map(|e| e.network_id.as_str()))
            .collect();
        for net_id in local_nets {
            let Some(n) = by_id.get(net_id) else { continue };
            let name = model::vxlan_name(&n.id);
            let mut v = DesiredVxlan {
                spec: VxlanSpec {
                    name: name.clone(),
                    vni: n.vni,
                    port: n.vxlan_port.unwrap_or(me.vxlan_port),
                    local,
                    mtu: n.mtu,
                    mac: me.vtep_mac,
                },
                bridge: model::bridge_name(&n.id),
                fdb: BTreeSet::new(),
                neigh: BTreeSet::new(),
            };
            for e in endpoints.iter().filter(|e| e.network_id == n.id && !e.deleting) {
                let (Some(h), Some(mac)) = (live.get(e.host.as_str()), model::parse_mac(&e.mac)) else {
                    continue;
                };
                v.fdb.insert((mac, h.underlay));
                v.neigh.insert((e.ip, mac));
            }
            d.vxlans.insert(name, v);
        }
    }
    d
}

/// The IPsec state of a host whose tunnels `d` holds: for every encrypted
/// network with a VXLAN device here, SAs and policies towards each host its
/// tunnel entries point at, and the acks this host gives once they are in.
/// A network whose key ring is missing still gets its policies: its
/// traffic stops rather than leave in the clear.
pub fn encryption(
    networks: &[NetworkRecord],
    keys: &BTreeMap<String, trellis_ipsec::KeyRing>,
    d: &mut DesiredHost,
    me: &Identity,
) {
    let none = trellis_ipsec::KeyRing { keys: vec![], tx: 0, switched_ms: 0, reason: None };
    let local_nets: BTreeSet<&str> = d.endpoints.values().map(|e| e.bridge.as_str()).collect();
    let mut nets = Vec::new();
    for n in networks.iter().filter(|n| n.encrypted) {
        let ring = keys.get(&n.id).unwrap_or(&none);
        if local_nets.contains(model::bridge_name(&n.id).as_str()) {
            d.acks.insert(n.id.clone(), trellis_ipsec::Ack { rx: ring.newest(), tx: ring.tx });
        }
        let Some(v) = d.vxlans.get(&model::vxlan_name(&n.id)) else { continue };
        d.esp_vxlans.insert(v.spec.port, v.spec.name.clone());
        let peers = v.fdb.iter().map(|(_, ip)| *ip).collect();
        nets.push(trellis_ipsec::EncryptedNet { port: v.spec.port, ring, peers });
    }
    if let Some(local) = me.underlay {
        d.xfrm = trellis_ipsec::xfrm::plan(local, &nets);
    }
}

/// The eBPF tables of a host whose endpoints `d` holds: every Trellis
/// subnet (isolation), and the VIP services of the networks it has
/// endpoints on, with the backends its datapath can reach now — local ones
/// whose veth exists, and remote ones on live hosts, whose tunnel entries
/// the same pass programs first.
pub fn tables(
    networks: &[NetworkRecord],
    endpoints: &[EndpointRecord],
    hosts: &[HostRecord],
    services: &[ServiceRecord],
    me: &Identity,
    d: &DesiredHost,
) -> Tables {
    use trellis_ebpf::{BackendInfo, BackendKey, NetInfo, SvcInfo, SvcKey, VipInfo, maglev};
    let mut t = Tables::default();
    if !me.ebpf {
        return t;
    }
    let mut vni_of = BTreeMap::new();
    for n in networks {
        vni_of.insert(n.id.as_str(), n.vni);
        if let IpNet::V4(v4) = n.subnet {
            t.nets.insert(
                (v4.network(), v4.prefix_len()),
                NetInfo { net_id: n.vni, flags: if n.internal { trellis_ebpf::EP_INTERNAL } else { 0 } },
            );
        }
    }
    let local_ids: BTreeSet<&str> = d.endpoints.values().map(|e| e.endpoint_id.as_str()).collect();
    let local_nets: BTreeSet<&str> =
        endpoints.iter().filter(|e| local_ids.contains(e.id.as_str())).map(|e| e.network_id.as_str()).collect();
    let remote: BTreeSet<&str> = if me.underlay.is_some() {
        hosts.iter().filter(|h| h.id != me.host).map(|h| h.id.as_str()).collect()
    } else {
        BTreeSet::new()
    };
    // Endpoints by network: a service looks at its own network's only.
    let mut by_net: BTreeMap<&str, Vec<&EndpointRecord>> = BTreeMap::new();
    for e in endpoints {
        by_net.entry(e.network_id.as_str()).or_default().push(e);
    }
    for s in services.iter().filter(|s| s.mode == model::ServiceMode::Vip && local_nets.contains(s.network_id.as_str()))
    {
        let (Some(id), Some(IpAddr::V4(vip)), Some(vni)) =
            (s.datapath_id(), s.vip, vni_of.get(s.network_id.as_str()).copied())
        else {
            continue;
        };
        let mut ips = Vec::new();
        for e in by_net.get(s.network_id.as_str()).into_iter().flatten().filter(|e| s.selects(e)) {
            let reachable = local_ids.contains(e.id.as_str()) || remote.contains(e.host.as_str());
            let (IpAddr::V4(ip), Some(mac)) = (e.ip, model::parse_mac(&e.mac)) else { continue };
            if reachable {
                t.backends.insert(BackendKey { svc_id: id, ip: trellis_ebpf::be(ip) }, BackendInfo { mac, pad: 0 });
                ips.push(ip);
            }
        }
        ips.sort();
        ips.dedup();
        let revision = maglev::digest(&ips);
        for p in &s.ports {
            t.services.insert(
                SvcKey::new(vip, p.port, p.proto.number()),
                SvcInfo { id, target_port: p.target.to_be(), pad: 0, count: ips.len() as u32, revision },
            );
        }
        t.vips.insert(vip, VipInfo { net_id: vni, backends: ips.len() as u32 });
        t.maglev.insert(id, ips);
    }
    t
}

/// The actions that turn `observed` into `desired`, in an order that works:
/// stale ports go first, then bridges are made right, then endpoints, then
/// the rules.
pub fn diff(desired: &DesiredHost, observed: &Observed) -> Vec<Action> {
    let mut acts = Vec::new();
    // Encryption first: an encrypted network's SAs and policies are in
    // before any tunnel entry could send its traffic.
    let xfrm = trellis_ipsec::xfrm::diff(&desired.xfrm, &observed.xfrm);
    let xfrm_action = |op: &trellis_ipsec::XfrmOp| {
        let port = match op {
            trellis_ipsec::XfrmOp::AddSa(sa) => Some(sa.port),
            trellis_ipsec::XfrmOp::AddPolicy(p) | trellis_ipsec::XfrmOp::DelPolicy(p) => Some(p.port),
            trellis_ipsec::XfrmOp::DelSa(_) => None,
        };
        Action::Xfrm { op: op.clone(), vxlan: port.and_then(|p| desired.esp_vxlans.get(&p).cloned()) }
    };
    acts.extend(xfrm.first.iter().map(xfrm_action));
    // Stale links the agent owns: ports and leftovers first, bridges after.
    let mut stale_bridges = Vec::new();
    for name in observed.links.keys().filter(|n| model::owned_link(n)) {
        if name.starts_with(model::BRIDGE_PREFIX) {
            if !desired.bridges.contains_key(name) {
                stale_bridges.push(name.clone());
            }
        } else if !desired.endpoints.contains_key(name)
            && !desired.vxlans.contains_key(name)
            && !desired.endpoints.values().any(|e| e.engine_moves && &e.peer_if == name)
        {
            acts.push(Action::DeleteLink { name: name.clone() });
        }
    }
    acts.extend(stale_bridges.into_iter().map(|name| Action::DeleteLink { name }));

    for (name, b) in &desired.bridges {
        let observed_link = observed.links.get(name);
        match observed_link {
            Some(l) if l.kind == LinkKind::Bridge => {
                if l.mtu != b.mtu || !l.up || l.master.is_some() {
                    acts.push(Action::SetLink { name: name.clone(), mtu: b.mtu, master: None });
                }
                if l.mac.is_some_and(|m| m != b.mac) {
                    acts.push(Action::SetMac { link: name.clone(), mac: b.mac });
                }
                for a in l.addrs.iter().filter(|a| Some(**a) != b.addr) {
                    acts.push(Action::DelAddress { link: name.clone(), addr: *a });
                }
                if let Some(addr) = b.addr
                    && !l.addrs.contains(&addr)
                {
                    acts.push(Action::AddAddress { link: name.clone(), addr });
                }
            }
            other => {
                if other.is_some() {
                    acts.push(Action::DeleteLink { name: name.clone() });
                }
                acts.push(Action::CreateBridge { name: name.clone(), mtu: b.mtu, mac: b.mac });
                acts.push(Action::SetLink { name: name.clone(), mtu: b.mtu, master: None });
                if let Some(addr) = b.addr {
                    acts.push(Action::AddAddress { link: name.clone(), addr });
                }
            }
        }
    }

    for (name, spec) in &desired.endpoints {
        match observed.links.get(name) {
            Some(l) if l.kind == LinkKind::Veth => {
                if l.master.as_deref() != Some(spec.bridge.as_str()) || !l.up || l.mtu != spec.mtu {
                    acts.push(Action::SetLink { name: name.clone(), mtu: spec.mtu, master: Some(spec.bridge.clone()) });
                }
            }
            other => {
                if other.is_some() {
                    acts.push(Action::DeleteLink { name: name.clone() });
                }
                acts.push(Action::CreateEndpoint(Box::new(spec.clone())));
            }
        }
    }

    for (name, v) in &desired.vxlans {
        // A network's device is its bridge's port; the probe device is alone.
        let master = (!v.bridge.is_empty()).then(|| v.bridge.clone());
        let set_link = Action::SetLink { name: name.clone(), mtu: v.spec.mtu, master: master.clone() };
        match observed.links.get(name) {
            Some(l) if l.kind == LinkKind::Vxlan && l.vni == Some(v.spec.vni) => {
                if l.master != master || !l.up || l.mtu != v.spec.mtu {
                    acts.push(set_link);
                }
                for (mac, dst) in l.fdb.difference(&v.fdb) {
                    acts.push(Action::DelFdb { link: name.clone(), mac: *mac, dst: *dst });
                }
                for (ip, mac) in l.neigh.difference(&v.neigh) {
                    acts.push(Action::DelNeigh { link: name.clone(), ip: *ip, mac: *mac });
                }
                for (mac, dst) in v.fdb.difference(&l.fdb) {
                    acts.push(Action::AddFdb { link: name.clone(), mac: *mac, dst: *dst });
                }
                for (ip, mac) in v.neigh.difference(&l.neigh) {
                    acts.push(Action::AddNeigh { link: name.clone(), ip: *ip, mac: *mac });
                }
            }
            other => {
                if other.is_some() {
                    acts.push(Action::DeleteLink { name: name.clone() });
                }
                acts.push(Action::CreateVxlan(Box::new(v.spec.clone())));
                acts.push(set_link);
                acts.extend(v.fdb.iter().map(|(mac, dst)| Action::AddFdb { link: name.clone(), mac: *mac, dst: *dst }));
                acts.extend(v.neigh.iter().map(|(ip, mac)| Action::AddNeigh {
                    link: name.clone(),
                    ip: *ip,
                    mac: *mac,
                }));
            }
        }
    }

    // The endpoint program: on every endpoint veth, again whenever the veth
    // was (re)created in this pass; off interfaces that are no endpoint's.
    let created: BTreeSet<String> = acts
        .iter()
        .filter_map(|a| match a {
            Action::CreateEndpoint(s) => Some(s.host_if.clone()),
            _ => None,
        })
        .collect();
    for (name, p) in &desired.programs {
        let changed = observed.program_flags.get(name).is_some_and(|f| *f != p.flags());
        if !observed.programs.contains(name) || created.contains(name) || changed {
            let spec = &desired.endpoints[name];
            acts.push(Action::AttachProgram { ifname: name.clone(), ip: spec.addr.addr(), mac: spec.mac, program: *p });
        }
    }
    // The tables last: remote backends' tunnel entries and local backends'
    // veths are in place by now.
    let ops = observed.tables.ops_to(&desired.tables);
    if !ops.is_empty() {
        acts.push(Action::UpdateTables(Box::new(ops)));
    }
    for name in observed.programs.iter().filter(|n| !desired.programs.contains_key(*n)) {
        acts.push(Action::DetachProgram { ifname: name.clone() });
    }

    if observed.egress.as_deref() != Some(desired.egress.fingerprint().as_str()) {
        acts.push(Action::ApplyEgress(desired.egress.clone()));
    }
    // Stale policies and SAs last: the tunnel entries that used them are gone.
    acts.extend(xfrm.last.iter().map(xfrm_action));
    acts
}

/// The outcome of one reconcile pass.
#[derive(Clone, Debug, Default)]
pub struct PassReport {
    pub generation: u64,
    pub actions: usize,
    /// Errors, with the endpoint they concern when there is one.
    pub errors: Vec<(Option<String>, String)>,
    /// Endpoints whose network namespace no longer exists.
    pub gone: Vec<String>,
    /// Endpoints being deleted whose devices are gone now: their records
    /// and addresses can go.
    pub finalizable: Vec<EndpointRecord>,
    pub finished: Option<SystemTime>,
    pub duration: Duration,
    /// The pass read the whole kernel state back.
    pub full: bool,
    /// Encrypted networks whose keys this host's kernel now has, with the
    /// epochs (empty when any SA or policy failed).
    pub acks: BTreeMap<String, trellis_ipsec::Ack>,
}

impl PassReport {
    /// The error of an endpoint's creation in this pass, if it failed.
    pub fn endpoint_error(&self, id: &str) -> Option<&str> {
        self.errors.iter().find(|(e, _)| e.as_deref() == Some(id)).map(|(_, m)| m.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("reading the desired state: {0}")]
    Desired(String),
    #[error("observing the kernel: {0}")]
    Observe(#[from] DataplaneError),
}

/// The desired state of the whole cluster at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub networks: Vec<NetworkRecord>,
    pub endpoints: Vec<EndpointRecord>,
    pub hosts: Vec<HostRecord>,
    pub services: Vec<ServiceRecord>,
    /// Encrypted networks' key rings, by network id.
    pub keys: BTreeMap<String, trellis_ipsec::KeyRing>,
}

/// Where the reconciler reads the desired state from.
#[async_trait::async_trait]
pub trait DesiredSource: Send + Sync + 'static {
    async fn load(&self) -> Result<Snapshot, String>;
}

/// Runs passes, one at a time; concurrent callers share a pass that
/// started after they asked.
pub struct Reconciler {
    dp: Arc<dyn Dataplane>,
    source: Arc<dyn DesiredSource>,
    me: Identity,
    running: tokio::sync::Mutex<()>,
    started: AtomicU64,
    last: Mutex<Arc<PassReport>>,
    /// The kernel state as last observed, kept current with every action
    /// applied since: passes between full ones use it instead of reading
    /// the kernel back (a full pass, periodically, catches outside changes).
    seen: Mutex<Option<Observed>>,
    /// The desired state of the last pass (for status and host listings).
    last_desired: Mutex<Arc<DesiredHost>>,
    pub repairs: AtomicU64,
    /// Duration of the last full pass, in microseconds.
    pub last_full_us: AtomicU64,
}

impl Reconciler {
    pub fn new(dp: Arc<dyn Dataplane>, source: Arc<dyn DesiredSource>, me: Identity) -> Reconciler {
        Reconciler {
            dp,
            source,
            me,
            running: tokio::sync::Mutex::new(()),
            started: AtomicU64::new(0),
            last: Mutex::new(Arc::new(PassReport::default())),
            seen: Mutex::new(None),
            last_desired: Mutex::new(Arc::new(DesiredHost::default())),
            repairs: AtomicU64::new(0),
            last_full_us: AtomicU64::new(0),
        }
    }

    /// The report of the last finished pass.
    pub fn last(&self) -> Arc<PassReport> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The desired state the last pass worked towards.
    pub fn last_desired(&self) -> Arc<DesiredHost> {
        self.last_desired.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The kernel state as the reconciler last knew it.
    pub fn seen(&self) -> Observed {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default()
    }

    /// Run a pass that starts after this call (or share one that did).
    /// It reads back the egress rules only if it is the first pass.
    pub async fn pass(&self) -> Result<Arc<PassReport>, ReconcileError> {
        self.run(false).await
    }

    /// A pass that also reads back every rule (the periodic resync).
    pub async fn full_pass(&self) -> Result<Arc<PassReport>, ReconcileError> {
        self.run(true).await
    }

    async fn run(&self, full: bool) -> Result<Arc<PassReport>, ReconcileError> {
        let wanted = self.started.load(Ordering::SeqCst) + 1;
        let _guard = self.running.lock().await;
        let last = self.last();
        if !full && last.generation >= wanted {
            return Ok(last);
        }
        let generation = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let t0 = Instant::now();
        let Snapshot { networks, endpoints, hosts, services, keys } =
            self.source.load().await.map_err(ReconcileError::Desired)?;
        let mut want = desired(&networks, &endpoints, &hosts, &self.me);
        want.tables = tables(&networks, &endpoints, &hosts, &services, &self.me, &want);
        encryption(&networks, &keys, &mut want, &self.me);
        let t_load = t0.elapsed();
        let cached = if full { None } else { self.seen.lock().unwrap_or_else(|p| p.into_inner()).take() };
        let cached_was_none = cached.is_none();
        let mut observed = match cached {
            Some(o) => o,
            None => self.dp.observe(true).await?,
        };
        let t_observe = t0.elapsed();
        let actions = diff(&want, &observed);
        let mut report = PassReport { generation, actions: actions.len(), ..PassReport::default() };
        // A failed endpoint creation must not stop the others, but the
        // remaining steps of a failed bridge are skipped.
        let mut failed_links: Vec<String> = Vec::new();
        let mut xfrm_failed = false;
        let mut trust_cache = true;
        for a in &actions {
            let link = match a {
                Action::SetLink { name, .. }
                | Action::AddAddress { link: name, .. }
                | Action::DelAddress { link: name, .. }
                | Action::AddFdb { link: name, .. }
                | Action::AddNeigh { link: name, .. } => Some(name),
                Action::CreateVxlan(v) => Some(&v.name),
                _ => None,
            };
            if link.is_some_and(|l| failed_links.contains(l)) {
                continue;
            }
            let applied = self.dp.apply(a).await;
            let recorded = match &applied {
                Ok(()) => observed.record(a).is_ok(),
                // A failed endpoint creation cleans up after itself.
                Err(_) => matches!(a, Action::CreateEndpoint(_)),
            };
            trust_cache &= recorded;
            if let Err(e) = applied {
                if let Action::CreateBridge { name, .. } | Action::DeleteLink { name } = a {
                    failed_links.push(name.clone());
                }
                if let Action::CreateVxlan(v) = a {
                    failed_links.push(v.name.clone());
                }
                // Fail closed: an encrypted network whose SAs or policies
                // did not go in gets no new tunnel entries this pass.
                if let Action::Xfrm { vxlan: Some(v), .. } = a {
                    failed_links.push(v.clone());
                    xfrm_failed = true;
                }
                if let Action::Xfrm { vxlan: None, .. } = a {
                    xfrm_failed = true;
                }
                if let (Some(id), DataplaneError::NetnsGone(_)) = (a.endpoint(), &e) {
                    report.gone.push(id.to_string());
                }
                tracing::warn!(action = ?a, error = %e, "reconcile action failed");
                report.errors.push((a.endpoint().map(str::to_string), e.to_string()));
            }
        }
        if !actions.is_empty() {
            tracing::debug!(
                actions = actions.len(),
                errors = report.errors.len(),
                full,
                load_us = t_load.as_micros() as u64,
                observe_us = (t_observe - t_load).as_micros() as u64,
                total_us = t0.elapsed().as_micros() as u64,
                "reconciled"
            );
        }
        if trust_cache {
            *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(observed);
        }
        if !xfrm_failed {
            report.acks = want.acks.clone();
        }
        *self.last_desired.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(want);
        report.finalizable = endpoints
            .iter()
            .filter(|e| e.host == self.me.host && e.deleting)
            .filter(|e| !failed_links.contains(&model::host_ifname(&e.id)))
            .cloned()
            .collect();
        self.repairs.fetch_add(actions.len() as u64, Ordering::Relaxed);
        report.duration = t0.elapsed();
        report.full = cached_was_none;
        if cached_was_none {
            self.last_full_us.store(report.duration.as_micros() as u64, Ordering::Relaxed);
        }
        report.finished = Some(SystemTime::now());
        let report = Arc::new(report);
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = report.clone();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{FakeDataplane, ObservedLink};
    use crate::model::EndpointKind;

    fn network(id: &str, subnet: &str, internal: bool) -> NetworkRecord {
        let subnet: IpNet = subnet.parse().unwrap();
        NetworkRecord {
            id: id.into(),
            name: format!("net-{id}"),
            subnet,
            gateway: subnet.hosts().next(),
            vni: 4096,
            mtu: 1450,
            attachable: true,
            internal,
            encrypted: false,
            labels: Default::default(),
            created_unix: 0,
            vxlan_port: None,
        }
    }

    fn endpoint(id: &str, net: &str, ip: &str, host: &str) -> EndpointRecord {
        EndpointRecord {
            id: id.into(),
            name: id.into(),
            network_id: net.into(),
            network: format!("net-{net}"),
            host: host.into(),
            ip: ip.parse().unwrap(),
            mac: "02:00:00:00:00:01".into(),
            netns: format!("/run/netns/{id}").into(),
            ifname: "eth0".into(),
            labels: Default::default(),
            kind: EndpointKind::Adhoc,
            managed_netns: false,
            container_id: String::new(),
            created_unix: 0,
            deleting: false,
            aliases: vec![],
        }
    }

    #[test]
    fn bridges_keep_a_fixed_mac_derived_from_their_subnet() {
        let me = Identity { vtep_mac: [2, 0, 0, 0, 0, 9], ..Identity::local("h1") };
        let want = desired(&[network("n1", "10.9.0.0/24", false)], &[], &[], &me);
        let b = &want.bridges[&model::bridge_name("n1")];
        assert_eq!(b.mac, [0x02, 0x42, 10, 9, 0, 0]);
        let acts = diff(&want, &Observed::default());
        assert!(acts.contains(&Action::CreateBridge { name: model::bridge_name("n1"), mtu: b.mtu, mac: b.mac }));
        // A bridge whose MAC followed its ports (or was changed by hand) gets it back.
        let mut obs = Observed::default();
        for a in &acts {
            obs.record(a).unwrap();
        }
        assert!(diff(&want, &obs).is_empty());
        obs.links.get_mut(&model::bridge_name("n1")).unwrap().mac = Some([0x0e, 1, 2, 3, 4, 5]);
        assert_eq!(diff(&want, &obs), vec![Action::SetMac { link: model::bridge_name("n1"), mac: b.mac }]);
    }

    #[test]
    fn an_engine_moves_docker_containers_ends_which_are_kept_until_then() {
        let me = Identity { vtep_mac: [2, 0, 0, 0, 0, 9], ..Identity::local("h1") };
        let mut docker = endpoint("d1", "n1", "10.9.0.2", "h1");
        docker.kind = EndpointKind::Docker;
        let adhoc = endpoint("a1", "n1", "10.9.0.3", "h1");
        let want = desired(&[network("n1", "10.9.0.0/24", false)], &[docker.clone(), adhoc], &[], &me);
        let spec = &want.endpoints[&model::host_ifname("d1")];
        assert!(spec.engine_moves, "Docker's endpoints are moved in by the engine");
        assert!(!want.endpoints[&model::host_ifname("a1")].engine_moves);
        // Between Join and the engine's move, the container end sits in the
        // host namespace: it is not a leftover. A stray one is.
        let mut obs = Observed::default();
        for name in [model::peer_ifname("d1"), model::peer_ifname("a1"), model::peer_ifname("x1")] {
            obs.links.insert(name, ObservedLink { kind: LinkKind::Veth, up: true, ..Default::default() });
        }
        let acts = diff(&want, &obs);
        assert!(!acts.contains(&Action::DeleteLink { name: model::peer_ifname("d1") }), "{acts:?}");
        assert!(acts.contains(&Action::DeleteLink { name: model::peer_ifname("a1") }), "{acts:?}");
        assert!(acts.contains(&Action::DeleteLink { name: model::peer_ifname("x1") }), "{acts:?}");
    }

    struct Fixed(Mutex<(Vec<NetworkRecord>, Vec<EndpointRecord>)>);
    #[async_trait::async_trait]
    impl DesiredSource for Fixed {
        async fn load(&self) -> Result<Snapshot, String> {
            let (networks, endpoints) = self.0.lock().unwrap().clone();
            Ok(Snapshot { networks, endpoints, ..Snapshot::default() })
        }
    }

    #[test]
    fn desired_state_of_a_host() {
        let nets = vec![network("aaaa", "10.1.0.0/24", false), network("bbbb", "10.2.0.0/24", true)];
        let eps = vec![
            endpoint("e1", "aaaa", "10.1.0.2", "h1"),
            endpoint("e2", "bbbb", "10.2.0.2", "h1"),
            endpoint("e3", "aaaa", "10.1.0.3", "h2"),
            endpoint("e4", "gone", "10.9.0.3", "h1"),
        ];
        let d = desired(&nets, &eps, &[], &Identity::local("h1"));
        assert_eq!(d.bridges.len(), 2);
        assert_eq!(d.bridges["trb-aaaa"].addr, Some("10.1.0.1/24".parse().unwrap()));
        let names: Vec<_> = d.endpoints.keys().cloned().collect();
        assert_eq!(names, ["trv-e1", "trv-e2"], "only this host's endpoints of existing networks");
        assert_eq!(d.endpoints["trv-e1"].default_via, Some("10.1.0.1".parse().unwrap()));
        assert_eq!(d.endpoints["trv-e2"].default_via, None, "internal networks get no default route");
        assert_eq!(d.endpoints["trv-e2"].addr, "10.2.0.2/24".parse().unwrap());
    }

    fn host(id: &str, underlay: &str) -> HostRecord {
        HostRecord {
            id: id.into(),
            hostname: id.into(),
            underlay: underlay.parse().unwrap(),
            vtep_mac: format!("02:00:00:00:aa:{:02x}", underlay.rsplit('.').next().unwrap().parse::<u8>().unwrap()),
            vxlan_port: 4789,
            capabilities: Default::default(),
            version: "test".into(),
            started_unix: 0,
        }
    }

    #[test]
    fn tunnels_reach_every_remote_endpoint_of_local_networks() {
        let nets = vec![network("aaaa", "10.1.0.0/24", false), network("bbbb", "10.2.0.0/24", false)];
        let mut eps = vec![
            endpoint("l1", "aaaa", "10.1.0.2", "h1"),
            endpoint("r1", "aaaa", "10.1.0.3", "h2"),
            endpoint("r2", "aaaa", "10.1.0.4", "h3"),
            endpoint("dead", "aaaa", "10.1.0.5", "h4"),
            endpoint("other", "bbbb", "10.2.0.2", "h2"),
        ];
        eps[1].mac = "02:00:00:00:00:03".into();
        eps[2].mac = "02:00:00:00:00:04".into();
        let hosts = vec![host("h1", "192.0.2.1"), host("h2", "192.0.2.2"), host("h3", "192.0.2.3")];
        let me = Identity { underlay: Some("192.0.2.1".parse().unwrap()), ..Identity::local("h1") };
        let d = desired(&nets, &eps, &hosts, &me);
        assert_eq!(
            d.vxlans.keys().collect::<Vec<_>>(),
            ["trx-aaaa", "trx-probe"],
            "only networks with local endpoints, and the probe tunnel"
        );
        let probe = &d.vxlans["trx-probe"];
        assert_eq!((probe.spec.vni, probe.bridge.as_str(), probe.spec.port), (model::PROBE_VNI, "", 4789));
        let peers: Vec<_> = probe.fdb.iter().map(|(m, ip)| (model::format_mac(m), ip.to_string())).collect();
        assert_eq!(
            peers,
            [
                ("02:00:00:00:aa:02".to_string(), "192.0.2.2".to_string()),
                ("02:00:00:00:aa:03".into(), "192.0.2.3".into())
            ],
            "one entry per live peer: its VTEP MAC at its underlay address"
        );
        let mac2 = model::parse_mac("02:00:00:00:aa:02").unwrap();
        assert!(probe.neigh.contains(&(IpAddr::V6(model::link_local(&mac2)), mac2)));
        let v = &d.vxlans["trx-aaaa"];
        assert_eq!(v.spec.vni, 4096);
        assert_eq!(v.bridge, "trb-aaaa");
        let fdb: Vec<_> = v.fdb.iter().map(|(m, ip)| (model::format_mac(m), ip.to_string())).collect();
        assert_eq!(
            fdb,
            [
                ("02:00:00:00:00:03".to_string(), "192.0.2.2".to_string()),
                ("02:00:00:00:00:04".into(), "192.0.2.3".into())
            ],
            "one entry per remote endpoint of a live host; the dead host's endpoint has none"
        );
        assert_eq!(v.neigh.len(), 2);
        // Without an underlay there are no tunnels at all.
        assert!(desired(&nets, &eps, &hosts, &Identity::local("h1")).vxlans.is_empty());

        // The diff programs the device, then the entries; a host that dies
        // takes its entries with it.
        let acts = diff(&d, &Observed::default());
        assert!(acts.iter().any(|a| matches!(a, Action::CreateVxlan(s) if s.name == "trx-aaaa")));
        assert_eq!(acts.iter().filter(|a| matches!(a, Action::AddFdb { link, .. } if link == "trx-aaaa")).count(), 2);
        assert!(acts.contains(&Action::SetLink { name: "trx-probe".into(), mtu: 1280, master: None }));
        let mut obs = Observed::default();
        for a in &acts {
            obs.record(a).unwrap();
        }
        assert!(diff(&d, &obs).is_empty(), "{:?}", diff(&d, &obs));
        let fewer = desired(&nets, &eps, &hosts[..2], &me);
        let all = diff(&fewer, &obs);
        let mac3 = model::parse_mac("02:00:00:00:aa:03").unwrap();
        let dst3: IpAddr = "192.0.2.3".parse().unwrap();
        assert!(all.contains(&Action::DelFdb { link: "trx-probe".into(), mac: mac3, dst: dst3 }), "{all:?}");
        let acts: Vec<Action> = all
            .into_iter()
            .filter(|a| matches!(a, Action::DelFdb { link, .. } | Action::DelNeigh { link, .. } if link == "trx-aaaa"))
            .collect();
        assert_eq!(
            acts,
            vec![
                Action::DelFdb {
                    link: "trx-aaaa".into(),
                    mac: model::parse_mac("02:00:00:00:00:04").unwrap(),
                    dst: "192.0.2.3".parse().unwrap()
                },
                Action::DelNeigh {
                    link: "trx-aaaa".into(),
                    ip: "10.1.0.4".parse().unwrap(),
                    mac: model::parse_mac("02:00:00:00:00:04").unwrap()
                },
            ]
        );
    }

    fn service(name: &str, net: &str, vip: &str) -> ServiceRecord {
        ServiceRecord {
            name: name.into(),
            network_id: net.into(),
            network: format!("net-{net}"),
            mode: model::ServiceMode::Vip,
            vip: Some(vip.parse().unwrap()),
            ports: vec![model::ServicePort { port: 80, proto: model::Proto::Tcp, target: 8080 }],
            selector: model::default_selector(name),
            created_unix: 0,
        }
    }

    #[test]
    fn service_tables_hold_reachable_backends_and_change_in_a_safe_order() {
        use trellis_ebpf::{BackendKey, SvcKey, be};
        let nets = vec![network("aaaa", "10.1.0.0/24", false), network("bbbb", "10.2.0.0/24", true)];
        let mut b1 = endpoint("b1", "aaaa", "10.1.0.2", "h1");
        let mut b2 = endpoint("b2", "aaaa", "10.1.0.3", "h2");
        let mut b3 = endpoint("b3", "aaaa", "10.1.0.4", "h3");
        for b in [&mut b1, &mut b2, &mut b3] {
            b.labels.insert(model::SERVICE_LABEL.into(), "web".into());
        }
        let client = endpoint("c1", "aaaa", "10.1.0.9", "h1");
        let eps = vec![b1, b2, b3, client];
        let host = |id: &str, ip: &str| HostRecord {
            id: id.into(),
            hostname: id.into(),
            underlay: ip.parse().unwrap(),
            vtep_mac: "02:00:00:00:00:09".into(),
            vxlan_port: 4789,
            capabilities: Default::default(),
            version: String::new(),
            started_unix: 0,
        };
        // h3 is not live: its backend is not used.
        let hosts = vec![host("h1", "192.0.2.1"), host("h2", "192.0.2.2")];
        let me = Identity { ebpf: true, underlay: Some("192.0.2.1".parse().unwrap()), ..Identity::local("h1") };
        let svcs = vec![service("web", "aaaa", "10.1.0.254")];
        let d = desired(&nets, &eps, &hosts, &me);
        let t = tables(&nets, &eps, &hosts, &svcs, &me, &d);
        assert_eq!(t.nets.len(), 2, "every subnet, for isolation");
        assert_eq!(t.nets[&("10.2.0.0".parse().unwrap(), 24)].flags, trellis_ebpf::EP_INTERNAL);
        let vip: std::net::Ipv4Addr = "10.1.0.254".parse().unwrap();
        let id = u32::from(vip);
        assert_eq!(t.maglev[&id], vec!["10.1.0.2".parse::<std::net::Ipv4Addr>().unwrap(), "10.1.0.3".parse().unwrap()]);
        let svc = t.services[&SvcKey::new(vip, 80, 6)];
        assert_eq!((svc.id, u16::from_be(svc.target_port), svc.count), (id, 8080, 2));
        assert_eq!(t.vips[&vip].backends, 2);
        assert!(!t.backends.contains_key(&BackendKey { svc_id: id, ip: be("10.1.0.4".parse().unwrap()) }));
        // Without eBPF, or without local endpoints on the network, no tables.
        assert_eq!(tables(&nets, &eps, &hosts, &svcs, &Identity { ebpf: false, ..me.clone() }, &d), Tables::default());
        let lonely = Identity { host: "h9".into(), ..me.clone() };
        assert!(
            tables(&nets, &eps, &hosts, &svcs, &lonely, &desired(&nets, &eps, &hosts, &lonely)).services.is_empty()
        );

        // From nothing: one table update, after the tunnel entries.
        let want = DesiredHost { tables: t.clone(), ..d.clone() };
        let acts = diff(&want, &Observed::default());
        let pos_tables = acts.iter().position(|a| matches!(a, Action::UpdateTables(_))).unwrap();
        assert!(acts.iter().rposition(|a| matches!(a, Action::AddFdb { .. })).unwrap() < pos_tables);
        let mut obs = Observed::default();
        for a in &acts {
            obs.record(a).unwrap();
        }
        assert!(diff(&want, &obs).is_empty(), "converged: {:?}", diff(&want, &obs));

        // h3 comes alive: its backend joins, the table is rewritten, the
        // service entry follows.
        let hosts3 = vec![hosts[0].clone(), hosts[1].clone(), host("h3", "192.0.2.3")];
        let d3 = desired(&nets, &eps, &hosts3, &me);
        let t3 = tables(&nets, &eps, &hosts3, &svcs, &me, &d3);
        let ops = obs.tables.ops_to(&t3);
        assert_eq!(ops.put_backends.len(), 1);
        assert_eq!(ops.put_maglev.iter().map(|(id, b)| (*id, b.len())).collect::<Vec<_>>(), vec![(id, 3)]);
        assert_eq!(ops.put_services.len(), 1);
        assert!(ops.del_backends.is_empty());
        obs.tables.apply(&ops);
        // The service goes: entries first, then what they pointed to.
        let gone = tables(&nets, &eps, &hosts3, &[], &me, &d3);
        let ops = obs.tables.ops_to(&gone);
        assert_eq!(
            (ops.del_services.len(), ops.del_vips.len(), ops.del_maglev.len(), ops.del_backends.len()),
            (1, 1, 1, 3)
        );
        assert!(ops.put_maglev.is_empty() && ops.del_nets.is_empty());
    }

    #[test]
    fn the_endpoint_program_follows_the_veths() {
        let nets = vec![network("aaaa", "10.1.0.0/24", false)];
        let eps = vec![endpoint("e1", "aaaa", "10.1.0.2", "h1"), endpoint("e2", "aaaa", "10.1.0.3", "h1")];
        let me = Identity { ebpf: true, ..Identity::local("h1") };
        let d = desired(&nets, &eps, &[], &me);
        assert_eq!(d.programs.keys().collect::<Vec<_>>(), ["trv-e1", "trv-e2"]);
        // DNS redirection: in the program when it runs, in nftables when not.
        let dns = Identity { dns_intercept: true, ..me.clone() };
        let d2 = desired(&nets, &eps, &[], &dns);
        assert_eq!(
            d2.programs["trv-e1"].dns_at,
            Some(("10.1.0.1".parse().unwrap(), model::mac_for_ip("10.1.0.0".parse().unwrap())))
        );
        assert!(!d2.egress.dns_intercept, "no nftables DNAT beside the program");
        assert!(d2.egress.dns_notrack, "DNS to the gateway untracked beside the program");
        let no_ebpf = desired(&nets, &eps, &[], &Identity { ebpf: false, ..dns });
        assert!(no_ebpf.egress.dns_intercept && !no_ebpf.egress.dns_notrack);
        assert!(desired(&nets, &eps, &[], &Identity::local("h1")).programs.is_empty(), "none without eBPF");
        let acts = diff(&d, &Observed::default());
        let attach: Vec<_> = acts
            .iter()
            .filter_map(|a| match a {
                Action::AttachProgram { ifname, ip, program, .. } => {
                    Some((ifname.as_str(), ip.to_string(), program.vni))
                }
                _ => None,
            })
            .collect();
        assert_eq!(attach, [("trv-e1", "10.1.0.2".to_string(), 4096), ("trv-e2", "10.1.0.3".to_string(), 4096)]);
        let pos = |f: &dyn Fn(&Action) -> bool| acts.iter().position(f).unwrap();
        assert!(
            pos(&|a| matches!(a, Action::CreateEndpoint(s) if s.host_if == "trv-e1"))
                < pos(&|a| matches!(a, Action::AttachProgram { ifname, .. } if ifname == "trv-e1")),
            "the veth exists before the program is attached"
        );
        let mut obs = Observed::default();
        for a in &acts {
            obs.record(a).unwrap();
        }
        assert!(diff(&d, &obs).is_empty());
        // A veth recreated by a repair gets the program again; a stale
        // attachment goes.
        obs.links.remove("trv-e1");
        obs.programs.insert("trv-gone".into());
        let acts = diff(&d, &obs);
        assert!(
            acts.iter().any(|a| matches!(a, Action::AttachProgram { ifname, .. } if ifname == "trv-e1")),
            "{acts:?}"
        );
        assert!(acts.contains(&Action::DetachProgram { ifname: "trv-gone".into() }), "{acts:?}");
    }

    #[test]
    fn diff_from_scratch_creates_in_order() {
        let nets = vec![network("aaaa", "10.1.0.0/24", false)];
        let eps = vec![endpoint("e1", "aaaa", "10.1.0.2", "h1")];
        let acts = diff(&desired(&nets, &eps, &[], &Identity::local("h1")), &Observed::default());
        let kinds: Vec<_> = acts
            .iter()
            .map(|a| match a {
                Action::CreateBridge { .. } => "bridge",
                Action::SetLink { .. } => "set",
                Action::AddAddress { .. } => "addr",
                Action::CreateEndpoint(_) => "endpoint",
                Action::ApplyEgress(_) => "egress",
                Action::DeleteLink { .. } => "delete",
                Action::DelAddress { .. } => "deladdr",
                _ => "tunnel",
            })
            .collect();
        assert_eq!(kinds, ["bridge", "set", "addr", "endpoint", "egress"]);
    }

    #[test]
    fn vxlan_devices_no_longer_wanted_are_deleted() {
        let nets = vec![network("aaaa", "10.1.0.0/24", false)];
        let hosts = vec![host("h1", "192.0.2.1"), host("h2", "192.0.2.2")];
        let me = Identity { underlay: Some("192.0.2.1".parse().unwrap()), ..Identity::local("h1") };
        let eps = vec![endpoint("l1", "aaaa", "10.1.0.2", "h1")];
        let mut obs = Observed::default();
        for a in diff(&desired(&nets, &eps, &hosts, &me), &Observed::default()) {
            obs.record(&a).unwrap();
        }
        assert!(obs.links.contains_key("trx-aaaa"));
        // The network's last local endpoint goes: its VXLAN device goes too
        // (the probe device stays), and nothing else is touched.
        let acts = diff(&desired(&nets, &[], &hosts, &me), &obs);
        let deleted: Vec<_> = acts
            .iter()
            .filter_map(|a| match a {
                Action::DeleteLink { name } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(deleted, ["trv-l1", "trx-aaaa"], "{acts:?}");
        // The network goes: its bridge and its VXLAN device.
        let acts = diff(&desired(&[], &[], &hosts, &me), &obs);
        assert!(acts.contains(&Action::DeleteLink { name: "trx-aaaa".into() }), "{acts:?}");
        assert!(acts.contains(&Action::DeleteLink { name: "trb-aaaa".into() }), "{acts:?}");
        assert!(!acts.contains(&Action::DeleteLink { name: model::PROBE_VXLAN.into() }), "{acts:?}");
        // A host without an underlay has no tunnels: the probe device goes.
        let acts = diff(&desired(&nets, &[], &hosts, &Identity::local("h1")), &obs);
        assert!(acts.contains(&Action::DeleteLink { name: model::PROBE_VXLAN.into() }), "{acts:?}");
    }

    #[test]
    fn diff_repairs_and_removes() {
        let nets = vec![network("aaaa", "10.1.0.0/24", false)];
        let eps = vec![endpoint("e1", "aaaa", "10.1.0.2", "h1")];
        let want = desired(&nets, &eps, &[], &Identity::local("h1"));
        let mut obs = Observed { egress: Some(want.egress.fingerprint()), ..Observed::default() };
        obs.links.insert(
            "trb-aaaa".into(),
            ObservedLink {
                kind: LinkKind::Bridge,
                master: None,
                mtu: 1450,
                up: true,
                addrs: vec!["10.1.0.99/24".parse().unwrap()],
                ..Default::default()
            },
        );
        obs.links.insert(
            "trv-e1".into(),
            ObservedLink {
                kind: LinkKind::Veth,
                master: None,
                mtu: 1450,
                up: true,
                addrs: vec![],
                ..Default::default()
            },
        );
        for stale in ["trv-old", "trb-old", "trp-e9"] {
            obs.links.insert(
                stale.into(),
                ObservedLink {
                    kind: LinkKind::Veth,
                    master: None,
                    mtu: 1500,
                    up: true,
                    addrs: vec![],
                    ..Default::default()
                },
            );
        }
        // Someone else's link is never touched.
        obs.links.insert(
            "eth0".into(),
            ObservedLink {
                kind: LinkKind::Other,
                master: None,
                mtu: 1500,
                up: true,
                addrs: vec![],
                ..Default::default()
            },
        );
        let acts = diff(&want, &obs);
        assert_eq!(
            acts,
            vec![
                Action::DeleteLink { name: "trp-e9".into() },
                Action::DeleteLink { name: "trv-old".into() },
                Action::DeleteLink { name: "trb-old".into() },
                Action::DelAddress { link: "trb-aaaa".into(), addr: "10.1.0.99/24".parse().unwrap() },
                Action::AddAddress { link: "trb-aaaa".into(), addr: "10.1.0.1/24".parse().unwrap() },
                Action::SetLink { name: "trv-e1".into(), mtu: 1450, master: Some("trb-aaaa".into()) },
            ]
        );
    }

    fn encrypted_lab() -> (Vec<NetworkRecord>, Vec<EndpointRecord>, Vec<HostRecord>, Identity) {
        let mut n = network("aaaa", "10.1.0.0/24", false);
        n.encrypted = true;
        n.vxlan_port = Some(4790);
        let mut eps = vec![endpoint("l1", "aaaa", "10.1.0.2", "h1"), endpoint("r1", "aaaa", "10.1.0.3", "h2")];
        eps[1].mac = "02:00:00:00:00:03".into();
        let hosts = vec![host("h1", "192.0.2.1"), host("h2", "192.0.2.2")];
        let me = Identity { underlay: Some("192.0.2.1".parse().unwrap()), ..Identity::local("h1") };
        (vec![n], eps, hosts, me)
    }

    #[test]
    fn encrypted_networks_get_their_port_sas_and_policies_before_any_tunnel_entry() {
        let (nets, eps, hosts, me) = encrypted_lab();
        let ring = trellis_ipsec::KeyRing::new(trellis_ipsec::Secret::from_bytes([1; 32]), 0);
        let keys = BTreeMap::from([("aaaa".to_string(), ring)]);
        let mut d = desired(&nets, &eps, &hosts, &me);
        encryption(&nets, &keys, &mut d, &me);
        assert_eq!(d.vxlans["trx-aaaa"].spec.port, 4790, "an encrypted network's VXLAN uses its own port");
        assert_eq!((d.xfrm.sas.len(), d.xfrm.policies.len()), (2, 2), "in (from anywhere) and out to the peer");
        assert_eq!(d.acks["aaaa"], trellis_ipsec::Ack { rx: 1, tx: 1 });
        let acts = diff(&d, &Observed::default());
        let first_tunnel =
            acts.iter().position(|a| matches!(a, Action::CreateVxlan(_) | Action::AddFdb { .. })).unwrap();
        let last_xfrm = acts.iter().rposition(|a| matches!(a, Action::Xfrm { .. })).unwrap();
        assert!(last_xfrm < first_tunnel, "SAs and policies go in first: {acts:?}");
        assert!(acts.iter().all(|a| !matches!(a, Action::Xfrm { vxlan, .. } if vxlan.as_deref() != Some("trx-aaaa"))));

        // The peer leaves: its tunnel entries go before its policies and SAs.
        let mut obs = Observed::default();
        for a in &acts {
            obs.record(a).unwrap();
        }
        let mut gone = desired(&nets, &eps[..1], &hosts, &me);
        encryption(&nets, &keys, &mut gone, &me);
        let acts = diff(&gone, &obs);
        let del_fdb = acts.iter().position(|a| matches!(a, Action::DelFdb { .. })).unwrap();
        let first_xfrm = acts.iter().position(|a| matches!(a, Action::Xfrm { .. })).unwrap();
        assert!(del_fdb < first_xfrm, "{acts:?}");
        // The out policy and both SAs go; the in policy stays while the
        // network's VXLAN device does.
        assert_eq!(acts.iter().filter(|a| matches!(a, Action::Xfrm { .. })).count(), 3, "{acts:?}");

        // No key ring: the policies still go in, so traffic stops rather
        // than leave in the clear.
        let mut bare = desired(&nets, &eps, &hosts, &me);
        encryption(&nets, &BTreeMap::new(), &mut bare, &me);
        assert_eq!((bare.xfrm.sas.len(), bare.xfrm.policies.len()), (0, 2));
        // Plain networks get none of it.
        let mut plain = nets.clone();
        plain[0].encrypted = false;
        plain[0].vxlan_port = None;
        let mut p = desired(&plain, &eps, &hosts, &me);
        encryption(&plain, &keys, &mut p, &me);
        assert!(p.xfrm.sas.is_empty() && p.xfrm.policies.is_empty() && p.acks.is_empty());
        assert_eq!(p.vxlans["trx-aaaa"].spec.port, 4789);
    }

    #[test]
    fn an_encrypted_networks_ipsec_state_goes_after_its_device() {
        let (nets, eps, hosts, me) = encrypted_lab();
        let ring = trellis_ipsec::KeyRing::new(trellis_ipsec::Secret::from_bytes([1; 32]), 0);
        let keys = BTreeMap::from([("aaaa".to_string(), ring)]);
        let mut d = desired(&nets, &eps, &hosts, &me);
        encryption(&nets, &keys, &mut d, &me);
        let mut obs = Observed::default();
        for a in diff(&d, &Observed::default()) {
            obs.record(&a).unwrap();
        }
        assert_eq!((obs.xfrm.sas.len(), obs.xfrm.policies.len()), (2, 2));
        // The network goes: every SA and policy of it goes, after its
        // VXLAN device (no packet of it leaves without its policy).
        let mut gone = desired(&[], &[], &hosts, &me);
        encryption(&[], &keys, &mut gone, &me);
        let acts = diff(&gone, &obs);
        let ops: Vec<_> = acts
            .iter()
            .filter_map(|a| match a {
                Action::Xfrm { op, .. } => Some(op),
                _ => None,
            })
            .collect();
        assert_eq!(ops.iter().filter(|o| matches!(o, trellis_ipsec::XfrmOp::DelPolicy(_))).count(), 2, "{acts:?}");
        assert_eq!(ops.iter().filter(|o| matches!(o, trellis_ipsec::XfrmOp::DelSa(_))).count(), 2, "{acts:?}");
        assert_eq!(ops.len(), 4, "{acts:?}");
        let dev =
            acts.iter().position(|a| *a == Action::DeleteLink { name: "trx-aaaa".into() }).expect("device deleted");
        let first_xfrm = acts.iter().position(|a| matches!(a, Action::Xfrm { .. })).unwrap();
        assert!(dev < first_xfrm, "{acts:?}");
        for a in &acts {
            obs.record(a).unwrap();
        }
        assert!(obs.xfrm.sas.is_empty() && obs.xfrm.policies.is_empty());
    }

    struct WithKeys(Snapshot);
    #[async_trait::async_trait]
    impl DesiredSource for WithKeys {
        async fn load(&self) -> Result<Snapshot, String> {
            Ok(self.0.clone())
        }
    }

    #[tokio::test]
    async fn a_failed_policy_holds_an_encrypted_networks_tunnel_entries_back() {
        let (networks, endpoints, hosts, me) = encrypted_lab();
        let ring = trellis_ipsec::KeyRing::new(trellis_ipsec::Secret::from_bytes([1; 32]), 0);
        let keys = BTreeMap::from([("aaaa".to_string(), ring)]);
        let src = Arc::new(WithKeys(Snapshot { networks, endpoints, hosts, keys, ..Snapshot::default() }));
        let dp = Arc::new(FakeDataplane::default());
        dp.failing_xfrm.store(true, Ordering::Relaxed);
        let r = Reconciler::new(dp.clone(), src, me);
        let report = r.pass().await.unwrap();
        assert!(!report.errors.is_empty());
        assert!(report.acks.is_empty(), "nothing acked while SAs are missing");
        let log = dp.take_log();
        assert!(log.iter().any(|a| matches!(a, Action::CreateEndpoint(_))), "local endpoints still come up");
        let net_tunnel = |a: &Action| match a {
            Action::CreateVxlan(v) => v.name == "trx-aaaa",
            Action::AddFdb { link, .. } | Action::AddNeigh { link, .. } => link == "trx-aaaa",
            _ => false,
        };
        assert!(!log.iter().any(net_tunnel), "no tunnel to a peer without its policy: {log:?}");
        // Once xfrm works the tunnel comes up and the host acks its keys.
        dp.failing_xfrm.store(false, Ordering::Relaxed);
        let report = r.full_pass().await.unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.acks["aaaa"], trellis_ipsec::Ack { rx: 1, tx: 1 });
        assert!(dp.with_state(|s| s.links["trx-aaaa"].fdb.len()) == 1);
    }

    #[tokio::test]
    async fn passes_converge_and_then_do_nothing() {
        let dp = Arc::new(FakeDataplane::default());
        let src = Arc::new(Fixed(Mutex::new((
            vec![network("aaaa", "10.1.0.0/24", false)],
            vec![endpoint("e1", "aaaa", "10.1.0.2", "h1"), endpoint("e2", "aaaa", "10.1.0.3", "h1")],
        ))));
        let r = Reconciler::new(dp.clone(), src.clone(), Identity::local("h1"));
        let first = r.pass().await.unwrap();
        assert!(first.errors.is_empty(), "{:?}", first.errors);
        assert_eq!(first.actions, 6);
        let second = r.pass().await.unwrap();
        assert_eq!(second.actions, 0, "a converged host needs nothing: {:?}", dp.take_log());
        assert!(second.generation > first.generation);

        // A veth deleted by hand: a fast pass trusts its picture of the
        // kernel and does not see it; the full pass repairs it.
        dp.with_state(|s| s.links.remove("trv-e1"));
        assert_eq!(r.pass().await.unwrap().actions, 0);
        // A removed endpoint goes with the same full pass.
        src.0.lock().unwrap().1.retain(|e| e.id != "e2");
        dp.take_log();
        r.full_pass().await.unwrap();
        let log = dp.take_log();
        assert!(log.iter().any(|a| matches!(a, Action::CreateEndpoint(s) if s.endpoint_id == "e1")), "{log:?}");
        assert!(log.contains(&Action::DeleteLink { name: "trv-e2".into() }), "{log:?}");
        assert_eq!(r.pass().await.unwrap().actions, 0);
    }

    #[tokio::test]
    async fn deleting_endpoints_lose_their_devices_then_become_final() {
        let dp = Arc::new(FakeDataplane::default());
        let src = Arc::new(Fixed(Mutex::new((
            vec![network("aaaa", "10.1.0.0/24", false)],
            vec![endpoint("e1", "aaaa", "10.1.0.2", "h1"), endpoint("e2", "aaaa", "10.1.0.3", "h1")],
        ))));
        let r = Reconciler::new(dp.clone(), src.clone(), Identity::local("h1"));
        assert!(r.pass().await.unwrap().finalizable.is_empty());
        src.0.lock().unwrap().1[0].deleting = true;
        let rep = r.pass().await.unwrap();
        assert!(!dp.with_state(|s| s.links.contains_key("trv-e1")), "the device goes first");
        let ids: Vec<_> = rep.finalizable.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["e1"], "then the record may go");
        assert!(dp.with_state(|s| s.links.contains_key("trv-e2")));
    }

    #[tokio::test]
    async fn a_gone_netns_is_reported_and_others_proceed() {
        let dp = Arc::new(FakeDataplane::default());
        dp.failing.lock().unwrap().push("e1".into());
        let src = Arc::new(Fixed(Mutex::new((
            vec![network("aaaa", "10.1.0.0/24", false)],
            vec![endpoint("e1", "aaaa", "10.1.0.2", "h1"), endpoint("e2", "aaaa", "10.1.0.3", "h1")],
        ))));
        let r = Reconciler::new(dp.clone(), src, Identity::local("h1"));
        let rep = r.pass().await.unwrap();
        assert_eq!(rep.gone, ["e1"]);
        assert!(rep.endpoint_error("e1").unwrap().contains("does not exist"));
        assert!(rep.endpoint_error("e2").is_none());
        assert!(dp.with_state(|s| s.links.contains_key("trv-e2")));
    }

    /// A source whose first load waits until the test lets it go, and
    /// that counts its loads (one per pass).
    struct Gated {
        inner: Fixed,
        loads: AtomicU64,
        gate: tokio::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    }
    #[async_trait::async_trait]
    impl DesiredSource for Gated {
        async fn load(&self) -> Result<Snapshot, String> {
            self.loads.fetch_add(1, Ordering::SeqCst);
            let gate = self.gate.lock().await.take();
            if let Some(gate) = gate {
                gate.await.map_err(|e| e.to_string())?;
            }
            self.inner.load().await
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_passes() {
        let dp = Arc::new(FakeDataplane::default());
        let (open, gate) = tokio::sync::oneshot::channel();
        let src = Arc::new(Gated {
            inner: Fixed(Mutex::new((vec![network("aaaa", "10.1.0.0/24", false)], vec![]))),
            loads: AtomicU64::new(0),
            gate: tokio::sync::Mutex::new(Some(gate)),
        });
        let r = Arc::new(Reconciler::new(dp, src.clone(), Identity::local("h1")));
        // The first caller's pass starts, and is held in its load.
        let first = {
            let r = r.clone();
            tokio::spawn(async move { r.pass().await.unwrap().generation })
        };
        while src.loads.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // Nineteen callers ask while it runs: it started before they asked,
        // so it cannot answer them; one more pass answers them all.
        let mut tasks = Vec::new();
        for _ in 0..19 {
            let r = r.clone();
            tasks.push(tokio::spawn(async move { r.pass().await.unwrap().generation }));
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        open.send(()).unwrap();
        assert_eq!(first.await.unwrap(), 1);
        let mut gens = Vec::new();
        for t in tasks {
            gens.push(t.await.unwrap());
        }
        assert_eq!(gens, [2; 19], "every later caller gets the one pass that started after it asked");
        assert_eq!(r.last().generation, 2, "20 callers, 2 passes");
        assert_eq!(src.loads.load(Ordering::SeqCst), 2, "one load of the desired state per pass");
    }
}
