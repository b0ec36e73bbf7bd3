//! The difference between two versions of a map's content: what to write
//! and what to delete, so that a reload touches only what changed.

use std::collections::BTreeMap;

/// Changes that turn a map holding `old` into one holding `new`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapDiff<K, V> {
    /// Keys that are new or whose value changed, with the new value.
    pub upserts: Vec<(K, V)>,
    /// Keys only in `old`.
    pub deletes: Vec<K>,
}

impl<K, V> MapDiff<K, V> {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

/// Upserts in key order, then deletes in key order. Applying upserts before
/// deletes never leaves a key that is in both versions missing.
pub fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
) -> MapDiff<K, V> {
    let upserts = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let deletes = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    MapDiff { upserts, deletes }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upserts_and_deletes() {
        let old = BTreeMap::from([(1, "a"), (2, "b"), (3, "c")]);
        let new = BTreeMap::from([(2, "b"), (3, "C"), (4, "d")]);
        let d = diff(&old, &new);
        assert_eq!(d.upserts, vec![(3, "C"), (4, "d")]);
        assert_eq!(d.deletes, vec![1]);
        assert!(!d.is_empty());
        assert!(diff(&new, &new).is_empty());
        let empty = BTreeMap::new();
        assert_eq!(diff(&empty, &new).upserts.len(), 3);
        assert_eq!(diff(&new, &empty).deletes, vec![2, 3, 4]);
    }
}
