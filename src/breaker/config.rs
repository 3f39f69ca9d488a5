//! The breaker's configuration and its validation into runtime settings.

use crate::backoff::{Backoff, BackoffKind, Jitter};
use crate::config::{duration_in_range, int_in_range, rate_in_unit_interval, ConfigError};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The longest duration any breaker setting accepts; keeps deadline arithmetic far from overflow.
const ONE_DAY: Duration = Duration::from_secs(86_400);

/// How a circuit breaker decides when to open.
///
/// Plain data: build it in code with `..BreakerConfig::default()` or deserialize it (every
/// field is optional and durations are humantime strings). [`CircuitBreakerLayer::new`]
/// validates it and names the first bad field.
///
/// ```
/// use meshkit::breaker::{BreakerConfig, WindowConfig};
/// use std::time::Duration;
///
/// let config: BreakerConfig = serde_json::from_str(r#"{
///     "failure_rate": 0.25,
///     "window": { "kind": "time", "duration": "30s" },
///     "slow_call_duration": "2s",
///     "open_for": "5s"
/// }"#).unwrap();
/// assert_eq!(config.window, WindowConfig::Time { duration: Duration::from_secs(30) });
/// assert_eq!(config.minimum_calls, BreakerConfig::default().minimum_calls);
/// ```
///
/// [`CircuitBreakerLayer::new`]: crate::breaker::CircuitBreakerLayer::new
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Failure rate at or above which the breaker opens, in `(0, 1]`. Default `0.5`.
    pub failure_rate: f64,
    /// The sliding window the rates are computed over. Default: the last 100 calls.
    pub window: WindowConfig,
    /// Calls the window must hold before rates are evaluated, at least 1 (and at most the
    /// window size for a count window). Default `20`.
    pub minimum_calls: u32,
    /// Also opens after this many failures in a row, whatever the window's rates and
    /// `minimum_calls` say (a success, slow or not, starts the count again), in
    /// `[1, 1000000]`: the consecutive-failures rule of Polly's basic breaker and Envoy's
    /// outlier detection, next to Resilience4j's rates. Default: unset.
    pub consecutive_failures: Option<u32>,
    /// Calls that take at least this long count as slow. Default: unset (slow calls are not
    /// tracked, and successes cost no clock read).
    #[serde(with = "crate::duration::option")]
    pub slow_call_duration: Option<Duration>,
    /// Slow-call rate at or above which the breaker opens, in `(0, 1]`. Only used when
    /// `slow_call_duration` is set. Default `1.0`.
    pub slow_call_rate: f64,
    /// How long the breaker stays open the first time, in `[1ms, 1day]`. Default `"10s"`.
    #[serde(with = "crate::duration")]
    pub open_for: Duration,
    /// The longest open period repeated openings may reach, in `[open_for, 1day]`.
    /// Default `"2m"`.
    #[serde(with = "crate::duration")]
    pub open_for_max: Duration,
    /// Each opening that follows a failed half-open test lasts this many times the previous
    /// one (minus up to 10% jitter, never below `open_for`), in `[1, 100]`. Closing resets the
    /// sequence. Default `2.0`.
    pub open_backoff: f64,
    /// Probe calls admitted in the half-open state, all of which may run at once; the breaker
    /// decides after this many have finished. In `[1, 10000]`. Default `5`.
    pub half_open_calls: u32,
    /// A probe still running this long after it was sent re-opens the breaker, as does a
    /// probe slot that `poll_ready` reserved and no call used for this long; in
    /// `[1ms, 1day]`. Default `"10s"`.
    #[serde(with = "crate::duration")]
    pub half_open_timeout: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_rate: 0.5,
            window: WindowConfig::default(),
            minimum_calls: 20,
            consecutive_failures: None,
            slow_call_duration: None,
            slow_call_rate: 1.0,
            open_for: Duration::from_secs(10),
            open_for_max: Duration::from_secs(120),
            open_backoff: 2.0,
            half_open_calls: 5,
            half_open_timeout: Duration::from_secs(10),
        }
    }
}

