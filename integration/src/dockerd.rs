//! A real `dockerd` (Debian's docker.io) for one lab host: inside the
//! host's network namespace, with its own data root, exec root and API
//! socket, and a private `/run/docker` (so its plugin directory is the
//! host's Trellis driver socket and its managed containerd is its own).
//!
//! The exec root is a shared mount: the sandbox namespaces dockerd pins
//! there from its private mount namespace stay visible to `trellisd`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{Host, wait_for};

/// The image every test container runs: busybox, imported from
/// Debian's `busybox-static`.
pub const IMAGE: &str = "trellis-busybox";

pub struct Dockerd {
    child: Option<Child>,
    netns: PathBuf,
    pub socket: PathBuf,
    exec_root: PathBuf,
    data_root: PathBuf,
    pidfile: PathBuf,
    run_dir: PathBuf,
    log: PathBuf,
    /// dockerd's own iptables rules on (`--iptables=true`).
    iptables: bool,
    /// docker-proxy for published ports (`--userland-proxy=true`).
    proxy: bool,
}

fn docker_bin() -> &'static str {
    // Debian's client, not whatever else is first on PATH.
    if Path::new("/usr/bin/docker").exists() { "/usr/bin/docker" } else { "docker" }
}

impl Dockerd {
    /// Start a dockerd for `host` (its agent must be configured with
    /// the host's Docker directories, as [`Host::start`] does) and import
    /// the test image.
    pub fn start(host: &Host) -> Result<Dockerd> {
        Self::start_with(host, false)
    }

    /// A dockerd with its own iptables rules on, as Docker runs by default
    /// (in the host's namespace only: its FORWARD policy DROP, its DOCKER
    /// and DOCKER-USER chains).
    pub fn start_with_iptables(host: &Host) -> Result<Dockerd> {
        Self::start_with(host, true)
    }

    /// A dockerd as Docker ships it for published ports: its iptables
    /// rules and docker-proxy on (the benchmarks' peer).
    pub fn start_as_shipped(host: &Host) -> Result<Dockerd> {
        Self::start_full(host, true, true)
    }

    fn start_with(host: &Host, iptables: bool) -> Result<Dockerd> {
        Self::start_full(host, iptables, false)
    }

    fn start_full(host: &Host, iptables: bool, proxy: bool) -> Result<Dockerd> {
        let dir = host.dir.path();
        let d = Dockerd {
            child: None,
            netns: host.ns.path(),
            socket: host.docker_socket(),
            exec_root: dir.join("docker-exec"),
            data_root: dir.join("docker-data"),
            pidfile: dir.join("docker.pid"),
            run_dir: host.docker_run_dir(),
            log: dir.join("dockerd.log"),
            iptables,
            proxy,
        };
        std::fs::create_dir_all(&d.exec_root)?;
        std::fs::create_dir_all(d.run_dir.join("plugins"))?;
        std::fs::create_dir_all("/run/docker")?;
        // A shared mount of its own, so the sandboxes' netns mounts that
        // dockerd makes in its mount namespace propagate back.
        let exec = d.exec_root.display().to_string();
        crate::run(Command::new("mount").args(["--bind", &exec, &exec]))?;
        crate::run(Command::new("mount").args(["--make-shared", &exec]))?;
        let mut d = d;
        d.launch()?;
        d.import_image(dir)?;
        Ok(d)
    }

    fn launch(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let script = format!(
            "mount --bind {run} /run/docker && exec dockerd --data-root {data} --exec-root {exec} --pidfile {pid} \
             -H unix://{sock} --bridge=none --iptables={iptables} --ip-masq=false --userland-proxy={proxy} --log-level=warn",
            iptables = self.iptables,
            proxy = self.proxy,
            run = self.run_dir.display(),
            data = self.data_root.display(),
            exec = self.exec_root.display(),
            pid = self.pidfile.display(),
            sock = self.socket.display(),
        );
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.display()))
            .args(["--", "unshare", "-m", "--propagation", "unchanged", "--", "sh", "-c", &script])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dockerd")?;
        self.child = Some(child);
        let ok = wait_for(Duration::from_secs(60), || {
            self.docker(&["version", "--format", "{{.Server.Version}}"]).output().is_ok_and(|o| o.status.success())
        });
        if !ok {
            bail!("dockerd did not come up; log:\n{}", self.log());
        }
        Ok(())
    }

    fn import_image(&self, dir: &Path) -> Result<()> {
        let rootfs = dir.join("rootfs");
        crate::busybox_rootfs(&rootfs)?;
        let tar = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .context("tar")?;
        let out = self
            .docker(&["import", "--change", "CMD [\"sh\"]", "-", IMAGE])
            .stdin(tar.stdout.context("tar stdout")?)
            .output()?;
        if !out.status.success() {
            bail!("docker import failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// dockerd's pid.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pidfile).ok()?.trim().parse().ok()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `docker ARGS` against this engine.
    pub fn docker(&self, args: &[&str]) -> Command {
        let mut c = Command::new(docker_bin());
        c.arg("-H").arg(format!("unix://{}", self.socket.display())).args(args);
        c
    }

    /// `docker ARGS`, which must succeed; its stdout, trimmed.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.docker(args).output()?;
        if !out.status.success() {
            bail!(
                "docker {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `docker ARGS`, which must fail; its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.docker(args).output().expect("running docker");
        assert!(!out.status.success(), "docker {args:?} should have failed: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// SIGTERM dockerd and wait for it (its containers stop with it).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = std::fs::read_to_string(&self.pidfile)
                && let Ok(pid) = pid.trim().parse::<i32>()
            {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
            } else {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }

    /// Stop and start again (same data root: networks and stopped
    /// containers survive, as with a real restart).
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.launch()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.docker(&["rm", "-f", "-v"]).output();
            if let Ok(ids) = self.ok(&["ps", "-aq"]) {
                for id in ids.lines() {
                    let _ = self.docker(&["rm", "-f", id]).output();
                }
            }
        }
        self.stop();
        for dir in [&self.exec_root, &self.data_root] {
            let _ = Command::new("umount").arg("-R").arg("-l").arg(dir).stderr(Stdio::null()).status();
        }
    }
}
