//! `trellisd` configuration: a TOML file, then flags (each with an
//! environment fallback) on top. Defaults suit a single host.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// The file's content; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub state_dir: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub store: Option<String>,
    pub default_pool: Option<IpNet>,
    pub default_prefix_len: Option<u8>,
    pub resync_interval_ms: Option<u64>,
    pub host_id: Option<String>,
    pub log: Option<String>,
    pub etcd_ca: Option<PathBuf>,
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
    pub lease_ttl_ms: Option<u64>,
    pub advertise_addr: Option<IpAddr>,
    pub vxlan_port: Option<u16>,
    pub reclaim_grace_ms: Option<u64>,
    pub ebpf: Option<bool>,
    pub ebpf_attach: Option<String>,
    pub docker_plugin: Option<PathBuf>,
    pub docker_host: Option<String>,
    pub dns: Option<bool>,
    pub dns_port: Option<u16>,
    pub dns_upstream: Option<String>,
    pub metrics_addr: Option<String>,
    pub key_rotation_interval_ms: Option<u64>,
    pub key_rotation_grace_ms: Option<u64>,
    pub esp_seq_threshold: Option<u64>,
    pub dns_kernel: Option<bool>,
    pub drain_ms: Option<u64>,
    pub cluster_key_file: Option<PathBuf>,
    pub flows_per_endpoint: Option<u32>,
    pub dns_client_qps: Option<u32>,
    pub encryption_transport: Option<String>,
    pub esp_udp_port: Option<u16>,
}

