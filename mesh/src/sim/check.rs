//! Delivery checkers in the style of Jepsen's total-queue workload: record
//! what each publisher published and what each subscriber received, then
//! count, per subscriber, messages lost, duplicated, out of order (per
//! publisher) and unexpected (never published, or not matching).
//!
//! Messages are identified by what the application puts in them, a
//! publisher name and a number that grows per publisher: that survives
//! restarts and works for any service. [`Checker::payload`] makes such a
//! payload and [`Checker::received_message`] reads it back.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::{core::topic::Pattern, Message};

/// Records publishes and deliveries; [`Checker::report`] judges them.
///
/// Record a publish once the call returned `Ok`: only those count as lost
/// if they never arrive.
#[derive(Debug, Default, Clone)]
pub struct Checker {
    /// Per publisher: n -> topic.
    published: BTreeMap<String, BTreeMap<u64, String>>,
    subscribers: BTreeMap<String, Sub>,
}

#[derive(Debug, Clone)]
struct Sub {
    pattern: Pattern,
    /// The (publisher, n) of every delivery, in order; `None` for payloads
    /// that did not parse.
    received: Vec<Option<(String, u64, String)>>,
    /// Per publisher, the first number that must arrive (see
    /// [`Checker::expect_from`]); absent: every matching publish.
    expect_from: BTreeMap<String, u64>,
}

/// Per-subscriber verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriberReport {
    /// Messages delivered.
    pub received: u64,
    /// Matching messages published (and expected) but never delivered.
    pub lost: u64,
    /// Deliveries of a message already delivered.
    pub duplicated: u64,
    /// Deliveries with a lower sequence number than an earlier delivery from
    /// the same publisher.
    pub out_of_order: u64,
    /// Deliveries of messages nobody published, or that do not match the
    /// subscription.
    pub unexpected: u64,
    /// The first few lost messages, as `publisher:n`.
    pub lost_examples: Vec<String>,
}

/// Per-publisher summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublisherReport {
    /// Messages whose publish returned `Ok`.
    pub published: u64,
}

/// The checker's verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// By subscriber name.
    pub subscribers: BTreeMap<String, SubscriberReport>,
    /// By publisher.
    pub publishers: BTreeMap<String, PublisherReport>,
}

impl Report {
    /// Whether safety held: no duplicate, no reordering, nothing unexpected
    /// (losses are allowed: best-effort delivery may lose under faults).
    pub fn safe(&self) -> bool {
        self.subscribers
            .values()
            .all(|s| s.duplicated == 0 && s.out_of_order == 0 && s.unexpected == 0)
    }

    /// Total lost over all subscribers.
    pub fn lost(&self) -> u64 {
        self.subscribers.values().map(|s| s.lost).sum()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (name, s) in &self.subscribers {
            writeln!(
                f,
                "{name}: received {} lost {} duplicated {} out-of-order {} unexpected {}{}",
                s.received,
                s.lost,
                s.duplicated,
                s.out_of_order,
                s.unexpected,
                if s.lost_examples.is_empty() {
                    String::new()
                } else {
                    format!(" (lost: {})", s.lost_examples.join(", "))
                }
            )?;
        }
        Ok(())
    }
}

impl Checker {
    /// A checker with nothing recorded.
    pub fn new() -> Self {
        Self::default()
    }

    /// The payload for message `n` of `publisher`: `publisher:n`.
    pub fn payload(publisher: &str, n: u64) -> Bytes {
        Bytes::from(format!("{publisher}:{n}"))
    }

    /// Declares subscriber `name` with its pattern.
    pub fn subscriber(&mut self, name: &str, pattern: Pattern) {
        self.subscribers.insert(
            name.to_owned(),
            Sub {
                pattern,
                received: Vec::new(),
                expect_from: BTreeMap::new(),
            },
        );
    }

    /// Records a publish that returned `Ok`.
    pub fn published(&mut self, publisher: &str, n: u64, topic: &str) {
        self.published
            .entry(publisher.to_owned())
            .or_default()
            .insert(n, topic.to_owned());
    }

    /// Records a delivery of message `n` of `publisher` on `topic` to
    /// subscriber `name`.
    pub fn received(&mut self, name: &str, publisher: &str, n: u64, topic: &str) {
        if let Some(s) = self.subscribers.get_mut(name) {
            s.received
                .push(Some((publisher.to_owned(), n, topic.to_owned())));
        }
    }

