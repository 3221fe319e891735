//! A real containerd (Debian's) for one lab host, driven with `ctr run
//! --cni`: ctr runs the CNI plugins itself, so each `ctr` runs in the
//! host's network namespace and a private mount namespace where the test's
//! CNI config and plugin directories cover `/etc/cni/net.d` and
//! `/usr/lib/cni`. Containers run from a busybox root filesystem.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{Host, wait_for};

pub struct Containerd {
    daemon: Option<Child>,
    netns: PathBuf,
    dir: PathBuf,
    pub socket: PathBuf,
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub rootfs: PathBuf,
    /// The containerd namespace of this instance's containers: runc keeps
    /// its state per namespace in one global directory, so instances must
    /// not share one.
    pub namespace: String,
    runs: Vec<Child>,
}

impl Containerd {
    /// Start containerd in `host`'s namespace; `conflist` is written to
    /// the CNI config dir, and `trellis-cni` installed as plugin `trellis`.
    pub fn start(host: &Host, conflist: &serde_json::Value) -> Result<Containerd> {
        let dir = host.dir.path().join("containerd");
        let c = Containerd {
            daemon: None,
            netns: host.ns.path(),
            socket: dir.join("containerd.sock"),
            conf_dir: dir.join("net.d"),
            bin_dir: dir.join("cni-bin"),
            rootfs: dir.join("rootfs"),
            namespace: crate::unique("trellis").replace('-', "x"),
            dir,
            runs: Vec::new(),
        };
        std::fs::create_dir_all(&c.conf_dir)?;
        std::fs::create_dir_all(&c.bin_dir)?;
        std::fs::create_dir_all("/etc/cni/net.d")?;
        std::fs::write(c.conf_dir.join("10-trellis.conflist"), serde_json::to_vec_pretty(conflist)?)?;
        std::os::unix::fs::symlink(crate::bin("trellis-cni"), c.bin_dir.join("trellis"))?;
        crate::busybox_rootfs(&c.rootfs)?;
        let log = std::fs::File::create(c.dir.join("containerd.log"))?;
        let mut c = c;
        c.daemon = Some(
            Command::new("nsenter")
                .arg(format!("--net={}", c.netns.display()))
                .arg("--")
                .arg("containerd")
                .arg("--root")
                .arg(c.dir.join("root"))
                .arg("--state")
                .arg(c.dir.join("state"))
                .arg("--address")
                .arg(&c.socket)
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting containerd")?,
        );
        let sock = c.socket.clone();
        if !wait_for(Duration::from_secs(20), || {
            Command::new("ctr").arg("-a").arg(&sock).arg("version").output().is_ok_and(|o| o.status.success())
        }) {
            bail!("containerd did not come up: {}", std::fs::read_to_string(c.dir.join("containerd.log"))?);
        }
        Ok(c)
    }

    /// `ctr ARGS` as a runtime would run it (host netns, the test's CNI dirs).
    fn ctr(&self, args: &[&str]) -> Command {
        let script = format!(
            "mount --bind {conf} /etc/cni/net.d && mount --bind {bin} /usr/lib/cni && exec ctr -a {sock} -n {ns} \"$@\"",
            conf = self.conf_dir.display(),
            bin = self.bin_dir.display(),
            sock = self.socket.display(),
            ns = self.namespace,
        );
        let mut c = Command::new("nsenter");
        // --propagation unchanged: the netns ctr pins under /run/netns (a
        // shared mount) stays visible to the agent.
        c.arg(format!("--net={}", self.netns.display()))
            .args(["--", "unshare", "-m", "--propagation", "unchanged", "--", "sh", "-c", &script, "ctr"])
            .args(args);
        c
    }

    /// `ctr run --rm --cni ID sleep 600` in the background: when its task
    /// is killed, ctr runs CNI DEL and removes the container.
    pub fn run(&mut self, id: &str) -> Result<()> {
        let rootfs = self.rootfs.display().to_string();
        let child = self
            .ctr(&["run", "--rm", "--cni", "--null-io", "--rootfs", &rootfs, id, "/bin/sleep", "600"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        self.runs.push(child);
        // Up once its task runs.
        let ok = wait_for(Duration::from_secs(20), || {
            self.ctr(&["task", "ls"]).output().is_ok_and(|o| {
                String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with(id) && l.contains("RUNNING"))
            })
        });
        if !ok {
            let mut child = self.runs.pop().expect("just pushed");
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!("ctr run {id} did not start: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Run a command in a running container; true if it exits 0.
    pub fn exec(&self, id: &str, cmd: &[&str]) -> bool {
        let exec_id = format!("x{}", crate::unique("e").replace('-', ""));
        let mut args = vec!["task", "exec", "--exec-id", &exec_id, id];
        args.extend_from_slice(cmd);
        self.ctr(&args).output().is_ok_and(|o| o.status.success())
    }

    /// Kill a container's task: its `ctr run --rm` then tears its network down.
    pub fn kill(&mut self, id: &str) -> Result<()> {
        let out = self.ctr(&["task", "kill", "-s", "KILL", id]).output()?;
        if !out.status.success() {
            bail!("ctr task kill {id}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Ok(out) = self.ctr(&["task", "ls", "-q"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.ctr(&["task", "kill", "-s", "KILL", id]).output();
            }
        }
        for mut r in self.runs.drain(..) {
            let _ = r.kill();
            let _ = r.wait();
        }
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = std::fs::remove_dir_all(PathBuf::from("/run/containerd/runc").join(&self.namespace));
        let _ = Command::new("umount").arg("-R").arg("-l").arg(self.dir.join("state")).status();
        let _ = Command::new("umount").arg("-R").arg("-l").arg(self.dir.join("root")).status();
    }
}
