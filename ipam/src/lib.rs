//! Trellis address management over the cluster store.
//!
//! * Every network's subnet and VNI live in one index record, changed only
//!   by compare-and-swap, so two networks never overlap and never share a
//!   VNI, whichever host creates them.
//! * Every allocated address is its own key (`addrs/<net>/<ip>`), created
//!   only if absent: the store itself makes a duplicate address impossible.
//! * A host claims blocks of a subnet (Calico-style, default /26) by CAS and
//!   picks free addresses inside them from a local cache, so an allocation
//!   costs one transaction; that transaction also checks the block is still
//!   the host's (fencing) and carries the caller's own records, so an
//!   endpoint and its address appear or fail together.
//!
//! * Both families work the same way. An IPv6 subnet (a network's second
//!   subnet, beside its IPv4 one) is cut into /122 blocks — 64 addresses,
//!   as an IPv4 /26 — so a host claims one block per 64 endpoints whatever
//!   the subnet's size (a /64 has 2^58 of them: claiming is by CAS on the
//!   block's key, so their number costs nothing). Without a subnet asked
//!   for, IPv6 subnets are /64s of one ULA /48 chosen at random once per
//!   cluster and kept in the store ([`Ipam::ula_pool`]).
//!
//! [`pure`] holds the arithmetic, unit-tested without a store.

pub mod pure;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use trellis_store::{Compare, KeyValue, Op, Revision, Store, StoreError};

