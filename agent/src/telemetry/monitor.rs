//! Live flow and drop events: each subscriber's stream of the datapath's
//! events (read from the eBPF ring buffer by
//! [`crate::dataplane::linux::events`]), filtered and named.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::broadcast;
use trellis_ebpf::FlowEvent;
use trellis_plugin_api::proto;

use crate::model;
use crate::state::Cluster;

fn protocol(p: u8) -> &'static str {
    match p {
        0 => "",
        1 => "icmp",
        58 => "icmpv6",
        6 => "tcp",
        17 => "udp",
        _ => "other",
    }
}

/// Who an interface belongs to: endpoint id, name, network.
type Names = HashMap<String, (String, String, String)>;

async fn names(cluster: &Cluster) -> Names {
    cluster
        .endpoints()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.host == cluster.host)
        .map(|e| (model::host_ifname(&e.id), (e.id.clone(), e.name.clone(), e.network.clone())))
        .collect()
}

/// One event as the API shows it (`None`: filtered out).
pub fn describe(
    ev: &FlowEvent,
    interface: &str,
    who: Option<&(String, String, String)>,
    req: &proto::MonitorRequest,
) -> Option<proto::FlowEvent> {
    let verdict = if ev.verdict == 1 { "dropped" } else { "passed" };
    let (id, name, network) = who.cloned().unwrap_or_default();
    if !req.verdict.is_empty() && req.verdict != verdict {
        return None;
    }
    if !req.network.is_empty() && req.network != network {
        return None;
    }
    if !req.endpoint.is_empty() && req.endpoint != name && !(req.endpoint.len() >= 6 && id.starts_with(&req.endpoint)) {
        return None;
    }
    Some(proto::FlowEvent {
        unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
        endpoint: id,
        endpoint_name: name,
        network,
        interface: interface.to_string(),
        verdict: verdict.to_string(),
        reason: if ev.verdict == 1 { ev.reason_name().to_string() } else { String::new() },
        protocol: protocol(ev.proto).to_string(),
        src: ev.src().map(|a| a.to_string()).unwrap_or_default(),
        dst: ev.dst().map(|a| a.to_string()).unwrap_or_default(),
        src_port: ev.sport as u32,
        dst_port: ev.dport as u32,
    })
}

/// A subscriber's stream.
pub fn stream(
    cluster: Arc<Cluster>,
    mut rx: broadcast::Receiver<FlowEvent>,
    req: proto::MonitorRequest,
) -> impl futures::Stream<Item = Result<proto::FlowEvent, tonic::Status>> {
    async_stream(move |tx| async move {
        let mut who = names(&cluster).await;
        loop {
            let ev = match rx.recv().await {
                Ok(ev) => ev,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(missed = n, "a monitor fell behind");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let interface =
                nix::net::if_::if_indextoname(ev.ifindex).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if !who.contains_key(&interface) {
                who = names(&cluster).await;
            }
            if let Some(out) = describe(&ev, &interface, who.get(&interface), &req)
                && tx.send(Ok(out)).await.is_err()
            {
                return; // the client went away
            }
        }
    })
}

/// A stream fed by a task through a channel.
fn async_stream<F, Fut>(f: F) -> impl futures::Stream<Item = Result<proto::FlowEvent, tonic::Status>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<proto::FlowEvent, tonic::Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(verdict: u8) -> FlowEvent {
        let v4 = |a: [u8; 4]| {
            let mut x = [0; 16];
            x[..4].copy_from_slice(&a);
            x
        };
        FlowEvent {
            ifindex: 3,
            saddr: v4([10, 1, 0, 99]),
            daddr: v4([10, 1, 0, 3]),
            sport: 0,
            dport: 0,
            proto: 1,
            verdict,
            reason: 1,
            family: 4,
        }
    }

    #[test]
    fn ipv6_events_show_ipv6_addresses() {
        let (src, dst): (std::net::Ipv6Addr, std::net::Ipv6Addr) =
            ("fd00:1::2".parse().unwrap(), "fd00:1::ffff".parse().unwrap());
        let e = FlowEvent {
            saddr: src.octets(),
            daddr: dst.octets(),
            sport: 40000,
            dport: 80,
            proto: 6,
            family: 6,
            verdict: 0,
            ..ev(0)
        };
        let d = describe(&e, "trv-x", None, &proto::MonitorRequest::default()).unwrap();
        assert_eq!(
            (d.src.as_str(), d.dst.as_str(), d.protocol.as_str(), d.src_port, d.dst_port),
            ("fd00:1::2", "fd00:1::ffff", "tcp", 40000, 80)
        );
        let ping = FlowEvent { proto: 58, ..e };
        assert_eq!(describe(&ping, "trv-x", None, &proto::MonitorRequest::default()).unwrap().protocol, "icmpv6");
        let arp = FlowEvent { family: 0, proto: 0, ..ev(1) };
        let d = describe(&arp, "trv-x", None, &proto::MonitorRequest::default()).unwrap();
        assert_eq!((d.src.as_str(), d.protocol.as_str()), ("", ""), "no address for a frame of neither family");
    }

    #[test]
    fn events_are_named_and_filtered() {
        let who = ("abcdef0123456789".to_string(), "a".to_string(), "app".to_string());
        let any = proto::MonitorRequest::default();
        let d = describe(&ev(1), "trv-x", Some(&who), &any).unwrap();
        assert_eq!((d.verdict.as_str(), d.reason.as_str(), d.protocol.as_str()), ("dropped", "spoofed_ip", "icmp"));
        assert_eq!((d.src.as_str(), d.dst.as_str(), d.endpoint_name.as_str()), ("10.1.0.99", "10.1.0.3", "a"));
        let passed = describe(&ev(0), "trv-x", Some(&who), &any).unwrap();
        assert_eq!((passed.verdict.as_str(), passed.reason.as_str()), ("passed", ""));
        let only = |verdict: &str, network: &str, endpoint: &str| proto::MonitorRequest {
            verdict: verdict.into(),
            network: network.into(),
            endpoint: endpoint.into(),
        };
        assert!(describe(&ev(0), "trv-x", Some(&who), &only("dropped", "", "")).is_none());
        assert!(describe(&ev(1), "trv-x", Some(&who), &only("", "other", "")).is_none());
        assert!(describe(&ev(1), "trv-x", Some(&who), &only("", "app", "abcdef")).is_some());
        assert!(describe(&ev(1), "trv-x", Some(&who), &only("", "", "b")).is_none());
        assert!(describe(&ev(1), "trv-x", None, &only("", "app", "")).is_none(), "unknown interfaces match no network");
    }
}
