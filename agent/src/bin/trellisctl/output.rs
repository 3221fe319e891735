//! What trellisctl prints, shared by its subcommands: the JSON form of each
//! object (the integration tests parse it), and the text tables and reports.

use serde_json::{Value, json};
use trellis_plugin_api::proto;

pub fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

pub fn network_json(n: &proto::Network) -> Value {
    json!({
        "id": n.id, "name": n.name, "subnet": n.subnet, "gateway": n.gateway,
        "subnet6": (!n.subnet6.is_empty()).then_some(&n.subnet6),
        "gateway6": (!n.gateway6.is_empty()).then_some(&n.gateway6), "vni": n.vni,
        "mtu": n.mtu, "attachable": n.attachable, "internal": n.internal, "encrypted": n.encrypted,
        "labels": n.labels, "created_unix": n.created_unix, "bridge": n.bridge, "endpoints": n.endpoints,
        "vxlan_port": (n.vxlan_port != 0).then_some(n.vxlan_port),
        "key": n.key.as_ref().map(|k| json!({
            "tx_epoch": k.tx_epoch, "epochs": k.epochs, "rotation": k.rotation, "acks": k.acks,
        })),
    })
}

pub fn endpoint_json(e: &proto::Endpoint) -> Value {
    let kind = proto::EndpointKind::try_from(e.kind)
        .map(|k| k.as_str_name().trim_start_matches("ENDPOINT_KIND_").to_lowercase())
        .unwrap_or_default();
    json!({
        "id": e.id, "name": e.name, "network": e.network, "network_id": e.network_id, "host": e.host,
        "address": e.address, "gateway": e.gateway,
        "address6": (!e.address6.is_empty()).then_some(&e.address6),
        "gateway6": (!e.gateway6.is_empty()).then_some(&e.gateway6), "mac": e.mac, "mtu": e.mtu, "netns": e.netns,
        "ifname": e.ifname, "host_ifname": e.host_ifname, "labels": e.labels, "kind": kind,
        "managed_netns": e.managed_netns, "container_id": e.container_id, "aliases": e.aliases,
        "ports": e.ports.iter().map(|p| json!({
            "host_ip": p.host_ip, "host_port": p.host_port, "container_port": p.container_port, "protocol": p.protocol,
        })).collect::<Vec<_>>(),
        "ready": e.ready,
    })
}

/// `ready` (takes new connections), `draining` (detached, keeps the open
/// ones for a while) or `unready` (its engine says it is not healthy).
pub fn backend_state(b: &proto::ServiceBackend) -> &'static str {
    match (b.ready, b.draining) {
        (false, _) => "unready",
        (true, true) => "draining",
        (true, false) => "ready",
    }
}

/// `2/3`: the backends taking new connections, of all.
pub fn backends_text(s: &proto::Service) -> String {
    let ready = s.backends.iter().filter(|b| backend_state(b) == "ready").count();
    format!("{ready}/{}", s.backends.len())
}

pub fn service_json(s: &proto::Service) -> Value {
    json!({
        "name": s.name, "network": s.network, "network_id": s.network_id, "mode": s.mode, "vip": s.vip, "vip6": s.vip6,
        "ports": s.ports.iter().map(|p| json!({"port": p.port, "protocol": p.protocol, "target": p.target})).collect::<Vec<_>>(),
        "selector": s.selector,
        "backends": s.backends.iter().map(|b| json!({
            "endpoint": b.endpoint, "endpoint_id": b.endpoint_id, "ip": b.ip, "host": b.host, "programmed": b.programmed,
            "ready": b.ready, "draining": b.draining, "state": backend_state(b),
        })).collect::<Vec<_>>(),
        "created_unix": s.created_unix, "selections": s.selections, "resets": s.resets,
        "publish": s.publish.iter().map(|p| json!({
            "host_port": p.host_port, "port": p.port, "protocol": p.protocol, "mode": p.mode,
        })).collect::<Vec<_>>(),
    })
}

pub fn host_json(h: &proto::Host) -> Value {
    json!({
        "id": h.id, "hostname": h.hostname, "underlay": h.underlay, "vtep_mac": h.vtep_mac,
        "vxlan_port": h.vxlan_port, "version": h.version, "started_unix": h.started_unix,
        "local": h.local, "endpoints": h.endpoints, "tunnel": h.tunnel,
        "last_seen_ms": h.last_seen_ms,
        "capabilities": h.capabilities, "probe": h.probe, "probe_rtt_us": h.probe_rtt_us,
        "tunnel_probe_rtt_us": h.tunnel_probe_rtt_us, "kept": h.kept,
        "underlay_mtu": h.underlay_mtu, "path_mtu": h.path_mtu, "tunnel_mtu": h.tunnel_mtu,
    })
}

