//! trellisctl: the Trellis command line.

mod attach;
mod endpoint;
mod gate;
mod hosts;
mod monitor;
mod network;
mod output;
mod service;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
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
    Attach(AttachArgs),
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
    /// The cluster as a whole.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// The agent's health.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Live flow and drop events of this host's endpoints (from the eBPF
    /// datapath, on unless trellisd runs with --ebpf=false): every drop
    /// with its reason, every flow start that passed.
    Monitor(MonitorArgs),
}

// `attach`'s arguments, in a struct to be handed on whole (its help text is
// the doc of `Cmd::Attach`).
#[derive(Args)]
struct AttachArgs {
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
}

// `monitor`'s arguments (its help text is the doc of `Cmd::Monitor`).
#[derive(Args)]
struct MonitorArgs {
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
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Create a network.
    Create {
        name: String,
        /// The network's subnet, CIDR; once per family: an IPv4 one and,
        /// for dual stack, an IPv6 one (default: from the pools).
        #[arg(long)]
        subnet: Vec<String>,
        /// The gateway, once per family (default: each subnet's first
        /// address).
        #[arg(long)]
        gateway: Vec<String>,
        /// Dual stack: an IPv6 /64 from the cluster's ULA pool when no
        /// IPv6 --subnet is given.
        #[arg(long)]
        ipv6: bool,
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
        /// listen on TARGET (PORT by default). Without --port a vip service
        /// forwards every port, TCP and UDP, to the same port of a backend.
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
        /// HOSTPORT:PORT[/tcp|/udp], repeatable: publish the service's PORT
        /// on HOSTPORT of every host of the cluster (the routing mesh),
        /// from outside, keeping the client's address. `--publish PORT`
        /// picks a free host port from 30000-32767 (shown).
        #[arg(long = "publish", value_name = "HOSTPORT:PORT[/PROTO]")]
        publish: Vec<String>,
        /// `ingress` (every host) or `host` (only the hosts that run a
        /// backend, as Docker's mode=host).
        #[arg(long = "publish-mode", default_value = "ingress")]
        publish_mode: String,
        #[arg(long)]
        json: bool,
    },
    /// Change a service's published ports, live.
    Update {
        name: String,
        /// HOSTPORT:PORT[/tcp|/udp] or PORT[/tcp|/udp], repeatable, as
        /// `create --publish`.
        #[arg(long = "publish-add", value_name = "HOSTPORT:PORT[/PROTO]")]
        publish_add: Vec<String>,
        /// HOSTPORT[/tcp|/udp], repeatable: stop publishing that host port.
        #[arg(long = "publish-rm", value_name = "HOSTPORT[/PROTO]")]
        publish_rm: Vec<String>,
        /// The mode of the ports added (`ingress` or `host`).
        #[arg(long = "publish-mode", default_value = "ingress")]
        publish_mode: String,
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
enum ClusterCmd {
    /// Seal every encrypted network's key ring again under this host's
    /// current cluster key (the first line of its --cluster-key-file).
    /// Refused until every live host holds that key: put it first in every
    /// host's file and restart their agents, then run this; the old line
    /// can go afterwards.
    RotateKey {
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
    /// Show an endpoint (by id, id prefix or name) as JSON, with its
    /// published ports as bound and what is wrong with its devices.
    Inspect {
        endpoint: String,
        /// The endpoint's network, where names are ambiguous.
        #[arg(long)]
        network: Option<String>,
        /// Accepted for symmetry: inspect always prints JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The `--label KEY=VALUE` arguments (network create, attach).
fn labels(args: &[String]) -> anyhow::Result<HashMap<String, String>> {
    args.iter().map(|a| validate::label_arg(a).map_err(anyhow::Error::from)).collect()
}

/// The agent's gRPC client, over its unix socket.
type Client = proto::agent_client::AgentClient<tonic::transport::Channel>;

/// Connect to the agent and hand the subcommand to its module.
async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut c = client::connect(&cli.socket).await?;
    match cli.cmd {
        Cmd::Network(cmd) => network::run(&mut c, cmd).await,
        Cmd::Attach(args) => attach::attach(&mut c, args).await,
        Cmd::Detach { endpoint, network } => attach::detach(&mut c, endpoint, network).await,
        Cmd::Endpoint(cmd) => endpoint::run(&mut c, cmd).await,
        Cmd::Service(cmd) => service::run(&mut c, cmd).await,
        Cmd::Host(cmd) => hosts::host(&mut c, cmd).await,
        Cmd::Cluster(ClusterCmd::RotateKey { json }) => hosts::rotate_cluster_key(&mut c, json).await,
        Cmd::Status { json } => hosts::status(&mut c, json).await,
        Cmd::Monitor(args) => monitor::run(&mut c, args).await,
    }
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
