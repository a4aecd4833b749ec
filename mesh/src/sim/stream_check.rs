//! A stream checker in the style of Jepsen's Kafka workload: record what
//! was appended (with the partition and offset the host answered) and what
//! readers read, then count what was lost, duplicated, skipped, read out of
//! order or at the wrong place.
//!
//! - *lost*: an acknowledged append that no reader of the group read (and
//!   whose host did not crash, see [`StreamChecker::host_crashed`]);
//! - *duplicated*: reads of a record beyond its first (at least once allows
//!   them);
//! - *skipped*: a whole-stream reader went from offset `a` to `b > a + 1`
//!   in a partition where some record between them was appended;
//! - *non-monotonic*: a whole-stream reader read an offset at or below one
//!   it read before in the same partition (and the host did not restart);
//! - *misplaced*: a record read at a partition and offset where another
//!   record's append was acknowledged;
//! - *appended twice*: a record read at another place than its append was
//!   acknowledged with, where no acknowledged record is: an append retried
//!   after the host's answer was lost (at least once), counted, not failed;
//! - *unexpected*: a record read that nobody appended.
//!
//! Group readers may legitimately jump (a partition moves to another
//! member and back), so skips and order are judged only for readers
//! registered as whole-stream readers ([`StreamChecker::whole_reader`]).

use std::collections::{BTreeMap, BTreeSet};

use crate::stream::PartitionId;

/// Records a stream workload; [`StreamChecker::report`] judges it.
/// Records are named by the application (a payload such as `"p1:42"`).
#[derive(Debug, Default, Clone)]
pub struct StreamChecker {
    appending: BTreeSet<String>,
    appended: BTreeMap<String, (PartitionId, u64)>,
    /// Names per (partition, offset) acknowledged.
    at: BTreeMap<(PartitionId, u64), String>,
    reads: BTreeMap<String, u64>,
    whole: BTreeSet<String>,
    /// Per whole reader and partition: the last offset read, and how many
    /// times it started over at 0 after its host restarted.
    last: BTreeMap<(String, PartitionId), u64>,
    restarts: BTreeMap<(String, PartitionId), u64>,
    excused: BTreeSet<String>,
    /// Records of a crashed host's earlier runs (their places are gone).
    excused_history: BTreeSet<String>,
    /// Crashes per host.
    crashed_at: BTreeMap<crate::PeerId, u64>,
    skipped: u64,
    non_monotonic: u64,
    misplaced: u64,
    copies: BTreeSet<String>,
    unexpected: Vec<String>,
    examples: Vec<String>,
}

/// The verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamReport {
    /// Appends acknowledged.
    pub appended: u64,
    /// Of those, read at least once.
    pub read: u64,
    /// Reads beyond the first of a record.
    pub duplicated: u64,
    /// Acknowledged, never read, not excused.
    pub lost: u64,
    /// Unread when their host crashed (hosts keep records in memory).
    pub excused: u64,
    /// Gaps in a whole-stream reader's offsets.
    pub skipped: u64,
    /// A whole-stream reader's offsets going back.
    pub non_monotonic: u64,
    /// Records read where another record's append was acknowledged.
    pub misplaced: u64,
    /// Records stored more than once (retried appends), read at a place
    /// no acknowledged record has.
    pub appended_twice: u64,
    /// Records read that nobody appended.
    pub unexpected: u64,
    /// A few problems, described.
    pub examples: Vec<String>,
}

impl StreamReport {
    /// Nothing lost, skipped, misplaced, out of order or unexpected.
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.skipped == 0
            && self.non_monotonic == 0
            && self.misplaced == 0
            && self.unexpected == 0
    }
}

impl std::fmt::Display for StreamReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "appended {} read {} duplicated {} lost {} excused {} skipped {} non-monotonic {} misplaced {} appended-twice {} unexpected {}",
            self.appended,
            self.read,
            self.duplicated,
            self.lost,
            self.excused,
            self.skipped,
            self.non_monotonic,
            self.misplaced,
            self.appended_twice,
            self.unexpected
        )?;
        if !self.examples.is_empty() {
            write!(f, " ({})", self.examples.join("; "))?;
        }
        Ok(())
    }
}

