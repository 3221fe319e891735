//! `trellisctl monitor`: the live flow and drop events, as they come.

use std::io::Write as _;
use std::process::ExitCode;

use trellis_plugin_api::proto;

use crate::{Client, MonitorArgs, output};

pub async fn run(c: &mut Client, args: MonitorArgs) -> anyhow::Result<ExitCode> {
    let MonitorArgs { network, endpoint, verdict, json, count } = args;
    let req = proto::MonitorRequest {
        network: network.unwrap_or_default(),
        endpoint: endpoint.unwrap_or_default(),
        verdict: verdict.unwrap_or_default(),
    };
    let mut events = c.monitor(req).await?.into_inner();
    let mut seen = 0u64;
    while let Some(e) = events.message().await? {
        if json {
            println!("{}", output::event_json(&e));
        } else {
            output::event_text(&e);
        }
        let _ = std::io::stdout().flush();
        seen += 1;
        if count.is_some_and(|n| seen >= n) {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}
