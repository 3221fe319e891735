//! trellisd: the Trellis agent.

use clap::Parser;
use trellis_agent::daemon::config::{Config, Overrides};

/// The Trellis agent: attaches containers to overlay networks on this host.
#[derive(Parser)]
#[command(name = "trellisd", version)]
struct Args {
    #[command(flatten)]
    overrides: Overrides,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = Config::load(&args.overrides)?;
    let filter = tracing_subscriber::EnvFilter::try_new(format!("{},hickory_server=warn", cfg.log))
        .map_err(|e| anyhow::anyhow!("invalid log filter {:?}: {e}", cfg.log))?;
    // Colours on a terminal only: a log file or the journal gets plain
    // `key=value` fields that grep finds.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(trellis_agent::daemon::run(cfg))
}
