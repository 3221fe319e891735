//! The agent's side of service discovery: the DNS zone rebuilt from the
//! informer's records whenever they change, and a server listening on every
//! network's gateway address.

use std::net::IpAddr;
use std::sync::Arc;

use trellis_dns::{Core, Listeners, Zone};

use crate::model::{EndpointRecord, NetworkRecord, Records, SERVICE_LABEL, ServiceMode, ServiceRecord};
use crate::state::informer::{Informer, View};

/// An endpoint as the zone has it.
pub fn zone_endpoint(e: &EndpointRecord) -> trellis_dns::Endpoint {
    trellis_dns::Endpoint {
        id: e.id.clone(),
        name: e.name.clone(),
        aliases: e.aliases.clone(),
        network_id: e.network_id.clone(),
        ip: e.ip,
        // (An IPv6-only endpoint's one address is both.)
        ip6: match e.ipv6() {
            Some(std::net::IpAddr::V6(v6)) => Some(v6),
            _ => None,
        },
        // Namespace paths are per host.
        sandbox: format!("{}:{}", e.host, e.netns.display()),
        // A task of its service's name while ready.
        service: e.labels.get(SERVICE_LABEL).filter(|_| e.ready).cloned(),
    }
}

pub fn zone_network(n: &NetworkRecord) -> trellis_dns::Network {
    trellis_dns::Network { id: n.id.clone(), name: n.name.clone(), subnet: n.subnet, subnet6: n.subnet_v6() }
}

/// The zone of `networks`, the live endpoints of live `hosts` and the
/// services (backends: their live endpoints).
pub fn zone_of(
    networks: &[NetworkRecord],
    endpoints: &(impl Records<EndpointRecord> + ?Sized),
    hosts: &[String],
    services: &[ServiceRecord],
) -> Zone {
    let nets: Vec<trellis_dns::Network> = networks.iter().map(zone_network).collect();
    // A set: a list's `contains` per endpoint was hosts × endpoints.
    let hosts: std::collections::HashSet<&str> = hosts.iter().map(String::as_str).collect();
    let live: Vec<&EndpointRecord> =
        endpoints.each().filter(|e| !e.deleting && hosts.contains(e.host.as_str())).collect();
    let eps: Vec<trellis_dns::Endpoint> = live.iter().map(|e| zone_endpoint(e)).collect();
    let mut by_net: std::collections::HashMap<&str, Vec<&EndpointRecord>> = std::collections::HashMap::new();
    for e in &live {
        by_net.entry(e.network_id.as_str()).or_default().push(e);
    }
    let svcs: Vec<trellis_dns::Service> = services
        .iter()
        .map(|s| trellis_dns::Service {
            name: s.name.clone(),
            network_id: s.network_id.clone(),
            vip: match (s.mode, s.vip) {
                (ServiceMode::Vip, Some(IpAddr::V4(v4))) => Some(v4),
                _ => None,
            },
            backends: by_net
                .get(s.network_id.as_str())
                .into_iter()
                .flatten()
                // Ready ones only: an unready backend takes no client.
                .filter(|e| s.serves(e))
                .filter_map(|e| match e.ip {
                    IpAddr::V4(v4) => Some(v4),
                    _ => None,
                })
                .collect(),
            vip6: match (s.mode, s.vip6) {
                (ServiceMode::Vip, Some(IpAddr::V6(v6))) => Some(v6),
                _ => None,
            },
            backends6: by_net
                .get(s.network_id.as_str())
                .into_iter()
                .flatten()
                .filter(|e| s.serves(e))
                .filter_map(|e| match e.ipv6() {
                    Some(IpAddr::V6(v6)) => Some(v6),
                    _ => None,
                })
                .collect(),
        })
        .collect();
    Zone::build_with_services(&nets, &eps, &svcs)
}

/// Follows the informer's views with one zone at O(change) where it can:
/// a view that differs from the last one only in endpoints of networks no
/// service record lives on (the commonest change of a large cluster) is
/// applied endpoint by endpoint; any other change is left to a rebuild.
#[derive(Default)]
pub struct ZoneFollower {
    built: Option<Arc<View>>,
    /// The live hosts and the networks with a service record, of `built`.
    live: std::collections::HashSet<String>,
    service_nets: std::collections::HashSet<String>,
    pub patched: u64,
    pub rebuilt: u64,
}

