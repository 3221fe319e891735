//! Published ports and the routing mesh, from a client outside the
//! cluster (the underlay's namespace of a two-host lab): new TCP
//! connections per second and request/response latency to a service
//! published on the mesh — on the backend's host, and through the other
//! host (no backend there: the mesh carries it across) — against Docker's
//! own `-p` on a Docker bridge network (iptables DNAT and docker-proxy, as
//! Docker ships them) on the same host, and straight to the backend's
//! address; then the mesh with 1, 1,000 and 10,000 services published.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use trellis_integration::sockets::in_ns;
use trellis_integration::{Lab, ip_of, netns_of, underlay_ip};

use super::services::{Conn, LOADED_CLIENTS, best, create_services, loaded, measure, serve, us};
use super::{BpfStats, cpu_us, median, trellis_prog_ns};

/// What one loaded run cost, per connection: the eBPF programs' run time
/// (kernel BPF statistics, every Trellis program on the machine) and the
/// agents' CPU (both hosts).
#[derive(Clone, Copy, Default)]
pub struct Cost {
    pub bpf_ns: f64,
    pub agents_cpu: f64,
    /// The whole machine's busy CPU time per connection (/proc/stat: user,
    /// system, softirq, …; both hosts, the client and the backend alike).
    pub machine_us: f64,
}

/// The machine's busy CPU time so far, in µs (every CPU, all but idle and
/// iowait, from /proc/stat).
fn busy_us() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat")?;
    let v: Vec<f64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0.0)).collect();
    let busy: f64 = v.iter().enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, x)| x).sum();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    Ok(busy * 1e6 / hz)
}

/// One loaded run from `netns` to `to`, its cost counted.
fn costed(lab: &Lab, netns: &std::path::Path, to: SocketAddr, secs: f64) -> Result<Cost> {
    let pids: Vec<u32> = lab.hosts.iter().filter_map(|h| h.agent_pid()).collect();
    let cpu = |pids: &[u32]| -> Result<f64> { pids.iter().map(|p| cpu_us(*p).map(|c| c.0)).sum() };
    let (prog0, cpu0, busy0, t0) = (trellis_prog_ns()?, cpu(&pids)?, busy_us()?, std::time::Instant::now());
    let cps = loaded(netns, to, secs, LOADED_CLIENTS)?;
    let elapsed = t0.elapsed().as_secs_f64();
    let conns = cps * elapsed;
    Ok(Cost {
        bpf_ns: (trellis_prog_ns()? - prog0) as f64 / conns,
        agents_cpu: (cpu(&pids)? - cpu0) / 1e6 / elapsed,
        machine_us: (busy_us()? - busy0) / conns,
    })
}

/// The contenders, in the order of the table.
const NAMES: [&str; 4] =
    ["straight to the container", "mesh, backend's host", "mesh, through the other host", "Docker -p"];

pub struct Result_ {
    /// Per contender: every round's measurement.
    pub rounds: Vec<Vec<Conn>>,
    /// (services published, rounds through the other host).
    pub sizes: Vec<(usize, Vec<Conn>)>,
    /// Per contender, then per size: one costed loaded run.
    pub costs: Vec<Cost>,
    pub size_costs: Vec<Cost>,
}

/// A lab of two hosts, network `meshb` with one backend (on host 0) of
/// service `web` (80 → 8080, 81 → 8081), published on 30080 and 30081.
fn mesh_lab() -> Result<(Lab, serde_json::Value)> {
    let lab = Lab::with_args(2, 3000, &["--resync-interval-ms", "2000"])?;
    let h = &lab.hosts;
    h[0].ctl(&["network", "create", "meshb", "--subnet", "10.92.0.0/16"])?;
    let be = h[0].attach("meshb", "backend", &["--label", "trellis.service=web"])?;
    serve(&netns_of(&be), 8080)?;
    h[0].ctl(&[
        "service",
        "create",
        "web",
        "--network",
        "meshb",
        "--port",
        "80:8080",
        "--port",
        "81:8081",
        "--publish",
        "30080:80",
        "--publish",
        "30081:81",
    ])?;
    Ok((lab, be))
}

fn addr(host: usize, port: u16) -> SocketAddr {
    format!("{}:{port}", underlay_ip(host + 1)).parse().expect("an address")
}

/// Wait until `to` answers from the outside namespace of `lab`.
fn answers(lab: &Lab, to: SocketAddr) -> Result<()> {
    let outside = lab.underlay.path();
    let ok = trellis_integration::wait_for(Duration::from_secs(60), || {
        in_ns(&outside, move || std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_ok())
            .unwrap_or(false)
    });
    if !ok {
        bail!("{to} never answered from outside");
    }
    Ok(())
}

