//! Topic names and subscription patterns.
//!
//! A topic is a non-empty list of dot-separated segments (`orders.eu.created`).
//! A pattern is a topic in which a segment may be `*` (exactly one segment)
//! and whose last segment may be `>` (one or more trailing segments), as in
//! NATS: `orders.*.created`, `orders.>`.

use std::{fmt, sync::Arc};

/// Longest topic or pattern accepted, in bytes.
pub const MAX_TOPIC_LEN: usize = 1024;

/// Why a topic or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The string was empty.
    #[error("topic is empty")]
    Empty,
    /// The string was longer than [`MAX_TOPIC_LEN`].
    #[error("topic is {len} bytes long, the limit is {MAX_TOPIC_LEN}")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// Two dots in a row, or a dot at either end.
    #[error(
        "empty segment at position {index} in {topic:?} (two dots in a row, or a dot at an end)"
    )]
    EmptySegment {
        /// The topic or pattern.
        topic: String,
        /// Zero-based segment index.
        index: usize,
    },
    /// A character not allowed in a segment (whitespace or control).
    #[error("invalid character {ch:?} in segment {index} of {topic:?}")]
    InvalidChar {
        /// The topic or pattern.
        topic: String,
        /// Zero-based segment index.
        index: usize,
        /// The character.
        ch: char,
    },
    /// `*` or `>` in a topic that is published to.
    #[error("wildcard {segment:?} in topic {topic:?}: wildcards are allowed only in subscription patterns")]
    WildcardInTopic {
        /// The topic.
        topic: String,
        /// The offending segment.
        segment: String,
    },
    /// A name starting with `$`: those are the mesh's own (queue hosts,
    /// responders).
    #[error("{topic:?} starts with `$`, which is reserved for the mesh's own names")]
    Reserved {
        /// The name.
        topic: String,
    },
    /// A consumer group name with dots or over 128 bytes.
    #[error("group name {name:?}: one segment (no dots) of at most 128 bytes")]
    BadGroup {
        /// The name.
        name: String,
    },
    /// `>` anywhere but as the last segment, or a wildcard mixed with text.
    #[error("misplaced wildcard in segment {index} of {pattern:?}: `*` must be a whole segment and `>` a whole last segment")]
    MisplacedWildcard {
        /// The pattern.
        pattern: String,
        /// Zero-based segment index.
        index: usize,
    },
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong { len: s.len() });
    }
    for (index, seg) in s.split('.').enumerate() {
        if seg.is_empty() {
            return Err(TopicError::EmptySegment {
                topic: s.to_owned(),
                index,
            });
        }
        if let Some(ch) = seg.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(TopicError::InvalidChar {
                topic: s.to_owned(),
                index,
                ch,
            });
        }
    }
    Ok(())
}

/// Checks a topic that messages are published to.
pub fn validate_topic(topic: &str) -> Result<(), TopicError> {
    check_common(topic)?;
    if let Some(seg) = topic
        .split('.')
        .find(|seg| seg.contains('*') || seg.contains('>'))
    {
        return Err(TopicError::WildcardInTopic {
            topic: topic.to_owned(),
            segment: seg.to_owned(),
        });
    }
    Ok(())
}

/// A validated topic name, cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

impl Topic {
    /// Validates `s` as a topic.
    pub fn new(s: &str) -> Result<Self, TopicError> {
        validate_topic(s)?;
        Ok(Self(Arc::from(s)))
    }

