//! Host-wide kernel settings the agent needs, written through /proc/sys.

/// Kernel limits that are one for the whole host and too small for a
/// thousand endpoints per host, raised (never lowered) when the agent runs
/// in the initial network namespace (elsewhere the files are not writable
/// and the host's settings stand):
/// * the neighbour table (1,024 entries by default, shared by every
///   namespace: each container holds entries for its gateway and peers and
///   the host one per container) — past it ARP fails ("neighbour table
///   overflow");
/// * the per-CPU receive backlog (1,000 packets by default): a broadcast on
///   a bridge is cloned to every port at once, and on a network of a
///   thousand endpoints the clones past the backlog are dropped — ARP to
///   the oldest ports (flooded last) never arrives.
pub const HOST_LIMITS: [(&str, u64); 4] = [
    ("/proc/sys/net/ipv4/neigh/default/gc_thresh1", 1024),
    ("/proc/sys/net/ipv4/neigh/default/gc_thresh2", 8192),
    ("/proc/sys/net/ipv4/neigh/default/gc_thresh3", 16384),
    ("/proc/sys/net/core/netdev_max_backlog", 4096),
];

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
