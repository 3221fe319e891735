//! Which hosts the data path still counts as present.
//!
//! A host is in the store while its lease lives; a host that loses the
//! store (a partition between it and etcd, its agent stopped for an
//! upgrade) loses the lease, and its record goes, although its containers
//! and the wire to them are fine. The data path does not take the store's
//! word alone: a host whose record went is *kept* — its tunnel entries and
//! its backends stay — for as long as this agent's probes of it (underlay
//! and through the tunnel, every second) still answer. It is gone when
//! both say so: no record, and probes unanswered
//! ([`crate::telemetry::probe::MISSED_FOR_DOWN`] in a row). A host that was
//! never probed (the prober unavailable) is not kept: the lease decides.
//!
//! Pure: [`Liveness::update`] takes the live records and the probes'
//! verdicts and says whether the kept set changed.

use std::collections::BTreeMap;

use super::HostRecord;

/// What this agent's probes say of a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Probed, and answering over the underlay and through the tunnel.
    Answering,
    /// Probed, and the last probes went unanswered.
    Silent,
    /// Not probed (yet, or at all).
    Unprobed,
}

/// What one [`Liveness::update`] changed: hosts newly kept (their record
/// went, their path answers) and hosts no longer kept (registered again,
/// or gone).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeptChange {
    pub kept: Vec<String>,
    pub released: Vec<String>,
}

impl KeptChange {
    pub fn changed(&self) -> bool {
        !(self.kept.is_empty() && self.released.is_empty())
    }
}

/// The hosts seen live, and those kept after their record went.
#[derive(Clone, Debug, Default)]
pub struct Liveness {
    /// Every host's last record while it was live.
    seen: BTreeMap<String, HostRecord>,
    /// Hosts whose record went while their data path answers.
    kept: BTreeMap<String, HostRecord>,
}

impl Liveness {
    /// Follow the live records (`me` excluded) and the probes: a host that
    /// left the records is kept while its path answers; a kept host goes
    /// when its path stops answering or it registers again (then it is
    /// live). Returns who joined and who left the kept set.
    pub fn update(&mut self, live: &[HostRecord], me: &str, path: impl Fn(&str) -> Path) -> KeptChange {
        let before: Vec<String> = self.kept.keys().cloned().collect();
        let now: BTreeMap<String, HostRecord> =
            live.iter().filter(|h| h.id != me).map(|h| (h.id.clone(), h.clone())).collect();
        for (id, record) in std::mem::take(&mut self.seen) {
            if !now.contains_key(&id) {
                self.kept.insert(id, record);
            }
        }
        self.kept.retain(|id, _| !now.contains_key(id) && path(id) == Path::Answering);
        self.seen = now;
        KeptChange {
            kept: self.kept.keys().filter(|id| !before.contains(id)).cloned().collect(),
            released: before.into_iter().filter(|id| !self.kept.contains_key(id)).collect(),
        }
    }

    /// The hosts kept, by id.
    pub fn kept(&self) -> &BTreeMap<String, HostRecord> {
        &self.kept
    }

    pub fn is_kept(&self, id: &str) -> bool {
        self.kept.contains_key(id)
    }

    /// The live records and the kept ones: the hosts the data path serves.
    pub fn present(&self, live: &[HostRecord]) -> Vec<HostRecord> {
        let mut all = live.to_vec();
        all.extend(self.kept.values().filter(|k| !live.iter().any(|h| h.id == k.id)).cloned());
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str) -> HostRecord {
        HostRecord {
            id: id.into(),
            hostname: id.into(),
            underlay: [10, 0, 0, id.len() as u8].into(),
            vtep_mac: crate::model::Mac([2, 0, 0, 0, 0, id.len() as u8]),
            vxlan_port: 4789,
            capabilities: Default::default(),
            version: "t".into(),
            started_unix: 0,
            underlay_mtu: 0,
        }
    }

    #[test]
    fn a_host_whose_record_went_is_kept_while_its_path_answers() {
        let mut l = Liveness::default();
        let (me, a, b) = (host("me"), host("aa"), host("bbb"));
        assert!(!l.update(&[me.clone(), a.clone(), b.clone()], "me", |_| Path::Answering).changed());
        assert!(l.kept().is_empty());
        // b's lease expires; its probes still answer: kept, record and all.
        assert_eq!(
            l.update(&[me.clone(), a.clone()], "me", |_| Path::Answering),
            KeptChange { kept: vec!["bbb".into()], released: vec![] }
        );
        assert_eq!(l.kept().get("bbb"), Some(&b));
        let present = l.present(&[me.clone(), a.clone()]);
        assert_eq!(present.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(), ["me", "aa", "bbb"]);
        // Still answering a while later: nothing changes.
        assert!(!l.update(&[me.clone(), a.clone()], "me", |_| Path::Answering).changed());
        assert!(l.is_kept("bbb"));
        // Its probes go unanswered: both say it is gone.
        assert_eq!(
            l.update(&[me.clone(), a.clone()], "me", |id| if id == "bbb" { Path::Silent } else { Path::Answering }),
            KeptChange { kept: vec![], released: vec!["bbb".into()] }
        );
        assert!(l.kept().is_empty());
        assert_eq!(l.present(&[me, a]).len(), 2);
    }

    #[test]
    fn a_host_already_silent_or_never_probed_when_its_record_goes_is_not_kept() {
        for verdict in [Path::Silent, Path::Unprobed] {
            let mut l = Liveness::default();
            l.update(&[host("me"), host("aa")], "me", |_| verdict);
            assert!(!l.update(&[host("me")], "me", |_| verdict).changed(), "{verdict:?}");
            assert!(l.kept().is_empty(), "{verdict:?}");
        }
    }

    #[test]
    fn a_kept_host_that_registers_again_is_live_not_kept() {
        let mut l = Liveness::default();
        l.update(&[host("aa")], "me", |_| Path::Answering);
        assert!(l.update(&[], "me", |_| Path::Answering).changed());
        // It comes back (a new record: its agent restarted meanwhile).
        let mut back = host("aa");
        back.started_unix = 7;
        assert!(l.update(std::slice::from_ref(&back), "me", |_| Path::Answering).changed());
        assert!(l.kept().is_empty());
        assert_eq!(l.present(std::slice::from_ref(&back)), vec![back.clone()]);
        // It goes again: the newer record is the one kept.
        assert!(l.update(&[], "me", |_| Path::Answering).changed());
        assert_eq!(l.kept().get("aa"), Some(&back));
    }

    #[test]
    fn this_host_is_never_kept_and_a_host_never_seen_live_is_not_invented() {
        let mut l = Liveness::default();
        l.update(&[host("me")], "me", |_| Path::Answering);
        assert!(!l.update(&[], "me", |_| Path::Answering).changed());
        assert!(l.kept().is_empty());
        assert!(!l.update(&[], "me", |_| Path::Answering).changed());
        assert!(l.present(&[]).is_empty());
    }
}