/// Flags and environment variables (`None` when not given).
#[derive(Debug, Default, clap::Args)]
pub struct Overrides {
    /// Configuration file (TOML). Missing is fine unless given explicitly.
    #[arg(long, env = "TRELLIS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where the agent keeps its state (the embedded store, host identity).
    #[arg(long, env = "TRELLIS_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Runtime directory (socket, managed network namespaces).
    #[arg(long, env = "TRELLIS_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
    /// The agent API socket (root-only).
    #[arg(long, env = "TRELLIS_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Cluster store: `embedded` (redb in the state dir) or `memory`.
    #[arg(long, env = "TRELLIS_STORE")]
    pub store: Option<String>,
    /// Pool that networks created without --subnet are carved from.
    #[arg(long, env = "TRELLIS_DEFAULT_POOL")]
    pub default_pool: Option<IpNet>,
    /// Prefix length of subnets carved from the default pool.
    #[arg(long, env = "TRELLIS_DEFAULT_PREFIX_LEN")]
    pub default_prefix_len: Option<u8>,
    /// Full resync period in milliseconds.
    #[arg(long, env = "TRELLIS_RESYNC_INTERVAL_MS")]
    pub resync_interval_ms: Option<u64>,
    /// Host identity (default: generated once and kept in the state dir).
    #[arg(long, env = "TRELLIS_HOST_ID")]
    pub host_id: Option<String>,
    /// Log filter (tracing env-filter syntax).
    #[arg(long, env = "TRELLIS_LOG")]
    pub log: Option<String>,
    /// CA certificate (PEM) that signs etcd's server certificate.
    #[arg(long, env = "TRELLIS_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd.
    #[arg(long, env = "TRELLIS_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// Client key (PEM) for etcd.
    #[arg(long, env = "TRELLIS_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// TTL of this host's lease in the store, in milliseconds.
    #[arg(long, env = "TRELLIS_LEASE_TTL_MS")]
    pub lease_ttl_ms: Option<u64>,
    /// This host's underlay address (default: the address of the
    /// default-route interface).
    #[arg(long, env = "TRELLIS_ADVERTISE_ADDR")]
    pub advertise_addr: Option<IpAddr>,
    /// UDP port of the VXLAN tunnels.
    #[arg(long, env = "TRELLIS_VXLAN_PORT")]
    pub vxlan_port: Option<u16>,
    /// How long after a host's lease expired its addresses and blocks are
    /// reclaimed, in milliseconds.
    #[arg(long, env = "TRELLIS_RECLAIM_GRACE_MS")]
    pub reclaim_grace_ms: Option<u64>,
    /// The eBPF datapath on every endpoint veth: anti-spoofing, tenant
    /// isolation, service VIPs, counters, the flow monitor. On by default;
    /// `--ebpf=false` runs plain bridges (no VIPs, no isolation beyond the
    /// nftables rules).
    #[arg(long, env = "TRELLIS_EBPF", num_args = 0..=1, default_missing_value = "true")]
    pub ebpf: Option<bool>,
    /// How many connections to service VIPs one endpoint may track at once
    /// (its own tables: a neighbour flooding new flows fills only its own;
    /// a full table refuses new flows and keeps the old). Default 65536.
    #[arg(long, env = "TRELLIS_FLOWS_PER_ENDPOINT")]
    pub flows_per_endpoint: Option<u32>,
    /// How encrypted networks' packets cross the underlay: `esp` (IP
    /// protocol 50, the default) or `udp` (ESP in UDP, RFC 3948, for paths
    /// that filter protocol 50, as most clouds do). `udp` on one host makes
    /// every tunnel to it ESP in UDP (its peers follow its record).
    #[arg(long, env = "TRELLIS_ENCRYPTION_TRANSPORT")]
    pub encryption_transport: Option<String>,
    /// The UDP port of ESP in UDP (default 4500; the same on every host).
    #[arg(long, env = "TRELLIS_ESP_UDP_PORT")]
    pub esp_udp_port: Option<u16>,
    /// How the eBPF programs attach: `clsact` (tc filters in a clsact
    /// qdisc, any kernel; the default) or `auto`/`tcx` (tcx links on
    /// kernels from 6.6, clsact below). A tcx attachment waits for RCU
    /// grace periods: about 28 ms per endpoint here against 0.4 ms.
    #[arg(long, env = "TRELLIS_EBPF_ATTACH")]
    pub ebpf_attach: Option<String>,
    /// Socket of the Docker network + IPAM driver `trellis`.
    #[arg(long, env = "TRELLIS_DOCKER_PLUGIN")]
    pub docker_plugin: Option<PathBuf>,
    /// Do not serve the Docker driver (in the file: `docker_plugin = ""`).
    #[arg(long, env = "TRELLIS_NO_DOCKER_PLUGIN")]
    pub no_docker_plugin: bool,
    /// The Docker engine's API, where the driver learns network and
    /// container names, aliases and labels (`unix:///PATH`).
    #[arg(long, env = "TRELLIS_DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// Serve DNS (service discovery) on every network's gateway address.
    #[arg(long, env = "TRELLIS_DNS", num_args = 0..=1, default_missing_value = "true")]
    pub dns: Option<bool>,
    /// Port of the DNS server.
    #[arg(long, env = "TRELLIS_DNS_PORT")]
    pub dns_port: Option<u16>,
    /// Answer plain A queries for names with one address in the eBPF
    /// program at the endpoint's veth (the in-kernel DNS path; needs the
    /// datapath and DNS on port 53). On by default.
    #[arg(long, env = "TRELLIS_DNS_KERNEL", num_args = 0..=1, default_missing_value = "true")]
    pub dns_kernel: Option<bool>,
    /// Queries a second the DNS server answers one client address, UDP and
    /// TCP together (a flooding client's excess is dropped, or refused over
    /// TCP; others are unaffected; the in-kernel path's answers do not
    /// count). 0: no limit. Default 2000.
    #[arg(long, env = "TRELLIS_DNS_CLIENT_QPS")]
    pub dns_client_qps: Option<u32>,
    /// Upstream resolvers for names that are not Trellis's: `IP[:PORT],…`
    /// (default: the nameservers of /etc/resolv.conf).
    #[arg(long, env = "TRELLIS_DNS_UPSTREAM")]
    pub dns_upstream: Option<String>,
    /// Prometheus metrics on `ADDR:PORT/metrics` (`off` turns them off).
    #[arg(long, env = "TRELLIS_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Encrypted networks rotate their key this often, in milliseconds
    /// (0: only on demand and on the sequence-number threshold). Default 12 h.
    #[arg(long, env = "TRELLIS_KEY_ROTATION_INTERVAL_MS")]
    pub key_rotation_interval_ms: Option<u64>,
    /// After every host sends with a new key, the old one is still
    /// accepted this long (packets in flight), in milliseconds.
    #[arg(long, env = "TRELLIS_KEY_ROTATION_GRACE_MS")]
    pub key_rotation_grace_ms: Option<u64>,
    /// An encrypted network's key rotates once an outbound SA on any host
    /// has sent this many packets (ESP sequence numbers). Default 2^40.
    #[arg(long, env = "TRELLIS_ESP_SEQ_THRESHOLD")]
    pub esp_seq_threshold: Option<u64>,
    /// A detached backend of a VIP service (trellisctl detach, CNI DEL,
    /// Docker's Leave) takes no new connection at once but keeps its open
    /// ones this long before it is removed, in milliseconds (0: removed at
    /// once). The detach itself does not wait. Default 3000.
    #[arg(long, env = "TRELLIS_DRAIN_MS")]
    pub drain_ms: Option<u64>,
    /// The cluster key file (root only, mode 0600 or stricter): one secret
    /// per line, at least 32 characters (`openssl rand -hex 32`), the same
    /// on every host; the first seals encrypted networks' key rings in the
    /// store, every line opens them. Without it this host carries no
    /// encrypted network.
    #[arg(long, env = "TRELLIS_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    Embedded,
    Memory,
    /// `etcd://HOST:PORT[,HOST:PORT…]` (`etcds://` for TLS).
    Etcd(String),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub socket: PathBuf,
    pub store: StoreSpec,
    pub default_pool: IpNet,
    pub default_prefix_len: u8,
    pub resync_interval: Duration,
    pub host_id: Option<String>,
    pub log: String,
    pub etcd_tls: Option<trellis_store::EtcdTls>,
    pub lease_ttl: Duration,
    pub advertise_addr: Option<IpAddr>,
    pub vxlan_port: u16,
    pub reclaim_grace: Duration,
    pub ebpf: bool,
    pub ebpf_attach: trellis_ebpf::AttachMode,
    /// `None`: the Docker driver is off.
    pub docker_plugin: Option<PathBuf>,
    /// The Docker engine's API socket.
    pub docker_host: PathBuf,
    pub dns: bool,
    pub dns_port: u16,
    pub dns_upstream: trellis_dns::Upstreams,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub key_rotation: trellis_ipsec::Policy,
    pub esp_seq_threshold: u64,
    pub dns_kernel: bool,
    /// How long a detached backend drains (zero: none).
    pub drain: Duration,
    /// Where the cluster keys are (none: no encrypted networks here).
    pub cluster_key_file: Option<PathBuf>,
    /// The size of each endpoint's own flow tables.
    pub flows_per_endpoint: u32,
    /// Each DNS client's rate (0: none).
    pub dns_client_qps: u32,
    /// This host's encrypted tunnels carry ESP in UDP.
    pub esp_in_udp: bool,
    pub esp_udp_port: u16,
}

pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9473";
/// A detached backend's drain: long enough for every host's tables to
/// drop it from new connections and for short requests under way to end,
/// short enough for a rolling update.
pub const DEFAULT_DRAIN_MS: u64 = 3000;
pub const DEFAULT_DOCKER_PLUGIN: &str = "/run/docker/plugins/trellis.sock";
pub const DEFAULT_DOCKER_HOST: &str = "/run/docker.sock";

pub const DEFAULT_CONFIG: &str = "/etc/trellis/trellisd.toml";
pub const DEFAULT_SOCKET: &str = "/run/trellis/trellisd.sock";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("invalid store {0:?}: expected \"embedded\", \"memory\" or etcd://HOST:PORT[,HOST:PORT…]")]
    Store(String),
    #[error("lease TTL {0} ms is too short (at least 2000 ms; etcd's minimum)")]
    LeaseTtl(u64),
    #[error("{0}")]
    DnsUpstream(String),
    #[error("invalid metrics_addr {0:?}: expected IP:PORT or off")]
    MetricsAddr(String),
    #[error("invalid docker_host {0:?}: expected unix:///PATH")]
    DockerHost(String),
    #[error("invalid encryption_transport {0:?}: expected esp or udp")]
    EncryptionTransport(String),
    #[error("esp_udp_port {0} is not a port ESP in UDP can use (1-65535, not the VXLAN port)")]
    EspUdpPort(u16),
    #[error("flows_per_endpoint must be at least 1")]
    FlowsPerEndpoint,
    #[error("invalid ebpf_attach {0:?}: expected clsact, tcx or auto")]
    EbpfAttach(String),
    #[error("invalid default_prefix_len {len} for pool {pool}: must be between the pool's length and 30")]
    PrefixLen { len: u8, pool: IpNet },
}

