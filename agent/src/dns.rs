//! The agent's side of service discovery: the DNS zone rebuilt from the
//! store's records whenever they change, and a server listening on every
//! network's gateway address.

use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::Notify;
use trellis_dns::{Core, Listeners, Zone};

use crate::model::{EndpointRecord, NetworkRecord, SERVICE_LABEL, ServiceMode, ServiceRecord};
use crate::state::Cluster;

/// An endpoint as the zone has it.
pub fn zone_endpoint(e: &EndpointRecord) -> trellis_dns::Endpoint {
    trellis_dns::Endpoint {
        name: e.name.clone(),
        aliases: e.aliases.clone(),
        network_id: e.network_id.clone(),
        ip: e.ip,
        // Namespace paths are per host.
        sandbox: format!("{}:{}", e.host, e.netns.display()),
        service: e.labels.get(SERVICE_LABEL).cloned(),
    }
}

pub fn zone_network(n: &NetworkRecord) -> trellis_dns::Network {
    trellis_dns::Network { id: n.id.clone(), name: n.name.clone(), subnet: n.subnet }
}

/// The zone of `networks`, the live endpoints of live `hosts` and the
/// services (backends: their live endpoints).
pub fn zone_of(
    networks: &[NetworkRecord],
    endpoints: &[EndpointRecord],
    hosts: &[String],
    services: &[ServiceRecord],
) -> Zone {
    let nets: Vec<trellis_dns::Network> = networks.iter().map(zone_network).collect();
    let live: Vec<&EndpointRecord> = endpoints.iter().filter(|e| !e.deleting && hosts.contains(&e.host)).collect();
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
                .filter(|e| s.selects(e))
                .filter_map(|e| match e.ip {
                    IpAddr::V4(v4) => Some(v4),
                    _ => None,
                })
                .collect(),
        })
        .collect();
    Zone::build_with_services(&nets, &eps, &svcs)
}

/// Keep the zone and the listeners current: rebuilt on every `changed`
/// notification (the store watcher and the periodic resync send them).
pub async fn run(
    cluster: Arc<Cluster>,
    core: Arc<Core>,
    mut listeners: Listeners,
    changed: Arc<Notify>,
    kernel: Option<Arc<dyn crate::dataplane::Dataplane>>,
) {
    loop {
        match rebuild(&cluster, &core, &mut listeners, kernel.as_deref()).await {
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, "DNS zone not updated"),
        }
        changed.notified().await;
        // Fold a burst of changes into one rebuild (freshness stays well
        // under the 100 ms target).
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

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

async fn rebuild(
    cluster: &Cluster,
    core: &Core,
    listeners: &mut Listeners,
    kernel: Option<&dyn crate::dataplane::Dataplane>,
) -> Result<(), String> {
    let networks = cluster.networks().await.map_err(|e| e.to_string())?;
    let endpoints = cluster.endpoints().await.map_err(|e| e.to_string())?;
    let hosts: Vec<String> = crate::state::hosts::live_hosts(cluster.store.as_ref())
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|h| h.id)
        .collect();
    let services = cluster.services().await.map_err(|e| e.to_string())?;
    let zone = zone_of(&networks, &endpoints, &hosts, &services);
    // The kernel's table before the server's zone: a name leaving both is
    // gone from the kernel first, so the two never disagree on it.
    if let Some(dp) = kernel {
        dp.sync_dns(&kernel_table(&zone, &networks)).map_err(|e| e.to_string())?;
    }
    core.set_zone(zone);
    let gateways: Vec<IpAddr> = networks.iter().filter_map(|n| n.gateway).collect();
    for (ip, e) in listeners.set(&gateways) {
        tracing::warn!(address = %ip, error = %e, "DNS cannot listen on a network's gateway");
    }
    Ok(())
}
