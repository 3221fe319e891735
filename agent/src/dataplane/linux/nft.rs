//! The egress rules: the `inet trellis` table (and `bridge trellis`, the
//! mesh's source MACs) replaced atomically through `nft`, and their
//! fingerprint read back.

use super::NetlinkDataplane;
use crate::dataplane::egress::{self, EgressRules};
use crate::dataplane::{DataplaneError, Result};

/// Written with the rules when they ask for it ([`EgressRules::forwarding`]).
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// dockerd with its own iptables rules (its default) sets the FORWARD
/// policy to DROP when it enables forwarding itself, and leaves the
/// `DOCKER-USER` chain, jumped to first, to its users: what Trellis bridges
/// forward is accepted there (isolation between Trellis networks stays in
/// the `inet trellis` table, a base chain of its own that still sees every
/// packet). Written with the `iptables` that dockerd uses, never into a
/// chain dockerd did not make.
const DOCKER_USER_RULES: [[&str; 8]; 2] = [
    ["-i", "trb-+", "-m", "comment", "--comment", "trellis", "-j", "ACCEPT"],
    ["-o", "trb-+", "-m", "comment", "--comment", "trellis", "-j", "ACCEPT"],
];

fn iptables(args: &[&str]) -> Option<std::process::Output> {
    std::process::Command::new("iptables").arg("-w").args(args).output().ok()
}

/// Does dockerd's `DOCKER-USER` chain exist here, and does it lack one of
/// the accepts?
fn docker_user_missing() -> bool {
    if !iptables(&["-S", "DOCKER-USER"]).is_some_and(|o| o.status.success()) {
        return false;
    }
    DOCKER_USER_RULES.iter().any(|r| {
        let mut check = vec!["-C", "DOCKER-USER"];
        check.extend_from_slice(r);
        !iptables(&check).is_some_and(|o| o.status.success())
    })
}

/// Insert the accepts that are missing from an existing `DOCKER-USER`.
fn ensure_docker_user() -> Result<()> {
    if !iptables(&["-S", "DOCKER-USER"]).is_some_and(|o| o.status.success()) {
        return Ok(());
    }
    for r in DOCKER_USER_RULES {
        let mut check = vec!["-C", "DOCKER-USER"];
        check.extend_from_slice(&r);
        if iptables(&check).is_some_and(|o| o.status.success()) {
            continue;
        }
        let mut insert = vec!["-I", "DOCKER-USER", "1"];
        insert.extend_from_slice(&r);
        match iptables(&insert) {
            Some(o) if o.status.success() => {
                tracing::info!(rule = %r.join(" "), "accepting Trellis bridges' traffic in Docker's DOCKER-USER chain")
            }
            other => {
                return Err(DataplaneError::Nftables(format!(
                    "inserting into Docker's DOCKER-USER chain ({}): {}",
                    r.join(" "),
                    other.map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string()).unwrap_or_default()
                )));
            }
        }
    }
    Ok(())
}

/// What the periodic pass last listed of the egress table: listing it
/// spawns `nft` (and `iptables` for dockerd's chain), a steady share of an
/// idle agent's CPU at one pass every two seconds and most of a full pass
/// on a slow host. It is listed again when the ruleset generation moved
/// (any table's change, ours included), and on every tenth pass anyway
/// (dockerd's chain may live in iptables-legacy, which the generation does
/// not see).
#[derive(Default)]
pub(super) struct EgressSeen {
    generation: Option<u32>,
    fingerprint: Option<String>,
    uses: u32,
}

impl EgressSeen {
    /// The fingerprint still valid at generation `now` (`None`: list).
    fn still(&mut self, now: Option<u32>) -> Option<Option<String>> {
        self.uses = self.uses.wrapping_add(1);
        let fresh = now.is_some() && now == self.generation && !self.uses.is_multiple_of(10);
        fresh.then(|| self.fingerprint.clone())
    }
}

