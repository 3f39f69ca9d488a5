//! Gate mode: `poll_ready` waits while the breaker rejects and wakes the task when it may take
//! traffic again, driven through tower-test mocks with paused tokio time.

mod support;

use meshkit::breaker::{
    BreakerConfig, BreakerHandle, BreakerState, CircuitBreaker, CircuitBreakerLayer, CircuitOpen,
    WindowConfig,
};
use meshkit::random::SplitMix64;
use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use support::is_open;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::{BoxError, Layer};
use tower_test::mock::{self, Mock, Spawn};

type Handle = mock::Handle<&'static str, ()>;
type Gated = Spawn<CircuitBreaker<Mock<&'static str, ()>>>;

const OPEN_FOR: Duration = Duration::from_secs(10);

/// Opens after two failures among the last four calls; one probe decides in half-open.
fn config() -> BreakerConfig {
    BreakerConfig {
        window: WindowConfig::Count { size: 4 },
        minimum_calls: 2,
        open_for: OPEN_FOR,
        half_open_calls: 1,
        ..BreakerConfig::default()
    }
}

fn fail_fast() -> CircuitBreakerLayer {
    CircuitBreakerLayer::new(config())
        .unwrap()
        .random(Arc::new(SplitMix64::seeded(1)))
}

fn gate() -> CircuitBreakerLayer {
    fail_fast().gate()
}

/// Polls the breaker's readiness for the mock's request type.
fn poll_ready(service: &mut Gated) -> Poll<Result<(), BoxError>> {
    service.poll_ready::<&'static str>()
}

/// Sends one request through `service` and has the mock answer it; returns the result.
async fn exchange(service: &mut Gated, handle: &mut Handle, fail: bool) -> Result<(), BoxError> {
    assert_ready_ok!(poll_ready(service));
    let response = service.call("request");
    let (_, reply) = handle
        .next_request()
        .await
        .expect("the mock received the request");
    if fail {
        reply.send_error("backend failed");
    } else {
        reply.send_response(());
    }
    response.await
}

/// Opens the breaker by sending two failures through `service`.
async fn drive_open(service: &mut Gated, handle: &mut Handle) {
    for _ in 0..2 {
        exchange(service, handle, true).await.unwrap_err();
    }
}

/// Two spawned clones of one gated service, after the first drove the breaker open and its
/// open period passed; with the breaker's handle and the mock's.
async fn two_clones_past_the_open_period() -> (BreakerHandle, Gated, Gated, Handle) {
    let layer = gate();
    let breaker = layer.handle();
    let (inner, mut handle) = mock::pair::<&'static str, ()>();
    let service = layer.layer(inner);
    let mut first = Spawn::new(service.clone());
    let second = Spawn::new(service);
    drive_open(&mut first, &mut handle).await;
    tokio::time::sleep(OPEN_FOR).await;
    (breaker, first, second, handle)
}

