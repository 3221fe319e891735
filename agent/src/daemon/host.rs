//! This host as the daemon starts it: the store it opens, what its kernel
//! can do, and namespaces left by attaches that died half-way.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use anyhow::Context;
use trellis_store::{EtcdConfig, EtcdStore, LocalStore, Store};

use crate::daemon::config::{Config, StoreSpec};
use crate::dataplane::Dataplane;
use crate::model::HostRecord;
use crate::state::Cluster;

pub async fn open_store(cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match &cfg.store {
        StoreSpec::Memory => Arc::new(LocalStore::memory()),
        StoreSpec::Embedded => Arc::new(
            LocalStore::open_redb(&cfg.store_path())
                .with_context(|| format!("opening the embedded store {}", cfg.store_path().display()))?,
        ),
        StoreSpec::Etcd(spec) => {
            let mut ecfg = EtcdConfig::parse(spec)?;
            if let Some(tls) = &cfg.etcd_tls {
                ecfg.tls = Some(tls.clone());
            }
            Arc::new(EtcdStore::connect(&ecfg).await.with_context(|| format!("connecting to {spec}"))?)
        }
    })
}

pub fn capabilities() -> HashMap<String, bool> {
    let nft = std::process::Command::new("nft").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    HashMap::from([("nftables".to_string(), nft), ("tcx".to_string(), tcx_kernel(&kernel_release()))])
}

fn kernel_release() -> String {
    nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default()
}

/// tcx links (BPF_LINK_TYPE_TCX) came with Linux 6.6.
pub fn tcx_kernel(release: &str) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    matches!((parts.next(), parts.next()), (Some(major), Some(minor)) if (major, minor) >= (6, 6))
}

/// Namespaces the agent created for attaches that died before their
/// endpoint was written (the agent was killed in between) belong to no
/// endpoint: removed before serving. A store that cannot be read leaves
/// them for the next start.
pub async fn remove_orphan_namespaces(cluster: &Cluster, dp: &dyn Dataplane, dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let owned: std::collections::HashSet<std::path::PathBuf> = match cluster.all_endpoints().await {
        Ok(eps) => eps.into_iter().filter(|e| e.managed_netns).map(|e| e.netns).collect(),
        Err(e) => {
            tracing::debug!(error = %e, "not collecting orphan namespaces: the store is unavailable");
            return;
        }
    };
    for e in entries.flatten() {
        let path = e.path();
        if !owned.contains(&path) {
            match dp.remove_netns(&path) {
                Ok(()) => tracing::info!(netns = %path.display(), "removed a namespace no endpoint owns"),
                Err(err) => tracing::warn!(netns = %path.display(), error = %err, "removing an orphan namespace"),
            }
        }
    }
}

