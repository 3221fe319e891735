//! The in-kernel DNS fast path on a real veth: `dig` in a "container"
//! namespace asks the gateway, where nothing listens — only the program
//! can answer. Root tests (`--run-ignored all`).

use std::net::Ipv4Addr;
use std::process::Command;

use trellis_ebpf::{AttachMode, CFG_DNS_KERNEL, DNS_TYPE_AAAA, DnsAnswer, DnsKey, EP_DNS_FAST, EndpointInfo};
use trellis_integration::{Netns, require_root};

mod common;

/// `dig +noedns` (a plain query, as libc resolvers send) from `ns`.
fn dig(ns: &Netns, name: &str, extra: &[&str]) -> (bool, String) {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .args(["dig", "+tries=1", "+time=1", "@10.202.0.1", name])
        .args(extra)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn a_queries_for_known_names_are_answered_by_the_program() {
    require_root();
    let mut lab = common::Lab::new([10, 202, 0], AttachMode::Clsact);
    let info = EndpointInfo::new(Ipv4Addr::new(10, 202, 0, 2), [2, 0, 0, 0, 0, 2], 4096)
        .with_dns_at(Ipv4Addr::new(10, 202, 0, 1), lab.host_mac());
    let fast = info.with_flags(info.flags | EP_DNS_FAST);
    let idx = lab.ifindex();
    let (ctr, dp) = (&lab.ctr, &mut lab.dp);
    dp.set_endpoint(idx, fast).unwrap();
    dp.put_dns(DnsKey::new(4096, "web").unwrap(), DnsAnswer::new(Ipv4Addr::new(10, 202, 0, 7), 5)).unwrap();
    dp.put_dns(DnsKey::new(4096, "web.app").unwrap(), DnsAnswer::new(Ipv4Addr::new(10, 202, 0, 7), 5)).unwrap();
    // The characters next to 'A'..'Z' and 'a'..'z' are not letters: only
    // letters are folded ('@' is not '`', '[' is not '{').
    dp.put_dns(DnsKey::new(4096, "q@r[s`t{z").unwrap(), DnsAnswer::new(Ipv4Addr::new(10, 202, 0, 8), 5)).unwrap();
    // Another network's name: never answered for this endpoint.
    dp.put_dns(DnsKey::new(4097, "db").unwrap(), DnsAnswer::new(Ipv4Addr::new(10, 203, 0, 9), 5)).unwrap();
    // web's IPv6 address (its AAAA), beside its A; web.app has none.
    let web6: std::net::Ipv6Addr = "fd00:202::7".parse().unwrap();
    dp.put_dns(DnsKey::of_type(4096, "web", DNS_TYPE_AAAA).unwrap(), DnsAnswer::new(web6, 5)).unwrap();

    // Off: nobody answers (nothing listens on the gateway).
    let (ok, out) = dig(ctr, "web", &["+noedns"]);
    assert!(!ok, "an answer with the fast path off: {out}");
    dp.set_config(CFG_DNS_KERNEL, true).unwrap();

    // On: the program answers, as the agent's server would.
    for name in ["web", "WeB", "web.app", "web.app."] {
        let (ok, out) = dig(ctr, name, &["+noedns"]);
        assert!(ok, "{name}: {out}");
        assert!(out.contains("status: NOERROR") && out.contains("flags: qr aa rd;"), "{name}: {out}");
        assert!(out.contains("ANSWER: 1,") && out.contains("\tIN\tA\t10.202.0.7"), "{name}: {out}");
        let owner = format!("{}.", name.trim_end_matches('.'));
        assert!(
            out.lines().any(|l| l.starts_with(&owner) && l.ends_with("\t5\tIN\tA\t10.202.0.7")),
            "the answer names the query as asked, TTL 5: {out}"
        );
    }
    // AAAA: the IPv6 address, a 16-byte record, the A query unchanged.
    for name in ["web", "WEB."] {
        let (ok, out) = dig(ctr, name, &["+noedns", "AAAA"]);
        assert!(ok, "{name} AAAA: {out}");
        assert!(
            out.contains("status: NOERROR") && out.contains("flags: qr aa rd;") && out.contains("ANSWER: 1,"),
            "{out}"
        );
        let owner = format!("{}.", name.trim_end_matches('.'));
        assert!(
            out.lines().any(|l| l.starts_with(&owner) && l.ends_with("\t5\tIN\tAAAA\tfd00:202::7")),
            "{name} AAAA: {out}"
        );
        assert!(!out.contains("\tIN\tA\t"), "an A record in the AAAA answer: {out}");
    }
    for name in ["q@r[s`t{z", "Q@R[S`T{Z"] {
        let (ok, out) = dig(ctr, name, &["+noedns"]);
        assert!(ok && out.contains("\tIN\tA\t10.202.0.8"), "{name}: {out}");
    }
    for name in ["q`r{s@t[z", "Q`R{S@T[Z"] {
        let (ok, out) = dig(ctr, name, &["+noedns"]);
        assert!(!ok, "{name} is another name: {out}");
    }
    let answered = dp.dns_stats().unwrap().answered;
    assert!(answered >= 8, "{answered}");
    // The answers are counted as sent to the endpoint (they go straight
    // into its namespace, past this veth's egress program).
    let sent = dp.counters(idx).unwrap().to_packets;
    assert!(sent >= answered, "{sent} packets to the endpoint, {answered} answers");
    // Not for the program: another network's name, an unknown name, AAAA,
    // EDNS queries, TCP — all left to the server (which is not there).
    for (name, extra) in [
        ("db", vec!["+noedns"]),
        ("nope", vec!["+noedns"]),
        ("web.app", vec!["+noedns", "AAAA"]),
        ("web", vec!["+noedns", "MX"]),
        ("web", vec![]),
        ("web", vec!["+noedns", "+tcp"]),
    ] {
        let (ok, out) = dig(ctr, name, &extra);
        assert!(!ok, "{name} {extra:?} was answered: {out}");
    }
    let st = dp.dns_stats().unwrap();
    assert_eq!(st.answered, answered, "{st:?}");
    assert!(st.passed >= 5, "{st:?}");
    // Malformed queries never crash or stall it: the next query is answered.
    let junk = Command::new("nsenter")
        .arg(format!("--net={}", ctr.path().display()))
        .args(["bash", "-c", "printf '\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\xc0\\x0c\\x00\\x01\\x00\\x01' > /dev/udp/10.202.0.1/53; printf '\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x3fab' > /dev/udp/10.202.0.1/53"])
        .status()
        .unwrap();
    assert!(junk.success());
    let (ok, out) = dig(ctr, "web", &["+noedns"]);
    assert!(ok, "{out}");
}