impl StreamChecker {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    fn note(&mut self, what: String) {
        if self.examples.len() < 10 {
            self.examples.push(what);
        }
    }

    /// `reader` reads the whole stream (not a group's share): its offsets
    /// must neither skip nor go back.
    pub fn whole_reader(&mut self, reader: &str) {
        self.whole.insert(reader.to_owned());
    }

    /// `name` is about to be appended.
    pub fn appending(&mut self, name: &str) {
        self.appending.insert(name.to_owned());
    }

    /// `name`'s append returned `Ok` with this place.
    pub fn appended(&mut self, name: &str, partition: PartitionId, offset: u64) {
        self.appending.remove(name);
        self.appended.insert(name.to_owned(), (partition, offset));
        self.at.insert((partition, offset), name.to_owned());
    }

    /// `reader` read `name` at this place.
    pub fn read(&mut self, reader: &str, name: &str, partition: PartitionId, offset: u64) {
        *self.reads.entry(name.to_owned()).or_default() += 1;
        match self.appended.get(name) {
            Some(&(p, o)) if (p, o) != (partition, offset) => {
                match self.at.get(&(partition, offset)) {
                    Some(other) if other != name => {
                        let other = other.clone();
                        self.misplaced += 1;
                        self.note(format!(
                            "{name} read at {partition}@{offset}, where {other} was appended ({name} at {p}@{o})"
                        ));
                    }
                    _ => {
                        self.copies.insert(name.to_owned());
                    }
                }
            }
            Some(_) => {}
            // Its append's `Ok` may not be recorded yet: judged in `report`.
            None => self.unexpected.push(name.to_owned()),
        }
        if !self.whole.contains(reader) {
            return;
        }
        let key = (reader.to_owned(), partition);
        if let Some(&last) = self.last.get(&key) {
            let crashes = self.crashed_at.get(&partition.host).copied().unwrap_or(0);
            let restarts = self.restarts.entry(key.clone()).or_default();
            if offset <= last && offset == 0 && *restarts < crashes {
                // A restarted host's new run numbers from 0 again: the
                // reader starts over there, once per crash.
                *restarts += 1;
            } else if offset <= last {
                self.non_monotonic += 1;
                self.note(format!("{reader} read {partition}@{offset} after @{last}"));
            } else if offset > last + 1 {
                let missed = self
                    .at
                    .range((partition, last + 1)..(partition, offset))
                    .count();
                if missed > 0 {
                    self.skipped += missed as u64;
                    self.note(format!(
                        "{reader} skipped {missed} records of {partition} between @{last} and @{offset}"
                    ));
                }
            }
        }
        if !self.last.contains_key(&key) && !self.crashed_at.contains_key(&partition.host) {
            // A whole reader starts at the beginning: a first read past
            // acknowledged records skipped them.
            let missed = self.at.range((partition, 0)..(partition, offset)).count();
            if missed > 0 {
                self.skipped += missed as u64;
                self.note(format!(
                    "{reader} started {partition} at @{offset}, past {missed} records"
                ));
            }
        }
        self.last.insert(key, offset);
    }

    /// The host `host` crashed: its records not read yet may be gone, and
    /// its partitions start again from offset 0.
    pub fn host_crashed(&mut self, host: crate::PeerId) {
        *self.crashed_at.entry(host).or_default() += 1;
        let open: Vec<String> = self
            .appended
            .iter()
            .filter(|(n, (p, _))| p.host == host && !self.reads.contains_key(*n))
            .map(|(n, _)| n.clone())
            .chain(self.appending.iter().cloned())
            .collect();
        self.excused.extend(open);
        self.last.retain(|(_, p), _| p.host != host);
        // Its new run numbers records from 0 again: places of the old run
        // are history.
        let old: Vec<String> = self
            .appended
            .iter()
            .filter(|(_, (p, _))| p.host == host)
            .map(|(n, _)| n.clone())
            .collect();
        for n in old {
            if let Some(place) = self.appended.remove(&n) {
                self.at.remove(&place);
            }
            self.excused_history.insert(n);
        }
    }

