//! The nf_tables ruleset generation of this namespace, asked over
//! netlink (`NFT_MSG_GETGEN`): the kernel bumps it with every committed
//! change to any table (`nft`, iptables-nft, dockerd's rules), so an
//! unchanged generation means an unchanged `inet trellis` table and the
//! periodic pass need not spawn `nft` to list it. One request and one
//! answer; the bytes are built and parsed by pure functions here
//! (netlink-packet-netfilter knows no nf_tables messages).

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETGEN: u16 = 16;
const NFT_MSG_NEWGEN: u16 = 15;
const NFTA_GEN_ID: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const HEADER: usize = 16;
/// `struct nfgenmsg`: family, version, resource id.
const NFGENMSG: usize = 4;

/// The request: a netlink header and an `nfgenmsg` (AF_UNSPEC, v0).
pub fn request(seq: u32) -> [u8; HEADER + NFGENMSG] {
    let mut m = [0u8; HEADER + NFGENMSG];
    m[0..4].copy_from_slice(&((HEADER + NFGENMSG) as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
    m[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m
}

/// The generation in the kernel's answer to `seq`.
pub fn parse(buf: &[u8], seq: u32) -> Result<u32, String> {
    let mut at = 0;
    while at + HEADER <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        let this_seq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().unwrap_or_default());
        if len < HEADER || at + len > buf.len() {
            return Err(format!("a truncated netlink message ({len} bytes at {at} of {})", buf.len()));
        }
        let body = &buf[at + HEADER..at + len];
        at += len.next_multiple_of(4);
        if this_seq != seq {
            continue;
        }
        if kind == NLMSG_ERROR {
            let code = body.get(..4).map(|c| i32::from_ne_bytes(c.try_into().unwrap_or_default())).unwrap_or(0);
            return Err(std::io::Error::from_raw_os_error(-code).to_string());
        }
        if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
            continue;
        }
        let mut a = NFGENMSG;
        while a + 4 <= body.len() {
            let alen = u16::from_ne_bytes([body[a], body[a + 1]]) as usize;
            let atype = u16::from_ne_bytes([body[a + 2], body[a + 3]]) & 0x3fff;
            if alen < 4 || a + alen > body.len() {
                break;
            }
            if atype == NFTA_GEN_ID && alen >= 8 {
                return Ok(u32::from_be_bytes(body[a + 4..a + 8].try_into().unwrap_or_default()));
            }
            a += alen.next_multiple_of(4);
        }
        return Err("the answer carries no generation".into());
    }
    Err("no answer to the generation request".into())
}

/// Ask the kernel (blocking; one round trip).
pub fn current() -> std::io::Result<u32> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    sock.send(&request(1), 0)?;
    let (buf, _) = sock.recv_from_full()?;
    parse(&buf, 1).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(seq: u32, kind: u16, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0u8; NFGENMSG];
        for (t, v) in attrs {
            body.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
            body.extend_from_slice(&t.to_ne_bytes());
            body.extend_from_slice(v);
            body.resize(body.len().next_multiple_of(4), 0);
        }
        let mut m = Vec::new();
        m.extend_from_slice(&((HEADER + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn the_request_asks_nf_tables_for_its_generation() {
        let r = request(7);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()), 20);
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), (10 << 8) | 16);
        assert_eq!(u32::from_ne_bytes(r[8..12].try_into().unwrap()), 7);
        assert_eq!(&r[16..], &[0, 0, 0, 0]);
    }

    #[test]
    fn the_answer_s_generation_is_read_after_other_attributes_and_messages() {
        let newgen = (10 << 8) | 15;
        let mut buf = answer(3, newgen, &[(NFTA_GEN_ID, 9u32.to_be_bytes().to_vec())]);
        let mine =
            answer(4, newgen, &[(2, 77u32.to_be_bytes().to_vec()), (NFTA_GEN_ID, 1234u32.to_be_bytes().to_vec())]);
        buf.extend_from_slice(&mine);
        assert_eq!(parse(&buf, 4), Ok(1234));
        assert_eq!(parse(&buf, 3), Ok(9));
        assert!(parse(&buf, 5).is_err());
        assert!(parse(&answer(4, newgen, &[(2, vec![0; 4])]), 4).unwrap_err().contains("no generation"));
        assert!(parse(&answer(4, NLMSG_ERROR, &[]), 4).is_err());
        assert!(parse(&buf[..10], 4).is_err());
    }

    /// The kernel's answer, in a namespace of the test's own: a table
    /// added moves the generation, nothing else does.
    #[test]
    #[ignore = "needs root: run the suite as root with --run-ignored all"]
    fn the_kernel_s_generation_moves_with_a_table_change() {
        assert!(nix::unistd::geteuid().is_root(), "needs root");
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let before = current().unwrap();
            assert_eq!(current().unwrap(), before);
            let nft = std::process::Command::new("nft").args(["add", "table", "inet", "gen_test"]).status().unwrap();
            assert!(nft.success());
            assert!(current().unwrap() > before);
        })
        .join()
        .unwrap();
    }
}
