//! Egress and isolation rules in nftables, built as plain values.
//!
//! One table, `inet trellis`, in the agent's host namespace:
//! * `postrouting` (nat): traffic of a non-internal network leaving through
//!   anything but its own bridge is masqueraded.
//! * `forward` (filter): an internal network forwards nothing in or out;
//!   no network forwards into another Trellis network.
//! * `input` (filter): an internal network's endpoints reach only their
//!   gateway address on the host.
//! * `prerouting` (nat), with the agent's DNS on: an endpoint's DNS query
//!   to any other resolver is redirected to its gateway, where Trellis
//!   answers (names resolve even where an engine wrote its own resolver;
//!   Docker's embedded DNS forwards to the host's resolvers from inside the
//!   container). Connection tracking puts the reply's source back.
//! * `raw_prerouting` / `raw_output` (filter, before connection tracking),
//!   when the eBPF program does that redirect instead (nothing to undo): DNS
//!   over UDP to and from each gateway is not tracked. A tracked query costs
//!   a conntrack entry per client port, and parallel A/AAAA queries from one
//!   socket race to insert theirs — the lost insert is the 5 s DNS delay of
//!   kubernetes#56903.
//!
//! The whole table is replaced atomically when it differs. Every rule
//! carries the fingerprint of the desired rules as its comment, so the
//! reconciler can tell a missing or altered rule from one glance at the
//! installed table.

use std::borrow::Cow;
use std::net::IpAddr;

use ipnet::IpNet;
use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{Chain, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::model::BRIDGE_PREFIX;

pub const TABLE: &str = "trellis";

/// One network as the egress rules need it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EgressNet {
    pub bridge: String,
    pub subnet: IpNet,
    pub gateway: Option<IpAddr>,
    pub internal: bool,
}

/// The desired egress rules of a host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressRules {
    pub nets: Vec<EgressNet>,
    /// Redirect endpoints' DNS queries to their gateway.
    pub dns_intercept: bool,
    /// Keep DNS over UDP to and from the gateways out of connection
    /// tracking (never with `dns_intercept`, whose NAT needs it).
    pub dns_notrack: bool,
    /// Turn IPv4 forwarding on (`/proc/sys/net/ipv4/ip_forward = 1`) right
    /// after the table is in: the host routes between the networks'
    /// bridges and the uplink, which the masquerade rules assume. Never
    /// turned off. It is a host-wide setting, not a rule: not in the
    /// [`EgressRules::fingerprint`], written whenever the rules are
    /// applied, and a failure to write it fails the apply.
    pub forwarding: bool,
}

/// 64-bit FNV-1a: a stable fingerprint, not a security measure.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

fn s(v: impl Into<String>) -> Expression<'static> {
    Expression::String(Cow::Owned(v.into()))
}
fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}
fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: Cow::Borrowed(protocol),
        field: Cow::Borrowed(field),
    })))
}
fn prefix(net: &IpNet) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(net.network().to_string())),
        len: net.prefix_len() as u32,
    }))
}
fn m(left: Expression<'static>, op: Operator, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}
fn family_of(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "ip" } else { "ip6" }
}

impl EgressRules {
    pub fn new(mut nets: Vec<EgressNet>) -> EgressRules {
        nets.sort();
        nets.dedup();
        EgressRules { nets, dns_intercept: false, dns_notrack: false, forwarding: false }
    }

