//! Network namespaces: entering one on a dedicated thread (setns changes
//! only the calling thread, never a tokio worker's), creating and removing
//! the named ones the agent manages.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

use crate::dataplane::DataplaneError;

fn io_err(call: &'static str, object: &Path, e: impl Into<io::Error>) -> DataplaneError {
    DataplaneError::Io { call, object: object.display().to_string(), source: e.into() }
}

/// Open a netns file, telling a missing one apart, and refusing anything
/// that is not a network namespace.
pub fn open(path: &Path) -> Result<File, DataplaneError> {
    let f = File::open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            DataplaneError::NetnsGone(path.to_path_buf())
        } else {
            io_err("open netns", path, e)
        }
    })?;
    check(path, &f)?;
    Ok(f)
}

/// Is the open file `f` (at `path`) a network namespace? A namespace file
/// is on nsfs; anything else (a plain file, a directory) would only fail
/// later, deep in the kernel, with "Invalid argument".
fn check(path: &Path, f: &File) -> Result<(), DataplaneError> {
    use std::os::fd::AsRawFd;
    let not = |what: &str, hint: &str| {
        Err(DataplaneError::NotNetns { path: path.to_path_buf(), what: what.into(), hint: hint.into() })
    };
    let name_one = "give a network namespace's file: /run/netns/NAME (ip netns add) or /proc/PID/ns/net";
    let fs = nix::sys::statfs::fstatfs(f).map_err(|e| io_err("statfs netns", path, e))?;
    if fs.filesystem_type() == nix::sys::statfs::NSFS_MAGIC {
        // A namespace: its kind shows in the link of its descriptor
        // ("net:[4026531840]"); if that cannot be read, setns will tell.
        let Ok(link) = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())) else { return Ok(()) };
        let link = link.to_string_lossy().into_owned();
        return match link.split_once(':') {
            None | Some(("net", _)) => Ok(()),
            Some((kind, _)) => not(&format!("a {kind} namespace"), name_one),
        };
    }
    let meta = f.metadata().map_err(|e| io_err("stat netns", path, e))?;
    if meta.is_dir() {
        not("a directory", name_one)
    } else if meta.is_file() {
        // What a namespace pinned by a bind mount (ip netns add) looks like
        // from a mount namespace the mount did not propagate to.
        not(
            "a plain file",
            "a namespace pinned with `ip netns add` is a bind mount, seen only where the mount propagates; \
             if trellisd runs in a container, share /run/netns with it (bind mount with rshared propagation, \
             e.g. -v /run/netns:/run/netns:rshared)",
        )
    } else {
        not("a special file", name_one)
    }
}

/// Run `f` on a new thread inside the netns at `path`.
pub fn run_in<T, F>(path: &Path, f: F) -> Result<T, DataplaneError>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let ns = open(path)?;
    let owned: PathBuf = path.to_path_buf();
    let worker = std::thread::Builder::new()
        .name("trellis-netns".into())
        .spawn(move || -> Result<T, DataplaneError> {
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| io_err("setns", &owned, e))?;
            f().map_err(|e| io_err("netns operation", &owned, e))
        })
        .map_err(|e| io_err("spawn netns thread", path, e))?;
    worker.join().map_err(|_| io_err("netns thread", path, io::Error::other("panicked")))?
}

/// A netlink handle whose socket lives in the netns at `path`. The
/// connection task runs on the current tokio runtime.
pub fn handle_in(path: &Path) -> Result<rtnetlink::Handle, DataplaneError> {
    let rt = tokio::runtime::Handle::current();
    let (conn, handle) = run_in(path, move || {
        let _enter = rt.enter();
        let (conn, handle, _) = rtnetlink::new_connection()?;
        Ok((conn, handle))
    })?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Create a new, empty network namespace pinned at `path` (a bind mount of
/// the namespace onto a new file, as `ip netns add` does).
pub fn create(path: &Path) -> Result<(), DataplaneError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_err("create netns dir", dir, e))?;
    }
    File::create(path).map_err(|e| io_err("create netns file", path, e))?;
    let target = path.to_path_buf();
    let result = std::thread::Builder::new()
        .name("trellis-netns-new".into())
        .spawn(move || -> Result<(), DataplaneError> {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|e| io_err("unshare", &target, e))?;
            let tid = nix::unistd::gettid();
            let src = format!("/proc/self/task/{tid}/ns/net");
            nix::mount::mount(Some(src.as_str()), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .map_err(|e| io_err("bind-mount netns", &target, e))
        })
        .map_err(|e| io_err("spawn netns thread", path, e))?
        .join()
        .map_err(|_| io_err("netns thread", path, io::Error::other("panicked")))?;
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Remove a namespace created by [`create`]. A missing one is not an error.
pub fn remove(path: &Path) -> Result<(), DataplaneError> {
    match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) | Err(nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(io_err("umount netns", path, e)),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove netns file", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_network_namespaces_open() {
        assert!(open(Path::new("/proc/self/ns/net")).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"").unwrap();
        let cases = [
            (plain.as_path(), "a plain file", "share /run/netns with it (bind mount with rshared propagation"),
            (dir.path(), "a directory", "/proc/PID/ns/net"),
            (Path::new("/proc/self/ns/mnt"), "a mnt namespace", "/run/netns/NAME"),
            (Path::new("/dev/null"), "a special file", "/run/netns/NAME"),
        ];
        for (path, what, hint) in cases {
            let err = open(path).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{} is not a network namespace ({what}): ", path.display())), "{err}");
            assert!(err.contains(hint), "{err}");
        }
        assert!(matches!(open(&dir.path().join("none")), Err(DataplaneError::NetnsGone(_))));
    }
}
