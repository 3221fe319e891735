//! The eBPF endpoint program: attached to (and detached from) endpoints'
//! host veths, its entries per endpoint, the isolation and service tables,
//! the in-kernel DNS table, its counters and monitor events. Without the
//! program loaded every one of these is a no-op.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use super::NetlinkDataplane;
use super::links::LinkSummary;
use crate::dataplane::{DataplaneError, Mac, ProgramSpec, Result, TableOps, Tables};

/// With the eBPF datapath off: detach what an earlier run attached for good
/// to the endpoints' veths under the bpffs `dir` (its programs would go on
/// enforcing tables no one updates) and unpin that run's maps.
pub fn remove_leftover_datapath(dir: &std::path::Path) {
    for e in std::fs::read_dir(dir.join("links")).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        match trellis_ebpf::detach_persistent(&name, &e.path()) {
            Ok(()) => tracing::info!(link = %name, "detached the program an earlier run left (the datapath is off)"),
            Err(err) => tracing::warn!(link = %name, error = %err, "detaching a program an earlier run left"),
        }
    }
    for e in std::fs::read_dir(dir.join("mesh")).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        match trellis_ebpf::detach_mesh_persistent(&name, &e.path()) {
            Ok(()) => {
                tracing::info!(link = %name, "detached the mesh program an earlier run left (the datapath is off)")
            }
            Err(err) => tracing::warn!(link = %name, error = %err, "detaching a mesh program an earlier run left"),
        }
    }
    for e in std::fs::read_dir(dir.join("maps")).into_iter().flatten().flatten() {
        if let Err(err) = std::fs::remove_file(e.path()) {
            tracing::warn!(map = %e.path().display(), error = %err, "unpinning a map an earlier run left");
        }
    }
}

/// Does this namespace have an interface of ifindex `index`? (nix's
/// if_indextoname does not fail for a gone one: it names it "".)
fn index_exists(index: u32) -> bool {
    nix::net::if_::if_indextoname(index).is_ok_and(|n| !n.as_bytes().is_empty())
}

impl NetlinkDataplane {
    /// Drop what the datapath keeps for interfaces that are gone (a
    /// container's veth dies with its namespace, a veth deleted by hand):
    /// attachment markers of names no interface has, and entries and
    /// counters and flow tables of ifindexes no interface has. `links` (a dump) picks the
    /// candidates; each is checked again now, under the datapath's lock
    /// that attachments take too, so one made since the dump stays.
    pub(super) fn sweep_gone_interfaces(&self, links: &HashMap<u32, String>) {
        let Some((dp, markers)) = &self.bpf else { return };
        let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        let names: BTreeSet<&str> = links.values().map(String::as_str).collect();
        for name in self.mesh_markers().into_iter().filter(|n| !names.contains(n.as_str())) {
            if nix::net::if_::if_nametoindex(name.as_str()).is_err()
                && let Err(e) = trellis_ebpf::remove_marker(&self.mesh_dir().join(&name))
            {
                tracing::warn!(link = %name, error = %e, "removing the mesh marker of a gone interface");
            }
        }
        for name in self.pinned_programs().into_iter().filter(|n| !names.contains(n.as_str())) {
            if nix::net::if_::if_nametoindex(name.as_str()).is_err()
                && let Err(e) = trellis_ebpf::remove_marker(&markers.join(&name))
            {
                tracing::warn!(link = %name, error = %e, "removing the attachment marker of a gone interface");
            }
        }
        let mut indexes: BTreeSet<u32> = dp.endpoint_ifindexes().unwrap_or_default().into_iter().collect();
        indexes.extend(dp.counter_ifindexes().unwrap_or_default());
        indexes.extend(dp.flow_table_ifindexes().unwrap_or_default());
        for index in indexes.into_iter().filter(|i| !links.contains_key(i)) {
            if !index_exists(index)
                && let Err(e) = dp.remove_endpoint(index)
            {
                tracing::warn!(ifindex = index, error = %e, "removing the datapath entries of a gone interface");
            }
        }
    }

    /// What the datapath keeps for the link of ifindex `index` named
    /// `name`, before it is deleted: its entry and counters (keyed by this
    /// ifindex, unknown once it is gone) and its attachment marker (a veth
    /// made again under the name needs the program attached again).
    pub(super) fn forget_link(&self, index: u32, name: &str) -> Result<()> {
        let Some((dp, links)) = &self.bpf else { return Ok(()) };
        let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        dp.remove_endpoint(index).map_err(|e| DataplaneError::Ebpf(format!("{name}: {e}")))?;
        // A mesh program goes with its device.
        match trellis_ebpf::remove_marker(&self.mesh_dir().join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(DataplaneError::Io { call: "unpin mesh link", object: name.to_string(), source: e }),
        }
        match trellis_ebpf::remove_marker(&links.join(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DataplaneError::Io { call: "unpin link", object: name.to_string(), source: e }),
        }
    }