    /// The rules, as (chain, statements).
    fn rules(&self) -> Vec<(&'static str, Vec<Statement<'static>>)> {
        let mut out = Vec::new();
        for n in &self.nets {
            let fam = family_of(&n.subnet.network());
            if let (true, Some(IpAddr::V4(gw))) = (self.dns_intercept, n.gateway) {
                for proto in ["udp", "tcp"] {
                    out.push((
                        "prerouting",
                        vec![
                            m(meta(MetaKey::Iifname), Operator::EQ, s(&n.bridge)),
                            m(payload("ip", "saddr"), Operator::EQ, prefix(&n.subnet)),
                            m(payload("ip", "daddr"), Operator::NEQ, s(gw.to_string())),
                            m(payload(proto, "dport"), Operator::EQ, Expression::Number(53)),
                            Statement::DNAT(Some(nftables::stmt::NAT {
                                addr: Some(s(gw.to_string())),
                                family: Some(nftables::stmt::NATFamily::IP),
                                port: None,
                                flags: None,
                            })),
                        ],
                    ));
                }
            }
            if let (true, false, Some(IpAddr::V4(gw))) = (self.dns_notrack, self.dns_intercept, n.gateway) {
                // Queries in from the bridge, answers out to it.
                for (chain, dev, addr, port) in [
                    ("raw_prerouting", MetaKey::Iifname, "daddr", "dport"),
                    ("raw_output", MetaKey::Oifname, "saddr", "sport"),
                ] {
                    out.push((
                        chain,
                        vec![
                            m(meta(dev), Operator::EQ, s(&n.bridge)),
                            m(payload("ip", addr), Operator::EQ, s(gw.to_string())),
                            m(payload("udp", port), Operator::EQ, Expression::Number(53)),
                            Statement::Notrack,
                        ],
                    ));
                }
            }
            if n.internal {
                out.push((
                    "forward",
                    vec![
                        m(meta(MetaKey::Iifname), Operator::EQ, s(&n.bridge)),
                        m(meta(MetaKey::Oifname), Operator::NEQ, s(&n.bridge)),
                        Statement::Drop(None),
                    ],
                ));
                out.push((
                    "forward",
                    vec![
                        m(meta(MetaKey::Oifname), Operator::EQ, s(&n.bridge)),
                        m(meta(MetaKey::Iifname), Operator::NEQ, s(&n.bridge)),
                        Statement::Drop(None),
                    ],
                ));
                let mut input = vec![m(meta(MetaKey::Iifname), Operator::EQ, s(&n.bridge))];
                if let Some(gw) = n.gateway {
                    input.push(m(payload(family_of(&gw), "daddr"), Operator::NEQ, s(gw.to_string())));
                }
                input.push(Statement::Drop(None));
                out.push(("input", input));
            } else {
                out.push((
                    "forward",
                    vec![
                        m(meta(MetaKey::Iifname), Operator::EQ, s(&n.bridge)),
                        m(meta(MetaKey::Oifname), Operator::EQ, s(format!("{BRIDGE_PREFIX}*"))),
                        m(meta(MetaKey::Oifname), Operator::NEQ, s(&n.bridge)),
                        Statement::Drop(None),
                    ],
                ));
                out.push((
                    "postrouting",
                    vec![
                        m(payload(fam, "saddr"), Operator::EQ, prefix(&n.subnet)),
                        m(meta(MetaKey::Oifname), Operator::NEQ, s(&n.bridge)),
                        Statement::Masquerade(None),
                    ],
                ));
            }
        }
        out
    }

    /// `<hash>/<number of rules>`: what [`observed_fingerprint`] reads back
    /// from a table holding exactly these rules.
    pub fn fingerprint(&self) -> String {
        let rules = self.rules();
        let text =
            serde_json::to_string(&rules.iter().map(|(c, st)| (c, st)).collect::<Vec<_>>()).expect("rules serialize");
        format!("{:016x}/{}", fnv1a(text.as_bytes()), rules.len())
    }

    /// The nft batch that replaces the table with these rules atomically.
    pub fn batch(&self) -> Nftables<'static> {
        let fp = self.fingerprint();
        let hash = fp.split('/').next().unwrap_or_default().to_string();
        let table = || Table { family: NfFamily::INet, name: Cow::Borrowed(TABLE), handle: None };
        let mut b = Batch::new();
        // `add` is idempotent, so the delete below never fails on a fresh host.
        b.add(NfListObject::Table(table()));
        b.delete(NfListObject::Table(table()));
        b.add(NfListObject::Table(table()));
        for (name, ty, hook, prio) in [
            ("prerouting", NfChainType::NAT, NfHook::Prerouting, -100),
            ("postrouting", NfChainType::NAT, NfHook::Postrouting, 100),
            ("forward", NfChainType::Filter, NfHook::Forward, 0),
            ("input", NfChainType::Filter, NfHook::Input, 0),
            // Before connection tracking (its priority is -200).
            ("raw_prerouting", NfChainType::Filter, NfHook::Prerouting, -300),
            ("raw_output", NfChainType::Filter, NfHook::Output, -300),
        ] {
            b.add(NfListObject::Chain(Chain {
                family: NfFamily::INet,
                table: Cow::Borrowed(TABLE),
                name: Cow::Borrowed(name),
                _type: Some(ty),
                hook: Some(hook),
                prio: Some(prio),
                policy: Some(NfChainPolicy::Accept),
                ..Chain::default()
            }));
        }
        for (chain, expr) in self.rules() {
            b.add(NfListObject::Rule(Rule {
                family: NfFamily::INet,
                table: Cow::Borrowed(TABLE),
                chain: Cow::Borrowed(chain),
                expr: Cow::Owned(expr),
                handle: None,
                index: None,
                comment: Some(Cow::Owned(format!("trellis:{hash}"))),
            }));
        }
        b.to_nftables()
    }
}

