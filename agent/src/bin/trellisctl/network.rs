//! `trellisctl network`: create, ls, inspect, rm and rotate-key.

use std::process::ExitCode;

use serde_json::Value;
use trellis_plugin_api::proto;

use crate::{Client, NetworkCmd, labels, output};

pub async fn run(c: &mut Client, cmd: NetworkCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        NetworkCmd::Create { name, subnet, gateway, ipv6, attachable, internal, encrypted, mtu, labels: l, json } => {
            let (subnet, subnet6) = by_family("--subnet", &subnet, |s| s.split('/').next().unwrap_or(s))?;
            let (gateway, gateway6) = by_family("--gateway", &gateway, |s| s)?;
            let req = proto::CreateNetworkRequest {
                name,
                subnet,
                gateway,
                subnet6,
                gateway6,
                ipv6,
                attachable,
                internal,
                encrypted,
                mtu: mtu.unwrap_or(0),
                labels: labels(&l)?,
            };
            create(c, req, json).await?;
        }
        NetworkCmd::Ls { json } => ls(c, json).await?,
        NetworkCmd::Inspect { name, json: _ } => inspect(c, name).await?,
        NetworkCmd::Rm { name, force } => rm(c, name, force).await?,
        NetworkCmd::RotateKey { name, no_wait, timeout } => rotate_key(c, name, no_wait, timeout).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// A repeatable flag's values sorted by address family, at most one of
/// each: (IPv4, IPv6), empty where not given. A value that is no address
/// goes as IPv4, for the agent to refuse with its reason.
fn by_family(flag: &str, values: &[String], addr: impl Fn(&str) -> &str) -> anyhow::Result<(String, String)> {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for v in values {
        match addr(v).parse::<std::net::IpAddr>() {
            Ok(ip) if ip.is_ipv6() => v6.push(v.clone()),
            _ => v4.push(v.clone()),
        }
    }
    if v4.len() > 1 || v6.len() > 1 {
        anyhow::bail!("{flag} is given once per address family (an IPv4 value and an IPv6 one), not {values:?}");
    }
    Ok((v4.pop().unwrap_or_default(), v6.pop().unwrap_or_default()))
}

async fn create(c: &mut Client, req: proto::CreateNetworkRequest, json: bool) -> anyhow::Result<()> {
    let n = c.create_network(req).await?.into_inner();
    if json {
        output::print_json(&output::network_json(&n));
    } else {
        let v6 = if n.subnet6.is_empty() {
            String::new()
        } else {
            format!(" subnet6={} gateway6={}", n.subnet6, n.gateway6)
        };
        println!("{} {} subnet={} gateway={}{v6} vni={} mtu={}", n.name, n.id, n.subnet, n.gateway, n.vni, n.mtu);
    }
    Ok(())
}

async fn ls(c: &mut Client, json: bool) -> anyhow::Result<()> {
    let list = c.list_networks(proto::ListNetworksRequest {}).await?.into_inner().networks;
    if json {
        output::print_json(&Value::Array(list.iter().map(output::network_json).collect()));
    } else {
        output::network_table(&list);
    }
    Ok(())
}

async fn inspect(c: &mut Client, name: String) -> anyhow::Result<()> {
    let n = c.inspect_network(proto::NetworkRef { name }).await?.into_inner();
    output::print_json(&output::network_json(&n));
    Ok(())
}

async fn rm(c: &mut Client, name: String, force: bool) -> anyhow::Result<()> {
    let r = c.remove_network(proto::RemoveNetworkRequest { name: name.clone(), force }).await?.into_inner();
    if r.endpoints_removed > 0 {
        println!("removed {name} and its {} endpoint(s)", r.endpoints_removed);
    } else {
        println!("removed {name}");
    }
    Ok(())
}

/// Start the rotation, then (unless `no_wait`) follow it until the old
/// epoch is retired on every host, or give up after `timeout` seconds.
async fn rotate_key(c: &mut Client, name: String, no_wait: bool, timeout: u64) -> anyhow::Result<()> {
    let n = c.rotate_key(proto::NetworkRef { name: name.clone() }).await?.into_inner();
    let k = n.key.unwrap_or_default();
    let new = k.epochs.iter().copied().max().unwrap_or(k.tx_epoch);
    println!("{name}: rotating from epoch {} to {new}: every host installs the new inbound keys", k.tx_epoch);
    if no_wait {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout);
    let mut said = (false, false);
    loop {
        let n = c.inspect_network(proto::NetworkRef { name: name.clone() }).await?.into_inner();
        let k = n.key.unwrap_or_default();
        if k.tx_epoch >= new && !said.0 {
            println!("{name}: every host installed epoch {new}; senders switched to it");
            said.0 = true;
        }
        if k.tx_epoch >= new && k.epochs.iter().all(|e| *e >= new) {
            println!("{name}: epoch {} retired; rotation done", new - 1);
            break;
        }
        if !said.1 && std::time::Instant::now() + std::time::Duration::from_secs(timeout / 2) > deadline {
            println!("{name}: still waiting; hosts report: {}", k.acks.join(", "));
            said.1 = true;
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "{name}: the rotation to epoch {new} did not finish within {timeout} s (hosts report: {}); it goes on in the background",
                k.acks.join(", ")
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    Ok(())
}