impl ZoneFollower {
    /// `v`'s records are those the zone was last brought to.
    pub fn current(&self, v: &View) -> bool {
        self.built.as_ref().is_some_and(|b| b.same_records(v))
    }

    /// The zone was rebuilt from `v`.
    pub fn rebuilt(&mut self, v: &Arc<View>) {
        self.live = v.hosts.iter().map(|h| h.id.clone()).collect();
        self.service_nets = v.services.iter().map(|s| s.network_id.clone()).collect();
        self.built = Some(v.clone());
        self.rebuilt += 1;
    }

    /// `v`'s endpoint changes from the last view, if they are all it has
    /// and none is on a network with a service record (whose backends
    /// come from the whole network). `None` when `v` needs a rebuild.
    pub fn changes(&self, v: &View) -> Option<Vec<EndpointChange>> {
        let prev = self.built.as_ref()?;
        if !(Arc::ptr_eq(&prev.networks, &v.networks)
            && Arc::ptr_eq(&prev.hosts, &v.hosts)
            && Arc::ptr_eq(&prev.services, &v.services))
        {
            return None;
        }
        let on_service_net =
            |e: Option<&Arc<EndpointRecord>>| e.is_some_and(|e| self.service_nets.contains(&e.network_id));
        v.endpoints
            .changes(&prev.endpoints)
            .map(|(before, after)| {
                (!on_service_net(before) && !on_service_net(after)).then(|| (before.cloned(), after.cloned()))
            })
            .collect()
    }

    /// Apply `changes` (of `v`, from [`ZoneFollower::changes`]) to `zone`,
    /// as built from the last view.
    pub fn apply(&mut self, zone: &mut Zone, v: &Arc<View>, changes: &[EndpointChange]) {
        let live = |e: &EndpointRecord| !e.deleting && self.live.contains(&e.host);
        for (before, after) in changes {
            if let Some(before) = before {
                zone.remove(&zone_endpoint(before));
            }
            if let Some(after) = after.as_ref().filter(|e| live(e)) {
                zone.put(&zone_endpoint(after));
            }
        }
        self.built = Some(v.clone());
        self.patched += 1;
    }
}

/// One endpoint before and after a change (`None`: not there).
pub type EndpointChange = (Option<Arc<EndpointRecord>>, Option<Arc<EndpointRecord>>);

/// The (network id, name) pairs whose answers `changes` may move: every
/// name, alias and service label of the endpoints before and after.
pub fn touched_names(changes: &[EndpointChange]) -> std::collections::BTreeSet<(String, String)> {
    let mut touched = std::collections::BTreeSet::new();
    for e in changes.iter().flat_map(|(b, a)| [b, a]).flatten() {
        let names = std::iter::once(&e.name).chain(&e.aliases).chain(e.labels.get(SERVICE_LABEL));
        touched.extend(names.map(|n| (e.network_id.clone(), n.clone())));
    }
    touched
}

/// The in-kernel table's entries for `names` as `zone` answers them: each
/// name's forms with their answer, or `None` for a form it has none for.
pub fn kernel_entries(
    zone: &Zone,
    networks: &[NetworkRecord],
    names: &std::collections::BTreeSet<(String, String)>,
) -> Vec<(trellis_ebpf::DnsKey, Option<trellis_ebpf::DnsAnswer>)> {
    let mut out = Vec::new();
    for (net, name) in names {
        let Some(vni) = networks.iter().find(|n| &n.id == net).map(|n| n.vni) else { continue };
        for (form, qtype, ip) in zone.single_answer_forms(net, name) {
            if let Some(key) = trellis_ebpf::DnsKey::of_type(vni, &form, kernel_qtype(qtype)) {
                out.push((key, ip.map(|ip| trellis_ebpf::DnsAnswer::new(ip, trellis_dns::LOCAL_TTL))));
            }
        }
    }
    out
}