/// The sliding window over which failure and slow-call rates are computed.
///
/// Read from a table tagged by its `kind` (`{ kind = "count", size = 50 }`, `{ kind = "time",
/// duration = "30s" }`). The `kind` may be left out where the fields say it: `{ size = 50 }`
/// is a count window, `{ duration = "30s" }` a time window, and `{}` the default (a count
/// window of 100 calls), as is `{ kind = "count" }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum WindowConfig {
    /// The last `size` recorded calls, `size` in `[1, 1000000]`.
    Count {
        /// Number of calls in the window.
        size: u32,
    },
    /// The calls recorded in the last `duration`, in `[1s, 1h]`, kept in 60 buckets.
    ///
    /// Successes recorded without the lock (once the window holds `minimum_calls` calls) read
    /// no clock: they count in the bucket current when the breaker's timer last moved the
    /// window. That timer fires at each bucket boundary, on tokio's millisecond clock and
    /// when the runtime gets to it, so a success made between a boundary and that moment
    /// counts in the bucket before (and leaves the window a bucket early; more, if the
    /// runtime is late by more than a bucket). Failures and slow calls read the clock and
    /// always count in their own bucket.
    Time {
        /// Length of the window, e.g. `"60s"`.
        #[serde(with = "crate::duration")]
        duration: Duration,
    },
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig::Count {
            size: DEFAULT_WINDOW_SIZE,
        }
    }
}

/// Calls in the default count window.
const DEFAULT_WINDOW_SIZE: u32 = 100;

impl<'de> Deserialize<'de> for WindowConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;

        #[derive(Deserialize)]
        #[serde(rename_all = "lowercase")]
        enum Kind {
            Count,
            Time,
        }
        /// Every field of every kind, each checked against the kind below.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            kind: Option<Kind>,
            size: Option<u32>,
            #[serde(default, deserialize_with = "some_duration")]
            duration: Option<Duration>,
        }
        fn some_duration<'de, D: serde::Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Duration>, D::Error> {
            crate::duration::deserialize(deserializer).map(Some)
        }

        let Fields {
            kind,
            size,
            duration,
        } = Fields::deserialize(deserializer)?;
        match (kind, size, duration) {
            (Some(Kind::Count), _, Some(_)) => {
                Err(D::Error::unknown_field("duration", &["kind", "size"]))
            }
            (Some(Kind::Time), Some(_), _) => {
                Err(D::Error::unknown_field("size", &["kind", "duration"]))
            }
            (Some(Kind::Time), None, None) => Err(D::Error::missing_field("duration")),
            (None, Some(_), Some(_)) => Err(D::Error::custom(
                "a window has a `size` (a count window) or a `duration` (a time window), not both",
            )),
            (Some(Kind::Time) | None, None, Some(duration)) => Ok(WindowConfig::Time { duration }),
            (Some(Kind::Count) | None, size, None) => Ok(WindowConfig::Count {
                size: size.unwrap_or(DEFAULT_WINDOW_SIZE),
            }),
        }
    }
}

/// The validated form of [`BreakerConfig`] the breaker runs with.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) failure_rate: f64,
    pub(crate) window: WindowConfig,
    pub(crate) minimum_calls: u64,
    pub(crate) consecutive_failures: Option<u64>,
    pub(crate) slow_call_duration: Option<Duration>,
    pub(crate) slow_call_rate: f64,
    pub(crate) open_for: Duration,
    pub(crate) open_for_max: Duration,
    pub(crate) open_backoff: f64,
    pub(crate) half_open_calls: u32,
    pub(crate) half_open_timeout: Duration,
}

