//! The egress rules: the `inet trellis` table replaced atomically through
//! `nft`, and its fingerprint read back.

use super::NetlinkDataplane;
use crate::dataplane::egress::{self, EgressRules};
use crate::dataplane::{DataplaneError, Result};

/// Written with the rules when they ask for it ([`EgressRules::forwarding`]).
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

impl NetlinkDataplane {
    /// The fingerprint the installed table carries (`None` without one).
    pub(super) async fn egress_fingerprint(&self) -> Result<Option<String>> {
        tokio::task::spawn_blocking(|| {
            match nftables::helper::get_current_ruleset_with_args(
                nftables::helper::DEFAULT_NFT,
                ["list", "table", "inet", egress::TABLE],
            ) {
                Ok(set) => Ok(egress::observed_fingerprint(&set)),
                Err(nftables::helper::NftablesError::NftFailed { stderr, .. }) if stderr.contains("No such file") => {
                    Ok(None)
                }
                Err(e) => Err(DataplaneError::Nftables(format!("listing table inet {}: {e}", egress::TABLE))),
            }
        })
        .await
        .map_err(|e| DataplaneError::Nftables(e.to_string()))?
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
