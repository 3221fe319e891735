//! IPsec for real, in two stock-kernel guests (this machine's kernel has no
//! ESP): each runs `trellisd` (etcd in the first), with endpoints on an
//! encrypted and on a plain network. The guests run
//! `vm/ipsec-guest.sh`; this test asserts on what they recorded and on
//! what their captures hold. About 4 minutes under TCG; nextest runs it
//! alone (`.config/nextest.toml`).

use std::time::Duration;

use trellis_integration::vm::{self, Pair};
use trellis_integration::*;

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn encrypted_networks_carry_only_esp_rotate_without_loss_and_fail_closed() {
    require_root();
    let script = vm::available().unwrap().join("ipsec-guest.sh");
    let mut pair = Pair::start(&script, 1024).unwrap();
    pair.wait(Duration::from_secs(900)).unwrap();
    let r = pair.results();
    let logs = pair.logs();
    let get = |k: &str| r.get(k).cloned().unwrap_or_else(|| panic!("no {k} in the results:\n{logs}"));
    let out = pair.out();

    // Both networks work across the two hosts, ping and TCP.
    for k in ["sec_ping_ready", "plain_ping_ready"] {
        assert_eq!(get(k), "1", "{k}\n{logs}");
    }
    for k in ["sec_ping_rc", "plain_ping_rc", "sec_tcp_rc", "plain_tcp_rc"] {
        assert_eq!(get(k), "0", "{k}\n{logs}");
    }
    // The encrypted network's MTU leaves room for ESP; it has its own port.
    let (sec_mtu, plain_mtu): (u32, u32) = (get("sec_mtu").parse().unwrap(), get("plain_mtu").parse().unwrap());
    assert!(sec_mtu + 40 <= plain_mtu, "{sec_mtu} vs {plain_mtu}");
    let port = get("sec_port");
    assert_ne!(port, "4789");

    // On the wire: ESP between the hosts, cleartext VXLAN only for the
    // plain network; its marker is visible, the encrypted one's never.
    let wire = vm::packets(&out.join("g2-wire.pcap")).unwrap();
    let esp = wire.iter().filter(|l| l.contains("ESP(")).count();
    let clear_sec = wire.iter().filter(|l| l.contains(&format!(".{port}: "))).count();
    let plain_vxlan = wire.iter().filter(|l| l.contains(".4789: ")).count();
    assert!(esp >= 10, "ESP packets on the wire: {esp}\n{}", wire.join("\n"));
    assert_eq!(clear_sec, 0, "cleartext VXLAN of the encrypted network on the wire");
    assert!(plain_vxlan >= 10, "plain VXLAN packets: {plain_vxlan}");
    assert_eq!(vm::occurrences(&out.join("g2-wire.pcap"), b"SECRETAA"), 0, "the encrypted network's marker leaked");
    assert!(vm::occurrences(&out.join("g2-wire.pcap"), b"PLAINBBB") > 0, "the plain network's marker is on the wire");
    // Decrypted, the encrypted network's packets reach the other host whole.
    assert!(vm::occurrences(&out.join("g1-sec-inner.pcap"), b"SECRETAA") > 0);

    // A rotation under a continuous ping loses nothing and ends on new SAs.
    assert_eq!(get("rotate_rc"), "0", "{}", std::fs::read_to_string(out.join("rotate.txt")).unwrap_or_default());
    let (sent, got) = get("rotate_ping").split_once('/').map(|(a, b)| (a.to_string(), b.to_string())).unwrap();
    assert_eq!(sent, "300");
    assert_eq!(got, "300", "packets lost during the key rotation\n{logs}");
    assert_eq!(get("tx_epoch"), "2");
    assert_eq!(get("epochs"), "[2]");
    assert_eq!(get("spis_kept"), "0", "every SA was replaced");

    // etcd read directly holds no key: every ring is sealed (under the
    // cluster key both hosts hold, named by its id only).
    let rings = std::fs::read_to_string(out.join("etcd-netkeys.txt")).unwrap_or_default();
    let rings: Vec<serde_json::Value> =
        rings.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rings.len(), 1, "one encrypted network, one ring: {rings:?}");
    let hosts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("hosts.json")).unwrap_or_default()).unwrap();
    for ring in &rings {
        let mut fields: Vec<&str> = ring.as_object().unwrap().keys().map(String::as_str).collect();
        fields.sort_unstable();
        assert_eq!(fields, ["data", "nonce", "sealed"], "{ring}");
        let id = ring["sealed"].as_str().unwrap();
        for h in hosts.as_array().unwrap() {
            assert_eq!(h["capabilities"][format!("cluster_key:{id}")], true, "{h}");
        }
    }

    // The metrics show the key epoch in use, the SAs and the headroom left
    // before the sequence-number trigger (default 2^40 packets).
    let metrics = std::fs::read_to_string(out.join("metrics-g2.txt")).unwrap_or_default();
    let value = |line: &str| -> Option<f64> {
        metrics.lines().find(|l| l.starts_with(line)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
    };
    assert_eq!(value("trellis_esp_key_epoch{network=\"sec\"}"), Some(2.0), "{metrics}");
    assert_eq!(value("trellis_esp_sas{network=\"sec\",direction=\"out\"}"), Some(1.0), "{metrics}");
    assert_eq!(value("trellis_esp_sas{network=\"sec\",direction=\"in\"}"), Some(1.0), "{metrics}");
    let headroom = value("trellis_esp_seq_headroom{network=\"sec\"}").expect("headroom");
    assert!(headroom > 0.0 && headroom < (1u64 << 40) as f64, "some packets were sent on the new SA: {headroom}");
    trellis_integration::promtool_check(&metrics);

    // A restarted agent (kill -9) adopts the SAs: no packet lost, none replaced.
    assert_eq!(get("restart_status_rc"), "0");
    assert_eq!(get("restart_ping"), "200/200", "packets lost across an agent restart\n{logs}");
    assert_eq!(get("restart_spis_changed"), "0", "the restarted agent replaced SAs");

    // An SA deleted by hand stops traffic rather than leaking it...
    assert_ne!(get("sadel_ping_rc"), "0", "traffic went on without its SA");
    let sadel = vm::packets(&out.join("g2-sadel.pcap")).unwrap();
    let leaked: Vec<&String> = sadel.iter().filter(|l| l.contains(&format!("10.99.0.1.{port}: "))).collect();
    // (The only packets to the port are the hand-made cleartext frames of
    // step 4, five of them; the pings of step 3 sent none.)
    assert_eq!(leaked.len(), 5, "{}", sadel.join("\n"));
    // ...cleartext VXLAN for the encrypted network is dropped by the other
    // host while the plain network's (the control) is taken...
    assert_eq!(
        vm::occurrences(&out.join("g1-sec-inner.pcap"), b"INJECTSC"),
        0,
        "cleartext got into the encrypted network"
    );
    assert!(vm::occurrences(&out.join("g1-plain-inner.pcap"), b"INJECTPL") > 0, "the control frame did not arrive");
    let stat = std::fs::read_to_string(out.join("g1-xfrm_stat")).unwrap();
    let mismatch: u64 =
        stat.lines().find_map(|l| l.strip_prefix("XfrmInTmplMismatch").map(|v| v.trim().parse().unwrap())).unwrap();
    assert!(mismatch >= 5, "{stat}");
    // ...and the reconciler restores every policy and SA.
    let repaired: i64 = get("repaired_ms").parse().unwrap();
    assert!(repaired >= 0, "traffic never came back\n{logs}");
    println!("repaired in {repaired} ms after the agent resumed");

    // Protocol 50 filtered on the wire: plain ESP stops; with guest 2
    // asking for ESP in UDP (guest 1 following its record), the encrypted
    // network works again, every packet of it UDP to port 4500, nothing of
    // it in the clear.
    assert_eq!(get("noesp_rc"), "0", "the filter went in\n{logs}");
    assert_ne!(get("esp_filtered_ping_rc"), "0", "plain ESP passed the filter");
    let ready: i64 = get("udp_ready_s").parse().unwrap();
    assert!(ready >= 0, "the encrypted network never came back over ESP in UDP\n{logs}");
    assert_eq!(get("udp_ping"), "20/20", "{logs}");
    assert_eq!(get("udp_tcp_rc"), "0", "TCP over ESP in UDP\n{logs}");
    let wire = vm::packets(&out.join("g2-udp-wire.pcap")).unwrap();
    let encap = wire.iter().filter(|l| l.contains(".4500: UDP-encap: ESP(")).count();
    let bare_esp = wire.iter().filter(|l| l.contains("ESP(") && !l.contains("UDP-encap")).count();
    let clear_sec = wire.iter().filter(|l| l.contains(&format!(".{port}: "))).count();
    assert!(encap >= 40, "ESP in UDP on the wire: {encap}\n{}", wire.join("\n"));
    assert_eq!(bare_esp, 0, "protocol 50 left guest 2");
    assert_eq!(clear_sec, 0, "cleartext VXLAN of the encrypted network on the wire");
    assert_eq!(vm::occurrences(&out.join("g2-udp-wire.pcap"), b"UDPSECRT"), 0, "the marker leaked");
    let states = std::fs::read_to_string(out.join("g2-xfrm-state-udp.txt")).unwrap_or_default();
    assert!(states.contains("encap type espinudp sport 4500 dport 4500"), "{states}");
    let hosts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("hosts-udp.json")).unwrap_or_default()).unwrap();
    let g2 = hosts.as_array().unwrap().iter().find(|h| h["id"] == "g2").unwrap();
    assert_eq!(g2["capabilities"]["esp_in_udp"], true, "{g2}");
}