    /// Records a delivery whose payload was made by [`Checker::payload`]
    /// (anything else counts as unexpected).
    pub fn received_message(&mut self, name: &str, msg: &Message) {
        let parsed = std::str::from_utf8(&msg.payload)
            .ok()
            .and_then(|s| s.rsplit_once(':'))
            .and_then(|(p, n)| Some((p.to_owned(), n.parse().ok()?)));
        match parsed {
            Some((p, n)) => self.received(name, &p, n, msg.topic.as_str()),
            None => {
                if let Some(s) = self.subscribers.get_mut(name) {
                    s.received.push(None);
                }
            }
        }
    }

    /// Only messages of `publisher` numbered `n` or more must reach `name`
    /// (say, those published after the mesh converged); earlier ones may
    /// be lost, but not duplicated or reordered.
    pub fn expect_from(&mut self, name: &str, publisher: &str, n: u64) {
        if let Some(s) = self.subscribers.get_mut(name) {
            s.expect_from.insert(publisher.to_owned(), n);
        }
    }

    /// Judges what was recorded.
    pub fn report(&self) -> Report {
        let mut report = Report::default();
        for (p, msgs) in &self.published {
            report.publishers.insert(
                p.clone(),
                PublisherReport {
                    published: msgs.len() as u64,
                },
            );
        }
        for (name, sub) in &self.subscribers {
            let mut r = SubscriberReport::default();
            let mut seen = BTreeSet::new();
            let mut last: BTreeMap<&str, u64> = BTreeMap::new();
            for delivery in &sub.received {
                r.received += 1;
                let Some((publisher, n, topic)) = delivery else {
                    r.unexpected += 1;
                    continue;
                };
                let published = self.published.get(publisher).and_then(|m| m.get(n));
                match published {
                    Some(t) if t == topic && sub.pattern.matches(t) => {}
                    _ => {
                        r.unexpected += 1;
                        continue;
                    }
                }
                if !seen.insert((publisher.as_str(), *n)) {
                    r.duplicated += 1;
                    continue;
                }
                let l = last.entry(publisher).or_insert(0);
                if *n < *l {
                    r.out_of_order += 1;
                }
                *l = (*l).max(*n);
            }
            for (publisher, msgs) in &self.published {
                let from = sub.expect_from.get(publisher).copied().unwrap_or(0);
                for (n, _) in msgs.iter().filter(|(n, topic)| {
                    **n >= from
                        && sub.pattern.matches(topic)
                        && !seen.contains(&(publisher.as_str(), **n))
                }) {
                    r.lost += 1;
                    if r.lost_examples.len() < 8 {
                        r.lost_examples.push(format!("{publisher}:{n}"));
                    }
                }
            }
            report.subscribers.insert(name.clone(), r);
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_kind_of_violation() {
        let mut c = Checker::new();
        c.subscriber("s", Pattern::new("a.>").unwrap());
        for n in 1..=5 {
            c.published("p", n, "a.x");
        }
        c.published("p", 6, "b.x");
        for n in [1, 3, 2, 3] {
            c.received("s", "p", n, "a.x");
        }
        c.received("s", "p", 6, "b.x"); // does not match
        c.received("s", "p", 9, "a.x"); // never published
        let r = &c.report().subscribers["s"];
        assert_eq!(r.received, 6);
        assert_eq!(r.duplicated, 1);
        assert_eq!(r.out_of_order, 1);
        assert_eq!(r.unexpected, 2);
        assert_eq!(r.lost, 2, "4 and 5 never came");
        assert!(!c.report().safe());
    }

    #[test]
    fn expect_from_excuses_earlier_losses_only() {
        let mut c = Checker::new();
        c.subscriber("s", Pattern::new(">").unwrap());
        for n in 1..=4 {
            c.published("p", n, "t");
        }
        c.expect_from("s", "p", 3);
        c.received("s", "p", 3, "t");
        c.received("s", "p", 4, "t");
        let r = c.report();
        assert!(r.safe());
        assert_eq!(r.lost(), 0);
        c.received("s", "p", 1, "t");
        assert!(!c.report().safe(), "1 after 4 is out of order");
    }

    #[test]
    fn payload_round_trips() {
        let mut c = Checker::new();
        c.subscriber("s", Pattern::new(">").unwrap());
        c.published("node-1/2", 7, "t");
        let msg = Message {
            id: crate::MessageId {
                publisher: crate::NodeId::random(),
                seq: 1,
            },
            topic: crate::Topic::new("t").unwrap(),
            publisher: crate::NodeId::random(),
            timestamp: 0,
            headers: Vec::new(),
            payload: Checker::payload("node-1/2", 7),
        };
        c.received_message("s", &msg);
        let r = c.report();
        assert!(r.safe(), "{r}");
        assert_eq!(r.subscribers["s"].received, 1);
    }
}
