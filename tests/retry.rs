//! Retries through the public API, with paused time.

mod support;

use meshkit::breaker::{BreakerState, CircuitOpen};
use meshkit::classify::RetryDecision;
use meshkit::random::SplitMix64;
use meshkit::retry::{
    Backoff, BackoffKind, BudgetConfig, Jitter, RetryConfig, RetryLayer, TimedOut,
};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceExt};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// When each try reached the backend.
#[derive(Clone, Debug, Default)]
struct Tries(Arc<Mutex<Vec<Instant>>>);

impl Tries {
    /// Records a try; returns its number, from 1.
    fn record(&self) -> usize {
        let mut tries = self.0.lock().unwrap();
        tries.push(Instant::now());
        tries.len()
    }

    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// The time between consecutive tries.
    fn gaps(&self) -> Vec<Duration> {
        let tries = self.0.lock().unwrap();
        tries.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

/// A backend that records each try and answers with `answer(try number, request)`.
fn backend<Req, Res, F, Fut>(
    tries: &Tries,
    answer: F,
) -> impl Service<Req, Response = Res, Error = BoxError, Future = Fut> + Clone
where
    F: Fn(usize, Req) -> Fut + Clone,
    Fut: Future<Output = Result<Res, BoxError>>,
{
    let tries = tries.clone();
    tower::service_fn(move |request| answer(tries.record(), request))
}

fn no_jitter(kind: BackoffKind, base: Duration, max: Duration) -> Backoff {
    Backoff {
        kind,
        base,
        multiplier: 2.0,
        max,
        jitter: Jitter::None,
    }
}

fn config(max_attempts: u32, backoff: Backoff) -> RetryConfig {
    RetryConfig {
        max_attempts,
        backoff,
        ..RetryConfig::default()
    }
}

fn layer(config: RetryConfig) -> RetryLayer {
    RetryLayer::new(config)
        .unwrap()
        .random(Arc::new(SplitMix64::seeded(7)))
}

#[tokio::test(start_paused = true)]
async fn retries_errors_until_a_try_succeeds() {
    let tries = Tries::default();
    let service = layer(RetryConfig::default()).layer(backend(&tries, |n, id: u32| async move {
        if n < 3 {
            Err(BoxError::from("reset"))
        } else {
            Ok(id * 10)
        }
    }));
    assert_eq!(service.oneshot(4).await.unwrap(), 40);
    assert_eq!(tries.count(), 3);
}

#[tokio::test(start_paused = true)]
async fn returns_the_last_error_exactly_when_attempts_run_out() {
    let tries = Tries::default();
    let inner = tower::service_fn({
        let tries = tries.clone();
        move |_: ()| {
            let n = tries.record();
            async move { Err::<(), _>(Failed(n)) }
        }
    });
    // The inner error type passes through: no boxing, no wrapper.
    let classifier = |result: &Result<(), Failed>| match result {
        Ok(()) => RetryDecision::Stop,
        Err(_) => RetryDecision::Retry,
    };
    let service = RetryLayer::new(config(4, Backoff::default()))
        .unwrap()
        .classify(classifier)
        .layer(inner);
    let error: Failed = service.oneshot(()).await.unwrap_err();
    assert_eq!(error, Failed(4));
    assert_eq!(tries.count(), 4);
}

/// An error type of the test's own: the retry layer asks nothing of it.
#[derive(Debug, PartialEq)]
struct Failed(usize);

#[tokio::test(start_paused = true)]
async fn responses_are_not_retried_by_default() {
    let tries = Tries::default();
    let service = layer(RetryConfig::default())
        .layer(backend(&tries, |_, ()| async { Ok::<_, BoxError>(503u16) }));
    assert_eq!(service.oneshot(()).await.unwrap(), 503);
    assert_eq!(tries.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn waits_follow_the_exact_backoff_sequence_without_jitter() {
    let failing = |tries: &Tries| {
        backend(tries, |_, ()| async {
            Err::<(), _>(BoxError::from("down"))
        })
    };
    let cases = [
        (BackoffKind::Constant, vec![ms(100); 4]),
        (
            BackoffKind::Linear,
            vec![ms(100), ms(200), ms(300), ms(400)],
        ),
        (
            BackoffKind::Exponential,
            vec![ms(100), ms(200), ms(400), ms(500)],
        ),
    ];
    for (kind, expected) in cases {
        let tries = Tries::default();
        let service = layer(config(5, no_jitter(kind, ms(100), ms(500)))).layer(failing(&tries));
        service.oneshot(()).await.unwrap_err();
        assert_eq!(tries.gaps(), expected, "{kind:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn jittered_waits_stay_within_their_bounds() {
    for jitter in [Jitter::Full, Jitter::Equal, Jitter::Decorrelated] {
        for seed in 0..20 {
            let tries = Tries::default();
            let backoff = Backoff {
                jitter,
                ..no_jitter(BackoffKind::Exponential, ms(100), ms(1_000))
            };
            let service = RetryLayer::new(config(6, backoff))
                .unwrap()
                .random(Arc::new(SplitMix64::seeded(seed)))
                .layer(backend(&tries, |_, ()| async {
                    Err::<(), _>(BoxError::from("down"))
                }));
            service.oneshot(()).await.unwrap_err();
            let mut previous = ms(100);
            for (i, gap) in tries.gaps().into_iter().enumerate() {
                let grown = ms(100 * 2u64.pow(i as u32)).min(ms(1_000));
                let (low, high) = match jitter {
                    Jitter::Full => (Duration::ZERO, grown),
                    Jitter::Equal => (grown / 2, grown),
                    _ => (ms(100), (previous * 3).min(ms(1_000))),
                };
                // Timers fire on whole milliseconds, never early.
                assert!(
                    gap >= low && gap <= high + ms(1),
                    "{jitter:?} seed {seed} wait {i}: {gap:?} outside [{low:?}, {high:?}]"
                );
                previous = gap;
            }
        }
    }
}

fn hinted(hint: Duration) -> impl Fn(&Result<u16, BoxError>) -> RetryDecision + Clone {
    move |result: &Result<u16, BoxError>| match result {
        Ok(503) => RetryDecision::RetryAfter(hint),
        _ => RetryDecision::Stop,
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_hint_is_honoured_and_rounded_up() {
    let tries = Tries::default();
    let hint = ms(1_500) + Duration::from_micros(300);
    let service = RetryLayer::new(config(2, no_jitter(BackoffKind::Constant, ms(10), ms(10))))
        .unwrap()
        .classify(hinted(hint))
        .layer(backend(&tries, |_, ()| async { Ok::<_, BoxError>(503u16) }));
    assert_eq!(service.oneshot(()).await.unwrap(), 503);
    assert_eq!(
        tries.gaps(),
        [ms(1_501)],
        "at least the hint, rounded up to the millisecond"
    );
}

#[tokio::test(start_paused = true)]
async fn backoff_longer_than_the_hint_wins() {
    let tries = Tries::default();
    let service = RetryLayer::new(config(
        2,
        no_jitter(BackoffKind::Constant, ms(800), ms(800)),
    ))
    .unwrap()
    .classify(hinted(ms(300)))
    .layer(backend(&tries, |_, ()| async { Ok::<_, BoxError>(503u16) }));
    service.oneshot(()).await.unwrap();
    assert_eq!(tries.gaps(), [ms(800)]);
}

#[tokio::test(start_paused = true)]
async fn hint_beyond_max_retry_after_returns_the_response_as_is() {
    let tries = Tries::default();
    let config = RetryConfig {
        max_retry_after: Duration::from_secs(5),
        ..RetryConfig::default()
    };
    let service = RetryLayer::new(config)
        .unwrap()
        .classify(hinted(Duration::from_secs(6)))
        .layer(backend(&tries, |_, ()| async { Ok::<_, BoxError>(503u16) }));
    assert_eq!(service.oneshot(()).await.unwrap(), 503);
    assert_eq!(tries.count(), 1);
}

fn open_circuit() -> BoxError {
    Box::new(CircuitOpen::new(BreakerState::Open, Duration::from_secs(5)))
}

#[tokio::test(start_paused = true)]
async fn never_retries_circuit_open() {
    let tries = Tries::default();
    let service = layer(RetryConfig::default()).layer(backend(&tries, |_, ()| async {
        Err::<(), _>(open_circuit())
    }));
    let error = service.oneshot(()).await.unwrap_err();
    assert!(meshkit::error::is::<CircuitOpen>(&*error));
    assert_eq!(tries.count(), 1);

    let tries = Tries::default();
    let service = layer(RetryConfig::default())
        .retry_rejections(true)
        .layer(backend(&tries, |_, ()| async {
            Err::<(), _>(open_circuit())
        }));
    service.oneshot(()).await.unwrap_err();
    assert_eq!(tries.count(), 3, "retried when the user says so");
}

#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_be_replayed_is_sent_once() {
    struct Stream;
    let tries = Tries::default();
    let service = layer(RetryConfig::default())
        .replay(|_: &Stream| None)
        .layer(backend(&tries, |_, _: Stream| async {
            Err::<(), _>(BoxError::from("down"))
        }));
    service.oneshot(Stream).await.unwrap_err();
    assert_eq!(tries.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn only_requests_declared_retryable_are_retried() {
    let tries = Tries::default();
    let mut service = layer(RetryConfig::default())
        .retryable(|method: &&str| *method == "GET")
        .layer(backend(&tries, |_, _: &str| async {
            Err::<(), _>(BoxError::from("down"))
        }));
    service
        .ready()
        .await
        .unwrap()
        .call("POST")
        .await
        .unwrap_err();
    assert_eq!(tries.count(), 1);
    service
        .ready()
        .await
        .unwrap()
        .call("GET")
        .await
        .unwrap_err();
    assert_eq!(tries.count(), 4);
}

#[tokio::test(start_paused = true)]
async fn per_try_timeout_cuts_a_slow_try_and_retries() {
    let tries = Tries::default();
    let config = RetryConfig {
        per_try_timeout: Some(ms(200)),
        ..config(3, no_jitter(BackoffKind::Constant, ms(50), ms(50)))
    };
    let service = layer(config).layer(backend(&tries, |n, ()| async move {
        if n == 1 {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Ok::<_, BoxError>(n)
    }));
    let started = Instant::now();
    assert_eq!(service.oneshot(()).await.unwrap(), 2);
    assert_eq!(started.elapsed(), ms(250));
}

#[tokio::test(start_paused = true)]
async fn a_try_that_always_times_out_ends_with_timed_out() {
    let tries = Tries::default();
    let config = RetryConfig {
        per_try_timeout: Some(ms(100)),
        ..config(2, no_jitter(BackoffKind::Constant, ms(10), ms(10)))
    };
    let service = layer(config).layer(backend(&tries, |_, ()| async {
        std::future::pending::<Result<(), BoxError>>().await
    }));
    let error = service.oneshot(()).await.unwrap_err();
    let timed_out = meshkit::error::find::<TimedOut>(&*error).expect("a TimedOut");
    assert!(!timed_out.is_deadline());
    assert_eq!(tries.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn deadline_bounds_tries_and_waits() {
    let tries = Tries::default();
    let config = RetryConfig {
        deadline: Some(ms(350)),
        ..config(10, no_jitter(BackoffKind::Constant, ms(100), ms(100)))
    };
    let service = layer(config).layer(backend(&tries, |_, ()| async {
        tokio::time::sleep(ms(20)).await;
        Err::<(), _>(BoxError::from("down"))
    }));
    let started = Instant::now();
    service.oneshot(()).await.unwrap_err();
    // Tries at 0, 120 and 240 ms; the next would wait until 360 ms, past the deadline.
    assert_eq!(tries.count(), 3);
    assert!(started.elapsed() <= ms(350), "{:?}", started.elapsed());
}

#[tokio::test(start_paused = true)]
async fn a_try_running_at_the_deadline_ends_with_timed_out() {
    let tries = Tries::default();
    let config = RetryConfig {
        deadline: Some(ms(300)),
        ..RetryConfig::default()
    };
    let service = layer(config).layer(backend(&tries, |_, ()| async {
        std::future::pending::<Result<(), BoxError>>().await
    }));
    let started = Instant::now();
    let error = service.oneshot(()).await.unwrap_err();
    assert!(meshkit::error::find::<TimedOut>(&*error)
        .unwrap()
        .is_deadline());
    assert_eq!(started.elapsed(), ms(300));
    assert_eq!(tries.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn budget_bounds_attempts_against_a_service_failing_every_call() {
    const REQUESTS: u64 = 10_000;
    let tries = Tries::default();
    let config = RetryConfig {
        budget: BudgetConfig::Limited {
            ratio: 0.2,
            min_per_sec: 10,
            ttl: Duration::from_secs(10),
        },
        ..config(5, no_jitter(BackoffKind::Constant, ms(1), ms(1)))
    };
    let layer = layer(config);
    let budget = layer.budget().clone();
    let service = layer.layer(backend(&tries, |_, ()| async {
        Err::<(), _>(BoxError::from("down"))
    }));
    // All in flight at once: retries sleeping in backoff must count against the budget.
    let calls = (0..REQUESTS).map(|_| service.clone().oneshot(()));
    futures::future::join_all(calls).await;
    let bound = REQUESTS as f64 * 1.2 + 10.0 * 10.0;
    let attempts = tries.count() as f64;
    assert!(attempts <= bound, "{attempts} attempts, bound {bound}");
    assert!(
        attempts >= REQUESTS as f64 * 1.2,
        "the budget allowed what it should: {attempts}"
    );
    let snapshot = budget.snapshot();
    assert_eq!(snapshot.deposits, REQUESTS);
    assert_eq!(snapshot.withdrawals, tries.count() as u64 - REQUESTS);
    assert!(snapshot.refusals > 0);
}

#[tokio::test(start_paused = true)]
async fn unlimited_budget_retries_every_failure() {
    let tries = Tries::default();
    let config = RetryConfig {
        budget: BudgetConfig::Unlimited,
        ..config(3, no_jitter(BackoffKind::Constant, ms(1), ms(1)))
    };
    let service = layer(config).layer(backend(&tries, |_, ()| async {
        Err::<(), _>(BoxError::from("down"))
    }));
    let calls = (0..1_000).map(|_| service.clone().oneshot(()));
    futures::future::join_all(calls).await;
    assert_eq!(tries.count(), 3_000);
}

#[tokio::test(start_paused = true)]
async fn every_service_and_clone_of_a_layer_draws_on_one_budget() {
    let tries = Tries::default();
    let layer = layer(RetryConfig::default());
    let a = layer.layer(backend(&tries, |_, ()| async { Ok::<_, BoxError>(()) }));
    let b = layer.layer(backend(&tries, |_, ()| async { Ok::<_, BoxError>(()) }));
    a.clone().oneshot(()).await.unwrap();
    a.oneshot(()).await.unwrap();
    b.oneshot(()).await.unwrap();
    assert_eq!(layer.budget().snapshot().deposits, 3);
}

#[tokio::test(start_paused = true)]
async fn readiness_comes_from_the_inner_service_and_retries_wait_for_it() {
    let (mock, mut handle) = tower_test::mock::pair::<&'static str, &'static str>();
    let mut service =
        layer(config(2, no_jitter(BackoffKind::Constant, ms(10), ms(10)))).layer(mock);
    handle.allow(0);
    tokio_test::assert_pending!(tokio_test::task::spawn(()).enter(|cx, _| service.poll_ready(cx)));
    handle.allow(1);
    service.ready().await.unwrap();
    let call = tokio::spawn(service.call("hello"));
    let (request, respond) = handle.next_request().await.unwrap();
    assert_eq!(request, "hello");
    respond.send_error(BoxError::from("reset"));
    // The retry waits for the mock to be ready again.
    tokio::time::sleep(ms(100)).await;
    assert!(!call.is_finished());
    handle.allow(1);
    let (request, respond) = handle.next_request().await.unwrap();
    assert_eq!(request, "hello");
    respond.send_response("world");
    assert_eq!(call.await.unwrap().unwrap(), "world");
}

#[tokio::test(start_paused = true)]
async fn budget_refusals_end_retrying_with_the_last_error() {
    let tries = Tries::default();
    let config = RetryConfig {
        budget: BudgetConfig::Limited {
            ratio: 0.0,
            min_per_sec: 1,
            ttl: Duration::from_secs(1),
        },
        ..config(3, no_jitter(BackoffKind::Constant, ms(1), ms(1)))
    };
    let layer = layer(config);
    let service = layer.layer(backend(&tries, |n, ()| async move {
        Err::<(), _>(BoxError::from(format!("try {n}")))
    }));
    let error = service.clone().oneshot(()).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "try 2",
        "one retry from the reserve, then refused"
    );
    assert_eq!(layer.budget().snapshot().refusals, 1);
}

#[tokio::test(start_paused = true)]
async fn with_an_error_type_that_cannot_carry_timeouts_the_deadline_still_stops_retries() {
    let tries = Tries::default();
    let inner = tower::service_fn({
        let tries = tries.clone();
        move |_: ()| {
            let n = tries.record();
            async move {
                tokio::time::sleep(ms(30)).await;
                Err::<(), _>(Failed(n))
            }
        }
    });
    let config = RetryConfig {
        per_try_timeout: Some(ms(10)),
        deadline: Some(ms(200)),
        ..config(10, no_jitter(BackoffKind::Constant, ms(50), ms(50)))
    };
    let service = layer(config).layer(inner);
    let started = Instant::now();
    assert_eq!(service.oneshot(()).await.unwrap_err(), Failed(3));
    // Tries at 0, 80 and 160 ms run their full 30 ms; a fourth would start after 200 ms.
    assert_eq!(started.elapsed(), ms(190));
}

#[tokio::test(start_paused = true)]
async fn a_retry_still_waiting_for_readiness_at_the_deadline_returns_the_last_result() {
    let (mock, mut handle) = tower_test::mock::pair::<&'static str, &'static str>();
    let config = RetryConfig {
        deadline: Some(ms(200)),
        ..config(3, no_jitter(BackoffKind::Constant, ms(10), ms(10)))
    };
    let mut service = layer(config).layer(mock);
    handle.allow(1);
    service.ready().await.unwrap();
    let started = Instant::now();
    let call = tokio::spawn(service.call("hello"));
    let (_, respond) = handle.next_request().await.unwrap();
    respond.send_error(BoxError::from("reset"));
    // The mock never becomes ready again: the retry cannot be sent.
    let error = call.await.unwrap().unwrap_err();
    assert_eq!(
        error.to_string(),
        "reset",
        "the last try's error, as the service made it"
    );
    assert_eq!(started.elapsed(), ms(200));
}

#[tokio::test(start_paused = true)]
async fn a_rejection_wrapped_in_an_io_error_is_not_retried() {
    let tries = Tries::default();
    let inner = tower::service_fn({
        let tries = tries.clone();
        move |()| {
            tries.record();
            async {
                Err::<(), _>(std::io::Error::other(CircuitOpen::new(
                    BreakerState::Open,
                    Duration::from_secs(1),
                )))
            }
        }
    });
    layer(RetryConfig::default())
        .layer(inner)
        .oneshot(())
        .await
        .unwrap_err();
    assert_eq!(tries.count(), 1);
}

/// Tries of one `POST` through a retry layer with HTTP's replay and classifier, whose
/// backend fails every try with an I/O error of `kind`.
async fn posts_failing_with(kind: std::io::ErrorKind) -> (usize, BoxError) {
    let tries = Tries::default();
    let backend = {
        let tries = tries.clone();
        tower::service_fn(move |_: http::Request<String>| {
            tries.record();
            async move { Err::<http::Response<String>, BoxError>(std::io::Error::from(kind).into()) }
        })
    };
    let mut service = layer(config(3, no_jitter(BackoffKind::Constant, ms(1), ms(1))))
        .classify(meshkit::http::HttpClassifier::default())
        .replay(meshkit::http::HttpReplay::default())
        .layer(backend);
    let post = http::Request::post("http://orders/orders")
        .body("{}".to_string())
        .unwrap();
    let error = service.ready().await.unwrap().call(post).await.unwrap_err();
    (tries.count(), error)
}

#[tokio::test(start_paused = true)]
async fn a_post_that_was_never_sent_is_retried_and_one_that_may_have_been_is_not() {
    let (tries, error) = posts_failing_with(std::io::ErrorKind::ConnectionRefused).await;
    assert_eq!(tries, 3, "refused: never sent, so tried again ({error})");
    let (tries, error) = posts_failing_with(std::io::ErrorKind::ConnectionReset).await;
    assert_eq!(tries, 1, "reset: it may have been received ({error})");
}
