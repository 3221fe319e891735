//! `trellis-cni` against a real `trellisd` (in its own namespace) and real
//! container namespaces: every rule of the CNI reference page.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use trellis_integration::{Host, Netns, in_netns, ping, require_root, run, trellis_cni, wait_for};

fn conf(h: &Host, version: &str, network: &str) -> Value {
    json!({
        "cniVersion": version,
        "name": network,
        "type": "trellis",
        "socket": h.socket(),
    })
}

fn container_addr(ns: &Path, ifname: &str) -> String {
    run(&mut in_netns(ns, "ip", &["-o", "-4", "addr", "show", "dev", ifname])).unwrap_or_default()
}

/// The host's CNI endpoints of `network` by container id.
fn cni_endpoints(h: &Host, network: &str) -> Vec<String> {
    h.ctl_json(&["endpoint", "ls", "--network", network])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "cni" || e["kind"] == 2)
        .map(|e| e["container_id"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn add_check_del_in_every_version() {
    require_root();
    let h = Host::new().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.41.0.0/24", "--attachable"]).unwrap();
    for (i, version) in ["0.4.0", "1.0.0", "1.1.0"].into_iter().enumerate() {
        let c = Netns::new("trc").unwrap();
        let id = format!("ctr{i}");
        let conf = conf(&h, version, "app");
        let (code, res) = trellis_cni("ADD", &conf, &id, Some(&c.path()), "eth0");
        assert_eq!(code, 0, "{version}: {res}");
        assert_eq!(res["cniVersion"], version);
        let addr = res["ips"][0]["address"].as_str().unwrap().to_string();
        assert!(addr.starts_with("10.41.0.") && addr.ends_with("/24"), "{addr}");
        assert_eq!(res["ips"][0]["gateway"], "10.41.0.1");
        assert_eq!(res["ips"][0]["interface"], 1);
        assert_eq!(res["interfaces"][1]["name"], "eth0");
        assert_eq!(res["interfaces"][1]["sandbox"], c.path().display().to_string());
        assert_eq!(res["routes"][0], json!({"dst": "0.0.0.0/0", "gw": "10.41.0.1"}));
        assert_eq!(res["ips"][0].get("version").is_some(), version == "0.4.0", "{res}");
        // The kernel agrees with the result.
        assert!(container_addr(&c.path(), "eth0").contains(&addr), "{version}");
        assert!(ping(&c.path(), "10.41.0.1", 1), "{version}: gateway unreachable");

        let mut with_prev = conf.clone();
        with_prev["prevResult"] = res.clone();
        let (code, out) = trellis_cni("CHECK", &with_prev, &id, Some(&c.path()), "eth0");
        assert_eq!((code, &out), (0, &Value::Null), "{version}: CHECK of a fresh ADD");

        let (code, _) = trellis_cni("DEL", &with_prev, &id, Some(&c.path()), "eth0");
        assert_eq!(code, 0);
        assert!(
            wait_for(Duration::from_secs(5), || !c.links().unwrap().contains(&"eth0".to_string())),
            "{version}: DEL left the interface"
        );
        // DEL again, and DEL without a netns: both succeed.
        assert_eq!(trellis_cni("DEL", &with_prev, &id, Some(&c.path()), "eth0").0, 0);
        assert_eq!(trellis_cni("DEL", &conf, &id, None, "eth0").0, 0);
        assert!(!cni_endpoints(&h, "app").contains(&id));
    }
}

/// A dual-stack network through CNI: the result carries both addresses
/// and both default routes, the container has them, CHECK agrees, DEL
/// releases both.
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn a_dual_stack_network_through_cni() {
    require_root();
    let h = Host::new().unwrap();
    h.ctl(&["network", "create", "dual", "--subnet", "10.49.0.0/24", "--subnet", "fd00:49::/64", "--attachable"])
        .unwrap();
    let c = Netns::new("trc").unwrap();
    let conf = conf(&h, "1.1.0", "dual");
    let (code, res) = trellis_cni("ADD", &conf, "dual0", Some(&c.path()), "eth0");
    assert_eq!(code, 0, "{res}");
    let addr6 = res["ips"][1]["address"].as_str().unwrap().to_string();
    assert!(addr6.starts_with("fd00:49::") && addr6.ends_with("/64"), "{res}");
    assert_eq!(res["ips"][1]["gateway"], "fd00:49::1");
    assert_eq!(res["routes"][1], json!({"dst": "::/0", "gw": "fd00:49::1"}));
    let shown = run(&mut in_netns(&c.path(), "ip", &["-o", "-6", "addr", "show", "dev", "eth0"])).unwrap_or_default();
    assert!(shown.contains(&addr6), "{shown}");
    assert!(wait_for(Duration::from_secs(5), || ping(&c.path(), "fd00:49::1", 1)), "IPv6 gateway unreachable");
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = res.clone();
    let (code, out) = trellis_cni("CHECK", &with_prev, "dual0", Some(&c.path()), "eth0");
    assert_eq!((code, &out), (0, &Value::Null), "CHECK of a fresh dual-stack ADD");
    assert_eq!(trellis_cni("DEL", &with_prev, "dual0", Some(&c.path()), "eth0").0, 0);
    assert!(wait_for(Duration::from_secs(5), || cni_endpoints(&h, "dual").is_empty()), "DEL left the endpoint");
    // Both addresses back: the network holds its two gateways only.
    let allocated = || {
        let out = h.ns.cmd("curl").args(["-s", "http://127.0.0.1:9473/metrics"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with("trellis_ipam_addresses_allocated") && l.contains("network=\"dual\""))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(-1.0)
    };
    assert!(wait_for(Duration::from_secs(10), || allocated() == 2.0), "addresses left allocated: {}", allocated());
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn check_reports_what_changed() {
    require_root();
    let h = Host::new().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.42.0.0/24", "--attachable"]).unwrap();
    let c = Netns::new("trc").unwrap();
    let conf = conf(&h, "1.1.0", "app");
    let (code, res) = trellis_cni("ADD", &conf, "chk1", Some(&c.path()), "eth0");
    assert_eq!(code, 0, "{res}");
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = res.clone();
    let addr = res["ips"][0]["address"].as_str().unwrap().to_string();

    // Someone removes the address inside the container.
    c.ip(&["addr", "del", &addr, "dev", "eth0"]).unwrap();
    let (code, err) = trellis_cni("CHECK", &with_prev, "chk1", Some(&c.path()), "eth0");
    assert_eq!(code, 1);
    assert_eq!(err["code"], 101, "{err}");
    assert!(err["msg"].as_str().unwrap().contains("lacks address"), "{err}");

    // A previous result that disagrees with the attachment.
    c.ip(&["addr", "add", &addr, "dev", "eth0"]).unwrap();
    let mut wrong = with_prev.clone();
    wrong["prevResult"]["ips"][0]["address"] = json!("10.42.0.250/24");
    let (code, err) = trellis_cni("CHECK", &wrong, "chk1", Some(&c.path()), "eth0");
    assert_eq!((code, err["code"].as_u64()), (1, Some(101)), "{err}");
    assert_eq!(trellis_cni("CHECK", &with_prev, "chk1", Some(&c.path()), "eth0").0, 0, "repaired by hand");

    // No prevResult, unknown container.
    let (code, err) = trellis_cni("CHECK", &conf, "chk1", Some(&c.path()), "eth0");
    assert_eq!((code, err["code"].as_u64()), (1, Some(7)), "{err}");
    let (code, err) = trellis_cni("CHECK", &with_prev, "nosuch", Some(&c.path()), "eth0");
    assert_eq!((code, err["code"].as_u64()), (1, Some(3)), "{err}");
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn add_refusals_and_error_codes() {
    require_root();
    let mut h = Host::new().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.43.0.0/24", "--attachable"]).unwrap();
    h.ctl(&["network", "create", "prod", "--subnet", "10.44.0.0/24"]).unwrap();
    let c = Netns::new("trc").unwrap();
    let conf = conf(&h, "1.1.0", "app");

    let (code, first) = trellis_cni("ADD", &conf, "dup", Some(&c.path()), "eth0");
    assert_eq!(code, 0, "{first}");
    // The same container and interface again: refused, the first untouched.
    let (code, err) = trellis_cni("ADD", &conf, "dup", Some(&c.path()), "eth0");
    assert_eq!((code, err["code"].as_u64()), (1, Some(100)), "{err}");
    assert!(err["msg"].as_str().unwrap().contains("already has interface eth0"), "{err}");
    assert!(ping(&c.path(), "10.43.0.1", 1), "the first attachment still works");
    assert_eq!(cni_endpoints(&h, "app").len(), 1, "nothing half-created");

    // A network without --attachable takes only service tasks.
    let c2 = Netns::new("trc").unwrap();
    let prod = self::conf(&h, "1.1.0", "prod");
    let (code, err) = trellis_cni("ADD", &prod, "solo", Some(&c2.path()), "eth0");
    assert_eq!((code, err["code"].as_u64()), (1, Some(100)), "{err}");
    assert!(err["msg"].as_str().unwrap().contains("--attachable"), "{err}");
    assert!(c2.links().unwrap().iter().all(|l| l == "lo"), "refused: nothing created in the container");
    let mut task = prod.clone();
    task["args"] = json!({"cni": {"labels": [{"key": "trellis.service", "value": "web"}]}});
    let (code, res) = trellis_cni("ADD", &task, "task1", Some(&c2.path()), "eth0");
    assert_eq!(code, 0, "a service task joins: {res}");

    // Unknown network; a specific address; an address out of the subnet.
    let c3 = Netns::new("trc").unwrap();
    let (code, err) = trellis_cni("ADD", &self::conf(&h, "1.1.0", "nope"), "x1", Some(&c3.path()), "eth0");
    assert_eq!((code, err["code"].as_u64()), (1, Some(7)), "{err}");
    assert!(err["msg"].as_str().unwrap().contains("does not exist"), "{err}");
    let mut want = conf.clone();
    want["runtimeConfig"] = json!({"ips": ["10.43.0.77/24"]});
    let (code, res) = trellis_cni("ADD", &want, "x2", Some(&c3.path()), "eth0");
    assert_eq!((code, res["ips"][0]["address"].as_str()), (0, Some("10.43.0.77/24")), "{res}");
    let c4 = Netns::new("trc").unwrap();
    want["runtimeConfig"] = json!({"ips": ["10.99.0.7/24"]});
    let (code, err) = trellis_cni("ADD", &want, "x3", Some(&c4.path()), "eth0");
    assert_eq!((code, err["code"].as_u64()), (1, Some(7)), "{err}");
    // A CNI_NETNS the agent does not see as a network namespace (a plain
    // file: a runtime's namespace mount that did not propagate to it).
    let plain = h.dir.path().join("not-a-netns");
    std::fs::write(&plain, b"").unwrap();
    let (code, err) = trellis_cni("ADD", &conf, "x6", Some(&plain), "eth0");
    assert_eq!((code, err["code"].as_u64()), (1, Some(7)), "{err}");
    let msg = err["msg"].as_str().expect("msg");
    assert!(msg.contains(&format!("{} is not a network namespace (a plain file)", plain.display())), "{err}");
    assert!(msg.contains("share /run/netns"), "{err}");
    assert!(cni_endpoints(&h, "app").iter().all(|c| c != "x6"), "no endpoint for x6");

    // Environment and configuration errors.
    let (code, err) = trellis_cni("ADD", &conf, "", Some(&c4.path()), "eth0");
    assert_eq!((code, err["code"].as_u64()), (1, Some(4)), "{err}");
    assert!(err["msg"].as_str().unwrap().contains("CNI_CONTAINERID"));
    let mut bad = conf.clone();
    bad["ipam"] = json!({"type": "host-local"});
    assert_eq!(trellis_cni("ADD", &bad, "x4", Some(&c4.path()), "eth0").1["code"], 2);
    bad = conf.clone();
    bad["cniVersion"] = json!("0.2.0");
    assert_eq!(trellis_cni("ADD", &bad, "x4", Some(&c4.path()), "eth0").1["code"], 1);
    assert!(c4.links().unwrap().iter().all(|l| l == "lo"));
    let (code, v) = trellis_cni("VERSION", &json!({"cniVersion": "1.0.0"}), "", None, "");
    assert_eq!(code, 0);
    assert_eq!(v["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));

    // The agent down: try again later (11); STATUS says it cannot serve ADD.
    h.terminate();
    let (code, err) = trellis_cni("ADD", &conf, "x5", Some(&c4.path()), "eth0");
    assert_eq!((code, err["code"].as_u64()), (1, Some(11)), "{err}");
    assert_eq!(trellis_cni("DEL", &conf, "dup", Some(&c.path()), "eth0").1["code"], 11);
    assert_eq!(trellis_cni("STATUS", &conf, "", None, "").1["code"], 50);
    h.start().unwrap();
    assert_eq!(trellis_cni("STATUS", &conf, "", None, "").0, 0);
    let (code, err) = trellis_cni("STATUS", &self::conf(&h, "1.1.0", "nope"), "", None, "");
    assert_eq!((code, err["code"].as_u64()), (1, Some(50)), "{err}");
    assert_eq!(trellis_cni("DEL", &conf, "dup", Some(&c.path()), "eth0").0, 0);
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn del_after_the_netns_is_gone_releases_the_address() {
    require_root();
    let h = Host::new().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.45.0.0/24", "--attachable"]).unwrap();
    let mut conf = conf(&h, "1.1.0", "app");
    conf["runtimeConfig"] = json!({"ips": ["10.45.0.9/24"]});
    let c = Netns::new("trc").unwrap();
    assert_eq!(trellis_cni("ADD", &conf, "gone1", Some(&c.path()), "eth0").0, 0);
    let path = c.path();
    drop(c); // the container's namespace disappears before DEL
    assert_eq!(trellis_cni("DEL", &conf, "gone1", Some(&path), "eth0").0, 0);
    // The same address can be had again at once by a new container.
    let c2 = Netns::new("trc").unwrap();
    let mut ok = false;
    for _ in 0..50 {
        let (code, _) = trellis_cni("ADD", &conf, "gone2", Some(&c2.path()), "eth0");
        if code == 0 {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "10.45.0.9 was not released");
    assert_eq!(cni_endpoints(&h, "app"), vec!["gone2".to_string()]);
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn gc_removes_attachments_not_in_the_valid_list() {
    require_root();
    let h = Host::new().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.46.0.0/24", "--attachable"]).unwrap();
    let conf = conf(&h, "1.1.0", "app");
    let spaces: Vec<Netns> = (0..3).map(|_| Netns::new("trc").unwrap()).collect();
    for (i, c) in spaces.iter().enumerate() {
        assert_eq!(trellis_cni("ADD", &conf, &format!("gc{i}"), Some(&c.path()), "eth0").0, 0);
    }
    // An ad-hoc endpoint is not the CNI's to collect.
    h.attach("app", "adhoc", &[]).unwrap();
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] =
        json!([{"containerID": "gc0", "ifname": "eth0"}, {"containerID": "gc2", "ifname": "eth0"}]);
    let (code, out) = trellis_cni("GC", &gc, "", None, "");
    assert_eq!(code, 0, "{out}");
    assert!(
        wait_for(Duration::from_secs(5), || !spaces[1].links().unwrap().contains(&"eth0".to_string())),
        "gc1's interface is still there"
    );
    let mut left = cni_endpoints(&h, "app");
    left.sort();
    assert_eq!(left, vec!["gc0".to_string(), "gc2".to_string()]);
    assert!(ping(&spaces[0].path(), "10.46.0.1", 1) && ping(&spaces[2].path(), "10.46.0.1", 1));
    let eps = h.ctl_json(&["endpoint", "ls"]).unwrap();
    assert!(eps.as_array().unwrap().iter().any(|e| e["name"] == "adhoc"), "GC left the ad-hoc endpoint");
    // GC needs 1.1.0 and the list.
    let mut old = gc.clone();
    old["cniVersion"] = json!("1.0.0");
    assert_eq!(trellis_cni("GC", &old, "", None, "").1["code"], 1);
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn containerd_runs_containers_through_trellis_cni() {
    require_root();
    let h = Host::new().unwrap();
    h.ctl(&["network", "create", "app", "--subnet", "10.47.0.0/24", "--attachable"]).unwrap();
    // containerd 1.6's libcni reads results up to 1.0.0.
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": "app",
        "plugins": [{ "type": "trellis", "socket": h.socket() }],
    });
    let mut ctrd = trellis_integration::containerd::Containerd::start(&h, &conflist).unwrap();
    ctrd.run("c1").unwrap();
    ctrd.run("c2").unwrap();
    let eps = h.ctl_json(&["endpoint", "ls", "--network", "app"]).unwrap();
    let eps = eps.as_array().unwrap();
    assert_eq!(eps.len(), 2, "{eps:?}");
    assert!(eps.iter().all(|e| e["kind"] == "cni"));
    let ip_of = |cid: &str| {
        eps.iter()
            .find(|e| e["container_id"].as_str().unwrap().ends_with(cid))
            .map(|e| e["address"].as_str().unwrap().split('/').next().unwrap().to_string())
            .unwrap()
    };
    let (ip1, ip2) = (ip_of("c1"), ip_of("c2"));
    assert!(ctrd.exec("c1", &["/bin/ping", "-c", "1", "-W", "2", &ip2]), "c1 cannot reach c2 ({ip2})");
    assert!(ctrd.exec("c2", &["/bin/ping", "-c", "1", "-W", "2", &ip1]), "c2 cannot reach c1 ({ip1})");
    assert!(ctrd.exec("c1", &["/bin/ping", "-c", "1", "-W", "2", "10.47.0.1"]), "the gateway does not answer");
    // Killing the task: ctr runs DEL, the endpoint and its veth go.
    ctrd.kill("c2").unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || cni_endpoints(&h, "app").len() == 1),
        "c2's endpoint stayed: {:?}",
        cni_endpoints(&h, "app")
    );
    assert!(
        wait_for(Duration::from_secs(5), || h.ns.links().unwrap().iter().filter(|l| l.starts_with("trv-")).count()
            == 1),
        "c2's veth stayed"
    );
    assert!(!ctrd.exec("c1", &["/bin/ping", "-c", "1", "-W", "1", &ip2]));
}

#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn store_outage_is_try_again_later() {
    require_root();
    let mut lab = trellis_integration::Lab::new(1, 3000).unwrap();
    let h = &lab.hosts[0];
    h.ctl(&["network", "create", "app", "--subnet", "10.48.0.0/24", "--attachable"]).unwrap();
    let conf = conf(h, "1.1.0", "app");
    let c1 = Netns::new("trc").unwrap();
    assert_eq!(trellis_cni("ADD", &conf, "s1", Some(&c1.path()), "eth0").0, 0);
    lab.etcd.stop();
    let c2 = Netns::new("trc").unwrap();
    let (code, err) = trellis_cni("ADD", &conf, "s2", Some(&c2.path()), "eth0");
    assert_eq!((code, err["code"].as_u64()), (1, Some(11)), "{err}");
    assert!(err["msg"].as_str().unwrap().contains("store unavailable"), "{err}");
    assert!(c2.links().unwrap().iter().all(|l| l == "lo"), "nothing created during the outage");
    let (code, err) = trellis_cni("DEL", &conf, "s1", Some(&c1.path()), "eth0");
    assert_eq!((code, err["code"].as_u64()), (1, Some(11)), "DEL cannot release without the store: {err}");
    let (code, err) = trellis_cni("STATUS", &conf, "", None, "");
    assert_eq!((code, err["code"].as_u64()), (1, Some(50)), "{err}");
    assert!(ping(&c1.path(), "10.48.0.1", 1), "existing attachments keep working");
    lab.etcd.restart().unwrap();
    let h2 = &lab.hosts[0];
    let mut ok = false;
    for _ in 0..50 {
        if trellis_cni("ADD", &conf, "s2", Some(&c2.path()), "eth0").0 == 0 {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ok, "ADD never succeeded after the store came back");
    assert_eq!(trellis_cni("DEL", &conf, "s1", Some(&c1.path()), "eth0").0, 0);
    assert_eq!(trellis_cni("STATUS", &conf, "", None, "").0, 0);
    assert_eq!(h2.ctl_json(&["endpoint", "ls"]).unwrap().as_array().unwrap().len(), 1);
}

/// The `portMappings` capability (`runtimeConfig.portMappings`, as
/// containerd, Podman and Kubernetes' hostPort send it): the host port
/// answers from outside the cluster with the client's own address kept,
/// a taken one fails the ADD leaving nothing, and DEL releases it.
#[test]
#[ignore = "needs root: run the suite as root with --run-ignored all"]
fn port_mappings_are_published_and_released() {
    require_root();
    let h = Host::new().unwrap();
    let up = trellis_integration::Uplink::new(&h.ns, 33).unwrap();
    h.ctl(&["network", "create", "pm", "--subnet", "10.46.0.0/24", "--attachable"]).unwrap();
    let c = Netns::new("trc").unwrap();
    let _server = trellis_integration::sockets::Backend::start(&c.path(), 80, "c1").unwrap();
    let mut conf = conf(&h, "1.1.0", "pm");
    conf["runtimeConfig"] = json!({"portMappings": [{"hostPort": 18480, "containerPort": 80, "protocol": "tcp"}]});
    let (code, res) = trellis_cni("ADD", &conf, "pm1", Some(&c.path()), "eth0");
    assert_eq!(code, 0, "{res}");
    let to: std::net::SocketAddr = format!("{}:18480", up.host_ip).parse().unwrap();
    let mut line = String::new();
    let reached = wait_for(Duration::from_secs(10), || {
        line = trellis_integration::sockets::request(&up.outside.path(), to, Duration::from_millis(500))
            .unwrap_or_default();
        !line.is_empty()
    });
    assert!(reached, "the host port never answered from outside");
    assert_eq!(line, format!("c1 {}", up.outside_ip), "the container must see the client's own address");

    // The same host port for another container: the ADD fails, nothing left.
    let c2 = Netns::new("trc").unwrap();
    let (code, res) = trellis_cni("ADD", &conf, "pm2", Some(&c2.path()), "eth0");
    assert_ne!(code, 0, "a taken host port was published twice: {res}");
    assert!(res["msg"].as_str().unwrap_or_default().contains("18480"), "{res}");
    assert_eq!(cni_endpoints(&h, "pm"), vec!["pm1".to_string()], "the refused container's endpoint is left");

    // DEL releases the port: nothing answers, and it can be published again.
    let (code, res) = trellis_cni("DEL", &conf, "pm1", Some(&c.path()), "eth0");
    assert_eq!(code, 0, "{res}");
    assert!(
        wait_for(Duration::from_secs(10), || trellis_integration::sockets::request(
            &up.outside.path(),
            to,
            Duration::from_millis(300)
        )
        .is_err()),
        "the port still answers after DEL"
    );
    let (code, res) = trellis_cni("ADD", &conf, "pm2", Some(&c2.path()), "eth0");
    assert_eq!(code, 0, "the released port could not be published again: {res}");
    let (code, _) = trellis_cni("DEL", &conf, "pm2", Some(&c2.path()), "eth0");
    assert_eq!(code, 0);
}