/// Services `p0..p{n}` of one port each, published on 20000 + i, selecting
/// the backend.
fn load_published(lab: &Lab, n: usize) -> Result<()> {
    use trellis_agent::model::{MeshPort, Proto, PublishMode, ServiceMode, ServicePort};
    create_services(lab, 0..n, |i| trellis_agent::state::NewService {
        name: format!("p{i}"),
        network: "meshb".into(),
        mode: ServiceMode::Vip,
        ports: vec![ServicePort { port: 80, proto: Proto::Tcp, target: 8080 }],
        selector: [("trellis.service".to_string(), "web".to_string())].into(),
        publish: vec![MeshPort {
            proto: Proto::Tcp,
            host_port: 20000 + i as u16,
            port: 80,
            mode: PublishMode::Ingress,
        }],
    })
}

pub fn bench(secs: f64, rounds: usize) -> Result<Result_> {
    use trellis_integration::dockerd::{Dockerd, IMAGE};
    let _stats = BpfStats::on()?;
    let (lab, be) = mesh_lab()?;
    let h = &lab.hosts;
    let outside = lab.underlay.path();
    // Straight to the container: the outside client routes the subnet
    // through the backend's host (the host forwards; replies of
    // connections from outside are not masqueraded).
    lab.underlay.ip(&["route", "add", "10.92.0.0/16", "via", &underlay_ip(1)])?;
    let direct: SocketAddr = format!("{}:8080", ip_of(&be)).parse()?;
    let direct_rr: SocketAddr = format!("{}:8081", ip_of(&be)).parse()?;
    // Docker's -p, as Docker ships it, on the same host: a container on a
    // bridge network, the same server in its namespace.
    let d = Dockerd::start_as_shipped(&h[0])?;
    d.ok(&["network", "create", "-d", "bridge", "--subnet", "10.93.0.0/24", "bnet"])?;
    d.ok(&[
        "run",
        "-d",
        "--name",
        "pub",
        "--network",
        "bnet",
        "-p",
        "30090:8080",
        "-p",
        "30091:8081",
        IMAGE,
        "sleep",
        "86400",
    ])?;
    let pid = d.ok(&["inspect", "-f", "{{.State.Pid}}", "pub"])?.trim().to_string();
    serve(std::path::Path::new(&format!("/proc/{pid}/ns/net")), 8080)?;
    let targets = [
        (direct, direct_rr),
        (addr(0, 30080), addr(0, 30081)),
        (addr(1, 30080), addr(1, 30081)),
        (addr(0, 30090), addr(0, 30091)),
    ];
    for (to, rr) in targets {
        answers(&lab, to)?;
        answers(&lab, rr)?;
    }
    let mut out: Vec<Vec<Conn>> = (0..4).map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for k in 0..4 {
            let which = (round + k) % 4;
            let (to, rr) = targets[which];
            out[which].push(measure(&outside, to, rr, secs, 2000).with_context(|| NAMES[which])?);
        }
        eprintln!("  mesh: round {}/{rounds}", round + 1);
    }
    let mut costs = Vec::new();
    for (to, _) in targets {
        costs.push(costed(&lab, &outside, to, secs)?);
    }
    drop(d);
    drop(lab);

    // The mesh's cost per connection with many services published: each
    // size in a lab of its own, through the host without the backend, at
    // the middle service's port.
    let mut sizes = Vec::new();
    let mut size_costs = Vec::new();
    for &n in &[1usize, 1000, 10_000] {
        let (lab, _be) = mesh_lab()?;
        eprintln!("  mesh: {n} published services: loading");
        if n > 1 {
            load_published(&lab, n - 1)?;
        }
        let port = if n > 1 { 20000 + (n as u16 - 1) / 2 } else { 30080 };
        let ok = trellis_integration::wait_for(Duration::from_secs(180), || {
            lab.hosts[1].ctl_json(&["status"]).ok().and_then(|s| s["datapath"]["published"].as_u64())
                == Some(n as u64 + 1)
        });
        if !ok {
            bail!("host 1's datapath never had {n} published services");
        }
        answers(&lab, addr(1, port))?;
        let mut v = Vec::new();
        for _ in 0..rounds {
            v.push(measure(&lab.underlay.path(), addr(1, port), addr(1, 30081), secs, 2000)?);
        }
        sizes.push((n, v));
        size_costs.push(costed(&lab, &lab.underlay.path(), addr(1, port), secs)?);
    }
    Ok(Result_ { rounds: out, sizes, costs, size_costs })
}

/// min–max of the per-round ratios `f(a) / f(b)`, and their median.
fn spread(a: &[Conn], b: &[Conn], f: &dyn Fn(&Conn) -> f64) -> (f64, f64, f64) {
    let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| f(x) / f(y)).collect();
    let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = r.iter().copied().fold(0.0, f64::max);
    (median(r), lo, hi)
}

