//! What the runtime hands the plugin: the environment and the network
//! configuration on stdin, parsed and checked without side effects.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{CniError, codes};

/// The CNI versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];

/// The agent socket when the configuration names none.
pub const DEFAULT_SOCKET: &str = "/run/trellis/trellisd.sock";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Result<Command, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            "" => return Err(CniError::new(codes::BAD_ENV, "CNI_COMMAND is not set")),
            other => {
                return Err(CniError::new(
                    codes::BAD_ENV,
                    format!("CNI_COMMAND={other:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"),
                ));
            }
        })
    }
}

/// The environment of one invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs.
    pub args: BTreeMap<String, String>,
}

fn valid_container_id(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

impl Env {
    /// Parse the `CNI_*` variables; what the command requires must be set
    /// and well formed (error 4 names the variable otherwise).
    pub fn parse(vars: &HashMap<String, String>) -> Result<Env, CniError> {
        let get = |k: &str| vars.get(k).map(String::as_str).unwrap_or("");
        let command = Command::parse(get("CNI_COMMAND"))?;
        let per_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let mut missing = Vec::new();
        let container_id = get("CNI_CONTAINERID").to_string();
        let ifname = get("CNI_IFNAME").to_string();
        let netns = get("CNI_NETNS");
        if per_container {
            if container_id.is_empty() {
                missing.push("CNI_CONTAINERID");
            }
            if ifname.is_empty() {
                missing.push("CNI_IFNAME");
            }
            if netns.is_empty() && command != Command::Del {
                missing.push("CNI_NETNS");
            }
        }
        if !missing.is_empty() {
            return Err(CniError::new(
                codes::BAD_ENV,
                format!("required environment variables missing: {}", missing.join(", ")),
            ));
        }
        if per_container {
            if !valid_container_id(&container_id) {
                return Err(CniError::new(
                    codes::BAD_ENV,
                    format!(
                        "CNI_CONTAINERID={container_id:?} is invalid: it must start with a letter or digit, then letters, digits, '_', '.' or '-'"
                    ),
                ));
            }
            if !valid_ifname(&ifname) {
                return Err(CniError::new(
                    codes::BAD_ENV,
                    format!(
                        "CNI_IFNAME={ifname:?} cannot be used: an interface name is 1-15 characters without '/', ':' or spaces"
                    ),
                ));
            }
        }
        let args = parse_args(get("CNI_ARGS"))?;
        Ok(Env { command, container_id, netns: (!netns.is_empty()).then(|| PathBuf::from(netns)), ifname, args })
    }
}

/// `K=V;K2=V2` (empty parts ignored).
pub fn parse_args(s: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for part in s.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(CniError::new(codes::BAD_ENV, format!("CNI_ARGS: {part:?} is not KEY=VALUE")));
        };
        if k.is_empty() {
            return Err(CniError::new(codes::BAD_ENV, format!("CNI_ARGS: {part:?} has an empty key")));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty() && self.domain.is_empty() && self.search.is_empty() && self.options.is_empty()
    }
}

/// One `{containerID, ifname}` of GC's valid list.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The network configuration of a `"type": "trellis"` plugin.
#[derive(Clone, Debug)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    /// The Trellis network (default: `name`).
    pub network: String,
    pub socket: PathBuf,
    pub labels: BTreeMap<String, String>,
    /// The address asked for (`ips` capability, `args.cni.ips`, `CNI_ARGS IP=`).
    pub ip: Option<String>,
    pub dns: Dns,
    pub prev_result: Option<Value>,
    pub valid_attachments: Option<Vec<Attachment>>,
    /// Host ports to publish (the `portMappings` capability, as containerd,
    /// Podman and Kubernetes' hostPort send it).
    pub port_mappings: Vec<PortMapping>,
}

/// One `runtimeConfig.portMappings` entry.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortMapping {
    #[serde(default)]
    pub host_port: u16,
    pub container_port: u16,
    #[serde(default)]
    pub protocol: String,
    #[serde(default, rename = "hostIP")]
    pub host_ip: String,
}

