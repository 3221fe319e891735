//! The DNS server: answers from the [`Zone`] scoped by the client's source
//! address, everything else forwarded to upstream resolvers through
//! hickory's resolver (TTL-honouring cache, per-server timeouts and
//! failover) with a bound on queries in flight.
//!
//! TCP is hickory's server. UDP is a server of our own around hickory's
//! wire format (EDNS0, truncation with TC for the TCP fallback): a local
//! answer is decoded, answered and sent from the receiving thread, in
//! batches, with no task or channel hop per packet (see [`crate::udp`];
//! hickory's UDP server, a task and a channel hop per packet, measured
//! 10.8 µs of server CPU per query against 8.5 µs for a task of our own,
//! most of either being the kernel's network stack).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_server::Server;
use hickory_server::net::runtime::{Time, TokioRuntimeProvider};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::sync::Semaphore;

use crate::udp::UdpServer;
use crate::zone::{Answer, QType, Zone};

/// TTL of Trellis answers: short, names come and go.
pub const LOCAL_TTL: u32 = 5;
/// Forwarded queries in flight at most; more are refused (SERVFAIL).
pub const MAX_INFLIGHT: usize = 1024;

/// Queries by outcome and path.
#[derive(Debug, Default)]
pub struct Stats {
    pub local_answered: AtomicU64,
    pub local_nxdomain: AtomicU64,
    pub local_nodata: AtomicU64,
    pub forwarded: AtomicU64,
    pub forward_failed: AtomicU64,
    pub refused: AtomicU64,
    pub malformed: AtomicU64,
    /// Queries past their client's rate: dropped unanswered (UDP) or
    /// refused (TCP).
    pub rate_limited: AtomicU64,
}

impl Stats {
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("local_answered", self.local_answered.load(Ordering::Relaxed)),
            ("local_nxdomain", self.local_nxdomain.load(Ordering::Relaxed)),
            ("local_nodata", self.local_nodata.load(Ordering::Relaxed)),
            ("forwarded", self.forwarded.load(Ordering::Relaxed)),
            ("forward_failed", self.forward_failed.load(Ordering::Relaxed)),
            ("refused", self.refused.load(Ordering::Relaxed)),
            ("malformed", self.malformed.load(Ordering::Relaxed)),
            ("rate_limited", self.rate_limited.load(Ordering::Relaxed)),
        ]
    }
}

/// Upstream resolvers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstreams {
    pub servers: Vec<SocketAddr>,
    /// Per server and attempt.
    pub timeout: Duration,
}

impl Upstreams {
    /// The `nameserver` lines of a resolv.conf, on port 53; addresses
    /// that would loop back to a Trellis server are the caller's to drop.
    pub fn from_resolv_conf(text: &str) -> Upstreams {
        let servers = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|a| IpAddr::from_str(a.trim()).ok())
            .map(|ip| SocketAddr::new(ip, 53))
            .collect();
        Upstreams { servers, timeout: Duration::from_secs(2) }
    }

    /// `IP[:PORT],…`.
    pub fn parse(list: &str) -> Result<Upstreams, String> {
        let mut servers = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let addr = SocketAddr::from_str(item)
                .or_else(|_| IpAddr::from_str(item).map(|ip| SocketAddr::new(ip, 53)))
                .map_err(|_| format!("invalid DNS upstream {item:?}: expected IP or IP:PORT"))?;
            servers.push(addr);
        }
        Ok(Upstreams { servers, timeout: Duration::from_secs(2) })
    }

    fn resolver(&self) -> Option<TokioResolver> {
        if self.servers.is_empty() {
            return None;
        }
        let mut config = ResolverConfig::from_parts(None, vec![], vec![]);
        for s in &self.servers {
            let mut udp = ConnectionConfig::udp();
            udp.port = s.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = s.port();
            let mut ns = NameServerConfig::udp_and_tcp(s.ip());
            ns.connections = vec![udp, tcp];
            config.add_name_server(ns);
        }
        let mut opts = ResolverOpts::default();
        opts.timeout = self.timeout;
        opts.attempts = 2;
        opts.ndots = 0;
        opts.cache_size = 4096;
        opts.num_concurrent_reqs = 1;
        opts.edns0 = true;
        let mut b = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
        *b.options_mut() = opts;
        b.build().ok()
    }
}