pub fn status_json(s: &proto::StatusResponse, healthy: bool) -> Value {
    json!({
        "healthy": healthy, "host_id": s.host_id, "hostname": s.hostname, "version": s.version,
        "store": {"backend": s.store_backend, "ok": s.store_ok, "error": s.store_error},
        "reconcile": {
            "passes": s.reconcile_passes, "last_unix_ms": s.last_reconcile_unix_ms, "errors": s.reconcile_errors,
            "last_us": s.last_reconcile_us, "last_full_us": s.last_full_reconcile_us,
        },
        "networks": s.networks, "local_endpoints": s.local_endpoints, "capabilities": s.capabilities,
        "esp_unsupported": (!s.esp_unsupported.is_empty()).then_some(&s.esp_unsupported),
        "docker": {"networks": s.docker_networks, "endpoints": s.docker_endpoints},
        "peers": {"count": s.peers, "unreachable": s.unreachable_peers},
        "datapath": {"services": s.datapath_services, "backends": s.datapath_backends, "subnets": s.datapath_subnets, "published": s.datapath_published},
        "mesh_ports_held": s.mesh_ports_held,
        "mesh": {
            "datapath": s.mesh_datapath,
            "nftables_ports": s.mesh_ports_nft,
            "addresses": s.mesh_addresses.iter().map(|a| json!({"network": a.network, "address": a.address, "interface": a.interface})).collect::<Vec<_>>(),
            "warnings": s.mesh_warnings,
        },
    })
}

/// A monitor event, printed compact (one object per line).
pub fn event_json(e: &proto::FlowEvent) -> Value {
    json!({
        "unix_ms": e.unix_ms, "endpoint": e.endpoint, "endpoint_name": e.endpoint_name,
        "network": e.network, "interface": e.interface, "verdict": e.verdict, "reason": e.reason,
        "protocol": e.protocol, "src": e.src, "dst": e.dst, "src_port": e.src_port,
        "dst_port": e.dst_port,
    })
}

