//! [`Event`]: the envelope every domain and system event travels in.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::SystemTime;
use uuid::Uuid;

/// A domain event: what happened (`event_type`), to which aggregate, with its data and
/// metadata (correlation and causation ids, trace context).
///
/// `id` is a UUID v7 (time-ordered); `version` is the event's position within its aggregate,
/// set by the event store on append.
///
/// ```
/// use meshkit::events::Event;
/// use serde_json::json;
///
/// let event = Event::new("UserCreated", "user-7", json!({ "name": "Ada" }))
///     .with_metadata("correlation_id", "req-42");
/// assert_eq!(event.event_type, "UserCreated");
/// assert_eq!(event.version, 0);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event<T = serde_json::Value> {
    /// Unique, time-ordered (UUID v7); appending an id twice stores it once.
    pub id: Uuid,
    /// What happened: `UserCreated`, `OrderUpdated`.
    pub event_type: String,
    /// The aggregate (entity) it happened to.
    pub aggregate_id: String,
    /// The event's data.
    pub data: T,
    /// Correlation and causation ids, trace context, ...
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// When it was created (UTC), serialized as RFC 3339.
    #[serde(with = "rfc3339")]
    pub timestamp: SystemTime,
    /// Its position within its aggregate, from 1 (0 until stored).
    #[serde(default)]
    pub version: u64,
}

impl<T> Event<T> {
    /// A new event with a fresh id, stamped now.
    pub fn new(event_type: impl Into<String>, aggregate_id: impl Into<String>, data: T) -> Self {
        Self {
            id: Uuid::now_v7(),
            event_type: event_type.into(),
            aggregate_id: aggregate_id.into(),
            data,
            metadata: BTreeMap::new(),
            timestamp: SystemTime::now(),
            version: 0,
        }
    }

    /// Adds a metadata entry.
    #[must_use]
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

impl<T: Serialize> Event<T> {
    /// The same event with its data as JSON, as stores keep it.
    ///
    /// # Errors
    /// The data's serialization error.
    pub fn to_json(&self) -> Result<Event, serde_json::Error> {
        Ok(Event {
            id: self.id,
            event_type: self.event_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            data: serde_json::to_value(&self.data)?,
            metadata: self.metadata.clone(),
            timestamp: self.timestamp,
            version: self.version,
        })
    }
}

impl Event {
    /// The same event with its data decoded as `T`: an error (never a panic) if it does not
    /// fit.
    ///
    /// # Errors
    /// The data's deserialization error.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<Event<T>, serde_json::Error> {
        Ok(Event {
            id: self.id,
            event_type: self.event_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            data: serde_json::from_value(self.data.clone())?,
            metadata: self.metadata.clone(),
            timestamp: self.timestamp,
            version: self.version,
        })
    }
}

/// Serde for `SystemTime` as RFC 3339 (`2026-11-26T06:30:00.123456789Z`).
mod rfc3339 {
    use serde::{de, Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub(super) fn serialize<S: Serializer>(
        time: &SystemTime,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_nanos(*time))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_rfc3339_weak(&text).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct UserCreated {
        name: String,
    }

    #[test]
    fn round_trips_through_json_and_decodes_typed_data() {
        let event = Event::new("UserCreated", "user-7", UserCreated { name: "Ada".into() })
            .with_metadata("correlation_id", "req-42");
        let stored = event.to_json().unwrap();
        let text = serde_json::to_string(&stored).unwrap();
        let back: Event = serde_json::from_str(&text).unwrap();
        assert_eq!(back, stored);
        assert_eq!(back.decode::<UserCreated>().unwrap().data, event.data);
        assert!(
            back.decode::<u64>().is_err(),
            "a mismatched payload is an error"
        );
        assert!(
            Event::new("A", "a", json!(1)).id < Event::new("A", "a", json!(1)).id,
            "v7 ids sort by time"
        );
    }
}
