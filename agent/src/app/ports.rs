//! Published ports: a host port of an endpoint's host forwarded to the
//! endpoint's port (`docker run -p`; CNI `portMappings` next). Typed, no
//! engine's types: the front doors turn their wire format into
//! [`PortRequest`]s.
//!
//! A host port is one endpoint's on its host: one already published to
//! another endpoint of this host, or held by a process of the agent's
//! namespace (a listening TCP socket, a bound UDP socket), is refused with
//! its holder named. All of an endpoint's ports are published or none. The
//! ports live on the endpoint's record, so they go with it (detach, the
//! collection of an endpoint whose namespace vanished) and survive an
//! agent restart; the egress rules follow the records.

use std::net::IpAddr;

use super::{AgentError, App, Result};
use crate::model::{EndpointRecord, Proto, PublishedPort};

/// Where a host port is picked when none is asked for (`-p PORT`, `-P`):
/// the kernel's default ephemeral range, as Docker does.
pub const EPHEMERAL: std::ops::RangeInclusive<u16> = 32768..=60999;

/// One port to publish, as a front door parsed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRequest {
    pub proto: Proto,
    /// `None`: every address of the host.
    pub host_ip: Option<IpAddr>,
    /// 0: pick one from [`EPHEMERAL`].
    pub host_port: u16,
    /// The endpoint's port.
    pub port: u16,
}

/// What holds host ports already: this host's other endpoints' published
/// ports, and the mesh's (cluster-wide).
struct Others {
    endpoints: Vec<(EndpointRecord, PublishedPort)>,
    mesh: std::collections::BTreeMap<(Proto, u16), String>,
}

impl App {
    /// Publish `ports` to endpoint `id` (of this host), replacing what it
    /// had, and converge: the ports as bound (picked host ports filled in),
    /// or an error with nothing changed.
    pub async fn publish(&self, id: &str, ports: &[PortRequest]) -> Result<Vec<PublishedPort>> {
        let _one_at_a_time = self.ports_lock.lock().await;
        let ep = self.cluster.find_endpoint(id, None).await?;
        if ep.host != self.cluster.host || ep.deleting {
            return Err(AgentError::FailedPrecondition(format!(
                "endpoint {} is not attached on this host: its ports cannot be published here",
                ep.name
            )));
        }
        if ports.is_empty() && ep.ports.is_empty() {
            return Ok(Vec::new());
        }
        if !ports.is_empty() {
            let net = self.cluster.network(&ep.network_id).await?;
            if net.internal {
                return Err(AgentError::InvalidArgument(format!(
                    "network {:?} is internal: nothing outside it reaches its endpoints, so no port can be published to them",
                    ep.network
                )));
            }
            if net.ipv6_only() {
                return Err(AgentError::InvalidArgument(format!(
                    "network {:?} is IPv6-only: published ports are IPv4 only for now (use a dual-stack network)",
                    ep.network
                )));
            }
        }
        let others: Vec<(EndpointRecord, PublishedPort)> = self
            .cluster
            .endpoints()
            .await?
            .into_iter()
            .filter(|e| e.host == self.cluster.host && e.id != ep.id && !e.deleting)
            .flat_map(|e| e.ports.clone().into_iter().map(move |p| (e.clone(), p)))
            .collect();
        let mesh = self.cluster.mesh_claims().await?;
        let others = Others { endpoints: others, mesh };
        let mut chosen: Vec<PublishedPort> = Vec::with_capacity(ports.len());
        for r in ports {
            if r.port == 0 {
                return Err(AgentError::InvalidArgument("published port 0: the container's port is required".into()));
            }
            if matches!(r.host_ip, Some(IpAddr::V6(_))) {
                return Err(AgentError::InvalidArgument(format!(
                    "host address {}: published ports are IPv4 only for now",
                    r.host_ip.expect("some")
                )));
            }
            let p = if r.host_port != 0 {
                let p = PublishedPort { proto: r.proto, host_ip: r.host_ip, host_port: r.host_port, port: r.port };
                if let Some(why) = self.taken(&p, &others, &chosen).await? {
                    return Err(AgentError::AlreadyExists(format!(
                        "host port {p} cannot be published: it is taken by {why}; nothing was published"
                    )));
                }
                p
            } else {
                // The port picked before for the same request, if any (an
                // engine asking again).
                let before = ep.ports.iter().find(|q| q.proto == r.proto && q.host_ip == r.host_ip && q.port == r.port);
                match before {
                    Some(q) if self.taken(q, &others, &chosen).await?.is_none() => *q,
                    _ => self.pick(r, &others, &chosen).await?,
                }
            };
            chosen.push(p);
        }
        if chosen == ep.ports {
            return Ok(chosen);
        }
        let old = ep.ports.clone();
        self.cluster.set_ports(&ep.id, chosen.clone()).await?;
        if let Err(e) = self.converge().await {
            if let Err(undo) = self.cluster.set_ports(&ep.id, old).await {
                tracing::error!(endpoint = %ep.id, error = %undo, "restoring the published ports after a failed pass");
            }
            let _ = self.reconciler.pass().await;
            return Err(AgentError::FailedPrecondition(format!(
                "publishing the ports failed: {e}; nothing was published"
            )));
        }
        tracing::info!(endpoint = %ep.id, name = %ep.name, ports = ?chosen.iter().map(|p| format!("{p}->{}", p.port)).collect::<Vec<_>>(), "ports published");
        Ok(chosen)
    }

