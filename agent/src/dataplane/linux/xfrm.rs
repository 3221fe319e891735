//! The one executor of xfrm netlink messages (built as values by
//! [`trellis_ipsec::xfrm`]): a blocking `NETLINK_XFRM` socket, opened per
//! batch on a blocking thread, in the agent's own network namespace.

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_xfrm::XfrmMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_XFRM};
use trellis_ipsec::xfrm::{self as ipx, ObservedXfrm, XfrmOp};

use nix::libc::{EEXIST, ENOENT, ENOSYS, EPROTONOSUPPORT, ESRCH};

use crate::dataplane::DataplaneError;

fn errno(e: &DataplaneError) -> Option<i32> {
    match e {
        DataplaneError::Io { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

pub struct XfrmSocket {
    sock: Socket,
    seq: u32,
}

fn io(call: &'static str, object: impl Into<String>) -> impl FnOnce(std::io::Error) -> DataplaneError {
    let object = object.into();
    move |source| DataplaneError::Io { call, object, source }
}

impl XfrmSocket {
    pub fn open() -> Result<XfrmSocket, DataplaneError> {
        let mut sock = Socket::new(NETLINK_XFRM).map_err(io("open xfrm socket", "NETLINK_XFRM"))?;
        sock.bind_auto().map_err(io("bind xfrm socket", "NETLINK_XFRM"))?;
        sock.connect(&SocketAddr::new(0, 0)).map_err(io("connect xfrm socket", "NETLINK_XFRM"))?;
        Ok(XfrmSocket { sock, seq: 0 })
    }

    fn send(&mut self, msg: XfrmMessage, flags: u16, call: &'static str, object: &str) -> Result<u32, DataplaneError> {
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.sock.send(&buf, 0).map_err(io(call, object))?;
        Ok(self.seq)
    }

    /// Read replies to `seq` until its ack (requests) or the end of the
    /// dump, handing every message to `each`.
    fn replies(
        &mut self,
        seq: u32,
        call: &'static str,
        object: &str,
        mut each: impl FnMut(XfrmMessage),
    ) -> Result<(), DataplaneError> {
        loop {
            let (buf, _) = self.sock.recv_from_full().map_err(io(call, object))?;
            let mut at = 0;
            while at < buf.len() {
                let msg = NetlinkMessage::<XfrmMessage>::deserialize(&buf[at..])
                    .map_err(|e| io(call, object)(std::io::Error::other(e.to_string())))?;
                let len = msg.header.length as usize;
                at += len.max(1).next_multiple_of(4);
                if msg.header.sequence_number != seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => {
                                let err = std::io::Error::from_raw_os_error(-code.get());
                                Err(io(call, object)(err))
                            }
                        };
                    }
                    NetlinkPayload::InnerMessage(m) => each(m),
                    _ => {}
                }
            }
        }
    }

    /// Send one change and wait for the kernel's answer.
    pub fn apply(&mut self, op: &XfrmOp) -> Result<(), DataplaneError> {
        let (msg, flags, call, object) = match op {
            XfrmOp::AddSa(sa) => (
                ipx::add_sa(sa),
                NLM_F_CREATE | NLM_F_EXCL,
                "add xfrm state",
                format!(
                    "esp spi {:#010x} {} → {} port {} epoch {}",
                    sa.material.spi, sa.src, sa.dst, sa.port, sa.epoch
                ),
            ),
            XfrmOp::DelSa(id) => {
                (ipx::del_sa(*id), 0, "delete xfrm state", format!("esp spi {:#010x} to {}", id.spi, id.dst))
            }
            XfrmOp::AddPolicy(p) => (
                ipx::add_policy(p),
                NLM_F_CREATE | NLM_F_EXCL,
                "add xfrm policy",
                format!("{:?} {} → {} udp dport {}", p.dir, p.src, p.dst, p.port),
            ),
            XfrmOp::DelPolicy(p) => (
                ipx::del_policy(p),
                0,
                "delete xfrm policy",
                format!("{:?} {} → {} udp dport {}", p.dir, p.src, p.dst, p.port),
            ),
        };
        let seq = self.send(msg, NLM_F_REQUEST | NLM_F_ACK | flags, call, &object)?;
        match self.replies(seq, call, &object, |_| {}) {
            // Already there (adds) or already gone (deletes): the goal holds.
            Err(e) if flags != 0 && errno(&e) == Some(EEXIST) => Ok(()),
            Err(e) if flags == 0 && matches!(errno(&e), Some(ENOENT) | Some(ESRCH)) => Ok(()),
            r => r,
        }
    }

    /// Trellis's SAs and policies as the kernel has them.
    pub fn observe(&mut self) -> Result<ObservedXfrm, DataplaneError> {
        let mut seen = ObservedXfrm::default();
        let dump_sa = XfrmMessage::GetDumpSa(Default::default());
        let seq = self.send(dump_sa, NLM_F_REQUEST | NLM_F_DUMP, "dump xfrm states", "all")?;
        self.replies(seq, "dump xfrm states", "all", |m| {
            if let Some((id, sa)) = ipx::observed_sa(&m) {
                seen.sas.insert(id, sa);
            }
        })?;
        let dump_pol = XfrmMessage::GetPolicy(Default::default());
        let seq = self.send(dump_pol, NLM_F_REQUEST | NLM_F_DUMP, "dump xfrm policies", "all")?;
        self.replies(seq, "dump xfrm policies", "all", |m| {
            if let Some(p) = ipx::observed_policy(&m) {
                seen.policies.insert(p);
            }
        })?;
        Ok(seen)
    }
}

