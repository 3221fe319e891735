//! A kernel in memory for unit tests: applies actions to its own
//! [`Observed`] (with [`Observed::record`], as the reconciler's cache does)
//! and logs them; failures can be injected.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ipnet::IpNet;

use super::{Action, ContainerLink, Dataplane, DataplaneError, Observed, Result};

/// A dataplane in memory that applies actions to its own [`Observed`] and
/// records them: the reconciler's unit tests run against it.
#[derive(Default)]
pub struct FakeDataplane {
    pub state: Mutex<Observed>,
    pub log: Mutex<Vec<Action>>,
    /// Endpoint ids whose creation fails (their netns "is gone").
    pub failing: Mutex<Vec<String>>,
    /// Every endpoint's creation fails.
    pub fail_every_endpoint: std::sync::atomic::AtomicBool,
    /// Every xfrm change fails (a kernel without ESP or xfrm).
    pub failing_xfrm: std::sync::atomic::AtomicBool,
    /// Every endpoint program attachment fails.
    pub failing_attach: std::sync::atomic::AtomicBool,
    /// The namespaces the agent created and has not removed.
    pub namespaces: Mutex<BTreeSet<PathBuf>>,
    /// Creating a namespace fails.
    pub failing_netns: std::sync::atomic::AtomicBool,
    /// Host ports held by a process: (protocol, port) → its description.
    pub held_ports: Mutex<std::collections::BTreeMap<(crate::model::Proto, u16), String>>,
    /// The peers that answer probes.
    pub peers: std::sync::Arc<Mutex<FakePeers>>,
    /// Its tables' generation, as the real dataplane keeps one for its
    /// picture of them: bumped by every table change it applies and by
    /// every change a test makes with [`FakeDataplane::with_state`] (which
    /// stands for a change made outside and read back).
    pub tables_generation: std::sync::atomic::AtomicU64,
}

/// Which addresses answer the fake kernel's probes.
#[derive(Default)]
pub struct FakePeers {
    pub underlay: BTreeSet<std::net::Ipv4Addr>,
    pub tunnel: BTreeSet<std::net::Ipv6Addr>,
    /// There is a probe device to probe through.
    pub probe_device: bool,
    /// The largest unfragmented packet each underlay path carries (absent:
    /// any size).
    pub path_mtu: std::collections::BTreeMap<std::net::Ipv4Addr, u32>,
    /// The largest VXLAN packet each tunnel path carries (absent: any).
    pub tunnel_mtu: std::collections::BTreeMap<std::net::Ipv6Addr, u32>,
}

/// Probe sockets whose echoes the [`FakePeers`] answer at once.
pub struct FakeProbeSockets {
    peers: std::sync::Arc<Mutex<FakePeers>>,
    replies: std::collections::VecDeque<(std::net::Ipv4Addr, u16, u16)>,
    replies6: std::collections::VecDeque<(std::net::Ipv6Addr, u16, u16)>,
}

impl super::ProbeSockets for FakeProbeSockets {
    fn refresh_tunnel(&mut self) -> bool {
        self.peers.lock().unwrap().probe_device
    }
    fn send_underlay(&mut self, to: std::net::Ipv4Addr, id: u16, seq: u16) -> std::io::Result<()> {
        if self.peers.lock().unwrap().underlay.contains(&to) {
            self.replies.push_back((to, id, seq));
        }
        Ok(())
    }
    fn send_underlay_sized(&mut self, to: std::net::Ipv4Addr, id: u16, seq: u16, size: u32) -> std::io::Result<()> {
        let p = self.peers.lock().unwrap();
        if p.underlay.contains(&to) && p.path_mtu.get(&to).is_none_or(|m| size <= *m) {
            self.replies.push_back((to, id, seq));
        }
        Ok(())
    }
    fn send_tunnel(&mut self, to: std::net::Ipv6Addr, id: u16, seq: u16) -> std::io::Result<()> {
        if self.peers.lock().unwrap().tunnel.contains(&to) {
            self.replies6.push_back((to, id, seq));
        }
        Ok(())
    }
    fn send_tunnel_sized(&mut self, to: std::net::Ipv6Addr, id: u16, seq: u16, size: u32) -> std::io::Result<()> {
        let p = self.peers.lock().unwrap();
        if p.tunnel.contains(&to) && p.tunnel_mtu.get(&to).is_none_or(|m| size <= *m) {
            self.replies6.push_back((to, id, seq));
        }
        Ok(())
    }
    fn recv_underlay(&mut self) -> Option<(std::net::Ipv4Addr, u16, u16)> {
        self.replies.pop_front()
    }
    fn recv_tunnel(&mut self) -> Option<(std::net::Ipv6Addr, u16, u16)> {
        self.replies6.pop_front()
    }
}

impl FakeDataplane {
    pub fn take_log(&self) -> Vec<Action> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
    /// Read the kernel state (unlike [`Self::with_state`], nothing moves).
    pub fn inspect<R>(&self, f: impl FnOnce(&Observed) -> R) -> R {
        f(&self.state.lock().unwrap())
    }
    pub fn with_state<R>(&self, f: impl FnOnce(&mut Observed) -> R) -> R {
        self.tables_generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        f(&mut self.state.lock().unwrap())
    }
}