/// The cluster keys in `path`: a file root owns and only root may read
/// (anything laxer is refused, saying so: the file is what keeps the
/// store's key rings secret).
pub fn read_cluster_keys(path: &std::path::Path) -> anyhow::Result<trellis_ipsec::ClusterKeys> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).with_context(|| format!("reading the cluster key file {}", path.display()))?;
    if meta.uid() != 0 {
        anyhow::bail!(
            "the cluster key file {} is owned by uid {}, not root: chown root it",
            path.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o077 != 0 {
        anyhow::bail!(
            "the cluster key file {} may be read by others than root (mode {:o}): chmod 600 it",
            path.display(),
            meta.mode() & 0o777
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading the cluster key file {}", path.display()))?;
    trellis_ipsec::ClusterKeys::parse(&text).with_context(|| format!("the cluster key file {}", path.display()))
}

/// The address to advertise to the peers when none was given: the one
/// address of the preferred default route's interfaces (link-local ones do
/// not count). None without a default route (a lone host); several is a
/// guess this agent will not make (Docker's swarm refuses the same way).
pub fn choose_advertise_addr(candidates: &[(String, IpAddr)]) -> Result<Option<IpAddr>, String> {
    let usable: Vec<&(String, IpAddr)> = candidates
        .iter()
        .filter(|(_, ip)| match ip {
            IpAddr::V4(v4) => !v4.is_link_local() && !v4.is_loopback() && !v4.is_unspecified(),
            IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80,
        })
        .collect();
    match usable.as_slice() {
        [] => Ok(None),
        [(_, ip)] => Ok(Some(*ip)),
        many => {
            let listed: Vec<String> = many.iter().map(|(name, ip)| format!("{ip} on {name}")).collect();
            Err(format!(
                "this host has several addresses it could advertise to its peers ({}): choose one with --advertise-addr (or advertise_addr in the configuration file)",
                listed.join(", ")
            ))
        }
    }
}

/// The advertise address must be IPv4: the tunnels, their probes, the
/// routing mesh and IPsec run over an IPv4 underlay only (an IPv6 one is
/// not built yet); an IPv6 address is refused at start rather than giving
/// a host that half works.
pub fn require_ipv4_underlay(addr: IpAddr) -> Result<(), String> {
    match addr {
        IpAddr::V4(_) => Ok(()),
        IpAddr::V6(v6) => Err(format!(
            "--advertise-addr {v6}: an IPv6 underlay is not supported yet (VXLAN tunnels, their probes, the routing mesh and IPsec run over IPv4): advertise this host's IPv4 address; networks can still be dual-stack inside"
        )),
    }
}

/// A live host other than `me` that advertises `me`'s address: hosts
/// behind one NAT address cannot be told apart by their peers (their
/// tunnels would go to one of them).
pub fn sharing_underlay<'a>(live: &'a [HostRecord], me: &HostRecord) -> Option<&'a HostRecord> {
    if me.underlay.is_unspecified() {
        return None;
    }
    live.iter().find(|h| h.id != me.id && h.underlay == me.underlay)
}

/// Refuse to start while another live host advertises this host's
/// address. Its record is waited out for one lease TTL first (it may be
/// this machine's own under an earlier host id: its state directory was
/// wiped), progress said; a store that cannot be read is not waited for.
pub async fn refuse_shared_underlay(
    store: &dyn Store,
    me: &HostRecord,
    ttl: std::time::Duration,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + ttl + std::time::Duration::from_secs(1);
    let mut said = false;
    loop {
        let live = match tokio::time::timeout(std::time::Duration::from_secs(5), crate::state::hosts::live_hosts(store))
            .await
        {
            Ok(Ok(l)) => l,
            _ => return Ok(()),
        };
        let Some(other) = sharing_underlay(&live, me) else { return Ok(()) };
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "host {:?} ({}) already advertises {} to the cluster: hosts that share one address (behind one NAT) cannot be told apart by their peers; give each host an address its peers reach it at with --advertise-addr",
                other.id,
                other.hostname,
                me.underlay
            );
        }
        if !said {
            tracing::warn!(other = %other.id, address = %me.underlay, wait_s = ttl.as_secs(), "another live host advertises this host's address; waiting one lease TTL in case it is this machine's earlier registration");
            said = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use crate::model::HostRecord;

    #[test]
    fn tcx_comes_with_linux_6_6() {
        for (release, tcx) in
            [("6.18.44-fc-v657", true), ("6.6.0", true), ("6.1.0-48-amd64", false), ("5.15.0", false), ("", false)]
        {
            assert_eq!(super::tcx_kernel(release), tcx, "{release}");
        }
    }

    #[test]
    fn the_advertise_address_is_never_a_guess() {
        use super::choose_advertise_addr as choose;
        let c = |v: &[(&str, &str)]| -> Vec<(String, std::net::IpAddr)> {
            v.iter().map(|(n, ip)| (n.to_string(), ip.parse().unwrap())).collect()
        };
        assert_eq!(choose(&[]), Ok(None), "no default route: a lone host");
        assert_eq!(choose(&c(&[("eth0", "10.0.0.5")])), Ok(Some("10.0.0.5".parse().unwrap())));
        assert_eq!(
            choose(&c(&[("eth0", "10.0.0.5"), ("eth0", "169.254.3.4")])),
            Ok(Some("10.0.0.5".parse().unwrap())),
            "link-local addresses are no candidates"
        );
        let err = choose(&c(&[("eth0", "10.0.0.5"), ("eth0", "10.0.0.6"), ("eth1", "192.168.7.2")])).unwrap_err();
        for part in ["10.0.0.5 on eth0", "10.0.0.6 on eth0", "192.168.7.2 on eth1", "--advertise-addr"] {
            assert!(err.contains(part), "{err}");
        }
    }

    #[test]
    fn an_ipv6_advertise_address_is_refused_saying_why() {
        assert_eq!(super::require_ipv4_underlay("10.0.0.5".parse().unwrap()), Ok(()));
        let err = super::require_ipv4_underlay("2001:db8::5".parse().unwrap()).unwrap_err();
        for part in ["--advertise-addr 2001:db8::5", "IPv6 underlay is not supported", "IPv4 address"] {
            assert!(err.contains(part), "{err}");
        }
    }

    #[test]
    fn a_live_host_with_this_hosts_address_is_found() {
        let rec = |id: &str, ip: &str| HostRecord {
            id: id.into(),
            hostname: id.into(),
            underlay: ip.parse().unwrap(),
            vtep_mac: crate::model::Mac([2, 0, 0, 0, 0, 1]),
            vxlan_port: 4789,
            capabilities: Default::default(),
            version: "t".into(),
            started_unix: 0,
            underlay_mtu: 0,
        };
        let live = vec![rec("a", "10.0.0.1"), rec("b", "10.0.0.2"), rec("z", "0.0.0.0")];
        assert_eq!(super::sharing_underlay(&live, &rec("c", "10.0.0.2")).map(|h| h.id.as_str()), Some("b"));
        assert!(super::sharing_underlay(&live, &rec("b", "10.0.0.2")).is_none(), "its own record is no other");
        assert!(super::sharing_underlay(&live, &rec("c", "10.0.0.3")).is_none());
        assert!(super::sharing_underlay(&live, &rec("y", "0.0.0.0")).is_none(), "no address: nothing to share");
    }
}