/// Whether this kernel can install an ESP SA with the AEAD Trellis uses:
/// one is added (on loopback addresses, under a request id that is not
/// Trellis's) and removed again. `Err` says what failed.
pub fn esp_support() -> Result<(), String> {
    use std::net::{IpAddr, Ipv4Addr};
    use trellis_ipsec::{Dir, SaSpec, Secret, keys};
    let (src, dst) = (IpAddr::V4(Ipv4Addr::new(127, 0, 0, 61)), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 62)));
    let mut material = keys::derive(&Secret::generate(), 1, src, dst, 1);
    material.spi = 0x7fff_f00d;
    let sa = SaSpec { src, dst, port: 1, epoch: 1, dir: Dir::Out, material, start_seq: 0, encap: None };
    let mut msg = ipx::add_sa(&sa);
    if let XfrmMessage::AddSa(m) = &mut msg {
        m.user_sa_info.reqid = 0;
    }
    let mut s = XfrmSocket::open().map_err(|e| e.to_string())?;
    let seq =
        s.send(msg, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE, "add xfrm state", "probe").map_err(|e| e.to_string())?;
    s.replies(seq, "add xfrm state", "probe", |_| {}).map_err(|e| match errno(&e) {
        Some(ENOENT) | Some(EPROTONOSUPPORT) | Some(ENOSYS) => {
            format!(
                "adding an ESP SA with {} failed: {}",
                ipx::AEAD,
                std::io::Error::from_raw_os_error(errno(&e).unwrap_or(0))
            )
        }
        _ => e.to_string(),
    })?;
    s.apply(&XfrmOp::DelSa(sa.id())).map_err(|e| e.to_string())
}

/// A UDP socket marked for ESP in UDP (`UDP_ENCAP_ESPINUDP`, RFC 3948):
/// what arrives on its port with a non-zero first word is ESP, handed to
/// xfrm by the kernel; it is never read. Closed when dropped.
pub struct EspUdpSocket {
    pub port: u16,
    _socket: std::net::UdpSocket,
}

/// `UDP_ENCAP` (linux/udp.h) and its `UDP_ENCAP_ESPINUDP` type.
const UDP_ENCAP: nix::libc::c_int = 100;
const UDP_ENCAP_ESPINUDP: nix::libc::c_int = 2;

impl EspUdpSocket {
    pub fn open(port: u16) -> Result<EspUdpSocket, DataplaneError> {
        let object = format!("ESP in UDP on port {port}");
        let socket = std::net::UdpSocket::bind(("0.0.0.0", port)).map_err(|e| DataplaneError::Io {
            call: "bind",
            object: if e.kind() == std::io::ErrorKind::AddrInUse {
                format!("{object} (another process, an IKE daemon perhaps, holds the port: see --esp-udp-port)")
            } else {
                object.clone()
            },
            source: e,
        })?;
        let kind: nix::libc::c_int = UDP_ENCAP_ESPINUDP;
        // SAFETY: a valid socket, a c_int option value of the size given.
        let rc = unsafe {
            nix::libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                nix::libc::SOL_UDP,
                UDP_ENCAP,
                (&kind as *const nix::libc::c_int).cast(),
                std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(DataplaneError::Io {
                call: "setsockopt UDP_ENCAP",
                object,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(EspUdpSocket { port, _socket: socket })
    }
}
