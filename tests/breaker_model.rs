//! Property tests: the breaker, driven through its public API, opens exactly when a naive
//! model of its sliding window says it should.

mod support;

use meshkit::breaker::{BreakerConfig, BreakerState, CircuitBreakerLayer, WindowConfig};
use proptest::prelude::*;
use std::time::Duration;
use support::{backend, paused_runtime, send, Call};
use tower::Layer;

/// The rule, stated naively: open once the window holds `minimum` calls and
/// `failures / calls >= rate`.
fn trips(calls: usize, failures: usize, minimum: usize, rate: f64) -> bool {
    calls >= minimum && calls > 0 && failures as f64 / calls as f64 >= rate
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn count_window_opens_exactly_when_the_last_n_calls_trip(
        size in 1u32..30,
        minimum_seed in 0u32..30,
        rate_tenths in 1u32..=10,
        outcomes in proptest::collection::vec(any::<bool>(), 1..200),
    ) {
        let minimum = 1 + minimum_seed % size;
        let rate = f64::from(rate_tenths) / 10.0;
        paused_runtime().block_on(async {
            let layer = CircuitBreakerLayer::new(BreakerConfig {
                failure_rate: rate,
                window: WindowConfig::Count { size },
                minimum_calls: minimum,
                ..BreakerConfig::default()
            }).unwrap();
            let handle = layer.handle();
            let mut service = layer.layer(backend());
            let mut history: Vec<bool> = Vec::new();
            for failed in outcomes {
                let _ = send(&mut service, if failed { Call::Fail } else { Call::Succeed }).await;
                history.push(failed);
                let window = &history[history.len().saturating_sub(size as usize)..];
                let failures = window.iter().filter(|f| **f).count();
                let expected = trips(window.len(), failures, minimum as usize, rate);
                let state = handle.state();
                prop_assert_eq!(state == BreakerState::Open, expected,
                    "after {:?} (window {:?})", history, window);
                if expected {
                    break;
                }
            }
            Ok(())
        })?;
    }

    #[test]
    fn time_window_opens_exactly_when_the_last_seconds_trip(
        seconds in 2u64..20,
        minimum in 1u32..20,
        rate_tenths in 1u32..=10,
        steps in proptest::collection::vec((any::<bool>(), 0u64..3_000), 1..150),
    ) {
        let rate = f64::from(rate_tenths) / 10.0;
        paused_runtime().block_on(async {
            let layer = CircuitBreakerLayer::new(BreakerConfig {
                failure_rate: rate,
                window: WindowConfig::Time { duration: Duration::from_secs(seconds) },
                minimum_calls: minimum,
                ..BreakerConfig::default()
            }).unwrap();
            let handle = layer.handle();
            let mut service = layer.layer(backend());
            let started = tokio::time::Instant::now();
            // The window is kept in 60 buckets: a call counts while its bucket is one of the
            // last 60, so the model works in bucket numbers too.
            let bucket = Duration::from_secs(seconds) / 60;
            let bucket_of = |at: tokio::time::Instant| (at - started).as_nanos() / bucket.as_nanos();
            let mut history: Vec<(u128, bool)> = Vec::new();
            for (failed, pause_ms) in steps {
                // A success that skips the lock reads no clock: the breaker counts it in the
                // bucket current when its timer last moved the window, and that timer fires on
                // tokio's millisecond clock, so a success made in the millisecond of a boundary
                // may count in either bucket, depending on which task runs first. The model's
                // successes keep off those instants (failures take the lock and read the clock).
                let mut pause = Duration::from_millis(pause_ms);
                let at = (tokio::time::Instant::now() + pause - started).as_nanos();
                if !failed && at % bucket.as_nanos() < Duration::from_millis(1).as_nanos() {
                    pause += Duration::from_millis(1);
                }
                tokio::time::sleep(pause).await;
                let _ = send(&mut service, if failed { Call::Fail } else { Call::Succeed }).await;
                let now = bucket_of(tokio::time::Instant::now());
                history.push((now, failed));
                let oldest = (now + 1).saturating_sub(60);
                let window: Vec<bool> = history.iter().filter(|(b, _)| *b >= oldest).map(|(_, f)| *f).collect();
                let failures = window.iter().filter(|f| **f).count();
                let expected = trips(window.len(), failures, minimum as usize, rate);
                prop_assert_eq!(handle.state() == BreakerState::Open, expected,
                    "window {:?} of {:?}", window, history);
                if expected {
                    break;
                }
            }
            Ok(())
        })?;
    }
}
