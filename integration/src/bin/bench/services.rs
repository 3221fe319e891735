//! Service VIPs: new TCP connections per second and request/response
//! latency through a Trellis VIP, straight to the backend, and through
//! nftables DNAT rules of the kube-proxy (iptables mode) kind, with 1,
//! 1,000 and 10,000 services loaded; and endpoint throughput with the eBPF
//! programs attached vs without.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use trellis_integration::sockets::in_ns;
use trellis_integration::{Host, Lab, ip_of, netns_of};

use super::{Stats, cpu_us, iperf, median, stats, verdict};

/// One contender at one size.
#[derive(Clone, Copy)]
pub struct Conn {
    /// One client, one connection after another.
    pub cps: f64,
    /// `LOADED_CLIENTS` clients at once: the rate the host sustains.
    pub loaded_cps: f64,
    pub connect: Stats,
    pub rr: Stats,
}

/// Client threads of the loaded measurement: enough to keep both CPUs of
/// this machine busy (each connection waits on the backend's accept).
pub(super) const LOADED_CLIENTS: usize = 8;

/// One connection: connect, read the greeting, close with a reset.
fn one_connection(to: &SocketAddr) -> Result<()> {
    let mut c =
        TcpStream::connect_timeout(to, Duration::from_secs(2)).with_context(|| format!("connecting to {to}"))?;
    read_ok(&mut c)?;
    // Closed with a reset: at thousands of connections a second, TIME_WAIT
    // sockets would pile up and slow down the client's choice of a source
    // port (milliseconds per connect), whatever the path.
    socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO))?;
    Ok(())
}

/// Connections per second from `clients` threads inside `netns`, each
/// opening one connection after another for `secs`.
pub(super) fn loaded(netns: &Path, to: SocketAddr, secs: f64, clients: usize) -> Result<f64> {
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let netns = netns.to_path_buf();
            std::thread::spawn(move || -> Result<u64> {
                in_ns(&netns, move || -> Result<u64> {
                    let mut n = 0;
                    while Instant::now() < end {
                        one_connection(&to)?;
                        n += 1;
                    }
                    Ok(n)
                })?
            })
        })
        .collect();
    let mut total = 0;
    for t in threads {
        total += t.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
    }
    Ok(total as f64 / t0.elapsed().as_secs_f64())
}

pub struct Row {
    pub services: usize,
    /// The agent's CPU share over the row's measurements.
    pub agent_cpu: f64,
    pub direct: Conn,
    pub vip: Conn,
    pub nft: Conn,
    pub ipt: Conn,
}

pub struct Result_ {
    pub rows: Vec<Row>,
    pub tput_on: f64,
    pub tput_off: f64,
}

/// A backend on `port` (connection rate) and `port + 1` (round trips),
/// over IPv4 and IPv6: greets each connection with a line, then answers a
/// line per byte received until the connection ends. Four threads accept
/// on each.
pub(super) fn serve(netns: &Path, port: u16) -> Result<()> {
    for p in [port, port + 1] {
        let l = Arc::new(in_ns(netns, move || TcpListener::bind(("::", p)))??);
        for _ in 0..4 {
            let l = l.clone();
            std::thread::spawn(move || {
                loop {
                    let Ok((mut c, _)) = l.accept() else { continue };
                    let _ = c.set_nodelay(true);
                    if c.write_all(b"ok\n").is_err() {
                        continue;
                    }
                    let mut b = [0u8; 64];
                    while let Ok(n) = c.read(&mut b) {
                        if n == 0 || c.write_all(b"ok\n").is_err() {
                            break;
                        }
                    }
                }
            });
        }
    }
    Ok(())
}

fn read_ok(c: &mut TcpStream) -> std::io::Result<()> {
    let mut b = [0u8; 3];
    c.read_exact(&mut b)
}

/// From inside `netns`: connections to `to` (connect, greeting, close) for
/// `secs` from one client, then `rr` request/responses on one connection to
/// `rr_to`, then connections for `secs` from `LOADED_CLIENTS` clients.
pub(super) fn measure(netns: &Path, to: SocketAddr, rr_to: SocketAddr, secs: f64, rr: usize) -> Result<Conn> {
    let conn = in_ns(netns, move || -> Result<Conn> {
        let mut lat = Vec::new();
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let t0 = Instant::now();
        while Instant::now() < end {
            let t = Instant::now();
            one_connection(&to)?;
            lat.push(t.elapsed());
        }
        let cps = lat.len() as f64 / t0.elapsed().as_secs_f64();
        let mut c = TcpStream::connect_timeout(&rr_to, Duration::from_secs(2))?;
        c.set_nodelay(true)?;
        read_ok(&mut c)?;
        let mut rtt = Vec::with_capacity(rr);
        for _ in 0..rr {
            let t = Instant::now();
            c.write_all(b"x")?;
            read_ok(&mut c)?;
            rtt.push(t.elapsed());
        }
        Ok(Conn { cps, loaded_cps: 0.0, connect: stats(lat), rr: stats(rtt) })
    })??;
    let mut conn = conn;
    conn.loaded_cps = loaded(netns, to, secs, LOADED_CLIENTS)?;
    Ok(conn)
}

