//! [`RetryConfig`] and [`BudgetConfig`]: plain data, validated into the runtime settings.

use crate::backoff::Backoff;
use crate::config::{duration_in_range, int_in_range, ConfigError};
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration;

const ONE_DAY: Duration = Duration::from_secs(86_400);

/// Configuration of a [`RetryLayer`](super::RetryLayer).
///
/// Deserializes from the documented form, every field optional:
///
/// ```
/// use meshkit::retry::{BudgetConfig, RetryConfig};
/// use std::time::Duration;
///
/// let config: RetryConfig = serde_json::from_str(r#"{
///     "max_attempts": 4,
///     "backoff": { "kind": "exponential", "base": "50ms", "multiplier": 2.0, "max": "2s", "jitter": "full" },
///     "budget": { "ratio": 0.2, "min_per_sec": 10, "ttl": "10s" },
///     "per_try_timeout": "500ms",
///     "deadline": "3s",
///     "max_retry_after": "30s"
/// }"#).unwrap();
/// assert_eq!(config.max_attempts, 4);
/// assert_eq!(config.deadline, Some(Duration::from_secs(3)));
///
/// let unlimited: RetryConfig = serde_json::from_str(r#"{ "budget": "unlimited" }"#).unwrap();
/// assert_eq!(unlimited.budget, BudgetConfig::Unlimited);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Total tries, the first one included, in `[1, 100]`. Default `3`.
    pub max_attempts: u32,
    /// The wait before each retry. Default exponential from `"50ms"`, ×2, at most `"2s"`,
    /// full jitter.
    pub backoff: Backoff,
    /// What bounds retries across all calls. Default `{ ratio: 0.2, min_per_sec: 10,
    /// ttl: "10s" }`.
    pub budget: BudgetConfig,
    /// Time allowed for each try, in `[1ms, 1day]`; a try that takes longer fails with
    /// [`TimedOut`](super::TimedOut) and may be retried. Default none.
    #[serde(with = "crate::duration::option")]
    pub per_try_timeout: Option<Duration>,
    /// Time allowed for the whole call, all tries and waits included, in `[1ms, 1day]`.
    /// Default none.
    #[serde(with = "crate::duration::option")]
    pub deadline: Option<Duration>,
    /// The longest server delay hint (`Retry-After`) worth waiting for, in `[0s, 1day]`; a
    /// longer hint returns the response as is. Default `"30s"`.
    #[serde(with = "crate::duration")]
    pub max_retry_after: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff: Backoff::default(),
            budget: BudgetConfig::default(),
            per_try_timeout: None,
            deadline: None,
            max_retry_after: Duration::from_secs(30),
        }
    }
}

impl RetryConfig {
    /// Checks every field, returning the first invalid one.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the field (`backoff.multiplier`, `budget.ttl`, ...) and its
    /// allowed range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        int_in_range("max_attempts", self.max_attempts, 1, 100)?;
        self.backoff.validate().map_err(|e| e.at("backoff"))?;
        self.budget.validate().map_err(|e| e.at("budget"))?;
        let timeout = |field, value: Option<Duration>| match value {
            Some(value) => duration_in_range(field, value, Duration::from_millis(1), ONE_DAY),
            None => Ok(()),
        };
        timeout("per_try_timeout", self.per_try_timeout)?;
        timeout("deadline", self.deadline)?;
        duration_in_range(
            "max_retry_after",
            self.max_retry_after,
            Duration::ZERO,
            ONE_DAY,
        )
    }
}

/// What bounds retries (and hedges) across all the calls that share a
/// [`RetryBudget`](super::RetryBudget).
///
/// Written as `{ "ratio": 0.2, "min_per_sec": 10, "ttl": "10s" }` (each field optional) or
/// `"unlimited"`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BudgetConfig {
    /// Retries within the last `ttl` may number at most `ratio` × the first tries within it,
    /// plus `min_per_sec` × `ttl` so that a quiet service can still retry.
    Limited {
        /// Retries allowed per first try, in `[0, 10]`. Default `0.2`.
        ratio: f64,
        /// Retries allowed per second whatever the traffic, in `[0, 1000000]`. Default `10`.
        min_per_sec: u32,
        /// How long a first try or a retry counts, in `[1s, 60s]`. Default `"10s"`.
        ttl: Duration,
    },
    /// No bound: every retry the policy wants happens. An explicit opt-out.
    Unlimited,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self::Limited {
            ratio: 0.2,
            min_per_sec: 10,
            ttl: Duration::from_secs(10),
        }
    }
}

