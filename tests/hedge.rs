//! Hedged requests through the public API, with paused time.

use meshkit::hedge::{HedgeConfig, HedgeDelay, HedgeLayer};
use meshkit::retry::BudgetConfig;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceExt};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn fixed(delay: Duration, max_hedges: u32) -> HedgeConfig {
    HedgeConfig {
        delay: HedgeDelay::Fixed(delay),
        max_hedges,
        ..HedgeConfig::default()
    }
}

/// Hedges at the 90th percentile of recent latencies, once 20 are known; no budget.
fn p90_after_20_samples() -> HedgeConfig {
    HedgeConfig {
        delay: HedgeDelay::Percentile(0.9),
        min_samples: 20,
        budget: BudgetConfig::Unlimited,
        ..HedgeConfig::default()
    }
}

/// What the backend saw: when each try was sent, and how many were cancelled (dropped before
/// they finished).
#[derive(Clone, Debug, Default)]
struct Seen {
    sent: Arc<Mutex<Vec<Instant>>>,
    cancelled: Arc<AtomicUsize>,
}

impl Seen {
    fn tries(&self) -> usize {
        self.sent.lock().unwrap().len()
    }

    fn sent_at(&self) -> Vec<Duration> {
        let sent = self.sent.lock().unwrap();
        sent.iter().map(|at| *at - sent[0]).collect()
    }
}

/// Counts a try as cancelled if it is dropped before it finishes.
struct Cancelled(Option<Arc<AtomicUsize>>);

impl Cancelled {
    fn finish(mut self) {
        self.0 = None;
    }
}

