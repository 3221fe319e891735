//! Dual stack: cross-host TCP throughput over IPv6 against IPv4 on the same
//! dual-stack network (one iperf3 stream each, interleaved in rounds), and
//! the attach latency of an endpoint on a dual-stack network against one
//! on an IPv4-only network of the same host (interleaved too). Every ratio
//! with the min–max of its rounds.

use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use trellis_integration::{Lab, Netns, bin, netns_of};

pub struct DualStack {
    /// Per round: (IPv4 bits/s, IPv6 bits/s).
    pub throughput: Vec<(f64, f64)>,
    /// Per round: median attach time on the IPv4-only and on the
    /// dual-stack network.
    pub attach: Vec<(Duration, Duration)>,
    pub secs: u32,
    pub attaches: usize,
}

fn addr(e: &serde_json::Value, key: &str) -> Result<String> {
    Ok(e[key].as_str().with_context(|| format!("no {key} in {e}"))?.split('/').next().unwrap_or_default().to_string())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub fn bench(rounds: usize, secs: u32, attaches: usize) -> Result<DualStack> {
    let lab = Lab::new(2, 10_000)?;
    let (h1, h2) = (&lab.hosts[0], &lab.hosts[1]);
    h1.ctl(&["network", "create", "dual", "--subnet", "10.67.0.0/24", "--subnet", "fd00:67::/64", "--attachable"])?;
    h1.ctl(&["network", "create", "four", "--subnet", "10.68.0.0/24", "--attachable"])?;
    let client = h1.attach("dual", "client", &[])?;
    let server = h2.attach("dual", "server", &[])?;
    let (cns, sns) = (netns_of(&client), netns_of(&server));
    let (s4, s6) = (addr(&server, "address")?, addr(&server, "address6")?);
    // Both paths up before timing (neighbour entries, the first packets).
    for dst in [&s4, &s6] {
        anyhow::ensure!(
            trellis_integration::wait_for(Duration::from_secs(10), || trellis_integration::ping(&cns, dst, 1)),
            "{dst} unreachable"
        );
    }
    let mut r = DualStack { throughput: Vec::new(), attach: Vec::new(), secs, attaches };
    let attach_once = |net: &str, i: usize, round: usize| -> Result<Duration> {
        let ns = Netns::new("tds")?;
        let name = format!("{net}-{round}-{i}");
        let took = super::timed(
            Command::new(bin("trellisctl")).arg("--socket").arg(h1.socket()).args([
                "attach",
                net,
                "--name",
                &name,
                "--netns",
                ns.path().to_str().unwrap(),
            ]),
            None,
        )?;
        h1.ctl(&["detach", &name])?;
        Ok(took)
    };
    for round in 0..rounds {
        // Alternate which family goes first.
        let (v4, v6) = if round % 2 == 0 {
            let v4 = super::iperf(&cns, &sns, &s4, secs)?;
            (v4, super::iperf(&cns, &sns, &s6, secs)?)
        } else {
            let v6 = super::iperf(&cns, &sns, &s6, secs)?;
            (super::iperf(&cns, &sns, &s4, secs)?, v6)
        };
        eprintln!("  round {}: IPv4 {:.0} Mbit/s, IPv6 {:.0} Mbit/s", round + 1, v4 / 1e6, v6 / 1e6);
        r.throughput.push((v4, v6));
        let (mut four, mut dual) = (Vec::new(), Vec::new());
        for i in 0..attaches {
            four.push(attach_once("four", i, round)?);
            dual.push(attach_once("dual", i, round)?);
        }
        r.attach.push((median(four), median(dual)));
    }
    Ok(r)
}

fn spread(v: impl Iterator<Item = f64>) -> (f64, f64, f64) {
    let mut v: Vec<f64> = v.collect();
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

pub fn md(md: &mut String, r: &DualStack) -> Result<()> {
    writeln!(md, "## Dual stack: IPv6 against IPv4\n")?;
    writeln!(
        md,
        "A two-host lab (one namespace per host, a veth underlay). On one dual-stack network \
         (10.67.0.0/24 + fd00:67::/64): one TCP stream (`iperf3 -t {}`) from an endpoint on host 1 to one on \
         host 2, over IPv6 and over IPv4, {} rounds interleaved (the first family alternating). Attach: \
         `trellisctl attach --netns` of a fresh namespace on host 1, {} per round on an IPv4-only network and \
         on the dual-stack one alternately, each detached after; the per-round medians. Ratios with the \
         min–max over the rounds.\n",
        r.secs,
        r.throughput.len(),
        r.attaches
    )?;
    writeln!(
        md,
        "| round | IPv4 Mbit/s | IPv6 Mbit/s | IPv6 ÷ IPv4 | attach IPv4-only ms | attach dual-stack ms | dual ÷ IPv4 |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    for (i, ((v4, v6), (a4, a6))) in r.throughput.iter().zip(&r.attach).enumerate() {
        writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} | {:.2} |",
            i + 1,
            v4 / 1e6,
            v6 / 1e6,
            v6 / v4,
            a4.as_secs_f64() * 1e3,
            a6.as_secs_f64() * 1e3,
            a6.as_secs_f64() / a4.as_secs_f64()
        )?;
    }
    let (tmin, tmed, tmax) = spread(r.throughput.iter().map(|(a, b)| b / a));
    let (amin, amed, amax) = spread(r.attach.iter().map(|(a, b)| b.as_secs_f64() / a.as_secs_f64()));
    writeln!(
        md,
        "\nCross-host throughput, IPv6 ÷ IPv4: **{tmed:.2}×** [{tmin:.2}–{tmax:.2}] (target ≥ 0.97×: {}). \
         Attach latency, dual-stack ÷ IPv4-only: **{amed:.2}×** [{amin:.2}–{amax:.2}] (target ≤ 1.1×: {}). \
         Not measured yet: IPv6 against a hand-built IPv6 VXLAN path. The attach gap is not explained yet: \
         taking both addresses in one store transaction instead of two left it as it was, and in a debug \
         build in the lab test's setting the two differ by 10–20 %, so the cost lies elsewhere on this \
         path (to be broken down: the kernel's IPv6 work in the container, the pass, the zone).\n",
        super::verdict(tmin >= 0.97),
        super::verdict(amax <= 1.1)
    )?;
    Ok(())
}
