//! Endpoints: attach (with rollback at every step), detach (the one path,
//! for the CLI, CNI and Docker alike), check, find and list.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use trellis_plugin_api::validate;

use super::{AgentError, App, Result};
use crate::dataplane::DataplaneError;
use crate::model::{self, EndpointKind, EndpointRecord, NetworkRecord};
use crate::state::NewEndpoint;

/// An endpoint to attach, as a front door parsed it.
#[derive(Clone, Debug)]
pub struct AttachRequest {
    pub network: String,
    pub name: Option<String>,
    pub ip: Option<IpAddr>,
    /// The IPv6 address on a dual-stack network, only as a reservation.
    pub ip6: Option<IpAddr>,
    /// `ip` (and `ip6`) are this host's reservations (Docker's IPAM), to
    /// be claimed.
    pub reserved: bool,
    /// The interface inside the namespace (`eth0` when empty).
    pub ifname: String,
    pub labels: BTreeMap<String, String>,
    pub kind: EndpointKind,
    /// An existing namespace; `None`: a new one the agent manages.
    pub netns: Option<PathBuf>,
    pub container_id: String,
    /// Host ports to publish to it: all or none, else the attach fails.
    pub publish: Vec<super::ports::PortRequest>,
}

impl AttachRequest {
    pub fn new(network: &str, kind: EndpointKind) -> AttachRequest {
        AttachRequest {
            network: network.to_string(),
            name: None,
            ip: None,
            ip6: None,
            reserved: false,
            ifname: String::new(),
            labels: BTreeMap::new(),
            kind,
            netns: None,
            container_id: String::new(),
            publish: Vec::new(),
        }
    }
}

/// An attached endpoint, with its network and the resolver it should use.
#[derive(Clone, Debug)]
pub struct Attached {
    pub endpoint: EndpointRecord,
    pub network: Option<NetworkRecord>,
    /// The gateway, where this host answers DNS (none without DNS).
    pub dns: Option<IpAddr>,
}

/// How long after its creation an engine's endpoint is left to its engine
/// by [`App::collect_unlisted`] (between its Join and the container's
/// start, the sandbox may not be a namespace yet).
pub const ENGINE_GRACE_S: i64 = 10;

/// What [`App::collect_unlisted`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unlisted {
    /// Detached, for the reason given.
    Collected(String),
    /// No such endpoint (any more).
    AlreadyGone,
    /// Kept, for the reason given.
    Kept(String),
}

/// How a caller names an endpoint.
#[derive(Clone, Copy, Debug)]
pub enum EndpointRef<'a> {
    /// By id or name (names are unique within a network).
    Name { endpoint: &'a str, network: Option<&'a str> },
    /// By an engine's container and interface.
    Container { container_id: &'a str, ifname: &'a str, network: Option<&'a str> },
}

impl App {
    /// Attach an endpoint and converge: on any failure nothing is left
    /// behind (no record, no address, no namespace, no device).
    pub async fn attach(&self, req: AttachRequest) -> Result<Attached> {
        if req.network.is_empty() {
            return Err(AgentError::InvalidArgument("a network is required".into()));
        }
        if let Some(name) = &req.name {
            validate::name("endpoint name", name)?;
        }
        if req.reserved && req.ip.is_none() {
            return Err(AgentError::InvalidArgument("a reserved address must be named (ip)".into()));
        }
        let ifname = if req.ifname.is_empty() { "eth0".to_string() } else { req.ifname.clone() };
        validate::ifname(&ifname)?;
        validate::labels(&req.labels)?;
        let id = model::new_id();
        let (netns_path, managed) = match &req.netns {
            None => (self.netns_dir.join(&id), true),
            Some(p) => {
                // An engine's sandbox appears after its Join, and the engine
                // moves the interface in itself (Docker): the agent never
                // enters it. Any other must be a network namespace the agent
                // sees now.
                if req.kind != EndpointKind::Docker {
                    match self.dataplane.check_netns(p) {
                        Ok(()) => {}
                        Err(DataplaneError::NetnsGone(_)) => {
                            return Err(AgentError::InvalidArgument(format!(
                                "network namespace {:?} does not exist",
                                p.display().to_string()
                            )));
                        }
                        Err(e) => return Err(AgentError::InvalidArgument(e.to_string())),
                    }
                }
                (p.clone(), false)
            }
        };
        // Check the network before creating anything in the kernel.
        self.cluster.network(&req.network).await.map_err(store_down)?;
        if managed {
            self.dataplane
                .create_netns(&netns_path)
                .map_err(|e| AgentError::Internal(format!("creating a network namespace: {e}")))?;
        }
        let new = NewEndpoint {
            id: id.clone(),
            network: req.network.clone(),
            name: req.name.clone(),
            ip: req.ip,
            labels: req.labels.clone(),
            netns: netns_path.clone(),
            managed_netns: managed,
            ifname,
            kind: req.kind,
            container_id: req.container_id.clone(),
            ip6: req.ip6,
            reserved: req.reserved,
        };
        let rec = match self.cluster.create_endpoint(new).await {
            Ok(r) => r,
            Err(e) => {
                if managed {
                    let _ = self.dataplane.remove_netns(&netns_path);
                }
                return Err(store_down(e));
            }
        };
        let report = self.converge().await;
        let failure = match &report {
            Ok(r) => r.endpoint_error(&id).map(str::to_string),
            Err(e) => Some(e.to_string()),
        };
        if let Some(msg) = failure {
            // Undo: records and address, then the kernel side.
            if let Err(e) = self.cluster.remove_endpoint(&rec).await {
                tracing::error!(endpoint = %id, error = %e, "rolling back a failed attach");
            }
            let _ = self.reconciler.pass().await;
            self.remove_managed(&rec);
            return Err(AgentError::FailedPrecondition(format!(
                "attaching to network {:?} failed: {msg}; nothing was left behind",
                rec.network
            )));
        }
        if !req.publish.is_empty()
            && let Err(e) = self.publish(&rec.id, &req.publish).await
        {
            // All or nothing: the endpoint goes too.
            if let Err(undo) = self.cluster.remove_endpoint(&rec).await {
                tracing::error!(endpoint = %id, error = %undo, "rolling back an attach whose ports failed");
            }
            let _ = self.reconciler.pass().await;
            self.remove_managed(&rec);
            return Err(AgentError::FailedPrecondition(format!(
                "attaching to network {:?} failed: {e}; nothing was left behind",
                rec.network
            )));
        }
        tracing::info!(endpoint = %rec.id, name = %rec.name, network = %rec.network, ip = %rec.ip, "attached");
        let network = self.cluster.network(&rec.network_id).await.ok();
        let mut dns = None;
        if let (Some(core), Some(n)) = (&self.dns, &network) {
            // Resolvable, and resolving, before the container's first query.
            core.add_endpoint(&crate::dns::zone_network(n), &crate::dns::zone_endpoint(&rec));
            dns = n.gateway;
        }
        Ok(Attached { endpoint: rec, network, dns })
    }