fn field<'a>(obj: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn bad_conf(msg: impl Into<String>) -> CniError {
    CniError::new(codes::BAD_CONFIG, msg)
}

fn string_field(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<String>, CniError> {
    match field(obj, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(bad_conf(format!("{key} must be a string, not {other}"))),
    }
}

/// An address, `IP` or `IP/PREFIX`, without its prefix.
fn address(key: &str, s: &str) -> Result<String, CniError> {
    trellis_plugin_api::validate::address("ip", s).map(|ip| ip.to_string()).map_err(|e| bad_conf(format!("{key}: {e}")))
}

/// The first address of a list of CIDRs or plain addresses, without its prefix.
fn first_ip(key: &str, v: &Value) -> Result<Option<String>, CniError> {
    let Value::Array(items) = v else { return Err(bad_conf(format!("{key} must be a list of addresses"))) };
    match items.as_slice() {
        [] => Ok(None),
        [Value::String(s)] => Ok(Some(address(key, s)?)),
        [_] => Err(bad_conf(format!("{key} must be a list of addresses"))),
        _ => Err(CniError::new(
            codes::UNSUPPORTED_FIELD,
            format!("unsupported config field {key}={v}: an endpoint has one IPv4 address"),
        )),
    }
}

impl NetConf {
    /// Parse the configuration for `env` (stdin bytes): the version must be
    /// one this plugin speaks, the fields it reads must be well formed, and
    /// fields it cannot honour are refused by name (error 2).
    pub fn parse(bytes: &[u8], env: &Env) -> Result<NetConf, CniError> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| CniError::new(codes::DECODE, format!("the network configuration is not valid JSON: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(CniError::new(codes::DECODE, "the network configuration must be a JSON object"));
        };
        let cni_version = string_field(&obj, "cniVersion")?.unwrap_or_default();
        negotiate(&cni_version)?;
        if matches!(env.command, Command::Status | Command::Gc) && version_lt(&cni_version, "1.1.0") {
            return Err(CniError::new(
                codes::INCOMPATIBLE_VERSION,
                format!("{:?} needs cniVersion 1.1.0 or later, the configuration says {cni_version}", env.command),
            ));
        }
        let name = string_field(&obj, "name")?.unwrap_or_default();
        if name.is_empty() && env.command != Command::Version {
            return Err(bad_conf("the network configuration has no name"));
        }
        if let Some(t) = string_field(&obj, "type")?
            && t != "trellis"
            && env.command != Command::Version
        {
            return Err(bad_conf(format!("type is {t:?}: this plugin is \"trellis\"")));
        }
        if let Some(ipam) = field(&obj, "ipam")
            && ipam.as_object().is_some_and(|o| !o.is_empty())
        {
            return Err(CniError::new(
                codes::UNSUPPORTED_FIELD,
                format!(
                    "unsupported config field ipam={ipam}: Trellis allocates addresses from its cluster-wide IPAM; remove the ipam section"
                ),
            ));
        }
        let network = string_field(&obj, "network")?.unwrap_or_else(|| name.clone());
        let socket = string_field(&obj, "socket")?.map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
        let mut labels = BTreeMap::new();
        if let Some(l) = field(&obj, "labels") {
            let m: BTreeMap<String, String> = serde_json::from_value(l.clone())
                .map_err(|e| bad_conf(format!("labels must map strings to strings: {e}")))?;
            labels.extend(m);
        }
        let mut ip = None;
        // CONVENTIONS.md: args.cni.labels and args.cni.ips.
        if let Some(cni) = field(&obj, "args").and_then(|a| a.get("cni")).filter(|v| !v.is_null()) {
            if let Some(l) = cni.get("labels").filter(|v| !v.is_null()) {
                #[derive(Deserialize)]
                struct Label {
                    key: String,
                    value: String,
                }
                let list: Vec<Label> = serde_json::from_value(l.clone())
                    .map_err(|e| bad_conf(format!("args.cni.labels must be a list of {{key, value}}: {e}")))?;
                labels.extend(list.into_iter().map(|l| (l.key, l.value)));
            }
            if let Some(ips) = cni.get("ips").filter(|v| !v.is_null()) {
                ip = first_ip("args.cni.ips", ips)?;
            }
        }
        if let Some(ips) = field(&obj, "runtimeConfig").and_then(|r| r.get("ips")).filter(|v| !v.is_null()) {
            ip = first_ip("runtimeConfig.ips", ips)?.or(ip);
        }
        if let Some(a) = env.args.get("IP") {
            ip = Some(address("CNI_ARGS IP", a)?);
        }
        let port_mappings: Vec<PortMapping> = match field(&obj, "runtimeConfig")
            .and_then(|r| r.get("portMappings"))
            .filter(|v| !v.is_null())
        {
            None => Vec::new(),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
                bad_conf(format!(
                    "runtimeConfig.portMappings must be a list of {{hostPort, containerPort, protocol, hostIP}}: {e}"
                ))
            })?,
        };
        let dns = match field(&obj, "dns") {
            Some(d) => serde_json::from_value(d.clone()).map_err(|e| bad_conf(format!("dns is malformed: {e}")))?,
            None => Dns::default(),
        };
        let prev_result = field(&obj, "prevResult").cloned();
        // libnetwork spells the GC list both ways (cni#1101).
        let valid = field(&obj, "cni.dev/valid-attachments").or_else(|| field(&obj, "cni.dev/attachments"));
        let valid_attachments = match valid {
            Some(v) => Some(
                serde_json::from_value(v.clone())
                    .map_err(|e| bad_conf(format!("cni.dev/valid-attachments is malformed: {e}")))?,
            ),
            None => None,
        };
        if env.command == Command::Gc && valid_attachments.is_none() {
            return Err(bad_conf("GC without cni.dev/valid-attachments"));
        }
        Ok(NetConf {
            cni_version,
            name,
            network,
            socket,
            labels,
            ip,
            dns,
            prev_result,
            valid_attachments,
            port_mappings,
        })
    }
}

fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let t = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(t)
}

fn version_lt(a: &str, b: &str) -> bool {
    parse_version(a) < parse_version(b)
}

/// The configuration's version must be one this plugin speaks (error 1).
pub fn negotiate(version: &str) -> Result<(), CniError> {
    if version.is_empty() {
        return Err(CniError::new(codes::BAD_CONFIG, "the network configuration has no cniVersion"));
    }
    if SUPPORTED_VERSIONS.contains(&version) {
        Ok(())
    } else {
        Err(CniError::new(
            codes::INCOMPATIBLE_VERSION,
            format!("incompatible CNI version {version}: this plugin supports {}", SUPPORTED_VERSIONS.join(", ")),
        ))
    }
}

/// The answer to VERSION.
pub fn version_result(requested: &str) -> Value {
    let v = if SUPPORTED_VERSIONS.contains(&requested) { requested } else { "1.1.0" };
    serde_json::json!({ "cniVersion": v, "supportedVersions": SUPPORTED_VERSIONS })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(cmd: &str) -> HashMap<String, String> {
        [
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn add_env() -> Env {
        Env::parse(&env("ADD")).unwrap()
    }

    #[test]
    fn env_requires_what_each_command_needs() {
        let e = add_env();
        assert_eq!((e.command, e.container_id.as_str(), e.ifname.as_str()), (Command::Add, "abc123", "eth0"));
        let mut v = env("ADD");
        v.remove("CNI_NETNS");
        v.remove("CNI_IFNAME");
        let err = Env::parse(&v).unwrap_err();
        assert_eq!(err.code, codes::BAD_ENV);
        assert!(err.msg.contains("CNI_IFNAME") && err.msg.contains("CNI_NETNS"), "{}", err.msg);
        // DEL tolerates a missing netns; STATUS needs none of them.
        let mut v = env("DEL");
        v.remove("CNI_NETNS");
        assert_eq!(Env::parse(&v).unwrap().netns, None);
        let v: HashMap<String, String> = [("CNI_COMMAND".to_string(), "STATUS".to_string())].into();
        assert_eq!(Env::parse(&v).unwrap().command, Command::Status);
    }

    #[test]
    fn env_rejects_bad_values_by_name() {
        for (k, v, needle) in [
            ("CNI_COMMAND", "FROB", "CNI_COMMAND"),
            ("CNI_CONTAINERID", "-abc", "CNI_CONTAINERID"),
            ("CNI_CONTAINERID", "a b", "CNI_CONTAINERID"),
            ("CNI_IFNAME", "averyveryverylongname", "CNI_IFNAME"),
            ("CNI_IFNAME", "et/h0", "CNI_IFNAME"),
            ("CNI_ARGS", "IP", "CNI_ARGS"),
        ] {
            let mut e = env("ADD");
            e.insert(k.into(), v.into());
            let err = Env::parse(&e).unwrap_err();
            assert_eq!(err.code, codes::BAD_ENV, "{k}={v}");
            assert!(err.msg.contains(needle), "{k}={v}: {}", err.msg);
        }
        let mut e = env("ADD");
        e.insert("CNI_ARGS".into(), "IgnoreUnknown=1;K8S_POD_NAME=web-0;;IP=10.1.0.9".into());
        let parsed = Env::parse(&e).unwrap();
        assert_eq!(parsed.args.get("K8S_POD_NAME").map(String::as_str), Some("web-0"));
        assert_eq!(parsed.args.len(), 3);
    }

    #[test]
    fn versions_are_negotiated() {
        for v in SUPPORTED_VERSIONS {
            let c = NetConf::parse(
                format!(r#"{{"cniVersion":"{v}","name":"app","type":"trellis"}}"#).as_bytes(),
                &add_env(),
            )
            .unwrap();
            assert_eq!(c.cni_version, *v);
        }
        for v in ["0.2.0", "0.3.1", "2.0.0", "banana"] {
            let err = NetConf::parse(
                format!(r#"{{"cniVersion":"{v}","name":"app","type":"trellis"}}"#).as_bytes(),
                &add_env(),
            )
            .unwrap_err();
            assert_eq!(err.code, codes::INCOMPATIBLE_VERSION, "{v}");
        }
        let status = Env::parse(&[("CNI_COMMAND".to_string(), "STATUS".to_string())].into()).unwrap();
        let err = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"app","type":"trellis"}"#, &status).unwrap_err();
        assert_eq!(err.code, codes::INCOMPATIBLE_VERSION, "STATUS is a 1.1 operation");
        let v = version_result("1.0.0");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["supportedVersions"], serde_json::json!(["0.4.0", "1.0.0", "1.1.0"]));
    }

    #[test]
    fn port_mappings_are_read_as_runtimes_send_them() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"app","type":"trellis","runtimeConfig":{"portMappings":[
                {"hostPort":18080,"containerPort":80,"protocol":"tcp"},
                {"hostPort":5353,"containerPort":53,"protocol":"udp","hostIP":"127.0.0.1"},
                {"containerPort":9000}]}}"#,
            &add_env(),
        )
        .unwrap();
        assert_eq!(
            c.port_mappings,
            vec![
                PortMapping { host_port: 18080, container_port: 80, protocol: "tcp".into(), host_ip: String::new() },
                PortMapping {
                    host_port: 5353,
                    container_port: 53,
                    protocol: "udp".into(),
                    host_ip: "127.0.0.1".into()
                },
                PortMapping { host_port: 0, container_port: 9000, protocol: String::new(), host_ip: String::new() },
            ]
        );
        let none = NetConf::parse(br#"{"cniVersion":"1.1.0","name":"app","type":"trellis"}"#, &add_env()).unwrap();
        assert!(none.port_mappings.is_empty());
        for bad in [
            r#"{"portMappings":[{"hostPort":70000,"containerPort":80}]}"#,
            r#"{"portMappings":[{"hostPort":80}]}"#,
            r#"{"portMappings":[{"hostPort":80,"containerPort":80,"hostPorts":1}]}"#,
            r#"{"portMappings":{"hostPort":80}}"#,
        ] {
            let conf = format!(r#"{{"cniVersion":"1.1.0","name":"app","type":"trellis","runtimeConfig":{bad}}}"#);
            let err = NetConf::parse(conf.as_bytes(), &add_env()).unwrap_err();
            assert_eq!(err.code, codes::BAD_CONFIG, "{bad}");
            assert!(err.msg.contains("runtimeConfig.portMappings"), "{bad}: {}", err.msg);
        }
    }

    #[test]
    fn config_fields_are_read_and_checked() {
        let mut e = env("ADD");
        e.insert("CNI_ARGS".into(), "IP=10.1.0.9/24".into());
        let env = Env::parse(&e).unwrap();
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"app-conf","type":"trellis","network":"app","socket":"/tmp/t.sock",
                "labels":{"a":"1"},"args":{"cni":{"labels":[{"key":"trellis.service","value":"web"}]}},
                "dns":{"nameservers":["10.1.0.1"]},"somethingElse":{"x":1}}"#,
            &env,
        )
        .unwrap();
        assert_eq!(c.network, "app");
        assert_eq!(c.socket, PathBuf::from("/tmp/t.sock"));
        assert_eq!(c.labels.get("trellis.service").map(String::as_str), Some("web"));
        assert_eq!(c.labels.get("a").map(String::as_str), Some("1"));
        assert_eq!(c.ip.as_deref(), Some("10.1.0.9"), "CNI_ARGS IP wins");
        assert_eq!(c.dns.nameservers, vec!["10.1.0.1"]);
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"app","type":"trellis","runtimeConfig":{"ips":["10.1.0.7/24"]}}"#,
            &add_env(),
        )
        .unwrap();
        assert_eq!((c.network.as_str(), c.ip.as_deref()), ("app", Some("10.1.0.7")));
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));

        for (conf, code, needle) in [
            (&b"{"[..], codes::DECODE, "JSON"),
            (br#"[1]"#, codes::DECODE, "object"),
            (br#"{"cniVersion":"1.1.0","type":"trellis"}"#, codes::BAD_CONFIG, "name"),
            (br#"{"cniVersion":"1.1.0","name":"a","type":"bridge"}"#, codes::BAD_CONFIG, "bridge"),
            (br#"{"name":"a","type":"trellis"}"#, codes::BAD_CONFIG, "cniVersion"),
            (br#"{"cniVersion":"1.1.0","name":"a","type":"trellis","ipam":{"type":"host-local"}}"#, codes::UNSUPPORTED_FIELD, "ipam"),
            (br#"{"cniVersion":"1.1.0","name":"a","type":"trellis","labels":{"a":1}}"#, codes::BAD_CONFIG, "labels"),
            (
                br#"{"cniVersion":"1.1.0","name":"a","type":"trellis","runtimeConfig":{"ips":["10.0.0.1/24","10.0.0.2/24"]}}"#,
                codes::UNSUPPORTED_FIELD,
                "runtimeConfig.ips",
            ),
        ] {
            let err = NetConf::parse(conf, &add_env()).unwrap_err();
            assert_eq!(err.code, code, "{}", String::from_utf8_lossy(conf));
            assert!(err.msg.contains(needle), "{}: {}", String::from_utf8_lossy(conf), err.msg);
        }
    }

    #[test]
    fn gc_reads_both_spellings_of_the_valid_list() {
        let gc = Env::parse(&[("CNI_COMMAND".to_string(), "GC".to_string())].into()).unwrap();
        for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
            let conf = format!(
                r#"{{"cniVersion":"1.1.0","name":"app","type":"trellis","{key}":[{{"containerID":"c1","ifname":"eth0"}}]}}"#
            );
            let c = NetConf::parse(conf.as_bytes(), &gc).unwrap();
            assert_eq!(
                c.valid_attachments,
                Some(vec![Attachment { container_id: "c1".into(), ifname: "eth0".into() }])
            );
        }
        let err = NetConf::parse(br#"{"cniVersion":"1.1.0","name":"app","type":"trellis"}"#, &gc).unwrap_err();
        assert_eq!(err.code, codes::BAD_CONFIG);
    }
}
