//! Compiles the datapath programs (`bpf/*.bpf.c`, with their headers in
//! `bpf/lib/` and `include/`) with clang-19.

use std::path::PathBuf;
use std::process::Command;

/// The programs under `bpf/`, by file stem.
const PROGRAMS: &[&str] = &["endpoint"];

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    // The programs include one header per feature from bpf/lib (a change
    // to any of them must rebuild the object).
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-changed=bpf/lib");
    println!("cargo:rerun-if-changed=include");
    // The maps' layouts (names, kinds, keys and values): an agent finding
    // pins of another layout starts the datapath afresh.
    let mut layout: u64 = 0xcbf2_9ce4_8422_2325;
    for f in ["include/trellis.h", "bpf/lib/maps.h"] {
        let bytes = std::fs::read(f).unwrap_or_else(|e| panic!("reading {f}: {e}"));
        for b in bytes {
            layout ^= u64::from(b);
            layout = layout.wrapping_mul(0x0100_0000_01b3);
        }
    }
    println!("cargo:rustc-env=TRELLIS_MAP_LAYOUT={layout:016x}");
    let clang = std::env::var("TRELLIS_CLANG").unwrap_or_else(|_| "clang-19".into());
    for prog in PROGRAMS {
        let src = format!("bpf/{prog}.bpf.c");
        let obj = out.join(format!("{prog}.bpf.o"));
        let result = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86", "-Wall", "-Werror"])
            .args(["-I", "include", "-I", "/usr/include/x86_64-linux-gnu"])
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .output();
        match result {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!("compiling {src} with {clang} failed:\n{}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => panic!(
                "running {clang} to compile {src}: {e}\n(the eBPF datapath needs clang-19 and libbpf-dev: \
                 `apt-get install -y clang-19 libbpf-dev`, or run scripts/setup.sh)"
            ),
        }
    }
}