    /// Unpublish every port of endpoint `id` and converge (an endpoint
    /// already gone is no error).
    pub async fn unpublish(&self, id: &str) -> Result<()> {
        let _one_at_a_time = self.ports_lock.lock().await;
        let ep = match self.cluster.find_endpoint(id, None).await {
            Ok(e) => e,
            Err(AgentError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if ep.ports.is_empty() {
            return Ok(());
        }
        match self.cluster.set_ports(&ep.id, Vec::new()).await {
            Ok(_) | Err(AgentError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        self.converge().await?;
        tracing::info!(endpoint = %ep.id, name = %ep.name, "ports unpublished");
        Ok(())
    }

    /// Who has `p` already: another endpoint of this host, a port chosen
    /// earlier in the same request, or a process of the host.
    async fn taken(&self, p: &PublishedPort, others: &Others, chosen: &[PublishedPort]) -> Result<Option<String>> {
        if let Some(service) = others.mesh.get(&(p.proto, p.host_port)) {
            return Ok(Some(format!("service {service:?}, published on the routing mesh (every host)")));
        }
        if let Some((e, q)) = others.endpoints.iter().find(|(_, q)| q.clashes(p)) {
            let container = if e.container_id.is_empty() {
                String::new()
            } else {
                format!(", container {}", &e.container_id[..e.container_id.len().min(12)])
            };
            return Ok(Some(format!(
                "Trellis endpoint {:?} (network {:?}{container}), published as {q}",
                e.name, e.network
            )));
        }
        if chosen.iter().any(|q| q.clashes(p)) {
            return Ok(Some("another port of the same request".into()));
        }
        let dp = self.dataplane.clone();
        let (proto, port, ip) = (p.proto, p.host_port, p.host_ip);
        tokio::task::spawn_blocking(move || dp.port_holder(proto, port, ip))
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?
            .map_err(|e| AgentError::Internal(format!("checking host port {port}: {e}")))
    }

    /// A free host port for `r` from [`EPHEMERAL`], from a random start.
    async fn pick(&self, r: &PortRequest, others: &Others, chosen: &[PublishedPort]) -> Result<PublishedPort> {
        let (lo, hi) = (*EPHEMERAL.start() as u32, *EPHEMERAL.end() as u32);
        let span = hi - lo + 1;
        let start = rand::random::<u32>() % span;
        for i in 0..span {
            let host_port = (lo + (start + i) % span) as u16;
            let p = PublishedPort { proto: r.proto, host_ip: r.host_ip, host_port, port: r.port };
            if self.taken(&p, others, chosen).await?.is_none() {
                return Ok(p);
            }
        }
        Err(AgentError::Unavailable(format!("no free host port for {}/{} in {lo}-{hi}", r.port, r.proto.as_str())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::testing::{attachable, lab};
    use crate::app::{AttachRequest, EndpointRef};
    use crate::dataplane::Action;
    use crate::dataplane::egress::PublishedRule;
    use crate::model::EndpointKind;

    fn tcp(host_port: u16, port: u16) -> PortRequest {
        PortRequest { proto: Proto::Tcp, host_ip: None, host_port, port }
    }

    async fn endpoint(l: &crate::app::testing::Lab, net: &str) -> EndpointRecord {
        l.app.attach(AttachRequest::new(net, EndpointKind::Adhoc)).await.unwrap().endpoint
    }

    /// The published ports of the last egress rules applied.
    fn applied(l: &crate::app::testing::Lab) -> Vec<PublishedRule> {
        l.dp.take_log()
            .into_iter()
            .rev()
            .find_map(|a| match a {
                Action::ApplyEgress(r) => Some(r.published),
                _ => None,
            })
            .expect("the rules were applied")
    }

    #[tokio::test]
    async fn fixed_and_picked_ports_are_recorded_and_become_rules() {
        let l = lab();
        l.app.create_network(attachable("n", Some("10.9.0.0/24"))).await.unwrap();
        let e = endpoint(&l, "n").await;
        let udp =
            PortRequest { proto: Proto::Udp, host_ip: Some("127.0.0.1".parse().unwrap()), host_port: 5353, port: 53 };
        let got = l.app.publish(&e.id, &[tcp(8080, 80), udp, tcp(0, 9000)]).await.unwrap();
        assert_eq!(got[0], PublishedPort { proto: Proto::Tcp, host_ip: None, host_port: 8080, port: 80 });
        assert_eq!(got[1].host_port, 5353);
        assert!(EPHEMERAL.contains(&got[2].host_port), "{got:?}");
        let rec = l.app.cluster.find_endpoint(&e.id, None).await.unwrap();
        assert_eq!(rec.ports, got, "recorded with the endpoint");
        let rules = applied(&l);
        assert_eq!(rules.len(), 3);
        assert!(rules.iter().all(|r| r.addr.to_string() == e.ip.to_string()), "{rules:?}");
        // Asked again (an engine retrying), the picked port stays.
        assert_eq!(l.app.publish(&e.id, &[tcp(8080, 80), udp, tcp(0, 9000)]).await.unwrap(), got);
        // Unpublished: the record and the rules lose them.
        l.app.unpublish(&e.id).await.unwrap();
        assert!(l.app.cluster.find_endpoint(&e.id, None).await.unwrap().ports.is_empty());
        assert!(applied(&l).is_empty());
        l.app.unpublish(&e.id).await.unwrap();
        l.app.unpublish("ghost").await.unwrap();
    }

    #[tokio::test]
    async fn a_port_of_another_endpoint_is_refused_naming_it_and_nothing_is_published() {
        let l = lab();
        l.app.create_network(attachable("n", Some("10.9.0.0/24"))).await.unwrap();
        let (a, b) = (endpoint(&l, "n").await, endpoint(&l, "n").await);
        l.app.publish(&a.id, &[tcp(8080, 80)]).await.unwrap();
        let err = l.app.publish(&b.id, &[tcp(8081, 80), tcp(8080, 80)]).await.unwrap_err();
        assert!(matches!(err, AgentError::AlreadyExists(_)), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("8080/tcp") && msg.contains(&a.name), "{msg}");
        assert!(l.app.cluster.find_endpoint(&b.id, None).await.unwrap().ports.is_empty(), "all or nothing");
        // On one address, a port published on every address clashes too;
        // another protocol does not.
        let on_lo = PortRequest { host_ip: Some("127.0.0.1".parse().unwrap()), ..tcp(8080, 80) };
        assert!(l.app.publish(&b.id, &[on_lo]).await.is_err());
        l.app.publish(&b.id, &[PortRequest { proto: Proto::Udp, ..tcp(8080, 80) }]).await.unwrap();
        // Twice in one request.
        let c = endpoint(&l, "n").await;
        let msg = l.app.publish(&c.id, &[tcp(9090, 80), tcp(9090, 81)]).await.unwrap_err().to_string();
        assert!(msg.contains("same request"), "{msg}");
        // Once `a` is detached its port is free again.
        let a = l.app.find(EndpointRef::Name { endpoint: &a.id, network: None }).await.unwrap();
        l.app.detach(&a).await.unwrap();
        l.app.converge().await.unwrap();
        l.app.publish(&c.id, &[tcp(8080, 80)]).await.unwrap();
    }

    #[tokio::test]
    async fn a_port_a_process_holds_is_refused_naming_the_process() {
        let l = lab();
        l.app.create_network(attachable("n", Some("10.9.0.0/24"))).await.unwrap();
        let e = endpoint(&l, "n").await;
        l.dp.held_ports.lock().unwrap().insert((Proto::Tcp, 8080), "process \"nginx\" (pid 42)".into());
        let msg = l.app.publish(&e.id, &[tcp(8081, 80), tcp(8080, 80)]).await.unwrap_err().to_string();
        assert!(msg.contains("8080/tcp") && msg.contains("nginx") && msg.contains("pid 42"), "{msg}");
        assert!(msg.contains("nothing was published"), "{msg}");
        assert!(l.app.cluster.find_endpoint(&e.id, None).await.unwrap().ports.is_empty());
        // A picked port skips what is held.
        let lo = *EPHEMERAL.start();
        {
            let mut held = l.dp.held_ports.lock().unwrap();
            for p in EPHEMERAL.skip(1) {
                held.insert((Proto::Tcp, p), "busy".into());
            }
        }
        assert_eq!(l.app.publish(&e.id, &[tcp(0, 80)]).await.unwrap()[0].host_port, lo);
        l.dp.held_ports.lock().unwrap().insert((Proto::Tcp, lo), "busy".into());
        let other = endpoint(&l, "n").await;
        let err = l.app.publish(&other.id, &[tcp(0, 80)]).await.unwrap_err();
        assert!(err.to_string().contains("no free host port"), "{err}");
    }

    #[tokio::test]
    async fn internal_networks_and_ipv6_host_addresses_are_refused() {
        let l = lab();
        let mut net = attachable("i", Some("10.9.1.0/24"));
        net.internal = true;
        l.app.create_network(net).await.unwrap();
        let e = endpoint(&l, "i").await;
        let msg = l.app.publish(&e.id, &[tcp(8080, 80)]).await.unwrap_err().to_string();
        assert!(msg.contains("internal"), "{msg}");
        l.app.create_network(attachable("n", Some("10.9.0.0/24"))).await.unwrap();
        let e = endpoint(&l, "n").await;
        let v6 = PortRequest { host_ip: Some("::1".parse().unwrap()), ..tcp(8080, 80) };
        assert!(l.app.publish(&e.id, &[v6]).await.unwrap_err().to_string().contains("IPv4"));
        assert!(l.app.publish(&e.id, &[tcp(8080, 0)]).await.is_err());
        // An IPv6-only network's endpoint: refused, nothing published.
        l.app.create_network(attachable("six", Some("fd00:9::/64"))).await.unwrap();
        let e = endpoint(&l, "six").await;
        assert!(e.ip.is_ipv6(), "{e:?}");
        let msg = l.app.publish(&e.id, &[tcp(8080, 80)]).await.unwrap_err().to_string();
        assert!(msg.contains("IPv6-only"), "{msg}");
        assert!(l.app.cluster.find_endpoint(&e.id, None).await.unwrap().ports.is_empty());
    }
}