/// Listing the tables (blocking: spawns `nft`): the fingerprint the
/// installed tables carry (`None` without `inet trellis`), its rules and
/// those of `bridge trellis`.
fn list_egress() -> Result<Option<String>> {
    let list = |family: &str| match nftables::helper::get_current_ruleset_with_args(
        nftables::helper::DEFAULT_NFT,
        ["list", "table", family, egress::TABLE],
    ) {
        Ok(set) => Ok(Some(set)),
        Err(nftables::helper::NftablesError::NftFailed { stderr, .. }) if stderr.contains("No such file") => Ok(None),
        Err(e) => Err(DataplaneError::Nftables(format!("listing table {family} {}: {e}", egress::TABLE))),
    };
    let Some(mut set) = list("inet")? else { return Ok(None) };
    // Docker's chain lacking the accepts counts as rules to apply.
    if docker_user_missing() {
        return Ok(None);
    }
    if let Some(bridge) = list("bridge")? {
        set.objects.to_mut().extend(bridge.objects.iter().cloned());
    }
    Ok(egress::observed_fingerprint(&set))
}

impl NetlinkDataplane {
    /// The fingerprint the installed table carries (`None` without one),
    /// listed only when the ruleset changed since (see [`EgressSeen`]).
    pub(super) async fn egress_fingerprint(&self) -> Result<Option<String>> {
        // Read before listing: a change in between moves it again.
        let now = tokio::task::spawn_blocking(super::nft_generation::current)
            .await
            .map_err(|e| DataplaneError::Nftables(e.to_string()))?
            .inspect_err(|e| tracing::debug!(error = %e, "reading the nf_tables generation"))
            .ok();
        if let Some(f) = self.egress_seen.lock().unwrap_or_else(|p| p.into_inner()).still(now) {
            return Ok(f);
        }
        let listed =
            tokio::task::spawn_blocking(list_egress).await.map_err(|e| DataplaneError::Nftables(e.to_string()))??;
        let mut seen = self.egress_seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.generation = now;
        seen.fingerprint = listed.clone();
        Ok(listed)
    }

    pub(super) async fn apply_egress(&self, rules: &EgressRules) -> Result<()> {
        let batch = egress::to_nft_json(&rules.batch())
            .map_err(|e| DataplaneError::Nftables(format!("encoding table inet {}: {e}", egress::TABLE)))?;
        tokio::task::spawn_blocking(move || {
            nftables::helper::apply_ruleset_raw(&batch, nftables::helper::DEFAULT_NFT, std::iter::empty::<&str>())
                .map(drop)
                .map_err(|e| DataplaneError::Nftables(format!("applying table inet {}: {e}", egress::TABLE)))
        })
        .await
        .map_err(|e| DataplaneError::Nftables(e.to_string()))??;
        tokio::task::spawn_blocking(ensure_docker_user)
            .await
            .map_err(|e| DataplaneError::Nftables(e.to_string()))??;
        if rules.forwarding {
            std::fs::write(IP_FORWARD, b"1").map_err(|e| DataplaneError::Io {
                call: "enable ip_forward",
                object: IP_FORWARD.into(),
                source: e,
            })?;
        }
        for bridge in &rules.localnet {
            // A bridge not made yet (its creation failed this pass) gets it
            // with the next apply: the fingerprint stays wrong until then.
            let path = format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet");
            std::fs::write(&path, b"1").map_err(|e| DataplaneError::Io {
                call: "enable route_localnet",
                object: path.clone(),
                source: e,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::EgressSeen;

    #[test]
    fn the_egress_table_is_listed_again_when_the_ruleset_moved_and_every_tenth_pass() {
        let mut seen = EgressSeen::default();
        assert_eq!(seen.still(Some(5)), None, "never listed");
        seen.generation = Some(5);
        seen.fingerprint = Some("f".into());
        assert_eq!(seen.still(Some(5)), Some(Some("f".into())));
        assert_eq!(seen.still(Some(6)), None, "a table changed");
        assert_eq!(seen.still(None), None, "the generation unknown");
        let listed = (0..20).filter(|_| seen.still(Some(5)).is_none()).count();
        assert_eq!(listed, 2, "every tenth use lists anyway");
    }
}