impl BreakerConfig {
    /// Checks every field, returning the first invalid one as a [`ConfigError`].
    ///
    /// # Errors
    /// A [`ConfigError`] naming the field, its allowed range and the value given.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.settings().map(drop)
    }

    pub(crate) fn settings(&self) -> Result<Settings, ConfigError> {
        rate_in_unit_interval("failure_rate", self.failure_rate)?;
        let max_minimum_calls = match self.window {
            WindowConfig::Count { size } => {
                int_in_range("window.size", size, 1, 1_000_000)?;
                size
            }
            WindowConfig::Time { duration } => {
                duration_in_range(
                    "window.duration",
                    duration,
                    Duration::from_secs(1),
                    Duration::from_secs(3600),
                )?;
                u32::MAX
            }
        };
        if self.minimum_calls < 1 || self.minimum_calls > max_minimum_calls {
            let range = match self.window {
                WindowConfig::Count { .. } => "in [1, window.size]".to_owned(),
                WindowConfig::Time { .. } => format!("in [1, {}]", u32::MAX),
            };
            return Err(ConfigError::new("minimum_calls", range, self.minimum_calls));
        }
        if let Some(run) = self.consecutive_failures {
            int_in_range("consecutive_failures", run, 1, 1_000_000)?;
        }
        if let Some(slow) = self.slow_call_duration {
            duration_in_range(
                "slow_call_duration",
                slow,
                Duration::from_millis(1),
                ONE_DAY,
            )?;
        }
        rate_in_unit_interval("slow_call_rate", self.slow_call_rate)?;
        duration_in_range("open_for", self.open_for, Duration::from_millis(1), ONE_DAY)?;
        duration_in_range("open_for_max", self.open_for_max, self.open_for, ONE_DAY)?;
        if !(self.open_backoff >= 1.0 && self.open_backoff <= 100.0) {
            return Err(ConfigError::new(
                "open_backoff",
                "in [1, 100]",
                self.open_backoff,
            ));
        }
        int_in_range("half_open_calls", self.half_open_calls, 1, 10_000)?;
        duration_in_range(
            "half_open_timeout",
            self.half_open_timeout,
            Duration::from_millis(1),
            ONE_DAY,
        )?;
        Ok(Settings {
            failure_rate: self.failure_rate,
            window: self.window,
            minimum_calls: u64::from(self.minimum_calls),
            consecutive_failures: self.consecutive_failures.map(u64::from),
            slow_call_duration: self.slow_call_duration,
            slow_call_rate: self.slow_call_rate,
            open_for: self.open_for,
            open_for_max: self.open_for_max,
            open_backoff: self.open_backoff,
            half_open_calls: self.half_open_calls,
            half_open_timeout: self.half_open_timeout,
        })
    }
}

impl Settings {
    /// Whether `counts` meet an opening threshold: enough calls, and a failure or slow-call
    /// rate at or above its limit. Rates are compared as quotients so that `3/10` meets `0.3`.
    pub(crate) fn trips(&self, calls: u64, failures: u64, slow: u64) -> bool {
        if calls == 0 || calls < self.minimum_calls {
            return false;
        }
        let calls = calls as f64;
        failures as f64 / calls >= self.failure_rate
            || (self.slow_call_duration.is_some() && slow as f64 / calls >= self.slow_call_rate)
    }

