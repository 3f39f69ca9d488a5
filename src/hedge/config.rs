//! [`HedgeConfig`] and [`HedgeDelay`]: plain data, validated when the layer is built.

use crate::config::{duration_in_range, int_in_range, ConfigError};
use crate::retry::BudgetConfig;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration;

/// Configuration of a [`HedgeLayer`](super::HedgeLayer).
///
/// ```
/// use meshkit::hedge::{HedgeConfig, HedgeDelay};
/// use std::time::Duration;
///
/// let fixed: HedgeConfig = serde_json::from_str(r#"{ "delay": "50ms", "max_hedges": 2 }"#).unwrap();
/// assert_eq!(fixed.delay, HedgeDelay::Fixed(Duration::from_millis(50)));
///
/// let adaptive: HedgeConfig = serde_json::from_str(r#"{
///     "delay": { "percentile": 0.95 },
///     "min_samples": 50,
///     "window": "30s",
///     "budget": { "ratio": 0.05, "min_per_sec": 5, "ttl": "10s" }
/// }"#).unwrap();
/// assert_eq!(adaptive.delay, HedgeDelay::Percentile(0.95));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HedgeConfig {
    /// How long to wait for a try before sending the next copy. Default the 95th percentile
    /// of recent latencies.
    pub delay: HedgeDelay,
    /// Copies sent besides the first try, in `[1, 10]`. Default `1`.
    pub max_hedges: u32,
    /// What bounds hedges across calls, as for retries. Default `{ ratio: 0.1, min_per_sec:
    /// 10, ttl: "10s" }`.
    pub budget: BudgetConfig,
    /// Latencies recorded before a percentile delay applies (no hedging until then), in
    /// `[1, 1000000]`. Default `100`.
    pub min_samples: u32,
    /// How far back latencies count for a percentile delay, in `[1s, 1h]`. Default `"30s"`.
    #[serde(with = "crate::duration")]
    pub window: Duration,
}

impl Default for HedgeConfig {
    fn default() -> Self {
        Self {
            delay: HedgeDelay::Percentile(0.95),
            max_hedges: 1,
            budget: BudgetConfig::Limited {
                ratio: 0.1,
                min_per_sec: 10,
                ttl: Duration::from_secs(10),
            },
            min_samples: 100,
            window: Duration::from_secs(30),
        }
    }
}

impl HedgeConfig {
    /// Checks every field, returning the first invalid one.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the field (`delay`, `max_hedges`, `budget.ratio`, ...) and its
    /// allowed range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.delay {
            HedgeDelay::Fixed(delay) => {
                duration_in_range("delay", delay, Duration::ZERO, Duration::from_secs(86_400))?
            }
            HedgeDelay::Percentile(p) => {
                if !(p > 0.0 && p < 1.0) {
                    return Err(ConfigError::new("delay.percentile", "in (0, 1)", p));
                }
            }
        }
        int_in_range("max_hedges", self.max_hedges, 1, 10)?;
        self.budget.validate().map_err(|e| e.at("budget"))?;
        int_in_range("min_samples", self.min_samples, 1, 1_000_000)?;
        duration_in_range(
            "window",
            self.window,
            Duration::from_secs(1),
            Duration::from_secs(3_600),
        )
    }
}

/// When a hedge is sent.
///
/// Written as a duration (`"50ms"`) for a fixed delay, or `{ "percentile": 0.95 }`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HedgeDelay {
    /// After this long, in `[0s, 1day]`.
    Fixed(Duration),
    /// After this quantile, in `(0, 1)`, of the latencies recorded within `window`.
    Percentile(f64),
}

impl Serialize for HedgeDelay {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match *self {
            Self::Fixed(delay) => serializer.collect_str(&humantime::format_duration(delay)),
            Self::Percentile(p) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("percentile", &p)?;
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for HedgeDelay {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DelayVisitor)
    }
}

struct DelayVisitor;

impl<'de> Visitor<'de> for DelayVisitor {
    type Value = HedgeDelay;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as \"50ms\" or a map { \"percentile\": 0.95 }")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<HedgeDelay, E> {
        humantime::parse_duration(value)
            .map(HedgeDelay::Fixed)
            .map_err(|_| E::invalid_value(de::Unexpected::Str(value), &self))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<HedgeDelay, A::Error> {
        let Some(key) = map.next_key::<String>()? else {
            return Err(de::Error::invalid_length(0, &self));
        };
        if key != "percentile" {
            return Err(de::Error::unknown_field(&key, &["percentile"]));
        }
        let p = map.next_value::<f64>()?;
        if let Some(extra) = map.next_key::<String>()? {
            return Err(de::Error::unknown_field(&extra, &["percentile"]));
        }
        Ok(HedgeDelay::Percentile(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_an_empty_document() {
        HedgeConfig::default().validate().unwrap();
        assert_eq!(
            serde_json::from_str::<HedgeConfig>("{}").unwrap(),
            HedgeConfig::default()
        );
    }

    #[test]
    fn delays_round_trip_in_both_forms() {
        for delay in [
            HedgeDelay::Fixed(Duration::from_millis(40)),
            HedgeDelay::Percentile(0.9),
        ] {
            let text = serde_json::to_string(&delay).unwrap();
            assert_eq!(serde_json::from_str::<HedgeDelay>(&text).unwrap(), delay);
        }
        assert!(serde_json::from_str::<HedgeDelay>(r#"{ "p99": 1 }"#).is_err());
        assert!(serde_json::from_str::<HedgeDelay>(r#""soon""#).is_err());
    }

    #[test]
    fn bad_fields_are_named_with_their_range() {
        let error = |config: HedgeConfig| config.validate().unwrap_err().to_string();
        let d = HedgeConfig::default;
        assert_eq!(
            error(HedgeConfig {
                delay: HedgeDelay::Percentile(1.0),
                ..d()
            }),
            "delay.percentile must be in (0, 1), got 1"
        );
        assert_eq!(
            error(HedgeConfig {
                max_hedges: 0,
                ..d()
            }),
            "max_hedges must be in [1, 10], got 0"
        );
        assert_eq!(
            error(HedgeConfig {
                budget: BudgetConfig::Limited {
                    ratio: -1.0,
                    min_per_sec: 1,
                    ttl: Duration::from_secs(1)
                },
                ..d()
            }),
            "budget.ratio must be in [0, 10], got -1"
        );
    }
}
