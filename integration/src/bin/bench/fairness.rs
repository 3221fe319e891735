//! Fairness between tenants on one host: a victim's request/response
//! latency through a service VIP, alone and while a neighbour on another
//! network opens new flows as fast as it can (UDP to every port of its own
//! service's VIP), in interleaved rounds. The neighbour fills its own flow
//! table (its quota) and is refused past it; the victim's connection and
//! tables are its own. The same lab as `tests/fairness.rs`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use trellis_integration::sockets::{Backend, connect, in_ns, read_line};
use trellis_integration::{Host, netns_of};

/// Round trips per measurement.
const RRS: usize = 3000;

pub struct Round {
    pub quiet_p99: Duration,
    pub flood_p99: Duration,
    pub quiet_p50: Duration,
    pub flood_p50: Duration,
    /// New flows the neighbour sent a second while the victim measured.
    pub flood_rate: f64,
}

pub struct Fairness {
    pub rounds: Vec<Round>,
    /// Flows the neighbour was refused over the run (its table full).
    pub refused: u64,
    pub cpus: usize,
}

fn pct(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// `RRS` one-byte round trips on `conn`: their times.
fn round_trips(conn: &mut std::net::TcpStream) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(RRS);
    for _ in 0..RRS {
        let t = Instant::now();
        conn.write_all(b"x")?;
        read_line(conn)?;
        times.push(t.elapsed());
    }
    Ok(times)
}

