//! The CNI plugin binary: environment and stdin in, result or error on
//! stdout (the message also on stderr), exit code 0 on success.

use std::io::{Read, Write};

fn main() {
    let vars = std::env::vars().collect();
    let mut stdin = Vec::new();
    let (out, code) = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => trellis_cni::main_with(&vars, &stdin),
        Err(e) => (
            Some(
                trellis_cni::CniError::new(trellis_cni::error::codes::IO, format!("reading stdin: {e}"))
                    .to_json("1.1.0"),
            ),
            1,
        ),
    };
    if let Some(v) = &out {
        if code != 0 {
            eprintln!("trellis-cni: {}", v.get("msg").and_then(|m| m.as_str()).unwrap_or("failed"));
        }
        let mut stdout = std::io::stdout().lock();
        let _ = serde_json::to_writer(&mut stdout, v);
        let _ = stdout.write_all(b"\n");
    }
    std::process::exit(code);
}
