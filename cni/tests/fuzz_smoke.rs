//! A short fuzzing smoke run of the CNI configuration and environment
//! parsing (stable Rust: a seeded mutator over real inputs): errors are
//! values with well-known codes, never panics.

use std::collections::HashMap;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const SEEDS: &[&str] = &[
    r#"{"cniVersion":"1.1.0","name":"app","type":"trellis","socket":"/run/trellis/trellisd.sock"}"#,
    r#"{"cniVersion":"1.0.0","name":"app","type":"trellis","args":{"cni":{"labels":[{"key":"a","value":"b"}],"ips":["10.1.0.2/24"]}},"runtimeConfig":{"ips":["10.1.0.3"]},"dns":{"nameservers":["10.1.0.1"]}}"#,
    r#"{"cniVersion":"1.1.0","name":"app","type":"trellis","cni.dev/valid-attachments":[{"containerID":"c","ifname":"eth0"}],"prevResult":{"ips":[{"address":"10.1.0.2/24"}]}}"#,
];

const TOKENS: &[&str] =
    &["{", "}", "[", "]", ":", ",", "\"", "null", "1e999", "-0", "\\u0000", "\"ipam\":{\"type\":\"x\"}", "true"];

fn mutate(rng: &mut Rng, seed: &str) -> Vec<u8> {
    let mut v = seed.as_bytes().to_vec();
    for _ in 0..1 + rng.below(6) {
        let i = rng.below(v.len() + 1);
        match rng.below(4) {
            0 if i < v.len() => v[i] = rng.next() as u8,
            1 => v.truncate(i),
            2 => {
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                v.splice(i..i, t.iter().copied());
            }
            _ if i < v.len() => {
                v.remove(i);
            }
            _ => {}
        }
    }
    v
}

#[test]
fn config_and_environment_parsing_survive_mutations() {
    let mut rng = Rng(0x2545f4914f6cdd1d);
    let commands = ["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION", "", "add", "ADD\0"];
    let (mut ok, mut refused) = (0, 0);
    for i in 0..20_000 {
        let mut vars: HashMap<String, String> = HashMap::new();
        vars.insert("CNI_COMMAND".into(), commands[rng.below(commands.len())].into());
        if rng.below(4) != 0 {
            let id: String = (0..rng.below(20)).map(|_| (b' ' + rng.below(95) as u8) as char).collect();
            vars.insert("CNI_CONTAINERID".into(), id);
        }
        if rng.below(4) != 0 {
            vars.insert("CNI_IFNAME".into(), ["eth0", "", "a/b", "x".repeat(20).as_str()][rng.below(4)].into());
        }
        if rng.below(3) != 0 {
            vars.insert("CNI_NETNS".into(), "/run/netns/x".into());
        }
        if rng.below(3) == 0 {
            vars.insert("CNI_ARGS".into(), ["a=b;c=d", "=x", "IP=10.0.0.1", ";;", "x"][rng.below(5)].into());
        }
        let stdin = mutate(&mut rng, SEEDS[i % SEEDS.len()]);
        match trellis_cni::conf::Env::parse(&vars) {
            Err(e) => {
                assert!(e.code == trellis_cni::error::codes::BAD_ENV, "{e:?}");
                refused += 1;
            }
            Ok(env) => match trellis_cni::conf::NetConf::parse(&stdin, &env) {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert!([1, 2, 4, 6, 7].contains(&e.code), "unexpected code {} for {:?}", e.code, e.msg);
                    assert!(!e.msg.is_empty());
                    refused += 1;
                }
            },
        }
    }
    assert!(ok > 100 && refused > 100, "{ok} parsed, {refused} refused");
}
