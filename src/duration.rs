//! Serde support for durations written the way people write them: `"250ms"`, `"30s"`, `"1m 30s"`.
//!
//! Use it on your own config fields with `#[serde(with = "meshkit::duration")]`, or
//! `meshkit::duration::option` for an `Option<Duration>`. Serializing writes the same form.
//!
//! ```
//! use std::time::Duration;
//!
//! #[derive(serde::Deserialize)]
//! struct Probe {
//!     #[serde(with = "meshkit::duration")]
//!     interval: Duration,
//! }
//!
//! let probe: Probe = serde_json::from_str(r#"{ "interval": "250ms" }"#).unwrap();
//! assert_eq!(probe.interval, Duration::from_millis(250));
//! ```

use serde::{de, Deserializer, Serializer};
use std::fmt;
use std::time::Duration;

/// Serializes a duration as a humantime string (`"1m 30s"`).
pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&humantime::format_duration(*value))
}

/// Deserializes a duration from a humantime string (`"250ms"`, `"30s"`, `"1h 5m"`).
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    deserializer.deserialize_str(HumanDuration)
}

struct HumanDuration;

impl de::Visitor<'_> for HumanDuration {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as \"250ms\", \"30s\" or \"1m 30s\"")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
        humantime::parse_duration(text.trim()).map_err(|err| {
            E::custom(format_args!(
                "invalid duration {text:?}: {err} (write it like \"250ms\" or \"30s\")"
            ))
        })
    }
}

/// The same format for `Option<Duration>`: a missing field or `null` is `None`.
///
/// Pair it with `#[serde(default)]` so that an absent field deserializes to `None`.
pub mod option {
    use super::*;
    use serde::Deserialize;

    /// Serializes `Some(duration)` as a humantime string and `None` as `null`.
    pub fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(duration) => super::serialize(duration, serializer),
            None => serializer.serialize_none(),
        }
    }

    /// Deserializes `null` as `None` and a humantime string as `Some(duration)`.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapper(#[serde(with = "super")] Duration);
        Ok(Option::<Wrapper>::deserialize(deserializer)?.map(|Wrapper(d)| d))
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};
    use std::time::Duration;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Sample {
        #[serde(with = "crate::duration")]
        wait: Duration,
        #[serde(default, with = "crate::duration::option")]
        limit: Option<Duration>,
    }

    #[test]
    fn parses_humantime_strings() {
        let sample: Sample = serde_json::from_str(r#"{"wait":"1m 30s","limit":"250ms"}"#).unwrap();
        assert_eq!(sample.wait, Duration::from_secs(90));
        assert_eq!(sample.limit, Some(Duration::from_millis(250)));
    }

    #[test]
    fn missing_optional_is_none_and_round_trips() {
        let sample: Sample = serde_json::from_str(r#"{"wait":"30s"}"#).unwrap();
        assert_eq!(sample.limit, None);
        let text = serde_json::to_string(&sample).unwrap();
        assert_eq!(serde_json::from_str::<Sample>(&text).unwrap(), sample);
    }

    #[test]
    fn garbage_names_the_expected_form() {
        let err = serde_json::from_str::<Sample>(r#"{"wait":"soon"}"#).unwrap_err();
        assert!(
            err.to_string().contains("invalid duration \"soon\""),
            "{err}"
        );
    }
}