/// The batch as `nft -j` reads it. The nftables crate (0.6) writes the
/// `notrack` statement as the bare string `"notrack"`, which nft refuses
/// ("expected object"): nft's form, `{"notrack": null}`, is put in (the
/// crate reads that form back).
pub fn to_nft_json(batch: &Nftables<'_>) -> Result<String, serde_json::Error> {
    let mut v = serde_json::to_value(batch)?;
    fix_statements(&mut v, &|st| {
        if st.as_str() == Some("notrack") {
            *st = serde_json::json!({ "notrack": null });
        }
    });
    serde_json::to_string(&v)
}

/// Applies `fix` to every statement of every rule in an nft JSON document.
fn fix_statements(v: &mut serde_json::Value, fix: &dyn Fn(&mut serde_json::Value)) {
    let Some(objects) = v.get_mut("nftables").and_then(|o| o.as_array_mut()) else { return };
    for obj in objects {
        // Rules appear bare (a listing) or under a command (a batch).
        let rule = match obj.get_mut("rule") {
            Some(r) => Some(r),
            None => obj.as_object_mut().and_then(|o| o.values_mut().next()).and_then(|cmd| cmd.get_mut("rule")),
        };
        if let Some(exprs) = rule.and_then(|r| r.get_mut("expr")).and_then(|e| e.as_array_mut()) {
            exprs.iter_mut().for_each(fix);
        }
    }
}