    /// Where the mesh programs' attachment markers are (beside `links`).
    fn mesh_dir(&self) -> std::path::PathBuf {
        match &self.bpf {
            Some((_, links)) => links.with_file_name("mesh"),
            None => std::path::PathBuf::new(),
        }
    }

    fn mesh_markers(&self) -> BTreeSet<String> {
        if self.bpf.is_none() {
            return BTreeSet::new();
        }
        std::fs::read_dir(self.mesh_dir())
            .map(|d| d.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
            .unwrap_or_default()
    }

    /// The interfaces with a mesh program: a marker, and the interface.
    pub(super) fn observe_mesh_links(&self, links: &[LinkSummary]) -> BTreeSet<String> {
        let names: BTreeSet<&str> = links.iter().map(|l| l.name.as_str()).collect();
        self.mesh_markers().into_iter().filter(|n| names.contains(n.as_str())).collect()
    }

    pub(super) fn attach_mesh(&self, ifname: &str, role: trellis_ebpf::MeshRole) -> Result<()> {
        let Some((dp, _)) = &self.bpf else { return Ok(()) };
        if ifname == "lo" {
            // The replies to the host's own clients are sent into the
            // loopback from a backend's packet, with no route of the
            // host's attached: the loopback routes them as input, which
            // takes a local source only with accept_local and 127.0.0.1
            // (after the reverse NAT of a client of 127.0.0.1) only with
            // route_localnet; else they are martians. Only the loopback's
            // own settings, never turned off (like ip_forward).
            for knob in ["accept_local", "route_localnet"] {
                let path = format!("/proc/sys/net/ipv4/conf/lo/{knob}");
                std::fs::write(&path, "1").map_err(|e| DataplaneError::Io {
                    call: "enable a loopback setting",
                    object: path.clone(),
                    source: e,
                })?;
            }
        }
        let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        dp.attach_mesh_persistent(ifname, role, &self.mesh_dir().join(ifname), self.attach_mode)
            .map_err(|e| DataplaneError::Ebpf(format!("mesh program on {ifname}: {e}")))
    }

    pub(super) fn detach_mesh(&self, ifname: &str) -> Result<()> {
        if self.bpf.is_none() {
            return Ok(());
        }
        match trellis_ebpf::detach_mesh_persistent(ifname, &self.mesh_dir().join(ifname)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DataplaneError::Io { call: "detach mesh program", object: ifname.to_string(), source: e }),
        }
    }

    fn pinned_programs(&self) -> BTreeSet<String> {
        let Some((_, links)) = &self.bpf else { return BTreeSet::new() };
        std::fs::read_dir(links)
            .map(|d| d.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
            .unwrap_or_default()
    }

    /// The interfaces that have the program, and the flags of their
    /// entries. An endpoint has its program when it is attached (its
    /// marker) and its entry is in the map (an entry deleted by hand is
    /// repaired).
    pub(super) fn observe_programs(&self, links: &[LinkSummary]) -> (BTreeSet<String>, BTreeMap<String, u32>) {
        let mut programs = self.pinned_programs();
        let mut program_flags = BTreeMap::new();
        if let Some((dp, _)) = &self.bpf {
            let in_map: BTreeMap<u32, u32> = dp
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .endpoint_entries()
                .map(|v| v.into_iter().map(|(i, info)| (i, info.flags)).collect())
                .unwrap_or_default();
            let index: HashMap<&str, u32> = links.iter().map(|l| (l.name.as_str(), l.index)).collect();
            programs.retain(|name| index.get(name.as_str()).is_some_and(|i| in_map.contains_key(i)));
            for name in &programs {
                if let Some(f) = index.get(name.as_str()).and_then(|i| in_map.get(i)) {
                    program_flags.insert(name.clone(), *f);
                }
            }
        }
        (programs, program_flags)
    }

    pub(super) async fn attach_program(
        &self,
        ifname: &str,
        ip: Option<IpAddr>,
        ip6: Option<IpAddr>,
        mac: Mac,
        program: &ProgramSpec,
    ) -> Result<()> {
        let Some((dp, links)) = &self.bpf else { return Ok(()) };
        // An IPv6-only endpoint has no IPv4 address: 0.0.0.0 in its entry
        // (every IPv4 source but the unspecified one is spoofed then).
        let v4 = match ip {
            Some(IpAddr::V4(v4)) => v4,
            _ if ip6.is_some() => std::net::Ipv4Addr::UNSPECIFIED,
            _ => return Ok(()),
        };
        let index = Self::require(&self.handle, ifname).await?;
        let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        let ebpf = |e: trellis_ebpf::DatapathError| DataplaneError::Ebpf(format!("{ifname}: {e}"));
        let mut info = trellis_ebpf::EndpointInfo::new(v4, mac.0, program.vni);
        if let Some((gw, gw_mac)) = program.dns_at {
            info = info.with_dns_at(gw, gw_mac.0);
        }
        if let Some(IpAddr::V6(a6)) = ip6 {
            info = info.with_ip6(a6);
        }
        if let Some(gw6) = program.dns6_at {
            info = info.with_dns6_at(gw6);
        }
        let info = info.with_flags(program.flags());
        dp.set_endpoint(index, info).map_err(ebpf)?;
        if links.join(ifname).is_dir() {
            // Attached already (its map entry was what was missing).
            return Ok(());
        }
        dp.attach_persistent(ifname, &links.join(ifname), self.attach_mode).map_err(ebpf)
    }

    pub(super) async fn detach_program(&self, ifname: &str) -> Result<()> {
        let Some((dp, links)) = &self.bpf else { return Ok(()) };
        if let Some(index) = Self::index_of(&self.handle, ifname).await? {
            let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
            dp.remove_endpoint(index).map_err(|e| DataplaneError::Ebpf(format!("{ifname}: {e}")))?;
        }
        match trellis_ebpf::remove_marker(&links.join(ifname)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DataplaneError::Io { call: "unpin link", object: ifname.to_string(), source: e }),
        }
    }

