//! A compact set of message ids, stored as disjoint half-open ranges.
//!
//! A receiver's state remembers which messages of a channel it has received; in a ring the
//! ids arrive almost always in order, so a handful of ranges describes millions of ids.

use std::collections::BTreeMap;

/// A set of `u64` ids kept as disjoint, non-adjacent half-open ranges `[start, end)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdSet {
    ranges: BTreeMap<u64, u64>,
    len: u64,
}

impl IdSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of ids in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the set holds no id.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `id` is in the set.
    pub fn contains(&self, id: u64) -> bool {
        self.ranges
            .range(..=id)
            .next_back()
            .is_some_and(|(_, &end)| id < end)
    }

    /// Inserts `id`; returns `false` if it was already present.
    pub fn insert(&mut self, id: u64) -> bool {
        if self.contains(id) {
            return false;
        }
        let mut start = id;
        let mut end = id + 1;
        // Merge with the range that ends exactly at `id`.
        if let Some((&s, &e)) = self.ranges.range(..id).next_back() {
            if e == id {
                start = s;
                self.ranges.remove(&s);
            }
        }
        // Merge with the range that starts right after `id`.
        if let Some(e) = self.ranges.remove(&(id + 1)) {
            end = e;
        }
        self.ranges.insert(start, end);
        self.len += 1;
        true
    }

    /// Number of ids in the set that are `>= bound`.
    pub fn count_at_or_above(&self, bound: u64) -> u64 {
        self.ranges
            .iter()
            .map(|(&s, &e)| e.saturating_sub(s.max(bound)))
            .sum()
    }

    /// Ids in `[0, bound)` that are NOT in the set, in increasing order.
    pub fn missing_below(&self, bound: u64) -> impl Iterator<Item = u64> + '_ {
        let mut cursor = 0u64;
        let mut ranges = self.ranges.iter().map(|(&s, &e)| (s, e)).peekable();
        std::iter::from_fn(move || loop {
            if cursor >= bound {
                return None;
            }
            match ranges.peek() {
                Some(&(s, e)) if cursor >= s => {
                    cursor = cursor.max(e);
                    ranges.next();
                }
                Some(&(s, _)) if cursor < s => {
                    let id = cursor;
                    cursor += 1;
                    return Some(id);
                }
                _ => {
                    let id = cursor;
                    cursor += 1;
                    return Some(id);
                }
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn behaves_like_a_btreeset(ids in proptest::collection::vec(0u64..64, 0..80), bound in 0u64..70) {
            let mut set = IdSet::new();
            let mut model = BTreeSet::new();
            for id in ids {
                prop_assert_eq!(set.insert(id), model.insert(id));
            }
            prop_assert_eq!(set.len(), model.len() as u64);
            for id in 0..70 {
                prop_assert_eq!(set.contains(id), model.contains(&id));
            }
            prop_assert_eq!(set.count_at_or_above(bound), model.range(bound..).count() as u64);
            let missing: Vec<u64> = set.missing_below(bound).collect();
            let expected: Vec<u64> = (0..bound).filter(|id| !model.contains(id)).collect();
            prop_assert_eq!(missing, expected);
        }
    }
}