pub fn parse_store(s: &str) -> Result<StoreSpec, ConfigError> {
    match s {
        "embedded" | "redb" => Ok(StoreSpec::Embedded),
        "memory" => Ok(StoreSpec::Memory),
        other if trellis_store::EtcdConfig::parse(other).is_ok() => Ok(StoreSpec::Etcd(other.to_string())),
        other => Err(ConfigError::Store(other.to_string())),
    }
}

impl Config {
    /// Merge defaults, the file, and the overrides (highest wins).
    pub fn load(o: &Overrides) -> Result<Config, ConfigError> {
        let (path, explicit) = match &o.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let file = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str::<FileConfig>(&text)
                .map_err(|source| ConfigError::Parse { path: path.clone(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => FileConfig::default(),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        Config::merge(file, o)
    }

    pub fn merge(f: FileConfig, o: &Overrides) -> Result<Config, ConfigError> {
        let run_dir = o.run_dir.clone().or(f.run_dir).unwrap_or_else(|| PathBuf::from("/run/trellis"));
        let socket = o.socket.clone().or(f.socket).unwrap_or_else(|| run_dir.join("trellisd.sock"));
        let store = parse_store(o.store.as_deref().or(f.store.as_deref()).unwrap_or("embedded"))?;
        let default_pool = o.default_pool.or(f.default_pool).unwrap_or_else(|| "10.0.0.0/8".parse().expect("valid"));
        let default_prefix_len = o.default_prefix_len.or(f.default_prefix_len).unwrap_or(24);
        if default_prefix_len < default_pool.prefix_len() || default_prefix_len > 30 {
            return Err(ConfigError::PrefixLen { len: default_prefix_len, pool: default_pool });
        }
        Ok(Config {
            state_dir: o.state_dir.clone().or(f.state_dir).unwrap_or_else(|| PathBuf::from("/var/lib/trellis")),
            run_dir,
            socket,
            store,
            default_pool,
            default_prefix_len,
            resync_interval: Duration::from_millis(
                o.resync_interval_ms.or(f.resync_interval_ms).unwrap_or(2000).max(100),
            ),
            host_id: o.host_id.clone().or(f.host_id),
            log: o.log.clone().or(f.log).unwrap_or_else(|| "info,h2=warn,tower=warn".into()),
            etcd_tls: {
                let ca = o.etcd_ca.clone().or(f.etcd_ca);
                let cert = o.etcd_cert.clone().or(f.etcd_cert);
                let key = o.etcd_key.clone().or(f.etcd_key);
                (ca.is_some() || cert.is_some() || key.is_some()).then_some(trellis_store::EtcdTls { ca, cert, key })
            },
            lease_ttl: {
                let ms = o.lease_ttl_ms.or(f.lease_ttl_ms).unwrap_or(10_000);
                if ms < 2000 {
                    return Err(ConfigError::LeaseTtl(ms));
                }
                Duration::from_millis(ms)
            },
            advertise_addr: o.advertise_addr.or(f.advertise_addr),
            vxlan_port: o.vxlan_port.or(f.vxlan_port).unwrap_or(4789),
            reclaim_grace: Duration::from_millis(o.reclaim_grace_ms.or(f.reclaim_grace_ms).unwrap_or(30_000)),
            ebpf: o.ebpf.or(f.ebpf).unwrap_or(true),
            key_rotation: trellis_ipsec::Policy {
                interval_ms: o.key_rotation_interval_ms.or(f.key_rotation_interval_ms).unwrap_or(12 * 3600 * 1000),
                grace_ms: o.key_rotation_grace_ms.or(f.key_rotation_grace_ms).unwrap_or(5000),
            },
            esp_seq_threshold: o.esp_seq_threshold.or(f.esp_seq_threshold).unwrap_or(1 << 40).max(1),
            dns_kernel: o.dns_kernel.or(f.dns_kernel).unwrap_or(true),
            drain: Duration::from_millis(o.drain_ms.or(f.drain_ms).unwrap_or(DEFAULT_DRAIN_MS)),
            cluster_key_file: o.cluster_key_file.clone().or(f.cluster_key_file),
            esp_in_udp: match o.encryption_transport.clone().or(f.encryption_transport).as_deref() {
                None | Some("esp") => false,
                Some("udp") => true,
                Some(other) => return Err(ConfigError::EncryptionTransport(other.to_string())),
            },
            esp_udp_port: match o.esp_udp_port.or(f.esp_udp_port) {
                None => trellis_ipsec::xfrm::ESP_IN_UDP_PORT,
                Some(p) if p == 0 || p == o.vxlan_port.or(f.vxlan_port).unwrap_or(4789) => {
                    return Err(ConfigError::EspUdpPort(p));
                }
                Some(p) => p,
            },
            dns_client_qps: o.dns_client_qps.or(f.dns_client_qps).unwrap_or(trellis_dns::limit::DEFAULT_CLIENT_QPS),
            flows_per_endpoint: match o.flows_per_endpoint.or(f.flows_per_endpoint) {
                Some(0) => return Err(ConfigError::FlowsPerEndpoint),
                n => n.unwrap_or(trellis_ebpf::FLOWS_PER_ENDPOINT),
            },
            ebpf_attach: match o.ebpf_attach.clone().or(f.ebpf_attach).as_deref() {
                Some("auto") | Some("tcx") => trellis_ebpf::AttachMode::Auto,
                None | Some("clsact") => trellis_ebpf::AttachMode::Clsact,
                Some(other) => return Err(ConfigError::EbpfAttach(other.to_string())),
            },
            docker_plugin: {
                let p = o.docker_plugin.clone().or(f.docker_plugin).unwrap_or_else(|| DEFAULT_DOCKER_PLUGIN.into());
                (!p.as_os_str().is_empty() && !o.no_docker_plugin).then_some(p)
            },
            docker_host: {
                let h =
                    o.docker_host.clone().or(f.docker_host).unwrap_or_else(|| format!("unix://{DEFAULT_DOCKER_HOST}"));
                match h.strip_prefix("unix://") {
                    Some(path) if path.starts_with('/') => PathBuf::from(path),
                    _ if h.starts_with('/') => PathBuf::from(h),
                    _ => return Err(ConfigError::DockerHost(h)),
                }
            },
            dns: o.dns.or(f.dns).unwrap_or(true),
            dns_port: o.dns_port.or(f.dns_port).unwrap_or(53),
            dns_upstream: match o.dns_upstream.clone().or(f.dns_upstream) {
                Some(list) => trellis_dns::Upstreams::parse(&list).map_err(ConfigError::DnsUpstream)?,
                None => trellis_dns::Upstreams::from_resolv_conf(
                    &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
                ),
            },
            metrics_addr: match o.metrics_addr.clone().or(f.metrics_addr).as_deref() {
                None => Some(DEFAULT_METRICS_ADDR.parse().expect("valid")),
                Some("off") | Some("") => None,
                Some(a) => Some(a.parse().map_err(|_| ConfigError::MetricsAddr(a.to_string()))?),
            },
        })
    }

    pub fn netns_dir(&self) -> PathBuf {
        self.run_dir.join("netns")
    }

    pub fn store_path(&self) -> PathBuf {
        self.state_dir.join("store.redb")
    }
}

/// The host id kept in the state dir, created on first start.
pub fn host_id(state_dir: &Path) -> std::io::Result<String> {
    let path = state_dir.join("host-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Ok(_) => write_host_id(&path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => write_host_id(&path),
        Err(e) => Err(e),
    }
}

fn write_host_id(path: &Path) -> std::io::Result<String> {
    let id = crate::model::new_id();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{id}\n"))?;
    std::fs::rename(&tmp, path)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_override_defaults() {
        let file: FileConfig = toml::from_str(
            r#"
            state_dir = "/srv/trellis"
            store = "memory"
            default_pool = "172.20.0.0/14"
            resync_interval_ms = 500
            "#,
        )
        .unwrap();
        let o = Overrides { store: Some("embedded".into()), run_dir: Some("/tmp/r".into()), ..Overrides::default() };
        let c = Config::merge(file, &o).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/srv/trellis"));
        assert_eq!(c.store, StoreSpec::Embedded);
        assert_eq!(c.socket, PathBuf::from("/tmp/r/trellisd.sock"), "socket follows the run dir");
        assert_eq!(c.default_pool.to_string(), "172.20.0.0/14");
        assert_eq!(c.resync_interval, Duration::from_millis(500));
        let d = Config::merge(FileConfig::default(), &Overrides::default()).unwrap();
        assert_eq!(d.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(d.state_dir, PathBuf::from("/var/lib/trellis"));
        assert!(d.ebpf, "the eBPF datapath is on by default");
        assert_eq!(d.ebpf_attach, trellis_ebpf::AttachMode::Clsact, "attach latency: see ebpf_attach");
        assert_eq!(d.docker_plugin, Some(PathBuf::from(DEFAULT_DOCKER_PLUGIN)), "the Docker driver is on");
        assert_eq!(d.docker_host, PathBuf::from(DEFAULT_DOCKER_HOST));
        let off = Overrides {
            docker_plugin: Some("".into()),
            docker_host: Some("unix:///x/d.sock".into()),
            ..Overrides::default()
        };
        let c = Config::merge(FileConfig::default(), &off).unwrap();
        assert_eq!((c.docker_plugin, c.docker_host), (None, PathBuf::from("/x/d.sock")));
        let bad = Overrides { docker_host: Some("tcp://1.2.3.4:2375".into()), ..Overrides::default() };
        assert!(Config::merge(FileConfig::default(), &bad).unwrap_err().to_string().contains("docker_host"));
        assert!(d.dns && d.dns_port == 53, "DNS is on, on port 53");
        assert_eq!(d.drain, Duration::from_secs(3), "detached backends drain 3 s");
        let file: FileConfig = toml::from_str("drain_ms = 500").unwrap();
        assert_eq!(Config::merge(file, &Overrides::default()).unwrap().drain, Duration::from_millis(500));
        let none = Overrides { drain_ms: Some(0), ..Overrides::default() };
        assert!(Config::merge(FileConfig::default(), &none).unwrap().drain.is_zero());
        assert_eq!(d.flows_per_endpoint, 65536, "an endpoint tracks up to 65536 flows");
        assert_eq!(d.dns_client_qps, 2000, "a DNS client is answered 2000 queries a second");
        assert!(!d.esp_in_udp && d.esp_udp_port == 4500, "plain ESP by default; ESP in UDP on 4500");
        let udp = Overrides { encryption_transport: Some("udp".into()), ..Overrides::default() };
        assert!(Config::merge(FileConfig::default(), &udp).unwrap().esp_in_udp);
        let bad = Overrides { encryption_transport: Some("tcp".into()), ..Overrides::default() };
        let err = Config::merge(FileConfig::default(), &bad).unwrap_err().to_string();
        assert!(err.contains("encryption_transport") && err.contains("tcp"), "{err}");
        let clash = Overrides { esp_udp_port: Some(4789), ..Overrides::default() };
        assert!(Config::merge(FileConfig::default(), &clash).unwrap_err().to_string().contains("4789"));
        let zero = Overrides { flows_per_endpoint: Some(0), ..Overrides::default() };
        let err = Config::merge(FileConfig::default(), &zero).unwrap_err().to_string();
        assert!(err.contains("flows_per_endpoint"), "{err}");
        assert_eq!(d.metrics_addr, Some("127.0.0.1:9473".parse().unwrap()));
        let m = Overrides { metrics_addr: Some("off".into()), ..Overrides::default() };
        assert_eq!(Config::merge(FileConfig::default(), &m).unwrap().metrics_addr, None);
        let m = Overrides { metrics_addr: Some("nope".into()), ..Overrides::default() };
        assert!(Config::merge(FileConfig::default(), &m).unwrap_err().to_string().contains("metrics_addr"));
        let up = Overrides { dns_upstream: Some("10.9.9.9:5300".into()), dns: Some(false), ..Overrides::default() };
        let c = Config::merge(FileConfig::default(), &up).unwrap();
        assert_eq!((c.dns, c.dns_upstream.servers), (false, vec!["10.9.9.9:5300".parse().unwrap()]));
        let bad = Overrides { dns_upstream: Some("x".into()), ..Overrides::default() };
        assert!(Config::merge(FileConfig::default(), &bad).unwrap_err().to_string().contains("upstream"));
        let file = FileConfig { docker_plugin: Some("".into()), ..FileConfig::default() };
        assert_eq!(Config::merge(file, &Overrides::default()).unwrap().docker_plugin, None);
    }

    #[test]
    fn bad_config_is_a_clear_error() {
        assert!(toml::from_str::<FileConfig>("bogus = 1").unwrap_err().to_string().contains("bogus"));
        let e = Config::merge(
            FileConfig { store: Some("zookeeper".into()), ..FileConfig::default() },
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("zookeeper"));
        let c = Config::merge(
            FileConfig { store: Some("etcd://10.0.0.5:2379,10.0.0.6:2379".into()), ..FileConfig::default() },
            &Overrides { lease_ttl_ms: Some(3000), ..Overrides::default() },
        )
        .unwrap();
        assert_eq!(c.store, StoreSpec::Etcd("etcd://10.0.0.5:2379,10.0.0.6:2379".into()));
        assert_eq!(c.lease_ttl, Duration::from_secs(3));
        assert!(
            Config::merge(FileConfig::default(), &Overrides { lease_ttl_ms: Some(500), ..Overrides::default() })
                .is_err()
        );
        let e =
            Config::merge(FileConfig::default(), &Overrides { default_prefix_len: Some(4), ..Overrides::default() })
                .unwrap_err();
        assert!(e.to_string().contains("default_prefix_len"));
        let dir = tempfile::tempdir().unwrap();
        let e = Config::load(&Overrides { config: Some(dir.path().join("missing.toml")), ..Overrides::default() })
            .unwrap_err();
        assert!(e.to_string().contains("missing.toml"));
    }

    #[test]
    fn host_id_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = host_id(dir.path()).unwrap();
        let b = host_id(dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 16);
    }
}
