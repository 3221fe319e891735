//! `trellisctl endpoint`: ls.

use std::process::ExitCode;

use serde_json::Value;
use trellis_plugin_api::proto;

use crate::{Client, EndpointCmd, output};

pub async fn run(c: &mut Client, cmd: EndpointCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        EndpointCmd::Ls { network, json } => ls(c, network, json).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn ls(c: &mut Client, network: Option<String>, json: bool) -> anyhow::Result<()> {
    let list = c
        .list_endpoints(proto::ListEndpointsRequest { network: network.unwrap_or_default() })
        .await?
        .into_inner()
        .endpoints;
    if json {
        output::print_json(&Value::Array(list.iter().map(output::endpoint_json).collect()));
    } else {
        output::endpoint_table(&list);
    }
    Ok(())
}
