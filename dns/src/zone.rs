//! The names Trellis answers for, as a value built from the cluster's
//! records, and the rules that answer a query from it. No I/O: the server
//! (and, later, the kernel fast path) only look things up here.
//!
//! Names, per network (every one also qualified as `NAME.NETWORK`):
//! * an endpoint's name and aliases → its address;
//! * a service (endpoints labelled `trellis.service=NAME`) → every backend
//!   (`dnsrr`), and `tasks.NAME` → every backend;
//! * `in-addr.arpa` of an endpoint's address → `NAME.NETWORK.`.
//!
//! A client (by source address) sees the names of every network its
//! container is attached to, and nothing else: another network's names are
//! NXDOMAIN for it. Single-label names, names under a Trellis network and
//! reverse names of Trellis subnets are never forwarded upstream.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// A network as DNS needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    pub id: String,
    pub name: String,
    pub subnet: IpNet,
    /// A dual-stack network's IPv6 subnet.
    pub subnet6: Option<IpNet>,
}

/// An endpoint as DNS needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// What it is kept under: an endpoint added with the id of one the
    /// zone has replaces it ([`Zone::add`], [`Zone::remove`]).
    pub id: String,
    pub name: String,
    pub aliases: Vec<String>,
    pub network_id: String,
    pub ip: IpAddr,
    /// Its IPv6 address on a dual-stack network.
    pub ip6: Option<Ipv6Addr>,
    /// What ties a container's endpoints together (its namespace path).
    pub sandbox: String,
    /// The service it is a task of, if any.
    pub service: Option<String>,
}

/// A service record: in `vip` mode its name resolves to the VIP, in
/// `dnsrr` mode to every backend; `tasks.NAME` is every backend either way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub network_id: String,
    pub vip: Option<Ipv4Addr>,
    pub backends: Vec<Ipv4Addr>,
    /// On a dual-stack network: its IPv6 VIP, and its backends' IPv6
    /// addresses.
    pub vip6: Option<Ipv6Addr>,
    pub backends6: Vec<Ipv6Addr>,
}

/// The record types the zone distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QType {
    A,
    Aaaa,
    Ptr,
    /// ANY: answered like A.
    Any,
    Other,
}

/// What to answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Authoritative addresses (A).
    Addrs(Vec<Ipv4Addr>),
    /// Authoritative IPv6 addresses (AAAA) of dual-stack endpoints.
    Addrs6(Vec<Ipv6Addr>),
    /// Authoritative names (PTR), fully qualified.
    Names(Vec<String>),
    /// The name exists, not with this type.
    NoData,
    /// The name does not exist (for this client).
    NxDomain,
    /// Not a Trellis name: ask upstream.
    Forward,
}

/// Keys with how many endpoints give each (so that removing one of two
/// endpoints giving the same address keeps it): a sorted vector, as most
/// names have one address and most sandboxes one network.
#[derive(Clone, Debug)]
struct Counted<K>(Vec<(K, u32)>);

impl<K> Default for Counted<K> {
    fn default() -> Self {
        Counted(Vec::new())
    }
}

impl<K: Ord + Clone> Counted<K> {
    fn add(&mut self, k: &K) {
        match self.0.binary_search_by(|(x, _)| x.cmp(k)) {
            Ok(i) => self.0[i].1 += 1,
            Err(i) => self.0.insert(i, (k.clone(), 1)),
        }
    }

    /// One fewer of `k`; true when none of any key is left.
    fn take(&mut self, k: &K) -> bool {
        if let Ok(i) = self.0.binary_search_by(|(x, _)| x.cmp(k)) {
            if self.0[i].1 > 1 {
                self.0[i].1 -= 1;
            } else {
                self.0.remove(i);
            }
        }
        self.0.is_empty()
    }

    fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.iter().map(|(k, _)| k)
    }
}

/// One fewer of `k` under `key` of `m`, the entry gone with its last.
fn take_from<Q: std::hash::Hash + Eq, K: Ord + Clone>(m: &mut HashMap<Q, Counted<K>>, key: Q, k: &K) {
    if let Some(c) = m.get_mut(&key)
        && c.take(k)
    {
        m.remove(&key);
    }
}

#[derive(Default, Clone, Debug)]
struct NetNames {
    /// Endpoint names and aliases → addresses.
    hosts: HashMap<String, Counted<Ipv4Addr>>,
    /// Services of endpoints' labels → their tasks.
    services: HashMap<String, Counted<Ipv4Addr>>,
    /// Service records → their backends (over the labels' of the name).
    records: HashMap<String, BTreeSet<Ipv4Addr>>,
    /// `vip` services → their VIP.
    vips: HashMap<String, Ipv4Addr>,
    /// The IPv6 ones of `records` and `vips` (dual-stack networks).
    records6: HashMap<String, BTreeSet<Ipv6Addr>>,
    vips6: HashMap<String, Ipv6Addr>,
    /// The IPv6 addresses of `hosts` and `services` (dual-stack endpoints).
    hosts6: HashMap<String, Counted<Ipv6Addr>>,
    services6: HashMap<String, Counted<Ipv6Addr>>,
}

/// The scoped names of a cluster at one moment.
#[derive(Default, Clone, Debug)]
pub struct Zone {
    nets: HashMap<String, Network>,
    by_name: HashMap<String, String>,
    names: HashMap<String, NetNames>,
    /// The ids of the endpoints put in ([`Zone::put`]).
    ids: HashSet<String>,
    /// Endpoints an attach added ([`Zone::add`]) before the agent's view
    /// of the store had them, by id: what the view's record replaces.
    provisional: HashMap<String, Endpoint>,
    /// Address → (network id, endpoint name, sandbox), once per endpoint
    /// (or VIP) with that address.
    by_ip: HashMap<IpAddr, Vec<(String, String, String)>>,
    /// Sandbox → the networks it is attached to (with how many of its
    /// endpoints are on each).
    sandboxes: HashMap<String, Counted<String>>,
}