/// The fingerprint of an installed table (`None` when it is absent): the
/// common comment hash of its rules and their number, or `mixed/N` when the
/// rules do not all carry the same one.
pub fn observed_fingerprint(table: &Nftables<'_>) -> Option<String> {
    let mut table_seen = false;
    let mut hashes = std::collections::BTreeSet::new();
    let mut count = 0usize;
    for obj in table.objects.iter() {
        match obj {
            nftables::schema::NfObject::ListObject(NfListObject::Table(t)) if t.name == TABLE => table_seen = true,
            nftables::schema::NfObject::ListObject(NfListObject::Rule(r)) if r.table == TABLE => {
                count += 1;
                let c = r.comment.as_deref().unwrap_or("");
                hashes.insert(c.strip_prefix("trellis:").unwrap_or("foreign").to_string());
            }
            _ => {}
        }
    }
    if !table_seen {
        return None;
    }
    let hash = match hashes.len() {
        0 => format!("{:016x}", fnv1a(b"[]")),
        1 => hashes.into_iter().next().expect("one"),
        _ => "mixed".to_string(),
    };
    Some(format!("{hash}/{count}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(bridge: &str, subnet: &str, internal: bool) -> EgressNet {
        let subnet: IpNet = subnet.parse().unwrap();
        EgressNet {
            bridge: bridge.into(),
            subnet,
            gateway: Some(ipnet::IpNet::hosts(&subnet).next().unwrap()),
            internal,
        }
    }

    #[test]
    fn rules_per_network_kind() {
        let r = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false), net("trb-b", "10.2.0.0/24", true)]);
        let rules = r.rules();
        let chains: Vec<_> = rules.iter().map(|(c, _)| *c).collect();
        // The internal network sorts after the open one (by bridge name).
        assert_eq!(chains, ["forward", "postrouting", "forward", "forward", "input"]);
        let json = serde_json::to_string(&r.batch()).unwrap();
        assert!(json.contains("\"masquerade\""), "{json}");
        assert!(json.contains("10.1.0.0"));
        assert!(!json.contains("\"10.2.0.0\""), "an internal network is never masqueraded: {json}");
        assert!(json.contains("trb-*"));
    }

    #[test]
    fn dns_queries_to_other_resolvers_go_to_the_gateway() {
        let mut r = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false), net("trb-b", "10.2.0.0/24", true)]);
        let without = r.fingerprint();
        r.dns_intercept = true;
        let rules = r.rules();
        let pre: Vec<_> = rules.iter().filter(|(c, _)| *c == "prerouting").collect();
        assert_eq!(pre.len(), 4, "udp and tcp, for each network (internal ones too)");
        assert_ne!(r.fingerprint(), without, "turning interception on changes the table");
        let json = serde_json::to_string(&r.batch()).unwrap();
        assert!(json.contains("\"dnat\"") && json.contains("\"prerouting\""), "{json}");
        assert!(json.contains("\"dport\"") && json.contains("53"));
    }

    #[test]
    fn dns_to_the_gateways_is_untracked_unless_nat_needs_it() {
        let mut r = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false), net("trb-b", "10.2.0.0/24", true)]);
        let without = r.fingerprint();
        r.dns_notrack = true;
        let rules = r.rules();
        let raw: Vec<_> = rules.iter().filter(|(c, _)| c.starts_with("raw_")).collect();
        // Both directions for each network, the internal one included.
        assert_eq!(raw.len(), 4, "{raw:?}");
        let json = serde_json::to_string(&r.batch()).unwrap();
        assert!(json.contains("\"notrack\""), "{json}");
        for gw in ["10.1.0.1", "10.2.0.1"] {
            assert!(json.contains(&format!("\"{gw}\"")), "{gw}: {json}");
        }
        assert!(json.contains("\"sport\"") && json.contains("\"dport\""), "{json}");
        assert!(json.contains("\"prio\":-300"), "the raw chains run before conntrack: {json}");
        assert_ne!(r.fingerprint(), without);
        // With the nftables DNAT of queries to other resolvers, replies need
        // their conntrack entry to get the resolver's address back.
        r.dns_intercept = true;
        assert!(r.rules().iter().all(|(c, _)| !c.starts_with("raw_")));
    }

    #[test]
    fn notrack_is_written_and_read_as_nft_does() {
        let mut r = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false)]);
        r.dns_notrack = true;
        let text = to_nft_json(&r.batch()).unwrap();
        assert!(text.contains("{\"notrack\":null}") && !text.contains("\"notrack\"]"), "{text}");
        // A listing as nft 1.0 prints it (two rules, one with notrack).
        let listed = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "inet", "name": "trellis", "handle": 1}},
            {"chain": {"family": "inet", "table": "trellis", "name": "raw_output", "handle": 1, "type": "filter", "hook": "output", "prio": -300, "policy": "accept"}},
            {"rule": {"family": "inet", "table": "trellis", "chain": "raw_output", "handle": 2, "comment": "trellis:abc",
              "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "sport"}}, "right": 53}}, {"notrack": null}]}},
            {"rule": {"family": "inet", "table": "trellis", "chain": "raw_output", "handle": 3, "comment": "trellis:abc",
              "expr": [{"drop": null}]}}]}"#;
        let set: Nftables<'_> = serde_json::from_str(listed).unwrap();
        assert_eq!(observed_fingerprint(&set).as_deref(), Some("abc/2"));
    }

    #[test]
    fn fingerprint_tracks_content_and_order_independent_input() {
        let a = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false), net("trb-b", "10.2.0.0/24", true)]);
        let b = EgressRules::new(vec![net("trb-b", "10.2.0.0/24", true), net("trb-a", "10.1.0.0/24", false)]);
        assert_eq!(a.fingerprint(), b.fingerprint());
        let c = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", true), net("trb-b", "10.2.0.0/24", true)]);
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert!(a.fingerprint().ends_with("/5"));
        assert_eq!(EgressRules::default().fingerprint(), format!("{:016x}/0", fnv1a(b"[]")));
    }

    #[test]
    fn observed_fingerprint_reads_back_the_batch() {
        let r = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false)]);
        // The batch as nft would list it back: table, chains, rules.
        let listed: Nftables<'_> = serde_json::from_value(serde_json::json!({"nftables": [
            {"table": {"family": "inet", "name": "trellis", "handle": 1}},
            {"rule": {"family": "inet", "table": "trellis", "chain": "forward", "handle": 4, "expr": [], "comment": format!("trellis:{}", r.fingerprint().split('/').next().unwrap())}},
            {"rule": {"family": "inet", "table": "trellis", "chain": "postrouting", "handle": 5, "expr": [], "comment": format!("trellis:{}", r.fingerprint().split('/').next().unwrap())}},
        ]}))
        .unwrap();
        assert_eq!(observed_fingerprint(&listed), Some(r.fingerprint()));
        let missing_rule: Nftables<'_> = serde_json::from_value(serde_json::json!({"nftables": [
            {"table": {"family": "inet", "name": "trellis", "handle": 1}},
            {"rule": {"family": "inet", "table": "trellis", "chain": "forward", "handle": 4, "expr": [], "comment": format!("trellis:{}", r.fingerprint().split('/').next().unwrap())}},
        ]}))
        .unwrap();
        assert_ne!(observed_fingerprint(&missing_rule), Some(r.fingerprint()));
        let empty: Nftables<'_> = serde_json::from_value(serde_json::json!({"nftables": []})).unwrap();
        assert_eq!(observed_fingerprint(&empty), None);
    }

    #[test]
    fn forwarding_is_no_rule_and_leaves_the_table_as_it_is() {
        let mut r = EgressRules::new(vec![net("trb-a", "10.1.0.0/24", false)]);
        assert!(!r.forwarding, "off unless the desired state asks");
        let (fingerprint, batch) = (r.fingerprint(), to_nft_json(&r.batch()).unwrap());
        r.forwarding = true;
        // A table installed before the flag existed still matches: no
        // reapply on upgrade, and no reapply when only the flag differs.
        assert_eq!(r.fingerprint(), fingerprint);
        assert_eq!(to_nft_json(&r.batch()).unwrap(), batch);
    }
}
