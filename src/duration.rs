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

/// The same format for `Option<Duration>`: `null`, or the string `"none"` (which TOML, with
/// no `null`, needs to say "no limit"), is `None`.
///
/// Pair it with `#[serde(default)]` so that an absent field deserializes to its default.
pub mod option {
    use super::*;

    /// Serializes `Some(duration)` as a humantime string and `None` as `"none"` (a format
    /// without `null`, such as TOML, would otherwise leave the key out, and reading it back
    /// would give the field's default instead of `None`).
    pub fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(duration) => super::serialize(duration, serializer),
            None => serializer.serialize_str("none"),
        }
    }

    /// Deserializes `null` and `"none"` as `None`, a humantime string as `Some(duration)`.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        deserializer.deserialize_option(MaybeDuration)
    }

    struct MaybeDuration;

    impl<'de> de::Visitor<'de> for MaybeDuration {
        type Value = Option<Duration>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as \"250ms\" or \"30s\", or \"none\"")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, inner: D) -> Result<Self::Value, D::Error> {
            inner.deserialize_str(self)
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            if text.trim() == "none" {
                Ok(None)
            } else {
                HumanDuration.visit_str(text).map(Some)
            }
        }
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
    fn none_is_written_and_read_as_a_string() {
        let sample: Sample = serde_json::from_str(r#"{"wait":"1s","limit":"none"}"#).unwrap();
        assert_eq!(sample.limit, None);
        let null: Sample = serde_json::from_str(r#"{"wait":"1s","limit":null}"#).unwrap();
        assert_eq!(null.limit, None);
        let text = toml::to_string(&sample).unwrap();
        assert!(text.contains("limit = \"none\""), "{text}");
        assert_eq!(toml::from_str::<Sample>(&text).unwrap(), sample);
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
