//! [`RateLimitConfig`]: plain data, validated into the token bucket's settings.

use crate::config::{int_in_range, ConfigError};
use serde::{Deserialize, Serialize};

/// The highest rate a rate limit accepts, in requests per second: one token per nanosecond,
/// the clock's resolution.
const MAX_RATE: f64 = 1e9;

/// The largest burst a rate limit accepts.
const MAX_BURST: u32 = 1_000_000_000;

/// How fast a [`RateLimitLayer`](super::RateLimitLayer) admits requests.
///
/// Plain data: build it in code ([`per_second`](Self::per_second), or
/// `..RateLimitConfig::default()`) or deserialize it. Every field is optional; a missing
/// `burst` is the rate rounded up, so `{ "rate": 2.5 }` allows bursts of 3.
///
/// ```
/// use meshkit::limit::RateLimitConfig;
///
/// let config: RateLimitConfig = serde_json::from_str(r#"{ "rate": 2.5 }"#).unwrap();
/// assert_eq!(config, RateLimitConfig { rate: 2.5, burst: 3 });
/// assert_eq!(config, RateLimitConfig::per_second(2.5));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "RateLimitFields")]
pub struct RateLimitConfig {
    /// Requests admitted per second on average, in `(0, 1000000000]`; fractions are fine
    /// (`0.5` is one request every two seconds). Default `100`.
    pub rate: f64,
    /// Requests admitted at once after a quiet spell (the bucket's size), in
    /// `[1, 1000000000]`. Default: `rate` rounded up (`100`).
    pub burst: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self::per_second(100.0)
    }
}

impl RateLimitConfig {
    /// `rate` requests per second, with the default burst: `rate` rounded up.
    pub fn per_second(rate: f64) -> Self {
        Self {
            rate,
            burst: default_burst(rate),
        }
    }

    /// Checks every field, returning the first invalid one as a [`ConfigError`].
    ///
    /// # Errors
    /// A [`ConfigError`] naming the field (`rate` or `burst`), its allowed range and the
    /// value given.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Written so that NaN fails too.
        if !(self.rate > 0.0 && self.rate <= MAX_RATE) {
            return Err(ConfigError::new("rate", "in (0, 1000000000]", self.rate));
        }
        int_in_range("burst", self.burst, 1, MAX_BURST)
    }

    /// The time between two tokens, in nanoseconds, rounded to the nearest (at least one).
    /// The bucket caps it at a century.
    pub(crate) fn interval_nanos(&self) -> u64 {
        // Float-to-integer casts saturate: an interval too long for `u64` becomes `u64::MAX`.
        ((1e9 / self.rate).round() as u64).max(1)
    }
}

/// `rate` rounded up, at least 1.
fn default_burst(rate: f64) -> u32 {
    // Saturating cast: NaN and negative rates give 0, caught by validation of `rate` first.
    (rate.ceil() as u32).max(1)
}

/// The serialized form: as [`RateLimitConfig`], but a missing `burst` follows `rate`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RateLimitFields {
    rate: f64,
    burst: Option<u32>,
}

impl Default for RateLimitFields {
    fn default() -> Self {
        let config = RateLimitConfig::default();
        Self {
            rate: config.rate,
            burst: None,
        }
    }
}

impl From<RateLimitFields> for RateLimitConfig {
    fn from(fields: RateLimitFields) -> Self {
        Self {
            rate: fields.rate,
            burst: fields.burst.unwrap_or_else(|| default_burst(fields.rate)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(config: RateLimitConfig) -> String {
        config.validate().unwrap_err().to_string()
    }

    #[test]
    fn default_is_100_per_second_in_bursts_of_100() {
        let config = RateLimitConfig::default();
        assert_eq!(
            config,
            RateLimitConfig {
                rate: 100.0,
                burst: 100
            }
        );
        config.validate().unwrap();
        assert_eq!(config.interval_nanos(), 10_000_000);
    }

    #[test]
    fn every_bad_field_is_named_with_its_range() {
        let with_rate = |rate| RateLimitConfig { rate, burst: 1 };
        assert_eq!(
            error_of(with_rate(0.0)),
            "rate must be in (0, 1000000000], got 0"
        );
        assert_eq!(
            error_of(with_rate(-1.0)),
            "rate must be in (0, 1000000000], got -1"
        );
        assert_eq!(
            error_of(with_rate(f64::NAN)),
            "rate must be in (0, 1000000000], got NaN"
        );
        assert_eq!(
            error_of(with_rate(f64::INFINITY)),
            "rate must be in (0, 1000000000], got inf"
        );
        assert_eq!(
            error_of(RateLimitConfig {
                rate: 1.0,
                burst: 0
            }),
            "burst must be in [1, 1000000000], got 0"
        );
    }

    #[test]
    fn intervals_round_to_the_nanosecond_and_saturate() {
        assert_eq!(
            RateLimitConfig::per_second(3.0).interval_nanos(),
            333_333_333
        );
        assert_eq!(
            RateLimitConfig::per_second(0.5).interval_nanos(),
            2_000_000_000
        );
        assert_eq!(RateLimitConfig::per_second(1e9).interval_nanos(), 1);
        assert_eq!(RateLimitConfig::per_second(7e8).interval_nanos(), 1);
        assert_eq!(
            RateLimitConfig::per_second(1e-300).interval_nanos(),
            u64::MAX
        );
    }

    #[test]
    fn a_missing_burst_is_the_rate_rounded_up() {
        let parse = |json| serde_json::from_str::<RateLimitConfig>(json);
        assert_eq!(parse("{}").unwrap(), RateLimitConfig::default());
        assert_eq!(parse(r#"{ "rate": 0.2 }"#).unwrap().burst, 1);
        assert_eq!(parse(r#"{ "rate": 10 }"#).unwrap().burst, 10);
        assert_eq!(
            parse(r#"{ "burst": 7 }"#).unwrap(),
            RateLimitConfig {
                rate: 100.0,
                burst: 7
            }
        );
        let unknown = parse(r#"{ "rate": 1, "brust": 2 }"#).unwrap_err();
        assert!(
            unknown.to_string().contains("unknown field `brust`"),
            "{unknown}"
        );
    }
}
