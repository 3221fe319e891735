//! The endpoint program on a real veth in namespaces this test makes: a
//! "host" and a "container". Root tests (`--run-ignored all`), both attach
//! modes.

use std::process::Command;

use trellis_ebpf::{AttachMode, DropReason, EndpointInfo};
use trellis_integration::{ping, require_root};

mod common;

fn check(mode: AttachMode) {
    require_root();
    let net = [10, 201, 0];
    let mut lab = common::Lab::new(net, mode);
    let idx = lab.ifindex();
    lab.dp.set_endpoint(idx, EndpointInfo::new(common::Lab::ip(net, 2), [2, 0, 0, 0, 0, 2], 4096)).unwrap();
    // Flush the host's ARP entry so the next ping ARPs again through the program.
    let _ = lab.host.ip(&["neigh", "flush", "dev", &lab.hv]);

    // The real endpoint passes and is counted.
    assert!(ping(&lab.ctr.path(), "10.201.0.1", 2), "legitimate traffic was dropped");
    let c = lab.dp.counters(idx).unwrap();
    assert!(c.from_packets >= 2, "{c:?}");
    assert_eq!(c.dropped(DropReason::SpoofIp), 0);

    // A spoofed source IP is dropped and counted.
    lab.ctr.ip(&["addr", "add", "10.201.0.99/24", "dev", "eth0"]).unwrap();
    let spoofed = Command::new("nsenter")
        .arg(format!("--net={}", lab.ctr.path().display()))
        .args(["ping", "-c", "2", "-W", "1", "-I", "10.201.0.99", "10.201.0.1"])
        .output()
        .unwrap();
    assert!(!spoofed.status.success(), "a spoofed source IP got through");
    let c = lab.dp.counters(idx).unwrap();
    assert!(c.dropped(DropReason::SpoofIp) + c.dropped(DropReason::SpoofArp) >= 2, "{c:?}");

    // A spoofed source MAC is dropped and counted.
    lab.ctr.ip(&["link", "set", "eth0", "address", "02:00:00:00:00:66"]).unwrap();
    let _ = lab.host.ip(&["neigh", "flush", "dev", &lab.hv]);
    assert!(!ping(&lab.ctr.path(), "10.201.0.1", 1), "a spoofed MAC got through");
    assert!(lab.dp.counters(idx).unwrap().dropped(DropReason::SpoofMac) >= 1);
    // And the real MAC works again.
    lab.ctr.ip(&["link", "set", "eth0", "address", "02:00:00:00:00:02"]).unwrap();
    let _ = lab.host.ip(&["neigh", "flush", "dev", &lab.hv]);
    assert!(ping(&lab.ctr.path(), "10.201.0.1", 2));
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn spoofed_ip_and_mac_are_dropped_tcx() {
    check(AttachMode::Auto);
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn spoofed_ip_and_mac_are_dropped_clsact() {
    check(AttachMode::Clsact);
}