pub fn bench(rounds: usize) -> Result<Fairness> {
    let h = Host::new()?;
    h.ctl(&["network", "create", "fa", "--subnet", "10.141.0.0/24"])?;
    h.ctl(&["network", "create", "fb", "--subnet", "10.142.0.0/24", "--attachable"])?;
    h.attach("fa", "sink", &["--label", "trellis.service=sink"])?;
    let sink = h.ctl_json(&["service", "create", "sink", "--network", "fa"])?;
    let sink_vip: std::net::Ipv4Addr = sink["vip"].as_str().context("sink VIP")?.parse()?;
    let flooder = h.attach("fa", "flooder", &["--label", "trellis.service=flooder"])?;
    let server = h.attach("fb", "server", &["--label", "trellis.service=web"])?;
    let _backend = Backend::start(&netns_of(&server), 8080, "web")?;
    let web = h.ctl_json(&["service", "create", "web", "--network", "fb", "--port", "80:8080"])?;
    let vip: SocketAddr = format!("{}:80", web["vip"].as_str().context("web VIP")?).parse()?;
    let victim = h.attach("fb", "victim", &[])?;
    let vns = netns_of(&victim);
    let mut conn = None;
    trellis_integration::wait_for(Duration::from_secs(10), || {
        conn = connect(&vns, vip, Duration::from_millis(500)).ok();
        conn.is_some()
    });
    let mut conn = conn.context("the victim never reached its VIP")?;
    conn.set_nodelay(true)?;
    read_line(&mut conn)?;
    round_trips(&mut conn)?; // warm up

    let mut out = Vec::new();
    for r in 0..rounds {
        // Alternate which goes first.
        let mut quiet = None;
        let mut flood = None;
        let mut rate = 0.0;
        for alone in [r % 2 == 0, r % 2 != 0] {
            if alone {
                quiet = Some(round_trips(&mut conn)?);
                continue;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let sent = Arc::new(AtomicU64::new(0));
            let (s, n, fns) = (stop.clone(), sent.clone(), netns_of(&flooder));
            let flood_thread = std::thread::spawn(move || {
                in_ns(&fns, move || {
                    let socks: Vec<UdpSocket> = (0..8).filter_map(|_| UdpSocket::bind("0.0.0.0:0").ok()).collect();
                    'out: loop {
                        for port in 1..=u16::MAX {
                            for sock in &socks {
                                if sock.send_to(b"x", (sink_vip, port)).is_ok() {
                                    n.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            if s.load(Ordering::Relaxed) {
                                break 'out;
                            }
                        }
                    }
                })
            });
            std::thread::sleep(Duration::from_millis(300));
            let (t0, n0) = (Instant::now(), sent.load(Ordering::Relaxed));
            let times = round_trips(&mut conn);
            rate = (sent.load(Ordering::Relaxed) - n0) as f64 / t0.elapsed().as_secs_f64();
            stop.store(true, Ordering::Relaxed);
            let _ = flood_thread.join();
            flood = Some(times?);
        }
        let (q, f) = (quiet.context("quiet")?, flood.context("flood")?);
        let round = Round {
            quiet_p99: pct(q.clone(), 0.99),
            flood_p99: pct(f.clone(), 0.99),
            quiet_p50: pct(q, 0.5),
            flood_p50: pct(f, 0.5),
            flood_rate: rate,
        };
        eprintln!(
            "  round {}: victim p99 {:?} alone, {:?} beside the flood ({rate:.0} new flows/s)",
            r + 1,
            round.quiet_p99,
            round.flood_p99
        );
        out.push(round);
    }
    let refused = metric(&h, "trellis_datapath_table_full_total", "endpoint=\"flooder\"");
    Ok(Fairness { rounds: out, refused, cpus: std::thread::available_parallelism().map_or(1, |n| n.get()) })
}

/// Sum of a metric's series whose labels contain `filter`.
fn metric(h: &Host, name: &str, filter: &str) -> u64 {
    let out = h.ns.cmd("curl").args(["-s", "http://127.0.0.1:9473/metrics"]).output();
    let Ok(out) = out else { return 0 };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

pub fn md(md: &mut String, f: &Fairness) -> Result<()> {
    writeln!(md, "## Fairness: a victim beside a neighbour flooding new flows\n")?;
    writeln!(
        md,
        "One host, two tenants (networks). The victim holds one TCP connection to its service's VIP and makes \
         {RRS} one-byte request/response round trips; its neighbour on the other network sends UDP to every port \
         of its own service's VIP from 8 sockets, one thread, as fast as it can (each datagram a new flow; past \
         its quota of 65,536 flows its table refuses them, counted). *Alone* and *beside the flood* alternate \
         within each of {} rounds; the ratio is per round, shown as median [min–max]. This machine has {} CPUs: \
         the flood's sender and the kernel's work for it take CPU time the victim's round trips then wait for, \
         whatever the tables do.\n",
        f.rounds.len(),
        f.cpus
    )?;
    writeln!(
        md,
        "| round | p50 alone | p50 beside the flood | p99 alone | p99 beside the flood | p99 ratio | neighbour's new flows/s |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    let mut ratios = Vec::new();
    for (i, r) in f.rounds.iter().enumerate() {
        let ratio = r.flood_p99.as_secs_f64() / r.quiet_p99.as_secs_f64();
        ratios.push(ratio);
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {ratio:.2}× | {:.0} |",
            i + 1,
            us(r.quiet_p50),
            us(r.flood_p50),
            us(r.quiet_p99),
            us(r.flood_p99),
            r.flood_rate
        )?;
    }
    ratios.sort_by(f64::total_cmp);
    let (lo, hi) = (ratios.first().copied().unwrap_or(0.0), ratios.last().copied().unwrap_or(0.0));
    let med = ratios.get(ratios.len() / 2).copied().unwrap_or(0.0);
    writeln!(md)?;
    writeln!(md, "Flows refused to the neighbour over the run (its table full): {}.\n", f.refused)?;
    writeln!(md, "| target | measured | |")?;
    writeln!(md, "|---|---|---|")?;
    writeln!(
        md,
        "| victim p99 beside the flood ≤ 1.2× alone | {med:.2}× [{lo:.2}–{hi:.2}] | {} |\n",
        super::verdict(hi <= 1.2)
    )?;
    Ok(())
}
