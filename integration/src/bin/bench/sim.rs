//! The `trellis-sim` section: simulated clusters of 100, 300 and 1,000
//! hosts with 50 endpoints each against one real etcd (see
//! `src/bin/sim.rs` for what is simulated and what is measured).

use std::fmt::Write as _;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// One cluster size's report, as `trellis-sim --json` prints it.
pub struct Row {
    pub report: serde_json::Value,
}

pub fn bench(sizes: &[(u32, u32)], per_host: u32) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &(hosts, agents) in sizes {
        eprintln!("trellis-bench: trellis-sim, {hosts} hosts ({agents} agents), {per_host} endpoints each");
        let out = Command::new(trellis_integration::bin("trellis-sim"))
            .args(["--hosts", &hosts.to_string(), "--agents", &agents.to_string()])
            .args(["--endpoints-per-host", &per_host.to_string(), "--changes", "40", "--json"])
            .output()
            .context("running trellis-sim")?;
        if !out.status.success() {
            bail!("trellis-sim at {hosts} hosts failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("reading trellis-sim's JSON report")?;
        rows.push(Row { report });
    }
    Ok(rows)
}

pub fn md(md: &mut String, rows: &[Row]) -> Result<()> {
    writeln!(md, "## A simulated cluster (trellis-sim)\n")?;
    writeln!(
        md,
        "`trellis-sim` runs, in one process against one real etcd, a sample of hosts with the agent's \
         real control plane (store client, informer, reconciler and its full diff over the fake kernel, \
         IPAM, DNS zone, lease) and the rest of the cluster as registered hosts with their endpoints in \
         the store, each with its own watch (etcd sends every event to every host). Per-agent figures are \
         measured on the sample; each sampled agent runs on a thread of its own, and its CPU is that \
         thread's CPU time over the changes (mean, and min–max over the agents: the target holds only \
         if the max clears it): all of it, and the change's own — all of it less the agent's idle rate \
         (its periodic full passes and lease renewals, measured for a few seconds before the changes) \
         over the same time, which is what the target is compared with; the idle rate is beside them, \
         and the whole process's CPU per change (the writer, the watch-only hosts, the agents). An endpoint change is a new \
         endpoint on a watch-only host; it is programmed when every sampled agent's kernel has its \
         tunnel entry.\n"
    )?;
    writeln!(
        md,
        "| hosts (sampled agents) | endpoints | new endpoint on every agent p50 / p99 | store requests / change / agent | \
         watch events (bytes) / change / agent | watch events / change, cluster | CPU / change / agent (min–max) | \
         of it the change's (min–max) | idle CPU / agent | process CPU / change | memory / remote endpoint | \
         full pass | back after an etcd restart |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    for r in rows {
        let f = |k: &str| r.report[k].as_f64().unwrap_or(f64::NAN);
        writeln!(
            md,
            "| {} ({}) | {} | {:.0} / {:.0} ms | {:.2} | {:.1} ({:.0} B) | {:.0} | {:.0} µs ({:.0}–{:.0}) | {:.0} µs ({:.0}–{:.0}) | {:.2} % | {:.0} µs | {:.0} B | {:.0} ms | {:.1} s |",
            f("hosts"),
            f("agents"),
            f("endpoints"),
            f("every_agent_p50_s") * 1e3,
            f("every_agent_p99_s") * 1e3,
            f("requests_per_change_per_agent"),
            f("watch_events_per_change_per_agent"),
            f("watch_bytes_per_change_per_agent"),
            f("watch_events_per_change_cluster"),
            f("cpu_us_per_change_per_agent"),
            f("cpu_us_per_change_per_agent_min"),
            f("cpu_us_per_change_per_agent_max"),
            f("event_cpu_us_per_change_per_agent"),
            f("event_cpu_us_per_change_per_agent_min"),
            f("event_cpu_us_per_change_per_agent_max"),
            f("idle_cpu_percent_per_agent"),
            f("process_cpu_us_per_change"),
            f("memory_bytes_per_remote_endpoint"),
            f("full_pass_s") * 1e3,
            f("etcd_restart_recovery_s"),
        )?;
    }
    if let Some(big) = rows.iter().max_by_key(|r| r.report["hosts"].as_u64().unwrap_or(0)) {
        let f = |k: &str| big.report[k].as_f64().unwrap_or(f64::NAN);
        writeln!(md, "\nTargets at the largest size measured ({} hosts):\n", f("hosts"))?;
        writeln!(md, "| target | measured | |\n|---|---|---|")?;
        let rows = [
            (
                "new endpoint on every host p99 ≤ 1 s",
                format!("{:.0} ms", f("every_agent_p99_s") * 1e3),
                f("every_agent_p99_s") <= 1.0,
            ),
            (
                "≤ 2 KiB of agent memory per remote endpoint",
                format!("{:.0} B", f("memory_bytes_per_remote_endpoint")),
                f("memory_bytes_per_remote_endpoint") <= 2048.0,
            ),
            (
                "CPU per remote endpoint event ≤ 50 µs per agent",
                format!(
                    "{:.0} µs (max of the agents {:.0} µs; with the idle share {:.0} µs)",
                    f("event_cpu_us_per_change_per_agent"),
                    f("event_cpu_us_per_change_per_agent_max"),
                    f("cpu_us_per_change_per_agent_max")
                ),
                f("event_cpu_us_per_change_per_agent_max") <= 50.0,
            ),
            (
                "every agent back within 10 s of an etcd restart",
                format!("{:.1} s", f("etcd_restart_recovery_s")),
                f("etcd_restart_recovery_s") <= 10.0,
            ),
        ];
        for (t, m, ok) in rows {
            writeln!(md, "| {t} | {m} | {} |", super::verdict(ok))?;
        }
    }
    writeln!(md)?;
    Ok(())
}
