//! Configuration errors shared by every meshkit capability.
//!
//! Configs are plain data (`serde` `Deserialize`, defaults documented on each field) that each
//! capability validates once, when its layer is built. An invalid value is a [`ConfigError`]
//! whose message names the field, the allowed range and the value given:
//!
//! ```
//! use meshkit::breaker::{BreakerConfig, CircuitBreakerLayer};
//!
//! let config = BreakerConfig { failure_rate: 1.5, ..BreakerConfig::default() };
//! let error = CircuitBreakerLayer::new(config).unwrap_err();
//! assert_eq!(error.to_string(), "failure_rate must be in (0, 1], got 1.5");
//! assert_eq!(error.field(), "failure_rate");
//! ```

use std::fmt;

/// An invalid configuration value, found when a layer or runtime type is built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    field: String,
    expected: String,
    got: String,
}

impl ConfigError {
    /// Creates an error for `field`, which must be `expected` (for example `"in (0, 1]"`) and
    /// was `got`.
    pub fn new(
        field: impl Into<String>,
        expected: impl Into<String>,
        got: impl fmt::Display,
    ) -> Self {
        Self {
            field: field.into(),
            expected: expected.into(),
            got: got.to_string(),
        }
    }

    /// Places the field under a parent path: `window.size` at `breaker` becomes
    /// `breaker.window.size`.
    #[must_use]
    pub fn at(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }

    /// The dotted path of the offending field, e.g. `window.size`.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// What the field must be, e.g. `in (0, 1]`.
    pub fn expected(&self) -> &str {
        &self.expected
    }

    /// The value that was given, as text.
    pub fn got(&self) -> &str {
        &self.got
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} must be {}, got {}",
            self.field, self.expected, self.got
        )
    }
}

impl std::error::Error for ConfigError {}

/// Checks that `value` lies in `(0, 1]`, the range of every rate threshold.
pub(crate) fn rate_in_unit_interval(field: &str, value: f64) -> Result<(), ConfigError> {
    if value > 0.0 && value <= 1.0 {
        Ok(())
    } else {
        Err(ConfigError::new(field, "in (0, 1]", value))
    }
}

/// Checks that an integer lies in `[min, max]`.
pub(crate) fn int_in_range<T>(field: &str, value: T, min: T, max: T) -> Result<(), ConfigError>
where
    T: PartialOrd + fmt::Display,
{
    if value >= min && value <= max {
        Ok(())
    } else {
        Err(ConfigError::new(field, format!("in [{min}, {max}]"), value))
    }
}

/// Checks that a duration lies in `[min, max]`, printing all three in humantime form.
pub(crate) fn duration_in_range(
    field: &str,
    value: std::time::Duration,
    min: std::time::Duration,
    max: std::time::Duration,
) -> Result<(), ConfigError> {
    if value >= min && value <= max {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            format!(
                "in [{}, {}]",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
            humantime::format_duration(value),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn message_names_field_range_and_value() {
        let err = rate_in_unit_interval("failure_rate", 0.0).unwrap_err();
        assert_eq!(err.to_string(), "failure_rate must be in (0, 1], got 0");
    }

    #[test]
    fn nan_is_rejected() {
        assert!(rate_in_unit_interval("slow_call_rate", f64::NAN).is_err());
    }

    #[test]
    fn at_prefixes_the_path() {
        let err = int_in_range("window.size", 0u32, 1, 10)
            .unwrap_err()
            .at("breaker");
        assert_eq!(err.field(), "breaker.window.size");
        assert_eq!(
            err.to_string(),
            "breaker.window.size must be in [1, 10], got 0"
        );
    }

    #[test]
    fn durations_print_in_humantime() {
        let err = duration_in_range(
            "open_for",
            Duration::ZERO,
            Duration::from_millis(1),
            Duration::from_secs(86_400),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "open_for must be in [1ms, 1day], got 0s");
    }
}
