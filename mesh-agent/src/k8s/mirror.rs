//! A compact copy of one resource kind, kept in step by a watcher.
//!
//! Each object is turned into what the agent needs of it as it arrives (a
//! Pod's few fields, not the whole object), so memory follows the number
//! of objects, not their size. A relist (the start, a 410 Gone, a
//! reconnect that lost its place) fills a second map that replaces the
//! first only once complete: the mirror never passes through empty, and
//! objects deleted while the agent was not watching disappear at that
//! moment.
use std::collections::BTreeMap;

use kube::runtime::watcher::Event;

pub struct Mirror<T> {
    current: BTreeMap<String, T>,
    relist: Option<BTreeMap<String, T>>,
    synced: bool,
}

impl<T> Default for Mirror<T> {
    fn default() -> Self {
        Self {
            current: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }
}

impl<T: PartialEq> Mirror<T> {
    /// Applies a watcher event; `key` names an object, `keep` turns it into
    /// what is kept (`None`: nothing of it, as if it did not exist). Returns
    /// whether what the mirror holds changed.
    pub fn apply<K>(
        &mut self,
        event: Event<K>,
        key: impl Fn(&K) -> String,
        keep: impl Fn(&K) -> Option<T>,
    ) -> bool {
        match event {
            Event::Apply(object) => match keep(&object) {
                Some(value) => {
                    let k = key(&object);
                    if self.current.get(&k) == Some(&value) {
                        return false;
                    }
                    self.current.insert(k, value);
                    true
                }
                None => self.current.remove(&key(&object)).is_some(),
            },
            Event::Delete(object) => self.current.remove(&key(&object)).is_some(),
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(object) => {
                if let Some(value) = keep(&object) {
                    self.relist
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key(&object), value);
                }
                false
            }
            Event::InitDone => {
                let first = !self.synced;
                self.synced = true;
                match self.relist.take() {
                    Some(listed) if listed != self.current => {
                        self.current = listed;
                        true
                    }
                    _ => first,
                }
            }
        }
    }

    /// Whether a complete list has been seen at least once.
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn objects(&self) -> &BTreeMap<String, T> {
        &self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type E = Event<(&'static str, i32)>;

    fn apply(m: &mut Mirror<i32>, e: E) -> bool {
        m.apply(e, |o| o.0.to_string(), |o| (o.1 >= 0).then_some(o.1))
    }

    #[test]
    fn a_relist_replaces_the_content_only_when_complete() {
        let mut m = Mirror::default();
        assert!(!m.synced());
        apply(&mut m, Event::Init);
        apply(&mut m, Event::InitApply(("a", 1)));
        apply(&mut m, Event::InitApply(("b", 2)));
        assert!(
            m.objects().is_empty(),
            "nothing before the list is complete"
        );
        assert!(apply(&mut m, Event::InitDone));
        assert!(m.synced());
        assert_eq!(m.objects().len(), 2);

        // A relist after a 410: "b" was deleted and "c" created meanwhile.
        apply(&mut m, Event::Init);
        apply(&mut m, Event::InitApply(("a", 1)));
        assert_eq!(
            m.objects().len(),
            2,
            "the old content stays during a relist"
        );
        apply(&mut m, Event::InitApply(("c", 3)));
        assert!(apply(&mut m, Event::InitDone));
        let keys: Vec<_> = m.objects().keys().cloned().collect();
        assert_eq!(keys, ["a", "c"]);

        // The same content again is no change.
        apply(&mut m, Event::Init);
        apply(&mut m, Event::InitApply(("a", 1)));
        apply(&mut m, Event::InitApply(("c", 3)));
        assert!(!apply(&mut m, Event::InitDone));
    }

    #[test]
    fn applies_deletes_and_objects_that_stop_counting() {
        let mut m = Mirror::default();
        assert!(apply(&mut m, Event::Apply(("a", 1))));
        assert!(!apply(&mut m, Event::Apply(("a", 1))), "unchanged");
        assert!(apply(&mut m, Event::Apply(("a", 2))));
        // An object turning into nothing the agent keeps is a removal.
        assert!(apply(&mut m, Event::Apply(("a", -1))));
        assert!(m.objects().is_empty());
        assert!(!apply(&mut m, Event::Delete(("a", -1))));
        apply(&mut m, Event::Apply(("b", 1)));
        assert!(apply(&mut m, Event::Delete(("b", 1))));
        assert!(m.objects().is_empty());
    }
}