/// Keep the zone and the listeners current: rebuilt from every informer
/// view whose records changed (a burst folded into one rebuild, freshness
/// well under the 100 ms target), after a failed rebuild within a second,
/// and every [`REFRESH`] anyway. Between rebuilds the in-kernel table is
/// synced again every [`KERNEL_SYNC`] (the dataplane reads it back every
/// tenth time: a name removed from it by hand comes back).
///
/// The hosts answered for are the present ones (`present`: those whose
/// registration lives and those kept while their data path answers).
pub async fn run(
    informer: Arc<Informer>,
    present: Option<Arc<crate::state::liveness::Present>>,
    core: Arc<Core>,
    mut listeners: Listeners,
    kernel: Option<Arc<dyn crate::dataplane::Dataplane>>,
) {
    let mut views = informer.subscribe();
    let present_in = |v: Arc<View>| match &present {
        Some(p) => p.view(v),
        None => v,
    };
    // Wait for the first listing: an empty zone is no answer.
    let mut v = present_in(informer.listed().await);
    let mut follower = ZoneFollower::default();
    let mut built_at: Option<std::time::Instant> = None;
    let mut table = None;
    loop {
        let changed = !follower.current(&v);
        let refresh = built_at.is_none_or(|at| at.elapsed() >= REFRESH);
        let patched = changed
            && !refresh
            && patch(&v, &core, &mut follower, kernel.as_deref().zip(table.as_mut()), kernel.is_some());
        if (changed || refresh) && !patched {
            match rebuild(&v, &core, &mut listeners, kernel.as_deref()) {
                Ok(t) => {
                    follower.rebuilt(&v);
                    built_at = Some(std::time::Instant::now());
                    table = Some(t);
                }
                Err(e) => {
                    built_at = None;
                    follower = ZoneFollower::default();
                    tracing::warn!(error = %e, "DNS zone not updated");
                }
            }
        } else if !patched
            && let (Some(dp), Some(t)) = (&kernel, &table)
            && let Err(e) = dp.sync_dns(t)
        {
            tracing::warn!(error = %e, "the in-kernel DNS table could not be synced");
        }
        match tokio::time::timeout(KERNEL_SYNC, views.changed()).await {
            Ok(Err(_)) => return,
            Ok(Ok(())) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            Err(_) => {}
        }
        v = present_in(views.borrow_and_update().clone());
    }
}

/// Follow `v`'s endpoint changes in the server's zone and, with the
/// in-kernel path (`kernel`: the dataplane and its table), in the kernel's
/// table: the names they touch leave the kernel first, so that the two
/// never disagree on a name, and come back as the patched zone answers
/// them. False, nothing changed, when `v` needs a rebuild.
fn patch(
    v: &Arc<View>,
    core: &Core,
    follower: &mut ZoneFollower,
    kernel: Option<(&dyn crate::dataplane::Dataplane, &mut DnsTable)>,
    kernel_on: bool,
) -> bool {
    let Some(changes) = follower.changes(v) else { return false };
    if kernel_on && kernel.is_none() {
        return false;
    }
    let touched = touched_names(&changes);
    let mut kernel = kernel;
    if let Some((dp, table)) = kernel.as_mut() {
        let gone: Vec<_> = kernel_entries(&core.zone(), &v.networks, &touched)
            .into_iter()
            .filter(|(k, _)| table.remove(k).is_some())
            .map(|(k, _)| (k, None))
            .collect();
        if let Err(e) = dp.patch_dns(&gone) {
            tracing::warn!(error = %e, "the in-kernel DNS table could not be patched: rebuilding");
            return false;
        }
    }
    core.update_zone(|z| follower.apply(z, v, &changes));
    if let Some((dp, table)) = kernel {
        let back: Vec<_> =
            kernel_entries(&core.zone(), &v.networks, &touched).into_iter().filter(|(_, a)| a.is_some()).collect();
        for (k, a) in &back {
            table.insert(*k, a.expect("kept above"));
        }
        if let Err(e) = dp.patch_dns(&back) {
            // The table holds them: the next sync puts them in.
            tracing::warn!(error = %e, "the in-kernel DNS table could not be patched");
        }
    }
    true
}

/// The in-kernel DNS table: name → its one answer.
pub type DnsTable = std::collections::BTreeMap<trellis_ebpf::DnsKey, trellis_ebpf::DnsAnswer>;

/// The zone is rebuilt at least this often, changes or not.
pub const REFRESH: std::time::Duration = std::time::Duration::from_secs(60);
/// The in-kernel table is synced (and now and then read back) this often.
pub const KERNEL_SYNC: std::time::Duration = std::time::Duration::from_secs(1);

/// The in-kernel table's record type of a zone's query type (the zone
/// gives single answers for A and AAAA only).
fn kernel_qtype(q: trellis_dns::QType) -> u16 {
    match q {
        trellis_dns::QType::Aaaa => trellis_ebpf::DNS_TYPE_AAAA,
        _ => trellis_ebpf::DNS_TYPE_A,
    }
}

