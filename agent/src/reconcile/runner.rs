//! Runs reconcile passes, one at a time, against a [`Dataplane`]:
//! the desired state loaded, the kernel observed (or taken from the
//! picture kept since the last full pass), the diff applied, the outcome
//! reported.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::{DesiredHost, Identity, desired_host, diff};
use crate::dataplane::{Action, Dataplane, DataplaneError, Observed};
use crate::model::{self, EndpointRecord, HostRecord, NetworkRecord, ServiceRecord};

/// The outcome of one reconcile pass.
#[derive(Clone, Debug, Default)]
pub struct PassReport {
    pub generation: u64,
    pub actions: usize,
    /// Errors, with the endpoint they concern when there is one.
    pub errors: Vec<(Option<String>, String)>,
    /// Endpoints whose network namespace no longer exists.
    pub gone: Vec<String>,
    /// Endpoints being deleted (and not draining) whose devices are gone
    /// now: their records and addresses can go.
    pub finalizable: Vec<EndpointRecord>,
    pub finished: Option<SystemTime>,
    pub duration: Duration,
    /// The pass read the whole kernel state back.
    pub full: bool,
    /// Encrypted networks whose keys this host's kernel now has, with the
    /// epochs (empty when any SA or policy failed).
    pub acks: BTreeMap<String, trellis_ipsec::Ack>,
    /// Networks this host needs a mesh address on and has none (ids): to
    /// allocate.
    pub mesh_addrs_missing: std::collections::BTreeSet<String>,
    /// This host's mesh addresses it no longer needs whose veths are gone:
    /// to release.
    pub mesh_addrs_releasable: Vec<model::MeshAddrRecord>,
}

impl PassReport {
    /// The error of an endpoint's creation in this pass, if it failed.
    pub fn endpoint_error(&self, id: &str) -> Option<&str> {
        self.errors.iter().find(|(e, _)| e.as_deref() == Some(id)).map(|(_, m)| m.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("reading the desired state: {0}")]
    Desired(String),
    #[error("observing the kernel: {0}")]
    Observe(#[from] DataplaneError),
}

/// The desired state of the whole cluster at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The store revision it reflects (0: not known).
    pub revision: i64,
    pub networks: Arc<Vec<NetworkRecord>>,
    pub endpoints: model::Table<EndpointRecord>,
    pub hosts: Arc<Vec<HostRecord>>,
    pub services: Arc<Vec<ServiceRecord>>,
    /// Encrypted networks' key rings, by network id.
    pub keys: Arc<BTreeMap<String, trellis_ipsec::KeyRing>>,
    /// Ports a process of this host holds (filled in by the runner, from
    /// the host, when some service is published on the mesh): the mesh
    /// does not take them here.
    pub held_ports: std::collections::BTreeSet<(crate::model::Proto, u16)>,
    /// The hosts' mesh addresses (every host's while a service is
    /// published, else this host's own).
    pub mesh_addrs: Arc<Vec<crate::model::MeshAddrRecord>>,
}

impl Snapshot {
    /// The same records as `other` (each part the same allocation: what an
    /// informer hands out for a view that did not change) and the same
    /// held ports.
    pub fn same(&self, other: &Snapshot) -> bool {
        Arc::ptr_eq(&self.networks, &other.networks)
            && self.endpoints.ptr_eq(&other.endpoints)
            && Arc::ptr_eq(&self.hosts, &other.hosts)
            && Arc::ptr_eq(&self.services, &other.services)
            && Arc::ptr_eq(&self.keys, &other.keys)
            && Arc::ptr_eq(&self.mesh_addrs, &other.mesh_addrs)
            && self.held_ports == other.held_ports
    }
}

/// Where the reconciler reads the desired state from.
#[async_trait::async_trait]
pub trait DesiredSource: Send + Sync + 'static {
    async fn load(&self) -> Result<Snapshot, String>;
}

