//! Validation of user input, shared by every path into the agent (CLI,
//! Docker, CNI). Pure functions; each error names the field and the value.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("invalid {field} {value:?}: {reason}")]
    Invalid { field: &'static str, value: String, reason: String },
}

fn invalid(field: &'static str, value: &str, reason: impl Into<String>) -> ValidationError {
    ValidationError::Invalid { field, value: value.to_string(), reason: reason.into() }
}

pub type Result<T> = std::result::Result<T, ValidationError>;

/// Smallest and largest MTU accepted for a network.
pub const MTU_RANGE: std::ops::RangeInclusive<u32> = 576..=9216;

/// A name of a network or endpoint: 1–63 characters, letters, digits,
/// `_`, `.` and `-`, starting with a letter or digit. Names are also DNS
/// labels later, so they are kept short and plain.
pub fn name(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(invalid(field, value, "must not be empty"));
    }
    if value.len() > 63 {
        return Err(invalid(field, value, "must be at most 63 characters"));
    }
    let mut chars = value.chars();
    let first = chars.next().expect("not empty");
    if !first.is_ascii_alphanumeric() {
        return Err(invalid(field, value, "must start with a letter or digit"));
    }
    if let Some(c) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))) {
        return Err(invalid(field, value, format!("character {c:?} is not allowed (letters, digits, '_', '.', '-')")));
    }
    Ok(())
}

/// A service name: a name without dots (`NAME.NETWORK` is its qualified
/// DNS name, `tasks.NAME` its backends').
pub fn service_name(value: &str) -> Result<()> {
    name("service name", value)?;
    if value.contains('.') {
        return Err(invalid("service name", value, "must not contain '.' (it is a DNS label)"));
    }
    if value.eq_ignore_ascii_case("tasks") {
        return Err(invalid("service name", value, "\"tasks\" is reserved (tasks.NAME lists a service's backends)"));
    }
    Ok(())
}

/// A published port, `PORT[/tcp|/udp][:TARGET]`: the port clients use, the
/// protocol (tcp by default) and the port the backends listen on (the same
/// by default). Returns (port, protocol, target).
pub fn service_port(value: &str) -> Result<(u16, &'static str, u16)> {
    let (front, target) = match value.split_once(':') {
        Some((f, t)) => (f, Some(t)),
        None => (value, None),
    };
    let (port, proto) = match front.split_once('/') {
        Some((p, proto)) => (p, proto),
        None => (front, "tcp"),
    };
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => "tcp",
        "udp" => "udp",
        other => return Err(invalid("port", value, format!("protocol {other:?}: expected tcp or udp"))),
    };
    let number = |s: &str| -> Result<u16> {
        match s.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => {
                Err(invalid("port", value, format!("{s:?} is not a port (1-65535); expected PORT[/tcp|/udp][:TARGET]")))
            }
        }
    };
    let port = number(port)?;
    let target = match target {
        Some(t) => number(t)?,
        None => port,
    };
    Ok((port, proto, target))
}

/// A `--publish` value `HOSTPORT:PORT[/tcp|/udp]` or `PORT[/tcp|/udp]`
/// (host port 0: the agent picks one): (host port, service port, protocol).
pub fn mesh_publish(value: &str) -> Result<(u16, u16, &'static str)> {
    let (ports, proto) = match value.split_once('/') {
        Some((p, proto)) => (p, proto),
        None => (value, "tcp"),
    };
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => "tcp",
        "udp" => "udp",
        other => return Err(invalid("publish", value, format!("protocol {other:?}: expected tcp or udp"))),
    };
    let number = |s: &str| -> Result<u16> {
        match s.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(invalid(
                "publish",
                value,
                format!("{s:?} is not a port (1-65535); expected HOSTPORT:PORT[/tcp|/udp] or PORT[/tcp|/udp]"),
            )),
        }
    };
    match ports.split_once(':') {
        Some((host, port)) => Ok((number(host)?, number(port)?, proto)),
        None => Ok((0, number(ports)?, proto)),
    }
}

