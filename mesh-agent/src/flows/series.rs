//! A metric family with a bounded number of series. Identities come and go
//! with pods, and every pair of them that ever met would otherwise stay a
//! series of `mesh_flow_verdicts_total` for good: memory, and the size of
//! each scrape, would grow without end. Past the bound, the series counted
//! least recently is dropped; if it comes back it starts again from 0,
//! which Prometheus reads as a counter reset.
use std::{
    collections::{BTreeMap, HashMap},
    hash::Hash,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};

/// Counters by label set, at most `bound` of them.
#[derive(Clone, Debug)]
pub struct BoundedFamily<L: Clone + Hash + Eq> {
    family: Family<L, Counter>,
    recency: Arc<Mutex<Recency<L>>>,
    bound: usize,
    /// Series dropped to stay within the bound.
    evicted: Counter,
}

/// Which keys were counted least recently, for bounded collections of
/// counters: the series here, the service map's edges.
#[derive(Debug)]
pub(crate) struct Recency<L> {
    tick: u64,
    last_counted: HashMap<L, u64>,
    by_tick: BTreeMap<u64, L>,
}

impl<L: Clone + Hash + Eq> Recency<L> {
    pub(crate) fn new() -> Self {
        Self {
            tick: 0,
            last_counted: HashMap::new(),
            by_tick: BTreeMap::new(),
        }
    }

    /// Marks `key` as counted now; returns the keys dropped to keep at
    /// most `bound`, least recently counted first.
    pub(crate) fn touch(&mut self, key: &L, bound: usize) -> Vec<L> {
        self.tick += 1;
        let tick = self.tick;
        if let Some(previous) = self.last_counted.insert(key.clone(), tick) {
            self.by_tick.remove(&previous);
        }
        self.by_tick.insert(tick, key.clone());
        let mut dropped = Vec::new();
        while self.last_counted.len() > bound {
            let Some((_, oldest)) = self.by_tick.pop_first() else {
                break;
            };
            self.last_counted.remove(&oldest);
            dropped.push(oldest);
        }
        dropped
    }
}

impl<L> BoundedFamily<L>
where
    L: Clone + Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    /// At most `bound` series; each one dropped counts one on `evicted`.
    pub fn new(bound: usize, evicted: Counter) -> Self {
        Self {
            family: Family::default(),
            recency: Arc::new(Mutex::new(Recency::new())),
            bound,
            evicted,
        }
    }

    /// The family, to register.
    pub fn family(&self) -> Family<L, Counter> {
        self.family.clone()
    }

    /// Counts one for `labels`, dropping the least recently counted series
    /// when a new one would pass the bound.
    pub fn inc(&self, labels: &L) {
        let mut recency = self.recency.lock().unwrap_or_else(|p| p.into_inner());
        for oldest in recency.touch(labels, self.bound) {
            self.family.remove(&oldest);
            self.evicted.inc();
        }
        // Under the lock: a series is never counted after it was dropped.
        self.family.get_or_create(labels).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Pair {
        src: String,
        dst: String,
    }

    fn pair(src: &str, dst: &str) -> Pair {
        Pair {
            src: src.into(),
            dst: dst.into(),
        }
    }

    fn render(f: &BoundedFamily<Pair>) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("verdicts", "test", f.family());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn the_least_recently_counted_series_goes_first() {
        let evicted = Counter::default();
        let f = BoundedFamily::new(2, evicted.clone());
        f.inc(&pair("a", "b"));
        f.inc(&pair("c", "d"));
        // a→b counted again: c→d is now the oldest.
        f.inc(&pair("a", "b"));
        f.inc(&pair("e", "f"));
        let text = render(&f);
        assert!(
            text.contains("verdicts_total{src=\"a\",dst=\"b\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("verdicts_total{src=\"e\",dst=\"f\"} 1"),
            "{text}"
        );
        assert!(!text.contains("src=\"c\""), "{text}");
        assert_eq!(evicted.get(), 1);
        // Churn through 1,000 identities: never more than the bound.
        for i in 0..1000 {
            f.inc(&pair(&i.to_string(), "x"));
        }
        assert_eq!(render(&f).matches("verdicts_total{").count(), 2);
        assert_eq!(evicted.get(), 1001);
    }
}
