//! Quality-of-service classes: [`QosClass`], a rank where 0 is the most important traffic, and
//! [`QosClasses`], the configurable, named set of classes a deployment uses.

use std::fmt;

use thiserror::Error;

/// A request's quality-of-service class, as a rank: 0 is the most important, higher numbers
/// matter less. Which classes exist and what they are called is configured by [`QosClasses`];
/// the three constants are the classes of [`QosClasses::default`].
///
/// ```
/// use kvc_core::QosClass;
///
/// assert!(QosClass::CRITICAL.outranks(QosClass::STANDARD));
/// assert!(!QosClass::BEST_EFFORT.outranks(QosClass::STANDARD));
/// assert_eq!(QosClass::STANDARD.to_string(), "qos#1");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct QosClass(pub u8);

impl QosClass {
    /// Latency-critical traffic: the class the pinned region is reserved for by default.
    pub const CRITICAL: QosClass = QosClass(0);
    /// Ordinary interactive traffic.
    pub const STANDARD: QosClass = QosClass(1);
    /// Batch and background traffic: first to queue, be preempted or be capped.
    pub const BEST_EFFORT: QosClass = QosClass(2);

    /// The rank (0 = most important).
    #[inline]
    #[must_use]
    pub const fn get(self) -> u8 {
        self.0
    }

    /// The rank as an index into per-class arrays.
    #[inline]
    #[must_use]
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// Whether `self` is strictly more important than `other`.
    #[inline]
    #[must_use]
    pub const fn outranks(self, other: QosClass) -> bool {
        self.0 < other.0
    }
}

impl From<u8> for QosClass {
    #[inline]
    fn from(rank: u8) -> Self {
        Self(rank)
    }
}

impl fmt::Debug for QosClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "qos#{}", self.0)
    }
}

impl fmt::Display for QosClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "qos#{}", self.0)
    }
}

/// Why a set of QoS classes could not be built.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum QosError {
    /// No class was named.
    #[error("a QoS configuration needs at least one class")]
    Empty,
    /// More classes than ranks fit in a `u8`.
    #[error("too many QoS classes: {count} (at most 256)")]
    TooMany {
        /// Classes given.
        count: usize,
    },
    /// Two classes share a name.
    #[error("QoS class name `{name}` is used twice")]
    DuplicateName {
        /// The repeated name.
        name: String,
    },
}

/// The QoS classes of a deployment, most important first: the class at position `i` is
/// `QosClass(i)`.
///
/// ```
/// use kvc_core::{QosClass, QosClasses};
///
/// let classes = QosClasses::new(["realtime", "chat", "batch", "scavenger"])?;
/// assert_eq!(classes.len(), 4);
/// assert_eq!(classes.by_name("batch"), Some(QosClass(2)));
/// assert_eq!(classes.lowest(), QosClass(3));
/// assert_eq!(QosClasses::default().name(QosClass::BEST_EFFORT), Some("best-effort"));
/// # Ok::<(), kvc_core::QosError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QosClasses {
    names: Vec<String>,
}

impl QosClasses {
    /// Names the classes, most important first.
    pub fn new<I, S>(names: I) -> Result<Self, QosError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let names: Vec<String> = names.into_iter().map(Into::into).collect();
        if names.is_empty() {
            return Err(QosError::Empty);
        }
        if names.len() > usize::from(u8::MAX) + 1 {
            return Err(QosError::TooMany { count: names.len() });
        }
        for (i, name) in names.iter().enumerate() {
            if names[..i].contains(name) {
                return Err(QosError::DuplicateName { name: name.clone() });
            }
        }
        Ok(Self { names })
    }

    /// Number of classes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Always false: a configuration has at least one class.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Whether `class` is one of these classes.
    #[must_use]
    pub fn contains(&self, class: QosClass) -> bool {
        class.index() < self.names.len()
    }

    /// The least important class (the last one).
    #[must_use]
    pub fn lowest(&self) -> QosClass {
        // At most 256 names, at least one (checked in `new`): the cast cannot truncate.
        QosClass((self.names.len() - 1) as u8)
    }

    /// The name of a class, if it exists.
    #[must_use]
    pub fn name(&self, class: QosClass) -> Option<&str> {
        self.names.get(class.index()).map(String::as_str)
    }

    /// The class with this name.
    #[must_use]
    pub fn by_name(&self, name: &str) -> Option<QosClass> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| QosClass(i as u8))
    }

    /// Every class, most important first.
    pub fn iter(&self) -> impl Iterator<Item = QosClass> + '_ {
        (0..self.names.len()).map(|i| QosClass(i as u8))
    }
}

impl Default for QosClasses {
    /// `critical`, `standard`, `best-effort`.
    fn default() -> Self {
        Self {
            names: vec!["critical".into(), "standard".into(), "best-effort".into()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_class_sets_are_typed_errors() {
        assert_eq!(QosClasses::new(Vec::<String>::new()), Err(QosError::Empty));
        assert_eq!(
            QosClasses::new(["a", "b", "a"]),
            Err(QosError::DuplicateName { name: "a".into() })
        );
        let many: Vec<String> = (0..257).map(|i| i.to_string()).collect();
        assert_eq!(QosClasses::new(many), Err(QosError::TooMany { count: 257 }));
        let most: Vec<String> = (0..256).map(|i| i.to_string()).collect();
        assert_eq!(QosClasses::new(most).unwrap().lowest(), QosClass(255));
    }

    #[test]
    fn default_classes_match_the_constants() {
        let c = QosClasses::default();
        assert_eq!(c.by_name("critical"), Some(QosClass::CRITICAL));
        assert_eq!(c.by_name("standard"), Some(QosClass::STANDARD));
        assert_eq!(c.lowest(), QosClass::BEST_EFFORT);
        assert!(!c.contains(QosClass(3)));
        assert_eq!(c.iter().count(), 3);
    }
}
