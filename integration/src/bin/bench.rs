//! trellis-bench: measures Trellis against its peers on this machine, in
//! one run, and writes BENCHMARKS.md. Figures are reported as ratios
//! against the peer measured side by side; nothing here is a pass/fail test.
//!
//! Sections:
//! * endpoint attach/detach latency vs the reference CNI `bridge` +
//!   `host-local` plugins (Debian `containernetworking-plugins`), each as a
//!   process exec per operation, interleaved one by one;
//! * IPAM allocations per second on the embedded (redb) store.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use trellis_integration::{Host, Netns, bin};

const CNI_DIR: &str = "/usr/lib/cni";

struct Args {
    endpoints: usize,
    allocations: usize,
    out: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut a = Args { endpoints: 200, allocations: 20_000, out: PathBuf::from("BENCHMARKS.md") };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--endpoints" => a.endpoints = val()?.parse()?,
            "--allocations" => a.allocations = val()?.parse()?,
            "--out" => a.out = val()?.into(),
            other => bail!("unknown argument {other:?} (--endpoints N, --allocations N, --out FILE)"),
        }
    }
    Ok(a)
}

#[derive(Clone, Copy)]
struct Stats {
    p50: Duration,
    p99: Duration,
    mean: Duration,
    n: usize,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let n = v.len();
    let at = |q: f64| v[((n as f64 * q).ceil() as usize).clamp(1, n) - 1];
    Stats { p50: at(0.50), p99: at(0.99), mean: v.iter().sum::<Duration>() / n as u32, n }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn progress(what: &str, i: usize, n: usize) {
    if i == n || i.is_multiple_of(50) {
        eprint!("\r  {what}: {i}/{n}   ");
        if i == n {
            eprintln!();
        }
        let _ = std::io::stderr().flush();
    }
}

fn timed(cmd: &mut Command, stdin: Option<&[u8]>) -> Result<Duration> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(data)?;
    }
    let out = child.wait_with_output()?;
    let took = t0.elapsed();
    if !out.status.success() {
        bail!("{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

struct AttachResult {
    drain: Duration,
    trellis_attach: Stats,
    trellis_detach: Stats,
    api_attach: Stats,
    api_detach: Stats,
    cni_add: Stats,
    cni_del: Stats,
}

fn cni(command: &str, conf: &[u8], id: &str, netns: &Path) -> Result<Duration> {
    timed(
        Command::new(Path::new(CNI_DIR).join("bridge"))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_DIR),
        Some(conf),
    )
}

fn bench_attach(n: usize) -> Result<AttachResult> {
    if !Path::new(CNI_DIR).join("bridge").exists() {
        bail!("{CNI_DIR}/bridge not found: install containernetworking-plugins (scripts/setup.sh does)");
    }
    let host = Host::new()?;
    host.ctl(&["network", "create", "bench", "--subnet", "10.70.0.0/16", "--attachable"])?;
    let data = tempfile::tempdir()?;
    let conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "benchnet", "type": "bridge", "bridge": "cnibench0",
        "isGateway": true, "ipMasq": false,
        "ipam": {"type": "host-local", "subnet": "10.80.0.0/16", "dataDir": data.path()},
    })
    .to_string()
    .into_bytes();
    // This process joins the host namespace, so the CNI plugin it execs runs
    // there as a runtime would run it (no nsenter in the timed path).
    let host_ns = std::fs::File::open(host.ns.path())?;
    nix::sched::setns(&host_ns, nix::sched::CloneFlags::CLONE_NEWNET).context("entering the bench host")?;

    eprintln!("  creating {} namespaces", 3 * n);
    let t_ns: Vec<Netns> = (0..n).map(|_| Netns::new("tbt")).collect::<Result<_>>()?;
    let a_ns: Vec<Netns> = (0..n).map(|_| Netns::new("tba")).collect::<Result<_>>()?;
    let c_ns: Vec<Netns> = (0..n).map(|_| Netns::new("tbc")).collect::<Result<_>>()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut client = rt.block_on(trellis_agent::client::connect(&host.socket()))?;

    let ctl = |args: &[&str]| -> Result<Duration> {
        timed(Command::new(bin("trellisctl")).arg("--socket").arg(host.socket()).args(args), None)
    };
    // Warm up both (page cache, first-use costs).
    for i in 0..3 {
        let (tns, cns) = (Netns::new("tbw")?, Netns::new("tbw")?);
        let name = format!("warm{i}");
        ctl(&["attach", "bench", "--name", &name, "--netns", tns.path().to_str().unwrap()])?;
        ctl(&["detach", &name])?;
        cni("ADD", &conf, &name, &cns.path())?;
        cni("DEL", &conf, &name, &cns.path())?;
    }

    let (mut ta, mut td, mut aa, mut ad, mut ca, mut cd) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut api_ids = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("t{i}");
        ta.push(ctl(&["attach", "bench", "--name", &name, "--netns", t_ns[i].path().to_str().unwrap()])?);
        let req = trellis_plugin_api::proto::AttachRequest {
            network: "bench".into(),
            name: format!("a{i}"),
            netns: a_ns[i].path().display().to_string(),
            ..Default::default()
        };
        let t0 = Instant::now();
        let ep = rt.block_on(client.attach(req))?.into_inner();
        aa.push(t0.elapsed());
        api_ids.push(ep.id);
        ca.push(cni("ADD", &conf, &format!("c{i}"), &c_ns[i].path())?);
        progress("attach / ADD", i + 1, n);
    }
    for i in 0..n {
        td.push(ctl(&["detach", &format!("t{i}")])?);
        let t0 = Instant::now();
        rt.block_on(client.detach(trellis_plugin_api::proto::DetachRequest {
            endpoint: api_ids[i].clone(),
            network: String::new(),
        }))?;
        ad.push(t0.elapsed());
        cd.push(cni("DEL", &conf, &format!("c{i}"), &c_ns[i].path())?);
        progress("detach / DEL", i + 1, n);
    }
    // Detach returns before the devices are gone: wait for the last of them.
    let t_drain = Instant::now();
    let gone = trellis_integration::wait_for(Duration::from_secs(60), || {
        host.ns.links().map(|l| !l.iter().any(|n| n.starts_with("trv-"))).unwrap_or(false)
    });
    if !gone {
        bail!("Trellis devices still present 60 s after the last detach");
    }
    let drain = t_drain.elapsed();
    Ok(AttachResult {
        drain,
        trellis_attach: stats(ta),
        trellis_detach: stats(td),
        api_attach: stats(aa),
        api_detach: stats(ad),
        cni_add: stats(ca),
        cni_del: stats(cd),
    })
}

