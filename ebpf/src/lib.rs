//! The Trellis eBPF datapath.
//!
//! The programs are C (`bpf/*.bpf.c`, compiled by `build.rs` with clang-19);
//! their map layouts live in one header (`include/trellis.h`) mirrored here
//! by `#[repr(C)]` types whose sizes and offsets are checked on both sides
//! (C `_Static_assert`s, Rust tests). [`Datapath`] loads them with aya.
//!
//! Built so far: the program on the host side of every endpoint veth that
//! drops packets with a spoofed source MAC, IPv4 source or ARP sender and
//! counts traffic and drops per endpoint. Not wired into the agent yet.

use std::net::Ipv4Addr;
use std::path::Path;

use aya::maps::{HashMap, PerCpuHashMap};
use aya::programs::links::FdLink;
use aya::programs::tc::{NlOptions, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader, Pod};

/// The compiled endpoint program.
pub static ENDPOINT_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/endpoint.bpf.o"));

/// `struct endpoint_info` of `trellis.h`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// IPv4 address in network byte order.
    pub ip: u32,
    pub mac: [u8; 6],
    pub pad: u16,
    /// The network's VNI.
    pub net_id: u32,
    pub flags: u32,
}

// SAFETY: plain old data with no padding the compiler may leave
// uninitialised (checked by the layout test).
unsafe impl Pod for EndpointInfo {}

impl EndpointInfo {
    pub fn new(ip: Ipv4Addr, mac: [u8; 6], net_id: u32) -> EndpointInfo {
        EndpointInfo { ip: u32::from_ne_bytes(ip.octets()), mac, pad: 0, net_id, flags: 0 }
    }
}

/// `enum drop_reason` of `trellis.h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    SpoofMac = 0,
    SpoofIp = 1,
    SpoofArp = 2,
    SpoofIpv6 = 3,
    Malformed = 4,
}

pub const DROP_REASONS: usize = 8;

/// `struct endpoint_counters` of `trellis.h` (one per CPU in the map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounters {
    pub from_packets: u64,
    pub from_bytes: u64,
    pub to_packets: u64,
    pub to_bytes: u64,
    pub drops: [u64; DROP_REASONS],
}

// SAFETY: as above.
unsafe impl Pod for EndpointCounters {}

/// `struct flow_event` of `trellis.h`: one record of the `events` ring
/// buffer (a drop, or a flow that started).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub ifindex: u32,
    /// Network byte order.
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// 0 passed, 1 dropped.
    pub verdict: u8,
    pub reason: u8,
    pub pad: u8,
}

impl FlowEvent {
    /// Read one record (`None` when it has the wrong size).
    pub fn from_bytes(b: &[u8]) -> Option<FlowEvent> {
        if b.len() < std::mem::size_of::<FlowEvent>() {
            return None;
        }
        let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Some(FlowEvent {
            ifindex: u32_at(0),
            saddr: u32_at(4),
            daddr: u32_at(8),
            sport: u16::from_be_bytes([b[12], b[13]]),
            dport: u16::from_be_bytes([b[14], b[15]]),
            proto: b[16],
            verdict: b[17],
            reason: b[18],
            pad: b[19],
        })
    }

    pub fn src(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.saddr.to_ne_bytes())
    }

    pub fn dst(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.daddr.to_ne_bytes())
    }

    pub fn reason_name(&self) -> &'static str {
        match self.reason {
            0 => "spoofed_mac",
            1 => "spoofed_ip",
            2 => "spoofed_arp",
            3 => "spoofed_ipv6",
            4 => "malformed",
            _ => "unknown",
        }
    }
}

impl EndpointCounters {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }
}