#[async_trait::async_trait]
impl Dataplane for FakeDataplane {
    async fn observe(&self, rules: bool) -> Result<Observed> {
        // Yield like a real netlink dump would, so concurrency shows in tests.
        tokio::task::yield_now().await;
        let mut o = self.state.lock().unwrap().clone();
        if !rules {
            o.egress = None;
        }
        o.tables_cached = true;
        o.tables_generation = self.tables_generation.load(std::sync::atomic::Ordering::SeqCst);
        Ok(o)
    }

    async fn apply(&self, action: &Action) -> Result<()> {
        self.log.lock().unwrap().push(action.clone());
        if let Action::CreateEndpoint(spec) = action
            && (self.failing.lock().unwrap().contains(&spec.endpoint_id)
                || self.fail_every_endpoint.load(std::sync::atomic::Ordering::Relaxed))
        {
            return Err(DataplaneError::NetnsGone(spec.netns.clone()));
        }
        if matches!(action, Action::Xfrm { .. }) && self.failing_xfrm.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(DataplaneError::Io {
                call: "add xfrm state",
                object: "fake".into(),
                source: std::io::Error::from_raw_os_error(2),
            });
        }
        if matches!(action, Action::AttachProgram { .. })
            && self.failing_attach.load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(DataplaneError::Io {
                call: "attach endpoint program",
                object: "fake".into(),
                source: std::io::Error::from_raw_os_error(22),
            });
        }
        if matches!(action, Action::UpdateTables(_)) {
            self.tables_generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.state.lock().unwrap().record(action)
    }

    fn prepare_host(&self) {}

    fn probe_sockets(&self) -> std::io::Result<Box<dyn super::ProbeSockets>> {
        Ok(Box::new(FakeProbeSockets {
            peers: self.peers.clone(),
            replies: Default::default(),
            replies6: Default::default(),
        }))
    }

    fn esp_support(&self) -> std::result::Result<(), String> {
        Err("the fake kernel has no ESP".into())
    }

    fn observe_xfrm(&self) -> Result<trellis_ipsec::ObservedXfrm> {
        Ok(self.state.lock().unwrap().xfrm.clone())
    }

    fn held_ports(&self) -> Result<std::collections::BTreeSet<(crate::model::Proto, u16)>> {
        Ok(self.held_ports.lock().unwrap().keys().copied().collect())
    }

    fn port_holder(&self, proto: crate::model::Proto, port: u16, _ip: Option<IpAddr>) -> Result<Option<String>> {
        Ok(self.held_ports.lock().unwrap().get(&(proto, port)).cloned())
    }

    fn check_netns(&self, path: &Path) -> Result<()> {
        if self.namespaces.lock().unwrap().contains(path) {
            Ok(())
        } else if !path.exists() {
            Err(DataplaneError::NetnsGone(path.to_path_buf()))
        } else {
            Err(DataplaneError::NotNetns {
                path: path.to_path_buf(),
                what: "not one of the fake kernel's".into(),
                hint: "create it with create_netns".into(),
            })
        }
    }

    fn create_netns(&self, path: &Path) -> Result<()> {
        if self.failing_netns.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(DataplaneError::Io {
                call: "create netns file",
                object: path.display().to_string(),
                source: std::io::Error::from_raw_os_error(28),
            });
        }
        self.namespaces.lock().unwrap().insert(path.to_path_buf());
        Ok(())
    }

    fn remove_netns(&self, path: &Path) -> Result<()> {
        self.namespaces.lock().unwrap().remove(path);
        Ok(())
    }

    async fn host_routes(&self) -> Result<Vec<IpNet>> {
        Ok(vec![])
    }

    async fn underlay_mtu(&self) -> Result<u32> {
        Ok(1500)
    }

    async fn underlay_candidates(&self) -> Result<Vec<(String, IpAddr)>> {
        Ok(Vec::new())
    }

    async fn link_with_addr(&self, _addr: IpAddr) -> Result<Option<String>> {
        Ok(Some("uplink0".into()))
    }

    async fn container_link(&self, netns: &std::path::Path, ifname: &str) -> Result<Option<ContainerLink>> {
        // The fake kernel plugs containers perfectly: the container side is
        // what the endpoint's creation asked for, while its host side exists.
        let state = self.state.lock().unwrap();
        let created = self.log.lock().unwrap().iter().rev().find_map(|a| match a {
            Action::CreateEndpoint(s) if s.netns == netns && s.ifname == ifname => Some((**s).clone()),
            _ => None,
        });
        Ok(created.filter(|s| state.links.contains_key(&s.host_if)).map(|s| ContainerLink {
            mac: s.mac,
            mtu: s.mtu,
            up: true,
            addrs: s.addr.into_iter().chain(s.addr6).collect(),
        }))
    }
}
