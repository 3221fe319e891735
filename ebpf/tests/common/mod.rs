//! The labs of the crate's root tests: [`Lab`], a "host" and a "container"
//! namespace joined by a veth, the endpoint program loaded (maps pinned in
//! a bpffs of the test's own) and attached to the host side; [`RunLab`],
//! the program attached nowhere and run on hand-built frames ([`frames`])
//! through the bpf(2) command `BPF_PROG_TEST_RUN`.

// Each test binary uses its share of the helpers.
#![allow(dead_code)]

use std::net::Ipv4Addr;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use trellis_ebpf::{AttachMode, Datapath, ENDPOINT_OBJECT};
use trellis_integration::{Netns, ping, unique};

pub mod frames;

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
        // From here on the Lab unmounts it (its Drop).
        let _ = std::mem::ManuallyDrop::new(mounted);
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

/// The tc verdicts (linux/pkt_cls.h) a test run returns.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
/// `bpf_redirect` and `bpf_redirect_peer` (a test run sends nothing).
pub const TC_ACT_REDIRECT: u32 = 7;

/// One of the two endpoint programs.
#[derive(Clone, Copy, Debug)]
pub enum Prog {
    /// `trellis_from_endpoint` (tc ingress of the host veth).
    FromEndpoint,
    /// `trellis_to_endpoint` (tc egress).
    ToEndpoint,
    /// `trellis_from_uplink` (tc ingress of an uplink: the routing mesh).
    FromUplink,
    /// `trellis_from_tunnel` (tc ingress of a network's VXLAN device).
    FromTunnel,
}

/// What one run of a program on a frame gave.
#[derive(Debug)]
pub struct Run {
    /// The program's return value (`TC_ACT_*`).
    pub verdict: u32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
}

/// The endpoint programs loaded but attached nowhere, run on frames a test
/// builds with `BPF_PROG_TEST_RUN` (aya's [`TestRun`]): no veth, no
/// traffic. The maps are pinned in a bpffs of the lab's own and filled
/// through [`RunLab::dp`] as the agent fills them; the programs that run
/// are a second load of the same object ([`ENDPOINT_OBJECT`]) that reuses
/// those pinned maps (the `Datapath` keeps its programs to itself).
///
/// The runs happen in a network namespace of the lab's own. Without a
/// context the kernel runs a tc program on an skb of that namespace's
/// loopback device: `skb->ifindex` is [`RunLab::IFINDEX`], the key of the
/// endpoint the programs see. Redirects are not carried out by a test run:
/// the verdict says one was asked for.
pub struct RunLab {
    pub dp: Datapath,
    progs: aya::Ebpf,
    ns: Netns,
    // Unmounted before the directory is removed (fields drop in order).
    _mounted: Mounted,
    _dir: tempfile::TempDir,
}

impl RunLab {
    /// The ifindex of every run's skb: the lab namespace's loopback.
    pub const IFINDEX: u32 = 1;

    pub fn new() -> RunLab {
        let ns = Netns::new("tbr").unwrap();
        let dir = tempfile::tempdir().unwrap();
        trellis_ebpf::mount_bpffs(dir.path()).unwrap();
        // Unmounted even if loading below panics.
        let mounted = Mounted(dir.path().to_path_buf());
        let dp = Datapath::load_pinned(dir.path()).expect("loading the endpoint program");
        let mut loader = aya::EbpfLoader::new();
        loader.default_map_pin_directory(dir.path());
        let mut progs = loader.load(ENDPOINT_OBJECT).expect("loading the object again (pinned maps reused)");
        for name in ["trellis_from_endpoint", "trellis_to_endpoint", "trellis_from_uplink", "trellis_from_tunnel"] {
            let p: &mut SchedClassifier = progs.program_mut(name).unwrap().try_into().unwrap();
            p.load().unwrap_or_else(|e| panic!("loading {name}: {e}"));
        }
        RunLab { dp, progs, ns, _mounted: mounted, _dir: dir }
    }

    /// Run `prog` once on `frame` (in the lab's namespace, from a thread
    /// of its own: setns changes only the calling thread).
    pub fn run(&self, prog: Prog, frame: &[u8]) -> Run {
        let name = match prog {
            Prog::FromEndpoint => "trellis_from_endpoint",
            Prog::ToEndpoint => "trellis_to_endpoint",
            Prog::FromUplink => "trellis_from_uplink",
            Prog::FromTunnel => "trellis_from_tunnel",
        };
        let p: &SchedClassifier = self.progs.program(name).unwrap().try_into().unwrap();
        let ns = std::fs::File::open(self.ns.path()).unwrap();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                    let mut out = vec![0u8; 4096];
                    let r = p
                        .test_run(TestRunOptions {
                            data_in: Some(frame),
                            data_out: Some(&mut out),
                            ..Default::default()
                        })
                        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {name}: {e}"));
                    out.truncate(r.data_size_out as usize);
                    Run { verdict: r.return_value, frame: out }
                })
                .join()
                .unwrap()
        })
    }

    /// The datapath loaded again from its pins (as by an agent restarted).
    pub fn reload(&mut self) {
        self.dp = Datapath::load_pinned(self._dir.path()).expect("loading the endpoint program again");
    }

    /// Run `trellis_from_endpoint` on a frame the endpoint sends.
    pub fn send(&self, frame: &[u8]) -> Run {
        self.run(Prog::FromEndpoint, frame)
    }

    /// Run `trellis_to_endpoint` on a frame delivered to the endpoint.
    pub fn deliver(&self, frame: &[u8]) -> Run {
        self.run(Prog::ToEndpoint, frame)
    }
}
