//! The eBPF program's flow and drop events: its ring buffer read, while
//! the agent runs, into a broadcast channel (the monitor's subscribers).

use tokio::io::unix::AsyncFd;
use tokio::sync::broadcast;
use trellis_ebpf::FlowEvent;

/// Read the ring buffer until the agent stops; every event goes to the
/// subscribers of `tx` (none: it is dropped, the datapath never waits).
pub async fn read_events(ring: aya::maps::RingBuf<aya::maps::MapData>, tx: broadcast::Sender<FlowEvent>) {
    // SAFETY: the ring buffer owns its map's file descriptor and keeps it
    // open, the same one, for as long as it lives — inside the AsyncFd.
    let registered = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "monitor events unavailable");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %e, "monitor events stopped");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if let Some(ev) = FlowEvent::from_bytes(&item) {
                let _ = tx.send(ev);
            }
        }
        guard.clear_ready();
    }
}
