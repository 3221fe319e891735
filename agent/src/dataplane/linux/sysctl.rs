//! Host-wide kernel settings the agent needs, written through /proc/sys.

use crate::dataplane::HOST_LIMITS;

/// Raise each of [`HOST_LIMITS`] that is lower here (never lower one).
pub fn raise_host_limits() {
    for (path, want) in HOST_LIMITS {
        let Ok(now) = std::fs::read_to_string(path) else { continue };
        let now: u64 = now.trim().parse().unwrap_or(0);
        if now >= want {
            continue;
        }
        match std::fs::write(path, want.to_string()) {
            Ok(()) => tracing::info!(sysctl = path, from = now, to = want, "raised a host limit"),
            Err(e) => tracing::debug!(sysctl = path, error = %e, "cannot raise a host limit here"),
        }
    }
}
