//! The debugging shell's gated spawn (`attach NETWORK -- CMD`): the child in a
//! new namespace, the pipe it waits on (`g` and the network's resolver), the
//! `__gate` side of that protocol, and the SIGINT handling while CMD runs.

use std::io::Read as _;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ExitCode};

use anyhow::Context;

/// `trellisctl __gate FD -- CMD...`: run as the gate (see [`gate`]) if these
/// are the gate's arguments; `None` for an ordinary command line.
pub fn run_if_gate(args: &[String]) -> Option<ExitCode> {
    if args.len() > 4 && args[1] == "__gate" && args[3] == "--" {
        return Some(match args[2].parse() {
            Ok(fd) => gate(fd, &args[4..]),
            Err(_) => ExitCode::from(125),
        });
    }
    None
}

/// A child in a new netns of its own that waits for a byte on the returned
/// pipe before it runs `cmd`. The child re-executes trellisctl as a small
/// gate (`__gate FD -- CMD`): blocking before exec would block spawn itself.
pub fn spawn_gated(cmd: &[String]) -> anyhow::Result<(Child, OwnedFd)> {
    let (read, write) = nix::unistd::pipe().context("creating a pipe")?;
    let write_raw = write.as_raw_fd();
    let read_raw = read.as_raw_fd();
    let me = std::env::current_exe().context("finding trellisctl's own binary")?;
    let mut command = std::process::Command::new(me);
    command.arg("__gate").arg(read_raw.to_string()).arg("--").args(cmd);
    // SAFETY: only async-signal-safe calls (fcntl, close, unshare) run
    // between fork and exec.
    unsafe {
        command.pre_exec(move || {
            nix::unistd::close(write_raw).ok();
            let fd = std::os::fd::BorrowedFd::borrow_raw(read_raw);
            let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).map_err(std::io::Error::from)?;
            let flags = nix::fcntl::FdFlag::from_bits_truncate(flags) - nix::fcntl::FdFlag::FD_CLOEXEC;
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(flags)).map_err(std::io::Error::from)?;
            // Its own network namespace, and its own mount namespace for
            // the network's resolv.conf.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET | nix::sched::CloneFlags::CLONE_NEWNS)
                .map_err(std::io::Error::from)
        });
    }
    let child = command.spawn().with_context(|| format!("starting {:?}", cmd[0]))?;
    drop(read);
    Ok((child, write))
}

/// Open the gate: ignore SIGINT from now on, then send the go message (`g`
/// and the network's resolver, which may be empty) and close the pipe.
pub fn open(gate: OwnedFd, resolver: &str) -> anyhow::Result<()> {
    // Let Ctrl-C reach the command, not us: we must detach after it.
    // SAFETY: SigIgn installs no handler of ours (nothing can run in
    // signal context); the only other signal code is tokio's, which
    // does not handle SIGINT in this process.
    let _ = unsafe { nix::sys::signal::signal(nix::sys::signal::Signal::SIGINT, nix::sys::signal::SigHandler::SigIgn) };
    nix::unistd::write(&gate, format!("g{resolver}").as_bytes()).context("starting the command")?;
    drop(gate);
    Ok(())
}

/// Wait (off the runtime) for the gated command to end; its exit code, or
/// 128 + the signal that ended it.
pub async fn wait(mut child: Child) -> anyhow::Result<ExitCode> {
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok(ExitCode::from(code as u8))
}

/// The gate: wait for the go message on `fd` (`g` and the network's
/// resolver, if any), point /etc/resolv.conf at the resolver in this
/// process's own mount namespace, then become `cmd`.
fn gate(fd: i32, cmd: &[String]) -> ExitCode {
    use std::os::fd::FromRawFd;
    // SAFETY: the fd was handed to this process by its parent for this use.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut msg = Vec::new();
    if f.read_to_end(&mut msg).is_err() || msg.first() != Some(&b'g') {
        eprintln!("trellisctl: the network was not set up; not running {:?}", cmd.join(" "));
        return ExitCode::from(125);
    }
    drop(f);
    let resolver = String::from_utf8_lossy(&msg[1..]).trim().to_string();
    if !resolver.is_empty()
        && let Err(e) = use_resolver(&resolver)
    {
        eprintln!(
            "trellisctl: cannot point /etc/resolv.conf at {resolver} ({e}); names of the network may not resolve"
        );
    }
    let err = std::process::Command::new(&cmd[0]).args(&cmd[1..]).exec();
    eprintln!("trellisctl: running {:?}: {err}", cmd[0]);
    ExitCode::from(127)
}

/// Bind a resolv.conf naming `resolver` over /etc/resolv.conf, in the
/// gate's private mount namespace (the host's stays as it is).
fn use_resolver(resolver: &str) -> anyhow::Result<()> {
    use nix::mount::{MsFlags, mount};
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .context("making mounts private")?;
    let file = std::env::temp_dir().join(format!("trellis-resolv-{}", std::process::id()));
    std::fs::write(&file, format!("# written by trellisctl attach\nnameserver {resolver}\n"))?;
    let bound = mount(Some(&file), "/etc/resolv.conf", None::<&str>, MsFlags::MS_BIND, None::<&str>);
    let _ = std::fs::remove_file(&file);
    bound.context("bind-mounting resolv.conf")?;
    Ok(())
}
