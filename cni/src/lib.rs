//! `trellis-cni`, the CNI 1.1 plugin (also 0.4.0 and 1.0.0): ADD, DEL,
//! CHECK, STATUS, GC and VERSION, each a call to `trellisd` over its socket.
//!
//! * [`conf`]: environment and configuration, parsed and checked (pure).
//! * [`result`]: the ADD result per version (pure).
//! * [`error`]: error results and their codes.
//! * [`ops`]: the operations against the agent.

pub mod conf;
pub mod error;
pub mod ops;
pub mod result;

use std::collections::HashMap;

pub use error::CniError;

/// One invocation: the environment and stdin in, the JSON to print and the
/// exit code out.
pub fn main_with(vars: &HashMap<String, String>, stdin: &[u8]) -> (Option<serde_json::Value>, i32) {
    // The version to answer errors in: the configuration's if readable.
    let version = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(|s| s.as_str()).map(str::to_string))
        .filter(|v| conf::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".to_string());
    let outcome = (|| {
        let env = conf::Env::parse(vars)?;
        if env.command == conf::Command::Version {
            return Ok(Some(conf::version_result(&version)));
        }
        let netconf = conf::NetConf::parse(stdin, &env)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CniError::new(error::codes::IO, format!("starting the runtime: {e}")))?;
        rt.block_on(ops::run(&env, &netconf))
    })();
    match outcome {
        Ok(out) => (out, 0),
        Err(e) => (Some(e.to_json(&version)), 1),
    }
}
