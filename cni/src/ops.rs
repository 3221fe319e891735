//! The operations, each one or a few calls to the agent.

use std::collections::BTreeSet;

use serde_json::Value;
use tonic::transport::Channel;
use trellis_plugin_api::client;
use trellis_plugin_api::proto::{self, agent_client::AgentClient};

use crate::conf::{Command, Env, NetConf};
use crate::error::{CniError, codes};
use crate::result;

async fn connect(conf: &NetConf, unavailable_code: u32) -> Result<AgentClient<Channel>, CniError> {
    client::connect(&conf.socket).await.map_err(|e| CniError::new(unavailable_code, format!("try again later: {e}")))
}

fn is_not_found(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::NotFound
}

/// The endpoint name an orchestrator gives (`K8S_POD_NAME`), when usable.
fn endpoint_name(env: &Env) -> String {
    env.args
        .get("K8S_POD_NAME")
        .filter(|n| trellis_plugin_api::validate::name("endpoint name", n).is_ok())
        .cloned()
        .unwrap_or_default()
}

/// Run one command; `Some(result)` is printed on stdout.
pub async fn run(env: &Env, conf: &NetConf) -> Result<Option<Value>, CniError> {
    match env.command {
        Command::Version => Ok(Some(crate::conf::version_result(&conf.cni_version))),
        Command::Add => add(env, conf).await.map(Some),
        Command::Del => del(env, conf).await.map(|_| None),
        Command::Check => check(env, conf).await.map(|_| None),
        Command::Status => status(conf).await.map(|_| None),
        Command::Gc => gc(conf).await.map(|_| None),
    }
}

async fn add(env: &Env, conf: &NetConf) -> Result<Value, CniError> {
    let mut c = connect(conf, codes::TRY_AGAIN_LATER).await?;
    let netns = env.netns.as_ref().expect("ADD has a netns (checked when parsing the environment)");
    let ep = c
        .attach(proto::AttachRequest {
            network: conf.network.clone(),
            name: endpoint_name(env),
            ip: conf.ip.clone().unwrap_or_default(),
            labels: conf.labels.clone().into_iter().collect(),
            netns: netns.display().to_string(),
            ifname: env.ifname.clone(),
            kind: proto::EndpointKind::Cni as i32,
            container_id: env.container_id.clone(),
            reserved: false,
            publish: conf
                .port_mappings
                .iter()
                .map(|p| proto::PortMapping {
                    host_port: p.host_port as u32,
                    container_port: p.container_port as u32,
                    protocol: p.protocol.clone(),
                    host_ip: p.host_ip.clone(),
                })
                .collect(),
        })
        .await
        .map_err(|s| {
            if is_not_found(&s) {
                CniError::new(
                    codes::BAD_CONFIG,
                    format!(
                        "Trellis network {:?} does not exist (create it with `trellisctl network create {}`)",
                        conf.network, conf.network
                    ),
                )
            } else {
                CniError::from_status(&format!("attaching to network {:?}", conf.network), &s)
            }
        })?
        .into_inner();
    Ok(result::add_result(&conf.cni_version, &ep, ep.internal, &conf.dns))
}

async fn del(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let mut c = connect(conf, codes::TRY_AGAIN_LATER).await?;
    let req = proto::DetachRequest {
        network: conf.network.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        ..Default::default()
    };
    match c.detach(req).await {
        Ok(_) => Ok(()),
        // Already gone (a repeated DEL, or a network removed with --force).
        Err(s) if is_not_found(&s) => Ok(()),
        Err(s) => Err(CniError::from_status("detaching", &s)),
    }
}

async fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let Some(prev) = &conf.prev_result else {
        return Err(CniError::new(codes::BAD_CONFIG, "CHECK needs prevResult (the result of ADD)"));
    };
    let mut c = connect(conf, codes::TRY_AGAIN_LATER).await?;
    let req = proto::CheckEndpointRequest {
        network: conf.network.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        ..Default::default()
    };
    let answer = match c.check_endpoint(req).await {
        Ok(a) => a.into_inner(),
        Err(s) if is_not_found(&s) => {
            return Err(CniError::new(
                codes::UNKNOWN_CONTAINER,
                format!("container {} has no {} on network {:?}", env.container_id, env.ifname, conf.network),
            ));
        }
        Err(s) => return Err(CniError::from_status("checking", &s)),
    };
    let mut problems = answer.problems;
    if let Some(ep) = &answer.endpoint {
        let prev_addrs = result::prev_addresses(prev);
        if !prev_addrs.contains(&ep.address) {
            problems.push(format!("the endpoint has address {}, the previous result {:?}", ep.address, prev_addrs));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            codes::CHECK_FAILED,
            format!("the attachment is not as ADD left it: {}", problems.join("; ")),
        )
        .with_details(problems.join("\n")))
    }
}

async fn status(conf: &NetConf) -> Result<(), CniError> {
    let mut c = connect(conf, codes::STATUS_CANNOT_ADD).await?;
    let s = c
        .status(proto::StatusRequest {})
        .await
        .map_err(|s| CniError::new(codes::STATUS_CANNOT_ADD, format!("trellisd answers no status: {}", s.message())))?
        .into_inner();
    if !s.store_ok {
        return Err(CniError::new(codes::STATUS_CANNOT_ADD, format!("store unavailable: {}", s.store_error)));
    }
    match c.inspect_network(proto::NetworkRef { name: conf.network.clone() }).await {
        Ok(_) => Ok(()),
        Err(st) if is_not_found(&st) => {
            Err(CniError::new(codes::STATUS_CANNOT_ADD, format!("Trellis network {:?} does not exist", conf.network)))
        }
        Err(st) => Err(CniError::new(codes::STATUS_CANNOT_ADD, st.message().to_string())),
    }
}

async fn gc(conf: &NetConf) -> Result<(), CniError> {
    let valid: BTreeSet<(String, String)> =
        conf.valid_attachments.iter().flatten().map(|a| (a.container_id.clone(), a.ifname.clone())).collect();
    let mut c = connect(conf, codes::TRY_AGAIN_LATER).await?;
    let host =
        c.status(proto::StatusRequest {}).await.map_err(|s| CniError::from_status("status", &s))?.into_inner().host_id;
    let eps = match c.list_endpoints(proto::ListEndpointsRequest { network: conf.network.clone() }).await {
        Ok(l) => l.into_inner().endpoints,
        Err(s) if is_not_found(&s) => return Ok(()),
        Err(s) => return Err(CniError::from_status("listing endpoints", &s)),
    };
    let mut errors = Vec::new();
    for e in eps {
        let cni = e.kind == proto::EndpointKind::Cni as i32;
        if !cni || e.host != host || valid.contains(&(e.container_id.clone(), e.ifname.clone())) {
            continue;
        }
        if let Err(s) = c.detach(proto::DetachRequest { endpoint: e.id.clone(), ..Default::default() }).await
            && !is_not_found(&s)
        {
            errors.push(format!("{} ({} {}): {}", e.id, e.container_id, e.ifname, s.message()));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(codes::AGENT_FAILED, format!("GC could not remove {} attachments", errors.len()))
            .with_details(errors.join("\n")))
    }
}
