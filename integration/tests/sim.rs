//! trellis-sim at a tiny size: it runs against a real etcd (no root
//! needed) and its report says every sampled agent programmed every
//! change, with figures that are numbers, so the benchmark cannot rot.

use std::process::Command;

#[test]
fn the_simulator_converges_and_reports_every_figure() {
    let out = Command::new(trellis_integration::bin("trellis-sim"))
        .args(["--hosts", "6", "--agents", "2", "--endpoints-per-host", "3", "--changes", "3", "--json"])
        .args(["--resync-ms", "500"])
        .output()
        .expect("running trellis-sim");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "trellis-sim failed:\n{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(r["endpoints"], 18);
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {r}"));
    let p99 = f("every_agent_p99_s");
    assert!(p99.is_finite() && p99 > 0.0 && p99 < 30.0, "{r}");
    assert!(f("every_agent_p50_s") <= p99, "{r}");
    // Each change reaches each agent as at least its endpoint record.
    assert!(f("watch_events_per_change_per_agent") >= 1.0, "{r}");
    // 4 watch-only hosts and 2 agents saw each change.
    assert!(f("watch_events_per_change_cluster") >= 6.0, "{r}");
    assert!(f("memory_bytes_per_remote_endpoint").is_finite(), "{r}");
    assert!(f("etcd_restart_recovery_s").is_finite(), "every agent came back after the restart: {r}");
}