/// How a program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// tcx where the kernel has it (≥ 6.6), clsact below.
    Auto,
    /// A clsact qdisc and a tc filter, as on kernels before 6.6.
    Clsact,
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("eBPF program {call}: {source}")]
    Program {
        call: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {call}: {source}")]
    Map {
        call: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("pinning a link at {path}: {reason}")]
    Pin { path: std::path::PathBuf, reason: String },
    #[error("adding a clsact qdisc to {ifname}: {source}")]
    Clsact { ifname: String, source: std::io::Error },
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;

const PROGRAM: &str = "trellis_from_endpoint";

/// The loaded endpoint program and its maps.
pub struct Datapath {
    ebpf: Ebpf,
}

impl Datapath {
    /// Load the endpoint program with its maps pinned in `pin_dir` (a bpffs
    /// directory): maps already pinned there are reused, so endpoint entries
    /// and counters outlive the process.
    pub fn load_pinned(pin_dir: &Path) -> Result<Datapath> {
        Datapath::load_with(Some(pin_dir))
    }

    fn load_with(pin_dir: Option<&Path>) -> Result<Datapath> {
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pin_dir {
            loader.default_map_pin_directory(dir);
        }
        // (Its maps are declared pinned by name: loading needs a bpffs.)
        let mut ebpf = loader.load(ENDPOINT_OBJECT)?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .ok_or(DatapathError::Missing("endpoint program"))?
            .try_into()
            .map_err(|source| DatapathError::Program { call: "lookup", source })?;
        prog.load().map_err(|source| DatapathError::Program { call: "load", source })?;
        Ok(Datapath { ebpf })
    }

    fn program(&mut self) -> Result<&mut SchedClassifier> {
        self.ebpf
            .program_mut(PROGRAM)
            .ok_or(DatapathError::Missing("endpoint program"))?
            .try_into()
            .map_err(|source| DatapathError::Program { call: "lookup", source })
    }

    /// The monitor's ring buffer, taken out of the loaded object (once).
    pub fn take_events(&mut self) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        let map = self.ebpf.take_map("events").ok_or(DatapathError::Missing("events map"))?;
        aya::maps::RingBuf::try_from(map)
            .map_err(|e| DatapathError::Pin { path: "events".into(), reason: e.to_string() })
    }

    /// Attach to the ingress of `ifname` (the host side of an endpoint's
    /// veth: what the endpoint sends), in the calling thread's namespace.
    pub fn attach(&mut self, ifname: &str, mode: AttachMode) -> Result<()> {
        let prog = self.program()?;
        let attached = match mode {
            AttachMode::Auto => prog.attach(ifname, TcAttachType::Ingress),
            AttachMode::Clsact => {
                add_clsact(ifname)?;
                prog.attach_with_options(ifname, TcAttachType::Ingress, TcAttachOptions::Netlink(NlOptions::default()))
            }
        };
        attached.map(|_| ()).map_err(|source| DatapathError::Program { call: "attach", source })
    }

    /// Attach to the ingress of `ifname` so that it stays attached after
    /// this process exits, and leave a marker at `marker` (in a bpffs
    /// directory) that says so. With tcx the link itself is pinned at
    /// `marker`; with clsact the tc filter stays in the kernel by itself and
    /// the marker is a directory.
    pub fn attach_persistent(&mut self, ifname: &str, marker: &Path, mode: AttachMode) -> Result<()> {
        if mode == AttachMode::Clsact {
            add_clsact(ifname)?;
        }
        let prog = self.program()?;
        let id = match mode {
            AttachMode::Auto => prog.attach(ifname, TcAttachType::Ingress),
            AttachMode::Clsact => {
                prog.attach_with_options(ifname, TcAttachType::Ingress, TcAttachOptions::Netlink(NlOptions::default()))
            }
        }
        .map_err(|source| DatapathError::Program { call: "attach", source })?;
        let link = prog.take_link(id).map_err(|source| DatapathError::Program { call: "take link", source })?;
        let _ = std::fs::remove_file(marker);
        let _ = std::fs::remove_dir(marker);
        match FdLink::try_from(link) {
            Ok(fd_link) => {
                fd_link
                    .pin(marker)
                    .map_err(|e| DatapathError::Pin { path: marker.to_path_buf(), reason: e.to_string() })?;
            }
            Err(_) => {
                // A netlink (clsact) filter: taking the link out of aya's
                // list means dropping it does not detach the filter.
                std::fs::create_dir(marker)
                    .map_err(|e| DatapathError::Pin { path: marker.to_path_buf(), reason: e.to_string() })?;
            }
        }
        Ok(())
    }

    /// Remove an endpoint's entry.
    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<()> {
        let map = self.ebpf.map_mut("endpoints").ok_or(DatapathError::Missing("endpoints map"))?;
        let mut eps: HashMap<_, u32, EndpointInfo> =
            HashMap::try_from(map).map_err(|source| DatapathError::Map { call: "open endpoints", source })?;
        match eps.remove(&ifindex) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DatapathError::Map { call: "remove endpoint", source }),
        }
    }

    /// The ifindexes that have endpoint entries.
    pub fn endpoint_ifindexes(&self) -> Result<Vec<u32>> {
        let map = self.ebpf.map("endpoints").ok_or(DatapathError::Missing("endpoints map"))?;
        let eps: HashMap<_, u32, EndpointInfo> =
            HashMap::try_from(map).map_err(|source| DatapathError::Map { call: "open endpoints", source })?;
        eps.keys()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|source| DatapathError::Map { call: "list endpoints", source })
    }

    /// Program (or update) an endpoint, keyed by its host-side ifindex.
    pub fn set_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<()> {
        let map = self.ebpf.map_mut("endpoints").ok_or(DatapathError::Missing("endpoints map"))?;
        let mut eps: HashMap<_, u32, EndpointInfo> =
            HashMap::try_from(map).map_err(|source| DatapathError::Map { call: "open endpoints", source })?;
        eps.insert(ifindex, info, 0).map_err(|source| DatapathError::Map { call: "insert endpoint", source })
    }

    /// The counters of an endpoint, summed over CPUs (zero before its
    /// first packet).
    pub fn counters(&self, ifindex: u32) -> Result<EndpointCounters> {
        let map = self.ebpf.map("counters").ok_or(DatapathError::Missing("counters map"))?;
        let per_cpu: PerCpuHashMap<_, u32, EndpointCounters> =
            PerCpuHashMap::try_from(map).map_err(|source| DatapathError::Map { call: "open counters", source })?;
        let values = match per_cpu.get(&ifindex, 0) {
            Ok(v) => v,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(EndpointCounters::default()),
            Err(source) => return Err(DatapathError::Map { call: "read counters", source }),
        };
        let mut sum = EndpointCounters::default();
        for c in values.iter() {
            sum.from_packets += c.from_packets;
            sum.from_bytes += c.from_bytes;
            sum.to_packets += c.to_packets;
            sum.to_bytes += c.to_bytes;
            for (s, d) in sum.drops.iter_mut().zip(c.drops.iter()) {
                *s += d;
            }
        }
        Ok(sum)
    }
}

