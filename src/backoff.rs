//! How long to wait before the next attempt: constant, linear or exponential growth, capped,
//! with optional jitter.
//!
//! ```
//! use meshkit::backoff::{Backoff, BackoffKind, Jitter};
//! use meshkit::random::SplitMix64;
//! use std::time::Duration;
//!
//! let backoff = Backoff {
//!     kind: BackoffKind::Exponential,
//!     base: Duration::from_millis(50),
//!     multiplier: 2.0,
//!     max: Duration::from_millis(300),
//!     jitter: Jitter::None,
//! };
//! backoff.validate().unwrap();
//! let delays: Vec<Duration> = backoff.delays(SplitMix64::seeded(1)).take(5).collect();
//! let ms = |n| Duration::from_millis(n);
//! assert_eq!(delays, [ms(50), ms(100), ms(200), ms(300), ms(300)]);
//! ```
//!
//! ## Growth
//!
//! For the n-th wait (n = 1, 2, ...): `constant` waits `base`; `linear` waits `n × base`;
//! `exponential` waits `base × multiplierⁿ⁻¹`. Every kind is capped at `max`.
//!
//! ## Jitter
//!
//! With `d` the wait before jitter: `none` waits `d`; `full` a uniform time in `[0, d]`;
//! `equal` `d/2` plus a uniform time in `[0, d/2]`; `decorrelated` a uniform time in
//! `[base, 3 × previous wait]`, capped at `max` (the first previous wait is `base`).

use crate::config::{duration_in_range, ConfigError};
use crate::random::RandomSource;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The longest wait any backoff accepts.
const ONE_DAY: Duration = Duration::from_secs(86_400);

/// A backoff policy: plain data, validated with [`Backoff::validate`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backoff {
    /// How the wait grows. Default `exponential`.
    pub kind: BackoffKind,
    /// The first wait, in `[0s, max]`. Default `"50ms"`.
    #[serde(with = "crate::duration")]
    pub base: Duration,
    /// Growth factor of an exponential backoff, in `[1, 100]`. Default `2.0`.
    pub multiplier: f64,
    /// The longest wait, in `[base, 1day]`. Default `"2s"`.
    #[serde(with = "crate::duration")]
    pub max: Duration,
    /// How the wait is randomised. Default `full`.
    pub jitter: Jitter,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            kind: BackoffKind::Exponential,
            base: Duration::from_millis(50),
            multiplier: 2.0,
            max: Duration::from_secs(2),
            jitter: Jitter::Full,
        }
    }
}

/// How a backoff's wait grows from one attempt to the next.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackoffKind {
    /// Always `base`.
    Constant,
    /// `n × base` for the n-th wait.
    Linear,
    /// `base × multiplierⁿ⁻¹` for the n-th wait.
    #[default]
    Exponential,
}

/// How a wait is randomised so that many clients do not retry in lockstep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    /// The wait as computed.
    None,
    /// Uniform in `[0, d]`.
    #[default]
    Full,
    /// `d/2` plus uniform in `[0, d/2]`.
    Equal,
    /// Uniform in `[base, 3 × previous wait]`, capped at `max`.
    Decorrelated,
}

impl Backoff {
    /// Checks every field, returning the first invalid one.
    ///
    /// # Errors
    /// A [`ConfigError`] naming `base`, `multiplier` or `max` with its allowed range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        duration_in_range("max", self.max, Duration::ZERO, ONE_DAY)?;
        duration_in_range("base", self.base, Duration::ZERO, self.max)?;
        if !(self.multiplier >= 1.0 && self.multiplier <= 100.0) {
            return Err(ConfigError::new(
                "multiplier",
                "in [1, 100]",
                self.multiplier,
            ));
        }
        Ok(())
    }

    /// The `n`-th wait (1-based) before jitter, capped at `max`.
    pub fn growth(&self, n: u32) -> Duration {
        let n = n.max(1);
        let grown = match self.kind {
            BackoffKind::Constant => self.base,
            BackoffKind::Linear => self.base.saturating_mul(n),
            // No growth from nothing (`0 × ∞` would read as past `max`).
            BackoffKind::Exponential if self.base.is_zero() => Duration::ZERO,
            BackoffKind::Exponential => {
                let exponent = i32::try_from(n - 1).unwrap_or(i32::MAX);
                let seconds = self.base.as_secs_f64() * self.multiplier.powi(exponent);
                if seconds.is_finite() && seconds < self.max.as_secs_f64() {
                    Duration::from_secs_f64(seconds)
                } else {
                    self.max
                }
            }
        };
        grown.min(self.max)
    }

    /// The `n`-th wait (1-based), jittered with `random`. `previous` is the wait used before
    /// the previous attempt (only decorrelated jitter uses it; `None` for the first wait).
    pub fn delay(&self, n: u32, previous: Option<Duration>, random: &dyn RandomSource) -> Duration {
        let grown = self.growth(n);
        // A source that strays outside [0, 1] (or returns NaN) must not make a wait panic.
        let unit = || crate::random::unit(random);
        match self.jitter {
            Jitter::None => grown,
            Jitter::Full => grown.mul_f64(unit()),
            Jitter::Equal => grown / 2 + (grown / 2).mul_f64(unit()),
            Jitter::Decorrelated => {
                // min(max, uniform in [base, 3 × previous]), as in "Exponential Backoff And
                // Jitter" (AWS): capping after the draw, so long waits sit at max.
                let previous = previous.unwrap_or(self.base).max(self.base);
                let upper = previous.saturating_mul(3);
                (self.base + (upper.saturating_sub(self.base)).mul_f64(unit())).min(self.max)
            }
        }
    }

    /// The sequence of waits this backoff produces, drawing jitter from `random`.
    pub fn delays<R: RandomSource>(&self, random: R) -> Delays<R> {
        Delays {
            backoff: self.clone(),
            random,
            n: 0,
            previous: None,
        }
    }
}

