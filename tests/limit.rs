//! The limit layers through the public API, with paused time.

use futures::FutureExt;
use meshkit::breaker::{BreakerConfig, BreakerState, CircuitBreakerLayer, WindowConfig};
use meshkit::limit::{
    ConcurrencyLimitLayer, LoadShedLayer, OverloadReason, Overloaded, RateLimitConfig,
    RateLimitLayer, RateLimited,
};
use meshkit::retry::{RetryConfig, RetryLayer};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::advance;
use tokio_test::{assert_pending, assert_ready_err, assert_ready_ok};
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_test::mock;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const DAY: Duration = Duration::from_secs(86_400);

/// How many calls reached a service.
#[derive(Clone, Debug, Default)]
struct Calls(Arc<AtomicUsize>);

impl Calls {
    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    fn record(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A handler that counts its calls and answers each request after that long (tokio time).
fn handler(calls: &Calls) -> impl Service<Duration, Response = Duration, Error = BoxError> + Clone {
    let calls = calls.clone();
    tower::service_fn(move |took: Duration| {
        calls.record();
        async move {
            tokio::time::sleep(took).await;
            Ok::<_, BoxError>(took)
        }
    })
}

/// One call, readiness first.
async fn call<S, Req>(service: &mut S, request: Req) -> Result<S::Response, BoxError>
where
    S: Service<Req, Error = BoxError>,
{
    service.ready().await?.call(request).await
}

fn rate_limited<T: std::fmt::Debug>(result: Result<T, BoxError>) -> RateLimited {
    let error = result.expect_err("rate limited");
    *error
        .downcast_ref::<RateLimited>()
        .unwrap_or_else(|| panic!("expected RateLimited, got {error}"))
}

fn overloaded<T: std::fmt::Debug>(result: Result<T, BoxError>) -> Overloaded {
    let error = result.expect_err("overloaded");
    *error
        .downcast_ref::<Overloaded>()
        .unwrap_or_else(|| panic!("expected Overloaded, got {error}"))
}

fn rate_limit(rate: f64, burst: u32) -> RateLimitLayer {
    RateLimitLayer::new(RateLimitConfig { rate, burst }).unwrap()
}

#[tokio::test(start_paused = true)]
async fn rate_limit_admits_a_burst_then_rejects_with_retry_after() {
    let calls = Calls::default();
    let mut service = rate_limit(10.0, 3).layer(handler(&calls));

    for _ in 0..3 {
        call(&mut service, ms(0)).await.unwrap();
    }
    let limited = rate_limited(call(&mut service, ms(0)).await);
    assert_eq!(limited.retry_after(), ms(100), "one token per 100 ms");
    assert_eq!(
        calls.count(),
        3,
        "a rejected call never reaches the handler"
    );

    advance(ms(40)).await;
    assert_eq!(
        rate_limited(call(&mut service, ms(0)).await).retry_after(),
        ms(60)
    );
    advance(ms(60)).await;
    call(&mut service, ms(0)).await.unwrap();
    assert_eq!(
        rate_limited(call(&mut service, ms(0)).await).retry_after(),
        ms(100)
    );
    assert_eq!(calls.count(), 4);
}

#[tokio::test(start_paused = true)]
async fn rate_limit_refills_at_the_configured_rate() {
    let calls = Calls::default();
    let mut service = rate_limit(5.0, 2).layer(handler(&calls));
    call(&mut service, ms(0)).await.unwrap();
    call(&mut service, ms(0)).await.unwrap();

    // Knocking every 10 ms for 10 s: one call per 200 ms gets through.
    let mut admitted = 0;
    for _ in 0..1_000 {
        advance(ms(10)).await;
        if call(&mut service, ms(0)).await.is_ok() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 50);

    // A quiet spell refills the bucket up to the burst, not beyond.
    advance(Duration::from_secs(10)).await;
    call(&mut service, ms(0)).await.unwrap();
    call(&mut service, ms(0)).await.unwrap();
    assert_eq!(
        rate_limited(call(&mut service, ms(0)).await).retry_after(),
        ms(200)
    );
    assert_eq!(calls.count(), 2 + 50 + 2);
}

#[tokio::test(start_paused = true)]
async fn rate_limit_is_shared_by_clones() {
    let calls = Calls::default();
    let layer = rate_limit(1.0, 3);
    let mut first = layer.layer(handler(&calls));
    let mut second = layer.layer(handler(&calls));
    let mut clone = first.clone();

    call(&mut first, ms(0)).await.unwrap();
    call(&mut second, ms(0)).await.unwrap();
    call(&mut clone, ms(0)).await.unwrap();
    for service in [&mut first, &mut second, &mut clone] {
        assert_eq!(
            rate_limited(call(service, ms(0)).await).retry_after(),
            Duration::from_secs(1)
        );
    }

    advance(Duration::from_secs(1)).await;
    call(&mut second, ms(0)).await.unwrap();
    rate_limited(call(&mut first, ms(0)).await);
    assert_eq!(calls.count(), 4);
}

#[tokio::test(start_paused = true)]
async fn concurrency_limit_rejects_beyond_max_and_frees_on_completion() {
    let calls = Calls::default();
    let layer = ConcurrencyLimitLayer::new(2).unwrap();
    let mut service = layer.layer(handler(&calls));
    let mut clone = service.clone();
    let mut other = layer.layer(handler(&calls));

    let mut short = Box::pin(service.ready().await.unwrap().call(ms(100)));
    let long = Box::pin(clone.ready().await.unwrap().call(ms(200)));
    // Clones and other services built by the layer count against the same limit.
    for service in [&mut service, &mut clone, &mut other] {
        let full = overloaded(call(service, ms(0)).await);
        assert_eq!(full.reason(), OverloadReason::ConcurrencyLimit { max: 2 });
    }
    assert_eq!(
        calls.count(),
        2,
        "a rejected call never reaches the handler"
    );

    advance(ms(100)).await;
    assert_eq!(short.as_mut().await.unwrap(), ms(100));
    // The finished future is still alive; its permit is already free.
    assert_eq!(call(&mut other, ms(0)).await.unwrap(), ms(0));
    let third = Box::pin(other.ready().await.unwrap().call(DAY));
    overloaded(call(&mut service, ms(0)).await);

    advance(ms(100)).await;
    assert_eq!(long.await.unwrap(), ms(200));
    assert_eq!(call(&mut service, ms(0)).await.unwrap(), ms(0));
    drop((short, third));
    assert_eq!(calls.count(), 5);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_response_future_frees_its_permit() {
    let calls = Calls::default();
    let mut service = ConcurrencyLimitLayer::new(1)
        .unwrap()
        .layer(handler(&calls));

    let stuck = service.ready().await.unwrap().call(DAY);
    overloaded(call(&mut service, ms(0)).await);
    // Never polled, then cancelled.
    drop(stuck);
    assert_eq!(call(&mut service, ms(0)).await.unwrap(), ms(0));

    let mut polled = Box::pin(service.ready().await.unwrap().call(DAY));
    assert!(polled.as_mut().now_or_never().is_none());
    overloaded(call(&mut service, ms(0)).await);
    // Polled, pending, then cancelled.
    drop(polled);
    assert_eq!(call(&mut service, ms(0)).await.unwrap(), ms(0));
}

#[tokio::test(start_paused = true)]
async fn load_shed_rejects_when_the_inner_service_is_not_ready() {
    let (mut service, mut handle) =
        mock::spawn_layer::<&'static str, &'static str, _>(LoadShedLayer::new());

    handle.allow(0);
    assert_ready_ok!(
        service.poll_ready(),
        "ready even though the inner one is not"
    );
    let shed = overloaded(service.call("shed").await);
    assert_eq!(shed.reason(), OverloadReason::LoadShed);
    assert_pending!(handle.poll_request(), "nothing reached the inner service");

    handle.allow(1);
    assert_ready_ok!(service.poll_ready());
    let response = service.call("served");
    let (request, send) = handle.next_request().await.unwrap();
    assert_eq!(request, "served");
    send.send_response("ok");
    assert_eq!(response.await.unwrap(), "ok");

    // Readiness counts for one call.
    overloaded(service.call("again").await);

    // Readiness errors pass through unchanged.
    handle.send_error("backend gone");
    let error = assert_ready_err!(service.poll_ready());
    assert_eq!(error.to_string(), "backend gone");
    assert!(!meshkit::error::is_rejection(&*error));
}

#[tokio::test(start_paused = true)]
async fn rate_and_concurrency_limits_pass_the_inner_readiness_through() {
    let (mut rate, mut rate_handle) = mock::spawn_layer::<(), (), _>(rate_limit(1.0, 1));
    rate_handle.allow(0);
    assert_pending!(rate.poll_ready());
    rate_handle.allow(1);
    assert_ready_ok!(rate.poll_ready());

    let (mut concurrency, mut concurrency_handle) =
        mock::spawn_layer::<(), (), _>(ConcurrencyLimitLayer::new(1).unwrap());
    concurrency_handle.allow(0);
    assert_pending!(concurrency.poll_ready());
    concurrency_handle.send_error("backend gone");
    let error = assert_ready_err!(concurrency.poll_ready());
    assert_eq!(error.to_string(), "backend gone");
}

/// Wraps `limited` so that each call the retry layer makes is counted.
fn counted<S, Req>(
    limited: S,
    tries: &Calls,
) -> impl Service<Req, Response = S::Response, Error = BoxError> + Clone
where
    S: Service<Req, Error = BoxError> + Clone,
{
    let tries = tries.clone();
    tower::service_fn(move |request: Req| {
        tries.record();
        limited.clone().oneshot(request)
    })
}

fn retry() -> RetryLayer {
    RetryLayer::new(RetryConfig::default()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn limit_rejections_are_meshkit_rejections_and_never_retried() {
    let calls = Calls::default();

    // Rate: the burst of one is spent by the first call.
    let tries = Calls::default();
    let limited = rate_limit(1.0, 1).layer(handler(&calls));
    let service = retry().layer(counted(limited.clone(), &tries));
    service.clone().oneshot(ms(0)).await.unwrap();
    let error = service.oneshot(ms(0)).await.unwrap_err();
    assert!(error.is::<RateLimited>());
    assert!(meshkit::error::is_rejection(&*error));
    assert_eq!(tries.count(), 2, "one try each");

    // The counting sees retries when they are asked for.
    let tries = Calls::default();
    let service = retry()
        .retry_rejections(true)
        .layer(counted(limited, &tries));
    service.oneshot(ms(0)).await.unwrap_err();
    assert_eq!(tries.count(), 3);

    // Concurrency: one call in flight fills a limit of one.
    let tries = Calls::default();
    let limited = ConcurrencyLimitLayer::new(1)
        .unwrap()
        .layer(handler(&calls));
    let mut holder = limited.clone();
    let in_flight = holder.ready().await.unwrap().call(DAY);
    let service = retry().layer(counted(limited, &tries));
    let error = service.oneshot(ms(0)).await.unwrap_err();
    assert!(error.is::<Overloaded>());
    assert!(meshkit::error::is_rejection(&*error));
    assert_eq!(tries.count(), 1);
    drop(in_flight);

    // Load shed: the inner service is never ready.
    let tries = Calls::default();
    let (inner, mut handle) = mock::pair::<Duration, Duration>();
    handle.allow(0);
    let service = retry().layer(counted(LoadShedLayer::new().layer(inner), &tries));
    let error = service.oneshot(ms(0)).await.unwrap_err();
    assert!(error.is::<Overloaded>());
    assert!(meshkit::error::is_rejection(&*error));
    assert_eq!(tries.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn breakers_do_not_count_limit_rejections_as_failures() {
    let config = BreakerConfig {
        window: WindowConfig::Count { size: 4 },
        minimum_calls: 2,
        ..BreakerConfig::default()
    };
    let calls = Calls::default();

    let breaker = CircuitBreakerLayer::new(config.clone()).unwrap();
    let state = breaker.handle();
    let mut service = breaker.layer(rate_limit(1.0, 1).layer(handler(&calls)));
    call(&mut service, ms(0)).await.unwrap();
    for _ in 0..10 {
        rate_limited(call(&mut service, ms(0)).await);
    }
    assert_eq!(state.state(), BreakerState::Closed);

    let breaker = CircuitBreakerLayer::new(config)
        .unwrap()
        .count_rejections(true);
    let state = breaker.handle();
    let (inner, mut handle) = mock::pair::<(), ()>();
    handle.allow(0);
    let mut service = breaker.layer(LoadShedLayer::new().layer(inner));
    for _ in 0..2 {
        overloaded(call(&mut service, ()).await);
    }
    assert_eq!(state.state(), BreakerState::Open, "counted when asked to");
}

#[test]
fn invalid_configs_name_the_field_and_its_range() {
    let error = RateLimitLayer::new(RateLimitConfig {
        rate: 0.0,
        burst: 1,
    })
    .unwrap_err();
    assert_eq!(error.to_string(), "rate must be in (0, 1000000000], got 0");
    assert_eq!(error.field(), "rate");
    let error = RateLimitLayer::new(RateLimitConfig {
        rate: 2e9,
        burst: 1,
    })
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "rate must be in (0, 1000000000], got 2000000000"
    );
    let error = RateLimitLayer::new(RateLimitConfig {
        rate: 1.0,
        burst: 0,
    })
    .unwrap_err();
    assert_eq!(error.to_string(), "burst must be in [1, 1000000000], got 0");
    let error = ConcurrencyLimitLayer::new(0).unwrap_err();
    assert_eq!(error.to_string(), "max must be in [1, 1000000000], got 0");
    assert_eq!(error.field(), "max");
    RateLimitLayer::new(RateLimitConfig::default()).unwrap();
    ConcurrencyLimitLayer::new(1).unwrap();
}

#[test]
fn rate_limit_config_deserializes_with_the_documented_defaults() {
    let parse = |json| serde_json::from_str::<RateLimitConfig>(json);
    assert_eq!(
        parse("{}").unwrap(),
        RateLimitConfig {
            rate: 100.0,
            burst: 100
        }
    );
    assert_eq!(parse(r#"{ "rate": 2.5 }"#).unwrap().burst, 3);
    assert_eq!(
        parse(r#"{ "rate": 2.5, "burst": 1 }"#).unwrap(),
        RateLimitConfig {
            rate: 2.5,
            burst: 1
        }
    );
    assert!(parse(r#"{ "rate": 1, "per": "1s" }"#).is_err());
}
