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
        name: e.name.clone(),
        aliases: e.aliases.clone(),
        network_id: e.network_id.clone(),
        ip: e.ip,
        // Namespace paths are per host.
        sandbox: format!("{}:{}", e.host, e.netns.display()),
        // A task of its service's name while ready.
        service: e.labels.get(SERVICE_LABEL).filter(|_| e.ready).cloned(),
    }
}

pub fn zone_network(n: &NetworkRecord) -> trellis_dns::Network {
    trellis_dns::Network { id: n.id.clone(), name: n.name.clone(), subnet: n.subnet }
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
        })
        .collect();
    Zone::build_with_services(&nets, &eps, &svcs)
}

/// Keep the zone and the listeners current: rebuilt from every informer
/// view whose records changed (a burst folded into one rebuild, freshness
/// well under the 100 ms target), after a failed rebuild within a second,
/// and every [`REFRESH`] anyway. Between rebuilds the in-kernel table is
/// synced again every [`KERNEL_SYNC`] (the dataplane reads it back every
/// tenth time: a name removed from it by hand comes back).
pub async fn run(
    informer: Arc<Informer>,
    core: Arc<Core>,
    mut listeners: Listeners,
    kernel: Option<Arc<dyn crate::dataplane::Dataplane>>,
) {
    let mut views = informer.subscribe();
    // Wait for the first listing: an empty zone is no answer.
    let mut v = informer.listed().await;
    let mut built: Option<(Arc<View>, std::time::Instant)> = None;
    let mut table = None;
    loop {
        let due = built.as_ref().is_none_or(|(b, at)| !b.same_records(&v) || at.elapsed() >= REFRESH);
        if due {
            match rebuild(&v, &core, &mut listeners, kernel.as_deref()) {
                Ok(t) => {
                    built = Some((v.clone(), std::time::Instant::now()));
                    table = Some(t);
                }
                Err(e) => {
                    built = None;
                    tracing::warn!(error = %e, "DNS zone not updated");
                }
            }
        } else if let (Some(dp), Some(t)) = (&kernel, &table)
            && let Err(e) = dp.sync_dns(t)
        {
            tracing::warn!(error = %e, "the in-kernel DNS table could not be synced");
        }
        match tokio::time::timeout(KERNEL_SYNC, views.changed()).await {
            Ok(Err(_)) => return,
            Ok(Ok(())) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            Err(_) => {}
        }
        v = views.borrow_and_update().clone();
    }
}

/// The zone is rebuilt at least this often, changes or not.
pub const REFRESH: std::time::Duration = std::time::Duration::from_secs(60);
/// The in-kernel table is synced (and now and then read back) this often.
pub const KERNEL_SYNC: std::time::Duration = std::time::Duration::from_secs(1);

/// The in-kernel DNS table of `zone`: every name a one-network client gets
/// exactly one address for, keyed by its network's VNI.
pub fn kernel_table(
    zone: &Zone,
    networks: &[NetworkRecord],
) -> std::collections::BTreeMap<trellis_ebpf::DnsKey, trellis_ebpf::DnsAnswer> {
    let vni: std::collections::HashMap<&str, u32> = networks.iter().map(|n| (n.id.as_str(), n.vni)).collect();
    zone.single_answers()
        .into_iter()
        .filter_map(|(net, name, ip)| {
            let key = trellis_ebpf::DnsKey::new(*vni.get(net.as_str())?, &name)?;
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
    let gateways: Vec<IpAddr> = v.networks.iter().filter_map(|n| n.gateway).collect();
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
}
