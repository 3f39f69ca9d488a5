//! The circuit breaker's behaviour through its public API, with paused tokio time.

mod support;

use meshkit::breaker::{
    BreakerConfig, BreakerHandle, BreakerState, CircuitBreaker, CircuitBreakerLayer, CircuitOpen,
    WindowConfig,
};
use meshkit::classify::Outcome;
use meshkit::random::SplitMix64;
use std::sync::Arc;
use std::time::Duration;
use support::{backend, finishes_within, is_open, paused_runtime, send, send_n, Backend, Call};
use tokio::time::sleep;
use tower::{BoxError, Layer, Service, ServiceExt};

fn count_window(size: u32, minimum_calls: u32) -> BreakerConfig {
    BreakerConfig {
        window: WindowConfig::Count { size },
        minimum_calls,
        open_for: Duration::from_secs(10),
        ..BreakerConfig::default()
    }
}

fn time_window(seconds: u64, minimum_calls: u32) -> BreakerConfig {
    BreakerConfig {
        window: WindowConfig::Time {
            duration: Duration::from_secs(seconds),
        },
        minimum_calls,
        open_for: Duration::from_secs(10),
        ..BreakerConfig::default()
    }
}

/// A breaker driven open by five failures, then left for its 10 s open period: half-open.
async fn half_open(config: BreakerConfig) -> (BreakerHandle, CircuitBreaker<Backend>) {
    let layer = layer(config);
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    send_n(&mut service, Call::Fail, 5).await;
    sleep(Duration::from_secs(10)).await;
    assert_eq!(handle.state(), BreakerState::HalfOpen);
    (handle, service)
}

fn layer(config: BreakerConfig) -> CircuitBreakerLayer {
    CircuitBreakerLayer::new(config)
        .unwrap()
        .random(Arc::new(SplitMix64::seeded(1)))
}

#[tokio::test(start_paused = true)]
async fn opens_after_failure_rate_exceeded() {
    let layer = layer(count_window(10, 10));
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    send_n(&mut service, Call::Succeed, 5).await;
    send_n(&mut service, Call::Fail, 4).await;
    assert_eq!(handle.state(), BreakerState::Closed);
    let _ = send(&mut service, Call::Fail).await;
    assert_eq!(
        handle.state(),
        BreakerState::Open,
        "5 of 10 failed, rate 0.5"
    );
    assert!(is_open(&send(&mut service, Call::Succeed).await));
}

/// A count window of 100 at the default rate (0.5) and minimum (20), that also opens after
/// `run` failures in a row.
fn consecutive(run: u32) -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: Some(run),
        ..count_window(100, 20)
    }
}

#[tokio::test(start_paused = true)]
async fn opens_after_consecutive_failures_before_minimum_calls() {
    let layer = layer(consecutive(3));
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    send_n(&mut service, Call::Succeed, 4).await;
    send_n(&mut service, Call::Fail, 2).await;
    assert_eq!(handle.state(), BreakerState::Closed);
    let _ = send(&mut service, Call::Fail).await;
    assert_eq!(
        handle.state(),
        BreakerState::Open,
        "3 failures in a row, though 3 of 7 calls is below minimum_calls and the rate"
    );
}

#[tokio::test(start_paused = true)]
async fn a_success_starts_the_run_of_failures_again() {
    let layer = layer(consecutive(3));
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    for _ in 0..20 {
        send_n(&mut service, Call::Fail, 2).await;
        send_n(&mut service, Call::Succeed, 3).await;
    }
    assert_eq!(
        handle.state(),
        BreakerState::Closed,
        "never 3 in a row, 40%"
    );
    send_n(&mut service, Call::Fail, 2).await;
    let _ = send(&mut service, Call::Succeed).await;
    send_n(&mut service, Call::Fail, 2).await;
    assert_eq!(handle.state(), BreakerState::Closed);
    let _ = send(&mut service, Call::Fail).await;
    assert_eq!(handle.state(), BreakerState::Open);
}

