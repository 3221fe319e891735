//! This host as the daemon starts it: the store it opens, what its kernel
//! can do, and namespaces left by attaches that died half-way.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use trellis_store::{EtcdConfig, EtcdStore, LocalStore, Store};

use crate::daemon::config::{Config, StoreSpec};
use crate::dataplane::Dataplane;
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

#[cfg(test)]
mod tests {
    #[test]
    fn tcx_comes_with_linux_6_6() {
        for (release, tcx) in
            [("6.18.44-fc-v657", true), ("6.6.0", true), ("6.1.0-48-amd64", false), ("5.15.0", false), ("", false)]
        {
            assert_eq!(super::tcx_kernel(release), tcx, "{release}");
        }
    }
}