/// The in-kernel DNS table of `zone`: every name a one-network client gets
/// exactly one address of a family for, keyed by its network's VNI and
/// the record type.
pub fn kernel_table(
    zone: &Zone,
    networks: &[NetworkRecord],
) -> std::collections::BTreeMap<trellis_ebpf::DnsKey, trellis_ebpf::DnsAnswer> {
    let vni: std::collections::HashMap<&str, u32> = networks.iter().map(|n| (n.id.as_str(), n.vni)).collect();
    zone.single_answers()
        .into_iter()
        .filter_map(|(net, name, qtype, ip)| {
            let key = trellis_ebpf::DnsKey::of_type(*vni.get(net.as_str())?, &name, kernel_qtype(qtype))?;
            Some((key, trellis_ebpf::DnsAnswer::new(ip, trellis_dns::LOCAL_TTL)))
        })
        .collect()
}

fn rebuild(
    v: &View,
    core: &Core,
    listeners: &mut Listeners,
    kernel: Option<&dyn crate::dataplane::Dataplane>,
) -> Result<std::collections::BTreeMap<trellis_ebpf::DnsKey, trellis_ebpf::DnsAnswer>, String> {
    let hosts: Vec<String> = v.hosts.iter().map(|h| h.id.clone()).collect();
    let zone = zone_of(&v.networks, &v.endpoints, &hosts, &v.services);
    // The kernel's table before the server's zone: a name leaving both is
    // gone from the kernel first, so the two never disagree on it.
    let table = if kernel.is_some() { kernel_table(&zone, &v.networks) } else { Default::default() };
    if let Some(dp) = kernel {
        dp.sync_dns(&table).map_err(|e| e.to_string())?;
    }
    core.set_zone(zone);
    let gateways: Vec<IpAddr> = v.networks.iter().flat_map(|n| n.gateway.into_iter().chain(n.gateway6)).collect();
    for (ip, e) in listeners.set(&gateways) {
        tracing::warn!(address = %ip, error = %e, "DNS cannot listen on a network's gateway");
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use trellis_dns::{Answer, QType};

    use super::*;

    fn endpoint(id: &str, ip: &str, service: &str) -> EndpointRecord {
        serde_json::from_value(serde_json::json!({
            "id": id, "name": id, "network_id": "n1", "network": "app", "host": "h1", "ip": ip,
            "mac": "02:42:0a:01:00:02", "netns": format!("/run/netns/{id}"), "ifname": "eth0", "kind": "adhoc",
            "created_unix": 0, "labels": {"trellis.service": service},
        }))
        .unwrap()
    }

    #[test]
    fn unready_and_draining_backends_are_no_tasks_of_their_services() {
        let net: NetworkRecord = serde_json::from_value(serde_json::json!({
            "id": "n1", "name": "app", "subnet": "10.1.0.0/24", "gateway": "10.1.0.1", "vni": 4096, "mtu": 1450,
            "attachable": true, "internal": false, "encrypted": false, "created_unix": 0,
        }))
        .unwrap();
        let mut eps = vec![
            endpoint("a", "10.1.0.2", "web"),
            endpoint("b", "10.1.0.3", "web"),
            endpoint("c", "10.1.0.4", "web"),
            endpoint("d", "10.1.0.5", "api"),
            endpoint("e", "10.1.0.6", "api"),
        ];
        eps[1].ready = false;
        eps[2].deleting = true;
        eps[2].drain_until_ms = Some(1);
        eps[4].ready = false;
        let web = ServiceRecord {
            name: "web".into(),
            network_id: "n1".into(),
            network: "app".into(),
            mode: ServiceMode::Dnsrr,
            vip: None,
            vip6: None,
            ports: vec![],
            selector: crate::model::default_selector("web"),
            created_unix: 0,
            publish: vec![],
        };
        // `api` has no record: its tasks come from the label.
        let zone = zone_of(&[net], &eps, &["h1".to_string()], &[web]);
        let scope = BTreeSet::from(["n1".to_string()]);
        let a = |name: &str| zone.resolve(name, QType::A, &scope);
        assert_eq!(a("web"), Answer::Addrs(vec!["10.1.0.2".parse().unwrap()]));
        assert_eq!(a("tasks.web"), Answer::Addrs(vec!["10.1.0.2".parse().unwrap()]));
        assert_eq!(a("tasks.api"), Answer::Addrs(vec!["10.1.0.5".parse().unwrap()]));
        // Its own name still resolves (it is attached), the draining one's not.
        assert_eq!(a("b"), Answer::Addrs(vec!["10.1.0.3".parse().unwrap()]));
        assert_eq!(a("c"), Answer::NxDomain);
    }

    /// An IPv6-only network's endpoints: AAAA for their names (no A), PTR
    /// in ip6.arpa, for a client asking from its own address.
    #[test]
    fn an_ipv6_only_networks_names_answer_aaaa_and_ptr() {
        let net: NetworkRecord = serde_json::from_value(serde_json::json!({
            "id": "n1", "name": "six", "subnet": "fd00:96::/64", "gateway": "fd00:96::1", "vni": 4096, "mtu": 1450,
            "attachable": true, "internal": false, "encrypted": false, "created_unix": 0,
        }))
        .unwrap();
        let eps = vec![endpoint("a", "fd00:96::2", "web"), endpoint("c", "fd00:96::4", "web")];
        let zone = zone_of(&[net], &eps, &["h1".to_string()], &[]);
        let scope = zone.scope("fd00:96::2".parse().unwrap());
        assert_eq!(scope, BTreeSet::from(["n1".to_string()]));
        assert_eq!(zone.resolve("c", QType::Aaaa, &scope), Answer::Addrs6(vec!["fd00:96::4".parse().unwrap()]));
        assert_eq!(zone.resolve("c.six", QType::A, &scope), Answer::NoData);
        let ptr = "4.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.0.d.f.ip6.arpa";
        assert_eq!(zone.resolve(ptr, QType::Ptr, &scope), Answer::Names(vec!["c.six.".into()]), "once");
    }

    /// The in-kernel table of a dual-stack network: each one-address name
    /// under A and, with its IPv6 address, under AAAA (bare and
    /// qualified); a two-address service name under neither.
    #[test]
    fn the_kernel_table_holds_a_and_aaaa_of_one_address_names() {
        let net: NetworkRecord = serde_json::from_value(serde_json::json!({
            "id": "n1", "name": "app", "subnet": "10.1.0.0/24", "gateway": "10.1.0.1", "vni": 4096, "mtu": 1450,
            "attachable": true, "internal": false, "encrypted": false, "created_unix": 0,
            "subnet6": "fd00:1::/64", "gateway6": "fd00:1::1",
        }))
        .unwrap();
        let mut eps = vec![endpoint("a", "10.1.0.2", "web"), endpoint("b", "10.1.0.3", "web")];
        eps[0].ip6 = Some("fd00:1::2".parse().unwrap());
        eps[1].ip6 = Some("fd00:1::3".parse().unwrap());
        let zone = zone_of(std::slice::from_ref(&net), &eps, &["h1".to_string()], &[]);
        let table = kernel_table(&zone, &[net]);
        let get = |name: &str, qtype: u16| table.get(&trellis_ebpf::DnsKey::of_type(4096, name, qtype).unwrap());
        let aaaa = trellis_ebpf::DNS_TYPE_AAAA;
        let v6: std::net::Ipv6Addr = "fd00:1::2".parse().unwrap();
        assert_eq!(get("a", aaaa).map(|x| x.addr), Some(v6.octets()), "{table:?}");
        assert_eq!(get("a.app", aaaa).map(|x| x.addr), Some(v6.octets()));
        assert_eq!(get("a", trellis_ebpf::DNS_TYPE_A).map(|x| x.addr[..4].to_vec()), Some(vec![10, 1, 0, 2]));
        assert!(get("web", aaaa).is_none() && get("web", trellis_ebpf::DNS_TYPE_A).is_none(), "{table:?}");
        assert_eq!(table.len(), 8, "a and b, bare and qualified, A and AAAA: {table:?}");
    }

    /// A zone followed change by change answers as one rebuilt from the
    /// same view, over random endpoint changes: names, aliases and service
    /// labels coming and going, endpoints detached, moved to a host that is
    /// not live, renumbered; a network with a service record (whose
    /// changes rebuild) beside one without.
    #[test]
    fn a_followed_zone_answers_as_a_rebuilt_one() {
        use rand::{Rng, SeedableRng};
        let net = |id: &str, name: &str, subnet: &str| -> NetworkRecord {
            serde_json::from_value(serde_json::json!({
                "id": id, "name": name, "subnet": subnet, "gateway": subnet.replace(".0/24", ".1"), "vni": 4096,
                "mtu": 1450, "attachable": true, "internal": false, "encrypted": false, "created_unix": 0,
            }))
            .unwrap()
        };
        let networks = Arc::new(vec![net("n1", "app", "10.1.0.0/24"), net("n2", "db", "10.2.0.0/24")]);
        let hosts: Vec<crate::model::HostRecord> = ["h1", "h2"]
            .iter()
            .map(|h| {
                serde_json::from_value(serde_json::json!({
                    "id": h, "hostname": h, "underlay": "192.0.2.1", "vtep_mac": "02:00:00:00:00:01",
                    "vxlan_port": 4789, "version": "t", "started_unix": 0,
                }))
                .unwrap()
            })
            .collect();
        let services = Arc::new(vec![ServiceRecord {
            name: "api".into(),
            network_id: "n2".into(),
            network: "db".into(),
            mode: ServiceMode::Dnsrr,
            vip: None,
            vip6: None,
            ports: vec![],
            selector: crate::model::default_selector("api"),
            created_unix: 0,
            publish: vec![],
        }]);
        let names = ["a", "b", "c", "web", "api"];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let random_endpoint = |rng: &mut rand::rngs::StdRng, id: String| {
            let n = rng.random_range(1..=2);
            let mut e = endpoint(&id, &format!("10.{n}.0.{}", rng.random_range(2..8)), names[rng.random_range(0..4)]);
            e.network_id = format!("n{n}");
            e.name = names[rng.random_range(0..5)].into();
            e.host = ["h1", "h2", "h3"][rng.random_range(0..3)].into();
            if rng.random_bool(0.3) {
                e.aliases = vec![names[rng.random_range(0..5)].into()];
            }
            if rng.random_bool(0.3) {
                e.labels.clear();
            }
            e.ready = rng.random_bool(0.8);
            e.deleting = rng.random_bool(0.1);
            e
        };
        let mut view = Arc::new(View {
            networks: networks.clone(),
            hosts: Arc::new(hosts.clone()),
            services: services.clone(),
            ..View::default()
        });
        let live: Vec<String> = hosts.iter().map(|h| h.id.clone()).collect();
        let mut zone = zone_of(&view.networks, &view.endpoints, &live, &view.services);
        let mut follower = ZoneFollower::default();
        follower.rebuilt(&view);
        let clients: Vec<String> = (1..=2).flat_map(|n| (2..8).map(move |i| format!("10.{n}.0.{i}"))).collect();
        for step in 0..400 {
            let mut next = (*view).clone();
            let ids: Vec<String> = next.endpoints.iter().map(|e| e.id.clone()).collect();
            match rng.random_range(0..10) {
                0..4 => next.endpoints.insert(random_endpoint(&mut rng, format!("e{step}"))),
                4..6 if !ids.is_empty() => {
                    next.endpoints.remove(&ids[rng.random_range(0..ids.len())]);
                }
                _ if !ids.is_empty() => {
                    let id = ids[rng.random_range(0..ids.len())].clone();
                    next.endpoints.insert(random_endpoint(&mut rng, id));
                }
                _ => {}
            }
            let next = Arc::new(next);
            match follower.changes(&next) {
                Some(changes) => follower.apply(&mut zone, &next, &changes),
                None => {
                    zone = zone_of(&next.networks, &next.endpoints, &live, &next.services);
                    follower.rebuilt(&next);
                }
            }
            let whole = zone_of(&next.networks, &next.endpoints, &live, &next.services);
            assert_eq!(zone.single_answers(), whole.single_answers(), "step {step}");
            assert_eq!(zone.endpoints(), whole.endpoints(), "step {step}");
            for c in &clients {
                let scope = whole.scope(c.parse().unwrap());
                assert_eq!(zone.scope(c.parse().unwrap()), scope, "step {step}: scope of {c}");
                let ptr = |ip: &str| format!("{}.in-addr.arpa", ip.split('.').rev().collect::<Vec<_>>().join("."));
                for q in names
                    .iter()
                    .flat_map(|n| [n.to_string(), format!("tasks.{n}"), format!("{n}.app")])
                    .chain(clients.iter().map(|ip| ptr(ip)))
                {
                    let t = if q.ends_with("arpa") { QType::Ptr } else { QType::A };
                    assert_eq!(zone.resolve(&q, t, &scope), whole.resolve(&q, t, &scope), "step {step}: {q} from {c}");
                }
            }
            view = next;
        }
        assert!(follower.patched > 150, "{} patched", follower.patched);
        assert!(follower.rebuilt > 50, "{} rebuilt", follower.rebuilt);
    }
}