/// Everything a query needs: the current zone, the upstreams, counters.
pub struct Core {
    zone: RwLock<Arc<Zone>>,
    upstream: Option<TokioResolver>,
    inflight: Semaphore,
    pub stats: Stats,
    /// Each client's share (UDP queries).
    limits: std::sync::Mutex<crate::limit::ClientLimits>,
}

impl Core {
    /// Whether names outside Trellis are forwarded (answers then say
    /// recursion is available).
    pub fn forwards(&self) -> bool {
        self.upstream.is_some()
    }

    pub fn new(upstreams: &Upstreams) -> Arc<Core> {
        Arc::new(Core {
            zone: RwLock::new(Arc::new(Zone::default())),
            upstream: upstreams.resolver(),
            inflight: Semaphore::new(MAX_INFLIGHT),
            stats: Stats::default(),
            limits: std::sync::Mutex::new(crate::limit::ClientLimits::new(crate::limit::DEFAULT_CLIENT_QPS)),
        })
    }

    /// Queries a second each client address may have answered, over UDP
    /// and TCP together (0: no limit).
    pub fn set_client_qps(&self, qps: u32) {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner()) = crate::limit::ClientLimits::new(qps);
    }

    /// Which of the clients of a batch of queries (arriving now) are
    /// within their rate; the others' queries are counted and dropped.
    pub fn admit(&self, clients: impl Iterator<Item = IpAddr>, out: &mut Vec<bool>) {
        out.clear();
        let now = std::time::Instant::now();
        let mut limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        for c in clients {
            let ok = limits.admit(c, now);
            if !ok {
                self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            }
            out.push(ok);
        }
    }

    /// Replace the zone (the agent does on every change of the records).
    pub fn set_zone(&self, zone: Zone) {
        *self.zone.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(zone);
    }

    /// Change the current zone in place (copied first only if a query
    /// holds it).
    pub fn update_zone<R>(&self, f: impl FnOnce(&mut Zone) -> R) -> R {
        let mut guard = self.zone.write().unwrap_or_else(|p| p.into_inner());
        f(Arc::make_mut(&mut guard))
    }

    /// Add one endpoint to the current zone (copy on write).
    pub fn add_endpoint(&self, network: &crate::zone::Network, e: &crate::zone::Endpoint) {
        let mut guard = self.zone.write().unwrap_or_else(|p| p.into_inner());
        Arc::make_mut(&mut guard).add(network, e);
    }

    pub fn zone(&self) -> Arc<Zone> {
        self.zone.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn qtype(t: RecordType) -> QType {
    match t {
        RecordType::A => QType::A,
        RecordType::AAAA => QType::Aaaa,
        RecordType::PTR => QType::Ptr,
        RecordType::ANY => QType::Any,
        _ => QType::Other,
    }
}

/// The handler given to hickory's server (cheap to clone).
#[derive(Clone)]
pub struct Handler(pub Arc<Core>);

enum Outcome {
    Records(Vec<Record>, ResponseCode, bool),
}

impl Core {
    /// The answer to one question from `src`: local (synchronous) or
    /// forwarded upstream.
    async fn answer(&self, name: &Name, rtype: RecordType, src: IpAddr) -> Result<Outcome, ResponseCode> {
        match self.answer_local(name, rtype, src) {
            Some(o) => o,
            None => self.forward(name, rtype).await,
        }
    }

    /// `None`: not a Trellis name, ask upstream.
    fn answer_local(&self, name: &Name, rtype: RecordType, src: IpAddr) -> Option<Result<Outcome, ResponseCode>> {
        let zone = self.zone();
        let scope = zone.scope(src);
        Some(match zone.resolve(&name.to_ascii(), qtype(rtype), &scope) {
            Answer::Addrs(ips) => {
                self.stats.local_answered.fetch_add(1, Ordering::Relaxed);
                let recs =
                    ips.into_iter().map(|ip| Record::from_rdata(name.clone(), LOCAL_TTL, RData::A(A(ip)))).collect();
                Ok(Outcome::Records(recs, ResponseCode::NoError, true))
            }
            Answer::Addrs6(ips) => {
                self.stats.local_answered.fetch_add(1, Ordering::Relaxed);
                let recs = ips
                    .into_iter()
                    .map(|ip| Record::from_rdata(name.clone(), LOCAL_TTL, RData::AAAA(AAAA(ip))))
                    .collect();
                Ok(Outcome::Records(recs, ResponseCode::NoError, true))
            }
            Answer::Names(names) => {
                self.stats.local_answered.fetch_add(1, Ordering::Relaxed);
                let recs = names
                    .iter()
                    .filter_map(|n| Name::from_ascii(n).ok())
                    .map(|n| Record::from_rdata(name.clone(), LOCAL_TTL, RData::PTR(PTR(n))))
                    .collect();
                Ok(Outcome::Records(recs, ResponseCode::NoError, true))
            }
            Answer::NoData => {
                self.stats.local_nodata.fetch_add(1, Ordering::Relaxed);
                Ok(Outcome::Records(vec![], ResponseCode::NoError, true))
            }
            Answer::NxDomain => {
                self.stats.local_nxdomain.fetch_add(1, Ordering::Relaxed);
                Ok(Outcome::Records(vec![], ResponseCode::NXDomain, true))
            }
            Answer::Forward => return None,
        })
    }

    async fn forward(&self, name: &Name, rtype: RecordType) -> Result<Outcome, ResponseCode> {
        let Some(up) = &self.upstream else {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(ResponseCode::Refused);
        };
        let Ok(_permit) = self.inflight.try_acquire() else {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(ResponseCode::ServFail);
        };
        match up.lookup(name.clone(), rtype).await {
            Ok(l) => {
                self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                Ok(Outcome::Records(l.answers().to_vec(), ResponseCode::NoError, false))
            }
            Err(e) if e.is_nx_domain() => {
                self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                Ok(Outcome::Records(vec![], ResponseCode::NXDomain, false))
            }
            Err(e) if e.is_no_records_found() => {
                self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                Ok(Outcome::Records(vec![], ResponseCode::NoError, false))
            }
            Err(e) => {
                tracing::debug!(name = %name, error = %e, "forwarding failed");
                self.stats.forward_failed.fetch_add(1, Ordering::Relaxed);
                Err(ResponseCode::ServFail)
            }
        }
    }
}

impl Handler {
    async fn answer(&self, request: &Request) -> Result<Outcome, ResponseCode> {
        let core = &self.0;
        if request.metadata.message_type != MessageType::Query || request.metadata.op_code != OpCode::Query {
            core.stats.refused.fetch_add(1, Ordering::Relaxed);
            return Err(ResponseCode::NotImp);
        }
        let info = request.request_info().map_err(|_| {
            core.stats.malformed.fetch_add(1, Ordering::Relaxed);
            ResponseCode::FormErr
        })?;
        let name: Name = info.query.name().into();
        core.answer(&name, info.query.query_type(), info.src.ip()).await
    }
}

/// A UDP query in, the response bytes out (`None`: nothing to send back —
/// not a query, or too broken to answer). The wire format is hickory's;
/// this is the per-packet path of the UDP server, kept free of task hops.
pub enum UdpStep {
    Reply(Vec<u8>),
    /// Needs the upstream: answer later from a task.
    Forward(Box<Message>),
    Ignore,
}

fn encode_reply(
    request: &Message,
    outcome: Result<Outcome, ResponseCode>,
    recursion_available: bool,
) -> Option<Vec<u8>> {
    let mut m = Message::response(request.metadata.id, request.metadata.op_code);
    m.metadata.recursion_desired = request.metadata.recursion_desired;
    m.metadata.recursion_available = recursion_available;
    m.add_queries(request.queries.iter().cloned());
    if let Some(req) = &request.edns {
        let mut e = Edns::new();
        e.set_max_payload(req.max_payload().max(512));
        m.set_edns(e);
    }
    match outcome {
        Ok(Outcome::Records(recs, code, authoritative)) => {
            m.metadata.response_code = code;
            m.metadata.authoritative = authoritative;
            m.add_answers(recs);
        }
        Err(code) => m.metadata.response_code = code,
    }
    let limit = request.max_payload() as usize;
    let bytes = m.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    // Too big for UDP: the header and question with TC set (the client
    // retries over TCP).
    m.truncate().to_vec().ok()
}

impl Core {
    /// One UDP packet from `src`.
    pub fn udp_step(&self, packet: &[u8], src: IpAddr) -> UdpStep {
        let Ok(request) = Message::from_vec(packet) else {
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            // Answer FORMERR when at least the id is there.
            if packet.len() >= 12 && packet[2] & 0x80 == 0 {
                let id = u16::from_be_bytes([packet[0], packet[1]]);
                return match Message::error_msg(id, OpCode::Query, ResponseCode::FormErr).to_vec() {
                    Ok(b) => UdpStep::Reply(b),
                    Err(_) => UdpStep::Ignore,
                };
            }
            return UdpStep::Ignore;
        };
        if request.metadata.message_type != MessageType::Query {
            return UdpStep::Ignore;
        }
        let outcome = if request.metadata.op_code != OpCode::Query {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            Err(ResponseCode::NotImp)
        } else if request.queries.len() != 1 {
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            Err(ResponseCode::FormErr)
        } else {
            let q = &request.queries[0];
            match self.answer_local(q.name(), q.query_type(), src) {
                Some(o) => o,
                None => return UdpStep::Forward(Box::new(request)),
            }
        };
        match encode_reply(&request, outcome, self.upstream.is_some()) {
            Some(b) => UdpStep::Reply(b),
            None => UdpStep::Ignore,
        }
    }

    /// A forwarded UDP question's reply.
    pub async fn udp_forward(&self, request: &Message) -> Option<Vec<u8>> {
        let q = request.queries.first()?;
        let outcome = self.forward(q.name(), q.query_type()).await;
        encode_reply(request, outcome, self.upstream.is_some())
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut response: R) -> ResponseInfo {
        let edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().max(512));
            e
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let mut meta = hickory_proto::op::Metadata::response_from_request(&request.metadata);
        meta.recursion_available = self.0.upstream.is_some();
        // (UDP is held to each client's share before parsing, in `udp`;
        // this is TCP's: a client past its rate is refused.)
        let mut admitted = Vec::with_capacity(1);
        self.0.admit(std::iter::once(request.src().ip()), &mut admitted);
        let outcome = if admitted.first().copied().unwrap_or(true) {
            self.answer(request).await
        } else {
            Err(ResponseCode::Refused)
        };
        let sent = match outcome {
            Ok(Outcome::Records(recs, code, authoritative)) => {
                meta.response_code = code;
                meta.authoritative = authoritative;
                response.send_response(builder.build(meta, recs.iter(), [], [], [])).await
            }
            Err(code) => response.send_response(builder.error_msg(&request.metadata, code)).await,
        };
        match sent {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "sending a DNS response");
                let mut meta = hickory_proto::op::Metadata::response_from_request(&request.metadata);
                meta.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header { metadata: meta, counts: Default::default() })
            }
        }
    }
}