    pub(super) fn update_tables(&self, ops: &TableOps) -> Result<()> {
        let applied = self.apply_table_ops(ops);
        let mut seen = self.tables_seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.generation += 1;
        match (&applied, seen.tables.as_mut()) {
            (Ok(()), Some(t)) => std::sync::Arc::make_mut(t).apply(ops),
            // Partly applied: read everything back next time.
            _ => seen.tables = None,
        }
        applied
    }

    fn apply_table_ops(&self, ops: &TableOps) -> Result<()> {
        let Some((dp, _)) = &self.bpf else { return Ok(()) };
        let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        let e = |what: &str| {
            let what = what.to_string();
            move |err: trellis_ebpf::DatapathError| DataplaneError::Ebpf(format!("{what}: {err}"))
        };
        for (k, v) in &ops.put_backends {
            dp.put_backend(*k, *v).map_err(e("backend"))?;
        }
        for (id, ips) in &ops.put_maglev {
            dp.put_maglev(*id, &trellis_ebpf::maglev::table(ips)).map_err(e("maglev table"))?;
        }
        for (k, v) in &ops.put_nets {
            dp.put_net(*k, *v).map_err(e("subnet"))?;
        }
        for (k, v) in &ops.put_nets6 {
            dp.put_net6(*k, *v).map_err(e("IPv6 subnet"))?;
        }
        for (k, v) in &ops.put_backends6 {
            dp.put_backend6(*k, *v).map_err(e("IPv6 backend"))?;
        }
        for (id, ips) in &ops.put_maglev6 {
            dp.put_maglev6(*id, &trellis_ebpf::maglev::table6(ips)).map_err(e("IPv6 maglev table"))?;
        }
        for (k, v) in &ops.put_services {
            dp.put_service(*k, *v).map_err(e("service"))?;
        }
        for (k, v) in &ops.put_services6 {
            dp.put_service6(*k, *v).map_err(e("IPv6 service"))?;
        }
        for (k, v) in &ops.put_vips {
            dp.put_vip(*k, *v).map_err(e("VIP"))?;
        }
        for (k, v) in &ops.put_vips6 {
            dp.put_vip6(*k, *v).map_err(e("IPv6 VIP"))?;
        }
        for a in &ops.put_mesh_addrs {
            dp.put_mesh_addr(*a).map_err(e("mesh address"))?;
        }
        if let Some(Some(mac)) = ops.set_mesh {
            dp.set_mesh_mac(mac).map_err(e("mesh MAC"))?;
            dp.set_config(trellis_ebpf::CFG_MESH, true).map_err(e("mesh switch"))?;
        }
        for (k, v) in &ops.put_published {
            let bridge = nix::net::if_::if_nametoindex(v.bridge.as_str())
                .map_err(|err| DataplaneError::Ebpf(format!("published port: bridge {}: {err}", v.bridge)))?;
            dp.put_published(*k, trellis_ebpf::PubInfo { bridge, ..v.info }).map_err(e("published port"))?;
        }
        for k in &ops.del_published {
            dp.remove_published(*k).map_err(e("published port"))?;
        }
        if let Some(None) = ops.set_mesh {
            dp.set_config(trellis_ebpf::CFG_MESH, false).map_err(e("mesh switch"))?;
            dp.set_mesh_mac([0; 6]).map_err(e("mesh MAC"))?;
        }
        for a in &ops.del_mesh_addrs {
            dp.remove_mesh_addr(*a).map_err(e("mesh address"))?;
        }
        for k in &ops.del_services {
            dp.remove_service(*k).map_err(e("service"))?;
        }
        for k in &ops.del_services6 {
            dp.remove_service6(*k).map_err(e("IPv6 service"))?;
        }
        for k in &ops.del_vips {
            dp.remove_vip(*k).map_err(e("VIP"))?;
        }
        for k in &ops.del_vips6 {
            dp.remove_vip6(*k).map_err(e("IPv6 VIP"))?;
        }
        for k in &ops.del_maglev6 {
            dp.remove_maglev6(*k).map_err(e("IPv6 maglev table"))?;
        }
        for k in &ops.del_backends6 {
            dp.remove_backend6(*k).map_err(e("IPv6 backend"))?;
        }
        for k in &ops.del_maglev {
            dp.remove_maglev(*k).map_err(e("maglev table"))?;
            dp.remove_svc_stats(*k).map_err(e("service counters"))?;
        }
        for k in &ops.del_backends {
            dp.remove_backend(*k).map_err(e("backend"))?;
        }
        for k in &ops.del_nets {
            dp.remove_net(*k).map_err(e("subnet"))?;
        }
        for k in &ops.del_nets6 {
            dp.remove_net6(*k).map_err(e("IPv6 subnet"))?;
        }
        Ok(())
    }