#[test]
fn successes_counted_on_another_thread_break_the_run() {
    // Past minimum_calls, successes are counted on each thread's own cell without the lock;
    // the run must still see them.
    let layer = layer(consecutive(4));
    let handle = layer.handle();
    let service = layer.layer(backend());
    let rt = paused_runtime();
    rt.block_on(async {
        let mut service = service.clone();
        send_n(&mut service, Call::Succeed, 30).await;
        send_n(&mut service, Call::Fail, 3).await;
    });
    // The other thread stays alive while the run is judged: its success sits on its own
    // cell, counted without the lock, not folded into the breaker's totals at thread exit.
    let (counted, done) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
    let other = std::thread::spawn({
        let mut service = service.clone();
        let (counted, done) = (counted.0, done.1);
        move || {
            paused_runtime().block_on(send_n(&mut service, Call::Succeed, 1));
            counted.send(()).unwrap();
            let _ = done.recv();
        }
    });
    counted.1.recv().unwrap();
    rt.block_on(async {
        let mut service = service.clone();
        send_n(&mut service, Call::Fail, 3).await;
        assert_eq!(handle.state(), BreakerState::Closed, "runs of 3, 3");
        let _ = send(&mut service, Call::Fail).await;
        assert_eq!(handle.state(), BreakerState::Open, "a run of 4");
    });
    done.0.send(()).unwrap();
    other.join().unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_run_starts_afresh_after_the_breaker_closes() {
    let config = BreakerConfig {
        half_open_calls: 1,
        ..consecutive(3)
    };
    let layer = layer(config);
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    send_n(&mut service, Call::Fail, 3).await;
    assert_eq!(handle.state(), BreakerState::Open);
    sleep(Duration::from_secs(10)).await;
    send(&mut service, Call::Succeed).await.unwrap();
    assert_eq!(handle.state(), BreakerState::Closed);
    send_n(&mut service, Call::Fail, 2).await;
    assert_eq!(handle.state(), BreakerState::Closed, "2 since closing");
    let _ = send(&mut service, Call::Fail).await;
    assert_eq!(handle.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn stays_closed_below_the_failure_rate() {
    let layer = layer(count_window(10, 10));
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    for _ in 0..50 {
        send_n(&mut service, Call::Succeed, 6).await;
        send_n(&mut service, Call::Fail, 4).await;
    }
    assert_eq!(handle.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn evaluates_as_soon_as_minimum_calls_are_in_the_window() {
    let layer = layer(count_window(100, 10));
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    send_n(&mut service, Call::Fail, 9).await;
    assert_eq!(
        handle.state(),
        BreakerState::Closed,
        "9 calls, minimum is 10"
    );
    let _ = send(&mut service, Call::Fail).await;
    assert_eq!(
        handle.state(),
        BreakerState::Open,
        "window not full, but 10 calls are enough"
    );
}

#[tokio::test(start_paused = true)]
async fn a_success_that_completes_minimum_calls_can_open() {
    let layer = layer(count_window(100, 10));
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    send_n(&mut service, Call::Fail, 6).await;
    send_n(&mut service, Call::Succeed, 3).await;
    assert_eq!(handle.state(), BreakerState::Closed);
    let _ = send(&mut service, Call::Succeed).await;
    assert_eq!(handle.state(), BreakerState::Open, "6 of 10 failed");
}

/// tower-resilience's count window only resets on a state change: after 1000 successes it
/// needs 1000 failures to reach 50%. A true sliding window needs 50.
#[tokio::test(start_paused = true)]
async fn old_successes_age_out_of_the_count_window() {
    let layer = layer(BreakerConfig {
        failure_rate: 0.5,
        ..count_window(100, 100)
    });
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    send_n(&mut service, Call::Succeed, 1000).await;
    send_n(&mut service, Call::Fail, 49).await;
    assert_eq!(
        handle.state(),
        BreakerState::Closed,
        "49 of the last 100 failed"
    );
    let _ = send(&mut service, Call::Fail).await;
    assert_eq!(
        handle.state(),
        BreakerState::Open,
        "50 of the last 100 failed"
    );
}

#[tokio::test(start_paused = true)]
async fn old_failures_age_out_of_the_count_window() {
    let layer = layer(count_window(10, 10));
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    send_n(&mut service, Call::Fail, 4).await;
    send_n(&mut service, Call::Succeed, 10).await;
    send_n(&mut service, Call::Fail, 4).await;
    assert_eq!(
        handle.state(),
        BreakerState::Closed,
        "the first 4 failures aged out"
    );
    assert_eq!(handle.metrics().failures, 4);
}

#[tokio::test(start_paused = true)]
async fn old_outcomes_age_out_of_the_time_window() {
    let layer = layer(time_window(10, 10));
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    send_n(&mut service, Call::Fail, 4).await;
    sleep(Duration::from_secs(11)).await;
    send_n(&mut service, Call::Succeed, 6).await;
    send_n(&mut service, Call::Fail, 4).await;
    assert_eq!(
        handle.state(),
        BreakerState::Closed,
        "only 4 of the last 10 s failed"
    );
    let metrics = handle.metrics();
    assert_eq!((metrics.calls, metrics.failures), (10, 4));
}

#[tokio::test(start_paused = true)]
async fn successes_older_than_the_time_window_no_longer_mask_failures() {
    let layer = layer(time_window(10, 10));
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    send_n(&mut service, Call::Succeed, 1000).await;
    sleep(Duration::from_secs(11)).await;
    send_n(&mut service, Call::Fail, 10).await;
    assert_eq!(handle.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn a_success_after_old_successes_aged_out_can_open() {
    let layer = layer(time_window(10, 10));
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    send_n(&mut service, Call::Succeed, 100).await;
    sleep(Duration::from_secs(5)).await;
    send_n(&mut service, Call::Fail, 9).await;
    assert_eq!(handle.state(), BreakerState::Closed, "9 of 109 failed");
    sleep(Duration::from_secs(6)).await;
    // The 100 successes have aged out: the window holds 9 failures, and one more call makes 10.
    let _ = send(&mut service, Call::Succeed).await;
    assert_eq!(handle.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn rejects_with_the_time_left_while_open() {
    let layer = layer(count_window(10, 5));
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    send_n(&mut service, Call::Fail, 5).await;
    sleep(Duration::from_secs(3)).await;
    let err = send(&mut service, Call::Succeed).await.unwrap_err();
    let open = err.downcast_ref::<CircuitOpen>().expect("CircuitOpen");
    assert_eq!(open.state(), BreakerState::Open);
    assert_eq!(open.retry_after(), Duration::from_secs(7));
    assert_eq!(handle.metrics().rejected, 1);
    assert!(meshkit::error::is::<CircuitOpen>(&*err));
}

#[tokio::test(start_paused = true)]
async fn turns_half_open_by_itself_when_the_open_period_ends() {
    let layer = layer(count_window(10, 5));
    let handle = layer.handle();
    let mut transitions = handle.subscribe();
    let mut service = layer.layer(backend());
    send_n(&mut service, Call::Fail, 5).await;
    let opened = transitions.recv().await.unwrap();
    assert_eq!(
        (opened.from, opened.to),
        (BreakerState::Closed, BreakerState::Open)
    );
    // No call is made: the transition must come from the breaker's own driver.
    let half_open = transitions.recv().await.unwrap();
    assert_eq!(
        (half_open.from, half_open.to),
        (BreakerState::Open, BreakerState::HalfOpen)
    );
    assert_eq!(half_open.at - opened.at, Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn closes_when_the_probes_succeed() {
    let (handle, mut service) = half_open(BreakerConfig {
        half_open_calls: 3,
        ..count_window(10, 5)
    })
    .await;
    assert_eq!(handle.state(), BreakerState::HalfOpen);
    send_n(&mut service, Call::Succeed, 2).await;
    assert_eq!(
        handle.state(),
        BreakerState::HalfOpen,
        "2 of 3 probes finished"
    );
    send(&mut service, Call::Succeed).await.unwrap();
    assert_eq!(handle.state(), BreakerState::Closed);
    assert_eq!(handle.metrics().calls, 0, "closing starts a fresh window");
}

#[tokio::test(start_paused = true)]
async fn reopens_when_probes_fail_for_longer_each_time() {
    let (handle, mut service) = half_open(BreakerConfig {
        half_open_calls: 2,
        open_backoff: 2.0,
        open_for_max: Duration::from_secs(60),
        ..count_window(10, 5)
    })
    .await;
    let _ = send(&mut service, Call::Fail).await;
    assert_eq!(
        handle.state(),
        BreakerState::Open,
        "1 of 2 probes failed: rate 0.5"
    );
    let second = handle.metrics().open_remaining.unwrap();
    assert!(
        second > Duration::from_secs(17) && second <= Duration::from_secs(20),
        "{second:?}"
    );
    sleep(second).await;
    assert_eq!(handle.state(), BreakerState::HalfOpen);
    let _ = send(&mut service, Call::Fail).await;
    let third = handle.metrics().open_remaining.unwrap();
    assert!(
        third > Duration::from_secs(35) && third <= Duration::from_secs(40),
        "{third:?}"
    );
    assert_eq!(handle.metrics().openings, 3);
}

#[tokio::test(start_paused = true)]
async fn open_period_never_exceeds_open_for_max() {
    let layer = layer(BreakerConfig {
        half_open_calls: 1,
        open_backoff: 10.0,
        open_for_max: Duration::from_secs(30),
        ..count_window(10, 5)
    });
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    send_n(&mut service, Call::Fail, 5).await;
    for _ in 0..4 {
        sleep(handle.metrics().open_remaining.unwrap()).await;
        let _ = send(&mut service, Call::Fail).await;
        let period = handle.metrics().open_remaining.unwrap();
        assert!(period <= Duration::from_secs(30), "{period:?}");
        assert!(period >= Duration::from_secs(10), "{period:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_random_source_outside_the_unit_interval_cannot_break_an_open_period() {
    /// A source whose `next_f64` returns `value`, whatever the contract says.
    #[derive(Debug)]
    struct Odd(f64);
    impl meshkit::random::RandomSource for Odd {
        fn next_u64(&self) -> u64 {
            0
        }
        fn next_f64(&self) -> f64 {
            self.0
        }
    }
    for value in [f64::NAN, f64::INFINITY, -5.0, 11.0] {
        let layer = CircuitBreakerLayer::new(BreakerConfig {
            half_open_calls: 1,
            open_backoff: 2.0,
            open_for_max: Duration::from_secs(30),
            ..count_window(10, 5)
        })
        .unwrap()
        .random(Arc::new(Odd(value)));
        let handle = layer.handle();
        let mut service = layer.layer(backend());
        send_n(&mut service, Call::Fail, 5).await;
        for _ in 0..3 {
            // Reopening draws the jitter.
            sleep(handle.metrics().open_remaining.unwrap()).await;
            let _ = send(&mut service, Call::Fail).await;
            let period = handle.metrics().open_remaining.unwrap();
            assert!(
                period >= Duration::from_secs(10) && period <= Duration::from_secs(30),
                "{value}: {period:?}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn closing_resets_the_open_backoff() {
    let (handle, mut service) = half_open(BreakerConfig {
        half_open_calls: 1,
        ..count_window(10, 5)
    })
    .await;
    let _ = send(&mut service, Call::Fail).await; // re-open, longer
    sleep(Duration::from_secs(20)).await;
    send(&mut service, Call::Succeed).await.unwrap();
    assert_eq!(handle.state(), BreakerState::Closed);
    send_n(&mut service, Call::Fail, 5).await;
    assert_eq!(
        handle.metrics().open_remaining,
        Some(Duration::from_secs(10))
    );
    assert_eq!(handle.metrics().openings, 1);
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_at_most_half_open_calls_probes() {
    let layer = layer(BreakerConfig {
        half_open_calls: 2,
        ..count_window(10, 5)
    });
    let handle = layer.handle();
    let service = layer.layer(backend());
    let mut first = service.clone();
    send_n(&mut first, Call::Fail, 5).await;
    sleep(Duration::from_secs(10)).await;

    let slow = |mut s: meshkit::breaker::CircuitBreaker<_>| async move {
        send(&mut s, Call::Slow(Duration::from_secs(1))).await
    };
    let probe_a = tokio::spawn(slow(service.clone()));
    let probe_b = tokio::spawn(slow(service.clone()));
    tokio::task::yield_now().await;
    assert_eq!(handle.metrics().probes_in_flight, 2);
    let rejected = send(&mut first, Call::Succeed).await.unwrap_err();
    let open = rejected.downcast_ref::<CircuitOpen>().unwrap();
    assert_eq!(open.state(), BreakerState::HalfOpen);
    probe_a.await.unwrap().unwrap();
    probe_b.await.unwrap().unwrap();
    assert_eq!(handle.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_probe_gives_its_slot_back_and_is_not_counted() {
    let (handle, mut service) = half_open(BreakerConfig {
        half_open_calls: 1,
        ..count_window(10, 5)
    })
    .await;

    let probe = service.ready().await.unwrap().call(Call::Hang);
    assert_eq!(handle.metrics().probes_in_flight, 1);
    assert!(
        is_open(&send(&mut service.clone(), Call::Succeed).await),
        "the one slot is taken"
    );
    drop(probe);
    assert_eq!(handle.metrics().probes_in_flight, 0);
    assert_eq!(
        handle.state(),
        BreakerState::HalfOpen,
        "a cancelled probe decides nothing"
    );
    send(&mut service, Call::Succeed).await.unwrap();
    assert_eq!(handle.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_probe_reserved_by_poll_ready_is_released_when_the_service_is_dropped() {
    let (handle, service) = half_open(BreakerConfig {
        half_open_calls: 1,
        ..count_window(10, 5)
    })
    .await;
    let mut reserving = service.clone();
    reserving.ready().await.unwrap();
    assert_eq!(handle.metrics().probes_in_flight, 1);
    drop(reserving);
    assert_eq!(handle.metrics().probes_in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn probes_outliving_half_open_timeout_reopen_the_breaker() {
    let layer = layer(BreakerConfig {
        half_open_timeout: Duration::from_secs(3),
        ..count_window(10, 5)
    });
    let handle = layer.handle();
    let mut transitions = handle.subscribe();
    let mut service = layer.layer(backend());
    send_n(&mut service, Call::Fail, 5).await;
    sleep(Duration::from_secs(10)).await;
    let hung = tokio::spawn({
        let mut service = service.clone();
        async move { send(&mut service, Call::Hang).await }
    });
    tokio::task::yield_now().await;
    let mut last = None;
    while let Ok(t) = transitions.try_recv() {
        last = Some(t);
    }
    assert_eq!(last.unwrap().to, BreakerState::HalfOpen);
    let reopened = transitions.recv().await.unwrap();
    assert_eq!(
        (reopened.from, reopened.to),
        (BreakerState::HalfOpen, BreakerState::Open)
    );
    assert_eq!(handle.metrics().openings, 2);
    hung.abort();
}

#[tokio::test(start_paused = true)]
async fn ignored_outcomes_are_not_counted() {
    let layer = layer(count_window(10, 5)).classify(|result: &Result<(), BoxError>| match result {
        Ok(()) => Outcome::Success,
        Err(err) if err.to_string().contains("slowly") => Outcome::Ignored,
        Err(_) => Outcome::Failure,
    });
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    send_n(&mut service, Call::SlowFail(Duration::from_millis(1)), 50).await;
    assert_eq!(handle.state(), BreakerState::Closed);
    assert_eq!(handle.metrics().calls, 0);
}

#[tokio::test(start_paused = true)]
async fn a_lower_breakers_rejections_are_ignored_by_default() {
    let inner = layer(count_window(10, 5));
    let inner_handle = inner.handle();
    let outer = layer(count_window(20, 20));
    let outer_handle = outer.handle();
    let mut service = outer.layer(inner.layer(backend()));
    send_n(&mut service, Call::Fail, 5).await;
    assert_eq!(inner_handle.state(), BreakerState::Open);
    send_n(&mut service, Call::Succeed, 20).await;
    let metrics = outer_handle.metrics();
    assert_eq!(
        (metrics.calls, metrics.failures),
        (5, 5),
        "the 20 rejections were not counted"
    );
    assert_eq!(outer_handle.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn calls_a_balancer_did_not_send_are_not_counted() {
    let layer = layer(count_window(10, 5));
    let handle = layer.handle();
    let ejected = tower::service_fn(|_: u32| async {
        Err::<u32, BoxError>(Box::new(meshkit::balance::EndpointEjected))
    });
    let mut service = layer.layer(ejected);
    for _ in 0..20 {
        let error = service.ready().await.unwrap().call(0).await.unwrap_err();
        assert!(error.is::<meshkit::balance::EndpointEjected>(), "{error}");
    }
    assert_eq!(handle.metrics().calls, 0);
    assert_eq!(handle.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_lower_breakers_rejections_count_when_asked() {
    let inner = layer(BreakerConfig {
        failure_rate: 1.0,
        ..count_window(10, 5)
    });
    let outer = layer(BreakerConfig {
        failure_rate: 1.0,
        ..count_window(20, 20)
    })
    .count_rejections(true);
    let outer_handle = outer.handle();
    let mut service = outer.layer(inner.layer(backend()));
    send_n(&mut service, Call::Fail, 5).await;
    send_n(&mut service, Call::Succeed, 15).await;
    assert_eq!(
        outer_handle.state(),
        BreakerState::Open,
        "5 failures + 15 rejections counted"
    );
}

#[tokio::test(start_paused = true)]
async fn cancelled_calls_are_never_counted() {
    let layer = layer(count_window(10, 1));
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    for _ in 0..20 {
        let call = service.ready().await.unwrap().call(Call::Hang);
        drop(call);
    }
    let timed_out =
        tokio::time::timeout(Duration::from_secs(1), send(&mut service, Call::Hang)).await;
    assert!(timed_out.is_err());
    assert_eq!(handle.metrics().calls, 0);
    assert_eq!(handle.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn slow_calls_open_the_breaker() {
    let layer = layer(BreakerConfig {
        slow_call_duration: Some(Duration::from_millis(500)),
        slow_call_rate: 0.5,
        ..count_window(10, 10)
    });
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    send_n(&mut service, Call::Succeed, 5).await;
    send_n(&mut service, Call::Slow(Duration::from_millis(499)), 2).await;
    send_n(&mut service, Call::Slow(Duration::from_millis(500)), 2).await;
    assert_eq!(handle.state(), BreakerState::Closed);
    assert_eq!(handle.metrics().slow_calls, 2);
    send(&mut service, Call::Slow(Duration::from_secs(1)))
        .await
        .unwrap();
    // 3 slow of 10 is below 0.5: still closed.
    assert_eq!(handle.state(), BreakerState::Closed);
    send_n(&mut service, Call::Slow(Duration::from_secs(1)), 2).await;
    assert_eq!(
        handle.state(),
        BreakerState::Open,
        "5 of the last 10 were slow"
    );
}

#[tokio::test(start_paused = true)]
async fn forced_open_rejects_everything_until_reset() {
    let layer = layer(count_window(10, 5));
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    handle.force_open();
    assert_eq!(handle.state(), BreakerState::ForcedOpen);
    sleep(Duration::from_secs(3600)).await;
    let err = send(&mut service, Call::Succeed).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<CircuitOpen>().unwrap().state(),
        BreakerState::ForcedOpen
    );
    handle.reset();
    send(&mut service, Call::Succeed).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn disabled_passes_everything_and_records_nothing() {
    let layer = layer(count_window(10, 5));
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    handle.disable();
    send_n(&mut service, Call::Fail, 50).await;
    assert_eq!(handle.state(), BreakerState::Disabled);
    handle.reset();
    assert_eq!(handle.metrics().calls, 0);
}

#[tokio::test(start_paused = true)]
async fn reset_returns_an_open_breaker_to_a_fresh_closed_one() {
    let layer = layer(count_window(10, 5));
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    send_n(&mut service, Call::Fail, 5).await;
    assert_eq!(handle.state(), BreakerState::Open);
    handle.reset();
    assert_eq!(handle.state(), BreakerState::Closed);
    let metrics = handle.metrics();
    assert_eq!((metrics.calls, metrics.openings), (0, 0));
    send_n(&mut service, Call::Fail, 4).await;
    assert_eq!(
        handle.state(),
        BreakerState::Closed,
        "old failures were forgotten"
    );
}

#[tokio::test(start_paused = true)]
async fn calls_admitted_before_opening_do_not_count_after_it() {
    let layer = layer(BreakerConfig {
        half_open_calls: 1,
        ..count_window(10, 5)
    });
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    let straggler = tokio::spawn({
        let mut service = service.clone();
        async move { send(&mut service, Call::Slow(Duration::from_secs(15))).await }
    });
    tokio::task::yield_now().await;
    send_n(&mut service, Call::Fail, 5).await;
    sleep(Duration::from_secs(10)).await;
    assert_eq!(handle.state(), BreakerState::HalfOpen);
    straggler.await.unwrap().unwrap();
    assert_eq!(
        handle.state(),
        BreakerState::HalfOpen,
        "a closed-state call is not a probe"
    );
}

#[tokio::test(start_paused = true)]
async fn every_transition_reaches_subscribers_in_order() {
    let layer = layer(BreakerConfig {
        half_open_calls: 1,
        ..count_window(10, 5)
    })
    .name("users");
    let handle = layer.handle();
    let mut transitions = handle.subscribe();
    let mut service = layer.layer(backend());
    send_n(&mut service, Call::Fail, 5).await;
    sleep(Duration::from_secs(10)).await;
    send(&mut service, Call::Succeed).await.unwrap();
    handle.force_open();
    handle.disable();
    handle.reset();
    let mut seen = Vec::new();
    while let Ok(t) = transitions.try_recv() {
        assert_eq!(&*t.breaker, "users");
        seen.push((t.from, t.to));
    }
    use BreakerState::*;
    assert_eq!(
        seen,
        [
            (Closed, Open),
            (Open, HalfOpen),
            (HalfOpen, Closed),
            (Closed, ForcedOpen),
            (ForcedOpen, Disabled),
            (Disabled, Closed)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn every_clone_and_service_of_a_layer_shares_one_breaker() {
    let layer = layer(count_window(10, 4));
    let handle = layer.handle();
    let mut a = layer.layer(backend());
    let mut b = layer.layer(backend());
    let mut c = a.clone();
    for service in [&mut a, &mut b, &mut c] {
        let _ = send(service, Call::Fail).await;
    }
    let _ = send(&mut c, Call::Fail).await;
    assert_eq!(handle.state(), BreakerState::Open);
    assert!(is_open(&send(&mut b, Call::Succeed).await));
    assert_eq!(a.handle().state(), BreakerState::Open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tasks_on_many_threads_see_one_consistent_window() {
    let layer = layer(BreakerConfig {
        failure_rate: 1.0,
        ..count_window(1000, 1000)
    });
    let handle = layer.handle();
    let service = layer.layer(backend());
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let mut service = service.clone();
            tokio::spawn(async move { send_n(&mut service, Call::Succeed, 2500).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let metrics = handle.metrics();
    assert_eq!((metrics.calls, metrics.failures), (1000, 0));
    let mut service = service.clone();
    send_n(&mut service, Call::Fail, 999).await;
    assert_eq!(handle.state(), BreakerState::Closed);
    let _ = send(&mut service, Call::Fail).await;
    assert_eq!(handle.state(), BreakerState::Open);
}

#[test]
fn breakers_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn error<T: std::error::Error + Send + Sync + 'static>() {}
    send_sync::<meshkit::breaker::BreakerHandle>();
    send_sync::<CircuitBreakerLayer>();
    send_sync::<meshkit::breaker::CircuitBreaker<tower::util::BoxCloneSyncService<(), (), BoxError>>>(
    );
    send_sync::<
        meshkit::breaker::ResponseFuture<
            std::future::Ready<Result<(), BoxError>>,
            meshkit::classify::DefaultClassifier,
        >,
    >();
    error::<CircuitOpen>();
    error::<meshkit::ConfigError>();
}

#[test]
fn layers_are_built_without_a_runtime() {
    let layer = CircuitBreakerLayer::new(time_window(60, 10)).unwrap();
    assert_eq!(layer.handle().state(), BreakerState::Closed);
}

#[tokio::test]
async fn invalid_configs_fail_at_construction_naming_the_field() {
    let err = CircuitBreakerLayer::new(BreakerConfig {
        half_open_calls: 0,
        ..BreakerConfig::default()
    })
    .unwrap_err();
    assert_eq!(err.field(), "half_open_calls");
    assert_eq!(
        err.to_string(),
        "half_open_calls must be in [1, 10000], got 0"
    );
}

#[tokio::test(start_paused = true)]
async fn a_success_in_flight_while_the_window_fills_is_still_evaluated() {
    let layer = layer(count_window(10, 10));
    let handle = layer.handle();
    let mut service = layer.layer(backend());
    // Admitted while the fresh breaker is armed for the fast path; finishes last.
    let straggler = service
        .ready()
        .await
        .unwrap()
        .call(Call::Slow(Duration::from_secs(1)));
    send_n(&mut service, Call::Fail, 5).await;
    send_n(&mut service, Call::Succeed, 4).await;
    assert_eq!(handle.state(), BreakerState::Closed, "9 calls, minimum 10");
    straggler.await.unwrap();
    assert_eq!(
        handle.state(),
        BreakerState::Open,
        "5 of the last 10 failed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_concurrent_burst_at_startup_opens_the_breaker() {
    let layer = layer(count_window(100, 20));
    let handle = layer.handle();
    let service = layer.layer(backend());
    let calls = (0..30).map(|i| {
        let mut service = service.clone();
        async move {
            let call = if i < 15 {
                Call::Slow(Duration::from_secs(1))
            } else {
                Call::Fail
            };
            send(&mut service, call).await
        }
    });
    futures::future::join_all(calls).await;
    assert_eq!(handle.state(), BreakerState::Open, "15 of 30 failed");
}

#[tokio::test(start_paused = true)]
async fn a_probe_reserved_too_long_is_not_sent_once_the_breaker_reopened() {
    let (handle, mut service) = half_open(BreakerConfig {
        half_open_calls: 1,
        half_open_timeout: Duration::from_secs(1),
        ..count_window(10, 5)
    })
    .await;
    service.ready().await.unwrap(); // reserves the only probe slot...
    sleep(Duration::from_secs(2)).await; // ...and outlives half_open_timeout before calling
    assert_eq!(handle.state(), BreakerState::Open);
    let err = service.call(Call::Succeed).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<CircuitOpen>().unwrap().state(),
        BreakerState::Open
    );
}

#[tokio::test(start_paused = true)]
async fn a_probe_gets_its_whole_half_open_timeout_from_when_it_is_sent() {
    let (handle, mut service) = half_open(BreakerConfig {
        half_open_calls: 1,
        half_open_timeout: Duration::from_secs(1),
        ..count_window(10, 5)
    })
    .await;
    service.ready().await.unwrap(); // reserves the only probe slot,
    sleep(Duration::from_millis(800)).await; // sends it 0.8 s later,
    let probe = service.call(Call::Slow(Duration::from_millis(500))); // and it takes 0.5 s:
    probe.await.unwrap();
    assert_eq!(
        handle.state(),
        BreakerState::Closed,
        "the probe answered 0.5 s after it was sent, within its 1 s"
    );
}

#[test]
fn a_time_window_keeps_ticking_after_years_of_uptime() {
    finishes_within(Duration::from_secs(10), "the driver must not spin", || {
        paused_runtime().block_on(async {
            let layer = layer(BreakerConfig {
                window: WindowConfig::Time {
                    duration: Duration::from_secs(1),
                },
                minimum_calls: 100,
                ..BreakerConfig::default()
            });
            let mut service = layer.layer(backend());
            // More 1/60 s buckets than a u32 counts.
            tokio::time::advance(Duration::from_secs(72_000_000)).await;
            send_n(&mut service, Call::Succeed, 3).await;
            sleep(Duration::from_millis(50)).await;
        });
    });
}