/// The first VNI handed out (as Docker's overlay does).
pub const FIRST_VNI: u32 = 4096;
/// The largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// Default per-host block length for IPv4 subnets.
pub const DEFAULT_BLOCK_V4: u8 = 26;
/// Default per-host block length for IPv6 subnets.
pub const DEFAULT_BLOCK_V6: u8 = 122;
/// How often an allocation retries after losing a race before giving up.
const MAX_ATTEMPTS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no free address left in {subnet} of network {network}")]
    Exhausted { network: String, subnet: IpNet },
    #[error(
        "the address pool {pool} has no free /{prefix_len} left (every candidate is in use or overlaps a host route)"
    )]
    PoolExhausted { pool: IpNet, prefix_len: u8 },
    #[error("subnet {subnet} overlaps {other} of network {network}")]
    Overlap { subnet: IpNet, other: IpNet, network: String },
    #[error("subnet {subnet} overlaps the host route {route}")]
    OverlapsHostRoute { subnet: IpNet, route: IpNet },
    #[error("address {ip} is not inside subnet {subnet}")]
    OutOfSubnet { ip: IpAddr, subnet: IpNet },
    #[error("address {ip} is already in use (by {owner})")]
    InUse { ip: IpAddr, owner: String },
    #[error("address {0} was not reserved (or its reservation was released)")]
    NotReserved(IpAddr),
    #[error("address {ip} is reserved ({why}) in {subnet}")]
    Reserved { ip: IpAddr, subnet: IpNet, why: &'static str },
    #[error("{subnet} is not an {want} subnet")]
    WrongFamily { subnet: IpNet, want: &'static str },
    #[error("subnet {0} is too small for containers (at least /30 for IPv4, /120 for IPv6)")]
    TooSmall(IpNet),
    #[error("no VNI left (all of {FIRST_VNI}..={MAX_VNI} are in use)")]
    VniExhausted,
    #[error("network {0} already has an address allocation record")]
    NetworkExists(String),
    /// The caller's own comparisons failed; nothing was written.
    #[error("the caller's records changed concurrently")]
    CallerConflict,
    #[error("gave up after {0} attempts lost to concurrent allocations; try again")]
    Contention(usize),
    #[error("corrupt IPAM record {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type Result<T, E = IpamError> = std::result::Result<T, E>;

/// A network's entry in the subnet index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetAllocation {
    pub subnet: IpNet,
    pub vni: u32,
    /// A dual-stack network's IPv6 subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<IpNet>,
}

impl NetAllocation {
    fn subnets(&self) -> impl Iterator<Item = &IpNet> {
        std::iter::once(&self.subnet).chain(&self.subnet6)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubnetIndex {
    pub nets: BTreeMap<String, NetAllocation>,
}

/// Who owns a block of a subnet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    pub host: String,
}

/// Who holds an address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddrRecord {
    /// An endpoint id, `gateway`, `service:NAME` (a VIP) or `mesh:HOST` (a
    /// host's mesh address).
    pub owner: String,
    /// The host that allocated it.
    pub host: String,
}

/// How a network's subnet is chosen.
#[derive(Clone, Debug)]
pub enum SubnetRequest {
    /// Exactly this subnet (must overlap no network and no host route).
    Specific(IpNet),
    /// The first free `prefix_len` of `pool` that overlaps no network and
    /// nothing in `avoid` (the host's routes).
    FromPool { pool: IpNet, prefix_len: u8 },
}

/// What a network's creation must write, as plain values: the caller adds
/// its own records and submits one transaction.
#[derive(Clone, Debug)]
pub struct NetworkPlan {
    pub subnet: IpNet,
    pub gateway: Option<IpAddr>,
    /// The IPv6 subnet and gateway of a dual-stack network.
    pub subnet6: Option<IpNet>,
    pub gateway6: Option<IpAddr>,
    pub vni: u32,
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

/// A network as IPAM needs to know it.
#[derive(Clone, Debug)]
pub struct Pool {
    pub net_id: String,
    pub subnet: IpNet,
    pub gateway: Option<IpAddr>,
}

/// Which address an endpoint asks for.
#[derive(Clone, Copy, Debug)]
pub enum AddrRequest {
    Any,
    Specific(IpAddr),
    /// An address this host reserved earlier (owner [`RESERVED`]), taken
    /// over in the same transaction that writes the caller's records.
    Claim(IpAddr),
    /// The highest free address: for cluster-wide addresses (service VIPs),
    /// kept away from the hosts' blocks, which fill from the bottom.
    Top,
}

/// The owner of an address reserved ahead of its endpoint (an engine's
/// IPAM asks for the address before it creates the endpoint).
pub const RESERVED: &str = "reserved";

/// Owners starting with this hold a cluster-wide address (a service's
/// VIP): it is not the creating host's and is not reclaimed with it.
pub const SERVICE_OWNER_PREFIX: &str = "service:";

#[derive(Default)]
struct OwnedBlock {
    rev: Revision,
    used: BTreeSet<IpAddr>,
    /// No free address was found the last time: skip until one is released.
    full: bool,
}

#[derive(Default)]
struct NetCache {
    /// Blocks this host owns, with the addresses known to be taken in them
    /// (including ones being committed right now).
    blocks: BTreeMap<IpNet, OwnedBlock>,
    loaded: bool,
}

/// IPAM of one host.
pub struct Ipam {
    store: Arc<dyn Store>,
    root: String,
    host: String,
    block_v4: u8,
    block_v6: u8,
    cache: Mutex<HashMap<String, NetCache>>,
    grow_lock: tokio::sync::Mutex<()>,
    /// Per network, where the next [`AddrRequest::Top`] allocation starts
    /// looking (just below the last one): creating many services does not
    /// list every address each time.
    top_cursor: Mutex<HashMap<String, IpAddr>>,
}

fn decode<T: for<'de> Deserialize<'de>>(kv: &KeyValue) -> Result<T> {
    serde_json::from_slice(&kv.value).map_err(|e| IpamError::Corrupt { key: kv.key.clone(), reason: e.to_string() })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("IPAM records serialize")
}

fn block_name(b: &IpNet) -> String {
    format!("{}-{}", b.network(), b.prefix_len())
}

fn parse_block_name(s: &str) -> Option<IpNet> {
    let (ip, len) = s.rsplit_once('-')?;
    IpNet::new(ip.parse().ok()?, len.parse().ok()?).ok()
}

/// Checks a subnet a user asks for.
pub fn validate_subnet(subnet: &IpNet) -> Result<()> {
    let smallest = if subnet.network().is_ipv4() { 30 } else { 120 };
    if subnet.prefix_len() > smallest {
        return Err(IpamError::TooSmall(*subnet));
    }
    Ok(())
}

/// One address family of a network being created: its subnet and, if
/// given, its gateway.
#[derive(Clone, Debug)]
pub struct FamilyRequest {
    pub subnet: SubnetRequest,
    pub gateway: Option<IpAddr>,
}

impl SubnetRequest {
    fn is_ipv4(&self) -> bool {
        match self {
            SubnetRequest::Specific(s) => s.network().is_ipv4(),
            SubnetRequest::FromPool { pool, .. } => pool.network().is_ipv4(),
        }
    }
}

/// The store key of the cluster's ULA pool, under the IPAM root.
const ULA_KEY: &str = "ula48";

impl Ipam {
    /// IPAM for `host`, keeping its records under `root` (ends with `/`).
    pub fn new(store: Arc<dyn Store>, root: impl Into<String>, host: impl Into<String>) -> Ipam {
        Ipam {
            store,
            root: root.into(),
            host: host.into(),
            block_v4: DEFAULT_BLOCK_V4,
            block_v6: DEFAULT_BLOCK_V6,
            cache: Mutex::new(HashMap::new()),
            top_cursor: Mutex::new(HashMap::new()),
            grow_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Use blocks of this length for IPv4 subnets.
    pub fn with_block_len_v4(mut self, len: u8) -> Ipam {
        self.block_v4 = len.clamp(8, 32);
        self
    }

    /// Use blocks of this length for IPv6 subnets.
    pub fn with_block_len_v6(mut self, len: u8) -> Ipam {
        self.block_v6 = len.clamp(64, 128);
        self
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, NetCache>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn index_key(&self) -> String {
        format!("{}subnets", self.root)
    }
    pub fn addr_key(&self, net_id: &str, ip: IpAddr) -> String {
        format!("{}addrs/{net_id}/{ip}", self.root)
    }
    fn addrs_prefix(&self, net_id: &str) -> String {
        format!("{}addrs/{net_id}/", self.root)
    }
    fn block_key(&self, net_id: &str, b: &IpNet) -> String {
        format!("{}blocks/{net_id}/{}", self.root, block_name(b))
    }
    fn blocks_prefix(&self, net_id: &str) -> String {
        format!("{}blocks/{net_id}/", self.root)
    }

    fn block_len(&self, subnet: &IpNet) -> u8 {
        let configured = if subnet.network().is_ipv4() { self.block_v4 } else { self.block_v6 };
        pure::block_len(subnet, configured)
    }

    /// The subnet index and its revision (0 when absent).
    pub async fn index(&self) -> Result<(SubnetIndex, Revision)> {
        match self.store.get(&self.index_key()).await? {
            Some(kv) => Ok((decode(&kv)?, kv.mod_revision)),
            None => Ok((SubnetIndex::default(), 0)),
        }
    }

    /// Plan the address side of a network's creation: choose (or check) its
    /// subnet and gateway, pick a VNI, and reserve the gateway address.
    /// `avoid` are the host's routes a chosen subnet must not overlap.
    /// The subnet may be of either family (an IPv6 one: an IPv6-only
    /// network, whose plan's `subnet` is that one).
    pub async fn plan_network(
        &self,
        net_id: &str,
        request: &SubnetRequest,
        gateway: Option<IpAddr>,
        avoid: &[IpNet],
    ) -> Result<NetworkPlan> {
        let one = FamilyRequest { subnet: request.clone(), gateway };
        self.plan(net_id, &one, request.is_ipv4(), None, avoid).await
    }

    /// [`Ipam::plan_network`] for an IPv4 subnet and, with `v6`, an IPv6
    /// one: both checked against every network's subnets, both gateways
    /// reserved, one index update.
    pub async fn plan_dual_network(
        &self,
        net_id: &str,
        v4: &FamilyRequest,
        v6: Option<&FamilyRequest>,
        avoid: &[IpNet],
    ) -> Result<NetworkPlan> {
        self.plan(net_id, v4, true, v6, avoid).await
    }

    /// A network's plan: its first subnet (`first`, IPv4 if `first_v4`)
    /// and, on a dual-stack network, its IPv6 one.
    async fn plan(
        &self,
        net_id: &str,
        first: &FamilyRequest,
        first_v4: bool,
        v6: Option<&FamilyRequest>,
        avoid: &[IpNet],
    ) -> Result<NetworkPlan> {
        let (mut index, rev) = self.index().await?;
        if index.nets.contains_key(net_id) {
            return Err(IpamError::NetworkExists(net_id.to_string()));
        }
        let (subnet, gateway) = Self::choose(&index, &first.subnet, first.gateway, avoid, first_v4)?;
        let (subnet6, gateway6) = match v6 {
            Some(r) => {
                let (s, gw) = Self::choose(&index, &r.subnet, r.gateway, avoid, false)?;
                (Some(s), gw)
            }
            None => (None, None),
        };
        let used: BTreeSet<u32> = index.nets.values().map(|a| a.vni).collect();
        let vni = (FIRST_VNI..=MAX_VNI).find(|v| !used.contains(v)).ok_or(IpamError::VniExhausted)?;
        index.nets.insert(net_id.to_string(), NetAllocation { subnet, vni, subnet6 });
        let index_cmp =
            if rev == 0 { Compare::Absent(self.index_key()) } else { Compare::ModRevision(self.index_key(), rev) };
        let mut compares = vec![index_cmp];
        let mut ops = vec![Op::put(self.index_key(), encode(&index))];
        for gw in gateway.into_iter().chain(gateway6) {
            let k = self.addr_key(net_id, gw);
            compares.push(Compare::Absent(k.clone()));
            ops.push(Op::put(k, encode(&AddrRecord { owner: "gateway".into(), host: self.host.clone() })));
        }
        Ok(NetworkPlan { subnet, gateway, subnet6, gateway6, vni, compares, ops })
    }

    /// One family's subnet (checked against every network's, of either
    /// family, and the host's routes) and gateway.
    fn choose(
        index: &SubnetIndex,
        request: &SubnetRequest,
        gateway: Option<IpAddr>,
        avoid: &[IpNet],
        ipv4: bool,
    ) -> Result<(IpNet, Option<IpAddr>)> {
        let want = if ipv4 { "IPv4" } else { "IPv6" };
        if request.is_ipv4() != ipv4 {
            let subnet = match request {
                SubnetRequest::Specific(s) => *s,
                SubnetRequest::FromPool { pool, .. } => *pool,
            };
            return Err(IpamError::WrongFamily { subnet, want });
        }
        let taken: Vec<IpNet> = index.nets.values().flat_map(|a| a.subnets().copied()).collect();
        let subnet = match request {
            SubnetRequest::Specific(s) => {
                let s = s.trunc();
                validate_subnet(&s)?;
                let clash = index.nets.iter().find_map(|(net, a)| {
                    a.subnets().find(|other| pure::overlaps(other, &s)).map(|other| (net.clone(), *other))
                });
                if let Some((network, other)) = clash {
                    return Err(IpamError::Overlap { subnet: s, other, network });
                }
                if let Some(route) = avoid.iter().find(|r| pure::overlaps(r, &s)) {
                    return Err(IpamError::OverlapsHostRoute { subnet: s, route: *route });
                }
                s
            }
            SubnetRequest::FromPool { pool, prefix_len } => pure::choose_subnet(pool, *prefix_len, &taken, avoid)
                .ok_or(IpamError::PoolExhausted { pool: *pool, prefix_len: *prefix_len })?,
        };
        let gateway = match gateway {
            Some(gw) => {
                if !subnet.contains(&gw) {
                    return Err(IpamError::OutOfSubnet { ip: gw, subnet });
                }
                if gw == subnet.network() || (gw.is_ipv4() && gw == subnet.broadcast()) {
                    return Err(IpamError::Reserved { ip: gw, subnet, why: "network or broadcast address" });
                }
                Some(gw)
            }
            None => pure::default_gateway(&subnet),
        };
        Ok((subnet, gateway))
    }

    /// The cluster's ULA /48 (RFC 4193: `fd` and a random 40-bit global
    /// id), chosen by the first host that needs it and kept in the store:
    /// every default IPv6 subnet is a /64 of it.
    pub async fn ula_pool(&self) -> Result<IpNet> {
        let key = format!("{}{ULA_KEY}", self.root);
        let parse = |kv: &KeyValue| -> Result<IpNet> {
            std::str::from_utf8(&kv.value)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| IpamError::Corrupt { key: kv.key.clone(), reason: "not an IPv6 prefix".into() })
        };
        if let Some(kv) = self.store.get(&key).await? {
            return parse(&kv);
        }
        let id: [u8; 5] = rand::random();
        let pool = pure::ula_48(id);
        let put =
            self.store.txn(vec![Compare::Absent(key.clone())], vec![Op::put(key.clone(), pool.to_string())]).await?;
        if put.succeeded {
            tracing::info!(%pool, "chose the cluster's IPv6 pool");
            return Ok(pool);
        }
        // Another host chose first.
        let kv = self.store.get(&key).await?.ok_or_else(|| IpamError::Corrupt {
            key: key.clone(),
            reason: "written by another host and gone again".into(),
        })?;
        parse(&kv)
    }

    /// Plan the removal of everything IPAM holds for a network: its index
    /// entry, blocks and addresses.
    pub async fn plan_network_release(&self, net_id: &str) -> Result<(Vec<Compare>, Vec<Op>)> {
        let (mut index, rev) = self.index().await?;
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        if index.nets.remove(net_id).is_some() {
            compares.push(Compare::ModRevision(self.index_key(), rev));
            ops.push(Op::put(self.index_key(), encode(&index)));
        }
        for prefix in [self.blocks_prefix(net_id), self.addrs_prefix(net_id)] {
            let (items, _) = self.store.list(&prefix).await?;
            ops.extend(items.into_iter().map(|kv| Op::delete(kv.key)));
        }
        Ok((compares, ops))
    }

    /// Plan the release of everything `host` holds in a network: its blocks
    /// and the addresses it allocated anywhere, each compared at the
    /// revision read (a block or an address that changed hands meanwhile
    /// stops the plan: it is made again). For reclaiming a dead host's
    /// share.
    pub async fn plan_host_release(&self, net_id: &str, host: &str) -> Result<(Vec<Compare>, Vec<Op>)> {
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        for (b, rec, rev) in self.blocks(net_id).await? {
            if rec.host == host {
                let key = self.block_key(net_id, &b);
                compares.push(Compare::ModRevision(key.clone(), rev));
                ops.push(Op::delete(key));
            }
        }
        let (items, _) = self.store.list(&self.addrs_prefix(net_id)).await?;
        for kv in items {
            let rec: AddrRecord = decode(&kv)?;
            if rec.host == host && rec.owner != "gateway" && !rec.owner.starts_with(SERVICE_OWNER_PREFIX) {
                // Each at the revision read: an address released and taken
                // by another host since is not deleted under its new owner.
                compares.push(Compare::ModRevision(kv.key.clone(), kv.mod_revision));
                ops.push(Op::delete(kv.key));
            }
        }
        Ok((compares, ops))
    }

    /// Forget what this host cached about a network (after it is removed).
    pub fn forget_network(&self, net_id: &str) {
        self.cache().remove(net_id);
    }

    /// Every allocated address of a network, with its record.
    pub async fn addresses(&self, net_id: &str) -> Result<Vec<(IpAddr, AddrRecord)>> {
        let prefix = self.addrs_prefix(net_id);
        let (items, _) = self.store.list(&prefix).await?;
        let mut out = Vec::with_capacity(items.len());
        for kv in items {
            let ip = kv.key[prefix.len()..].parse().map_err(|_| IpamError::Corrupt {
                key: kv.key.clone(),
                reason: "key does not end in an IP address".into(),
            })?;
            out.push((ip, decode(&kv)?));
        }
        Ok(out)
    }

    /// The blocks of a network and their owners.
    pub async fn blocks(&self, net_id: &str) -> Result<Vec<(IpNet, BlockRecord, Revision)>> {
        let prefix = self.blocks_prefix(net_id);
        let (items, _) = self.store.list(&prefix).await?;
        let mut out = Vec::with_capacity(items.len());
        for kv in items {
            let b = parse_block_name(&kv.key[prefix.len()..]).ok_or_else(|| IpamError::Corrupt {
                key: kv.key.clone(),
                reason: "key does not end in a block".into(),
            })?;
            out.push((b, decode(&kv)?, kv.mod_revision));
        }
        Ok(out)
    }

    /// Allocate an address for `owner` and, in the same transaction, apply
    /// the caller's records built by `extra` from the chosen address.
    pub async fn allocate<F>(&self, pool: &Pool, request: AddrRequest, owner: &str, extra: F) -> Result<IpAddr>
    where
        F: Fn(IpAddr) -> (Vec<Compare>, Vec<Op>),
    {
        match request {
            AddrRequest::Specific(ip) => self.allocate_specific(pool, ip, owner, &extra).await,
            AddrRequest::Claim(ip) => self.claim(pool, ip, owner, &extra).await,
            AddrRequest::Any => self.allocate_any(pool, owner, &extra).await,
            AddrRequest::Top => self.allocate_top(pool, owner, &extra).await,
        }
    }

    async fn allocate_top<F>(&self, pool: &Pool, owner: &str, extra: &F) -> Result<IpAddr>
    where
        F: Fn(IpAddr) -> (Vec<Compare>, Vec<Op>),
    {
        let reserved = pure::reserved(&pool.subnet, pool.gateway);
        let mut taken_in_a_row = 0;
        let cursor = |ipam: &Ipam| ipam.top_cursor.lock().unwrap_or_else(|p| p.into_inner()).get(&pool.net_id).copied();
        for _ in 0..MAX_ATTEMPTS {
            // From the cursor down while candidates are free; from a fresh
            // listing when there is no cursor or it ran out.
            let ip = match cursor(self).filter(|ip| pool.subnet.contains(ip) && !reserved.contains(ip)) {
                Some(ip) => ip,
                None => {
                    let used: BTreeSet<IpAddr> =
                        self.addresses(&pool.net_id).await?.into_iter().map(|(ip, _)| ip).collect();
                    pure::last_free(&pool.subnet, &used, &reserved)
                        .ok_or_else(|| IpamError::Exhausted { network: pool.net_id.clone(), subnet: pool.subnet })?
                }
            };
            let below = pure::prev(&pool.subnet, ip);
            {
                let mut c = self.top_cursor.lock().unwrap_or_else(|p| p.into_inner());
                match below {
                    Some(b) => c.insert(pool.net_id.clone(), b),
                    None => c.remove(&pool.net_id),
                };
            }
            match self.allocate_specific(pool, ip, owner, extra).await {
                Err(IpamError::InUse { .. }) | Err(IpamError::Reserved { .. }) => {
                    // Taken by someone else: go on below (the cursor moved
                    // already; concurrent callers never try the same one),
                    // and after a run of taken ones list everything again.
                    taken_in_a_row += 1;
                    if taken_in_a_row % 8 == 0 {
                        self.top_cursor.lock().unwrap_or_else(|p| p.into_inner()).remove(&pool.net_id);
                    }
                }
                other => return other,
            }
        }
        Err(IpamError::Contention(MAX_ATTEMPTS))
    }

    fn record(&self, owner: &str) -> Vec<u8> {
        encode(&AddrRecord { owner: owner.to_string(), host: self.host.clone() })
    }

    async fn allocate_specific<F>(&self, pool: &Pool, ip: IpAddr, owner: &str, extra: &F) -> Result<IpAddr>
    where
        F: Fn(IpAddr) -> (Vec<Compare>, Vec<Op>),
    {
        if !pool.subnet.contains(&ip) {
            return Err(IpamError::OutOfSubnet { ip, subnet: pool.subnet });
        }
        if pure::reserved(&pool.subnet, None).contains(&ip) {
            return Err(IpamError::Reserved { ip, subnet: pool.subnet, why: "network or broadcast address" });
        }
        let key = self.addr_key(&pool.net_id, ip);
        let (mut compares, mut ops) = extra(ip);
        compares.push(Compare::Absent(key.clone()));
        ops.push(Op::put(key.clone(), self.record(owner)));
        if self.store.txn(compares, ops).await?.succeeded {
            self.note_used(pool, ip);
            return Ok(ip);
        }
        match self.store.get(&key).await? {
            Some(kv) => Err(IpamError::InUse { ip, owner: decode::<AddrRecord>(&kv)?.owner }),
            None => Err(IpamError::CallerConflict),
        }
    }

    async fn claim<F>(&self, pool: &Pool, ip: IpAddr, owner: &str, extra: &F) -> Result<IpAddr>
    where
        F: Fn(IpAddr) -> (Vec<Compare>, Vec<Op>),
    {
        let key = self.addr_key(&pool.net_id, ip);
        let (mut compares, mut ops) = extra(ip);
        compares.push(Compare::Value(key.clone(), self.record(RESERVED)));
        ops.push(Op::put(key.clone(), self.record(owner)));
        if self.store.txn(compares, ops).await?.succeeded {
            return Ok(ip);
        }
        match self.store.get(&key).await? {
            Some(kv) => {
                let rec = decode::<AddrRecord>(&kv)?;
                if rec.owner == RESERVED && rec.host == self.host {
                    Err(IpamError::CallerConflict)
                } else {
                    Err(IpamError::InUse { ip, owner: rec.owner })
                }
            }
            None => Err(IpamError::NotReserved(ip)),
        }
    }

    /// Choose a free address of `pool` for `owner` without writing it:
    /// the comparisons and operations that take it, for the caller's own
    /// transaction (a second family's address taken in the transaction
    /// that allocates the first: one commit for both). The address is
    /// marked taken in this host's cache until [`Ipam::unpick`] (the
    /// transaction failed) or for good (it committed). A block claimed on
    /// the way is claimed in a transaction of its own, as by
    /// [`Ipam::allocate`].
    pub async fn pick_for_txn(&self, pool: &Pool, owner: &str) -> Result<(IpAddr, Vec<Compare>, Vec<Op>)> {
        for _ in 0..MAX_ATTEMPTS {
            let (ip, block) = match self.pick_cached(pool) {
                Some((ip, b, rev)) => (ip, Some((b, rev))),
                None => match self.grow(pool).await? {
                    Grown::Block => continue,
                    Grown::Borrow(ip) => (ip, None),
                },
            };
            let key = self.addr_key(&pool.net_id, ip);
            let mut compares = vec![Compare::Absent(key.clone())];
            // Fencing, as for an allocation: the block is still ours.
            compares.extend(block.map(|(b, rev)| Compare::ModRevision(self.block_key(&pool.net_id, &b), rev)));
            return Ok((ip, compares, vec![Op::put(key, self.record(owner))]));
        }
        Err(IpamError::Contention(MAX_ATTEMPTS))
    }

    /// The highest free address of `pool` for `owner`, without writing
    /// it: the comparison and operation that take it, for the caller's own
    /// transaction (a service's IPv6 VIP, taken in the transaction that
    /// allocates its IPv4 one). Another taking it first fails that
    /// transaction; the caller chooses again.
    pub async fn pick_top_for_txn(&self, pool: &Pool, owner: &str) -> Result<(IpAddr, Vec<Compare>, Vec<Op>)> {
        let reserved = pure::reserved(&pool.subnet, pool.gateway);
        let used: BTreeSet<IpAddr> = self.addresses(&pool.net_id).await?.into_iter().map(|(ip, _)| ip).collect();
        let ip = pure::last_free(&pool.subnet, &used, &reserved)
            .ok_or_else(|| IpamError::Exhausted { network: pool.net_id.clone(), subnet: pool.subnet })?;
        let key = self.addr_key(&pool.net_id, ip);
        Ok((ip, vec![Compare::Absent(key.clone())], vec![Op::put(key, self.record(owner))]))
    }

    /// The comparisons and operations that hand this host's reservation
    /// of `ip` (owner [`RESERVED`]) over to `owner`, for the caller's own
    /// transaction: what [`AddrRequest::Claim`] does, for a second family's
    /// address. The transaction fails if the reservation is not this
    /// host's (any more); [`Ipam::claim_failure`] then says why.
    pub fn claim_for_txn(&self, pool: &Pool, ip: IpAddr, owner: &str) -> (Vec<Compare>, Vec<Op>) {
        let key = self.addr_key(&pool.net_id, ip);
        (vec![Compare::Value(key.clone(), self.record(RESERVED))], vec![Op::put(key, self.record(owner))])
    }

    /// Why a claim of `ip` would fail now: `None` while it is still this
    /// host's reservation.
    pub async fn claim_failure(&self, pool: &Pool, ip: IpAddr) -> Result<Option<IpamError>> {
        let Some(kv) = self.store.get(&self.addr_key(&pool.net_id, ip)).await? else {
            return Ok(Some(IpamError::NotReserved(ip)));
        };
        let rec = decode::<AddrRecord>(&kv)?;
        Ok((rec.owner != RESERVED || rec.host != self.host).then_some(IpamError::InUse { ip, owner: rec.owner }))
    }

    /// An address [`Ipam::pick_for_txn`] chose whose transaction did not
    /// commit: free in the cache again.
    pub fn unpick(&self, pool: &Pool, ip: IpAddr) {
        self.unmark(pool, ip);
    }

    /// Release an address only if it is still this host's reservation
    /// (an endpoint that claimed it releases it itself). True if released.
    pub async fn release_reservation(&self, pool: &Pool, ip: IpAddr) -> Result<bool> {
        let key = self.addr_key(&pool.net_id, ip);
        let done =
            self.store.txn(vec![Compare::Value(key.clone(), self.record(RESERVED))], vec![Op::delete(key)]).await?;
        if done.succeeded {
            self.released(pool, ip);
        }
        Ok(done.succeeded)
    }

    fn note_used(&self, pool: &Pool, ip: IpAddr) {
        let b = pure::block_of(&pool.subnet, self.block_len(&pool.subnet), ip);
        if let Some(block) = self.cache().get_mut(&pool.net_id).and_then(|c| c.blocks.get_mut(&b)) {
            block.used.insert(ip);
        }
    }

    /// Pick a free address from a block this host owns and mark it taken
    /// (in flight until its transaction settles).
    fn pick_cached(&self, pool: &Pool) -> Option<(IpAddr, IpNet, Revision)> {
        let reserved = pure::reserved(&pool.subnet, pool.gateway);
        let mut cache = self.cache();
        let net = cache.get_mut(&pool.net_id)?;
        if !net.loaded {
            return None;
        }
        for (b, block) in net.blocks.iter_mut().filter(|(b, _)| pool.subnet.contains(*b)) {
            if block.full {
                continue;
            }
            match pure::first_free(b, &block.used, &reserved) {
                Some(ip) => {
                    block.used.insert(ip);
                    return Some((ip, *b, block.rev));
                }
                None => block.full = true,
            }
        }
        None
    }

    fn has_free(&self, pool: &Pool) -> bool {
        let reserved = pure::reserved(&pool.subnet, pool.gateway);
        let cache = self.cache();
        cache.get(&pool.net_id).is_some_and(|net| {
            net.loaded
                && net.blocks.iter().any(|(b, blk)| {
                    pool.subnet.contains(b) && !blk.full && pure::first_free(b, &blk.used, &reserved).is_some()
                })
        })
    }

    /// Load this host's blocks and their used addresses from the store,
    /// keeping addresses that are in flight.
    async fn refresh(&self, pool: &Pool) -> Result<(Vec<(IpNet, BlockRecord, Revision)>, BTreeSet<IpAddr>)> {
        let blocks = self.blocks(&pool.net_id).await?;
        let used: BTreeSet<IpAddr> = self.addresses(&pool.net_id).await?.into_iter().map(|(ip, _)| ip).collect();
        let mut cache = self.cache();
        let net = cache.entry(pool.net_id.clone()).or_default();
        let mut fresh = BTreeMap::new();
        for (b, _, rev) in blocks.iter().filter(|(_, r, _)| r.host == self.host) {
            let mut in_block: BTreeSet<IpAddr> = used.iter().filter(|ip| b.contains(*ip)).copied().collect();
            if let Some(old) = net.blocks.get(b).filter(|old| old.rev == *rev) {
                in_block.extend(old.used.iter().copied());
            }
            fresh.insert(*b, OwnedBlock { rev: *rev, used: in_block, full: false });
        }
        net.blocks = fresh;
        net.loaded = true;
        Ok((blocks, used))
    }

    /// The used addresses of one block, read key by key (a block is small).
    async fn block_usage(&self, pool: &Pool, b: &IpNet) -> Result<BTreeSet<IpAddr>> {
        let mut used = BTreeSet::new();
        for o in 0..pure::size(b) {
            let ip = pure::nth(b, o);
            if self.store.get(&self.addr_key(&pool.net_id, ip)).await?.is_some() {
                used.insert(ip);
            }
        }
        Ok(used)
    }

    async fn allocate_any<F>(&self, pool: &Pool, owner: &str, extra: &F) -> Result<IpAddr>
    where
        F: Fn(IpAddr) -> (Vec<Compare>, Vec<Op>),
    {
        for _ in 0..MAX_ATTEMPTS {
            let (ip, block) = match self.pick_cached(pool) {
                Some((ip, b, rev)) => (ip, Some((b, rev))),
                None => match self.grow(pool).await? {
                    Grown::Block => continue,
                    Grown::Borrow(ip) => (ip, None),
                },
            };
            let block_cmp = block.map(|(b, rev)| Compare::ModRevision(self.block_key(&pool.net_id, &b), rev));
            let key = self.addr_key(&pool.net_id, ip);
            let (mut compares, mut ops) = extra(ip);
            compares.push(Compare::Absent(key.clone()));
            compares.extend(block_cmp.clone());
            ops.push(Op::put(key.clone(), self.record(owner)));
            match self.store.txn(compares, ops).await {
                Ok(o) if o.succeeded => return Ok(ip),
                Ok(_) => {}
                Err(e) => {
                    self.unmark(pool, ip);
                    return Err(e.into());
                }
            }
            // Lost a race: find out whether it was ours or the caller's.
            let taken = self.store.get(&key).await?.is_some();
            let block_moved = match (&block_cmp, block) {
                (Some(Compare::ModRevision(k, rev)), Some((b, _))) => {
                    let moved = self.store.get(k).await?.map(|kv| kv.mod_revision) != Some(*rev);
                    if moved {
                        // Fencing: the block is no longer ours as we knew it.
                        if let Some(net) = self.cache().get_mut(&pool.net_id) {
                            net.blocks.remove(&b);
                        }
                    }
                    moved
                }
                _ => false,
            };
            if !taken {
                self.unmark(pool, ip);
            }
            if !taken && !block_moved {
                return Err(IpamError::CallerConflict);
            }
        }
        Err(IpamError::Contention(MAX_ATTEMPTS))
    }

    fn unmark(&self, pool: &Pool, ip: IpAddr) {
        let b = pure::block_of(&pool.subnet, self.block_len(&pool.subnet), ip);
        if let Some(block) = self.cache().get_mut(&pool.net_id).and_then(|c| c.blocks.get_mut(&b)) {
            block.used.remove(&ip);
            block.full = false;
        }
    }

    /// Make room when no owned block has a free address: claim an unclaimed
    /// block, or borrow a free address from another host's block. One task
    /// per host grows a network at a time; the others wait and pick again.
    async fn grow(&self, pool: &Pool) -> Result<Grown> {
        let _one = self.grow_lock.lock().await;
        let loaded = self.cache().get(&pool.net_id).is_some_and(|n| n.loaded);
        if !loaded {
            self.refresh(pool).await?;
        }
        if self.has_free(pool) {
            return Ok(Grown::Block);
        }
        let len = self.block_len(&pool.subnet);
        let blocks = self.blocks(&pool.net_id).await?;
        let claimed: BTreeSet<IpNet> = blocks.iter().map(|(b, ..)| *b).collect();
        let reserved = pure::reserved(&pool.subnet, pool.gateway);
        let candidates = pool.subnet.subnets(len).expect("block length is valid for the subnet");
        for b in candidates.filter(|b| !claimed.contains(b)) {
            let key = self.block_key(&pool.net_id, &b);
            let rec = encode(&BlockRecord { host: self.host.clone() });
            let out = self.store.txn(vec![Compare::Absent(key.clone())], vec![Op::put(key, rec)]).await?;
            if !out.succeeded {
                continue;
            }
            tracing::debug!(network = %pool.net_id, block = %b, "claimed block");
            let used = self.block_usage(pool, &b).await?;
            let free = pure::first_free(&b, &used, &reserved).is_some();
            if let Some(net) = self.cache().get_mut(&pool.net_id) {
                net.blocks.insert(b, OwnedBlock { rev: out.revision, used, full: false });
            }
            if free {
                return Ok(Grown::Block);
            }
        }
        // Every block is claimed: borrow any free address.
        let (all, used) = self.refresh(pool).await?;
        if self.has_free(pool) {
            return Ok(Grown::Block);
        }
        for (b, ..) in all.iter().filter(|(b, ..)| pool.subnet.contains(b)) {
            if let Some(ip) = pure::first_free(b, &used, &reserved) {
                return Ok(Grown::Borrow(ip));
            }
        }
        Err(IpamError::Exhausted { network: pool.net_id.clone(), subnet: pool.subnet })
    }

    /// The operation that releases an address (to be put in the caller's
    /// transaction), then call [`Ipam::released`] once it committed.
    pub fn release_op(&self, net_id: &str, ip: IpAddr) -> Op {
        Op::delete(self.addr_key(net_id, ip))
    }

    /// Tell the cache an address was released.
    pub fn released(&self, pool: &Pool, ip: IpAddr) {
        self.unmark(pool, ip);
    }

    /// Release an address on its own.
    pub async fn release(&self, pool: &Pool, ip: IpAddr) -> Result<()> {
        self.store.txn(vec![], vec![self.release_op(&pool.net_id, ip)]).await?;
        self.released(pool, ip);
        Ok(())
    }
}

enum Grown {
    /// The cache now has (or may have) free addresses: pick again.
    Block,
    /// No block can be claimed: try this address of another host's block.
    Borrow(IpAddr),
}