    /// The length of the `openings`-th consecutive open period (1-based): exponential growth
    /// from `open_for` by `open_backoff`, capped at `open_for_max`, and for repeated openings
    /// up to 10% shorter (`jitter_unit` in `[0, 1)`), so that breakers that opened together do
    /// not all probe together. Never shorter than `open_for`.
    pub(crate) fn open_period(&self, openings: u32, jitter_unit: f64) -> Duration {
        let growth = Backoff {
            kind: BackoffKind::Exponential,
            base: self.open_for,
            multiplier: self.open_backoff,
            max: self.open_for_max,
            jitter: Jitter::None,
        }
        .growth(openings);
        if openings <= 1 || growth <= self.open_for {
            return self.open_for;
        }
        growth.mul_f64(1.0 - 0.1 * jitter_unit).max(self.open_for)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(config: BreakerConfig) -> String {
        config.validate().unwrap_err().to_string()
    }

    #[test]
    fn default_is_valid() {
        BreakerConfig::default().validate().unwrap();
    }

    #[test]
    fn every_bad_field_is_named_with_its_range() {
        let d = BreakerConfig::default;
        assert_eq!(
            error_of(BreakerConfig {
                failure_rate: 1.5,
                ..d()
            }),
            "failure_rate must be in (0, 1], got 1.5"
        );
        assert_eq!(
            error_of(BreakerConfig {
                window: WindowConfig::Count { size: 0 },
                ..d()
            }),
            "window.size must be in [1, 1000000], got 0"
        );
        assert_eq!(
            error_of(BreakerConfig {
                window: WindowConfig::Time {
                    duration: Duration::from_millis(10)
                },
                ..d()
            }),
            "window.duration must be in [1s, 1h], got 10ms"
        );
        assert_eq!(
            error_of(BreakerConfig {
                minimum_calls: 101,
                ..d()
            }),
            "minimum_calls must be in [1, window.size], got 101"
        );
        assert_eq!(
            error_of(BreakerConfig {
                minimum_calls: 0,
                ..d()
            }),
            "minimum_calls must be in [1, window.size], got 0"
        );
        assert_eq!(
            error_of(BreakerConfig {
                consecutive_failures: Some(0),
                ..d()
            }),
            "consecutive_failures must be in [1, 1000000], got 0"
        );
        assert_eq!(
            error_of(BreakerConfig {
                slow_call_duration: Some(Duration::ZERO),
                ..d()
            }),
            "slow_call_duration must be in [1ms, 1day], got 0s"
        );
        assert_eq!(
            error_of(BreakerConfig {
                slow_call_rate: -0.1,
                ..d()
            }),
            "slow_call_rate must be in (0, 1], got -0.1"
        );
        assert_eq!(
            error_of(BreakerConfig {
                open_for: Duration::ZERO,
                ..d()
            }),
            "open_for must be in [1ms, 1day], got 0s"
        );
        assert_eq!(
            error_of(BreakerConfig {
                open_for_max: Duration::from_secs(5),
                ..d()
            }),
            "open_for_max must be in [10s, 1day], got 5s"
        );
        assert_eq!(
            error_of(BreakerConfig {
                open_backoff: f64::NAN,
                ..d()
            }),
            "open_backoff must be in [1, 100], got NaN"
        );
        assert_eq!(
            error_of(BreakerConfig {
                half_open_calls: 0,
                ..d()
            }),
            "half_open_calls must be in [1, 10000], got 0"
        );
        assert_eq!(
            error_of(BreakerConfig {
                half_open_timeout: Duration::ZERO,
                ..d()
            }),
            "half_open_timeout must be in [1ms, 1day], got 0s"
        );
    }

    #[test]
    fn deserializes_with_defaults_and_rejects_unknown_fields() {
        let config: BreakerConfig =
            serde_json::from_str(r#"{"window":{"kind":"count","size":10},"minimum_calls":5}"#)
                .unwrap();
        assert_eq!(config.window, WindowConfig::Count { size: 10 });
        assert_eq!(config.open_for, Duration::from_secs(10));
        let err = serde_json::from_str::<BreakerConfig>(r#"{"failure_ratio":0.5}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `failure_ratio`"),
            "{err}"
        );
    }

    #[test]
    fn an_empty_document_deserializes_to_the_documented_defaults() {
        let config: BreakerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config, BreakerConfig::default());
        assert_eq!(config.failure_rate, 0.5);
        assert_eq!(config.window, WindowConfig::Count { size: 100 });
        assert_eq!(config.minimum_calls, 20);
        assert_eq!(config.consecutive_failures, None);
        assert_eq!(config.slow_call_duration, None);
        assert_eq!(config.slow_call_rate, 1.0);
        assert_eq!(config.open_for, Duration::from_secs(10));
        assert_eq!(config.open_for_max, Duration::from_secs(120));
        assert_eq!(config.open_backoff, 2.0);
        assert_eq!(config.half_open_calls, 5);
        assert_eq!(config.half_open_timeout, Duration::from_secs(10));
    }

    #[test]
    fn config_round_trips_through_serde() {
        let config = BreakerConfig {
            window: WindowConfig::Time {
                duration: Duration::from_secs(90),
            },
            slow_call_duration: Some(Duration::from_millis(750)),
            ..BreakerConfig::default()
        };
        let text = serde_json::to_string(&config).unwrap();
        assert_eq!(
            serde_json::from_str::<BreakerConfig>(&text).unwrap(),
            config
        );
    }

    #[test]
    fn rates_compare_exactly_as_quotients() {
        let settings = BreakerConfig {
            failure_rate: 0.3,
            minimum_calls: 10,
            ..Default::default()
        }
        .settings()
        .unwrap();
        assert!(settings.trips(10, 3, 0));
        assert!(!settings.trips(10, 2, 0));
        assert!(!settings.trips(9, 9, 0), "below minimum_calls");
    }

    #[test]
    fn open_periods_grow_with_jitter_and_stay_capped() {
        let settings = BreakerConfig::default().settings().unwrap();
        assert_eq!(settings.open_period(1, 0.99), Duration::from_secs(10));
        assert_eq!(settings.open_period(2, 0.0), Duration::from_secs(20));
        let jittered = settings.open_period(2, 0.99);
        assert!(jittered < Duration::from_secs(20) && jittered >= Duration::from_secs(18));
        assert_eq!(settings.open_period(30, 0.0), Duration::from_secs(120));
        assert!(settings.open_period(30, 0.5) >= Duration::from_secs(10));
    }
}
