//! `trellisctl attach` (into a namespace, or a debugging shell in a new one)
//! and `trellisctl detach`.

use std::process::ExitCode;

use trellis_plugin_api::proto;

use crate::{AttachArgs, Client, gate, labels, output};

pub async fn attach(c: &mut Client, args: AttachArgs) -> anyhow::Result<ExitCode> {
    let AttachArgs { network, name, ip, labels: l, netns, ifname, json, cmd } = args;
    let req = proto::AttachRequest {
        network,
        name: name.unwrap_or_default(),
        ip: ip.unwrap_or_default(),
        labels: labels(&l)?,
        netns: netns.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        ifname,
        kind: proto::EndpointKind::Adhoc as i32,
        ..Default::default()
    };
    if cmd.is_empty() {
        let e = c.attach(req).await?.into_inner();
        if json {
            output::print_json(&output::endpoint_json(&e));
        } else {
            println!("{} {} {} netns={}", e.name, e.id, e.address, e.netns);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if netns.is_some() {
        anyhow::bail!("give either --netns or a command to run in a new namespace, not both");
    }
    shell(c, req, &cmd).await
}

/// `attach NETWORK -- CMD`: CMD runs in a new namespace attached to the
/// network, detached once CMD exits; CMD's exit code.
async fn shell(c: &mut Client, mut req: proto::AttachRequest, cmd: &[String]) -> anyhow::Result<ExitCode> {
    let (mut child, gate) = gate::spawn_gated(cmd)?;
    req.netns = format!("/proc/{}/ns/net", child.id());
    let e = match c.attach(req).await {
        Ok(e) => e.into_inner(),
        Err(status) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(status.into());
        }
    };
    eprintln!("attached {} ({}) to {}; running {:?}", e.name, e.address, e.network, cmd.join(" "));
    gate::open(gate, &e.dns)?;
    let code = gate::wait(child).await?;
    if let Err(s) = c.detach(proto::DetachRequest { endpoint: e.id.clone(), ..Default::default() }).await {
        eprintln!(
            "trellisctl: detaching {} failed: {} (the agent removes it once its namespace is gone)",
            e.id,
            s.message()
        );
    }
    Ok(code)
}

pub async fn detach(c: &mut Client, endpoint: String, network: Option<String>) -> anyhow::Result<ExitCode> {
    let r = c
        .detach(proto::DetachRequest {
            endpoint: endpoint.clone(),
            network: network.unwrap_or_default(),
            ..Default::default()
        })
        .await?
        .into_inner();
    if r.drain_ms > 0 {
        println!(
            "detached {endpoint}: it takes no new connection; its open ones keep flowing for {} ms, then it is removed",
            r.drain_ms
        );
    } else {
        println!("detached {endpoint}");
    }
    Ok(ExitCode::SUCCESS)
}
