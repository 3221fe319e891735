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
pub struct Conn {
    pub cps: f64,
    pub connect: Stats,
    pub rr: Stats,
}

pub struct Row {
    pub services: usize,
    /// The agent's CPU share over the row's measurements.
    pub agent_cpu: f64,
    pub direct: Conn,
    pub vip: Conn,
    pub nft: Conn,
}

pub struct Result_ {
    pub rows: Vec<Row>,
    pub tput_on: f64,
    pub tput_off: f64,
}

/// A backend on `port` (connection rate) and `port + 1` (round trips):
/// greets each connection with a line, then answers a line per byte
/// received until the connection ends. Four threads accept on each.
fn serve(netns: &Path, port: u16) -> Result<()> {
    for p in [port, port + 1] {
        let l = Arc::new(in_ns(netns, move || TcpListener::bind(("0.0.0.0", p)))??);
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
/// `secs`, then `rr` request/responses on one connection to `rr_to`.
fn measure(netns: &Path, to: SocketAddr, rr_to: SocketAddr, secs: f64, rr: usize) -> Result<Conn> {
    in_ns(netns, move || -> Result<Conn> {
        let mut lat = Vec::new();
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let t0 = Instant::now();
        while Instant::now() < end {
            let t = Instant::now();
            let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(2))
                .with_context(|| format!("connecting to {to}"))?;
            read_ok(&mut c)?;
            // Closed with a reset: at thousands of connections a second,
            // TIME_WAIT sockets would pile up and slow down the client's
            // choice of a source port (milliseconds per connect), whatever
            // the path.
            socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO))?;
            drop(c);
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
        Ok(Conn { cps, connect: stats(lat), rr: stats(rtt) })
    })?
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

fn nft_vip(i: usize) -> String {
    format!("100.64.{}.{}", i / 250, 1 + i % 250)
}

/// Write services `from..to` (vip mode, port 80 → 8080, selector
/// tier=web) with the agent's own cluster code, into the lab's etcd.
fn load_services(lab: &Lab, from: usize, to: usize) -> Result<()> {
    let url = lab.etcd.url();
    in_ns(&lab.underlay.path(), move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let cfg = trellis_store::EtcdConfig::parse(&url)?;
            let store: Arc<dyn trellis_store::Store> = Arc::new(trellis_store::EtcdStore::connect(&cfg).await?);
            let cluster =
                Arc::new(trellis_agent::cluster::Cluster::new(store, "bench-loader", "10.0.0.0/8".parse()?, 24));
            let mut tasks = Vec::new();
            for t in 0..32 {
                let cluster = cluster.clone();
                tasks.push(tokio::spawn(async move {
                    for i in (from + t..to).step_by(32) {
                        cluster
                            .create_service(trellis_agent::cluster::NewService {
                                name: format!("s{i}"),
                                network: "vipb".into(),
                                mode: trellis_agent::model::ServiceMode::Vip,
                                ports: vec![
                                    trellis_agent::model::ServicePort {
                                        port: 80,
                                        proto: trellis_agent::model::Proto::Tcp,
                                        target: 8080,
                                    },
                                    trellis_agent::model::ServicePort {
                                        port: 81,
                                        proto: trellis_agent::model::Proto::Tcp,
                                        target: 8081,
                                    },
                                ],
                                selector: [("tier".to_string(), "web".to_string())].into(),
                            })
                            .await
                            .map_err(|e| anyhow::anyhow!("service s{i}: {e}"))?;
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
        let (mut d, mut v, mut f) = (Vec::new(), Vec::new(), Vec::new());
        let pid = host.agent_pid().context("agent pid")?;
        let (cpu0, t0) = (cpu_us(pid)?.0, Instant::now());
        // Rounds, contenders interleaved (a different one first each round).
        for round in 0..5 {
            for k in 0..3 {
                let which = (round + k) % 3;
                let (to, rr_to, out) = match which {
                    0 => (direct, direct_rr, &mut d),
                    1 => (vip, vip_rr, &mut v),
                    _ => (nft, nft_rr, &mut f),
                };
                // The rules are in the host only while they are measured:
                // with the kernel's bridge netfilter on (as here, and as
                // kube-proxy requires), every new connection on the host
                // walks them, bridged ones too — direct and VIP included.
                if which == 2 {
                    nft_rules(host, n, &backend_ip, "10.90.0.0/16")?;
                }
                out.push(measure(&netns_of(&cl), to, rr_to, secs, 2000)?);
                if which == 2 {
                    let _ = host.ns.cmd("nft").args(["delete", "table", "ip", "trellisbench"]).status();
                }
            }
        }
        eprintln!("  {n} services: measured");
        let agent_cpu = (cpu_us(pid)?.0 - cpu0) / 1e6 / t0.elapsed().as_secs_f64();
        rows.push(Row { services: n, agent_cpu, direct: best(d), vip: best(v), nft: best(f) });
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

/// The median round by connection rate.
fn best(mut v: Vec<Conn>) -> Conn {
    v.sort_by(|a, b| a.cps.total_cmp(&b.cps));
    v.swap_remove(v.len() / 2)
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

pub fn md(md: &mut String, r: &Result_, secs: f64) -> Result<()> {
    writeln!(md, "## Service VIPs (eBPF) vs direct vs nftables DNAT\n")?;
    writeln!(
        md,
        "One host (a 1-host lab on etcd, a fresh one for each size), one backend and one client endpoint on a Trellis network. \
         Services are written with the agent's own cluster code, all selecting the one backend \
         (ports 80 → 8080 and 81 → 8081, so a table of N services has 2N VIP:port entries). *direct*: the backend's address; *VIP*: the middle service's VIP, \
         DNAT in the eBPF program at the client's veth (Maglev, conntrack); *nft DNAT*: the same \
         backend behind one `dnat` rule per service in a linear nftables prerouting chain (the \
         kube-proxy iptables-mode kind, measured at the middle rule), with the hairpin \
         masqueraded as kube-proxy does; the rules are loaded only while *nft DNAT* is measured \
         (this kernel has bridge netfilter on, as kube-proxy requires, so every new connection \
         on the host walks them — bridged direct and VIP connections too: with 20,000 rules loaded, \
         direct connections ran at half their rate). Connections: connect, read a 3-byte greeting, close with a reset \
         (no TIME_WAIT piles up to slow the client's port choice), one after another for {secs} s \
         from one client thread; RR: 2,000 one-byte request/response round trips on one connection \
         (port 81). Five interleaved rounds, the median round shown.\n"
    )?;
    writeln!(
        md,
        "| services | direct conn/s | VIP conn/s | nft DNAT conn/s | VIP ÷ direct | VIP ÷ nft | connect p50 direct / VIP / nft | RR p50 direct / VIP / nft | RR p99 direct / VIP / nft | agent CPU |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|")?;
    for row in &r.rows {
        writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {:.2}× | {:.2}× | {} / {} / {} | {} / {} / {} | {} / {} / {} | {:.1} % |",
            row.services,
            row.direct.cps,
            row.vip.cps,
            row.nft.cps,
            row.vip.cps / row.direct.cps,
            row.vip.cps / row.nft.cps,
            us(row.direct.connect.p50),
            us(row.vip.connect.p50),
            us(row.nft.connect.p50),
            us(row.direct.rr.p50),
            us(row.vip.rr.p50),
            us(row.nft.rr.p50),
            us(row.direct.rr.p99),
            us(row.vip.rr.p99),
            us(row.nft.rr.p99),
            row.agent_cpu * 100.0,
        )?;
    }
    let min_direct = r.rows.iter().map(|x| x.vip.cps / x.direct.cps).fold(f64::INFINITY, f64::min);
    let at_10k = r.rows.iter().find(|x| x.services == 10_000).map(|x| x.vip.cps / x.nft.cps).unwrap_or(0.0);
    writeln!(md)?;
    writeln!(md, "| target | measured | |\n|---|---|---|")?;
    writeln!(md, "| VIP ≥ 0.95× direct at every size | {min_direct:.2}× (lowest) | {} |", verdict(min_direct >= 0.95))?;
    writeln!(md, "| VIP ≥ 3× nft DNAT at 10,000 services | {at_10k:.2}× | {} |", verdict(at_10k >= 3.0))?;
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