impl Drop for Cancelled {
    fn drop(&mut self) {
        if let Some(count) = &self.0 {
            count.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A backend whose n-th try (from 1) takes `latency(n)` and then answers `answer(n)`.
fn backend<L, A>(
    seen: &Seen,
    latency: L,
    answer: A,
) -> impl Service<
    &'static str,
    Response = usize,
    Error = BoxError,
    Future = impl Future<Output = Result<usize, BoxError>>,
> + Clone
where
    L: Fn(usize) -> Duration + Clone,
    A: Fn(usize) -> Result<usize, BoxError> + Clone,
{
    let seen = seen.clone();
    tower::service_fn(move |_: &'static str| {
        let n = {
            let mut sent = seen.sent.lock().unwrap();
            sent.push(Instant::now());
            sent.len()
        };
        let guard = Cancelled(Some(seen.cancelled.clone()));
        let (took, answer) = (latency(n), answer(n));
        async move {
            tokio::time::sleep(took).await;
            guard.finish();
            answer
        }
    })
}

#[tokio::test(start_paused = true)]
async fn hedge_wins_on_a_slow_first_try_and_cancels_the_loser() {
    let seen = Seen::default();
    let service = HedgeLayer::new(fixed(ms(100), 1)).unwrap().layer(backend(
        &seen,
        |n| if n == 1 { ms(5_000) } else { ms(20) },
        Ok,
    ));
    let started = Instant::now();
    assert_eq!(service.oneshot("q").await.unwrap(), 2, "the hedge answered");
    assert_eq!(started.elapsed(), ms(120));
    assert_eq!(seen.sent_at(), [ms(0), ms(100)]);
    assert_eq!(
        seen.cancelled.load(Ordering::SeqCst),
        1,
        "the slow try was dropped"
    );
}

#[tokio::test(start_paused = true)]
async fn a_fast_first_try_sends_no_hedge() {
    let seen = Seen::default();
    let service = HedgeLayer::new(fixed(ms(100), 2))
        .unwrap()
        .layer(backend(&seen, |_| ms(30), Ok));
    assert_eq!(service.oneshot("q").await.unwrap(), 1);
    assert_eq!(seen.tries(), 1);
}

#[tokio::test(start_paused = true)]
async fn up_to_max_hedges_are_sent_one_delay_apart() {
    let seen = Seen::default();
    let service = HedgeLayer::new(fixed(ms(50), 3)).unwrap().layer(backend(
        &seen,
        |n| if n < 4 { ms(10_000) } else { ms(40) },
        Ok,
    ));
    assert_eq!(service.oneshot("q").await.unwrap(), 4);
    assert_eq!(seen.sent_at(), [ms(0), ms(50), ms(100), ms(150)]);
    assert_eq!(seen.cancelled.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn a_failed_try_waits_for_the_hedge_still_in_flight() {
    let seen = Seen::default();
    let service = HedgeLayer::new(fixed(ms(50), 1)).unwrap().layer(backend(
        &seen,
        |n| if n == 1 { ms(80) } else { ms(100) },
        |n| {
            if n == 1 {
                Err("first failed".into())
            } else {
                Ok(n)
            }
        },
    ));
    assert_eq!(service.oneshot("q").await.unwrap(), 2);
}

#[tokio::test(start_paused = true)]
async fn when_every_try_fails_the_last_failure_is_returned() {
    let seen = Seen::default();
    let service = HedgeLayer::new(fixed(ms(50), 1)).unwrap().layer(backend(
        &seen,
        |n| if n == 1 { ms(80) } else { ms(100) },
        |n| Err(format!("try {n} failed").into()),
    ));
    let error = service.oneshot("q").await.unwrap_err();
    assert_eq!(error.to_string(), "try 2 failed");
    assert_eq!(seen.tries(), 2);
}

#[tokio::test(start_paused = true)]
async fn percentile_delay_waits_for_samples_then_hedges_at_the_tail() {
    let seen = Seen::default();
    let config = p90_after_20_samples();
    let slow_call = Arc::new(AtomicUsize::new(usize::MAX));
    let slow = slow_call.clone();
    let service = HedgeLayer::new(config).unwrap().layer(backend(
        &seen,
        move |n| {
            if n == slow.load(Ordering::SeqCst) {
                ms(10_000)
            } else {
                ms(10)
            }
        },
        Ok,
    ));
    // Without samples, a slow call is not hedged.
    slow_call.store(1, Ordering::SeqCst);
    let started = Instant::now();
    service.clone().oneshot("q").await.unwrap();
    assert_eq!(started.elapsed(), ms(10_000));
    for _ in 0..30 {
        service.clone().oneshot("q").await.unwrap();
    }
    assert_eq!(seen.tries(), 31, "fast calls were never hedged");
    slow_call.store(32, Ordering::SeqCst);
    let started = Instant::now();
    assert_eq!(service.oneshot("q").await.unwrap(), 33);
    let took = started.elapsed();
    assert!(
        took > ms(20) && took < ms(22),
        "hedged after the p90 (about 10 ms): {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn hedges_draw_on_the_budget() {
    let seen = Seen::default();
    let config = HedgeConfig {
        budget: BudgetConfig::Limited {
            ratio: 0.0,
            min_per_sec: 1,
            ttl: Duration::from_secs(1),
        },
        ..fixed(ms(10), 1)
    };
    let layer = HedgeLayer::new(config).unwrap();
    let budget = layer.budget().clone();
    let service = layer.layer(backend(&seen, |_| ms(100), Ok));
    service.clone().oneshot("a").await.unwrap();
    assert_eq!(seen.tries(), 2, "the reserve allows one hedge");
    service.oneshot("b").await.unwrap();
    assert_eq!(seen.tries(), 3, "the second was refused");
    let snapshot = budget.snapshot();
    assert_eq!(
        (snapshot.deposits, snapshot.withdrawals, snapshot.refusals),
        (2, 1, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn only_hedgeable_requests_are_hedged() {
    let seen = Seen::default();
    let service = HedgeLayer::new(fixed(ms(10), 1))
        .unwrap()
        .hedgeable(|method: &&'static str| *method == "GET")
        .layer(backend(&seen, |_| ms(100), Ok));
    service.clone().oneshot("POST").await.unwrap();
    assert_eq!(seen.tries(), 1);
    service.oneshot("GET").await.unwrap();
    assert_eq!(seen.tries(), 3);
}

#[tokio::test(start_paused = true)]
async fn rejections_do_not_pull_the_percentile_delay_down() {
    use meshkit::breaker::{BreakerState, CircuitOpen};
    let seen = Seen::default();
    let config = p90_after_20_samples();
    // Tries 1-30 take 10 ms; 31-630 are refused at once by an open breaker below (were they
    // counted, the p90 would be 0 ms); 631 is slow, and its hedge (632) quick.
    let service = HedgeLayer::new(config).unwrap().layer(backend(
        &seen,
        |n| match n {
            1..=30 => ms(10),
            31..=630 => Duration::ZERO,
            631 => ms(10_000),
            _ => ms(10),
        },
        |n| match n {
            31..=630 => Err(CircuitOpen::new(BreakerState::Open, ms(100)).into()),
            n => Ok(n),
        },
    ));
    for _ in 0..630 {
        let _ = service.clone().oneshot("q").await;
    }
    let started = Instant::now();
    assert_eq!(service.oneshot("q").await.unwrap(), 632);
    let took = started.elapsed();
    assert!(
        took > ms(20) && took < ms(22),
        "hedged after the p90 of real calls (10 ms), not of refusals (0 ms): {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hedge_goes_to_another_endpoint_than_the_try_in_flight() {
    use meshkit::balance::{Balance, Random};
    use tower::discover::Change;
    // Two endpoints, each slower than the hedge delay: every call sends one hedge. Each
    // endpoint notes the calls it got.
    let got: Arc<Mutex<Vec<(u32, &'static str)>>> = Arc::default();
    let endpoint = |name: &'static str| {
        let got = got.clone();
        tower::util::BoxCloneSyncService::new(tower::service_fn(move |n: u32| {
            got.lock().unwrap().push((n, name));
            async move {
                tokio::time::sleep(ms(200)).await;
                Ok::<_, BoxError>(name)
            }
        }))
    };
    let discover = futures::stream::iter([
        Ok::<_, std::convert::Infallible>(Change::Insert("a", endpoint("a"))),
        Ok(Change::Insert("b", endpoint("b"))),
    ]);
    let mut balance = Balance::new(discover, Random::seeded(3));
    balance.ready().await.unwrap();
    tokio::time::sleep(ms(1)).await;
    let config = HedgeConfig {
        budget: BudgetConfig::Unlimited,
        ..fixed(ms(50), 1)
    };
    let mut hedged = HedgeLayer::new(config).unwrap().layer(balance);
    for n in 0..40 {
        hedged.ready().await.unwrap().call(n).await.unwrap();
    }
    let got = got.lock().unwrap();
    assert_eq!(got.len(), 80, "one hedge per call");
    for pair in got.chunks(2) {
        assert_eq!(pair[0].0, pair[1].0, "a call's try, then its hedge");
        assert_ne!(
            pair[0].1, pair[1].1,
            "call {}: the hedge went elsewhere",
            pair[0].0
        );
    }
}
