//! trellisctl: the Trellis command line.

mod endpoint;
mod gate;
mod hosts;
mod network;
mod output;
mod service;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use trellis_agent::client;
use trellis_agent::daemon::config::DEFAULT_SOCKET;
use trellis_plugin_api::proto;
use trellis_plugin_api::validate;

/// Trellis: overlay networks for containers.
#[derive(Parser)]
#[command(name = "trellisctl", version)]
struct Cli {
    /// The agent's socket.
    #[arg(long, global = true, env = "TRELLIS_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Manage networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Attach an endpoint to an attachable network: into --netns, into a new
    /// namespace kept until `detach`, or into a new namespace in which CMD runs
    /// (a debugging shell) and which goes when CMD exits.
    Attach {
        network: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        ip: Option<String>,
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        #[arg(long)]
        netns: Option<PathBuf>,
        /// Interface name inside the namespace.
        #[arg(long, default_value = "eth0")]
        ifname: String,
        #[arg(long)]
        json: bool,
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// Detach an endpoint (by name or id).
    Detach {
        endpoint: String,
        #[arg(long)]
        network: Option<String>,
    },
    /// Endpoints.
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Services: a name (and in vip mode a virtual IP, load-balanced in
    /// the eBPF datapath) for the endpoints matching a selector.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Hosts of the cluster.
    #[command(subcommand)]
    Host(HostCmd),
    /// The agent's health.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Live flow and drop events of this host's endpoints (from the eBPF
    /// datapath, on unless trellisd runs with --ebpf=false): every drop
    /// with its reason, every flow start that passed.
    Monitor {
        #[arg(long)]
        network: Option<String>,
        /// Endpoint id, id prefix or name.
        #[arg(long)]
        endpoint: Option<String>,
        /// `dropped` or `passed`.
        #[arg(long)]
        verdict: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Create a network.
    Create {
        name: String,
        #[arg(long)]
        subnet: Option<String>,
        #[arg(long)]
        gateway: Option<String>,
        /// Accept ad-hoc endpoints (trellisctl attach, standalone containers).
        #[arg(long)]
        attachable: bool,
        /// No traffic in or out of the network.
        #[arg(long)]
        internal: bool,
        /// IPsec ESP between hosts for this network's traffic (needs ESP in
        /// every carrying host's kernel; the MTU is lowered to fit it).
        #[arg(long)]
        encrypted: bool,
        #[arg(long)]
        mtu: Option<u32>,
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// List networks.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show a network as JSON.
    Inspect {
        name: String,
        /// Accepted for symmetry: inspect always prints JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a network (refused while it has endpoints, unless --force).
    #[command(alias = "remove")]
    Rm {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Rotate an encrypted network's key now, make-before-break on every
    /// host; waits until the old key is retired (unless --no-wait).
    RotateKey {
        name: String,
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// Create a service.
    Create {
        name: String,
        #[arg(long)]
        network: String,
        /// PORT[/tcp|/udp][:TARGET], repeatable: clients use PORT, backends
        /// listen on TARGET (PORT by default).
        #[arg(long = "port", value_name = "PORT[/PROTO][:TARGET]")]
        ports: Vec<String>,
        /// `vip` (a virtual IP, load-balanced) or `dnsrr` (the name
        /// resolves to every backend).
        #[arg(long, default_value = "vip")]
        mode: String,
        /// Backends are the endpoints with these labels (default:
        /// trellis.service=NAME).
        #[arg(long = "selector", value_name = "KEY=VALUE")]
        selector: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// List services.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        network: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show a service with its backends, as JSON.
    Inspect {
        name: String,
        /// Accepted for symmetry: inspect always prints JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a service (its VIP is released).
    #[command(alias = "remove")]
    Rm { name: String },
}

#[derive(Subcommand)]
enum HostCmd {
    /// List the live hosts with their tunnel state as seen from this host.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum EndpointCmd {
    /// List endpoints.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        network: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

fn labels(args: &[String]) -> anyhow::Result<HashMap<String, String>> {
    args.iter().map(|a| validate::label_arg(a).map_err(anyhow::Error::from)).collect()
}

/// The agent's gRPC client, over its unix socket.
type Client = proto::agent_client::AgentClient<tonic::transport::Channel>;

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut c = client::connect(&cli.socket).await?;
    match cli.cmd {
        Cmd::Network(cmd) => return network::run(&mut c, cmd).await,
        Cmd::Service(cmd) => return service::run(&mut c, cmd).await,
        Cmd::Endpoint(cmd) => return endpoint::run(&mut c, cmd).await,
        Cmd::Host(cmd) => return hosts::host(&mut c, cmd).await,
        Cmd::Status { json } => return hosts::status(&mut c, json).await,
        Cmd::Attach { network, name, ip, labels: l, netns, ifname, json, cmd } => {
            let mut req = proto::AttachRequest {
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
            let (mut child, gate) = gate::spawn_gated(&cmd)?;
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
            return Ok(code);
        }
        Cmd::Detach { endpoint, network } => {
            c.detach(proto::DetachRequest {
                endpoint: endpoint.clone(),
                network: network.unwrap_or_default(),
                ..Default::default()
            })
            .await?;
            println!("detached {endpoint}");
        }
        Cmd::Monitor { network, endpoint, verdict, json, count } => {
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
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
                seen += 1;
                if count.is_some_and(|n| seen >= n) {
                    break;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let Some(code) = gate::run_if_gate(&args) {
        return code;
    }
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellisctl: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // A gRPC status carries the agent's own message: print just that.
            match e.downcast_ref::<tonic::Status>() {
                Some(s) => eprintln!("trellisctl: {}", s.message()),
                None => eprintln!("trellisctl: {e:#}"),
            }
            ExitCode::from(1)
        }
    }
}