/// One server per listening address (a network's gateway), started and
/// stopped as networks come and go.
pub struct Listeners {
    core: Arc<Core>,
    port: u16,
    servers: HashMap<IpAddr, Listening>,
}

/// One address: our UDP server and hickory's TCP server (each stops when
/// dropped).
struct Listening {
    _udp: UdpServer,
    _tcp: Server<Handler>,
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, None)?;
    // The gateway address may not be on its bridge yet.
    s.set_freebind_v4(true)?;
    s.set_reuse_address(true)?;
    // Room for a flood's burst while the server's thread waits for a CPU:
    // a small query costs ~800 bytes of buffer, so the default (~208 KiB)
    // overflows after ~250 of them, and what overflows is every client's,
    // not only the flooder's (whose excess the server drops cheaply once
    // it reads it). Past `rmem_max` where the agent may (it is root).
    if nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBufForce, &UDP_RCVBUF).is_err() {
        let _ = s.set_recv_buffer_size(UDP_RCVBUF);
    }
    s.bind(&addr.into())?;
    Ok(s)
}

/// The UDP sockets' receive buffer: about 10,000 small queries.
const UDP_RCVBUF: usize = 8 << 20;

fn bind_tcp(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    s.set_freebind_v4(true)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    tokio::net::TcpListener::from_std(s.into())
}