    /// The tables: read back from the kernel when asked for `fresh` ones
    /// on every tenth call, else as last read and changed since (shared,
    /// not copied); whether they are that cache, and its generation.
    pub(super) fn observe_tables(&self, fresh: bool) -> Result<(std::sync::Arc<Tables>, bool, u64)> {
        if self.bpf.is_none() {
            return Ok(Default::default());
        }
        {
            let mut seen = self.tables_seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.uses = seen.uses.wrapping_add(1);
            let read_back = fresh && seen.uses.is_multiple_of(10);
            if let Some(t) = &seen.tables
                && !read_back
            {
                return Ok((t.clone(), true, seen.generation));
            }
        }
        let t = std::sync::Arc::new(self.read_tables()?);
        let mut seen = self.tables_seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.generation += 1;
        seen.tables = Some(t.clone());
        Ok((t, false, seen.generation))
    }

    /// The tables as the kernel has them (Maglev tables by id).
    fn read_tables(&self) -> Result<Tables> {
        let Some((dp, _)) = &self.bpf else { return Ok(Default::default()) };
        let dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        let e = |err: trellis_ebpf::DatapathError| DataplaneError::Ebpf(format!("reading the tables: {err}"));
        Ok(Tables {
            nets: dp.nets().map_err(e)?.into_iter().collect(),
            nets6: dp.nets6().map_err(e)?.into_iter().collect(),
            vips: dp.vips().map_err(e)?.into_iter().collect(),
            services: dp.services().map_err(e)?.into_iter().collect(),
            maglev: dp.maglev_ids().map_err(e)?.into_iter().map(|id| (id, Vec::new())).collect(),
            backends: dp.backends().map_err(e)?.into_iter().collect(),
            vips6: dp.vips6().map_err(e)?.into_iter().collect(),
            services6: dp.services6().map_err(e)?.into_iter().collect(),
            maglev6: dp.maglev6_ids().map_err(e)?.into_iter().map(|id| (id, Vec::new())).collect(),
            backends6: dp.backends6().map_err(e)?.into_iter().collect(),
            published: dp
                .published()
                .map_err(e)?
                .into_iter()
                .map(|(k, v)| {
                    // A bridge gone (or made again) since reads as ""
                    // (nix names a gone index so): rewritten.
                    let bridge = nix::net::if_::if_indextoname(v.bridge)
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    (k, crate::dataplane::tables::Published { info: trellis_ebpf::PubInfo { bridge: 0, ..v }, bridge })
                })
                .collect(),
            mesh_addrs: dp.mesh_addrs().map_err(e)?.into_iter().collect(),
            mesh_mac: {
                let on = dp.config().map_err(e)? & trellis_ebpf::CFG_MESH != 0;
                let mac = dp.mesh_mac().map_err(e)?;
                (on && mac != [0; 6]).then_some(mac)
            },
        })
    }