/// A `--publish-rm` value `HOSTPORT[/tcp|/udp]`: (host port, protocol).
pub fn mesh_unpublish(value: &str) -> Result<(u16, &'static str)> {
    match mesh_publish(value)? {
        (0, port, proto) => Ok((port, proto)),
        _ => Err(invalid("publish-rm", value, "expected the published host port: HOSTPORT[/tcp|/udp]")),
    }
}

/// A selector term `KEY=VALUE` (a label the service's endpoints carry).
pub fn selector(value: &str) -> Result<(String, String)> {
    key_value("selector", value)
}

/// A subnet in CIDR notation with no host bits set.
pub fn subnet(value: &str) -> Result<IpNet> {
    let net: IpNet =
        value.parse().map_err(|_| invalid("subnet", value, "expected CIDR notation such as 10.30.0.0/24"))?;
    if net.trunc() != net {
        return Err(invalid("subnet", value, format!("host bits are set; did you mean {}?", net.trunc())));
    }
    Ok(net)
}

/// An IP address.
pub fn ip(field: &'static str, value: &str) -> Result<IpAddr> {
    value.parse().map_err(|_| invalid(field, value, "expected an IP address such as 10.30.0.7"))
}

/// An interface address as engines write it, `IP` or `IP/PREFIX` (Docker's
/// IPAM answers and endpoint interfaces, CNI's `ips`): the address, the
/// prefix checked and dropped.
pub fn address(field: &'static str, value: &str) -> Result<IpAddr> {
    match value.split_once('/') {
        None => ip(field, value),
        Some(_) => value
            .parse::<IpNet>()
            .map(|n| n.addr())
            .map_err(|_| invalid(field, value, "expected an address such as 10.30.0.7 or 10.30.0.7/24")),
    }
}

/// A network MTU (0 means "derive from the underlay").
pub fn mtu(value: u32) -> Result<u32> {
    if value == 0 || MTU_RANGE.contains(&value) {
        Ok(value)
    } else {
        Err(invalid(
            "mtu",
            &value.to_string(),
            format!("must be between {} and {}", MTU_RANGE.start(), MTU_RANGE.end()),
        ))
    }
}

/// An interface name inside a container.
pub fn ifname(value: &str) -> Result<()> {
    if value.is_empty() || value.len() > 15 {
        return Err(invalid("interface name", value, "must be 1 to 15 characters"));
    }
    if value == "." || value == ".." || value.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return Err(invalid("interface name", value, "must not contain '/', ':' or whitespace"));
    }
    Ok(())
}

/// Labels: keys non-empty, at most 255 bytes, no whitespace or '='.
pub fn labels(map: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in map {
        if k.is_empty() || k.len() > 255 || k.chars().any(|c| c.is_whitespace() || c == '=') {
            return Err(invalid("label key", k, "must be 1 to 255 characters without whitespace or '='"));
        }
        if v.len() > 4096 {
            return Err(invalid("label value", v, "must be at most 4096 bytes"));
        }
    }
    Ok(())
}

/// Parse a `key=value` label argument.
pub fn label_arg(arg: &str) -> Result<(String, String)> {
    key_value("label", arg)
}

