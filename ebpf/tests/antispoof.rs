//! The endpoint program on a real veth in namespaces this test makes: a
//! "host" and a "container". Root tests (`--run-ignored all`), both attach
//! modes.

use std::net::Ipv4Addr;
use std::process::Command;

use trellis_ebpf::{AttachMode, Datapath, DropReason, EndpointInfo};
use trellis_integration::{Netns, ping, require_root, unique};

fn ifindex(ns: &Netns, ifname: &str) -> u32 {
    let out = ns.ip(&["-o", "link", "show", ifname]).unwrap();
    out.split(':').next().unwrap().trim().parse().unwrap()
}

fn check(mode: AttachMode) {
    require_root();
    let host = Netns::new("tbh").unwrap();
    let ctr = Netns::new("tbc").unwrap();
    let hv = unique("ev");
    trellis_integration::ip(&[
        "link", "add", &hv, "netns", &host.name, "type", "veth", "peer", "name", "eth0", "netns", &ctr.name,
    ])
    .unwrap();
    host.ip(&["addr", "add", "10.201.0.1/24", "dev", &hv]).unwrap();
    host.ip(&["link", "set", &hv, "up"]).unwrap();
    ctr.ip(&["link", "set", "eth0", "address", "02:00:00:00:00:02", "up"]).unwrap();
    ctr.ip(&["addr", "add", "10.201.0.2/24", "dev", "eth0"]).unwrap();
    assert!(ping(&ctr.path(), "10.201.0.1", 1), "the plain veth works");

    // Maps are pinned in a bpffs of this test's own.
    let bpf = tempfile::tempdir().unwrap();
    trellis_ebpf::mount_bpffs(bpf.path()).unwrap();
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(bpf.path().to_path_buf());
    // Load and attach from a thread inside the host namespace.
    let (host_path, ifname, pins) = (host.path(), hv.clone(), bpf.path().to_path_buf());
    let mut dp = std::thread::spawn(move || {
        let ns = std::fs::File::open(host_path).unwrap();
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut dp = Datapath::load_pinned(&pins).expect("loading the endpoint program");
        dp.attach(&ifname, mode).expect("attaching");
        dp
    })
    .join()
    .unwrap();
    let idx = ifindex(&host, &hv);
    dp.set_endpoint(idx, EndpointInfo::new(Ipv4Addr::new(10, 201, 0, 2), [2, 0, 0, 0, 0, 2], 4096)).unwrap();
    // Flush the host's ARP entry so the next ping ARPs again through the program.
    let _ = host.ip(&["neigh", "flush", "dev", &hv]);

    // The real endpoint passes and is counted.
    assert!(ping(&ctr.path(), "10.201.0.1", 2), "legitimate traffic was dropped");
    let c = dp.counters(idx).unwrap();
    assert!(c.from_packets >= 2, "{c:?}");
    assert_eq!(c.dropped(DropReason::SpoofIp), 0);

    // A spoofed source IP is dropped and counted.
    ctr.ip(&["addr", "add", "10.201.0.99/24", "dev", "eth0"]).unwrap();
    let spoofed = Command::new("nsenter")
        .arg(format!("--net={}", ctr.path().display()))
        .args(["ping", "-c", "2", "-W", "1", "-I", "10.201.0.99", "10.201.0.1"])
        .output()
        .unwrap();
    assert!(!spoofed.status.success(), "a spoofed source IP got through");
    let c = dp.counters(idx).unwrap();
    assert!(c.dropped(DropReason::SpoofIp) + c.dropped(DropReason::SpoofArp) >= 2, "{c:?}");

    // A spoofed source MAC is dropped and counted.
    ctr.ip(&["link", "set", "eth0", "address", "02:00:00:00:00:66"]).unwrap();
    let _ = host.ip(&["neigh", "flush", "dev", &hv]);
    assert!(!ping(&ctr.path(), "10.201.0.1", 1), "a spoofed MAC got through");
    assert!(dp.counters(idx).unwrap().dropped(DropReason::SpoofMac) >= 1);
    // And the real MAC works again.
    ctr.ip(&["link", "set", "eth0", "address", "02:00:00:00:00:02"]).unwrap();
    let _ = host.ip(&["neigh", "flush", "dev", &hv]);
    assert!(ping(&ctr.path(), "10.201.0.1", 2));
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
