//! Encrypted vs plain throughput between two stock-kernel guests (this
//! machine's kernel has no ESP): one TCP stream (iperf3) from an endpoint on
//! one guest to an endpoint on the other, over an encrypted and a plain
//! Trellis network, interleaved in rounds, in the same run.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use trellis_integration::vm::{self, Pair};

pub struct IpsecResult {
    /// Bits per second received, per round.
    pub sec: Vec<f64>,
    pub plain: Vec<f64>,
    /// The encrypted network again with ESP in UDP (guest 2 asking for it).
    pub sec_udp: Vec<f64>,
    pub rounds: usize,
    pub secs: u32,
}

fn received_bps(path: &Path) -> Result<f64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    v["end"]["sum_received"]["bits_per_second"].as_f64().with_context(|| format!("no throughput in {}", path.display()))
}

pub fn bench(rounds: usize, secs: u32) -> Result<IpsecResult> {
    let script = vm::available()?.join("ipsec-guest.sh");
    let extra = format!("trellis.mode=bench trellis.rounds={rounds} trellis.secs={secs}");
    let mut pair = Pair::start_with(&script, 1024, &extra)?;
    pair.wait(Duration::from_secs(1200))?;
    let out = pair.out();
    let mut r = IpsecResult { sec: vec![], plain: vec![], sec_udp: vec![], rounds, secs };
    for i in 1..=rounds {
        r.sec.push(received_bps(&out.join(format!("iperf-sec-{i}.json"))).with_context(|| pair.logs())?);
        r.plain.push(received_bps(&out.join(format!("iperf-plain-{i}.json"))).with_context(|| pair.logs())?);
        r.sec_udp.push(received_bps(&out.join(format!("iperf-secudp-{i}.json"))).with_context(|| pair.logs())?);
    }
    Ok(r)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

pub fn md(md: &mut String, r: &IpsecResult) -> Result<()> {
    writeln!(md, "## Encrypted networks: throughput with IPsec vs without\n")?;
    writeln!(
        md,
        "**Measured under software emulation** (QEMU TCG: this machine's kernel has no ESP, and `/dev/kvm` \
         does not work here), so absolute figures are far below real hardware and only the ratio means \
         anything. Two guests booting Debian's stock kernel ({}), one vCPU each, joined by a QEMU socket \
         wire; each runs `trellisd` (etcd in the first). One TCP stream (`iperf3 -t {}`) from an endpoint on \
         one guest to an endpoint on the other, over an encrypted network (ESP transport, \
         `rfc4106(gcm(aes))`, ESN) and over a plain one, {} rounds interleaved; then the encrypted network \
         again with ESP in UDP (port 4500; guest 2's agent restarted with `--encryption-transport udp`), the \
         same number of rounds after those (not interleaved: switching the transport takes an agent \
         restart); medians.\n",
        kernel(),
        r.secs,
        r.rounds
    )?;
    let (s, p) = (median(&r.sec), median(&r.plain));
    writeln!(md, "| network | Mbit/s (median) | rounds |")?;
    writeln!(md, "|---|---|---|")?;
    let list = |v: &[f64]| v.iter().map(|b| format!("{:.0}", b / 1e6)).collect::<Vec<_>>().join(", ");
    writeln!(md, "| encrypted | {:.0} | {} |", s / 1e6, list(&r.sec))?;
    writeln!(md, "| plain | {:.0} | {} |", p / 1e6, list(&r.plain))?;
    let u = median(&r.sec_udp);
    writeln!(md, "| encrypted, ESP in UDP | {:.0} | {} |", u / 1e6, list(&r.sec_udp))?;
    writeln!(
        md,
        "\nEncrypted ÷ plain: **{:.2}×** (no target set; under TCG the cipher runs without AES-NI). \
         ESP in UDP ÷ ESP: **{:.2}×** (emulated; 8 bytes more per packet and the UDP socket's decapsulation).\n",
        s / p,
        u / s
    )?;
    Ok(())
}

fn kernel() -> String {
    std::fs::read_dir("/lib/modules")
        .ok()
        .and_then(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).max())
        .unwrap_or_else(|| "unknown".into())
}
