//! `trellisctl endpoint`: ls, inspect.

use std::process::ExitCode;

use serde_json::Value;
use trellis_plugin_api::proto;

use crate::{Client, EndpointCmd, output};

pub async fn run(c: &mut Client, cmd: EndpointCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        EndpointCmd::Ls { network, json } => ls(c, network, json).await?,
        EndpointCmd::Inspect { endpoint, network, json: _ } => inspect(c, endpoint, network).await?,
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

async fn inspect(c: &mut Client, endpoint: String, network: Option<String>) -> anyhow::Result<()> {
    let r = c
        .check_endpoint(proto::CheckEndpointRequest {
            endpoint,
            network: network.unwrap_or_default(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut v = output::endpoint_json(&r.endpoint.unwrap_or_default());
    v["problems"] = serde_json::json!(r.problems);
    output::print_json(&v);
    Ok(())
}