pub fn md(md: &mut String, r: &Result_, secs: f64) -> Result<()> {
    let n = r.rounds[0].len();
    writeln!(md, "## Published ports and the routing mesh, from outside the cluster\n")?;
    writeln!(
        md,
        "A two-host lab on etcd; the client is the underlay's own namespace (no Trellis host). One backend on host 0, \
         the same server everywhere (greets each connection, answers each byte). *Straight*: the backend's address \
         (the client routes the subnet through host 0). *Mesh, backend's host*: the service published with \
         `--publish 30080:80` reached on host 0; *through the other host*: on host 1, which has no backend, so \
         each connection is DNATed there and carried over VXLAN to host 0, the replies coming back the same way \
         (the client's address kept). *Docker -p*: a container on a Docker bridge network of a dockerd on host 0 \
         with its defaults for published ports (iptables DNAT, docker-proxy on), `-p 30090:8080`. Connections: \
         connect, read a 3-byte greeting, close with a reset, one after another for {secs} s (*one client*), then \
         from {LOADED_CLIENTS} threads at once for {secs} s (*loaded*); RR: 2,000 one-byte round trips on one \
         connection. {n} rounds, the contenders interleaved (each round starts with another one); ratios are \
         computed per round and shown as median [min–max]; a target is met only when the minimum clears it.\n"
    )?;
    writeln!(
        md,
        "| contender | one client, conn/s | loaded, conn/s | connect p50 | RR p50 | RR p99 | eBPF per conn | machine CPU per conn | agents' CPU |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|")?;
    for (i, name) in NAMES.iter().enumerate() {
        let b = best(r.rounds[i].clone());
        let c = r.costs[i];
        writeln!(
            md,
            "| {name} | {:.0} | {:.0} | {} | {} | {} | {:.0} ns | {:.1} µs | {:.1} % |",
            b.cps,
            b.loaded_cps,
            us(b.connect.p50),
            us(b.rr.p50),
            us(b.rr.p99),
            c.bpf_ns,
            c.machine_us,
            c.agents_cpu * 100.0
        )?;
    }
    writeln!(
        md,
        "\n*eBPF per conn*: the run time of every Trellis program on the machine (both hosts) during one more loaded run \
         of each contender, divided by its connections (a connection is about 7 packets each way); *machine CPU per conn*: the \
         whole machine's busy time over that run per connection (client, both hosts' kernels, backend: on this one \
         machine the loaded rate is this cost's inverse times its CPUs); *agents' CPU*: both agents' CPU over that run \
         (share of one CPU)."
    )?;
    writeln!(md)?;
    writeln!(md, "| ratio | one client, conn/s | loaded, conn/s | RR p50 (lower is better) | target | |")?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    let rows: [(&str, usize, usize, f64); 3] = [
        ("mesh (backend's host) ÷ Docker -p", 1, 3, 1.5),
        ("mesh (backend's host) ÷ straight", 1, 0, 0.95),
        ("mesh through the other host ÷ backend's host", 2, 1, 0.9),
    ];
    for (what, a, b, target) in rows {
        let one = spread(&r.rounds[a], &r.rounds[b], &|c| c.cps);
        let loaded = spread(&r.rounds[a], &r.rounds[b], &|c| c.loaded_cps);
        let rr = spread(&r.rounds[a], &r.rounds[b], &|c| c.rr.p50.as_secs_f64());
        let met = loaded.1 >= target;
        writeln!(
            md,
            "| {what} | {:.2}× [{:.2}–{:.2}] | {:.2}× [{:.2}–{:.2}] | {:.2}× [{:.2}–{:.2}] | loaded ≥ {target}× | {} |",
            one.0,
            one.1,
            one.2,
            loaded.0,
            loaded.1,
            loaded.2,
            rr.0,
            rr.1,
            rr.2,
            super::verdict(met)
        )?;
    }
    writeln!(
        md,
        "\nPublished services (through the host without the backend, at the middle service's port; the \
         per-connection cost must not grow with the table):\n"
    )?;
    writeln!(
        md,
        "| published services | one client, conn/s | loaded, conn/s | connect p50 | ÷ 1 service (loaded) | eBPF per conn | machine CPU per conn | agents' CPU |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    let base = &r.sizes[0].1;
    for (i, (size, v)) in r.sizes.iter().enumerate() {
        let b = best(v.clone());
        let ratio = spread(v, base, &|c| c.loaded_cps);
        let c = r.size_costs[i];
        writeln!(
            md,
            "| {size} | {:.0} | {:.0} | {} | {:.2}× [{:.2}–{:.2}] | {:.0} ns | {:.1} µs | {:.1} % |",
            b.cps,
            b.loaded_cps,
            us(b.connect.p50),
            ratio.0,
            ratio.1,
            ratio.2,
            c.bpf_ns,
            c.machine_us,
            c.agents_cpu * 100.0
        )?;
    }
    let last = spread(&r.sizes.last().expect("sizes").1, base, &|c| c.loaded_cps);
    writeln!(md, "\n10,000 ÷ 1 (loaded): min {:.2}× (target ≥ 0.95×) {}.\n", last.1, super::verdict(last.1 >= 0.95))?;
    Ok(())
}