/// nftables DNAT of the kube-proxy (iptables mode) kind: one rule per
/// service in a linear chain at prerouting, masquerading the hairpin.
fn nft_rules(host: &Host, n: usize, backend: &str, client_net: &str) -> Result<()> {
    let mut f = String::from("table ip trellisbench {}\ndelete table ip trellisbench\ntable ip trellisbench {\n");
    f.push_str("  chain services {\n    type nat hook prerouting priority dstnat; policy accept;\n");
    for i in 0..n {
        writeln!(f, "    ip daddr {} tcp dport 80 dnat to {backend}:8080", nft_vip(i))?;
        writeln!(f, "    ip daddr {} tcp dport 81 dnat to {backend}:8081", nft_vip(i))?;
    }
    f.push_str("  }\n  chain hairpin {\n    type nat hook postrouting priority srcnat; policy accept;\n");
    writeln!(f, "    ct status dnat ip saddr {client_net} masquerade")?;
    f.push_str("  }\n}\n");
    let path = host.dir.path().join("bench.nft");
    std::fs::write(&path, f)?;
    let out = host.ns.cmd("nft").arg("-f").arg(&path).output()?;
    if !out.status.success() {
        bail!("nft -f: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The same as kube-proxy writes it for iptables (legacy x_tables, as on
/// hosts where kube-proxy's iptables mode runs on iptables-legacy): a
/// `KUBE-SERVICES` chain with one rule per service port (`-d VIP/32 -p tcp
/// -m comment -m tcp --dport`), jumping to the endpoint's chain
/// (masquerade mark for the hairpin, DNAT), the mark masqueraded at
/// postrouting.
fn ipt_rules(host: &Host, n: usize, backend: &str) -> Result<()> {
    let mut f = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n",
    );
    f.push_str(":KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-SEP-80 - [0:0]\n:KUBE-SEP-81 - [0:0]\n");
    f.push_str("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n");
    f.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    f.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
    f.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    f.push_str("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n");
    f.push_str("-A KUBE-POSTROUTING -j MASQUERADE\n");
    for (port, target) in [(80, 8080), (81, 8081)] {
        writeln!(f, "-A KUBE-SEP-{port} -j KUBE-MARK-MASQ")?;
        writeln!(f, "-A KUBE-SEP-{port} -p tcp -m tcp -j DNAT --to-destination {backend}:{target}")?;
    }
    for i in 0..n {
        for port in [80, 81] {
            writeln!(
                f,
                "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"bench/s{i}:p{port} cluster IP\" -m tcp --dport {port} -j KUBE-SEP-{port}",
                nft_vip(i)
            )?;
        }
    }
    f.push_str("COMMIT\n");
    let path = host.dir.path().join("bench.iptables");
    std::fs::write(&path, f)?;
    let out = host.ns.cmd("iptables-legacy-restore").arg(&path).output()?;
    if !out.status.success() {
        bail!("iptables-legacy-restore: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn ipt_flush(host: &Host) {
    for args in [["-t", "nat", "-F"], ["-t", "nat", "-X"]] {
        let _ = host.ns.cmd("iptables-legacy").args(args).status();
    }
}

fn nft_vip(i: usize) -> String {
    format!("100.64.{}.{}", i / 250, 1 + i % 250)
}

/// Create the services `make(i)` for each `i` of `range` with the agent's
/// own cluster code, into the lab's etcd, 32 at a time.
pub(super) fn create_services(
    lab: &Lab,
    range: std::ops::Range<usize>,
    make: impl Fn(usize) -> trellis_agent::state::NewService + Send + Sync + 'static,
) -> Result<()> {
    let url = lab.etcd.url();
    let make = Arc::new(make);
    in_ns(&lab.underlay.path(), move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let cfg = trellis_store::EtcdConfig::parse(&url)?;
            let store: Arc<dyn trellis_store::Store> = Arc::new(trellis_store::EtcdStore::connect(&cfg).await?);
            let cluster =
                Arc::new(trellis_agent::state::Cluster::new(store, "bench-loader", "10.0.0.0/8".parse()?, 24));
            let mut tasks = Vec::new();
            for t in 0..32 {
                let (cluster, make, range) = (cluster.clone(), make.clone(), range.clone());
                tasks.push(tokio::spawn(async move {
                    for i in (range.start + t..range.end).step_by(32) {
                        let new = make(i);
                        let name = new.name.clone();
                        cluster.create_service(new).await.map_err(|e| anyhow::anyhow!("service {name}: {e}"))?;
                    }
                    anyhow::Ok(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            Ok(())
        })
    })?
}

/// Write services `from..to` (vip mode, port 80 → 8080 and 81 → 8081,
/// selector tier=web).
fn load_services(lab: &Lab, from: usize, to: usize) -> Result<()> {
    use trellis_agent::model::{Proto, ServiceMode, ServicePort};
    create_services(lab, from..to, |i| trellis_agent::state::NewService {
        name: format!("s{i}"),
        network: "vipb".into(),
        mode: ServiceMode::Vip,
        ports: vec![
            ServicePort { port: 80, proto: Proto::Tcp, target: 8080 },
            ServicePort { port: 81, proto: Proto::Tcp, target: 8081 },
        ],
        selector: [("tier".to_string(), "web".to_string())].into(),
        publish: vec![],
    })
}

/// A fresh 1-host lab (the agent's default resync interval; tests use
/// 500 ms) with a backend serving and a client: (lab, backend, client).
fn lab() -> Result<(Lab, serde_json::Value, serde_json::Value)> {
    let lab = Lab::with_args(1, 3000, &["--resync-interval-ms", "2000"])?;
    let host = &lab.hosts[0];
    host.ctl(&["network", "create", "vipb", "--subnet", "10.90.0.0/16", "--attachable"])?;
    let be = host.attach("vipb", "backend", &["--label", "tier=web"])?;
    let cl = host.attach("vipb", "client", &[])?;
    serve(&netns_of(&be), 8080)?;
    Ok((lab, be, cl))
}

pub fn bench(secs: f64) -> Result<Result_> {
    let mut rows = Vec::new();
    // Each size in a lab of its own: connection-tracking tables and the
    // store start empty for each.
    for &n in &[1usize, 1000, 10_000] {
        let (lab, be, cl) = lab()?;
        let host = &lab.hosts[0];
        let backend_ip = ip_of(&be);
        let direct: SocketAddr = format!("{backend_ip}:8080").parse()?;
        eprintln!("  {n} services: loading");
        load_services(&lab, 0, n)?;
        let ok = trellis_integration::wait_for(Duration::from_secs(120), || {
            host.ctl_json(&["status"]).ok().and_then(|s| s["datapath"]["services"].as_u64()) == Some(2 * n as u64)
        });
        if !ok {
            bail!("the datapath never had {n} services");
        }
        // The measured VIP: the middle service's (the nft rule in the middle
        // of its chain, the average a linear match pays).
        let svc = host.ctl_json(&["service", "inspect", &format!("s{}", n / 2)])?;
        let vip_ip = svc["vip"].as_str().context("VIP")?.to_string();
        let vip: SocketAddr = format!("{vip_ip}:80").parse()?;
        let vip_rr: SocketAddr = format!("{vip_ip}:81").parse()?;
        let nft: SocketAddr = format!("{}:80", nft_vip(n / 2)).parse()?;
        let nft_rr: SocketAddr = format!("{}:81", nft_vip(n / 2)).parse()?;
        let direct_rr: SocketAddr = format!("{backend_ip}:8081").parse()?;
        let (mut d, mut v, mut f, mut t) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let pid = host.agent_pid().context("agent pid")?;
        let (cpu0, t0) = (cpu_us(pid)?.0, Instant::now());
        // Rounds, contenders interleaved (a different one first each round).
        for round in 0..5 {
            for k in 0..4 {
                let which = (round + k) % 4;
                let (to, rr_to, out) = match which {
                    0 => (direct, direct_rr, &mut d),
                    1 => (vip, vip_rr, &mut v),
                    2 => (nft, nft_rr, &mut f),
                    _ => (nft, nft_rr, &mut t),
                };
                // The rules are in the host only while they are measured:
                // with the kernel's bridge netfilter on (as here, and as
                // kube-proxy requires), every new connection on the host
                // walks them, bridged ones too — direct and VIP included.
                match which {
                    2 => nft_rules(host, n, &backend_ip, "10.90.0.0/16")?,
                    3 => ipt_rules(host, n, &backend_ip)?,
                    _ => {}
                }
                out.push(measure(&netns_of(&cl), to, rr_to, secs, 2000)?);
                match which {
                    2 => {
                        let _ = host.ns.cmd("nft").args(["delete", "table", "ip", "trellisbench"]).status();
                    }
                    3 => ipt_flush(host),
                    _ => {}
                }
            }
        }
        eprintln!("  {n} services: measured");
        let agent_cpu = (cpu_us(pid)?.0 - cpu0) / 1e6 / t0.elapsed().as_secs_f64();
        rows.push(Row { services: n, agent_cpu, direct: best(d), vip: best(v), nft: best(f), ipt: best(t) });
    }

    // Throughput of an endpoint with the programs vs a host without them.
    let (lab, _, _) = lab()?;
    let host = &lab.hosts[0];
    let mut plain = Host::bare()?;
    plain.extra_args = vec!["--ebpf=false".into()];
    plain.start()?;
    let mut on = Vec::new();
    let mut off = Vec::new();
    let pair = |h: &Host| -> Result<(serde_json::Value, serde_json::Value)> {
        h.ctl(&["network", "create", "tput", "--subnet", "10.91.0.0/24", "--attachable"])?;
        Ok((h.attach("tput", "a", &[])?, h.attach("tput", "b", &[])?))
    };
    let (a1, b1) = pair(host)?;
    let (a2, b2) = pair(&plain)?;
    for round in 0..3 {
        for k in 0..2 {
            if (round + k) % 2 == 0 {
                on.push(iperf(&netns_of(&a1), &netns_of(&b1), &ip_of(&b1), 3)?);
            } else {
                off.push(iperf(&netns_of(&a2), &netns_of(&b2), &ip_of(&b2), 3)?);
            }
        }
    }
    Ok(Result_ { rows, tput_on: median(on), tput_off: median(off) })
}

/// The median round by one client's connection rate, with the median of
/// the rounds' loaded rates.
pub(super) fn best(mut v: Vec<Conn>) -> Conn {
    let loaded = median(v.iter().map(|c| c.loaded_cps).collect());
    v.sort_by(|a, b| a.cps.total_cmp(&b.cps));
    let mut c = v.swap_remove(v.len() / 2);
    c.loaded_cps = loaded;
    c
}

pub(super) fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

pub fn md(md: &mut String, r: &Result_, secs: f64) -> Result<()> {
    writeln!(md, "## Service VIPs (eBPF) vs direct vs kube-proxy-style DNAT rules\n")?;
    writeln!(
        md,
        "One host (a 1-host lab on etcd, a fresh one for each size), one backend and one client endpoint on a Trellis network. \
         Services are written with the agent's own cluster code, all selecting the one backend \
         (ports 80 → 8080 and 81 → 8081, so a table of N services has 2N VIP:port entries). *direct*: the backend's address; \
         *VIP*: the middle service's VIP, DNAT in the eBPF program at the client's veth (Maglev, conntrack). \
         The rule-based peers put the same backend behind one DNAT rule per service port in a linear chain at \
         prerouting, the kube-proxy iptables-mode kind, measured at the middle rule: *nft*: nftables rules \
         (`ip daddr … tcp dport … dnat`, the hairpin masqueraded); *iptables*: iptables-legacy rules as kube-proxy \
         writes them (`KUBE-SERVICES`: `-d VIP/32 -p tcp -m comment -m tcp --dport` jumping to the endpoint's chain, \
         mark for masquerade, DNAT). Each set of rules is loaded only while it is measured (this kernel has bridge \
         netfilter on, as kube-proxy requires, so every new connection on the host walks them — bridged direct \
         and VIP connections too). Connections: connect, read a 3-byte greeting, close with a reset \
         (no TIME_WAIT piles up to slow the client's port choice), one after another for {secs} s \
         from one client thread (*one client*: each connection's latency, mostly the wake-ups of client and backend), \
         then from {LOADED_CLIENTS} client threads at once for {secs} s (*loaded*: the rate the host sustains with \
         both CPUs busy, where what each path costs per connection counts); RR: 2,000 one-byte request/response \
         round trips on one connection (port 81). Five interleaved rounds, the median round shown (loaded: \
         the median of the rounds). *direct ÷ rules* is the ceiling of any VIP implementation: a VIP costs at \
         least what a direct connection does.\n"
    )?;
    writeln!(
        md,
        "| services | | direct | VIP | nft | iptables | VIP ÷ direct | VIP ÷ nft | VIP ÷ iptables | ceiling: direct ÷ nft / iptables |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|")?;
    for row in &r.rows {
        for (what, f) in [
            ("one client, conn/s", &(|c: &Conn| c.cps) as &dyn Fn(&Conn) -> f64),
            ("loaded, conn/s", &|c: &Conn| c.loaded_cps),
        ] {
            writeln!(
                md,
                "| {} | {what} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}× | {:.2}× | {:.2}× | {:.2}× / {:.2}× |",
                row.services,
                f(&row.direct),
                f(&row.vip),
                f(&row.nft),
                f(&row.ipt),
                f(&row.vip) / f(&row.direct),
                f(&row.vip) / f(&row.nft),
                f(&row.vip) / f(&row.ipt),
                f(&row.direct) / f(&row.nft),
                f(&row.direct) / f(&row.ipt),
            )?;
        }
    }
    writeln!(md)?;
    writeln!(md, "| services | connect p50 direct / VIP / nft / iptables | RR p50 | RR p99 | agent CPU |")?;
    writeln!(md, "|---|---|---|---|---|")?;
    for row in &r.rows {
        let all = [&row.direct, &row.vip, &row.nft, &row.ipt];
        let join = |f: &dyn Fn(&Conn) -> Duration| all.iter().map(|c| us(f(c))).collect::<Vec<_>>().join(" / ");
        writeln!(
            md,
            "| {} | {} | {} | {} | {:.1} % |",
            row.services,
            join(&|c| c.connect.p50),
            join(&|c| c.rr.p50),
            join(&|c| c.rr.p99),
            row.agent_cpu * 100.0,
        )?;
    }
    let min_of = |f: &dyn Fn(&Row) -> f64| r.rows.iter().map(f).fold(f64::INFINITY, f64::min);
    let min_direct = min_of(&|x| x.vip.cps / x.direct.cps);
    let min_direct_loaded = min_of(&|x| x.vip.loaded_cps / x.direct.loaded_cps);
    let at_10k = |f: &dyn Fn(&Row) -> f64| r.rows.iter().find(|x| x.services == 10_000).map(f).unwrap_or(0.0);
    let nft = (at_10k(&|x| x.vip.loaded_cps / x.nft.loaded_cps), at_10k(&|x| x.vip.cps / x.nft.cps));
    let ipt = (at_10k(&|x| x.vip.loaded_cps / x.ipt.loaded_cps), at_10k(&|x| x.vip.cps / x.ipt.cps));
    let ceiling = at_10k(&|x| x.direct.loaded_cps / x.nft.loaded_cps);
    writeln!(md)?;
    writeln!(md, "| target | measured | |\n|---|---|---|")?;
    // The targets are on connections per second: the rate the host
    // sustains (loaded). One client's rate is 1 / its connection latency,
    // shown beside it.
    writeln!(
        md,
        "| VIP ≥ 0.95× direct at every size (connections per second the host sustains) | loaded {min_direct_loaded:.2}× (lowest; one client {min_direct:.2}×) | {} |",
        verdict(min_direct_loaded >= 0.95)
    )?;
    writeln!(
        md,
        "| VIP ≥ 3× rule-based DNAT at 10,000 services: iptables (kube-proxy's rules) | loaded {:.2}× (one client {:.2}×) | {} |",
        ipt.0,
        ipt.1,
        verdict(ipt.0 >= 3.0)
    )?;
    writeln!(
        md,
        "| the same against nftables rules | loaded {:.2}× (one client {:.2}×); ceiling: direct ÷ nft {ceiling:.2}× | {} |",
        nft.0,
        nft.1,
        verdict(nft.0 >= 3.0)
    )?;
    let ratio = r.tput_on / r.tput_off;
    writeln!(
        md,
        "| endpoint throughput with the eBPF programs ≥ 0.97× without | {:.2} vs {:.2} Gbit/s = {ratio:.3}× | {} |\n",
        r.tput_on / 1e9,
        r.tput_off / 1e9,
        verdict(ratio >= 0.97)
    )?;
    writeln!(
        md,
        "Throughput: iperf3, one TCP stream, 3 s, between two endpoints of one host's network, on an agent with the \
         datapath (default) and one started `--ebpf=false`, three interleaved rounds each, medians.\n"
    )?;
    Ok(())
}