pub fn ports_text(s: &proto::Service) -> String {
    s.ports
        .iter()
        .map(|p| {
            if p.port == p.target {
                format!("{}/{}", p.port, p.protocol)
            } else {
                format!("{}/{}:{}", p.port, p.protocol, p.target)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A service's ports on the routing mesh: `8080:80/tcp,30001:53/udp(host)`,
/// `-` for none.
pub fn publish_text(s: &proto::Service) -> String {
    if s.publish.is_empty() {
        return "-".into();
    }
    s.publish
        .iter()
        .map(|p| {
            let mode = if p.mode == "host" { "(host)" } else { "" };
            format!("{}:{}/{}{mode}", p.host_port, p.port, p.protocol)
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A service's VIP (both, on a dual-stack network), `-` for none (dnsrr
/// mode).
pub fn vip_text(s: &proto::Service) -> String {
    match (s.vip.is_empty(), s.vip6.is_empty()) {
        (true, _) => "-".to_string(),
        (false, true) => s.vip.clone(),
        (false, false) => format!("{},{}", s.vip, s.vip6),
    }
}

pub fn network_table(list: &[proto::Network]) {
    println!("{:<20} {:<16} {:<18} {:<8} {:<6} {:<9} FLAGS", "NAME", "ID", "SUBNET", "VNI", "MTU", "ENDPOINTS");
    for n in list {
        let flags: Vec<&str> = [(n.attachable, "attachable"), (n.internal, "internal"), (n.encrypted, "encrypted")]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, f)| *f)
            .collect();
        println!(
            "{:<20} {:<16} {:<18} {:<8} {:<6} {:<9} {}",
            n.name,
            n.id,
            if n.subnet6.is_empty() { n.subnet.clone() } else { format!("{},{}", n.subnet, n.subnet6) },
            n.vni,
            n.mtu,
            n.endpoints,
            flags.join(",")
        );
    }
}

pub fn endpoint_table(list: &[proto::Endpoint]) {
    println!("{:<20} {:<16} {:<16} {:<18} {:<17} {:<16} NETNS", "NAME", "ID", "NETWORK", "ADDRESS", "MAC", "HOST");
    for e in list {
        println!(
            "{:<20} {:<16} {:<16} {:<18} {:<17} {:<16} {}",
            e.name, e.id, e.network, e.address, e.mac, e.host, e.netns
        );
    }
}

pub fn service_table(list: &[proto::Service]) {
    println!(
        "{:<20} {:<16} {:<6} {:<16} {:<20} {:<20} BACKENDS",
        "NAME", "NETWORK", "MODE", "VIP", "PORTS", "PUBLISHED"
    );
    for s in list {
        println!(
            "{:<20} {:<16} {:<6} {:<16} {:<20} {:<20} {}",
            s.name,
            s.network,
            s.mode,
            vip_text(s),
            ports_text(s),
            publish_text(s),
            backends_text(s)
        );
    }
}

pub fn host_table(list: &[proto::Host]) {
    println!(
        "{:<18} {:<16} {:<16} {:<9} {:<10} {:<10} {:<22} {:<19} TUNNEL",
        "ID", "HOSTNAME", "UNDERLAY", "ENDPOINTS", "UP", "LAST SEEN", "PROBE", "MTU (PATH/TUNNEL)"
    );
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    for h in list {
        let id = if h.local { format!("{} *", h.id) } else { h.id.clone() };
        let up = format!("{}s", (now - h.started_unix).max(0));
        let seen = if h.kept {
            "lease gone, kept".to_string()
        } else if h.last_seen_ms < 0 {
            "?".to_string()
        } else {
            format!("{:.1}s ago", h.last_seen_ms as f64 / 1e3)
        };
        println!(
            "{:<18} {:<16} {:<16} {:<9} {:<10} {:<10} {:<22} {:<19} {}",
            id,
            h.hostname,
            h.underlay,
            h.endpoints,
            up,
            seen,
            probe_text(h),
            mtu_text(h),
            h.tunnel
        );
    }
}

/// A host's MTU column: what it advertises, and what the path to it
/// carries as probed, over the underlay and through the tunnel ("?" until
/// a search ends; nothing for this host itself).
fn mtu_text(h: &proto::Host) -> String {
    let known = |m: u32| if m == 0 { "?".to_string() } else { m.to_string() };
    let own = known(h.underlay_mtu);
    if h.local { own } else { format!("{own} ({}/{})", known(h.path_mtu), known(h.tunnel_mtu)) }
}

/// A host's probe column: the round trip (underlay/tunnel) when it answers,
/// the agent's word for its state otherwise.
fn probe_text(h: &proto::Host) -> String {
    let ok = h.probe_state() == proto::ProbeState::ProbeOk;
    if ok && h.tunnel_probe_rtt_us > 0 {
        format!("ok {:.2}/{:.2} ms", h.probe_rtt_us as f64 / 1e3, h.tunnel_probe_rtt_us as f64 / 1e3)
    } else if ok {
        format!("ok {:.2} ms", h.probe_rtt_us as f64 / 1e3)
    } else {
        h.probe.clone()
    }
}

/// The text form of `status`.
pub fn status_text(s: &proto::StatusResponse) {
    println!("host        {} ({})", s.host_id, s.hostname);
    println!("version     {}", s.version);
    println!(
        "store       {} {}",
        s.store_backend,
        if s.store_ok { "ok".to_string() } else { format!("UNAVAILABLE: {}", s.store_error) }
    );
    println!(
        "reconcile   {} passes, {} errors in the last; last full pass {:.1} ms",
        s.reconcile_passes,
        s.reconcile_errors.len(),
        s.last_full_reconcile_us as f64 / 1e3
    );
    for e in &s.reconcile_errors {
        println!("            {e}");
    }
    if s.unreachable_peers.is_empty() {
        println!("peers       {} (every tunnel endpoint answers probes)", s.peers);
    } else {
        println!("peers       {}, UNREACHABLE: {}", s.peers, s.unreachable_peers.join(", "));
    }
    println!("networks    {}", s.networks);
    println!("endpoints   {} on this host", s.local_endpoints);
    if s.docker_networks > 0 || s.docker_endpoints > 0 {
        println!("docker      {} networks, {} endpoints", s.docker_networks, s.docker_endpoints);
    }
    if s.capabilities.get("ebpf").copied().unwrap_or(false) {
        println!(
            "datapath    {} subnets, {} service ports, {} backends, {} published on the mesh",
            s.datapath_subnets, s.datapath_services, s.datapath_backends, s.datapath_published
        );
    }
    if s.mesh_datapath == "nftables" {
        println!("mesh        nftables (SNAT: backends see the host's address, not the client's; eBPF is off here)");
    } else {
        println!("mesh        eBPF (backends see the client's own address)");
        if !s.mesh_ports_nft.is_empty() {
            println!(
                "            through nftables instead (SNAT: a backend runs on a host without eBPF): {}",
                s.mesh_ports_nft.join(", ")
            );
        }
    }
    for a in &s.mesh_addresses {
        println!("            this host's address on network {}: {} ({})", a.network, a.address, a.interface);
    }
    for w in &s.mesh_warnings {
        println!("            WARNING: {w}");
    }
    for held in &s.mesh_ports_held {
        println!("mesh        not published here: {held}");
    }
    let mut caps: Vec<_> =
        s.capabilities.iter().map(|(k, v)| format!("{k}={}", if *v { "yes" } else { "no" })).collect();
    caps.sort();
    println!("kernel      {}", caps.join(" "));
    if !s.esp_unsupported.is_empty() {
        println!("            esp: {} (encrypted networks are refused here)", s.esp_unsupported);
    }
}

/// The text form of a monitor event, one line.
pub fn event_text(e: &proto::FlowEvent) {
    let port = |p: u32| if p == 0 { String::new() } else { format!(":{p}") };
    println!(
        "{:<8} {:<12} {:<12} {:<5} {}{} -> {}{} {}",
        e.verdict,
        if e.endpoint_name.is_empty() { &e.interface } else { &e.endpoint_name },
        e.network,
        e.protocol,
        e.src,
        port(e.src_port),
        e.dst,
        port(e.dst_port),
        e.reason
    );
}