/// Runs passes, one at a time; concurrent callers share a pass that
/// started after they asked.
pub struct Reconciler {
    dp: Arc<dyn Dataplane>,
    source: Arc<dyn DesiredSource>,
    me: Identity,
    running: tokio::sync::Mutex<()>,
    started: AtomicU64,
    last: Mutex<Arc<PassReport>>,
    /// The kernel state as last observed, kept current with every action
    /// applied since: passes between full ones use it instead of reading
    /// the kernel back (a full pass, periodically, catches outside changes).
    seen: Mutex<Option<Observed>>,
    /// The desired state of the last pass (for status and host listings).
    last_desired: Mutex<Arc<DesiredHost>>,
    /// What that desired state was computed from: a pass whose snapshot
    /// shares every part with it (an informer's view that did not change)
    /// reuses it instead of computing it again.
    last_input: Mutex<Option<Snapshot>>,
    /// Passes that computed the desired state, and those that reused it.
    pub computed: AtomicU64,
    pub reused: AtomicU64,
    /// The desired state (by address) and the generation of the
    /// dataplane's tables of the last pass that found the tables equal to
    /// it: the next pass with both the same skips comparing them.
    tables_clean: Mutex<Option<(usize, u64)>>,
    /// The highest outbound sequence number read back for each SA: an SA
    /// that vanished (deleted by hand, a flush) is re-created continuing
    /// past it, or the peer's anti-replay window drops its packets.
    sent_seq: Mutex<std::collections::BTreeMap<trellis_ipsec::xfrm::SaId, u64>>,
    /// Passes that skipped the tables' comparison so.
    pub tables_skipped: AtomicU64,
    /// Passes that patched the last desired state with a change of other
    /// hosts' endpoints instead of computing it ([`super::incremental`]).
    pub incremental: AtomicU64,
    index: Mutex<super::incremental::Index>,
    pub repairs: AtomicU64,
    /// Duration of the last full pass, in microseconds.
    pub last_full_us: AtomicU64,
}

impl Reconciler {
    pub fn new(dp: Arc<dyn Dataplane>, source: Arc<dyn DesiredSource>, me: Identity) -> Reconciler {
        Reconciler {
            dp,
            source,
            me,
            running: tokio::sync::Mutex::new(()),
            started: AtomicU64::new(0),
            last: Mutex::new(Arc::new(PassReport::default())),
            seen: Mutex::new(None),
            last_desired: Mutex::new(Arc::new(DesiredHost::default())),
            last_input: Mutex::new(None),
            computed: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            tables_clean: Mutex::new(None),
            sent_seq: Mutex::default(),
            tables_skipped: AtomicU64::new(0),
            incremental: AtomicU64::new(0),
            index: Mutex::default(),
            repairs: AtomicU64::new(0),
            last_full_us: AtomicU64::new(0),
        }
    }

