//! `trellisctl host ls` (the cluster's hosts) and `trellisctl status` (this
//! agent's health).

use std::process::ExitCode;

use serde_json::Value;
use trellis_plugin_api::proto;

use crate::{Client, HostCmd, output};

pub async fn host(c: &mut Client, cmd: HostCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        HostCmd::Ls { json } => ls(c, json).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn ls(c: &mut Client, json: bool) -> anyhow::Result<()> {
    let list = c.list_hosts(proto::ListHostsRequest {}).await?.into_inner().hosts;
    if json {
        output::print_json(&Value::Array(list.iter().map(output::host_json).collect()));
    } else {
        output::host_table(&list);
    }
    Ok(())
}

/// `trellisctl cluster rotate-key`: the rings sealed again under the
/// current cluster key.
pub async fn rotate_cluster_key(c: &mut Client, json: bool) -> anyhow::Result<ExitCode> {
    let r = c.rotate_cluster_key(proto::RotateClusterKeyRequest {}).await?.into_inner();
    if json {
        output::print_json(&serde_json::json!({"key_id": r.key_id, "resealed": r.resealed, "already": r.already}));
    } else {
        println!(
            "key rings sealed under cluster key {}: {} sealed again, {} already were",
            r.key_id, r.resealed, r.already
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The agent's status; exit code 1 when it is not healthy (the store down,
/// reconcile errors, or unreachable peers).
pub async fn status(c: &mut Client, json: bool) -> anyhow::Result<ExitCode> {
    let s = c.status(proto::StatusRequest {}).await?.into_inner();
    let healthy = s.store_ok && s.reconcile_errors.is_empty() && s.unreachable_peers.is_empty();
    if json {
        output::print_json(&output::status_json(&s, healthy));
    } else {
        output::status_text(&s);
    }
    if !healthy {
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
