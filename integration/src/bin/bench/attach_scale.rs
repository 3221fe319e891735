//! Attach latency against the number of endpoints already on the host:
//! two single-host agents side by side, one with 10 endpoints attached and
//! one with 1,000, and attaches timed on each alternately (each detached
//! after, its passes left to finish), in rounds. A host's attach must not
//! grow with the endpoints it has (target: within 1.1× at 1,000 of 10).

use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use trellis_integration::{Host, Netns, bin};

pub struct AttachScale {
    pub small: usize,
    pub large: usize,
    /// Per round: the median attach on the host with `small` endpoints and
    /// on the one with `large`.
    pub rounds: Vec<(Duration, Duration)>,
    pub per_round: usize,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn host_with(n: usize, subnet: &str) -> Result<Host> {
    let h = Host::new()?;
    h.ctl(&["network", "create", "scale", "--subnet", subnet, "--attachable"])?;
    for i in 0..n {
        h.ctl(&["attach", "scale", "--name", &format!("resident-{i}")])?;
        if (i + 1) % 250 == 0 {
            eprintln!("  {} endpoints on one host", i + 1);
        }
    }
    Ok(h)
}

pub fn bench(small: usize, large: usize, rounds: usize, per_round: usize) -> Result<AttachScale> {
    let a = host_with(small, "10.71.0.0/20")?;
    let b = host_with(large, "10.72.0.0/20")?;
    let attach_once = |h: &Host, name: &str| -> Result<Duration> {
        let ns = Netns::new("tas")?;
        let took = super::timed(
            Command::new(bin("trellisctl")).arg("--socket").arg(h.socket()).args([
                "attach",
                "scale",
                "--name",
                name,
                "--netns",
                ns.path().to_str().unwrap(),
            ]),
            None,
        )?;
        h.ctl(&["detach", name])?;
        std::thread::sleep(Duration::from_millis(200));
        Ok(took)
    };
    let mut r = AttachScale { small, large, rounds: Vec::new(), per_round };
    for round in 0..rounds {
        let (mut s, mut l) = (Vec::new(), Vec::new());
        for i in 0..per_round {
            // Alternate which host goes first.
            let name = format!("t-{round}-{i}");
            if (round + i) % 2 == 0 {
                s.push(attach_once(&a, &name)?);
                l.push(attach_once(&b, &name)?);
            } else {
                l.push(attach_once(&b, &name)?);
                s.push(attach_once(&a, &name)?);
            }
        }
        let (ms, ml) = (median(s), median(l));
        eprintln!(
            "  round {}: {small} endpoints {:.1} ms, {large} endpoints {:.1} ms",
            round + 1,
            ms.as_secs_f64() * 1e3,
            ml.as_secs_f64() * 1e3
        );
        r.rounds.push((ms, ml));
    }
    Ok(r)
}

pub fn md(md: &mut String, r: &AttachScale) -> Result<()> {
    writeln!(md, "## Attach latency against the endpoints already on the host\n")?;
    writeln!(
        md,
        "Two single-host agents side by side (each its own embedded store), one with {} endpoints attached on \
         one network, one with {}. `trellisctl attach --netns` of a fresh namespace on each alternately \
         ({} per round, the first host alternating; each detached after and its passes left to finish), \
         {} rounds; the per-round medians.\n",
        r.small,
        r.large,
        r.per_round,
        r.rounds.len()
    )?;
    writeln!(md, "| round | {} endpoints ms | {} endpoints ms | ratio |", r.small, r.large)?;
    writeln!(md, "|---|---|---|---|")?;
    let mut ratios: Vec<f64> = Vec::new();
    for (i, (s, l)) in r.rounds.iter().enumerate() {
        let ratio = l.as_secs_f64() / s.as_secs_f64();
        ratios.push(ratio);
        writeln!(md, "| {} | {:.2} | {:.2} | {:.2} |", i + 1, s.as_secs_f64() * 1e3, l.as_secs_f64() * 1e3, ratio)?;
    }
    ratios.sort_by(f64::total_cmp);
    let (min, med, max) = (ratios[0], ratios[ratios.len() / 2], ratios[ratios.len() - 1]);
    writeln!(
        md,
        "\nAttach at {} ÷ at {} endpoints: **{med:.2}×** [{min:.2}–{max:.2}] (target ≤ 1.1×: {}).\n",
        r.large,
        r.small,
        super::verdict(max <= 1.1)
    )?;
    Ok(())
}
