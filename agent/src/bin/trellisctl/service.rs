//! `trellisctl service`: create, update (published ports), ls, inspect
//! and rm.

use std::collections::HashMap;
use std::process::ExitCode;

use serde_json::Value;
use trellis_plugin_api::{proto, validate};

use crate::{Client, ServiceCmd, output};

pub async fn run(c: &mut Client, cmd: ServiceCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ServiceCmd::Create { name, network, ports, mode, selector, publish, publish_mode, json } => {
            let req = proto::CreateServiceRequest {
                name,
                network,
                ports: ports_arg(&ports)?,
                mode,
                selector: selector_arg(&selector)?,
                publish: publish_arg(&publish, &publish_mode)?,
            };
            create(c, req, json).await?;
        }
        ServiceCmd::Update { name, publish_add, publish_rm, publish_mode, json } => {
            if publish_add.is_empty() && publish_rm.is_empty() {
                anyhow::bail!("nothing to update: give --publish-add and/or --publish-rm");
            }
            let mut rm = Vec::new();
            for v in &publish_rm {
                let (host_port, protocol) = validate::mesh_unpublish(v)?;
                rm.push(proto::MeshPort {
                    host_port: host_port as u32,
                    port: 0,
                    protocol: protocol.into(),
                    mode: String::new(),
                });
            }
            let req = proto::UpdateServiceRequest {
                name,
                publish_add: publish_arg(&publish_add, &publish_mode)?,
                publish_rm: rm,
            };
            let s = c.update_service(req).await?.into_inner();
            if json {
                output::print_json(&output::service_json(&s));
            } else {
                println!("{} published={}", s.name, output::publish_text(&s));
            }
        }
        ServiceCmd::Ls { network, json } => ls(c, network, json).await?,
        ServiceCmd::Inspect { name, json: _ } => inspect(c, name).await?,
        ServiceCmd::Rm { name } => rm(c, name).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The `--port PORT[/PROTO][:TARGET]` arguments.
fn ports_arg(ports: &[String]) -> anyhow::Result<Vec<proto::ServicePort>> {
    let mut req_ports = Vec::new();
    for p in ports {
        let (port, protocol, target) = validate::service_port(p)?;
        req_ports.push(proto::ServicePort { port: port as u32, protocol: protocol.into(), target: target as u32 });
    }
    Ok(req_ports)
}

/// The `--publish HOSTPORT:PORT[/PROTO]` arguments, in `mode`.
fn publish_arg(publish: &[String], mode: &str) -> anyhow::Result<Vec<proto::MeshPort>> {
    if !matches!(mode, "ingress" | "host") {
        anyhow::bail!("invalid --publish-mode {mode:?}: expected ingress or host");
    }
    let mut out = Vec::new();
    for v in publish {
        let (host_port, port, protocol) = validate::mesh_publish(v)?;
        out.push(proto::MeshPort {
            host_port: host_port as u32,
            port: port as u32,
            protocol: protocol.into(),
            mode: mode.into(),
        });
    }
    Ok(out)
}

/// The `--selector KEY=VALUE` arguments.
fn selector_arg(selector: &[String]) -> anyhow::Result<HashMap<String, String>> {
    Ok(selector.iter().map(|s| validate::selector(s)).collect::<Result<_, _>>()?)
}

async fn create(c: &mut Client, req: proto::CreateServiceRequest, json: bool) -> anyhow::Result<()> {
    let s = c.create_service(req).await?.into_inner();
    if json {
        output::print_json(&output::service_json(&s));
    } else {
        println!(
            "{} network={} mode={} vip={} ports={} published={} backends={}",
            s.name,
            s.network,
            s.mode,
            output::vip_text(&s),
            output::ports_text(&s),
            output::publish_text(&s),
            output::backends_text(&s)
        );
    }
    Ok(())
}

async fn ls(c: &mut Client, network: Option<String>, json: bool) -> anyhow::Result<()> {
    let list = c
        .list_services(proto::ListServicesRequest { network: network.unwrap_or_default() })
        .await?
        .into_inner()
        .services;
    if json {
        output::print_json(&Value::Array(list.iter().map(output::service_json).collect()));
    } else {
        output::service_table(&list);
    }
    Ok(())
}

async fn inspect(c: &mut Client, name: String) -> anyhow::Result<()> {
    let s = c.inspect_service(proto::ServiceRef { name }).await?.into_inner();
    output::print_json(&output::service_json(&s));
    Ok(())
}

async fn rm(c: &mut Client, name: String) -> anyhow::Result<()> {
    c.remove_service(proto::ServiceRef { name: name.clone() }).await?;
    println!("removed {name}");
    Ok(())
}
