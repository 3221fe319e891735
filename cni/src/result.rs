//! The ADD result, shaped for the negotiated version.

use serde_json::{Value, json};
use trellis_plugin_api::proto;

use crate::conf::Dns;

/// What ADD prints: the host veth and the container interface, the
/// endpoint's address on the container interface, the default route
/// (none on internal networks) and the DNS settings.
pub fn add_result(version: &str, ep: &proto::Endpoint, internal: bool, dns: &Dns) -> Value {
    // (An IPv6-only network's endpoint has its one, IPv6, address here.)
    let v6_only = ep.address.contains(':');
    let mut ip = json!({ "address": ep.address, "interface": 1 });
    if !ep.gateway.is_empty() {
        ip["gateway"] = Value::String(ep.gateway.clone());
    }
    if version == "0.4.0" {
        ip["version"] = Value::String(if v6_only { "6" } else { "4" }.into());
    }
    let mut container = json!({ "name": ep.ifname, "mac": ep.mac, "sandbox": ep.netns });
    if version != "0.4.0" && ep.mtu > 0 {
        container["mtu"] = json!(ep.mtu);
    }
    let default = if v6_only { "::/0" } else { "0.0.0.0/0" };
    let mut routes: Vec<Value> =
        if internal || ep.gateway.is_empty() { vec![] } else { vec![json!({ "dst": default, "gw": ep.gateway })] };
    let mut ips = vec![ip];
    // A dual-stack network's IPv6 address and default route.
    if !ep.address6.is_empty() {
        let mut ip6 = json!({ "address": ep.address6, "interface": 1 });
        if !ep.gateway6.is_empty() {
            ip6["gateway"] = Value::String(ep.gateway6.clone());
            if !internal {
                routes.push(json!({ "dst": "::/0", "gw": ep.gateway6 }));
            }
        }
        if version == "0.4.0" {
            ip6["version"] = Value::String("6".into());
        }
        ips.push(ip6);
    }
    let mut out = json!({
        "cniVersion": version,
        "interfaces": [ { "name": ep.host_ifname }, container ],
        "ips": ips,
        "routes": routes,
    });
    // The configuration's dns section wins; else the agent's resolver.
    let dns = if dns.is_empty() && !ep.dns.is_empty() {
        Dns { nameservers: vec![ep.dns.clone()], ..Dns::default() }
    } else {
        dns.clone()
    };
    if !dns.is_empty() {
        out["dns"] = serde_json::to_value(&dns).expect("dns serializes");
    }
    out
}

/// The addresses (CIDR) of a previous result, for CHECK.
pub fn prev_addresses(prev: &Value) -> Vec<String> {
    prev.get("ips")
        .and_then(Value::as_array)
        .map(|ips| ips.iter().filter_map(|i| i.get("address").and_then(Value::as_str).map(str::to_string)).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> proto::Endpoint {
        proto::Endpoint {
            id: "e1".into(),
            address: "10.1.0.5/24".into(),
            gateway: "10.1.0.1".into(),
            mac: "02:00:00:00:00:01".into(),
            mtu: 1450,
            netns: "/var/run/netns/c1".into(),
            ifname: "eth0".into(),
            host_ifname: "trv-e1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn result_per_version() {
        let r = add_result("1.1.0", &ep(), false, &Dns::default());
        assert_eq!(r["cniVersion"], "1.1.0");
        assert_eq!(r["interfaces"][0]["name"], "trv-e1");
        assert!(r["interfaces"][0].get("sandbox").is_none(), "the host side has no sandbox");
        assert_eq!(r["interfaces"][1]["sandbox"], "/var/run/netns/c1");
        assert_eq!(r["interfaces"][1]["mtu"], 1450);
        assert_eq!(r["ips"][0], json!({"address":"10.1.0.5/24","gateway":"10.1.0.1","interface":1}));
        assert_eq!(r["routes"], json!([{"dst":"0.0.0.0/0","gw":"10.1.0.1"}]));
        assert!(r.get("dns").is_none());
        let mut with_dns = ep();
        with_dns.dns = "10.1.0.1".into();
        assert_eq!(add_result("1.1.0", &with_dns, false, &Dns::default())["dns"], json!({"nameservers":["10.1.0.1"]}));
        let old = add_result("0.4.0", &ep(), false, &Dns::default());
        assert_eq!(old["ips"][0]["version"], "4", "0.4.0 results carry the IP version");
        assert!(old["interfaces"][1].get("mtu").is_none());
    }

    #[test]
    fn a_dual_stack_endpoint_reports_both_addresses_and_default_routes() {
        let dual = proto::Endpoint { address6: "fd00:1::5/64".into(), gateway6: "fd00:1::1".into(), ..ep() };
        let r = add_result("1.1.0", &dual, false, &Dns::default());
        assert_eq!(r["ips"][1], json!({"address":"fd00:1::5/64","gateway":"fd00:1::1","interface":1}));
        assert_eq!(r["routes"], json!([{"dst":"0.0.0.0/0","gw":"10.1.0.1"},{"dst":"::/0","gw":"fd00:1::1"}]));
        assert_eq!(add_result("0.4.0", &dual, false, &Dns::default())["ips"][1]["version"], "6");
        assert_eq!(add_result("1.1.0", &dual, true, &Dns::default())["routes"], json!([]), "internal: no routes");
        assert_eq!(prev_addresses(&r), vec!["10.1.0.5/24", "fd00:1::5/64"]);
    }

    #[test]
    fn an_ipv6_only_endpoint_has_one_ipv6_address_and_an_ipv6_default_route() {
        let only6 = proto::Endpoint { address: "fd00:9::5/64".into(), gateway: "fd00:9::1".into(), ..ep() };
        let r = add_result("1.1.0", &only6, false, &Dns::default());
        assert_eq!(r["ips"], json!([{"address":"fd00:9::5/64","gateway":"fd00:9::1","interface":1}]));
        assert_eq!(r["routes"], json!([{"dst":"::/0","gw":"fd00:9::1"}]));
        let old = add_result("0.4.0", &only6, false, &Dns::default());
        assert_eq!(old["ips"][0]["version"], "6");
    }

    #[test]
    fn internal_networks_get_no_default_route_and_dns_passes_through() {
        let dns = Dns { nameservers: vec!["10.1.0.1".into()], search: vec!["app".into()], ..Dns::default() };
        let r = add_result("1.0.0", &ep(), true, &dns);
        assert_eq!(r["routes"], json!([]));
        assert_eq!(r["dns"], json!({"nameservers":["10.1.0.1"],"search":["app"]}));
        assert_eq!(prev_addresses(&r), vec!["10.1.0.5/24"]);
        assert!(prev_addresses(&json!({})).is_empty());
    }
}