impl Listeners {
    pub fn new(core: Arc<Core>, port: u16) -> Listeners {
        Listeners { core, port, servers: HashMap::new() }
    }

    /// Serve on exactly `addrs` (UDP and TCP); errors per address.
    pub fn set(&mut self, addrs: &[IpAddr]) -> Vec<(IpAddr, std::io::Error)> {
        self.servers.retain(|ip, _| addrs.contains(ip));
        let mut errors = Vec::new();
        for ip in addrs {
            if self.servers.contains_key(ip) {
                continue;
            }
            let addr = SocketAddr::new(*ip, self.port);
            let started = (|| {
                let udp = bind_udp(addr)?;
                let tcp = bind_tcp(addr)?;
                let mut server = Server::new(Handler(self.core.clone()));
                server.register_listener(tcp, Duration::from_secs(5), 64);
                let udp = UdpServer::start(udp, self.core.clone(), tokio::runtime::Handle::current())?;
                Ok::<_, std::io::Error>(Listening { _udp: udp, _tcp: server })
            })();
            match started {
                Ok(s) => {
                    tracing::debug!(%addr, "DNS listening");
                    self.servers.insert(*ip, s);
                }
                Err(e) => errors.push((*ip, e)),
            }
        }
        errors
    }

    pub fn addrs(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.servers.keys().copied().collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_from_resolv_conf_and_flags() {
        let u = Upstreams::from_resolv_conf(
            "# x\nsearch a.b\nnameserver 10.0.0.2\nnameserver  fd00::1 \noptions ndots:1\n",
        );
        assert_eq!(u.servers, vec!["10.0.0.2:53".parse().unwrap(), "[fd00::1]:53".parse().unwrap()]);
        let u = Upstreams::parse("10.0.0.2, 10.0.0.3:5353").unwrap();
        assert_eq!(u.servers, vec!["10.0.0.2:53".parse().unwrap(), "10.0.0.3:5353".parse().unwrap()]);
        assert!(Upstreams::parse("nope").unwrap_err().contains("nope"));
        assert!(Upstreams::parse("").unwrap().servers.is_empty());
    }

    /// One query over TCP (RFC 1035 § 4.2.2 framing): the answer's rcode.
    async fn tcp_query(c: &mut tokio::net::TcpStream, id: u16) -> std::io::Result<u8> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w', b'e', b'b', 0, 0, 1, 0, 1]);
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        c.write_all(&framed).await?;
        let mut len = [0u8; 2];
        c.read_exact(&mut len).await?;
        let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
        c.read_exact(&mut answer).await?;
        Ok(answer[3] & 0x0f)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tcp_client_past_its_rate_is_refused() {
        let core = Core::new(&Upstreams { servers: vec![], timeout: Duration::from_secs(1) });
        core.set_client_qps(5);
        let port = 20000 + (std::process::id() % 20000) as u16;
        let mut listeners = Listeners::new(core.clone(), port);
        let errors = listeners.set(&["127.0.0.1".parse().unwrap()]);
        assert!(errors.is_empty(), "{errors:?}");
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut codes = Vec::new();
        for id in 0..15 {
            codes.push(tcp_query(&mut c, id).await.unwrap());
        }
        // A burst of twice the rate answered (the name is unknown here), the
        // rest refused and counted.
        let refused = codes.iter().filter(|c| **c == 5).count();
        assert_eq!(refused, 5, "{codes:?}");
        assert!(codes[..10].iter().all(|c| *c != 5), "{codes:?}");
        assert_eq!(core.stats.rate_limited.load(Ordering::Relaxed), 5);
    }
}
