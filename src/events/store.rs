//! The [`EventStore`] trait: appends with optimistic concurrency, reads, and subscriptions
//! that replay the past and then follow the present.

use super::event::Event;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use std::fmt;
use std::sync::Arc;

/// What an append expects of its aggregate's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append whatever the stream holds.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream's last version must be exactly this (0 for an empty stream).
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream at `actual` (0: none) satisfies this expectation.
    pub fn accepts(self, actual: u64) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => actual == 0,
            Self::Exact(version) => version == actual,
        }
    }
}

/// An event as stored: its global position (from 1) across every aggregate.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    /// Position in the store's total order, from 1.
    pub position: u64,
    /// The event, its `version` set.
    pub event: Arc<Event>,
}

/// Why an append was refused. Nothing of a refused batch is stored.
#[derive(Debug)]
#[non_exhaustive]
pub enum AppendError {
    /// The stream was not at the expected version.
    Conflict {
        /// What the append expected.
        expected: ExpectedVersion,
        /// The stream's version at the time (0: no stream).
        actual: u64,
    },
    /// An event is larger, serialized, than the store accepts.
    TooLarge {
        /// The event.
        id: uuid::Uuid,
        /// Its serialized size, in bytes.
        size: usize,
        /// The store's limit, in bytes.
        limit: usize,
    },
    /// An event of the batch names another aggregate.
    WrongAggregate {
        /// The event.
        id: uuid::Uuid,
    },
    /// The store's backend failed.
    Backend(tower::BoxError),
}

impl fmt::Display for AppendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Conflict { expected, actual } => {
                write!(
                    f,
                    "expected the stream at {expected:?}, found version {actual}"
                )
            }
            Self::TooLarge { id, size, limit } => {
                write!(f, "event {id} is {size} bytes, over the limit of {limit}")
            }
            Self::WrongAggregate { id } => {
                write!(f, "event {id} belongs to another aggregate than its batch")
            }
            Self::Backend(error) => write!(f, "event store failed: {error}"),
        }
    }
}

impl std::error::Error for AppendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Backend(error) => Some(&**error),
            _ => None,
        }
    }
}

/// The source of truth for events: the embedded [`MemoryEventStore`](super::MemoryEventStore),
/// later PostgreSQL or NATS JetStream.
///
/// Object safe (boxed futures and streams): hold an `Arc<dyn EventStore>`.
///
/// [`MemoryEventStore`](super::MemoryEventStore) does its work when a method is called, not
/// when the returned future is first polled: an append is stored (and a read takes its
/// snapshot) even if the future is then dropped unpolled, in a `select!` branch that lost,
/// say. Await each call where it is made.
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` to `aggregate_id`'s stream, all or nothing, if the stream is at
    /// `expected`; returns the stream's version afterwards. An event whose id is already
    /// stored is skipped (appending twice is harmless).
    fn append(
        &self,
        aggregate_id: &str,
        expected: ExpectedVersion,
        events: Vec<Event>,
    ) -> BoxFuture<'_, Result<u64, AppendError>>;

    /// The aggregate's events from `from_version` (1: all), in version order.
    fn read_stream(&self, aggregate_id: &str, from_version: u64)
        -> BoxFuture<'_, Vec<StoredEvent>>;

    /// Up to `limit` events from global position `from_position` (1: the start), in order.
    fn read_all(&self, from_position: u64, limit: usize) -> BoxFuture<'_, Vec<StoredEvent>>;

    /// Every event from `from_position` on: the stored ones, then live ones as they are
    /// appended, in position order, with no gap and no duplicate.
    fn subscribe(&self, from_position: u64) -> BoxStream<'static, StoredEvent>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn expected() -> impl Strategy<Value = ExpectedVersion> {
        prop_oneof![
            Just(ExpectedVersion::Any),
            Just(ExpectedVersion::NoStream),
            (0u64..10).prop_map(ExpectedVersion::Exact),
        ]
    }

    proptest! {
        #[test]
        fn expectations_follow_their_rules(expected in expected(), actual in 0u64..10) {
            let accepted = expected.accepts(actual);
            match expected {
                ExpectedVersion::Any => prop_assert!(accepted),
                ExpectedVersion::NoStream => prop_assert_eq!(accepted, actual == 0),
                ExpectedVersion::Exact(v) => prop_assert_eq!(accepted, v == actual),
            }
            // NoStream is Exact(0).
            prop_assert_eq!(ExpectedVersion::NoStream.accepts(actual), ExpectedVersion::Exact(0).accepts(actual));
        }
    }
}
