//! Request validation shared by every path into the agent: any text is
//! accepted or refused with a message naming the field, never a panic.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use trellis_plugin_api::validate;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let t = text.as_ref();
    let _ = validate::name("network name", t);
    let _ = validate::service_name(t);
    let _ = validate::subnet(t);
    let _ = validate::ip("ip", t);
    let _ = validate::ifname(t);
    let _ = validate::label_arg(t);
    let _ = validate::selector(t);
    if let Ok((port, proto, target)) = validate::service_port(t) {
        assert!(port > 0 && target > 0 && (proto == "tcp" || proto == "udp"));
    }
    let _ = validate::labels(&BTreeMap::from([(t.to_string(), t.to_string())]));
});
