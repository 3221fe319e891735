//! [`Table`]: records by id in a persistent map, so that the snapshot of
//! the cluster after one change shares all but O(log n) of its nodes with
//! the one before. Taking a snapshot is a pointer copy; what changed
//! between two snapshots is found without visiting what they share
//! ([`Table::changes`]).

use std::sync::Arc;

/// A record with the id it is kept under.
pub trait Keyed {
    fn key(&self) -> &str;
}

impl Keyed for super::EndpointRecord {
    fn key(&self) -> &str {
        &self.id
    }
}

/// Records by id, in id order.
#[derive(Clone, Debug)]
pub struct Table<T>(imbl::OrdMap<String, Arc<T>>);

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table(imbl::OrdMap::new())
    }
}

/// One record that differs between two tables: before and after (`None`:
/// not there).
pub type Change<'a, T> = (Option<&'a Arc<T>>, Option<&'a Arc<T>>);

impl<T: Keyed + PartialEq> Table<T> {
    pub fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.0.values().map(|r| &**r)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, id: &str) -> Option<&T> {
        self.0.get(id).map(|r| &**r)
    }

    /// Put `record` under its id (replacing what was there).
    pub fn insert(&mut self, record: T) {
        self.0.insert(record.key().to_string(), Arc::new(record));
    }

    /// Put a shared record under its id.
    pub fn insert_arc(&mut self, record: Arc<T>) {
        self.0.insert(record.key().to_string(), record);
    }

    pub fn remove(&mut self, id: &str) -> Option<Arc<T>> {
        self.0.remove(id)
    }

    /// The same allocation (what an informer hands out for records that
    /// did not change).
    pub fn ptr_eq(&self, other: &Table<T>) -> bool {
        self.0.ptr_eq(&other.0)
    }

    /// The records that differ from `before` to `self`, in id order: O(changes
    /// × log n) when the two share their unchanged nodes.
    pub fn changes<'a>(&'a self, before: &'a Table<T>) -> impl Iterator<Item = Change<'a, T>> + 'a {
        before.0.diff(&self.0).map(|d| match d {
            imbl::ordmap::DiffItem::Add(_, new) => (None, Some(new)),
            imbl::ordmap::DiffItem::Remove(_, old) => (Some(old), None),
            imbl::ordmap::DiffItem::Update { old: (_, old), new: (_, new) } => (Some(old), Some(new)),
        })
    }
}

impl<T: Keyed + PartialEq> PartialEq for Table<T> {
    fn eq(&self, other: &Self) -> bool {
        self.ptr_eq(other) || self.0 == other.0
    }
}

impl<T: Keyed + PartialEq> FromIterator<T> for Table<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut t = Table::default();
        for r in iter {
            t.insert(r);
        }
        t
    }
}

impl<T: Keyed + PartialEq> From<Vec<T>> for Table<T> {
    fn from(v: Vec<T>) -> Self {
        v.into_iter().collect()
    }
}

/// What the desired state's functions read endpoints from: a [`Table`]
/// (the informer's) or a plain slice (tests, one-off listings).
pub trait Records<T> {
    fn each<'a>(&'a self) -> impl Iterator<Item = &'a T>
    where
        T: 'a;
}

impl<T> Records<T> for [T] {
    fn each<'a>(&'a self) -> impl Iterator<Item = &'a T>
    where
        T: 'a,
    {
        self.iter()
    }
}

impl<T, const N: usize> Records<T> for [T; N] {
    fn each<'a>(&'a self) -> impl Iterator<Item = &'a T>
    where
        T: 'a,
    {
        self.iter()
    }
}

impl<T> Records<T> for Vec<T> {
    fn each<'a>(&'a self) -> impl Iterator<Item = &'a T>
    where
        T: 'a,
    {
        self.iter()
    }
}

impl<T: Keyed + PartialEq> Records<T> for Table<T> {
    fn each<'a>(&'a self) -> impl Iterator<Item = &'a T>
    where
        T: 'a,
    {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct R(String, u32);
    impl Keyed for R {
        fn key(&self) -> &str {
            &self.0
        }
    }

    #[test]
    fn changes_are_what_differs_and_nothing_else() {
        let before: Table<R> = (0..1000).map(|i| R(format!("{i:04}"), i)).collect();
        let mut after = before.clone();
        assert!(after.ptr_eq(&before));
        assert_eq!(after.changes(&before).count(), 0);
        after.insert(R("0500".into(), 7));
        after.remove("0001");
        after.insert(R("x".into(), 1));
        // An insert of an equal record is no change.
        after.insert(R("0002".into(), 2));
        let got: Vec<(Option<u32>, Option<u32>)> =
            after.changes(&before).map(|(o, n)| (o.map(|r| r.1), n.map(|r| r.1))).collect();
        assert_eq!(got, vec![(Some(1), None), (Some(500), Some(7)), (None, Some(1))]);
        assert_eq!(before.len(), 1000);
        assert_eq!(after.len(), 1000);
        assert_eq!(after.get("0500").map(|r| r.1), Some(7));
        assert_ne!(after, before);
    }
}
