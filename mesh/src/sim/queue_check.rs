//! A work-queue checker in the style of Jepsen's total-queue workload:
//! record what was sent (accepted by a host), delivered, acked and
//! dead-lettered, then count what was lost, duplicated and unexpected.
//!
//! At-least-once delivery allows duplicates (a message whose ack was lost
//! in a partition comes back), so they are counted, not failed. What must
//! never happen: a message accepted and never settled while its host lived
//! (*lost*), or a delivery of something nobody sent (*unexpected*).

use std::collections::{BTreeMap, BTreeSet};

/// Records a queue workload; [`QueueChecker::report`] judges it. Messages
/// are named by the application (a payload such as `"p1:42"`).
#[derive(Debug, Default, Clone)]
pub struct QueueChecker {
    /// Sends started (their `Ok` may not be recorded yet).
    sending: BTreeSet<String>,
    sent: BTreeSet<String>,
    deliveries: BTreeMap<String, u64>,
    acked: BTreeSet<String>,
    dead: BTreeSet<String>,
    excused: BTreeSet<String>,
    unexpected: Vec<String>,
}

/// The verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueReport {
    /// Messages whose send returned `Ok` (accepted by a host).
    pub sent: u64,
    /// Of those, acked by a consumer.
    pub acked: u64,
    /// Of those, seen in the dead-letter queue.
    pub dead_lettered: u64,
    /// Deliveries beyond the first of a message.
    pub duplicated: u64,
    /// Sent, never acked nor dead-lettered, and not excused.
    pub lost: u64,
    /// Sent and unsettled when their host crashed (hosts keep messages in
    /// memory, so these may be gone): not counted as lost.
    pub excused: u64,
    /// Deliveries of messages never sent.
    pub unexpected: u64,
    /// A few lost messages, by name.
    pub lost_examples: Vec<String>,
}

impl QueueReport {
    /// Nothing lost, nothing unexpected.
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.unexpected == 0
    }
}

impl std::fmt::Display for QueueReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {} acked {} dead-lettered {} duplicated {} lost {} excused {} unexpected {}",
            self.sent,
            self.acked,
            self.dead_lettered,
            self.duplicated,
            self.lost,
            self.excused,
            self.unexpected
        )?;
        if !self.lost_examples.is_empty() {
            write!(f, " (lost: {})", self.lost_examples.join(", "))?;
        }
        Ok(())
    }
}

impl QueueChecker {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    /// `name` is about to be sent (optional: lets [`QueueChecker::host_crashed`]
    /// excuse a send a crashed host accepted whose `Ok` was not recorded
    /// yet).
    pub fn sending(&mut self, name: &str) {
        self.sending.insert(name.to_owned());
    }

    /// `name`'s send returned `Ok`.
    pub fn sent(&mut self, name: &str) {
        self.sending.remove(name);
        self.sent.insert(name.to_owned());
    }

    /// A consumer got `name` (call before settling it).
    pub fn delivered(&mut self, name: &str) {
        *self.deliveries.entry(name.to_owned()).or_default() += 1;
        if !self.sent.contains(name) && !self.unexpected.iter().any(|u| u == name) {
            // It may be sent-but-not-yet-recorded (the send's `Ok` races
            // the delivery): judged in `report`.
            self.unexpected.push(name.to_owned());
        }
    }

    /// A consumer acked `name`.
    pub fn acked(&mut self, name: &str) {
        self.acked.insert(name.to_owned());
    }

    /// `name` was seen in the dead-letter queue.
    pub fn dead_lettered(&mut self, name: &str) {
        self.dead.insert(name.to_owned());
    }

    /// A host crashed: every message not settled yet may have been on it,
    /// also those being sent.
    pub fn host_crashed(&mut self) {
        let open: Vec<String> = self
            .sent
            .iter()
            .chain(&self.sending)
            .filter(|n| !self.settled_one(n))
            .cloned()
            .collect();
        self.excused.extend(open);
    }

    fn settled_one(&self, name: &str) -> bool {
        self.acked.contains(name) || self.dead.contains(name) || self.excused.contains(name)
    }

    /// Whether every message sent is acked, dead-lettered or excused.
    pub fn settled(&self) -> bool {
        self.sent.iter().all(|n| self.settled_one(n))
    }

    /// The verdict.
    pub fn report(&self) -> QueueReport {
        let lost: Vec<&String> = self.sent.iter().filter(|n| !self.settled_one(n)).collect();
        QueueReport {
            sent: self.sent.len() as u64,
            acked: self.sent.iter().filter(|n| self.acked.contains(*n)).count() as u64,
            dead_lettered: self.sent.iter().filter(|n| self.dead.contains(*n)).count() as u64,
            duplicated: self.deliveries.values().map(|n| n.saturating_sub(1)).sum(),
            lost: lost.len() as u64,
            excused: self
                .excused
                .iter()
                .filter(|n| !self.acked.contains(*n) && !self.dead.contains(*n))
                .count() as u64,
            unexpected: self
                .unexpected
                .iter()
                .filter(|n| !self.sent.contains(*n))
                .count() as u64,
            lost_examples: lost.iter().take(10).map(|s| s.to_string()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_lost_duplicated_and_unexpected() {
        let mut c = QueueChecker::new();
        for n in ["a", "b", "c", "d"] {
            c.sent(n);
        }
        c.delivered("a");
        c.acked("a");
        c.delivered("b");
        c.delivered("b");
        c.acked("b");
        c.dead_lettered("c");
        c.delivered("zzz");
        assert!(!c.settled());
        let r = c.report();
        assert_eq!(
            (
                r.sent,
                r.acked,
                r.dead_lettered,
                r.duplicated,
                r.lost,
                r.unexpected
            ),
            (4, 2, 1, 1, 1, 1)
        );
        assert_eq!(r.lost_examples, ["d"]);
        assert!(!r.ok());
        c.host_crashed();
        let r = c.report();
        assert_eq!((r.lost, r.excused), (0, 1));
        assert!(c.settled());
    }

    #[test]
    fn a_delivery_that_races_its_send_record_is_not_unexpected() {
        let mut c = QueueChecker::new();
        c.delivered("x");
        c.sent("x");
        c.acked("x");
        assert!(c.report().ok());
        // A send in progress when its host crashed is excused once it lands.
        c.sending("y");
        c.host_crashed();
        c.sent("y");
        assert!(c.settled());
        assert_eq!(c.report().excused, 1);
    }
}
