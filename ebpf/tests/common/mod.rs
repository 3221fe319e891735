//! The lab of the crate's root tests: a "host" and a "container"
//! namespace joined by a veth, the endpoint program loaded (maps pinned in
//! a bpffs of the test's own) and attached to the host side.

// Each test binary uses its share of the helpers.
#![allow(dead_code)]

use std::net::Ipv4Addr;

use trellis_ebpf::{AttachMode, Datapath};
use trellis_integration::{Netns, ping, unique};

pub struct Lab {
    pub host: Netns,
    pub ctr: Netns,
    /// The host side of the veth.
    pub hv: String,
    pub dp: Datapath,
    bpf: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.bpf.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A bpffs mount, undone when dropped.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

impl Lab {
    /// `net` is the /24's first three octets: the host side is .1, the
    /// container .2 (MAC 02:00:00:00:00:02).
    pub fn new(net: [u8; 3], mode: AttachMode) -> Lab {
        let host = Netns::new("tbh").unwrap();
        let ctr = Netns::new("tbc").unwrap();
        let hv = unique("ev");
        trellis_integration::ip(&[
            "link", "add", &hv, "netns", &host.name, "type", "veth", "peer", "name", "eth0", "netns", &ctr.name,
        ])
        .unwrap();
        let [a, b, c] = net;
        host.ip(&["addr", "add", &format!("{a}.{b}.{c}.1/24"), "dev", &hv]).unwrap();
        host.ip(&["link", "set", &hv, "up"]).unwrap();
        ctr.ip(&["link", "set", "eth0", "address", "02:00:00:00:00:02", "up"]).unwrap();
        ctr.ip(&["addr", "add", &format!("{a}.{b}.{c}.2/24"), "dev", "eth0"]).unwrap();
        assert!(ping(&ctr.path(), &format!("{a}.{b}.{c}.1"), 1), "the plain veth works");
        let bpf = tempfile::tempdir().unwrap();
        trellis_ebpf::mount_bpffs(bpf.path()).unwrap();
        // Unmounted even if loading below panics (no Lab to drop then).
        let mounted = Mounted(bpf.path().to_path_buf());
        // Load and attach from a thread inside the host namespace.
        let (host_path, ifname, pins) = (host.path(), hv.clone(), bpf.path().to_path_buf());
        let dp = std::thread::spawn(move || {
            let ns = std::fs::File::open(host_path).unwrap();
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut dp = Datapath::load_pinned(&pins).expect("loading the endpoint program");
            dp.attach(&ifname, mode).expect("attaching");
            dp
        })
        .join()
        .unwrap();
        std::mem::forget(mounted);
        Lab { host, ctr, hv, dp, bpf }
    }

    pub fn ifindex(&self) -> u32 {
        let out = self.host.ip(&["-o", "link", "show", &self.hv]).unwrap();
        out.split(':').next().unwrap().trim().parse().unwrap()
    }

    /// The host side's MAC.
    pub fn host_mac(&self) -> [u8; 6] {
        let out = self.host.ip(&["-o", "link", "show", &self.hv]).unwrap();
        let mac = out.split("link/ether ").nth(1).unwrap().split(' ').next().unwrap().to_string();
        let v: Vec<u8> = mac.split(':').map(|h| u8::from_str_radix(h, 16).unwrap()).collect();
        v.try_into().unwrap()
    }

    pub fn ip(net: [u8; 3], last: u8) -> Ipv4Addr {
        Ipv4Addr::new(net[0], net[1], net[2], last)
    }
}