fn norm(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Zone {
    pub fn build(networks: &[Network], endpoints: &[Endpoint]) -> Zone {
        Zone::build_with_services(networks, endpoints, &[])
    }

    /// The zone with service records too (they take precedence over the
    /// implicit services of endpoints' `trellis.service` labels).
    pub fn build_with_services(networks: &[Network], endpoints: &[Endpoint], services: &[Service]) -> Zone {
        let mut z = Zone::default();
        for n in networks {
            z.add_network(n);
        }
        for e in endpoints {
            z.put(e);
        }
        for s in services {
            let Some(names) = z.names.get_mut(&s.network_id) else { continue };
            names.records.insert(norm(&s.name), s.backends.iter().copied().collect());
            names.records6.insert(norm(&s.name), s.backends6.iter().copied().collect());
            if let Some(vip) = s.vip {
                names.vips.insert(norm(&s.name), vip);
                z.by_ip.entry(IpAddr::V4(vip)).or_default().push((s.network_id.clone(), s.name.clone(), String::new()));
            }
            if let (Some(vip6), true) = (s.vip6, s.vip.is_some()) {
                names.vips6.insert(norm(&s.name), vip6);
                z.by_ip.entry(IpAddr::V6(vip6)).or_default().push((
                    s.network_id.clone(),
                    s.name.clone(),
                    String::new(),
                ));
            }
        }
        z
    }

    fn add_network(&mut self, n: &Network) {
        self.by_name.insert(norm(&n.name), n.id.clone());
        self.nets.insert(n.id.clone(), n.clone());
        self.names.insert(n.id.clone(), NetNames::default());
    }

    /// Add one endpoint (and its network, if new) ahead of the store: how
    /// an attach makes its endpoint resolvable, and able to resolve,
    /// before it returns. Nothing if the zone has its id already; the
    /// record [`Zone::put`] later with its id replaces it.
    pub fn add(&mut self, network: &Network, e: &Endpoint) {
        if !self.nets.contains_key(&network.id) {
            self.add_network(network);
        }
        if self.ids.contains(&e.id) || self.provisional.get(&e.id) == Some(e) || !self.names.contains_key(&e.network_id)
        {
            return;
        }
        if let Some(old) = self.provisional.remove(&e.id) {
            self.entries_out(&old);
        }
        self.entries_in(e);
        self.provisional.insert(e.id.clone(), e.clone());
    }

    /// Put `e` in, as the store has it (its network must be in the zone,
    /// or it is left out): it replaces what an attach added under its id;
    /// an endpoint put already is left as it is (replace one with
    /// [`Zone::remove`], then `put`).
    pub fn put(&mut self, e: &Endpoint) {
        if !self.names.contains_key(&e.network_id) {
            return;
        }
        if let Some(old) = self.provisional.remove(&e.id) {
            self.entries_out(&old);
        } else if self.ids.contains(&e.id) {
            return;
        }
        self.entries_in(e);
        self.ids.insert(e.id.clone());
    }

    /// Take out `e`, as it was put (or what an attach added under its
    /// id); nothing if the zone does not have it.
    pub fn remove(&mut self, e: &Endpoint) {
        if let Some(old) = self.provisional.remove(&e.id) {
            self.entries_out(&old);
        } else if self.ids.remove(&e.id) {
            self.entries_out(e);
        }
    }

    fn entries_in(&mut self, e: &Endpoint) {
        let Some(names) = self.names.get_mut(&e.network_id) else { return };
        self.by_ip.entry(e.ip).or_default().push((e.network_id.clone(), e.name.clone(), e.sandbox.clone()));
        self.sandboxes.entry(e.sandbox.clone()).or_default().add(&e.network_id);
        if let IpAddr::V4(v4) = e.ip {
            for n in std::iter::once(&e.name).chain(&e.aliases) {
                names.hosts.entry(norm(n)).or_default().add(&v4);
            }
            if let Some(s) = &e.service {
                names.services.entry(norm(s)).or_default().add(&v4);
            }
        }
        if let Some(v6) = e.ip6 {
            for n in std::iter::once(&e.name).chain(&e.aliases) {
                names.hosts6.entry(norm(n)).or_default().add(&v6);
            }
            if let Some(s) = &e.service {
                names.services6.entry(norm(s)).or_default().add(&v6);
            }
            // (Once for an IPv6-only endpoint, whose `ip` it is.)
            let dup = e.ip == IpAddr::V6(v6);
            if !dup {
                self.by_ip.entry(IpAddr::V6(v6)).or_default().push((
                    e.network_id.clone(),
                    e.name.clone(),
                    e.sandbox.clone(),
                ));
            }
        }
    }

    fn entries_out(&mut self, e: &Endpoint) {
        for ip in std::iter::once(e.ip).chain(e.ip6.map(IpAddr::V6).filter(|a| *a != e.ip)) {
            if let Some(at_ip) = self.by_ip.get_mut(&ip) {
                if let Some(i) =
                    at_ip.iter().position(|(n, name, sb)| *n == e.network_id && *name == e.name && *sb == e.sandbox)
                {
                    at_ip.remove(i);
                }
                if at_ip.is_empty() {
                    self.by_ip.remove(&ip);
                }
            }
        }
        take_from(&mut self.sandboxes, e.sandbox.clone(), &e.network_id);
        if let (Some(names), Some(v6)) = (self.names.get_mut(&e.network_id), e.ip6) {
            for n in std::iter::once(&e.name).chain(&e.aliases) {
                take_from(&mut names.hosts6, norm(n), &v6);
            }
            if let Some(s) = &e.service {
                take_from(&mut names.services6, norm(s), &v6);
            }
        }
        let (Some(names), IpAddr::V4(v4)) = (self.names.get_mut(&e.network_id), e.ip) else { return };
        for n in std::iter::once(&e.name).chain(&e.aliases) {
            take_from(&mut names.hosts, norm(n), &v4);
        }
        if let Some(s) = &e.service {
            take_from(&mut names.services, norm(s), &v4);
        }
    }

    /// How many endpoints the zone has.
    pub fn endpoints(&self) -> usize {
        self.ids.len() + self.provisional.len()
    }

    /// The networks a client at `src` sees: those of every endpoint of
    /// its container (none for a client that is not an endpoint).
    pub fn scope(&self, src: IpAddr) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (net, _, sandbox) in self.by_ip.get(&src).into_iter().flatten() {
            // The address must be the client's on that network (the same
            // address can exist in two networks' subnets).
            if self
                .nets
                .get(net)
                .is_some_and(|n| n.subnet.contains(&src) || n.subnet6.is_some_and(|s| s.contains(&src)))
            {
                out.extend(self.sandboxes.get(sandbox).into_iter().flat_map(Counted::keys).cloned());
            }
        }
        out
    }

    /// Is `name` one the zone is authoritative for (never forwarded)?
    fn network_of_suffix(&self, labels: &[&str]) -> Option<String> {
        labels.last().and_then(|l| self.by_name.get(*l)).cloned()
    }

    fn lookup_in(&self, net: &str, name: &str, tasks: bool) -> Option<Vec<Ipv4Addr>> {
        let names = self.names.get(net)?;
        let tasks_of = |name: &str| {
            names
                .records
                .get(name)
                .map(|s| s.iter().copied().collect())
                .or_else(|| names.services.get(name).map(|s| s.keys().copied().collect()))
        };
        if tasks {
            return tasks_of(name);
        }
        if let Some(h) = names.hosts.get(name) {
            return Some(h.keys().copied().collect());
        }
        if let Some(vip) = names.vips.get(name) {
            return Some(vec![*vip]);
        }
        tasks_of(name)
    }

    /// A name of IPv6 addresses only (an IPv6-only network's endpoints and
    /// their services' tasks): one [`Zone::lookup_in`] does not know.
    fn known6(&self, net: &str, name: &str, tasks: bool) -> bool {
        let Some(names) = self.names.get(net) else { return false };
        names.services6.contains_key(name) || (!tasks && names.hosts6.contains_key(name))
    }

    /// The IPv6 addresses of a name [`Zone::lookup_in`] knows, by the same
    /// precedence: an endpoint's, a service's IPv6 VIP, a service record's
    /// backends, a label's tasks.
    fn lookup6_in(&self, net: &str, name: &str, tasks: bool) -> Vec<Ipv6Addr> {
        let Some(names) = self.names.get(net) else { return Vec::new() };
        let tasks_of = || match names.records6.get(name) {
            Some(r) => r.iter().copied().collect(),
            None => names.services6.get(name).map(|s| s.keys().copied().collect()).unwrap_or_default(),
        };
        if tasks {
            return tasks_of();
        }
        if let Some(h) = names.hosts6.get(name) {
            return h.keys().copied().collect();
        }
        if names.hosts.contains_key(name) {
            return Vec::new();
        }
        if names.vips.contains_key(name) {
            return names.vips6.get(name).map(|v| vec![*v]).unwrap_or_default();
        }
        tasks_of()
    }

    /// The names a client attached to one network only gets exactly one
    /// address for, per query type (A, and AAAA on its own): per network
    /// id, the single-label name and the name qualified by the network's
    /// name. What the in-kernel fast path may answer; every other query
    /// goes to the server.
    pub fn single_answers(&self) -> Vec<(String, String, QType, IpAddr)> {
        let mut out = Vec::new();
        for (net, names) in &self.names {
            let candidates: BTreeSet<&String> = names
                .hosts
                .keys()
                .chain(names.vips.keys())
                .chain(names.services.keys())
                .chain(names.records.keys())
                .collect();
            for name in candidates.into_iter().chain(names.hosts6.keys()).chain(names.services6.keys()) {
                for (form, qtype, ip) in self.single_answer_forms(net, name) {
                    if let Some(ip) = ip {
                        out.push((net.clone(), form, qtype, ip));
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// What [`Zone::single_answers`] has for one name of network `net`:
    /// the name itself and qualified by the network's name (normalized),
    /// for A and for AAAA, each with its one address, or `None` where it
    /// has none (how a change to the name is followed without going
    /// through them all).
    pub fn single_answer_forms(&self, net: &str, name: &str) -> Vec<(String, QType, Option<IpAddr>)> {
        let name = norm(name);
        let Some(n) = self.nets.get(net) else { return Vec::new() };
        if name.contains('.') || name.is_empty() {
            return Vec::new();
        }
        let scope = BTreeSet::from([net.to_string()]);
        let qualified = format!("{name}.{}", norm(&n.name));
        let one = |qname: &str, qtype: QType| -> Option<IpAddr> {
            match self.resolve(qname, qtype, &scope) {
                Answer::Addrs(a) if a.len() == 1 => Some(IpAddr::V4(a[0])),
                Answer::Addrs6(a) if a.len() == 1 => Some(IpAddr::V6(a[0])),
                _ => None,
            }
        };
        let mut out = Vec::with_capacity(4);
        for qtype in [QType::A, QType::Aaaa] {
            let bare = one(&name, qtype);
            let full = bare.filter(|ip| one(&qualified, qtype) == Some(*ip));
            out.push((name.clone(), qtype, bare));
            out.push((qualified.clone(), qtype, full));
        }
        out
    }

    fn answer_addrs(found: Vec<Ipv4Addr>, found6: Vec<Ipv6Addr>, qtype: QType) -> Answer {
        match qtype {
            QType::A | QType::Any if !found.is_empty() => Answer::Addrs(found),
            QType::Aaaa if !found6.is_empty() => Answer::Addrs6(found6),
            _ => Answer::NoData,
        }
    }

    /// Answer `qname`/`qtype` for a client that sees `scope`.
    pub fn resolve(&self, qname: &str, qtype: QType, scope: &BTreeSet<String>) -> Answer {
        let name = norm(qname);
        if name.is_empty() {
            return Answer::Forward;
        }
        if let Some(rev) = name.strip_suffix(".in-addr.arpa") {
            return self.reverse(rev, qtype, scope);
        }
        if let Some(rev) = name.strip_suffix(".ip6.arpa") {
            return self.reverse6(rev, qtype, scope);
        }
        let labels: Vec<&str> = name.split('.').collect();
        let (tasks, rest) = match labels.as_slice() {
            ["tasks", rest @ ..] if !rest.is_empty() => (true, rest),
            all => (false, all),
        };
        match rest {
            [single] => {
                let mut found: BTreeSet<Ipv4Addr> = BTreeSet::new();
                let mut found6: BTreeSet<Ipv6Addr> = BTreeSet::new();
                let mut any = false;
                for net in scope {
                    let v4 = self.lookup_in(net, single, tasks);
                    if v4.is_some() || self.known6(net, single, tasks) {
                        any = true;
                        found.extend(v4.unwrap_or_default());
                        found6.extend(self.lookup6_in(net, single, tasks));
                    }
                }
                if any {
                    Self::answer_addrs(found.into_iter().collect(), found6.into_iter().collect(), qtype)
                } else {
                    Answer::NxDomain
                }
            }
            [host, netname] if self.by_name.contains_key(*netname) => {
                let net = &self.by_name[*netname];
                if !scope.contains(net) {
                    return Answer::NxDomain;
                }
                match self.lookup_in(net, host, tasks) {
                    Some(a) => Self::answer_addrs(a, self.lookup6_in(net, host, tasks), qtype),
                    None if self.known6(net, host, tasks) => {
                        Self::answer_addrs(Vec::new(), self.lookup6_in(net, host, tasks), qtype)
                    }
                    None => Answer::NxDomain,
                }
            }
            _ if self.network_of_suffix(rest).is_some() => Answer::NxDomain,
            _ => Answer::Forward,
        }
    }

    fn reverse(&self, rev: &str, qtype: QType, scope: &BTreeSet<String>) -> Answer {
        let octets: Vec<u8> = rev.split('.').filter_map(|o| o.parse().ok()).collect();
        if octets.len() != 4 || rev.split('.').count() != 4 {
            return Answer::Forward;
        }
        let ip = IpAddr::V4(Ipv4Addr::new(octets[3], octets[2], octets[1], octets[0]));
        self.reverse_of(ip, qtype, scope)
    }

    /// `ip6.arpa`: 32 nibbles, the least significant first.
    fn reverse6(&self, rev: &str, qtype: QType, scope: &BTreeSet<String>) -> Answer {
        let nibbles: Vec<u8> =
            rev.split('.').filter(|n| n.len() == 1).filter_map(|n| u8::from_str_radix(n, 16).ok()).collect();
        if nibbles.len() != 32 || rev.split('.').count() != 32 {
            return Answer::Forward;
        }
        let mut o = [0u8; 16];
        for (i, pair) in nibbles.chunks(2).rev().enumerate() {
            o[i] = (pair[1] << 4) | pair[0];
        }
        self.reverse_of(IpAddr::V6(Ipv6Addr::from(o)), qtype, scope)
    }

    fn reverse_of(&self, ip: IpAddr, qtype: QType, scope: &BTreeSet<String>) -> Answer {
        if !self.nets.values().any(|n| n.subnet.contains(&ip) || n.subnet6.is_some_and(|s| s.contains(&ip))) {
            return Answer::Forward;
        }
        let names: Vec<String> = self
            .by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .filter(|(net, _, _)| scope.contains(net))
            .filter_map(|(net, name, _)| self.nets.get(net).map(|n| format!("{}.{}.", norm(name), norm(&n.name))))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        match (names.is_empty(), qtype) {
            (true, _) => Answer::NxDomain,
            (false, QType::Ptr) | (false, QType::Any) => Answer::Names(names),
            (false, _) => Answer::NoData,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(id: &str, name: &str, subnet: &str) -> Network {
        Network { id: id.into(), name: name.into(), subnet: subnet.parse().unwrap(), subnet6: None }
    }

    fn ep(name: &str, net: &str, ip: &str, sandbox: &str, service: Option<&str>, aliases: &[&str]) -> Endpoint {
        Endpoint {
            id: format!("{net}/{name}"),
            name: name.into(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            network_id: net.into(),
            ip: ip.parse().unwrap(),
            ip6: None,
            sandbox: sandbox.into(),
            service: service.map(str::to_string),
        }
    }

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn zone() -> Zone {
        Zone::build(
            &[net("n1", "app", "10.1.0.0/24"), net("n2", "db", "10.2.0.0/24")],
            &[
                ep("web1", "n1", "10.1.0.2", "/c/web1", Some("web"), &["www"]),
                ep("web2", "n1", "10.1.0.3", "/c/web2", Some("web"), &[]),
                ep("client", "n1", "10.1.0.4", "/c/client", None, &[]),
                ep("pg", "n2", "10.2.0.2", "/c/pg", None, &[]),
                // A container on both networks.
                ep("api", "n1", "10.1.0.5", "/c/api", None, &[]),
                ep("api", "n2", "10.2.0.5", "/c/api", None, &[]),
            ],
        )
    }

    fn scope_of(z: &Zone, ip: &str) -> BTreeSet<String> {
        z.scope(ip.parse().unwrap())
    }

    #[test]
    fn single_answers_are_what_a_one_network_client_resolves_to_one_address() {
        let z = zone();
        let all = z.single_answers();
        let names: Vec<(&str, &str)> = all
            .iter()
            .filter(|(_, _, t, _)| *t == QType::A)
            .map(|(n, name, _, _)| (n.as_str(), name.as_str()))
            .collect();
        // web has two backends: never; web1, its alias, client, api (one
        // address per network) and pg: with and without the network name.
        for want in
            [("n1", "web1"), ("n1", "www"), ("n1", "web1.app"), ("n1", "client"), ("n1", "api"), ("n2", "pg.db")]
        {
            assert!(names.contains(&want), "{want:?} missing from {names:?}");
        }
        assert!(!names.iter().any(|(_, n)| *n == "web" || *n == "web.app"), "a two-address name: {names:?}");
        // Each agrees with what the resolver answers a client of that network.
        for (net, name, qtype, ip) in &all {
            let scope = BTreeSet::from([net.clone()]);
            let want = match ip {
                IpAddr::V4(a) => Answer::Addrs(vec![*a]),
                IpAddr::V6(a) => Answer::Addrs6(vec![*a]),
            };
            assert_eq!(z.resolve(name, *qtype, &scope), want, "{net} {name} {qtype:?}");
        }
    }

    #[test]
    fn endpoints_aliases_services_and_tasks() {
        let z = zone();
        let s = scope_of(&z, "10.1.0.4");
        assert_eq!(s, BTreeSet::from(["n1".to_string()]));
        assert_eq!(z.resolve("web1.", QType::A, &s), Answer::Addrs(vec![v4("10.1.0.2")]));
        assert_eq!(z.resolve("WWW", QType::A, &s), Answer::Addrs(vec![v4("10.1.0.2")]), "aliases, any case");
        assert_eq!(z.resolve("web", QType::A, &s), Answer::Addrs(vec![v4("10.1.0.2"), v4("10.1.0.3")]));
        assert_eq!(z.resolve("tasks.web", QType::A, &s), Answer::Addrs(vec![v4("10.1.0.2"), v4("10.1.0.3")]));
        assert_eq!(z.resolve("tasks.web1", QType::A, &s), Answer::NxDomain, "tasks. is for services");
        assert_eq!(z.resolve("web1.app", QType::A, &s), Answer::Addrs(vec![v4("10.1.0.2")]));
        assert_eq!(z.resolve("tasks.web.app.", QType::A, &s), Answer::Addrs(vec![v4("10.1.0.2"), v4("10.1.0.3")]));
        assert_eq!(z.resolve("web1", QType::Aaaa, &s), Answer::NoData, "AAAA: authoritative NODATA");
        assert_eq!(z.resolve("web1", QType::Other, &s), Answer::NoData);
        assert_eq!(z.resolve("nosuch", QType::A, &s), Answer::NxDomain, "single labels never go upstream");
        assert_eq!(z.resolve("nosuch.app", QType::A, &s), Answer::NxDomain);
        assert_eq!(z.resolve("a.b.app", QType::A, &s), Answer::NxDomain, "under a network name: ours");
        assert_eq!(z.resolve("example.com", QType::A, &s), Answer::Forward);
        assert_eq!(z.resolve(".", QType::A, &s), Answer::Forward);
    }

    #[test]
    fn service_records_give_vips_backends_and_reverse_names() {
        let nets = [net("n1", "app", "10.1.0.0/24"), net("n2", "db", "10.2.0.0/24")];
        let eps = [
            ep("a1", "n1", "10.1.0.2", "/c/a1", None, &[]),
            ep("a2", "n1", "10.1.0.3", "/c/a2", None, &[]),
            ep("client", "n1", "10.1.0.4", "/c/client", None, &[]),
            ep("other", "n2", "10.2.0.4", "/c/other", None, &[]),
        ];
        let svcs = [
            Service {
                name: "web".into(),
                network_id: "n1".into(),
                vip: Some(v4("10.1.0.254")),
                backends: vec![v4("10.1.0.2"), v4("10.1.0.3")],
                vip6: None,
                backends6: vec![],
            },
            Service {
                name: "rr".into(),
                network_id: "n1".into(),
                vip: None,
                backends: vec![v4("10.1.0.3")],
                vip6: None,
                backends6: vec![],
            },
            Service {
                name: "empty".into(),
                network_id: "n1".into(),
                vip: Some(v4("10.1.0.253")),
                backends: vec![],
                vip6: None,
                backends6: vec![],
            },
        ];
        let z = Zone::build_with_services(&nets, &eps, &svcs);
        let s = scope_of(&z, "10.1.0.4");
        assert_eq!(z.resolve("web", QType::A, &s), Answer::Addrs(vec![v4("10.1.0.254")]), "vip mode: the VIP");
        assert_eq!(z.resolve("web.app", QType::A, &s), Answer::Addrs(vec![v4("10.1.0.254")]));
        assert_eq!(z.resolve("tasks.web", QType::A, &s), Answer::Addrs(vec![v4("10.1.0.2"), v4("10.1.0.3")]));
        assert_eq!(z.resolve("rr", QType::A, &s), Answer::Addrs(vec![v4("10.1.0.3")]), "dnsrr: the backends");
        assert_eq!(
            z.resolve("empty", QType::A, &s),
            Answer::Addrs(vec![v4("10.1.0.253")]),
            "a VIP with no backend still resolves"
        );
        assert_eq!(z.resolve("tasks.empty", QType::A, &s), Answer::NoData);
        assert_eq!(
            z.resolve("254.0.1.10.in-addr.arpa", QType::Ptr, &s),
            Answer::Names(vec!["web.app.".into()]),
            "PTR of a VIP"
        );
        let other = scope_of(&z, "10.2.0.4");
        assert_eq!(z.resolve("web", QType::A, &other), Answer::NxDomain, "another network's service");
        assert_eq!(z.resolve("254.0.1.10.in-addr.arpa", QType::Ptr, &other), Answer::NxDomain);
    }

    /// On a dual-stack network a service answers AAAA as it answers A: a
    /// `vip` service its IPv6 VIP (PTR in ip6.arpa too), a `dnsrr` one and
    /// `tasks.` every backend's IPv6 address.
    #[test]
    fn service_records_answer_aaaa_with_the_ipv6_vip_and_backends() {
        let mut n = net("n1", "app", "10.1.0.0/24");
        n.subnet6 = Some("fd00:1::/64".parse().unwrap());
        let nets = [n];
        let eps = [ep("client", "n1", "10.1.0.4", "/c/client", None, &[])];
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let svc = |name: &str, vip, vip6, backends6: &[&str]| Service {
            name: name.into(),
            network_id: "n1".into(),
            vip,
            backends: vec![v4("10.1.0.2"), v4("10.1.0.3")],
            vip6,
            backends6: backends6.iter().map(|b| v6(b)).collect(),
        };
        let svcs = [
            svc("web", Some(v4("10.1.0.254")), Some(v6("fd00:1::ffff:ffff:ffff:ff7f")), &["fd00:1::2", "fd00:1::3"]),
            svc("rr", None, None, &["fd00:1::3"]),
            svc("v4only", Some(v4("10.1.0.253")), None, &["fd00:1::2"]),
        ];
        let z = Zone::build_with_services(&nets, &eps, &svcs);
        let s = scope_of(&z, "10.1.0.4");
        assert_eq!(z.resolve("web", QType::Aaaa, &s), Answer::Addrs6(vec![v6("fd00:1::ffff:ffff:ffff:ff7f")]));
        assert_eq!(z.resolve("web", QType::A, &s), Answer::Addrs(vec![v4("10.1.0.254")]), "A as before");
        assert_eq!(z.resolve("tasks.web", QType::Aaaa, &s), Answer::Addrs6(vec![v6("fd00:1::2"), v6("fd00:1::3")]));
        assert_eq!(z.resolve("rr", QType::Aaaa, &s), Answer::Addrs6(vec![v6("fd00:1::3")]), "dnsrr: the backends");
        assert_eq!(z.resolve("v4only", QType::Aaaa, &s), Answer::NoData, "a VIP without an IPv6 one: no backend's");
        let ptr = "f.7.f.f.f.f.f.f.f.f.f.f.f.f.f.f.0.0.0.0.0.0.0.0.1.0.0.0.0.0.d.f.ip6.arpa";
        assert_eq!(z.resolve(ptr, QType::Ptr, &s), Answer::Names(vec!["web.app.".into()]), "PTR of the IPv6 VIP");
        let singles = z.single_answers();
        assert!(
            singles.contains(&("n1".into(), "web".into(), QType::Aaaa, IpAddr::V6(v6("fd00:1::ffff:ffff:ffff:ff7f")))),
            "the in-kernel path answers it too: {singles:?}"
        );
    }

    #[test]
    fn clients_see_only_their_networks() {
        let z = zone();
        let app = scope_of(&z, "10.1.0.4");
        assert_eq!(z.resolve("pg", QType::A, &app), Answer::NxDomain);
        assert_eq!(z.resolve("pg.db", QType::A, &app), Answer::NxDomain, "another network's name, qualified");
        // A container on both networks sees both, by either address.
        for ip in ["10.1.0.5", "10.2.0.5"] {
            let both = scope_of(&z, ip);
            assert_eq!(both.len(), 2, "{ip}");
            assert_eq!(z.resolve("pg", QType::A, &both), Answer::Addrs(vec![v4("10.2.0.2")]));
            assert_eq!(z.resolve("web1", QType::A, &both), Answer::Addrs(vec![v4("10.1.0.2")]));
            assert_eq!(
                z.resolve("api", QType::A, &both),
                Answer::Addrs(vec![v4("10.1.0.5"), v4("10.2.0.5")]),
                "a name on two networks answers both"
            );
        }
        // Not an endpoint: no Trellis names at all.
        let none = scope_of(&z, "192.168.1.1");
        assert!(none.is_empty());
        assert_eq!(z.resolve("web1", QType::A, &none), Answer::NxDomain);
        // An address of one subnet does not open another network.
        assert!(scope_of(&z, "10.2.0.4").is_empty());
    }

    #[test]
    fn reverse_names() {
        let z = zone();
        let s = scope_of(&z, "10.1.0.4");
        assert_eq!(z.resolve("2.0.1.10.in-addr.arpa.", QType::Ptr, &s), Answer::Names(vec!["web1.app.".into()]));
        assert_eq!(z.resolve("2.0.2.10.in-addr.arpa", QType::Ptr, &s), Answer::NxDomain, "out of scope");
        assert_eq!(z.resolve("99.0.1.10.in-addr.arpa", QType::Ptr, &s), Answer::NxDomain, "ours, unused");
        assert_eq!(z.resolve("2.0.1.10.in-addr.arpa", QType::A, &s), Answer::NoData);
        assert_eq!(z.resolve("1.1.168.192.in-addr.arpa", QType::Ptr, &s), Answer::Forward, "not a Trellis subnet");
        assert_eq!(z.resolve("0.1.10.in-addr.arpa", QType::Ptr, &s), Answer::Forward);
    }

    #[test]
    fn adding_one_endpoint_equals_building_with_it() {
        let n = net("n1", "app", "10.1.0.0/24");
        let a = ep("a", "n1", "10.1.0.2", "/c/a", Some("svc"), &["al"]);
        let b = ep("b", "n1", "10.1.0.3", "/c/b", Some("svc"), &[]);
        let mut z = Zone::build(std::slice::from_ref(&n), std::slice::from_ref(&a));
        z.add(&n, &b);
        z.add(&n, &b);
        let whole = Zone::build(&[n], &[a, b]);
        let s = scope_of(&z, "10.1.0.3");
        assert_eq!(s, scope_of(&whole, "10.1.0.3"));
        for q in ["a", "al", "b", "svc", "tasks.svc", "b.app", "3.0.1.10.in-addr.arpa"] {
            let t = if q.ends_with("arpa") { QType::Ptr } else { QType::A };
            assert_eq!(z.resolve(q, t, &s), whole.resolve(q, t, &s), "{q}");
        }
        let mut empty = Zone::default();
        empty.add(&net("n2", "x", "10.2.0.0/24"), &ep("c", "n2", "10.2.0.2", "/c/c", None, &[]));
        assert_eq!(empty.resolve("c.x", QType::A, &scope_of(&empty, "10.2.0.2")), Answer::Addrs(vec![v4("10.2.0.2")]));
    }

    /// Every name, task list, reverse name and scope of `z` and `whole`
    /// agree, for clients at every address of `clients`.
    fn same_answers(z: &Zone, whole: &Zone, clients: &[&str], names: &[&str]) {
        for c in clients {
            let s = scope_of(whole, c);
            assert_eq!(scope_of(z, c), s, "scope of {c}");
            for q in names {
                let t = if q.ends_with("arpa") { QType::Ptr } else { QType::A };
                assert_eq!(z.resolve(q, t, &s), whole.resolve(q, t, &s), "{q} from {c}");
            }
        }
        assert_eq!(z.single_answers(), whole.single_answers());
        assert_eq!(z.endpoints(), whole.endpoints());
    }

    #[test]
    fn removing_or_replacing_an_endpoint_equals_building_without_it() {
        let n = net("n1", "app", "10.1.0.0/24");
        let a = ep("a", "n1", "10.1.0.2", "/c/a", Some("svc"), &["al"]);
        let b = ep("b", "n1", "10.1.0.3", "/c/b", Some("svc"), &["al"]);
        // Another record with a's address and name (a stale one being
        // replaced): removing it keeps a's names.
        let a2 = Endpoint { id: "n1/a-again".into(), ..a.clone() };
        let c = ep("c", "n1", "10.1.0.4", "/c/a", None, &[]);
        let names =
            ["a", "al", "b", "c", "svc", "tasks.svc", "a.app", "2.0.1.10.in-addr.arpa", "3.0.1.10.in-addr.arpa"];
        let clients = ["10.1.0.2", "10.1.0.3", "10.1.0.4"];
        let mut z = Zone::build(std::slice::from_ref(&n), &[a.clone(), b.clone(), a2.clone(), c.clone()]);
        z.remove(&a2);
        same_answers(&z, &Zone::build(std::slice::from_ref(&n), &[a.clone(), b.clone(), c.clone()]), &clients, &names);
        z.remove(&b);
        same_answers(&z, &Zone::build(std::slice::from_ref(&n), &[a.clone(), c.clone()]), &clients, &names);
        // Replaced under its id: moved to another address, out of the service.
        let b_moved = Endpoint { ip: "10.1.0.9".parse().unwrap(), service: None, ..b.clone() };
        z.put(&b);
        z.remove(&b);
        z.put(&b_moved);
        same_answers(&z, &Zone::build(std::slice::from_ref(&n), &[a.clone(), c.clone(), b_moved]), &clients, &names);
        // The sandbox /c/a keeps network n1 while one of its endpoints is left.
        z.remove(&a);
        assert_eq!(scope_of(&z, "10.1.0.4"), BTreeSet::from(["n1".to_string()]));
        z.remove(&c);
        assert!(scope_of(&z, "10.1.0.4").is_empty());
        assert_eq!(z.resolve("a", QType::A, &BTreeSet::from(["n1".to_string()])), Answer::NxDomain);
    }

    #[test]
    fn an_attach_s_early_add_and_the_store_s_record_count_once() {
        let n = net("n1", "app", "10.1.0.2/24");
        let a = ep("a", "n1", "10.1.0.2", "/c/a", Some("svc"), &[]);
        let s = BTreeSet::from(["n1".to_string()]);
        // The view had it first, the attach adds it after: once.
        let mut z = Zone::build(std::slice::from_ref(&n), std::slice::from_ref(&a));
        z.add(&n, &a);
        assert_eq!(z.endpoints(), 1);
        z.remove(&a);
        assert_eq!(z.resolve("a", QType::A, &s), Answer::NxDomain, "gone with one removal");
        // The attach first, then the store's record (changed since): the
        // record replaces what the attach added.
        let mut z = Zone::build(std::slice::from_ref(&n), &[]);
        z.add(&n, &a);
        let a_ready = Endpoint { service: None, ..a.clone() };
        z.put(&a_ready);
        assert_eq!(z.endpoints(), 1);
        assert_eq!(z.resolve("tasks.svc", QType::A, &s), Answer::NxDomain);
        z.remove(&a_ready);
        assert_eq!(z.resolve("a", QType::A, &s), Answer::NxDomain);
        assert_eq!(z.endpoints(), 0);
    }

    #[test]
    fn endpoints_of_unknown_networks_are_ignored() {
        let z = Zone::build(&[net("n1", "app", "10.1.0.0/24")], &[ep("x", "gone", "10.9.0.2", "/c/x", None, &[])]);
        assert!(scope_of(&z, "10.9.0.2").is_empty());
    }

    #[test]
    fn dual_stack_endpoints_answer_aaaa_and_ip6_arpa() {
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let dual = |name: &str, ip: &str, ip6: &str, service: Option<&str>| Endpoint {
            ip6: Some(v6(ip6)),
            ..ep(name, "n1", ip, &format!("/c/{name}"), service, &[])
        };
        let mut n = net("n1", "app", "10.1.0.0/24");
        n.subnet6 = Some("fd00:1::/64".parse().unwrap());
        let mut z = Zone::build_with_services(
            &[n.clone(), net("n2", "db", "10.2.0.0/24")],
            &[
                dual("web1", "10.1.0.2", "fd00:1::2", Some("web")),
                dual("web2", "10.1.0.3", "fd00:1::3", Some("web")),
                ep("old", "n1", "10.1.0.4", "/c/old", None, &[]),
                ep("db1", "n2", "10.2.0.2", "/c/db1", None, &[]),
            ],
            &[Service {
                name: "api".into(),
                network_id: "n1".into(),
                vip: Some(v4("10.1.0.250")),
                backends: vec![],
                vip6: None,
                backends6: vec![],
            }],
        );
        // A client asking from its IPv6 address sees its networks.
        let s = z.scope("fd00:1::2".parse().unwrap());
        assert_eq!(s, BTreeSet::from(["n1".to_string()]));
        assert_eq!(z.resolve("web1", QType::Aaaa, &s), Answer::Addrs6(vec![v6("fd00:1::2")]));
        assert_eq!(z.resolve("web1.app", QType::Aaaa, &s), Answer::Addrs6(vec![v6("fd00:1::2")]));
        assert_eq!(z.resolve("web1", QType::A, &s), Answer::Addrs(vec![v4("10.1.0.2")]), "A as before");
        assert_eq!(z.resolve("tasks.web", QType::Aaaa, &s), Answer::Addrs6(vec![v6("fd00:1::2"), v6("fd00:1::3")]));
        assert_eq!(z.resolve("web", QType::Aaaa, &s), Answer::Addrs6(vec![v6("fd00:1::2"), v6("fd00:1::3")]));
        assert_eq!(z.resolve("old", QType::Aaaa, &s), Answer::NoData, "an IPv4-only endpoint: NODATA");
        assert_eq!(z.resolve("api", QType::Aaaa, &s), Answer::NoData, "VIPs are IPv4");
        assert_eq!(z.resolve("db1", QType::Aaaa, &s), Answer::NxDomain, "out of scope");
        // ip6.arpa of fd00:1::2.
        let rev = "2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.0.0.d.f.ip6.arpa.";
        assert_eq!(z.resolve(rev, QType::Ptr, &s), Answer::Names(vec!["web1.app.".into()]));
        let unused = "9.9.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.0.0.d.f.ip6.arpa";
        assert_eq!(z.resolve(unused, QType::Ptr, &s), Answer::NxDomain, "ours, unused");
        let outside = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa";
        assert_eq!(z.resolve(outside, QType::Ptr, &s), Answer::Forward, "not a Trellis subnet");
        assert_eq!(z.resolve("1.0.ip6.arpa", QType::Ptr, &s), Answer::Forward);
        // The in-kernel path's AAAA: a name with one IPv6 address, bare and
        // qualified; never a name with two (web), none (old, a VIP), and
        // its A beside it.
        let single = z.single_answers();
        let has = |name: &str, qtype: QType| single.iter().find(|(_, n, t, _)| n == name && *t == qtype).map(|x| x.3);
        assert_eq!(has("web1", QType::Aaaa), Some(IpAddr::V6(v6("fd00:1::2"))), "{single:?}");
        assert_eq!(has("web1.app", QType::Aaaa), Some(IpAddr::V6(v6("fd00:1::2"))));
        assert_eq!(has("web1", QType::A), Some(IpAddr::V4(v4("10.1.0.2"))));
        for (name, qtype) in [("web", QType::Aaaa), ("old", QType::Aaaa), ("api", QType::Aaaa), ("web", QType::A)] {
            assert_eq!(has(name, qtype), None, "{name} {qtype:?}: {single:?}");
        }
        assert_eq!(has("old", QType::A), Some(IpAddr::V4(v4("10.1.0.4"))));
        // Removed: its AAAA and PTR go with it.
        z.remove(&dual("web1", "10.1.0.2", "fd00:1::2", Some("web")));
        assert_eq!(z.resolve("web1", QType::Aaaa, &s), Answer::NxDomain);
        assert_eq!(z.resolve("tasks.web", QType::Aaaa, &s), Answer::Addrs6(vec![v6("fd00:1::3")]));
        assert_eq!(z.resolve(rev, QType::Ptr, &s), Answer::NxDomain);
    }
}
