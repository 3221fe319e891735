//! The Docker driver's request bodies: parsed or refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_plugin_api::docker as dp;

fuzz_target!(|body: &[u8]| {
    let _ = dp::parse::<dp::RequestPoolRequest>(body);
    if let Ok(r) = dp::parse::<dp::RequestAddressRequest>(body) {
        let _ = r.is_gateway();
    }
    if let Ok(c) = dp::parse::<dp::CreateNetworkRequest>(body) {
        let _ = (c.generic(), c.flag("com.docker.network.internal"));
    }
    let _ = dp::parse::<dp::CreateEndpointRequest>(body);
    let _ = dp::parse::<dp::JoinRequest>(body);
});