/// The waits of a [`Backoff`], one per attempt; endless (bound it with `take`).
#[derive(Debug)]
pub struct Delays<R> {
    backoff: Backoff,
    random: R,
    n: u32,
    previous: Option<Duration>,
}

impl<R: RandomSource> Iterator for Delays<R> {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.n = self.n.saturating_add(1);
        let delay = self.backoff.delay(self.n, self.previous, &self.random);
        self.previous = Some(delay);
        Some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::SplitMix64;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn backoff(kind: BackoffKind, jitter: Jitter) -> Backoff {
        Backoff {
            kind,
            base: ms(100),
            multiplier: 3.0,
            max: ms(1000),
            jitter,
        }
    }

    #[test]
    fn exact_sequences_without_jitter() {
        let take = |kind| -> Vec<Duration> {
            backoff(kind, Jitter::None)
                .delays(SplitMix64::seeded(0))
                .take(5)
                .collect()
        };
        assert_eq!(take(BackoffKind::Constant), [ms(100); 5]);
        assert_eq!(
            take(BackoffKind::Linear),
            [ms(100), ms(200), ms(300), ms(400), ms(500)]
        );
        assert_eq!(
            take(BackoffKind::Exponential),
            [ms(100), ms(300), ms(900), ms(1000), ms(1000)]
        );
    }

    #[test]
    fn huge_attempt_numbers_stay_at_max() {
        let b = backoff(BackoffKind::Exponential, Jitter::None);
        assert_eq!(b.growth(u32::MAX), ms(1000));
        assert_eq!(
            backoff(BackoffKind::Linear, Jitter::None).growth(u32::MAX),
            ms(1000)
        );
    }

    #[test]
    fn a_zero_base_stays_zero_however_many_attempts() {
        let b = Backoff {
            base: Duration::ZERO,
            ..backoff(BackoffKind::Exponential, Jitter::None)
        };
        assert_eq!(b.growth(1), Duration::ZERO);
        assert_eq!(b.growth(1_025), Duration::ZERO);
        assert_eq!(b.growth(u32::MAX), Duration::ZERO);
    }

    #[test]
    fn invalid_fields_are_named() {
        let d = Backoff::default;
        let err = |b: Backoff| b.validate().unwrap_err().to_string();
        assert_eq!(
            err(Backoff {
                multiplier: -1.0,
                ..d()
            }),
            "multiplier must be in [1, 100], got -1"
        );
        assert_eq!(
            err(Backoff {
                multiplier: f64::NAN,
                ..d()
            }),
            "multiplier must be in [1, 100], got NaN"
        );
        assert_eq!(
            err(Backoff {
                base: ms(3000),
                ..d()
            }),
            "base must be in [0s, 2s], got 3s"
        );
    }

    #[test]
    fn deserializes_from_the_documented_form() {
        let b: Backoff = serde_json::from_str(
            r#"{"kind":"linear","base":"10ms","multiplier":1.5,"max":"1s","jitter":"decorrelated"}"#,
        )
        .unwrap();
        assert_eq!(b.kind, BackoffKind::Linear);
        assert_eq!(b.jitter, Jitter::Decorrelated);
        assert_eq!(
            serde_json::from_str::<Backoff>("{}").unwrap(),
            Backoff::default()
        );
    }

    fn kind() -> impl Strategy<Value = BackoffKind> {
        prop_oneof![
            Just(BackoffKind::Constant),
            Just(BackoffKind::Linear),
            Just(BackoffKind::Exponential)
        ]
    }

    proptest! {
        #[test]
        fn jitter_stays_within_its_bounds(
            kind in kind(),
            base_ms in 0u64..500,
            extra_ms in 0u64..5_000,
            multiplier in 1.0f64..10.0,
            seed in any::<u64>(),
            n in 1u32..40,
        ) {
            let base = ms(base_ms);
            let max = base + ms(extra_ms);
            let random = SplitMix64::seeded(seed);
            for jitter in [Jitter::None, Jitter::Full, Jitter::Equal, Jitter::Decorrelated] {
                let b = Backoff { kind, base, multiplier, max, jitter };
                prop_assert!(b.validate().is_ok());
                let grown = b.growth(n);
                prop_assert!(grown <= max);
                let previous = b.growth(n.saturating_sub(1).max(1));
                let d = b.delay(n, Some(previous), &random);
                prop_assert!(d <= max, "{:?} over max {:?}", d, max);
                match jitter {
                    Jitter::None => prop_assert_eq!(d, grown),
                    Jitter::Full => prop_assert!(d <= grown),
                    Jitter::Equal => prop_assert!(d >= grown / 2 && d <= grown),
                    Jitter::Decorrelated => prop_assert!(
                        d >= base.min(max) && d <= previous.max(base).saturating_mul(3).min(max)
                    ),
                }
            }
        }

        #[test]
        fn growth_never_shrinks(kind in kind(), base_ms in 0u64..500, multiplier in 1.0f64..10.0, n in 1u32..60) {
            let b = Backoff { kind, base: ms(base_ms), multiplier, max: ms(10_000), jitter: Jitter::None };
            prop_assert!(b.growth(n + 1) >= b.growth(n));
        }
    }
}
