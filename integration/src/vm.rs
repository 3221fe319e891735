//! Stock-kernel VMs (QEMU under TCG) for what this machine's kernel lacks,
//! IPsec ESP above all (see ../shared/notes/stock-kernel-vm.md). Each guest
//! boots Debian's kernel with a tiny initramfs (`vm/initramfs.sh`), mounts
//! this machine's root read-only over 9p and runs a guest script from it;
//! the guests share one writable directory for results and one virtual
//! wire (a QEMU socket netdev on loopback).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// What the VM tests need, or why they cannot run here.
pub fn available() -> Result<PathBuf> {
    if crate::which("qemu-system-x86_64").is_none() {
        bail!("qemu-system-x86_64 is missing (apt-get install qemu-system-x86; scripts/setup.sh does)");
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm");
    Ok(dir)
}

/// Where the guests find this build's binaries: stripped copies in the
/// shared directory (this machine's /tmp is hidden in a guest, which has
/// its own) (a debug `trellisctl` is ~240 MB with its debug
/// information, read over 9p at every start otherwise).
const GUEST_BIN: &str = "/run/out/bin";

fn stage_binaries(out: &Path) -> Result<()> {
    let dir = out.join("bin");
    std::fs::create_dir_all(&dir)?;
    for name in ["trellisd", "trellisctl"] {
        let src = crate::bin(name);
        let dst = dir.join(name);
        if crate::run(Command::new("strip").arg("-o").arg(&dst).arg(&src)).is_err() {
            std::fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}

pub struct Guest {
    child: Child,
    pub console: PathBuf,
}

/// Two guests on one wire, each running `script` with `trellis.idx=1|2`.
pub struct Pair {
    /// Removed when the pair is dropped, unless a test failed (then it is
    /// kept for a look, and its path printed).
    pub dir: PathBuf,
    pub guests: Vec<Guest>,
}

impl Pair {
    pub fn out(&self) -> PathBuf {
        self.dir.join("out")
    }

    pub fn start(script: &Path, memory_mb: u32) -> Result<Pair> {
        Pair::start_with(script, memory_mb, "")
    }

    /// `extra`: more `trellis.KEY=VALUE` words for the guests' command line.
    pub fn start_with(script: &Path, memory_mb: u32, extra: &str) -> Result<Pair> {
        let vm = available()?;
        let dir = tempfile::Builder::new().prefix("trellis-vm").tempdir()?.keep();
        let out = dir.join("out");
        std::fs::create_dir_all(&out)?;
        let initrd = dir.join("initrd.gz");
        let kernel = crate::run(Command::new("bash").arg(vm.join("initramfs.sh")).arg(&initrd))
            .context("building the initramfs")?
            .trim()
            .to_string();
        stage_binaries(&out)?;
        // The script too: the guest mounts its own /tmp (and a checkout
        // may live there).
        std::fs::copy(script, out.join("guest.sh")).with_context(|| format!("copying {}", script.display()))?;
        let port = crate::free_port();
        let mut guests = Vec::new();
        for idx in 1..=2u8 {
            let console = dir.join(format!("console-{idx}.log"));
            let net = if idx == 1 {
                format!("socket,id=n0,listen=127.0.0.1:{port}")
            } else {
                format!("socket,id=n0,connect=127.0.0.1:{port}")
            };
            let append = format!(
                "console=ttyS0 quiet panic=-1 trellis.idx={idx} trellis.run=/run/out/guest.sh trellis.bin={GUEST_BIN} {extra}"
            );
            let child = Command::new("qemu-system-x86_64")
                .args(["-m", &memory_mb.to_string(), "-smp", "1", "-nographic", "-no-reboot"])
                .arg("-kernel")
                .arg(&kernel)
                .arg("-initrd")
                .arg(&initrd)
                .arg("-append")
                .arg(&append)
                .args(["-netdev", &net, "-device", &format!("virtio-net-pci,netdev=n0,mac=52:54:00:99:00:0{idx}")])
                .args(["-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap"])
                .arg("-virtfs")
                .arg(format!("local,path={},mount_tag=out,security_model=none", out.display()))
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&console)?)
                .stderr(Stdio::null())
                .spawn()
                .context("starting qemu-system-x86_64")?;
            guests.push(Guest { child, console });
            if idx == 1 {
                // The second guest connects to the first one's wire.
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        Ok(Pair { dir, guests })
    }

    /// Wait for every guest to power off; kill them at `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        loop {
            let mut running = 0;
            for g in &mut self.guests {
                if g.child.try_wait()?.is_none() {
                    running += 1;
                }
            }
            if running == 0 {
                return Ok(());
            }
            if Instant::now() > end {
                for g in &mut self.guests {
                    let _ = g.child.kill();
                    let _ = g.child.wait();
                }
                bail!("the guests did not finish within {timeout:?}:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Consoles and guest logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for g in &self.guests {
            let text = std::fs::read_to_string(&g.console).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            s += &format!(
                "--- {} (tail)\n{}\n",
                g.console.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if let Ok(entries) = std::fs::read_dir(self.out()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".log") || name == "results" {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(25).collect();
                    s += &format!("--- {name} (tail)\n{}\n", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
                }
            }
        }
        s
    }

    /// The KEY=VALUE lines a guest script wrote to `out/results`.
    pub fn results(&self) -> std::collections::BTreeMap<String, String> {
        std::fs::read_to_string(self.out().join("results"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for g in &mut self.guests {
            let _ = g.child.kill();
            let _ = g.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("VM files kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A capture's packets as `tcpdump -n -r` prints them.
pub fn packets(pcap: &Path) -> Result<Vec<String>> {
    let text = crate::run(Command::new("tcpdump").args(["-n", "-r"]).arg(pcap))?;
    Ok(text.lines().map(str::to_string).collect())
}

/// How often `needle` occurs in a file's raw bytes.
pub fn occurrences(path: &Path, needle: &[u8]) -> usize {
    let bytes = std::fs::read(path).unwrap_or_default();
    bytes.windows(needle.len()).filter(|w| *w == needle).count()
}