    /// An endpoint by id or name, or by an engine's container id + ifname.
    pub async fn find(&self, r: EndpointRef<'_>) -> Result<EndpointRecord> {
        match r {
            EndpointRef::Container { container_id, ifname, network } if !container_id.is_empty() => {
                self.cluster.find_by_container(container_id, ifname, network).await
            }
            EndpointRef::Name { endpoint, network } if !endpoint.is_empty() => {
                self.cluster.find_endpoint(endpoint, network).await
            }
            _ => Err(AgentError::InvalidArgument("an endpoint (id or name) or a container id is required".into())),
        }
    }

    /// Detach: the endpoint is gone for every user at once (its name is
    /// free, it is listed nowhere, DNS forgets it). A ready backend of a
    /// VIP service drains first: it takes no new connection from now on
    /// (this host's tables are converged before the answer; the other
    /// hosts follow their store watch) while the connections it has keep
    /// flowing for [`App::drain`], then its devices go and only then its
    /// address and record ([`super::settle`]). Any other endpoint's devices
    /// go in the next pass (triggered by this write). Returns the drain
    /// started, if any.
    ///
    /// The caller is never kept waiting for the drain: engines call detach
    /// inline in a container's teardown (Docker's Leave and DeleteEndpoint
    /// inside `docker stop`/`rm`/`network disconnect`, which wait for them;
    /// a CNI runtime's DEL inside its sandbox teardown, under its own
    /// timeouts, the namespace deleted right after), and a waiting call
    /// would not survive an agent restart either. The drain is a state in the store
    /// instead, which this host's agent ends on time, after a restart too
    /// ([`crate::daemon::tasks::finish_drains`]).
    pub async fn detach(&self, e: &EndpointRecord) -> Result<Option<std::time::Duration>> {
        let drain = self.drain_of(e).await?;
        let until = drain.map(|d| model::now_ms() + d.as_millis() as u64);
        self.cluster.mark_detached(e, until).await?;
        let Some(d) = drain else {
            tracing::info!(endpoint = %e.id, name = %e.name, network = %e.network, "detached");
            return Ok(None);
        };
        tracing::info!(endpoint = %e.id, name = %e.name, network = %e.network, drain_ms = d.as_millis() as u64, "detached: draining its connections");
        self.drains.notify_one();
        // Out of this host's Maglev tables before the answer.
        if let Err(err) = self.converge().await {
            tracing::warn!(endpoint = %e.id, error = %err, "converging after a detach (the next pass retries)");
        }
        Ok(Some(d))
    }

    /// How long `e` drains when detached: [`App::drain`] for a ready
    /// endpoint that backs a VIP service (it may have connections through
    /// it); none for any other (nothing to keep: no delay at all).
    async fn drain_of(&self, e: &EndpointRecord) -> Result<Option<std::time::Duration>> {
        if self.drain.is_zero() || !e.ready || e.deleting {
            return Ok(None);
        }
        let services = self.cluster.services().await?;
        let backs = services.iter().any(|s| s.mode == model::ServiceMode::Vip && s.serves(e));
        Ok(backs.then_some(self.drain))
    }