/// Mount a bpffs at `dir` unless one is there already.
pub fn mount_bpffs(dir: &std::path::Path) -> std::result::Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let target = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.get(4).is_some_and(|m| std::path::Path::new(m) == target) && l.contains(" - bpf ")
    });
    if mounted {
        return Ok(());
    }
    nix::mount::mount(Some("bpf"), &target, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| format!("mounting bpffs at {}: {e}", target.display()))
}

/// Add a clsact qdisc to `ifname` (one already there is fine).
fn add_clsact(ifname: &str) -> Result<()> {
    match aya::programs::tc::qdisc_add_clsact(ifname) {
        Err(e) if !e.to_string().contains("exists") => {
            Err(DatapathError::Clsact { ifname: ifname.to_string(), source: std::io::Error::other(e.to_string()) })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// The same numbers as the `_Static_assert`s of `trellis.h`.
    #[test]
    fn layouts_match_the_c_header() {
        assert_eq!(size_of::<EndpointInfo>(), 20);
        assert_eq!(offset_of!(EndpointInfo, mac), 4);
        assert_eq!(offset_of!(EndpointInfo, net_id), 12);
        assert_eq!(size_of::<EndpointCounters>(), 96);
        assert_eq!(offset_of!(EndpointCounters, drops), 32);
        assert_eq!(DropReason::Malformed as usize, 4);
        assert_eq!(size_of::<FlowEvent>(), 20);
        assert_eq!(offset_of!(FlowEvent, proto), 16);
    }

    #[test]
    fn flow_events_decode() {
        let mut b = vec![0u8; 20];
        b[0..4].copy_from_slice(&7u32.to_ne_bytes());
        b[4..8].copy_from_slice(&[10, 1, 0, 99]);
        b[8..12].copy_from_slice(&[10, 1, 0, 3]);
        b[12..14].copy_from_slice(&40000u16.to_be_bytes());
        b[14..16].copy_from_slice(&53u16.to_be_bytes());
        b[16] = 17;
        b[17] = 1;
        b[18] = 1;
        let e = FlowEvent::from_bytes(&b).unwrap();
        assert_eq!(
            (e.ifindex, e.src(), e.dst(), e.sport, e.dport),
            (7, Ipv4Addr::new(10, 1, 0, 99), Ipv4Addr::new(10, 1, 0, 3), 40000, 53)
        );
        assert_eq!((e.proto, e.verdict, e.reason_name()), (17, 1, "spoofed_ip"));
        assert!(FlowEvent::from_bytes(&b[..19]).is_none());
    }

    #[test]
    fn addresses_are_stored_in_network_order() {
        let e = EndpointInfo::new(Ipv4Addr::new(10, 1, 2, 3), [2, 0, 0, 0, 0, 1], 4096);
        assert_eq!(e.ip.to_ne_bytes(), [10, 1, 2, 3]);
    }

    #[test]
    fn the_object_is_an_ebpf_elf() {
        assert_eq!(&ENDPOINT_OBJECT[..4], b"\x7fELF");
        // e_machine = EM_BPF (247), little endian.
        assert_eq!(u16::from_le_bytes([ENDPOINT_OBJECT[18], ENDPOINT_OBJECT[19]]), 247);
    }
}
