//! CNI environment and network configuration: the first bytes choose the
//! environment, the rest is the configuration on stdin. Every refusal is a
//! CNI error with a code and a message, never a panic.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;

const COMMANDS: [&str; 7] = ["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION", "add"];
const IFNAMES: [&str; 4] = ["eth0", "", "a/b", "xxxxxxxxxxxxxxxxxxxx"];
const ARGS: [&str; 5] = ["a=b;c=d", "=x", "IP=10.0.0.1", ";;", "x"];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, stdin)) = data.split_first() else { return };
    let mut vars: HashMap<String, String> = HashMap::new();
    vars.insert("CNI_COMMAND".into(), COMMANDS[sel as usize % COMMANDS.len()].into());
    if sel & 0x08 != 0 {
        vars.insert("CNI_CONTAINERID".into(), "c1".into());
    }
    vars.insert("CNI_IFNAME".into(), IFNAMES[(sel as usize >> 4) % IFNAMES.len()].into());
    if sel & 0x40 != 0 {
        vars.insert("CNI_NETNS".into(), "/run/netns/x".into());
    }
    if sel & 0x80 != 0 {
        vars.insert("CNI_ARGS".into(), ARGS[sel as usize % ARGS.len()].into());
    }
    match trellis_cni::conf::Env::parse(&vars) {
        Err(e) => assert!(!e.msg.is_empty()),
        Ok(env) => {
            if let Err(e) = trellis_cni::conf::NetConf::parse(stdin, &env) {
                assert!(e.code > 0 && !e.msg.is_empty(), "{e:?}");
            }
        }
    }
});
