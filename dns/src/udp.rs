//! The UDP server of one address: a thread of its own on a blocking
//! socket, taking the queries waiting in one `recvmmsg` and sending their
//! answers in one `sendmmsg`.
//!
//! Measured against a tokio task per address (`perf`, dnsperf with ten
//! clients): the task's socket was registered for write readiness too, so
//! every answer sent woke a runtime worker through epoll when the kernel
//! freed its buffer (a sixth of the server's CPU went to those wake-ups and
//! their context switches), and each query cost two system calls. A
//! blocked `recvmmsg` is woken only by queries; a batch costs two calls.
//!
//! Each client address is held to its rate ([`crate::limit`]) before a
//! query is parsed.
//!
//! Queries that need the upstream are handed to the tokio runtime, which
//! sends their answers on the same socket (never blocking: a full send
//! buffer drops the answer and the client asks again, as over any UDP).

use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};

use crate::server::{Core, UdpStep};

/// The name of each server's thread.
pub const THREAD: &str = "trellis-dns-udp";
/// Datagrams taken per system call at most.
const BATCH: usize = 32;
/// A query longer than this is not one (a question of at most 255 bytes
/// and an OPT record); it is counted as malformed and dropped.
const MAX_QUERY: usize = 4096;
/// How often a thread with nothing to do looks at its stop flag (a stop
/// also wakes it at once, see [`UdpServer::drop`]).
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// A running UDP server; dropping it stops its thread.
pub struct UdpServer {
    socket: Arc<socket2::Socket>,
    stop: Arc<AtomicBool>,
}

impl UdpServer {
    /// Serves `socket` (bound, blocking) from a new thread; queries for the
    /// upstream go to `runtime`.
    pub fn start(
        socket: socket2::Socket,
        core: Arc<Core>,
        runtime: tokio::runtime::Handle,
    ) -> std::io::Result<UdpServer> {
        socket.set_nonblocking(false)?;
        socket.set_read_timeout(Some(IDLE_CHECK))?;
        let socket = Arc::new(socket);
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (socket.clone(), stop.clone());
        std::thread::Builder::new().name(THREAD.into()).spawn(move || serve(&s, &core, &runtime, &st))?;
        Ok(UdpServer { socket, stop })
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes a thread blocked in recvmmsg (Linux sets the shutdown flag
        // and wakes readers even on an unconnected socket, then reports
        // ENOTCONN).
        let _ = self.socket.shutdown(std::net::Shutdown::Read);
    }
}

/// A reply: bytes and where to.
type Out = (Vec<u8>, SocketAddr);

fn serve(socket: &Arc<socket2::Socket>, core: &Arc<Core>, runtime: &tokio::runtime::Handle, stop: &AtomicBool) {
    let fd = socket.as_raw_fd();
    let mut bufs = vec![[0u8; MAX_QUERY]; BATCH];
    let mut rx = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut tx = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut got: Vec<(usize, Option<SocketAddr>, bool)> = Vec::with_capacity(BATCH);
    let mut out: Vec<Out> = Vec::with_capacity(BATCH);
    let mut admitted: Vec<bool> = Vec::with_capacity(BATCH);
    while !stop.load(Ordering::Acquire) {
        got.clear();
        {
            let mut slices: Vec<[IoSliceMut<'_>; 1]> = bufs.iter_mut().map(|b| [IoSliceMut::new(&mut b[..])]).collect();
            match recvmmsg(fd, &mut rx, slices.iter_mut(), MsgFlags::MSG_WAITFORONE, None) {
                Ok(msgs) => {
                    for m in msgs {
                        let src = m.address.and_then(|a: SockaddrStorage| to_std(&a));
                        got.push((m.bytes, src, m.flags.contains(MsgFlags::MSG_TRUNC)));
                    }
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    if !stop.load(Ordering::Acquire) {
                        tracing::debug!(error = %e, "DNS receive");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    continue;
                }
            }
        }
        if stop.load(Ordering::Acquire) {
            break;
        }
        out.clear();
        // Each client's share first, for the whole batch under one lock: a
        // flooder's excess costs a lookup, not a parse and an answer.
        let unknown = std::net::IpAddr::from([0u8, 0, 0, 0]);
        core.admit(got.iter().map(|g| g.1.map_or(unknown, |a| a.ip())), &mut admitted);
        for (i, &(n, src, truncated)) in got.iter().enumerate() {
            let Some(src) = src else { continue };
            if !admitted[i] {
                continue;
            }
            if truncated || n == 0 {
                core.stats.malformed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            match core.udp_step(&bufs[i][..n], src.ip()) {
                UdpStep::Reply(bytes) => out.push((bytes, src)),
                UdpStep::Forward(request) => {
                    let (socket, core) = (socket.clone(), core.clone());
                    runtime.spawn(async move {
                        if let Some(bytes) = core.udp_forward(&request).await {
                            let flags = MsgFlags::MSG_DONTWAIT.bits();
                            let _ = socket.send_to_with_flags(&bytes, &src.into(), flags);
                        }
                    });
                }
                UdpStep::Ignore => {}
            }
        }
        send_all(fd, &mut tx, &out);
    }
}

/// Sends every reply, as many per call as the kernel takes.
fn send_all(fd: i32, tx: &mut MultiHeaders<SockaddrStorage>, out: &[Out]) {
    let mut from = 0;
    while from < out.len() {
        let rest = &out[from..];
        let slices: Vec<[IoSlice<'_>; 1]> = rest.iter().map(|(b, _)| [IoSlice::new(b)]).collect();
        let addrs: Vec<Option<SockaddrStorage>> = rest.iter().map(|(_, a)| Some(SockaddrStorage::from(*a))).collect();
        match sendmmsg(fd, tx, slices.iter(), &addrs, [] as [ControlMessage<'_>; 0], MsgFlags::MSG_DONTWAIT) {
            Ok(sent) => {
                let n = sent.count();
                // sendmmsg stops at the first message it cannot send: that
                // one is dropped (its client asks again), the rest go on.
                from += n.max(1);
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::debug!(error = %e, "DNS send");
                from += 1;
            }
        }
    }
}

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}