struct IpamResult {
    sequential: f64,
    concurrent: f64,
    concurrency: usize,
    memory_concurrent: f64,
}

fn bench_ipam(total: usize) -> Result<IpamResult> {
    use trellis_ipam::{AddrRequest, Ipam, Pool, SubnetRequest};
    use trellis_store::{LocalStore, Store};
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let run = |store: Arc<dyn Store>, tasks: usize| -> Result<f64> {
        rt.block_on(async move {
            let ipam = Arc::new(Ipam::new(store.clone(), "/bench/ipam/", "h1"));
            let plan = ipam.plan_network("n", &SubnetRequest::Specific("10.0.0.0/14".parse()?), None, &[]).await?;
            store.txn(plan.compares, plan.ops).await?;
            let pool = Pool { net_id: "n".into(), subnet: plan.subnet, gateway: plan.gateway };
            let per = total / tasks;
            let t0 = Instant::now();
            let mut handles = Vec::new();
            for t in 0..tasks {
                let (ipam, pool) = (ipam.clone(), pool.clone());
                handles.push(tokio::spawn(async move {
                    for i in 0..per {
                        ipam.allocate(&pool, AddrRequest::Any, &format!("t{t}e{i}"), |_| (vec![], vec![])).await?;
                    }
                    anyhow::Ok(())
                }));
            }
            for h in handles {
                h.await??;
            }
            let rate = (per * tasks) as f64 / t0.elapsed().as_secs_f64();
            let (addrs, _) = store.list("/bench/ipam/addrs/n/").await?;
            if addrs.len() != per * tasks + 1 {
                bail!("expected {} addresses in the store, found {}", per * tasks + 1, addrs.len());
            }
            Ok(rate)
        })
    };
    let dir = tempfile::tempdir()?;
    let redb = |name: &str| -> Result<Arc<dyn Store>> { Ok(Arc::new(LocalStore::open_redb(&dir.path().join(name))?)) };
    let concurrency = 64;
    let sequential = run(redb("seq.redb")?, 1)?;
    eprintln!("  embedded store, 1 allocator: {sequential:.0}/s");
    let concurrent = run(redb("conc.redb")?, concurrency)?;
    eprintln!("  embedded store, {concurrency} allocators: {concurrent:.0}/s");
    let memory_concurrent = run(Arc::new(LocalStore::memory()), concurrency)?;
    eprintln!("  memory store, {concurrency} allocators: {memory_concurrent:.0}/s");
    Ok(IpamResult { sequential, concurrent, concurrency, memory_concurrent })
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{cpus} CPUs, kernel {}, commit {commit}", kernel.trim())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**not met**" }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    trellis_integration::require_root();
    eprintln!("trellis-bench: IPAM ({} allocations)", args.allocations);
    let ipam = bench_ipam(args.allocations)?;
    eprintln!("trellis-bench: attach/detach ({} endpoints each)", args.endpoints);
    let at = bench_attach(args.endpoints)?;

    let mut md = String::new();
    let date = Command::new("date").arg("-u").arg("+%Y-%m-%d %H:%M UTC").output()?;
    writeln!(md, "# Trellis benchmarks\n")?;
    writeln!(
        md,
        "Written by `trellis-bench` (`sudo bash scripts/bench.sh`) on {} ({}). Release build. \
         Every peer is measured in the same run on the same machine; ratios are Trellis ÷ peer \
         (lower is better for latency, higher for rates). Do not edit by hand.\n",
        String::from_utf8_lossy(&date.stdout).trim(),
        machine()
    )?;
    writeln!(md, "## Endpoint attach and detach latency\n")?;
    writeln!(
        md,
        "{} endpoints each, one at a time, the contenders interleaved. Each operation is a process exec, as a \
         runtime does it: `trellisctl attach NET --netns PATH` / `trellisctl detach` (CLI → gRPC → store \
         transaction → reconcile pass → veth in place) against the reference CNI `bridge` plugin with \
         `host-local` IPAM (`CNI_COMMAND=ADD`/`DEL`). The agent's own share (the gRPC call alone, no \
         process exec) is shown too.\n",
        at.trellis_attach.n
    )?;
    writeln!(
        md,
        "| operation | Trellis p50 | Trellis p99 | CNI bridge+host-local p50 | p99 | ratio (p50) | target | |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    let ra = at.trellis_attach.p50.as_secs_f64() / at.cni_add.p50.as_secs_f64();
    let rd = at.trellis_detach.p50.as_secs_f64() / at.cni_del.p50.as_secs_f64();
    writeln!(
        md,
        "| attach vs ADD | {} | {} | {} | {} | {ra:.2}× | ≤ 0.5× | {} |",
        ms(at.trellis_attach.p50),
        ms(at.trellis_attach.p99),
        ms(at.cni_add.p50),
        ms(at.cni_add.p99),
        verdict(ra <= 0.5)
    )?;
    writeln!(
        md,
        "| detach vs DEL | {} | {} | {} | {} | {rd:.2}× | ≤ 0.25× | {} |",
        ms(at.trellis_detach.p50),
        ms(at.trellis_detach.p99),
        ms(at.cni_del.p50),
        ms(at.cni_del.p99),
        verdict(rd <= 0.25)
    )?;
    writeln!(
        md,
        "\nThe two detaches do not finish the same work: CNI `DEL` returns once the veth is deleted, Trellis \
         `detach` once the endpoint is marked for deletion in the store (it is then gone for every client); \
         the next reconcile pass deletes the devices (the kernel's veth teardown takes most of the CNI \
         time), and only then is the address released, so it is never reused early. After the last of \
         the {n} detaches every Trellis device was gone within {}.",
        ms(at.drain),
        n = at.trellis_detach.n
    )?;
    writeln!(
        md,
        "\nThe agent alone (gRPC `Attach`/`Detach` from a resident client): attach p50 {} p99 {} (mean {}), \
         detach p50 {} p99 {} (mean {}).\n",
        ms(at.api_attach.p50),
        ms(at.api_attach.p99),
        ms(at.api_attach.mean),
        ms(at.api_detach.p50),
        ms(at.api_detach.p99),
        ms(at.api_detach.mean)
    )?;
    writeln!(md, "## IPAM allocations per second\n")?;
    writeln!(
        md,
        "{} allocations from one /14, each a store transaction that claims the address key (and, when \
         needed, a new /26 block) with compare-and-swap. The embedded store is redb with group commit \
         (concurrent transactions share one fsync). No peer publishes an IPAM allocation rate.\n",
        args.allocations
    )?;
    writeln!(md, "| store | allocators | allocations/s | target | |")?;
    writeln!(md, "|---|---|---|---|---|")?;
    writeln!(md, "| embedded (redb) | 1 | {:.0} | | |", ipam.sequential)?;
    writeln!(
        md,
        "| embedded (redb) | {} | {:.0} | ≥ 20,000/s | {} |",
        ipam.concurrency,
        ipam.concurrent,
        verdict(ipam.concurrent >= 20_000.0)
    )?;
    writeln!(md, "| memory | {} | {:.0} | | |", ipam.concurrency, ipam.memory_concurrent)?;
    std::fs::write(&args.out, md).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("trellis-bench: wrote {}", args.out.display());
    Ok(())
}