/// Lets spawned tasks (the breaker's driver) run at the current paused instant.
async fn settle() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn gate_mode_passes_the_inner_readiness_through_while_closed() {
    let layer = gate();
    let breaker = layer.handle();
    let (mut service, mut handle) = mock::spawn_layer(layer);

    handle.allow(0);
    assert_pending!(poll_ready(&mut service));
    assert!(!service.is_woken());

    handle.allow(1);
    assert!(
        service.is_woken(),
        "the inner service's wake-up reaches the task"
    );
    assert_ready_ok!(poll_ready(&mut service));
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn poll_ready_is_pending_while_open_and_wakes_when_half_open() {
    let layer = gate();
    let breaker = layer.handle();
    let (mut service, mut handle) = mock::spawn_layer(layer);
    drive_open(&mut service, &mut handle).await;
    assert_eq!(breaker.state(), BreakerState::Open);

    // Pending, not an error, and the task is registered for a wake-up.
    assert_pending!(poll_ready(&mut service));
    assert!(
        service.waker_ref_count() > 1,
        "the breaker holds the task's waker"
    );
    assert!(!service.is_woken());

    tokio::time::advance(OPEN_FOR - Duration::from_millis(1)).await;
    settle().await;
    assert!(
        !service.is_woken(),
        "still open 1 ms before the period ends"
    );
    assert_pending!(poll_ready(&mut service));

    // No call and no state query: only the breaker's driver can wake the task.
    tokio::time::advance(Duration::from_millis(1)).await;
    settle().await;
    assert!(service.is_woken(), "woken when the breaker turns half-open");
    assert_eq!(breaker.state(), BreakerState::HalfOpen);

    assert_ready_ok!(poll_ready(&mut service));
    assert_eq!(
        breaker.metrics().probes_in_flight,
        1,
        "poll_ready reserved the probe slot"
    );
    exchange(&mut service, &mut handle, false).await.unwrap();
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_gated_clone_waits_while_another_holds_the_only_probe_and_wakes_when_it_closes() {
    let (breaker, mut first, mut second, mut handle) = two_clones_past_the_open_period().await;
    assert_eq!(breaker.state(), BreakerState::HalfOpen);

    assert_ready_ok!(poll_ready(&mut first));
    assert_pending!(poll_ready(&mut second));
    assert!(!second.is_woken());

    let response = first.call("probe");
    let (_, reply) = handle.next_request().await.unwrap();
    assert!(!second.is_woken(), "the probe has not finished");
    reply.send_response(());
    response.await.unwrap();

    assert_eq!(breaker.state(), BreakerState::Closed);
    assert!(second.is_woken(), "the probe's success closed the breaker");
    assert_ready_ok!(poll_ready(&mut second));
}

#[tokio::test(start_paused = true)]
async fn a_gated_clone_is_woken_when_a_reserved_probe_slot_is_given_back() {
    let (breaker, mut first, mut second, _handle) = two_clones_past_the_open_period().await;

    assert_ready_ok!(poll_ready(&mut first));
    assert_pending!(poll_ready(&mut second));
    drop(first);

    assert!(
        second.is_woken(),
        "dropping the reserving service freed the slot"
    );
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    assert_ready_ok!(poll_ready(&mut second));
    assert_eq!(breaker.metrics().probes_in_flight, 1);
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_keeps_gated_services_pending_until_the_next_half_open() {
    let (breaker, mut first, mut second, mut handle) = two_clones_past_the_open_period().await;

    exchange(&mut first, &mut handle, true).await.unwrap_err();
    assert_eq!(breaker.state(), BreakerState::Open);

    assert_pending!(poll_ready(&mut first));
    assert_pending!(poll_ready(&mut second));
    let reopened_for = breaker.metrics().open_remaining.unwrap();
    assert!(
        reopened_for > OPEN_FOR,
        "the second opening backs off: {reopened_for:?}"
    );

    tokio::time::advance(reopened_for).await;
    settle().await;
    assert!(first.is_woken() && second.is_woken());
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn forced_open_makes_gated_poll_ready_pending_and_reset_wakes_it() {
    let layer = gate();
    let breaker = layer.handle();
    let (mut service, _handle) = mock::spawn_layer::<&'static str, (), _>(layer);

    breaker.force_open();
    assert_pending!(poll_ready(&mut service));
    tokio::time::advance(Duration::from_secs(3600)).await;
    settle().await;
    assert!(
        !service.is_woken(),
        "a forced-open breaker never turns half-open by itself"
    );
    assert_pending!(poll_ready(&mut service));

    breaker.reset();
    assert!(service.is_woken());
    assert_ready_ok!(poll_ready(&mut service));
}

#[tokio::test(start_paused = true)]
async fn fail_fast_poll_ready_is_ready_while_open_and_call_fails_with_circuit_open() {
    let layer = fail_fast();
    let breaker = layer.handle();
    let (mut service, mut handle) = mock::spawn_layer(layer);
    drive_open(&mut service, &mut handle).await;
    assert_eq!(breaker.state(), BreakerState::Open);

    // Even an inner service that is not ready does not hold up the rejection.
    handle.allow(0);
    assert_ready_ok!(poll_ready(&mut service));
    let result = service.call("request").await;
    assert!(is_open(&result), "{result:?}");
    let open = result
        .as_ref()
        .unwrap_err()
        .downcast_ref::<CircuitOpen>()
        .unwrap();
    assert_eq!(open.state(), BreakerState::Open);
    assert_eq!(open.retry_after(), OPEN_FOR);
    assert!(
        handle.poll_request().is_pending(),
        "the rejected call never reached the mock"
    );
    assert_eq!(breaker.metrics().rejected, 1);
}

/// A `poll_ready` that decided to reject must not leave the service skipping the inner
/// service's readiness once the breaker closes again.
#[tokio::test(start_paused = true)]
async fn fail_fast_passes_the_inner_readiness_through_again_after_a_rejection_was_not_used() {
    let layer = fail_fast();
    let breaker = layer.handle();
    let (mut service, mut handle) = mock::spawn_layer(layer);
    drive_open(&mut service, &mut handle).await;

    // Readiness is polled while open (a rejection is decided) but no call follows.
    assert_ready_ok!(poll_ready(&mut service));
    breaker.reset();

    handle.allow(0);
    assert_pending!(poll_ready(&mut service), "the inner service is not ready");
    handle.allow(1);
    assert_ready_ok!(poll_ready(&mut service));
    exchange(&mut service, &mut handle, false).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn gated_tasks_that_give_up_leave_no_waker_behind() {
    struct Observed;
    impl std::task::Wake for Observed {
        fn wake(self: Arc<Self>) {}
    }
    let layer = gate();
    let handle = layer.handle();
    let (mock, _backend) = mock::pair::<&'static str, ()>();
    let service = layer.layer(mock);
    handle.force_open();
    let mut wakers = Vec::new();
    for _ in 0..100 {
        let mut service = service.clone();
        let observed = Arc::new(Observed);
        wakers.push(Arc::downgrade(&observed));
        let waker = std::task::Waker::from(observed);
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(tower::Service::poll_ready(&mut service, &mut cx).is_pending());
        // The task gives up (a timeout, say) and drops its service.
    }
    let retained = wakers.iter().filter(|w| w.upgrade().is_some()).count();
    assert_eq!(
        retained, 0,
        "the breaker still holds wakers of services that are gone"
    );
}

#[test]
fn gate_mode_without_a_runtime_fails_fast_instead_of_waiting_forever() {
    let layer = CircuitBreakerLayer::new(config()).unwrap().gate();
    let handle = layer.handle();
    let (mock, _backend) = mock::pair::<&'static str, ()>();
    let mut service = mock::Spawn::new(layer.layer(mock));
    handle.force_open();
    // No tokio runtime here, so no driver could ever wake a waiting task.
    assert_ready_ok!(service.poll_ready());
    let mut call = std::pin::pin!(service.call("request"));
    let polled = call
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
    let Poll::Ready(Err(err)) = polled else {
        panic!("a rejection is immediate");
    };
    assert!(err
        .downcast_ref::<meshkit::breaker::CircuitOpen>()
        .is_some());
}
