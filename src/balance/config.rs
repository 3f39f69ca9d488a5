//! [`BalanceConfig`]: the picker and fail-fast settings as plain data, and [`ConfiguredPicker`],
//! the picker it names.

use super::picker::{
    Cursor, LeastRequests, PeakEwma, Picker, Random, RoundRobin, WeightedRoundRobin,
};
use super::stats::EndpointLoads;
use crate::config::{duration_in_range, ConfigError};
use crate::random::SplitMix64;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Configuration of a [`Balance`](super::Balance) built with
/// [`Balance::from_config`](super::Balance::from_config).
///
/// ```
/// use meshkit::balance::{BalanceConfig, PickerKind};
///
/// let config: BalanceConfig =
///     serde_json::from_str(r#"{ "picker": "peak_ewma", "failfast_after": "2s" }"#).unwrap();
/// assert_eq!(config.picker, PickerKind::PeakEwma);
/// config.validate().unwrap();
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BalanceConfig {
    /// How endpoints are chosen. Default `least_requests`. (`ConsistentHash` needs a key
    /// function, so it is built in code.)
    pub picker: PickerKind,
    /// How long calls wait for a ready endpoint before failing fast with
    /// [`NoEndpoints`](super::NoEndpoints), in `[0s, 1h]`. Default `"3s"`.
    #[serde(with = "crate::duration")]
    pub failfast_after: Duration,
    /// Outlier ejection and panic mode; `"none"` (or `null` in formats that have it), the
    /// default, turns them off: in TOML, `ejection = "none"` turns off an ejection that a
    /// `defaults` section set.
    #[serde(with = "ejection_option")]
    pub ejection: Option<super::EjectionConfig>,
    /// The caller's zone: endpoints in it get every request while at least
    /// `min_local_endpoints` of them are usable (zone-aware routing). Default `null`: no
    /// preference.
    pub zone: Option<String>,
    /// Usable endpoints needed in the caller's zone to keep traffic there, in `[1, 1000]`.
    /// Default `1`.
    pub min_local_endpoints: u32,
}

/// `Option<EjectionConfig>` as a table, or `"none"` (also `null`) for `None`: TOML has no
/// `null`, and a key left out would take the default (or a `defaults` section's table).
mod ejection_option {
    use super::super::EjectionConfig;
    use serde::de::{self, value::MapAccessDeserializer, Deserializer, MapAccess, Visitor};
    use serde::{Deserialize, Serialize, Serializer};
    use std::fmt;

    pub(super) fn serialize<S: Serializer>(
        value: &Option<EjectionConfig>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(config) => config.serialize(serializer),
            None => serializer.serialize_str("none"),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<EjectionConfig>, D::Error> {
        deserializer.deserialize_any(MaybeEjection)
    }

    struct MaybeEjection;

    impl<'de> Visitor<'de> for MaybeEjection {
        type Value = Option<EjectionConfig>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table of ejection settings, or \"none\"")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, inner: D) -> Result<Self::Value, D::Error> {
            inner.deserialize_any(self)
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            match text.trim() {
                "none" => Ok(None),
                _ => Err(E::invalid_value(de::Unexpected::Str(text), &self)),
            }
        }

        fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<Self::Value, M::Error> {
            EjectionConfig::deserialize(MapAccessDeserializer::new(map)).map(Some)
        }
    }
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            picker: PickerKind::LeastRequests,
            failfast_after: Duration::from_secs(3),
            ejection: None,
            zone: None,
            min_local_endpoints: 1,
        }
    }
}

impl BalanceConfig {
    /// Checks every field.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the field (`failfast_after`, `ejection.failure_rate`, ...)
    /// and its range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        duration_in_range(
            "failfast_after",
            self.failfast_after,
            Duration::ZERO,
            Duration::from_secs(3_600),
        )?;
        crate::config::int_in_range("min_local_endpoints", self.min_local_endpoints, 1, 1_000)?;
        match &self.ejection {
            Some(ejection) => ejection.validate().map_err(|e| e.at("ejection")),
            None => Ok(()),
        }
    }
}

/// The pickers a [`BalanceConfig`] can name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PickerKind {
    /// [`RoundRobin`].
    RoundRobin,
    /// [`Random`].
    Random,
    /// [`WeightedRoundRobin`].
    WeightedRoundRobin,
    /// [`LeastRequests`].
    #[default]
    LeastRequests,
    /// [`PeakEwma`].
    PeakEwma,
}

/// The picker a [`PickerKind`] names, chosen at run time.
#[derive(Clone, Debug)]
pub struct ConfiguredPicker {
    kind: PickerKind,
    random: Random,
    // Made once: a pick must not build a picker (a `Random` allocates its handle count).
    least_requests: LeastRequests,
    peak_ewma: PeakEwma,
}

impl ConfiguredPicker {
    /// The picker `kind` names.
    pub fn new(kind: PickerKind) -> Self {
        Self {
            kind,
            random: Random::new(),
            least_requests: LeastRequests::default(),
            peak_ewma: PeakEwma::default(),
        }
    }
}

impl<Req> Picker<Req> for ConfiguredPicker {
    type Prepared = Option<Box<[u32]>>;
    type State = (Cursor, SplitMix64);

    fn prepare(&self, weights: &[u32], keys: &[u64]) -> Option<Box<[u32]>> {
        (self.kind == PickerKind::WeightedRoundRobin).then(|| {
            <WeightedRoundRobin as Picker<Req>>::prepare(&WeightedRoundRobin, weights, keys)
        })
    }

    fn state(&self) -> (Cursor, SplitMix64) {
        (
            <RoundRobin as Picker<Req>>::state(&RoundRobin),
            <Random as Picker<Req>>::state(&self.random),
        )
    }

    fn pick(
        &self,
        request: &Req,
        endpoints: &EndpointLoads,
        prepared: &Option<Box<[u32]>>,
        (cursor, random): &mut (Cursor, SplitMix64),
    ) -> usize {
        match (self.kind, prepared) {
            (PickerKind::RoundRobin, _) => RoundRobin.pick(request, endpoints, &(), cursor),
            (PickerKind::WeightedRoundRobin, Some(cycle)) => {
                WeightedRoundRobin.pick(request, endpoints, cycle, cursor)
            }
            (PickerKind::WeightedRoundRobin, None) => {
                RoundRobin.pick(request, endpoints, &(), cursor)
            }
            (PickerKind::Random, _) => self.random.pick(request, endpoints, &(), random),
            (PickerKind::LeastRequests, _) => {
                self.least_requests.pick(request, endpoints, &(), random)
            }
            (PickerKind::PeakEwma, _) => self.peak_ewma.pick(request, endpoints, &(), random),
        }
    }

    fn tracks_load(&self) -> bool {
        matches!(self.kind, PickerKind::LeastRequests | PickerKind::PeakEwma)
    }

    fn tracks_latency(&self) -> bool {
        self.kind == PickerKind::PeakEwma
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_an_empty_document_and_bad_values_are_named() {
        assert_eq!(
            serde_json::from_str::<BalanceConfig>("{}").unwrap(),
            BalanceConfig::default()
        );
        let bad = BalanceConfig {
            failfast_after: Duration::from_secs(7_200),
            ..BalanceConfig::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "failfast_after must be in [0s, 1h], got 2h"
        );
        assert!(serde_json::from_str::<BalanceConfig>(r#"{ "picker": "fastest" }"#).is_err());
    }
}
