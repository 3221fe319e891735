//! Real sockets inside containers' network namespaces, from this process:
//! a thread enters the namespace, makes the socket, and the socket stays
//! in that namespace whatever thread uses it afterwards. Backends that say
//! who they are and whom they saw, and clients that count answers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};

/// Run `f` on a thread inside the network namespace at `netns`.
pub fn in_ns<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path: PathBuf = netns.to_path_buf();
    std::thread::spawn(move || -> Result<T> {
        let ns = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in {} panicked", netns.display()))?
}

/// A backend: answers every TCP connection and UDP datagram on `port`, over
/// IPv4 and IPv6, with `NAME CLIENT_IP\n` (the client's address as the
/// backend saw it, an IPv4 one as such, not IPv4-mapped). TCP
/// connections stay open until the client closes them, answering every
/// line it sends. Stops when dropped.
pub struct Backend {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
}

impl Backend {
    pub fn start(netns: &Path, port: u16, name: &str) -> Result<Backend> {
        let (tcp, udp) = in_ns(netns, move || -> Result<(TcpListener, UdpSocket)> {
            // One socket of each for both families (bindv6only is off);
            // IPv4 alone where the namespace has no IPv6.
            let both = TcpListener::bind(("::", port)).and_then(|t| Ok((t, UdpSocket::bind(("::", port))?)));
            match both {
                Ok(pair) => Ok(pair),
                Err(_) => Ok((TcpListener::bind(("0.0.0.0", port))?, UdpSocket::bind(("0.0.0.0", port))?)),
            }
        })??;
        let addr = tcp.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        tcp.set_nonblocking(true)?;
        let (s, n) = (stop.clone(), name.to_string());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((conn, peer)) => {
                        let n = n.clone();
                        let s = s.clone();
                        std::thread::spawn(move || serve(conn, peer, &n, &s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        let (s, n) = (stop.clone(), name.to_string());
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !s.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(format!("{n} {}\n", peer.ip().to_canonical()).as_bytes(), peer);
                }
            }
        });
        Ok(Backend { stop, addr })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

fn serve(mut conn: TcpStream, peer: SocketAddr, name: &str, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let line = format!("{name} {}\n", peer.ip().to_canonical());
    if conn.write_all(line.as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {
                if conn.write_all(line.as_bytes()).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Read one line.
pub fn read_line(conn: &mut TcpStream) -> std::io::Result<String> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match conn.read(&mut b)? {
            0 => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed")),
            _ if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&out).into_owned()),
            _ => out.push(b[0]),
        }
    }
}

/// A TCP connection made from inside `netns`.
pub fn connect(netns: &Path, to: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let conn = in_ns(netns, move || TcpStream::connect_timeout(&to, timeout))??;
    conn.set_read_timeout(Some(timeout))?;
    Ok(conn)
}

/// A TCP connection from `netns` whose source port is `port` (reused even
/// while an earlier connection from it lingers in TIME_WAIT).
pub fn connect_from(netns: &Path, port: u16, to: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let conn = in_ns(netns, move || -> std::io::Result<TcpStream> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
        s.connect_timeout(&to.into(), timeout)?;
        Ok(s.into())
    })??;
    conn.set_read_timeout(Some(timeout))?;
    Ok(conn)
}

/// One request: connect from `netns`, read the backend's line, close.
pub fn request(netns: &Path, to: SocketAddr, timeout: Duration) -> Result<String> {
    let mut c = connect(netns, to, timeout)?;
    Ok(read_line(&mut c)?)
}

/// A client socket factory inside a namespace (for many requests without
/// a thread per connection): sockets are made by a thread in `netns`.
pub struct Client {
    tx: std::sync::mpsc::Sender<(SocketAddr, std::sync::mpsc::Sender<std::io::Result<TcpStream>>)>,
}

impl Client {
    pub fn new(netns: &Path) -> Result<Client> {
        let (tx, rx) = std::sync::mpsc::channel::<(SocketAddr, std::sync::mpsc::Sender<std::io::Result<TcpStream>>)>();
        let path = netns.to_path_buf();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let entered = std::fs::File::open(&path)
                .map_err(|e| e.to_string())
                .and_then(|ns| nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string()));
            let _ = ready_tx.send(entered);
            for (to, reply) in rx {
                let _ = reply.send(TcpStream::connect_timeout(&to, Duration::from_secs(3)));
            }
        });
        ready_rx.recv()?.map_err(|e| anyhow::anyhow!("entering {}: {e}", netns.display()))?;
        Ok(Client { tx })
    }

    pub fn connect(&self, to: SocketAddr) -> std::io::Result<TcpStream> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx.send((to, tx)).map_err(std::io::Error::other)?;
        let c = rx.recv().map_err(std::io::Error::other)??;
        c.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(c)
    }

    /// `n` requests to `to`, counted by the backend that answered (the
    /// first word of its line), each checked to have seen `client_ip`.
    pub fn spread(&self, to: SocketAddr, n: usize, client_ip: &str) -> std::collections::BTreeMap<String, usize> {
        let mut seen = std::collections::BTreeMap::new();
        for i in 0..n {
            let line = self.request(to).unwrap_or_else(|e| panic!("request {i} to {to}: {e}"));
            let (name, saw) = line.split_once(' ').unwrap_or_else(|| panic!("a backend's line: {line:?}"));
            assert_eq!(saw, client_ip, "the backend must see the client's address");
            *seen.entry(name.to_string()).or_default() += 1;
        }
        seen
    }

    /// One request: the backend's line.
    pub fn request(&self, to: SocketAddr) -> std::io::Result<String> {
        let mut c = self.connect(to)?;
        read_line(&mut c)
    }

    /// A UDP socket in the namespace.
    pub fn udp(netns: &Path) -> Result<UdpSocket> {
        let s = in_ns(netns, || UdpSocket::bind("0.0.0.0:0"))??;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(s)
    }
}