/// The one `KEY=VALUE` parser (labels, selectors): the key checked as a
/// label key is, the value as a label value is.
fn key_value(field: &'static str, arg: &str) -> Result<(String, String)> {
    let (k, v) = arg.split_once('=').ok_or_else(|| invalid(field, arg, "expected key=value"))?;
    let m = BTreeMap::from([(k.to_string(), v.to_string())]);
    labels(&m)?;
    Ok((k.to_string(), v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_publish_values_parse_and_bad_ones_say_why() {
        assert_eq!(mesh_publish("8080:80").unwrap(), (8080, 80, "tcp"));
        assert_eq!(mesh_publish("5353:53/UDP").unwrap(), (5353, 53, "udp"));
        assert_eq!(mesh_publish("80").unwrap(), (0, 80, "tcp"));
        assert_eq!(mesh_unpublish("8080/udp").unwrap(), (8080, "udp"));
        for (bad, why) in
            [("0:80", "not a port"), ("8080:80/sctp", "sctp"), ("x", "not a port"), ("70000:1", "not a port")]
        {
            let e = mesh_publish(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(mesh_unpublish("8080:80").unwrap_err().to_string().contains("HOSTPORT"));
    }

    #[test]
    fn service_ports_parse_with_defaults_and_refuse_nonsense() {
        assert_eq!(service_port("80"), Ok((80, "tcp", 80)));
        assert_eq!(service_port("53/udp"), Ok((53, "udp", 53)));
        assert_eq!(service_port("80:8080"), Ok((80, "tcp", 8080)));
        assert_eq!(service_port("80/TCP:8080"), Ok((80, "tcp", 8080)));
        for bad in ["", "0", "70000", "80/sctp", "80:", "x", "80/tcp:0", ":80"] {
            let e = service_port(bad).unwrap_err().to_string();
            assert!(e.contains("port"), "{bad}: {e}");
        }
        assert!(service_name("web").is_ok());
        assert!(service_name("web.app").unwrap_err().to_string().contains("'.'"));
        assert!(service_name("tasks").is_err());
        assert_eq!(selector("app=web"), Ok(("app".into(), "web".into())));
        assert!(selector("=x").is_err() && selector("novalue").is_err());
    }

    #[test]
    fn names() {
        for ok in ["app", "a", "web-1", "my_net.v2", "0net"] {
            name("network name", ok).unwrap();
        }
        for bad in ["", "-x", ".x", "a b", "a/b", "ü", &"x".repeat(64)] {
            let e = name("network name", bad).unwrap_err();
            assert!(e.to_string().contains("network name"), "{e}");
        }
    }

    #[test]
    fn subnets_must_be_clean_cidrs() {
        assert_eq!(subnet("10.30.0.0/24").unwrap().to_string(), "10.30.0.0/24");
        let e = subnet("10.30.0.5/24").unwrap_err().to_string();
        assert!(e.contains("did you mean 10.30.0.0/24"), "{e}");
        let e = subnet("10.30.0.0").unwrap_err().to_string();
        assert!(e.contains("CIDR"), "{e}");
        assert!(subnet("300.1.1.0/24").is_err());
        assert!(subnet("10.0.0.0/33").is_err());
    }

    #[test]
    fn ips_mtus_ifnames_labels() {
        assert!(ip("ip", "10.1.2.3").is_ok());
        assert!(ip("ip", "10.1.2").unwrap_err().to_string().contains("\"10.1.2\""));
        assert_eq!(mtu(0).unwrap(), 0);
        assert_eq!(mtu(1450).unwrap(), 1450);
        assert!(mtu(100).is_err());
        assert!(mtu(10_000).is_err());
        assert!(ifname("eth0").is_ok());
        assert!(ifname("").is_err());
        assert!(ifname("a/b").is_err());
        assert!(ifname("sixteen-chars-xx").is_err());
        assert_eq!(label_arg("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(label_arg("novalue").is_err());
        assert!(label_arg("=v").is_err());
        assert!(selector("a b=c").is_err(), "a selector key is a label key");
        assert_eq!(address("ip", "10.1.2.3/24"), Ok("10.1.2.3".parse().unwrap()));
        assert_eq!(address("ip", "10.1.2.3"), Ok("10.1.2.3".parse().unwrap()));
        assert_eq!(address("ip", "fd00::5/64"), Ok("fd00::5".parse().unwrap()));
        for bad in ["10.1.2.3/33", "10.1.2.3/", "/24", "nope/8", ""] {
            assert!(address("ip", bad).is_err(), "{bad:?}");
        }
    }
}