    /// The topic as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn as_arc(&self) -> &Arc<str> {
        &self.0
    }

    /// A topic from a string validated earlier (by the wire decoder).
    pub(crate) fn from_validated(s: Arc<str>) -> Self {
        Self(s)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Topic {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A validated subscription pattern.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pattern(Arc<str>);

impl Pattern {
    /// Validates `s` as a pattern.
    pub fn new(s: &str) -> Result<Self, TopicError> {
        check_common(s)?;
        let count = s.split('.').count();
        for (index, seg) in s.split('.').enumerate() {
            let ok = match seg {
                "*" => true,
                ">" => index + 1 == count,
                _ => !seg.contains('*') && !seg.contains('>'),
            };
            if !ok {
                return Err(TopicError::MisplacedWildcard {
                    pattern: s.to_owned(),
                    index,
                });
            }
        }
        Ok(Self(Arc::from(s)))
    }

    /// The pattern as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `topic` (assumed valid) matches this pattern. Allocates nothing.
    pub fn matches(&self, topic: &str) -> bool {
        let mut pat = self.0.split('.');
        let mut top = topic.split('.');
        loop {
            match (pat.next(), top.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(p), Some(t)) if p == t => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Pattern {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(p: &str, t: &str) -> bool {
        Pattern::new(p).unwrap().matches(t)
    }

    #[test]
    fn literal_and_wildcards() {
        assert!(m("a.b.c", "a.b.c"));
        assert!(!m("a.b.c", "a.b"));
        assert!(!m("a.b", "a.b.c"));
        assert!(m("a.*.c", "a.x.c"));
        assert!(!m("a.*.c", "a.x.y.c"));
        assert!(m("a.>", "a.b"));
        assert!(m("a.>", "a.b.c.d"));
        assert!(!m("a.>", "a"));
        assert!(m(">", "x"));
        assert!(m("*", "x"));
        assert!(!m("*", "x.y"));
        assert!(m("*.>", "x.y"));
    }

    #[test]
    fn errors_name_the_fault() {
        assert_eq!(Topic::new(""), Err(TopicError::Empty));
        assert!(matches!(
            Topic::new("a..b"),
            Err(TopicError::EmptySegment { index: 1, .. })
        ));
        assert!(matches!(
            Topic::new("a.b."),
            Err(TopicError::EmptySegment { index: 2, .. })
        ));
        assert!(matches!(
            Topic::new("a.*"),
            Err(TopicError::WildcardInTopic { .. })
        ));
        assert!(matches!(
            Topic::new("a b"),
            Err(TopicError::InvalidChar { ch: ' ', .. })
        ));
        assert!(matches!(
            Pattern::new("a.>.b"),
            Err(TopicError::MisplacedWildcard { index: 1, .. })
        ));
        assert!(matches!(
            Pattern::new("a.b*"),
            Err(TopicError::MisplacedWildcard { index: 1, .. })
        ));
        assert!(matches!(
            Topic::new(&"a".repeat(MAX_TOPIC_LEN + 1)),
            Err(TopicError::TooLong { .. })
        ));
        let msg = Topic::new("a..b").unwrap_err().to_string();
        assert!(msg.contains("position 1"), "{msg}");
    }

    fn segment() -> impl Strategy<Value = String> {
        "[a-z0-9_-]{1,6}"
    }

    /// Reference semantics: a pattern matches iff segment lists align, with
    /// `*` matching any one segment and `>` any non-empty tail.
    fn reference(pat: &[String], top: &[String]) -> bool {
        match (pat.first().map(String::as_str), top.first()) {
            (Some(">"), Some(_)) => true,
            (Some("*"), Some(_)) => reference(&pat[1..], &top[1..]),
            (Some(p), Some(t)) => p == t && reference(&pat[1..], &top[1..]),
            (None, None) => true,
            _ => false,
        }
    }

    proptest! {
        #[test]
        fn matches_agrees_with_reference(
            topic in proptest::collection::vec(segment(), 1..6),
            pat in proptest::collection::vec(
                prop_oneof![3 => segment(), 1 => Just("*".to_string()), 1 => Just("a".to_string())],
                1..6),
            tail in any::<bool>(),
        ) {
            let mut pat = pat;
            if tail { pat.push(">".into()); }
            let pattern = Pattern::new(&pat.join(".")).unwrap();
            let t = topic.join(".");
            Topic::new(&t).unwrap();
            prop_assert_eq!(pattern.matches(&t), reference(&pat, &topic));
        }

        /// A pattern derived from a topic by wildcarding segments or cutting
        /// a tail always matches it.
        #[test]
        fn derived_patterns_match(
            topic in proptest::collection::vec(segment(), 1..8),
            stars in proptest::collection::vec(any::<bool>(), 8),
            cut in 0usize..8,
        ) {
            let mut pat: Vec<String> = topic.iter().zip(&stars)
                .map(|(s, star)| if *star { "*".to_string() } else { s.clone() })
                .collect();
            if cut > 0 && cut < topic.len() {
                pat.truncate(cut);
                pat.push(">".into());
            }
            prop_assert!(Pattern::new(&pat.join(".")).unwrap().matches(&topic.join(".")));
        }

        #[test]
        fn validation_never_panics(s in "\\PC{0,40}") {
            let _ = Topic::new(&s);
            let _ = Pattern::new(&s);
        }
    }
}