    fn accounted(&self, name: &str) -> bool {
        self.reads.contains_key(name) || self.excused.contains(name)
    }

    /// Whether every record appended was read or excused.
    pub fn settled(&self) -> bool {
        self.appended.keys().all(|n| self.accounted(n))
    }

    /// The verdict.
    pub fn report(&self) -> StreamReport {
        let lost: Vec<&String> = self
            .appended
            .keys()
            .filter(|n| !self.accounted(n))
            .collect();
        let mut examples = self.examples.clone();
        examples.extend(lost.iter().take(5).map(|n| format!("lost {n}")));
        let known = |n: &String| self.appended.contains_key(n) || self.excused_history.contains(n);
        StreamReport {
            appended: (self.appended.len() + self.excused_history.len()) as u64,
            read: self
                .appended
                .keys()
                .chain(&self.excused_history)
                .filter(|n| self.reads.contains_key(*n))
                .count() as u64,
            duplicated: self.reads.values().map(|n| n.saturating_sub(1)).sum(),
            lost: lost.len() as u64,
            excused: self
                .excused
                .iter()
                .filter(|n| !self.reads.contains_key(*n))
                .count() as u64,
            skipped: self.skipped,
            non_monotonic: self.non_monotonic,
            misplaced: self.misplaced,
            appended_twice: self.copies.len() as u64,
            unexpected: self.unexpected.iter().filter(|n| !known(n)).count() as u64,
            examples,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(index: u32) -> PartitionId {
        PartitionId {
            host: crate::PeerId::from_bytes(&[0, 2, 8, 1]).unwrap(),
            index,
        }
    }

    #[test]
    fn counts_lost_duplicated_skipped_and_out_of_order() {
        let mut c = StreamChecker::new();
        c.whole_reader("r");
        c.whole_reader("late");
        for i in 0..5 {
            c.appended(&format!("a{i}"), p(0), i);
        }
        c.read("r", "a0", p(0), 0);
        c.read("r", "a2", p(0), 2); // skipped a1
        c.read("r", "a2", p(0), 2); // back (and a duplicate)
        c.read("g", "a3", p(0), 3);
        c.read("g", "a4", p(0), 2); // misplaced (a2's place)
        c.read("g", "a3", p(1), 0); // a retried append's copy
        c.read("g", "zzz", p(0), 7);
        c.read("late", "a4", p(0), 4); // started past a0..a3
        let r = c.report();
        assert_eq!(
            (
                r.appended,
                r.read,
                r.duplicated,
                r.lost,
                r.skipped,
                r.non_monotonic,
                r.misplaced,
                r.unexpected
            ),
            (5, 4, 3, 1, 5, 1, 1, 1),
            "{r}"
        );
        assert_eq!(r.appended_twice, 1);
        assert!(!r.ok());
        assert!(!c.settled());
    }

    #[test]
    fn a_crashed_host_excuses_its_unread_records() {
        let mut c = StreamChecker::new();
        c.whole_reader("r");
        c.appended("a", p(0), 0);
        c.appended("b", p(0), 1);
        c.read("r", "a", p(0), 0);
        c.host_crashed(p(0).host);
        // Its new run starts again at 0: not out of order, even after a
        // record of the old run that was still on its way.
        c.appended("c", p(0), 0);
        c.read("r", "b", p(0), 1);
        c.read("r", "c", p(0), 0);
        let r = c.report();
        assert!(r.ok(), "{r}");
        assert!(c.settled());
        assert_eq!((r.appended, r.read, r.excused), (3, 3, 0));
        // But going back within one run is still caught.
        c.appended("d", p(0), 1);
        c.read("r", "d", p(0), 1);
        c.read("r", "c", p(0), 0);
        assert_eq!(c.report().non_monotonic, 1);
    }
}
