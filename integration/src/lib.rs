//! Labs for Trellis's integration tests and benchmarks: hosts are network
//! namespaces the test makes itself, each running a real `trellisd`;
//! containers are network namespaces attached through the agent's API.
//!
//! Every name a lab makes is unique to the process and a counter, and
//! everything is removed on drop, so tests run in parallel and never touch
//! the root namespace's interfaces.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod containerd;
pub mod dockerd;
pub mod sockets;
pub mod vm;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Fail loudly unless running as root: a root test must never pass by
/// doing nothing.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (network namespaces, real kernel objects); run the suite as root (CI does)"
    );
}

/// A name unique to this process: `prefix` + pid + counter.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}{}-{n}", std::process::id())
}

/// Where the workspace's binaries are: `TRELLIS_BIN_DIR`, else the target
/// directory next to this crate (debug, then release).
pub fn bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("TRELLIS_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf();
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
    for profile in ["debug", "release"] {
        let p = target.join(profile).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found under {}: run `cargo build --bins` first (or set TRELLIS_BIN_DIR)", target.display());
}

/// Run a command; error (with its output) unless it succeeds.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS`.
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// A named network namespace (`/run/netns/NAME`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Netns> {
        let name = unique(prefix);
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that runs inside this namespace (nsenter keeps the mount
    /// namespace, unlike `ip netns exec`).
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display())).arg("--").arg(program);
        c
    }

    /// Names of the links in this namespace.
    pub fn links(&self) -> Result<Vec<String>> {
        let out = self.ip(&["-o", "link", "show"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Run a command in the netns at `path` (any netns file, not only named ones).
pub fn in_netns(path: &Path, program: &str, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", path.display())).arg("--").arg(program).args(args);
    c
}

/// `ping -c COUNT -W 1 DST` inside the netns at `path`; true if all replies came.
pub fn ping(path: &Path, dst: &str, count: u32) -> bool {
    in_netns(path, "ping", &["-q", "-c", &count.to_string(), "-i", "0.2", "-W", "1", dst])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Panics unless `promtool check metrics` (Debian `prometheus`) accepts
/// the exposition `text`.
pub fn promtool_check(text: &str) {
    use std::io::Write;
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian prometheus)");
    p.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("writing to promtool");
    let out = p.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Poll `f` until it returns true or `timeout` passes.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A host: a network namespace with its own `trellisd`.
pub struct Host {
    pub ns: Netns,
    pub dir: tempfile::TempDir,
    agent: Option<Child>,
    pub extra_args: Vec<String>,
}

impl Host {
    /// A host namespace (with an agent not yet started).
    pub fn bare() -> Result<Host> {
        let ns = Netns::new("trh")?;
        let dir = tempfile::Builder::new().prefix("trellis-lab-").tempdir()?;
        Ok(Host { ns, dir, agent: None, extra_args: Vec::new() })
    }

    /// A host with its agent running.
    pub fn new() -> Result<Host> {
        let mut h = Host::bare()?;
        h.start()?;
        Ok(h)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }
    pub fn socket(&self) -> PathBuf {
        self.run_dir().join("trellisd.sock")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("trellisd.log")
    }
    /// What this host's dockerd sees as `/run/docker`.
    pub fn docker_run_dir(&self) -> PathBuf {
        self.dir.path().join("run-docker")
    }
    /// This host's dockerd API socket.
    pub fn docker_socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    /// Start the agent and wait until it answers.
    pub fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        let mut cmd = self.ns.cmd(bin("trellisd"));
        cmd.arg("--state-dir")
            .arg(self.state_dir())
            .arg("--run-dir")
            .arg(self.run_dir())
            // Tests resync often (repairs show fast); a lab that asks
            // for another interval gets it.
            .args(if self.extra_args.iter().any(|a| a == "--resync-interval-ms") {
                vec![]
            } else {
                vec!["--resync-interval-ms", "500"]
            })
            // The Docker driver listens where this host's dockerd (if a
            // test starts one) looks for plugins, never in /run/docker.
            .arg("--docker-plugin")
            .arg(self.docker_run_dir().join("plugins/trellis.sock"))
            .arg("--docker-host")
            .arg(format!("unix://{}", self.docker_socket().display()))
            .args(&self.extra_args)
            .env("TRELLIS_LOG", "info,trellis_agent=debug,h2=warn,tower=warn")
            .env_remove("TRELLIS_CONFIG")
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("starting trellisd")?;
        self.agent = Some(child);
        let socket = self.socket();
        let mut exited = None;
        let ok = wait_for(Duration::from_secs(20), || {
            if let Some(c) = self.agent.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                exited = Some(status);
                return true;
            }
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        if let Some(status) = exited {
            self.agent = None;
            bail!("trellisd exited at start ({status}); log:\n{}", self.log());
        }
        if !ok {
            bail!("trellisd did not come up; log:\n{}", self.log());
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|c| c.id())
    }

    /// `kill -9` the agent.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM the agent and wait for it; its exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.agent.take()?;
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
        c.wait().ok()
    }

    /// `trellisctl ARGS` against this host's agent.
    pub fn ctl_output(&self, args: &[&str]) -> Output {
        Command::new(bin("trellisctl"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("running trellisctl")
    }

    /// `trellisctl ARGS`, which must succeed; its stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let out = self.ctl_output(args);
        if !out.status.success() {
            bail!(
                "trellisctl {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `trellisctl ARGS`, which must fail; its stderr.
    pub fn ctl_err(&self, args: &[&str]) -> String {
        let out = self.ctl_output(args);
        assert!(
            !out.status.success(),
            "trellisctl {args:?} should have failed but printed {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `trellisctl ARGS --json` parsed.
    pub fn ctl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ctl(&a)?;
        serde_json::from_str(&out).with_context(|| format!("parsing {out}"))
    }

    /// Attach an endpoint in a namespace the agent manages; returns its JSON.
    pub fn attach(&self, network: &str, name: &str, extra: &[&str]) -> Result<serde_json::Value> {
        let mut args = vec!["attach", network, "--name", name];
        args.extend_from_slice(extra);
        self.ctl_json(&args)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill9();
        // Unmount the namespaces the agent pinned under the run dir, and
        // its bpffs (pinned maps and links).
        if let Ok(entries) = std::fs::read_dir(self.run_dir().join("netns")) {
            for e in entries.flatten() {
                let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _ = nix::mount::umount2(&self.run_dir().join("bpf"), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// The netns path of an endpoint's JSON.
pub fn netns_of(ep: &serde_json::Value) -> PathBuf {
    PathBuf::from(ep["netns"].as_str().expect("netns in endpoint JSON"))
}

/// The IP (no prefix) of an endpoint's JSON.
pub fn ip_of(ep: &serde_json::Value) -> String {
    ep["address"].as_str().expect("address").split('/').next().expect("ip").to_string()
}

/// An "outside world" namespace joined to `host` by a veth: the host gets
/// `host_ip/24` and a default route through `outside_ip`.
pub struct Uplink {
    pub outside: Netns,
    pub host_ip: String,
    pub outside_ip: String,
}

impl Uplink {
    pub fn new(host: &Netns, subnet_third_octet: u8) -> Result<Uplink> {
        let outside = Netns::new("tro")?;
        let a = unique("tu");
        let b = unique("to");
        ip(&["link", "add", &a, "netns", &host.name, "type", "veth", "peer", "name", &b, "netns", &outside.name])?;
        let host_ip = format!("198.18.{subnet_third_octet}.1");
        let outside_ip = format!("198.18.{subnet_third_octet}.2");
        host.ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &a])?;
        host.ip(&["link", "set", &a, "up"])?;
        outside.ip(&["addr", "add", &format!("{outside_ip}/24"), "dev", &b])?;
        outside.ip(&["link", "set", &b, "up"])?;
        host.ip(&["route", "add", "default", "via", &outside_ip])?;
        Ok(Uplink { outside, host_ip, outside_ip })
    }
}

/// A free TCP port on 127.0.0.1 (bound and released: good enough for tests
/// that start a server right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A real etcd (Debian `etcd-server`) with its own data dir, on loopback or
/// inside a test namespace; killed on drop.
pub struct Etcd {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub ip: String,
    pub client_port: u16,
    peer_port: u16,
    netns: Option<PathBuf>,
    /// With TLS: the directory holding ca.pem, server.pem/-key.pem and
    /// client.pem/-key.pem; clients must present a certificate.
    pub tls: Option<PathBuf>,
}

/// Make a CA, a server certificate for `ip` and a client certificate with
/// openssl, in `dir`.
pub fn make_certs(dir: &Path, ip: &str) -> Result<()> {
    let sh = format!(
        r#"set -e
cd {dir}
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca.pem -days 2 -subj /CN=trellis-test-ca \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
for who in server client; do
  openssl req -newkey rsa:2048 -nodes -keyout $who-key.pem -out $who.csr -subj /CN=$who 2>/dev/null
done
printf 'subjectAltName=IP:{ip}
extendedKeyUsage=serverAuth
basicConstraints=CA:FALSE
' > server.ext
printf 'extendedKeyUsage=clientAuth
basicConstraints=CA:FALSE
' > client.ext
for who in server client; do
  openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -out $who.pem -days 2 -extfile $who.ext 2>/dev/null
done
"#,
        dir = dir.display()
    );
    run(Command::new("bash").arg("-c").arg(sh)).map(|_| ())
}

impl Etcd {
    /// etcd on 127.0.0.1 with random ports.
    pub fn start() -> Result<Etcd> {
        Etcd::start_in(None, "127.0.0.1")
    }

    /// etcd on 127.0.0.1 speaking TLS only, demanding client certificates.
    pub fn start_tls() -> Result<Etcd> {
        Etcd::start_with(None, "127.0.0.1", true)
    }

    /// etcd listening on `ip` inside the namespace at `netns` (or here).
    pub fn start_in(netns: Option<&Path>, ip: &str) -> Result<Etcd> {
        Etcd::start_with(netns, ip, false)
    }

    fn start_with(netns: Option<&Path>, ip: &str, tls: bool) -> Result<Etcd> {
        let etcd = which("etcd").context("etcd not found: install etcd-server (scripts/setup.sh does)")?;
        let mut e = Etcd {
            child: None,
            dir: tempfile::Builder::new().prefix("trellis-etcd-").tempdir()?,
            ip: ip.to_string(),
            client_port: free_port(),
            peer_port: free_port(),
            netns: netns.map(Path::to_path_buf),
            tls: None,
        };
        if tls {
            let certs = e.dir.path().join("certs");
            std::fs::create_dir_all(&certs)?;
            make_certs(&certs, ip)?;
            e.tls = Some(certs);
        }
        // The ports were free when picked; another test (or etcd's own
        // clients in the root namespace) may take one before etcd binds:
        // pick again then.
        for _ in 0..5 {
            match e.spawn(&etcd) {
                Ok(()) => return Ok(e),
                Err(err) if format!("{err:#}").contains("address already in use") => {
                    if let Some(mut c) = e.child.take() {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    let _ = std::fs::remove_dir_all(e.dir.path().join("data"));
                    let _ = std::fs::remove_file(e.dir.path().join("etcd.log"));
                    e.client_port = free_port();
                    e.peer_port = free_port();
                }
                Err(err) => return Err(err),
            }
        }
        bail!("etcd found its ports taken five times in a row")
    }

    fn spawn(&mut self, etcd: &Path) -> Result<()> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://{}:{}", self.ip, self.client_port);
        let peer = format!("http://{}:{}", self.ip, self.peer_port);
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg("--").arg(etcd);
                c
            }
            None => Command::new(etcd),
        };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("etcd.log"))?;
        cmd.arg("--name")
            .arg("lab")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("lab={peer}"))
            .arg("--heartbeat-interval")
            .arg("50")
            .arg("--election-timeout")
            .arg("500")
            .args(match &self.tls {
                Some(d) => vec![
                    "--cert-file".to_string(),
                    d.join("server.pem").display().to_string(),
                    "--key-file".into(),
                    d.join("server-key.pem").display().to_string(),
                    "--trusted-ca-file".into(),
                    d.join("ca.pem").display().to_string(),
                    "--client-cert-auth".into(),
                ],
                None => vec![],
            })
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(cmd.spawn().context("starting etcd")?);
        let log_path = self.dir.path().join("etcd.log");
        let taken = || std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains("address already in use"));
        let ok = wait_for(Duration::from_secs(20), || {
            if taken() {
                // Given up at once: the caller picks other ports.
                return true;
            }
            let probe = match &self.netns {
                Some(ns) => {
                    in_netns(ns, "bash", &["-c", &format!("exec 3<>/dev/tcp/{}/{}", self.ip, self.client_port)])
                        .stderr(Stdio::null())
                        .status()
                        .map(|s| s.success())
                        .unwrap_or(false)
                }
                None => std::net::TcpStream::connect((self.ip.as_str(), self.client_port)).is_ok(),
            };
            probe
                && std::fs::read_to_string(self.dir.path().join("etcd.log"))
                    .is_ok_and(|l| l.contains("ready to serve client requests"))
        });
        if !ok || taken() {
            bail!(
                "etcd did not come up; log:\n{}",
                std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// `etcd://IP:PORT` (`etcds://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://{}:{}", self.ip, self.client_port)
    }

    /// Stop etcd (SIGKILL); its data stays for [`Etcd::restart`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let etcd = which("etcd").context("etcd not found")?;
        self.spawn(&etcd)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A program on PATH (or in /usr/sbin, /usr/bin).
/// Turn the datapath's in-kernel DNS path (bit 2 of the pinned `config`
/// map of the agent whose run directory is `run_dir`) on or off, the
/// other switches kept.
pub fn set_dns_kernel(run_dir: &Path, on: bool) -> Result<()> {
    let map = run_dir.join("bpf/maps/config");
    let map = map.to_str().context("map path")?;
    let out = run(Command::new("bpftool").args(["-j", "map", "lookup", "pinned", map, "key", "0", "0", "0", "0"]))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let bytes: Vec<u8> = v["value"]
        .as_array()
        .context("bpftool: no value")?
        .iter()
        .filter_map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
        .collect();
    let flags = u32::from_le_bytes(bytes.get(..4).context("bpftool: a short value")?.try_into()?);
    let flags = if on { flags | 2 } else { flags & !2 };
    let value: Vec<String> = flags.to_le_bytes().iter().map(|b| b.to_string()).collect();
    let mut args = vec!["map", "update", "pinned", map, "key", "0", "0", "0", "0", "value"];
    args.extend(value.iter().map(String::as_str));
    run(Command::new("bpftool").args(&args))?;
    Ok(())
}

pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// The underlay address of lab host `i` (1-based) and of the underlay
/// namespace itself (where etcd listens).
pub fn underlay_ip(i: usize) -> String {
    format!("198.19.0.{i}")
}
pub const UNDERLAY_GATEWAY: &str = "198.19.0.254";

/// A multi-host lab: N hosts as network namespaces joined by an underlay
/// bridge (in its own namespace, which also runs etcd), each host running
/// its own `trellisd` against that etcd.
pub struct Lab {
    pub hosts: Vec<Host>,
    pub etcd: Etcd,
    pub underlay: Netns,
    /// Each host's uplink interface (in the host's namespace).
    pub uplinks: Vec<String>,
    /// The underlay bridge's port of each host (its uplink's peer, in the
    /// underlay namespace).
    pub ports: Vec<String>,
}

impl Lab {
    /// A lab of `n` hosts with lease TTL `lease_ms` (agents started).
    pub fn new(n: usize, lease_ms: u64) -> Result<Lab> {
        Lab::with_args(n, lease_ms, &[])
    }

    /// A lab whose agents get `extra` flags too.
    pub fn with_args(n: usize, lease_ms: u64, extra: &[&str]) -> Result<Lab> {
        Lab::with_host_args(n, lease_ms, |_| extra.iter().map(|s| s.to_string()).collect())
    }

    /// A lab whose agent `i` (0-based) gets the flags `extra(i)` too (a
    /// mixed cluster: some hosts with `--ebpf=false`).
    pub fn with_host_args(n: usize, lease_ms: u64, extra: impl Fn(usize) -> Vec<String>) -> Result<Lab> {
        let mut lab = Lab::unstarted(n, lease_ms, extra)?;
        for h in lab.hosts.iter_mut() {
            h.start()?;
        }
        Ok(lab)
    }

    /// The lab of [`Lab::with_host_args`] with no agent started yet (a test
    /// that changes the hosts' wiring first starts them itself).
    pub fn unstarted(n: usize, lease_ms: u64, extra: impl Fn(usize) -> Vec<String>) -> Result<Lab> {
        let underlay = Netns::new("tru")?;
        underlay.ip(&["link", "add", "ul0", "type", "bridge"])?;
        underlay.ip(&["addr", "add", &format!("{UNDERLAY_GATEWAY}/24"), "dev", "ul0"])?;
        underlay.ip(&["link", "set", "ul0", "up"])?;
        let etcd = Etcd::start_in(Some(&underlay.path()), UNDERLAY_GATEWAY)?;
        let mut hosts = Vec::with_capacity(n);
        let mut uplinks = Vec::with_capacity(n);
        let mut ports = Vec::with_capacity(n);
        for i in 1..=n {
            let mut h = Host::bare()?;
            let a = unique("tl");
            let b = unique("tu");
            ip(&["link", "add", &a, "netns", &h.ns.name, "type", "veth", "peer", "name", &b, "netns", &underlay.name])?;
            underlay.ip(&["link", "set", &b, "master", "ul0", "up"])?;
            h.ns.ip(&["addr", "add", &format!("{}/24", underlay_ip(i)), "dev", &a])?;
            h.ns.ip(&["link", "set", &a, "up"])?;
            h.ns.ip(&["route", "add", "default", "via", UNDERLAY_GATEWAY])?;
            h.extra_args = vec![
                "--store".into(),
                etcd.url(),
                "--lease-ttl-ms".into(),
                lease_ms.to_string(),
                "--host-id".into(),
                format!("host{i}"),
            ];
            h.extra_args.extend(extra(i - 1));
            hosts.push(h);
            uplinks.push(a);
            ports.push(b);
        }
        Ok(Lab { hosts, etcd, underlay, uplinks, ports })
    }

    /// Host `i`'s (0-based) wire to the underlay carries `mtu`: its
    /// uplink and the bridge's port to it.
    pub fn set_uplink_mtu(&self, i: usize, mtu: u32) -> Result<()> {
        self.hosts[i].ns.ip(&["link", "set", &self.uplinks[i], "mtu", &mtu.to_string()])?;
        self.underlay.ip(&["link", "set", &self.ports[i], "mtu", &mtu.to_string()])?;
        Ok(())
    }
}

/// One invocation of the `trellis-cni` plugin as a runtime makes it: the
/// exit code and the JSON it printed (`Null` when it printed nothing).
pub fn trellis_cni(
    command: &str,
    conf: &serde_json::Value,
    container_id: &str,
    netns: Option<&Path>,
    ifname: &str,
) -> (i32, serde_json::Value) {
    use std::io::Write;
    let mut c = Command::new(bin("trellis-cni"));
    c.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !container_id.is_empty() {
        c.env("CNI_CONTAINERID", container_id);
    }
    if !ifname.is_empty() {
        c.env("CNI_IFNAME", ifname);
    }
    if let Some(ns) = netns {
        c.env("CNI_NETNS", ns);
    }
    let mut child = c.spawn().expect("spawning trellis-cni");
    child.stdin.take().expect("stdin").write_all(conf.to_string().as_bytes()).expect("writing the config");
    let out = child.wait_with_output().expect("waiting for trellis-cni");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = if stdout.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("trellis-cni printed no JSON ({e}): {stdout}"))
    };
    (out.status.code().unwrap_or(-1), v)
}

/// A busybox root filesystem (from Debian's `busybox-static`) at `dir`.
pub fn busybox_rootfs(dir: &Path) -> Result<()> {
    for sub in ["bin", "etc", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).context("copying busybox (busybox-static)")?;
    let list = run(Command::new("/bin/busybox").arg("--list"))?;
    for applet in list.lines().filter(|a| !a.is_empty() && *a != "busybox") {
        let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
    }
    Ok(())
}