impl BudgetConfig {
    /// Checks every field, returning the first invalid one.
    ///
    /// # Errors
    /// A [`ConfigError`] naming `ratio`, `min_per_sec` or `ttl` with its allowed range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let Self::Limited {
            ratio,
            min_per_sec,
            ttl,
        } = *self
        else {
            return Ok(());
        };
        if !(0.0..=10.0).contains(&ratio) {
            return Err(ConfigError::new("ratio", "in [0, 10]", ratio));
        }
        int_in_range("min_per_sec", min_per_sec, 0, 1_000_000)?;
        duration_in_range("ttl", ttl, Duration::from_secs(1), Duration::from_secs(60))
    }
}

/// The map form of [`BudgetConfig::Limited`].
#[derive(Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LimitedForm {
    ratio: f64,
    min_per_sec: u32,
    #[serde(with = "crate::duration")]
    ttl: Duration,
}

impl Default for LimitedForm {
    fn default() -> Self {
        match BudgetConfig::default() {
            BudgetConfig::Limited {
                ratio,
                min_per_sec,
                ttl,
            } => Self {
                ratio,
                min_per_sec,
                ttl,
            },
            BudgetConfig::Unlimited => unreachable!("the default budget is limited"),
        }
    }
}

impl Serialize for BudgetConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match *self {
            Self::Limited {
                ratio,
                min_per_sec,
                ttl,
            } => LimitedForm {
                ratio,
                min_per_sec,
                ttl,
            }
            .serialize(serializer),
            Self::Unlimited => serializer.serialize_str("unlimited"),
        }
    }
}

impl<'de> Deserialize<'de> for BudgetConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(BudgetVisitor)
    }
}

struct BudgetVisitor;

impl<'de> Visitor<'de> for BudgetVisitor {
    type Value = BudgetConfig;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"unlimited\" or a map with ratio, min_per_sec and ttl")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<BudgetConfig, E> {
        match value {
            "unlimited" => Ok(BudgetConfig::Unlimited),
            other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<BudgetConfig, A::Error> {
        let form = LimitedForm::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(BudgetConfig::Limited {
            ratio: form.ratio,
            min_per_sec: form.min_per_sec,
            ttl: form.ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(config: RetryConfig) -> String {
        config.validate().unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_valid_and_match_an_empty_document() {
        RetryConfig::default().validate().unwrap();
        let parsed: RetryConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, RetryConfig::default());
    }

    #[test]
    fn bad_fields_are_named_with_their_range() {
        let d = RetryConfig::default;
        assert_eq!(
            error(RetryConfig {
                max_attempts: 0,
                ..d()
            }),
            "max_attempts must be in [1, 100], got 0"
        );
        let mut config = d();
        config.backoff.multiplier = f64::NAN;
        assert_eq!(
            error(config),
            "backoff.multiplier must be in [1, 100], got NaN"
        );
        let mut config = d();
        config.backoff.base = Duration::from_secs(5);
        assert_eq!(error(config), "backoff.base must be in [0s, 2s], got 5s");
        let limited = |ratio, ttl| BudgetConfig::Limited {
            ratio,
            min_per_sec: 10,
            ttl,
        };
        assert_eq!(
            error(RetryConfig {
                budget: limited(10.5, Duration::from_secs(10)),
                ..d()
            }),
            "budget.ratio must be in [0, 10], got 10.5"
        );
        assert_eq!(
            error(RetryConfig {
                budget: limited(0.2, Duration::from_millis(500)),
                ..d()
            }),
            "budget.ttl must be in [1s, 1m], got 500ms"
        );
        assert_eq!(
            error(RetryConfig {
                per_try_timeout: Some(Duration::ZERO),
                ..d()
            }),
            "per_try_timeout must be in [1ms, 1day], got 0s"
        );
    }

    #[test]
    fn budgets_round_trip_in_both_forms() {
        for budget in [BudgetConfig::default(), BudgetConfig::Unlimited] {
            let text = serde_json::to_string(&budget).unwrap();
            assert_eq!(serde_json::from_str::<BudgetConfig>(&text).unwrap(), budget);
        }
        let partial: BudgetConfig = serde_json::from_str(r#"{ "ratio": 0.5 }"#).unwrap();
        assert_eq!(
            partial,
            BudgetConfig::Limited {
                ratio: 0.5,
                min_per_sec: 10,
                ttl: Duration::from_secs(10)
            }
        );
        let wrong = serde_json::from_str::<BudgetConfig>(r#""sometimes""#).unwrap_err();
        assert!(wrong.to_string().contains("unlimited"), "{wrong}");
    }
}