    /// The monitor's events on or off (left alone when already so).
    pub(super) fn set_monitor_events(&self, on: bool) {
        if let Some((dp, _)) = &self.bpf {
            let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
            if dp.events_on().ok() != Some(on)
                && let Err(e) = dp.set_events(on)
            {
                tracing::warn!(error = %e, "switching monitor events");
            }
        }
    }

    pub(super) fn read_service_stats(&self, id: u32) -> Option<trellis_ebpf::SvcStats> {
        let (dp, _) = self.bpf.as_ref()?;
        dp.lock().unwrap_or_else(|p| p.into_inner()).svc_stats(id).ok()
    }

    /// Make the in-kernel DNS table hold exactly `want`, from what was last
    /// written (read back in full on every tenth sync and after a failure).
    /// Put or remove these entries of the DNS table (and of the picture
    /// kept of it; a failure drops the picture: the next sync reads back).
    pub(super) fn patch_dns_table(
        &self,
        entries: &[(trellis_ebpf::DnsKey, Option<trellis_ebpf::DnsAnswer>)],
    ) -> Result<()> {
        let Some((dp, _)) = &self.bpf else { return Ok(()) };
        let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = self.dns_seen.lock().unwrap_or_else(|p| p.into_inner());
        let applied = entries.iter().try_for_each(|(k, a)| match a {
            Some(a) => dp.put_dns(*k, *a),
            None => dp.remove_dns(*k),
        });
        match (&applied, seen.0.as_mut()) {
            (Ok(()), Some(have)) => {
                for (k, a) in entries {
                    match a {
                        Some(a) => have.insert(*k, *a),
                        None => have.remove(k),
                    };
                }
            }
            _ => seen.0 = None,
        }
        applied.map_err(|e| DataplaneError::Ebpf(format!("dns table: {e}")))
    }

    pub(super) fn sync_dns_table(&self, want: &BTreeMap<trellis_ebpf::DnsKey, trellis_ebpf::DnsAnswer>) -> Result<()> {
        let Some((dp, _)) = &self.bpf else { return Ok(()) };
        let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        let ebpf = |e: trellis_ebpf::DatapathError| DataplaneError::Ebpf(format!("dns table: {e}"));
        let mut seen = self.dns_seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.1 = seen.1.wrapping_add(1);
        let have = match seen.0.take() {
            Some(h) if !seen.1.is_multiple_of(10) => h,
            _ => dp.dns_entries().map_err(ebpf)?.into_iter().collect(),
        };
        // The same names and answers (most calls): nothing to write.
        if have == *want {
            seen.0 = Some(have);
            return Ok(());
        }
        // New and changed names first, then the ones that went.
        let applied = (|| {
            for (k, v) in want {
                if have.get(k) != Some(v) {
                    dp.put_dns(*k, *v)?;
                }
            }
            for k in have.keys().filter(|k| !want.contains_key(k)) {
                dp.remove_dns(*k)?;
            }
            Ok(())
        })();
        seen.0 = applied.is_ok().then(|| want.clone());
        applied.map_err(ebpf)
    }

    pub(super) fn set_dns_config(&self, kernel: bool, ra: bool) -> Result<()> {
        let Some((dp, _)) = &self.bpf else { return Ok(()) };
        let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        let ebpf = |e: trellis_ebpf::DatapathError| DataplaneError::Ebpf(format!("dns config: {e}"));
        dp.set_config(trellis_ebpf::CFG_DNS_KERNEL, kernel).map_err(ebpf)?;
        dp.set_config(trellis_ebpf::CFG_DNS_RA, ra).map_err(ebpf)
    }

    pub(super) fn read_dns_stats(&self) -> Option<trellis_ebpf::DnsStats> {
        let (dp, _) = self.bpf.as_ref()?;
        dp.lock().unwrap_or_else(|p| p.into_inner()).dns_stats().ok()
    }

    /// Per-endpoint counters, by host interface name.
    pub(super) fn read_endpoint_counters(&self) -> Vec<(String, trellis_ebpf::EndpointCounters)> {
        let Some((dp, _)) = &self.bpf else { return Vec::new() };
        let dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(indexes) = dp.endpoint_ifindexes() else { return Vec::new() };
        indexes
            .into_iter()
            .filter_map(|i| {
                let name = nix::net::if_::if_indextoname(i).ok()?.to_string_lossy().into_owned();
                if name.is_empty() {
                    return None; // gone (nix names a gone index "")
                }
                Some((name, dp.counters(i).ok()?))
            })
            .collect()
    }
}