    /// The report of the last finished pass.
    pub fn last(&self) -> Arc<PassReport> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The desired state the last pass worked towards.
    pub fn last_desired(&self) -> Arc<DesiredHost> {
        self.last_desired.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The kernel state as the reconciler last knew it.
    pub fn seen(&self) -> Observed {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default()
    }

    /// Run a pass that starts after this call (or share one that did).
    /// It reads back the egress rules only if it is the first pass.
    pub async fn pass(&self) -> Result<Arc<PassReport>, ReconcileError> {
        self.run(false).await
    }

    /// A pass that also reads back every rule (the periodic resync).
    pub async fn full_pass(&self) -> Result<Arc<PassReport>, ReconcileError> {
        self.run(true).await
    }

    /// An outbound SA re-created after it vanished: the same SA starting
    /// past the sequence numbers it was seen to send (plus headroom for
    /// what it sent after that read-back: 2^24 packets, 18 s at 10 Gbit/s
    /// of full-size frames, while it is read back every pass).
    fn resumed_sa(&self, a: &Action) -> Option<Action> {
        let Action::Xfrm { op: trellis_ipsec::XfrmOp::AddSa(sa), vxlan } = a else { return None };
        let sent = *self.sent_seq.lock().unwrap_or_else(|p| p.into_inner()).get(&sa.id())?;
        let mut sa = sa.clone();
        sa.start_seq = sent.saturating_add(1 << 24);
        tracing::info!(
            spi = format_args!("{:#010x}", sa.material.spi),
            from = sa.start_seq,
            "an SA that vanished is re-created past the sequence numbers it sent"
        );
        Some(Action::Xfrm { op: trellis_ipsec::XfrmOp::AddSa(sa), vxlan: vxlan.clone() })
    }

    /// The last desired state patched with `next`'s change of other hosts'
    /// endpoints, and its actions against `seen` (see
    /// [`super::incremental`]); `None` when the change is of another kind.
    fn patch(&self, next: &Snapshot, seen: &Observed) -> Option<(Arc<DesiredHost>, Vec<Action>)> {
        let prev = self.last_input.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
        // Patched in place (held meanwhile: O(change)), unless a reader
        // holds it.
        let mut want = self.last_desired.lock().unwrap_or_else(|p| p.into_inner());
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let actions = super::incremental::remote_endpoints(&prev, next, &mut want, seen, &self.me, &mut index)?;
        Some((want.clone(), actions))
    }

    async fn run(&self, full: bool) -> Result<Arc<PassReport>, ReconcileError> {
        let wanted = self.started.load(Ordering::SeqCst) + 1;
        let _guard = self.running.lock().await;
        let last = self.last();
        if !full && last.generation >= wanted {
            return Ok(last);
        }
        let generation = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let t0 = Instant::now();
        let mut snapshot = self.source.load().await.map_err(ReconcileError::Desired)?;
        if snapshot.services.iter().any(|s| !s.publish.is_empty()) {
            match self.dp.held_ports() {
                Ok(held) => snapshot.held_ports = held,
                Err(e) => tracing::warn!(error = %e, "reading the host's held ports for the routing mesh"),
            }
        }
        let cached = if full { None } else { self.seen.lock().unwrap_or_else(|p| p.into_inner()).take() };
        let cached_was_none = cached.is_none();
        // Between full passes, after one that applied everything it meant
        // to: a change of other hosts' endpoints patches the last desired
        // state and yields only its own actions.
        let patched = match (&cached, last.errors.is_empty()) {
            (Some(seen), true) => self.patch(&snapshot, seen),
            _ => None,
        };
        let reuse = patched.is_none()
            && self.last_input.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|l| l.same(&snapshot));
        let want = if let Some((want, _)) = &patched {
            self.incremental.fetch_add(1, Ordering::Relaxed);
            want.clone()
        } else if reuse {
            self.reused.fetch_add(1, Ordering::Relaxed);
            self.last_desired()
        } else {
            self.computed.fetch_add(1, Ordering::Relaxed);
            let want = Arc::new(desired_host(&snapshot, &self.me));
            let last = self.last_desired();
            for (service, p) in want.mesh_held.iter().filter(|h| !last.mesh_held.contains(h)) {
                tracing::warn!(service = %service, port = %p, "a process of this host holds the port: the routing mesh does not publish it here");
            }
            want
        };
        let t_load = t0.elapsed();
        let mut observed = match cached {
            Some(o) => o,
            None => self.dp.observe(true).await?,
        };
        let t_observe = t0.elapsed();
        {
            let mut sent = self.sent_seq.lock().unwrap_or_else(|p| p.into_inner());
            for (id, sa) in observed.xfrm.sas.iter().filter(|(_, sa)| sa.oseq > 0) {
                let e = sent.entry(*id).or_default();
                *e = (*e).max(sa.oseq);
            }
        }
        let want_at = Arc::as_ptr(&want) as usize;
        let observed_at = (observed.tables_cached, observed.tables_generation);
        let clean = *self.tables_clean.lock().unwrap_or_else(|p| p.into_inner());
        let patched_pass = patched.is_some();
        let actions = if let Some((_, actions)) = patched {
            actions
        } else if reuse && observed_at.0 && clean == Some((want_at, observed_at.1)) {
            self.tables_skipped.fetch_add(1, Ordering::Relaxed);
            super::diff::diff_but_tables(&want, &observed)
        } else {
            diff(&want, &observed)
        };
        let tables_changed = actions.iter().any(|a| matches!(a, Action::UpdateTables(_)));
        let mut report = PassReport { generation, actions: actions.len(), ..PassReport::default() };
        // A failed endpoint creation must not stop the others, but the
        // remaining steps of a failed bridge, veth or attach are skipped.
        let mut failed_links: Vec<String> = Vec::new();
        let mut xfrm_failed = false;
        let mut trust_cache = true;
        for a in &actions {
            let link = match a {
                Action::SetLink { name, .. }
                | Action::AddAddress { link: name, .. }
                | Action::DelAddress { link: name, .. }
                | Action::AddFdb { link: name, .. }
                | Action::AddNeigh { link: name, .. } => Some(name),
                Action::CreateVxlan(v) => Some(&v.name),
                _ => None,
            };
            if link.is_some_and(|l| failed_links.contains(l)) {
                continue;
            }
            match a {
                Action::UpdateTables(ops) => tracing::debug!(changes = ops.len(), "changing the datapath's tables"),
                Action::ApplyEgress(_) => tracing::debug!("applying the egress rules"),
                a => tracing::debug!(action = ?a, "applying"),
            }
            let resumed = self.resumed_sa(a);
            let applied = self.dp.apply(resumed.as_ref().unwrap_or(a)).await;
            let recorded = match &applied {
                Ok(()) => observed.record(a).is_ok(),
                // A failed endpoint creation cleans up after itself.
                Err(_) => matches!(a, Action::CreateEndpoint(_)),
            };
            trust_cache &= recorded;
            if let Err(e) = applied {
                if let Action::CreateBridge { name, .. } | Action::DeleteLink { name } = a {
                    failed_links.push(name.clone());
                }
                if let Action::CreateVxlan(v) = a {
                    failed_links.push(v.name.clone());
                }
                // A veth that was not made, or whose program did not go
                // on, is not brought up (fail closed: it stays down until
                // a pass attaches its program).
                if let Action::CreateEndpoint(s) = a {
                    failed_links.push(s.host_if.clone());
                }
                if let Action::AttachProgram { ifname, .. } = a {
                    failed_links.push(ifname.clone());
                }
                // Fail closed: an encrypted network whose SAs or policies
                // did not go in gets no new tunnel entries this pass.
                if let Action::Xfrm { vxlan: Some(v), .. } = a {
                    failed_links.push(v.clone());
                    xfrm_failed = true;
                }
                if let Action::Xfrm { vxlan: None, .. } = a {
                    xfrm_failed = true;
                }
                if let (Some(id), DataplaneError::NetnsGone(_)) = (a.endpoint(), &e) {
                    report.gone.push(id.to_string());
                }
                tracing::warn!(action = ?a, error = %e, "reconcile action failed");
                report.errors.push((a.endpoint().map(str::to_string), e.to_string()));
            }
        }
        if !actions.is_empty() {
            tracing::debug!(
                actions = actions.len(),
                errors = report.errors.len(),
                full,
                load_us = t_load.as_micros() as u64,
                observe_us = (t_observe - t_load).as_micros() as u64,
                total_us = t0.elapsed().as_micros() as u64,
                "reconciled"
            );
        }
        let have: std::collections::BTreeSet<&str> =
            snapshot.mesh_addrs.iter().filter(|m| m.host == self.me.host).map(|m| m.network_id.as_str()).collect();
        report.mesh_addrs_missing =
            want.mesh_addrs_wanted.iter().filter(|n| !have.contains(n.as_str())).cloned().collect();
        // Released only once the kernel no longer has them (never reused
        // while this host still answers on them).
        report.mesh_addrs_releasable = snapshot
            .mesh_addrs
            .iter()
            .filter(|m| m.host == self.me.host && !want.mesh_addrs_wanted.contains(&m.network_id))
            .filter(|m| {
                let (port, ifname) = (model::mesh_port_name(&m.network_id), model::mesh_ifname(&m.network_id));
                trust_cache && !observed.links.contains_key(&port) && !observed.links.contains_key(&ifname)
            })
            .cloned()
            .collect();
        if trust_cache {
            *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(observed);
        }
        // The tables matched the desired ones in this pass (nothing to
        // change, nothing failed), as the dataplane pictured them then. A
        // patched pass did not compare them: what the last one found stands.
        if !patched_pass {
            *self.tables_clean.lock().unwrap_or_else(|p| p.into_inner()) =
                (!tables_changed && report.errors.is_empty()).then_some((want_at, observed_at.1));
        }
        if !xfrm_failed {
            report.acks = want.acks.clone();
        }
        *self.last_desired.lock().unwrap_or_else(|p| p.into_inner()) = want;
        // A patched pass changed nothing of this host's endpoints: what
        // was finalizable was reported by the pass before (and is again by
        // the next full one).
        if !patched_pass {
            report.finalizable = snapshot
                .endpoints
                .iter()
                .filter(|e| e.host == self.me.host && e.deleting && !e.draining())
                .filter(|e| !failed_links.contains(&model::host_ifname(&e.id)))
                .cloned()
                .collect();
        }
        *self.last_input.lock().unwrap_or_else(|p| p.into_inner()) = Some(snapshot);
        self.repairs.fetch_add(actions.len() as u64, Ordering::Relaxed);
        report.duration = t0.elapsed();
        report.full = cached_was_none;
        if cached_was_none {
            self.last_full_us.store(report.duration.as_micros() as u64, Ordering::Relaxed);
        }
        report.finished = Some(SystemTime::now());
        let report = Arc::new(report);
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = report.clone();
        Ok(report)
    }
}