    /// Detach the endpoint with this id if it still exists (an engine's
    /// retried or late calls find nothing, which is no error).
    pub async fn detach_id(&self, id: &str) -> Result<()> {
        match self.cluster.find_endpoint(id, None).await {
            Ok(e) if e.id == id => self.detach(&e).await.map(|_| ()),
            Ok(_) | Err(AgentError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// An engine's endpoint that its engine no longer lists: detached and
    /// converged (its ports, device and address go) if the kernel agrees
    /// that no container has it any more, else kept, saying why.
    ///
    /// The engine forgets an endpoint whose container went while this
    /// agent was down (its Leave and DeleteEndpoint never arrived), and it
    /// moves the container's interface back to the host rather than
    /// destroying it, so no missing device tells the reconciler either.
    /// The kernel agrees when the endpoint's sandbox is no longer a network
    /// namespace (Docker unmounts it at once and removes the file a minute
    /// later), or when its interface is back in the host's namespace under
    /// its pre-move name (the engine took it out of a sandbox that lives
    /// on: `docker network disconnect`). Asking both keeps a live endpoint
    /// from going on one wrong answer: an engine socket that points at
    /// another engine, or an agent that does not see the engine's
    /// namespace mounts. An endpoint younger than [`ENGINE_GRACE_S`] is
    /// kept: its engine may still be setting it up.
    pub async fn collect_unlisted(&self, id: &str) -> Result<Unlisted> {
        let e = match self.cluster.find_endpoint(id, None).await {
            Ok(e) if e.id == id => e,
            Ok(_) | Err(AgentError::NotFound(_)) => return Ok(Unlisted::AlreadyGone),
            Err(e) => return Err(e),
        };
        if e.host != self.cluster.host {
            return Ok(Unlisted::Kept(format!("it is on host {}, not this one", e.host)));
        }
        let age = model::now_unix() - e.created_unix;
        if age < ENGINE_GRACE_S {
            return Ok(Unlisted::Kept(format!("it is {age} s old: its engine may still be setting it up")));
        }
        let reason = match self.dataplane.check_netns(&e.netns) {
            Err(DataplaneError::NetnsGone(_)) => "its sandbox is gone".to_string(),
            Err(DataplaneError::NotNetns { what, .. }) => format!("its sandbox is {what}, no network namespace"),
            Err(err) => return Ok(Unlisted::Kept(format!("its sandbox cannot be checked: {err}"))),
            Ok(()) => {
                let peer = model::peer_ifname(&e.id);
                let host = self.dataplane.observe(false).await.map_err(|err| {
                    AgentError::Internal(format!("reading this host's links to check endpoint {}: {err}", e.id))
                })?;
                if !host.links.contains_key(&peer) {
                    return Ok(Unlisted::Kept(format!(
                        "its sandbox {} is a live network namespace and its interface is not back in the host",
                        e.netns.display()
                    )));
                }
                format!("its interface is back in the host as {peer}")
            }
        };
        self.detach(&e).await?;
        tracing::info!(endpoint = %e.id, name = %e.name, network = %e.network, container = %e.container_id, reason = %reason, ports = e.ports.len(), "its engine no longer lists the endpoint: collected");
        self.converge().await?;
        Ok(Unlisted::Collected(reason))
    }

    /// What an engine says of a container's health: each of this host's
    /// endpoints of `container_id` (of `kind`) becomes ready or not, and
    /// the tables follow. How many endpoints changed.
    pub async fn set_container_ready(&self, kind: EndpointKind, container_id: &str, ready: bool) -> Result<usize> {
        if container_id.is_empty() {
            return Ok(0);
        }
        let mut changed = 0;
        for e in self.cluster.endpoints().await?.iter().filter(|e| {
            e.host == self.cluster.host && e.kind == kind && e.container_id == container_id && e.ready != ready
        }) {
            if self.cluster.set_ready(&e.id, ready).await? {
                tracing::info!(endpoint = %e.id, name = %e.name, network = %e.network, container = %container_id, ready, "readiness changed");
                changed += 1;
            }
        }
        if changed > 0
            && let Err(err) = self.converge().await
        {
            tracing::warn!(container = %container_id, error = %err, "converging after a readiness change (the next pass retries)");
        }
        Ok(changed)
    }

    /// What is wrong with an endpoint's devices on this host (empty: all
    /// is as it should be).
    pub async fn check(&self, e: &EndpointRecord) -> Result<(NetworkRecord, Vec<String>)> {
        let net = self.cluster.network(&e.network_id).await?;
        let mut problems = Vec::new();
        if e.host != self.cluster.host {
            problems.push(format!("endpoint {} is on host {}, not this one", e.id, e.host));
            return Ok((net, problems));
        }
        let host_if = model::host_ifname(&e.id);
        let bridge = model::bridge_name(&net.id);
        let observed = self.dataplane.observe(false).await.map_err(|e| AgentError::Internal(e.to_string()))?;
        match observed.links.get(&host_if) {
            None => problems.push(format!("host interface {host_if} is missing")),
            Some(l) if !l.up => problems.push(format!("host interface {host_if} is down")),
            Some(l) if l.master.as_deref() != Some(bridge.as_str()) => {
                problems.push(format!("host interface {host_if} is not a port of bridge {bridge}"))
            }
            Some(_) => {}
        }
        let want = ipnet::IpNet::new(e.ip, net.subnet.prefix_len()).map_err(|e| AgentError::Internal(e.to_string()))?;
        let want6 = match (e.ip6, net.subnet6) {
            (Some(a), Some(s)) => {
                Some(ipnet::IpNet::new(a, s.prefix_len()).map_err(|e| AgentError::Internal(e.to_string()))?)
            }
            _ => None,
        };
        match self.dataplane.container_link(&e.netns, &e.ifname).await {
            Err(err) => problems.push(err.to_string()),
            Ok(None) => problems.push(format!("interface {} is missing in {}", e.ifname, e.netns.display())),
            Ok(Some(l)) => {
                if !l.up {
                    problems.push(format!("interface {} is down", e.ifname));
                }
                for want in std::iter::once(want).chain(want6).filter(|w| !l.addrs.contains(w)) {
                    problems.push(format!("interface {} lacks address {want}", e.ifname));
                }
                if l.mac != e.mac {
                    problems.push(format!("interface {} has MAC {}, not {}", e.ifname, l.mac, e.mac));
                }
            }
        }
        Ok((net, problems))
    }

    /// Every endpoint (of one network), each with its network.
    pub async fn endpoints(&self, network: Option<&str>) -> Result<Vec<(EndpointRecord, Option<NetworkRecord>)>> {
        let nets = self.cluster.networks().await?;
        let filter = match network {
            None => None,
            Some(n) => Some(self.cluster.network(n).await?.id),
        };
        Ok(self
            .cluster
            .endpoints()
            .await?
            .into_iter()
            .filter(|e| filter.as_ref().is_none_or(|f| &e.network_id == f))
            .map(|e| {
                let n = nets.iter().find(|n| n.id == e.network_id).cloned();
                (e, n)
            })
            .collect())
    }
}

/// An attach refused because the store cannot be reached says so, and
/// what still works.
fn store_down(e: AgentError) -> AgentError {
    match e {
        AgentError::Unavailable(why) => AgentError::Unavailable(format!(
            "cannot attach while this host cannot reach the cluster store ({why}); endpoints already attached keep working: try again once the store is back"
        )),
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::app::testing::{attachable, lab};
    use crate::dataplane::Action;

    async fn network(app: &App, name: &str, subnet: &str) -> NetworkRecord {
        app.create_network(attachable(name, Some(subnet))).await.unwrap()
    }

    /// Nothing of an endpoint is left: no record, no address, no
    /// namespace, no device.
    async fn nothing_left(l: &crate::app::testing::Lab, subnet: &str) {
        assert!(l.app.cluster.all_endpoints().await.unwrap().is_empty(), "an endpoint record is left");
        assert!(l.dp.namespaces.lock().unwrap().is_empty(), "a namespace is left");
        let links = l.dp.with_state(|s| s.links.keys().filter(|n| n.starts_with(model::VETH_PREFIX)).count());
        assert_eq!(links, 0, "a veth is left");
        // The first address is free again: a new attach gets it.
        let again = l.app.attach(AttachRequest::new("n", EndpointKind::Adhoc)).await.unwrap();
        let first: ipnet::IpNet = subnet.parse().unwrap();
        assert_eq!(again.endpoint.ip, first.hosts().nth(1).unwrap(), "the address was not released");
    }

    #[tokio::test]
    async fn attach_creates_a_managed_namespace_and_the_endpoint() {
        let l = lab();
        network(&l.app, "n", "10.7.0.0/24").await;
        let mut req = AttachRequest::new("n", EndpointKind::Adhoc);
        req.name = Some("web".into());
        let a = l.app.attach(req).await.unwrap();
        assert_eq!(a.endpoint.name, "web");
        assert_eq!(a.endpoint.ip.to_string(), "10.7.0.2");
        assert!(a.endpoint.managed_netns);
        assert!(l.dp.namespaces.lock().unwrap().contains(&a.endpoint.netns));
        assert!(
            l.dp.take_log().iter().any(|x| matches!(x, Action::CreateEndpoint(s) if s.endpoint_id == a.endpoint.id))
        );
    }

    /// An IPv6-only network: its one subnet and gateway IPv6, an
    /// endpoint's one address IPv6 (its MAC from it), its spec with no IPv4
    /// address or route and the IPv6 ones, its program entry with its
    /// IPv6 address; refusals for a second IPv6 subnet and an IPv4 gateway.
    #[tokio::test]
    async fn an_ipv6_only_endpoint_has_one_ipv6_address() {
        let l = crate::app::testing::ebpf_lab(std::time::Duration::ZERO);
        let net = l.app.create_network(attachable("six", Some("fd00:7a::/64"))).await.unwrap();
        assert_eq!(
            (net.subnet.to_string(), net.gateway.map(|g| g.to_string())),
            ("fd00:7a::/64".into(), Some("fd00:7a::1".into()))
        );
        assert_eq!((net.subnet6, net.gateway6, net.ipv6_only()), (None, None, true));
        let a = l.app.attach(AttachRequest::new("six", EndpointKind::Adhoc)).await.unwrap().endpoint;
        assert_eq!((a.ip.to_string(), a.ip6), ("fd00:7a::2".into(), None));
        assert_eq!(a.mac.to_string(), "02:42:00:00:00:02", "derived from the IPv6 address");
        let log = l.dp.take_log();
        let spec = log.iter().find_map(|x| match x {
            Action::CreateEndpoint(s) if s.endpoint_id == a.id => Some(s.clone()),
            _ => None,
        });
        let spec = spec.expect("created");
        assert_eq!((spec.addr, spec.default_via), (None, None), "no IPv4");
        assert_eq!(spec.addr6.map(|x| x.to_string()).as_deref(), Some("fd00:7a::2/64"));
        assert_eq!(spec.default_via6.map(|x| x.to_string()).as_deref(), Some("fd00:7a::1"));
        let prog = log.iter().find_map(|x| match x {
            Action::AttachProgram { ifname, ip, ip6, .. } if *ifname == spec.host_if => Some((*ip, *ip6)),
            _ => None,
        });
        assert_eq!(prog, Some((None, Some(a.ip))), "the program knows its IPv6 address");
        let mut two = attachable("two", Some("fd00:7b::/64"));
        two.subnet6 = Some("fd00:7c::/64".parse().unwrap());
        assert!(l.app.create_network(two).await.unwrap_err().to_string().contains("two IPv6 subnets"));
        let mut gw4 = attachable("gw4", Some("fd00:7d::/64"));
        gw4.gateway = Some("10.0.0.1".parse().unwrap());
        assert!(l.app.create_network(gw4).await.unwrap_err().to_string().contains("IPv6-only"));
    }

    #[tokio::test]
    async fn a_dual_stack_endpoint_gets_both_addresses_and_gives_both_back() {
        let l = lab();
        let mut req = attachable("n", Some("10.7.9.0/24"));
        req.subnet6 = Some("fd00:79::/64".parse().unwrap());
        let net = l.app.create_network(req).await.unwrap();
        assert_eq!(
            (net.subnet6.map(|s| s.to_string()), net.gateway6.map(|g| g.to_string())),
            (Some("fd00:79::/64".into()), Some("fd00:79::1".into()))
        );
        let taken = || async { l.app.cluster.ipam.addresses(&net.id).await.unwrap().len() };
        assert_eq!(taken().await, 2, "both gateways");
        let a = l.app.attach(AttachRequest::new("n", EndpointKind::Adhoc)).await.unwrap();
        assert_eq!(a.endpoint.ip6.map(|x| x.to_string()).as_deref(), Some("fd00:79::2"));
        let spec = l.dp.take_log().into_iter().find_map(|x| match x {
            Action::CreateEndpoint(s) if s.endpoint_id == a.endpoint.id => Some(s),
            _ => None,
        });
        let spec = spec.expect("created");
        assert_eq!(spec.addr6.map(|x| x.to_string()).as_deref(), Some("fd00:79::2/64"));
        assert_eq!(spec.default_via6.map(|x| x.to_string()).as_deref(), Some("fd00:79::1"));
        assert_eq!(taken().await, 4);
        // A failed attach leaves neither address taken.
        l.dp.failing_netns.store(true, Ordering::Relaxed);
        assert!(l.app.attach(AttachRequest::new("n", EndpointKind::Adhoc)).await.is_err());
        l.dp.failing_netns.store(false, Ordering::Relaxed);
        assert_eq!(taken().await, 4, "the failed attach's addresses went back");
        // An engine that configures the interface itself (Docker) gets no
        // IPv6 address it would not put on the container.
        let docker = crate::state::NewEndpoint {
            id: model::new_id(),
            network: "n".into(),
            name: Some("d".into()),
            ip: None,
            labels: Default::default(),
            netns: "/run/netns/none".into(),
            managed_netns: false,
            ifname: "eth0".into(),
            kind: EndpointKind::Docker,
            container_id: String::new(),
            ip6: None,
            reserved: false,
        };
        let d = l.app.cluster.create_endpoint(docker).await.unwrap();
        assert_eq!(d.ip6, None);
        assert_eq!(taken().await, 5);
        // Its records removed: both of its addresses go with them.
        l.app.cluster.delete_endpoint_records(&net, &a.endpoint).await.unwrap();
        let left: Vec<String> =
            l.app.cluster.ipam.addresses(&net.id).await.unwrap().into_iter().map(|(ip, _)| ip.to_string()).collect();
        assert_eq!(left.len(), 3, "the gateways and d's address: {left:?}");
        assert!(!left.contains(&"fd00:79::2".to_string()) && !left.contains(&"10.7.9.2".to_string()), "{left:?}");
    }

    #[tokio::test]
    async fn attach_to_a_missing_network_creates_nothing() {
        let l = lab();
        let err = l.app.attach(AttachRequest::new("nope", EndpointKind::Adhoc)).await.unwrap_err();
        assert!(matches!(err, AgentError::NotFound(_)), "{err:?}");
        assert!(l.dp.namespaces.lock().unwrap().is_empty());
        assert!(l.dp.take_log().is_empty(), "the kernel was touched");
    }

    #[tokio::test]
    async fn attach_rolls_back_when_the_namespace_cannot_be_made() {
        let l = lab();
        network(&l.app, "n", "10.7.1.0/24").await;
        l.dp.failing_netns.store(true, Ordering::Relaxed);
        let err = l.app.attach(AttachRequest::new("n", EndpointKind::Adhoc)).await.unwrap_err();
        assert!(err.to_string().contains("creating a network namespace"), "{err}");
        l.dp.failing_netns.store(false, Ordering::Relaxed);
        nothing_left(&l, "10.7.1.0/24").await;
    }

    #[tokio::test]
    async fn attach_rolls_back_when_the_store_refuses_the_endpoint() {
        let l = lab();
        network(&l.app, "n", "10.7.2.0/24").await;
        let mut req = AttachRequest::new("n", EndpointKind::Adhoc);
        req.name = Some("web".into());
        let first = l.app.attach(req.clone()).await.unwrap();
        let err = l.app.attach(req).await.unwrap_err();
        assert!(matches!(err, AgentError::AlreadyExists(_)), "{err:?}");
        assert_eq!(l.dp.namespaces.lock().unwrap().len(), 1, "the second attach's namespace is left");
        assert!(l.dp.namespaces.lock().unwrap().contains(&first.endpoint.netns));
    }

    #[tokio::test]
    async fn attach_rolls_back_when_the_kernel_fails_the_endpoint() {
        let l = lab();
        network(&l.app, "n", "10.7.3.0/24").await;
        // Every endpoint creation fails in the kernel.
        l.dp.fail_every_endpoint.store(true, Ordering::Relaxed);
        let err = l.app.attach(AttachRequest::new("n", EndpointKind::Adhoc)).await.unwrap_err();
        assert!(matches!(err, AgentError::FailedPrecondition(_)), "{err:?}");
        assert!(err.to_string().contains("nothing was left behind"), "{err}");
        l.dp.fail_every_endpoint.store(false, Ordering::Relaxed);
        nothing_left(&l, "10.7.3.0/24").await;
    }

    #[tokio::test]
    async fn an_attach_publishes_its_ports_or_leaves_nothing() {
        use crate::app::ports::PortRequest;
        use crate::model::Proto;
        let l = lab();
        network(&l.app, "n", "10.7.6.0/24").await;
        let port = |host_port, port| PortRequest { proto: Proto::Tcp, host_ip: None, host_port, port };
        let mut req = AttachRequest::new("n", EndpointKind::Cni);
        req.publish = vec![port(18080, 80)];
        let a = l.app.attach(req).await.unwrap();
        let rec = l.app.cluster.find_endpoint(&a.endpoint.id, None).await.unwrap();
        assert_eq!(rec.ports.iter().map(|p| (p.host_port, p.port)).collect::<Vec<_>>(), vec![(18080, 80)]);
        // A second endpoint asking for a taken host port (and a free one):
        // refused naming the holder, and nothing of it is left.
        l.dp.held_ports.lock().unwrap().insert((Proto::Tcp, 18081), "process \"nginx\" (pid 42)".into());
        for taken in [18080, 18081] {
            let mut req = AttachRequest::new("n", EndpointKind::Cni);
            req.publish = vec![port(18090, 90), port(taken, 80)];
            let err = l.app.attach(req).await.unwrap_err();
            assert!(matches!(err, AgentError::FailedPrecondition(_)), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains(&taken.to_string()) && msg.contains("nothing was left behind"), "{msg}");
            let all = l.app.cluster.all_endpoints().await.unwrap();
            assert_eq!(all.len(), 1, "the refused endpoint is left: {all:?}");
            assert!(all[0].ports.iter().all(|p| p.host_port != 18090), "half published");
        }
    }

    #[tokio::test]
    async fn attach_validates_before_touching_anything() {
        let l = lab();
        network(&l.app, "n", "10.7.4.0/24").await;
        let mut bad_name = AttachRequest::new("n", EndpointKind::Adhoc);
        bad_name.name = Some("no spaces".into());
        let mut reserved = AttachRequest::new("n", EndpointKind::Adhoc);
        reserved.reserved = true;
        let mut ifname = AttachRequest::new("n", EndpointKind::Adhoc);
        ifname.ifname = "an-interface-name-too-long".into();
        let mut netns = AttachRequest::new("n", EndpointKind::Adhoc);
        netns.netns = Some("/nonexistent/trellis-netns".into());
        for r in [bad_name, reserved, ifname, netns] {
            let err = l.app.attach(r.clone()).await.unwrap_err();
            assert!(matches!(err, AgentError::InvalidArgument(_)), "{r:?}: {err:?}");
        }
        assert!(l.dp.namespaces.lock().unwrap().is_empty());
        assert!(l.app.cluster.all_endpoints().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn detach_removes_devices_then_record_address_and_namespace() {
        let l = lab();
        network(&l.app, "n", "10.7.5.0/24").await;
        let a = l.app.attach(AttachRequest::new("n", EndpointKind::Adhoc)).await.unwrap();
        let e = l.app.find(EndpointRef::Name { endpoint: &a.endpoint.id, network: None }).await.unwrap();
        l.app.detach(&e).await.unwrap();
        // Gone for users at once.
        assert!(l.app.endpoints(None).await.unwrap().is_empty());
        // The next pass removes the devices and settles the rest.
        l.app.converge().await.unwrap();
        nothing_left(&l, "10.7.5.0/24").await;
        // A second detach of the same id is no error (an engine retrying).
        l.app.detach_id(&a.endpoint.id).await.unwrap();
    }

    /// Make `id`'s record `secs` older, as if it was attached back then.
    async fn age(l: &crate::app::testing::Lab, id: &str, secs: i64) {
        let key = model::endpoint_key(id);
        let kv = l.store.get(&key).await.unwrap().unwrap();
        let mut e: EndpointRecord = serde_json::from_slice(&kv.value).unwrap();
        e.created_unix -= secs;
        l.store.txn(vec![], vec![trellis_store::Op::put(key, serde_json::to_vec(&e).unwrap())]).await.unwrap();
    }

    /// A Docker endpoint with a published port, its sandbox at `sandbox`.
    async fn docker_endpoint(
        l: &crate::app::testing::Lab,
        sandbox: &std::path::Path,
        host_port: u16,
    ) -> EndpointRecord {
        use crate::app::ports::PortRequest;
        use crate::model::Proto;
        let mut req = AttachRequest::new("n", EndpointKind::Docker);
        req.netns = Some(sandbox.to_path_buf());
        let e = l.app.attach(req).await.unwrap().endpoint;
        l.app.publish(&e.id, &[PortRequest { proto: Proto::Tcp, host_ip: None, host_port, port: 80 }]).await.unwrap();
        e
    }

    /// The host ports the egress rules last applied publish.
    fn published(l: &crate::app::testing::Lab) -> Vec<u16> {
        let rules = l.dp.take_log().into_iter().rev().find_map(|a| match a {
            Action::ApplyEgress(r) => Some(r),
            _ => None,
        });
        rules.map(|r| r.published.iter().map(|p| p.host_port).collect()).unwrap_or_default()
    }

    #[tokio::test]
    async fn an_endpoint_its_engine_forgot_goes_only_when_the_kernel_agrees() {
        let l = lab();
        network(&l.app, "n", "10.7.7.0/24").await;
        let dir = tempfile::tempdir().unwrap();
        // A sandbox that is still a namespace.
        let live = dir.path().join("live");
        l.dp.namespaces.lock().unwrap().insert(live.clone());
        let e = docker_endpoint(&l, &live, 18080).await;
        assert_eq!(published(&l), vec![18080]);

        // Young: its engine may still be setting it up.
        let kept = l.app.collect_unlisted(&e.id).await.unwrap();
        assert!(matches!(&kept, Unlisted::Kept(why) if why.contains("old")), "{kept:?}");
        age(&l, &e.id, ENGINE_GRACE_S + 1).await;
        // Its sandbox is a namespace holding its interface: a live
        // container (the engine's answer alone does not remove it).
        let kept = l.app.collect_unlisted(&e.id).await.unwrap();
        assert!(matches!(&kept, Unlisted::Kept(why) if why.contains("live network namespace")), "{kept:?}");
        assert!(l.app.cluster.find_endpoint(&e.id, None).await.is_ok());

        // The engine moved its interface back to the host (disconnected
        // while the agent was down): collected, its port unpublished.
        let peer = model::peer_ifname(&e.id);
        l.dp.with_state(|s| s.links.insert(peer.clone(), Default::default()));
        let done = l.app.collect_unlisted(&e.id).await.unwrap();
        assert!(matches!(&done, Unlisted::Collected(why) if why.contains(&peer)), "{done:?}");
        assert!(published(&l).is_empty(), "the port is still published");
        assert!(matches!(l.app.cluster.find_endpoint(&e.id, None).await, Err(AgentError::NotFound(_))));
        assert_eq!(l.app.collect_unlisted(&e.id).await.unwrap(), Unlisted::AlreadyGone);
        assert_eq!(l.app.collect_unlisted("nosuchendpoint").await.unwrap(), Unlisted::AlreadyGone);

        // Its sandbox is gone (`docker rm` while the agent was down), or is
        // a file that is no namespace any more (unmounted, not yet removed).
        let plain = dir.path().join("unmounted");
        std::fs::write(&plain, b"").unwrap();
        for (sandbox, why) in [(dir.path().join("removed"), "is gone"), (plain, "no network namespace")] {
            let e = docker_endpoint(&l, &sandbox, 18081).await;
            age(&l, &e.id, ENGINE_GRACE_S + 1).await;
            let done = l.app.collect_unlisted(&e.id).await.unwrap();
            assert!(matches!(&done, Unlisted::Collected(w) if w.contains(why)), "{sandbox:?}: {done:?}");
            assert!(published(&l).is_empty(), "the port is still published");
        }
        // Records, addresses and devices (the interface moved back to the
        // host included, seen by a full pass): nothing left once settled.
        l.app.converge().await.unwrap();
        l.app.reconciler.full_pass().await.unwrap();
        assert!(!l.dp.with_state(|s| s.links.contains_key(&peer)), "the moved-back interface is left");
        l.dp.namespaces.lock().unwrap().remove(&live);
        nothing_left(&l, "10.7.7.0/24").await;
    }

    /// An eBPF host with network `n` (10.7.9.0/24), VIP service `web` and
    /// backends `b1`, `b2`; detached backends drain `drain`.
    async fn web(drain: std::time::Duration) -> (crate::app::testing::Lab, EndpointRecord, EndpointRecord) {
        let l = crate::app::testing::ebpf_lab(drain);
        network(&l.app, "n", "10.7.9.0/24").await;
        let mut bs = Vec::new();
        for name in ["b1", "b2"] {
            let mut req = AttachRequest::new("n", EndpointKind::Adhoc);
            req.name = Some(name.into());
            req.labels.insert(model::SERVICE_LABEL.into(), "web".into());
            bs.push(l.app.attach(req).await.unwrap().endpoint);
        }
        let svc = crate::state::NewService {
            name: "web".into(),
            network: "n".into(),
            mode: model::ServiceMode::Vip,
            ports: vec![model::ServicePort { port: 80, proto: model::Proto::Tcp, target: 8080 }],
            selector: Default::default(),
            publish: vec![],
        };
        l.app.create_service(crate::app::CreateService { service: svc, publish: vec![] }).await.unwrap();
        let b2 = bs.pop().unwrap();
        (l, bs.pop().unwrap(), b2)
    }

    /// This host's tables now: the Maglev backends of `web` and whether
    /// its backend entry for `e` is in the (fake) kernel.
    fn tables_of(l: &crate::app::testing::Lab, e: &EndpointRecord) -> (Vec<String>, bool) {
        let t = l.app.reconciler.last_desired().tables.clone();
        let id = t.maglev.keys().next().copied().expect("web's table");
        let std::net::IpAddr::V4(v4) = e.ip else { unreachable!() };
        let key = trellis_ebpf::BackendKey { svc_id: id, ip: trellis_ebpf::be(v4) };
        let in_kernel = l.dp.with_state(|s| s.tables.backends.contains_key(&key));
        (t.maglev[&id].iter().map(|ip| ip.to_string()).collect(), in_kernel)
    }

    #[tokio::test]
    async fn a_detached_backend_drains_then_goes() {
        let drain = std::time::Duration::from_secs(30);
        let (l, b1, b2) = web(drain).await;
        assert_eq!(tables_of(&l, &b1), (vec![b1.ip.to_string(), b2.ip.to_string()], true));
        // Detached: gone for users at once, out of the Maglev table when the
        // call returns (no new connection), its backend entry and veth kept
        // (its connections flow), and the call did not wait.
        let t0 = std::time::Instant::now();
        assert_eq!(l.app.detach(&b1).await.unwrap(), Some(drain));
        assert!(t0.elapsed() < std::time::Duration::from_secs(5), "the detach waited for the drain");
        assert!(l.app.find(EndpointRef::Name { endpoint: "b1", network: None }).await.is_err());
        assert_eq!(tables_of(&l, &b1), (vec![b2.ip.to_string()], true));
        assert!(l.dp.with_state(|s| s.links.contains_key(&model::host_ifname(&b1.id))), "its veth went");
        let view = l.app.service("web").await.unwrap();
        let mut states: Vec<(&str, model::BackendState)> =
            view.backends.iter().map(|b| (b.endpoint.name.as_str(), b.state)).collect();
        states.sort_by_key(|(name, _)| *name);
        assert_eq!(states, [("b1", model::BackendState::Draining), ("b2", model::BackendState::Serving)]);
        // Its name is free at once (a replacement may take it).
        let mut again = AttachRequest::new("n", EndpointKind::Adhoc);
        again.name = Some("b1".into());
        let b1b = l.app.attach(again).await.unwrap().endpoint;
        assert_ne!(b1b.ip, b1.ip, "the draining endpoint keeps its address");
        // More passes change nothing until the drain ends.
        l.app.converge().await.unwrap();
        assert!(l.app.cluster.endpoint_record(&b1.id).await.unwrap().is_some_and(|e| e.draining()));
        // The drain ends: devices, entry, record and address go.
        l.app.cluster.end_drain(&b1.id).await.unwrap();
        l.app.converge().await.unwrap();
        assert_eq!(tables_of(&l, &b1), (vec![b2.ip.to_string()], false));
        assert!(!l.dp.with_state(|s| s.links.contains_key(&model::host_ifname(&b1.id))));
        assert!(l.app.cluster.endpoint_record(&b1.id).await.unwrap().is_none());
        assert!(!l.dp.namespaces.lock().unwrap().contains(&b1.netns), "its namespace is left");
    }

    #[tokio::test]
    async fn only_ready_backends_of_vip_services_drain() {
        let drain = std::time::Duration::from_secs(30);
        let (l, b1, b2) = web(drain).await;
        // No service: removed at once, no delay at all.
        let plain = l.app.attach(AttachRequest::new("n", EndpointKind::Adhoc)).await.unwrap().endpoint;
        assert_eq!(l.app.detach(&plain).await.unwrap(), None);
        l.app.converge().await.unwrap();
        assert!(l.app.cluster.endpoint_record(&plain.id).await.unwrap().is_none());
        // An unready backend has no connection to keep.
        assert!(l.app.cluster.set_ready(&b1.id, false).await.unwrap());
        let b1 = l.app.cluster.endpoint_record(&b1.id).await.unwrap().unwrap();
        assert_eq!(l.app.detach(&b1).await.unwrap(), None);
        // --drain-ms 0: none.
        let (l0, _, b0) = web(std::time::Duration::ZERO).await;
        assert_eq!(l0.app.detach(&b0).await.unwrap(), None);
        l0.app.converge().await.unwrap();
        assert!(l0.app.cluster.endpoint_record(&b0.id).await.unwrap().is_none());
        // A dnsrr service has no flows in the datapath to keep.
        l.app.remove_service("web").await.unwrap();
        let rr = crate::state::NewService {
            name: "web".into(),
            network: "n".into(),
            mode: model::ServiceMode::Dnsrr,
            ports: vec![],
            selector: Default::default(),
            publish: vec![],
        };
        l.app.create_service(crate::app::CreateService { service: rr, publish: vec![] }).await.unwrap();
        assert_eq!(l.app.detach(&b2).await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_unready_backend_leaves_both_tables_and_comes_back_when_ready() {
        let (l, b1, b2) = web(std::time::Duration::from_secs(30)).await;
        // Readiness goes by container: b1 is the engine's container c0ffee.
        l.app.cluster.set_identity(&b1.id, "c0ffee", None, vec![], b1.labels.clone(), true).await.unwrap();
        l.app.converge().await.unwrap();
        assert_eq!(l.app.set_container_ready(EndpointKind::Adhoc, "c0ffee", false).await.unwrap(), 1);
        assert_eq!(tables_of(&l, &b1), (vec![b2.ip.to_string()], false), "no connection, new or old");
        let view = l.app.service("web").await.unwrap();
        assert_eq!(view.backends.iter().find(|b| b.endpoint.id == b1.id).unwrap().state, model::BackendState::Unready);
        assert_eq!(l.app.set_container_ready(EndpointKind::Adhoc, "c0ffee", false).await.unwrap(), 0, "no change");
        assert_eq!(l.app.set_container_ready(EndpointKind::Docker, "c0ffee", true).await.unwrap(), 0, "another kind");
        assert_eq!(l.app.set_container_ready(EndpointKind::Adhoc, "c0ffee", true).await.unwrap(), 1);
        assert_eq!(tables_of(&l, &b1), (vec![b1.ip.to_string(), b2.ip.to_string()], true));
    }

    #[tokio::test]
    async fn a_drain_whose_namespace_died_ends_at_once() {
        let (l, b1, _) = web(std::time::Duration::from_secs(30)).await;
        l.app.detach(&b1).await.unwrap();
        // The namespace goes (its veth with it): the next full pass finds it
        // gone, and nothing is left to keep.
        l.dp.failing.lock().unwrap().push(b1.id.clone());
        l.dp.with_state(|s| s.links.remove(&model::host_ifname(&b1.id)));
        let r = l.app.reconciler.full_pass().await.unwrap();
        crate::app::settle(&l.app.cluster, l.dp.as_ref(), &r).await;
        let e = l.app.cluster.endpoint_record(&b1.id).await.unwrap().unwrap();
        assert!(e.deleting && !e.draining(), "{e:?}");
        l.app.converge().await.unwrap();
        assert!(l.app.cluster.endpoint_record(&b1.id).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn find_needs_a_name_or_a_container() {
        let l = lab();
        let err = l.app.find(EndpointRef::Name { endpoint: "", network: None }).await.unwrap_err();
        assert!(matches!(err, AgentError::InvalidArgument(_)));
        let err =
            l.app.find(EndpointRef::Container { container_id: "", ifname: "eth0", network: None }).await.unwrap_err();
        assert!(matches!(err, AgentError::InvalidArgument(_)));
        let err = l.app.find(EndpointRef::Name { endpoint: "ghost", network: None }).await.unwrap_err();
        assert!(matches!(err, AgentError::NotFound(_)));
    }
}
