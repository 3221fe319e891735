//! A short fuzzing smoke run of the Docker protocol bodies and the
//! request validation (stable Rust: a seeded mutator): errors, never panics.

use std::collections::BTreeMap;

use trellis_plugin_api::docker as dp;
use trellis_plugin_api::validate;

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
    r#"{"AddressSpace":"trellis","Pool":"10.99.0.0/24","SubPool":"","Options":{},"V6":false}"#,
    r#"{"PoolID":"trellis-10.99.0.0/24","Address":"","Options":{"RequestAddressType":"com.docker.network.gateway"}}"#,
    r#"{"NetworkID":"n1","Options":{"com.docker.network.generic":{"trellis.attachable":"true"}},"IPv4Data":[{"AddressSpace":"trellis","Gateway":"10.99.0.1/24","Pool":"10.99.0.0/24"}],"IPv6Data":[]}"#,
    r#"{"NetworkID":"n1","EndpointID":"e1","Interface":{"Address":"10.99.0.2/24","AddressIPv6":"","MacAddress":""}}"#,
    r#"{"NetworkID":"n1","EndpointID":"e1","SandboxKey":"/var/run/docker/netns/x","Options":{}}"#,
];

fn mutate(rng: &mut Rng, seed: &str) -> Vec<u8> {
    let mut v = seed.as_bytes().to_vec();
    for _ in 0..1 + rng.below(6) {
        let i = rng.below(v.len() + 1);
        match rng.below(3) {
            0 if i < v.len() => v[i] = rng.next() as u8,
            1 => v.truncate(i),
            _ => {
                let t: &[u8] = [&b"{"[..], b"}", b"\"", b"[", b"null", b"1e400", b"\\ud800"][rng.below(7)];
                v.splice(i..i, t.iter().copied());
            }
        }
    }
    v
}

#[test]
fn docker_bodies_and_validation_survive_mutations() {
    let mut rng = Rng(0xdeadbeefcafef00d);
    let mut parsed = 0;
    for i in 0..20_000 {
        let body = mutate(&mut rng, SEEDS[i % SEEDS.len()]);
        parsed += dp::parse::<dp::RequestPoolRequest>(&body).is_ok() as usize;
        if let Ok(r) = dp::parse::<dp::RequestAddressRequest>(&body) {
            let _ = r.is_gateway();
            parsed += 1;
        }
        if let Ok(c) = dp::parse::<dp::CreateNetworkRequest>(&body) {
            let _ = (c.generic(), c.flag("com.docker.network.internal"));
            parsed += 1;
        }
        parsed += dp::parse::<dp::CreateEndpointRequest>(&body).is_ok() as usize;
        parsed += dp::parse::<dp::JoinRequest>(&body).is_ok() as usize;
        let text = String::from_utf8_lossy(&body);
        let _ = validate::name("network name", &text);
        let _ = validate::subnet(&text);
        let _ = validate::ip("ip", &text);
        let _ = validate::ifname(&text);
        let _ = validate::label_arg(&text);
        let _ = validate::labels(&BTreeMap::from([(text.to_string(), text.to_string())]));
    }
    assert!(parsed > 1000, "{parsed}");
}
