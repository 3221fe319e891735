//! Who holds a host port: the agent namespace's sockets from
//! `/proc/self/net/{tcp,tcp6,udp,udp6}` (TCP listeners, any bound UDP
//! socket), their inodes matched to a process through `/proc/*/fd`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::Proto;

/// A socket of a `/proc/net` table: its local address, port and inode.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Sock {
    pub addr: IpAddr,
    pub port: u16,
    pub inode: u64,
}

/// TCP_LISTEN in the `st` column.
const TCP_LISTEN: &str = "0A";

/// The sockets of one `/proc/net/{tcp,udp}[6]` table that hold their port:
/// TCP listeners, every UDP socket.
pub(crate) fn parse_table(text: &str, tcp: bool) -> Vec<Sock> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || (tcp && f[3] != TCP_LISTEN) {
            continue;
        }
        let Some((addr, port)) = f[1].split_once(':') else { continue };
        let (Some(addr), Ok(port), Ok(inode)) = (parse_addr(addr), u16::from_str_radix(port, 16), f[9].parse()) else {
            continue;
        };
        out.push(Sock { addr, port, inode });
    }
    out
}

/// An address as `/proc/net` prints it: 32-bit words in host (little
/// endian) order.
fn parse_addr(hex: &str) -> Option<IpAddr> {
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(u32::from_str_radix(hex, 16).ok()?.swap_bytes()))),
        32 => {
            let mut b = [0u8; 16];
            for w in 0..4 {
                let word = u32::from_str_radix(&hex[w * 8..w * 8 + 8], 16).ok()?.swap_bytes();
                b[w * 4..w * 4 + 4].copy_from_slice(&word.to_be_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// Does a socket bound to `bound` take the port from a publication on
/// `want` (`None`: every address)?
fn overlaps(bound: IpAddr, want: Option<IpAddr>) -> bool {
    let Some(want) = want else { return true };
    bound.is_unspecified()
        || bound == want
        || matches!(bound, IpAddr::V6(v6) if v6.to_ipv4_mapped() == Some(match want { IpAddr::V4(w) => w, _ => Ipv4Addr::UNSPECIFIED }))
}

/// The holder of `proto` port `port` on `ip` (`None`: any address) in the
/// calling process's network namespace, described for a person: `process
/// "nc" (pid 42)`, or the socket's inode when no process shows it.
pub(crate) fn holder(proto: Proto, port: u16, ip: Option<IpAddr>) -> std::io::Result<Option<String>> {
    let tables: &[&str] = match proto {
        Proto::Tcp => &["/proc/self/net/tcp", "/proc/self/net/tcp6"],
        Proto::Udp => &["/proc/self/net/udp", "/proc/self/net/udp6"],
    };
    let mut found = None;
    for t in tables {
        let text = match std::fs::read_to_string(t) {
            Ok(s) => s,
            // No IPv6 in this kernel.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if let Some(s) =
            parse_table(&text, proto == Proto::Tcp).into_iter().find(|s| s.port == port && overlaps(s.addr, ip))
        {
            found = Some(s);
            break;
        }
    }
    let Some(sock) = found else { return Ok(None) };
    let what = format!("{}:{port}/{}", sock.addr, proto.as_str());
    Ok(Some(match process_of(sock.inode) {
        Some((pid, name)) => format!("process {name:?} (pid {pid}), listening on {what}"),
        None => format!("a socket on {what} (inode {}) of no process this agent can see", sock.inode),
    }))
}

/// Every port a socket of the calling process's namespace holds: TCP
/// listeners and bound UDP sockets, on any address.
pub(crate) fn held() -> std::io::Result<std::collections::BTreeSet<(Proto, u16)>> {
    let mut out = std::collections::BTreeSet::new();
    for (t, proto) in [
        ("/proc/self/net/tcp", Proto::Tcp),
        ("/proc/self/net/tcp6", Proto::Tcp),
        ("/proc/self/net/udp", Proto::Udp),
        ("/proc/self/net/udp6", Proto::Udp),
    ] {
        let text = match std::fs::read_to_string(t) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        out.extend(parse_table(&text, proto == Proto::Tcp).into_iter().map(|s| (proto, s.port)));
    }
    Ok(out)
}

/// The process with an open file descriptor on socket `inode`.
fn process_of(inode: u64) -> Option<(u32, String)> {
    let target = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()) {
                let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                return Some((pid, name.trim().to_string()));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4243 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn listeners_are_read_with_their_address_port_and_inode() {
        assert_eq!(
            parse_table(TCP, true),
            vec![Sock { addr: "127.0.0.1".parse().unwrap(), port: 8080, inode: 4242 }],
            "an established connection holds no port"
        );
        assert_eq!(parse_table(TCP, false).len(), 2, "every UDP socket counts");
        assert_eq!(parse_table(TCP6, true), vec![Sock { addr: "::".parse().unwrap(), port: 80, inode: 77 }]);
    }

    #[test]
    fn a_socket_on_another_address_leaves_the_port_free_there() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(overlaps(lo, None) && overlaps(lo, Some(lo)));
        assert!(!overlaps(lo, Some(other)));
        assert!(overlaps("0.0.0.0".parse().unwrap(), Some(other)));
        assert!(overlaps("::".parse().unwrap(), Some(other)));
        assert!(overlaps("::ffff:10.0.0.1".parse().unwrap(), Some(other)));
    }

    #[test]
    fn this_process_s_listener_is_found_with_its_name() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = holder(Proto::Tcp, port, None).unwrap().expect("held");
        assert!(h.contains(&format!("pid {}", std::process::id())) && h.contains(&port.to_string()), "{h}");
        assert!(holder(Proto::Tcp, port, Some("10.9.9.9".parse().unwrap())).unwrap().is_none());
        drop(l);
        assert!(holder(Proto::Tcp, port, None).unwrap().is_none());
    }
}
