//! One breaker per host: isolation between keys, the handle, and the bounds on keys held.

mod support;

use meshkit::breaker::{
    BreakerConfig, BreakerState, CircuitOpen, KeyedCircuitBreakerLayer, WindowConfig,
};
use std::collections::HashSet;
use std::time::Duration;
use support::{backend, is_open, Call};
use tokio::time::sleep;
use tower::{BoxError, Layer, Service, ServiceExt};

type Request = (String, Call);

const OPEN_FOR: Duration = Duration::from_secs(60);

/// Opens after three failures among a host's last five calls, and stays open for a minute.
fn config() -> BreakerConfig {
    BreakerConfig {
        window: WindowConfig::Count { size: 5 },
        minimum_calls: 3,
        open_for: OPEN_FOR,
        open_for_max: OPEN_FOR * 4,
        half_open_calls: 1,
        ..BreakerConfig::default()
    }
}

fn host(req: &Request) -> String {
    req.0.clone()
}

/// A backend that takes `(host, call)` and does what `call` says.
fn hosts_backend(
) -> impl Service<Request, Response = (), Error = BoxError, Future = impl Send> + Clone + Send {
    backend().map_request(|(_, call): Request| call)
}

async fn send_to<S>(service: &mut S, to: &str, call: Call) -> Result<(), BoxError>
where
    S: Service<Request, Response = (), Error = BoxError>,
{
    service.ready().await?.call((to.to_owned(), call)).await
}

async fn open<S>(service: &mut S, to: &str)
where
    S: Service<Request, Response = (), Error = BoxError>,
{
    for _ in 0..3 {
        let result = send_to(service, to, Call::Fail).await;
        assert!(result.is_err() && !is_open(&result), "{result:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn one_failing_host_opens_only_its_own_breaker() {
    let layer = KeyedCircuitBreakerLayer::new(config(), host).unwrap();
    let mut service = layer.layer(hosts_backend());
    send_to(&mut service, "b", Call::Succeed).await.unwrap();
    open(&mut service, "a").await;

    let rejected = send_to(&mut service, "a", Call::Succeed).await;
    assert!(is_open(&rejected), "{rejected:?}");
    for _ in 0..10 {
        send_to(&mut service, "b", Call::Succeed).await.unwrap();
        send_to(&mut service, "c", Call::Succeed).await.unwrap();
    }
    let a = layer.handle().get(&"a".to_owned()).unwrap();
    assert_eq!(a.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn handle_get_returns_each_keys_own_breaker() {
    let layer = KeyedCircuitBreakerLayer::new(config(), host).unwrap();
    let handle = layer.handle();
    let mut service = layer.layer(hosts_backend());
    assert!(handle.is_empty());
    assert!(handle.get(&"a".to_owned()).is_none(), "no call to a yet");

    send_to(&mut service, "b", Call::Succeed).await.unwrap();
    open(&mut service, "a").await;

    let a = handle.get(&"a".to_owned()).expect("a is held");
    let b = handle.get(&"b".to_owned()).expect("b is held");
    assert_eq!(a.state(), BreakerState::Open);
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(&*a.name(), format!("{:?}", "a".to_owned()));
    assert_eq!(a.metrics().openings, 1);
    assert_eq!(b.metrics().calls, 1);
    assert_eq!(handle.len(), 2);
    let keys: HashSet<String> = handle.keys().into_iter().collect();
    assert_eq!(keys, HashSet::from(["a".to_owned(), "b".to_owned()]));
    assert_eq!(
        service.handle().len(),
        2,
        "the service's handle sees the same keys"
    );

    // The handle controls that key's breaker only.
    b.force_open();
    let err = send_to(&mut service, "b", Call::Succeed).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<CircuitOpen>().unwrap().state(),
        BreakerState::ForcedOpen
    );
    a.reset();
    send_to(&mut service, "a", Call::Succeed).await.unwrap();
    assert_eq!(
        handle.get(&"a".to_owned()).unwrap().state(),
        BreakerState::Closed
    );

    // An open period ends for the key by itself.
    open(&mut service, "c").await;
    sleep(OPEN_FOR).await;
    assert_eq!(
        handle.get(&"c".to_owned()).unwrap().state(),
        BreakerState::HalfOpen
    );
    send_to(&mut service, "c", Call::Succeed).await.unwrap();
    assert_eq!(
        handle.get(&"c".to_owned()).unwrap().state(),
        BreakerState::Closed
    );
}

#[tokio::test(start_paused = true)]
async fn the_least_recently_used_key_is_evicted_beyond_max_keys() {
    let layer = KeyedCircuitBreakerLayer::new(config(), host)
        .unwrap()
        .with_limits(2, Duration::from_secs(600))
        .unwrap();
    let handle = layer.handle();
    let mut service = layer.layer(hosts_backend());

    send_to(&mut service, "a", Call::Succeed).await.unwrap();
    sleep(Duration::from_millis(1)).await;
    send_to(&mut service, "b", Call::Succeed).await.unwrap();
    sleep(Duration::from_millis(1)).await;
    send_to(&mut service, "a", Call::Succeed).await.unwrap(); // a is now the most recent
    sleep(Duration::from_millis(1)).await;
    send_to(&mut service, "c", Call::Succeed).await.unwrap();

    assert_eq!(handle.len(), 2);
    assert!(
        handle.get(&"b".to_owned()).is_none(),
        "b was the least recently used"
    );
    assert!(handle.get(&"a".to_owned()).is_some());
    assert!(handle.get(&"c".to_owned()).is_some());

    for i in 0..50 {
        sleep(Duration::from_millis(1)).await;
        send_to(&mut service, &format!("host-{i}"), Call::Succeed)
            .await
            .unwrap();
        assert!(handle.len() <= 2, "{} keys held", handle.len());
    }
    let keys: HashSet<String> = handle.keys().into_iter().collect();
    assert_eq!(
        keys,
        HashSet::from(["host-48".to_owned(), "host-49".to_owned()])
    );
}

#[tokio::test(start_paused = true)]
async fn an_evicted_key_starts_closed_again() {
    let layer = KeyedCircuitBreakerLayer::new(config(), host)
        .unwrap()
        .with_limits(1, Duration::from_secs(600))
        .unwrap();
    let handle = layer.handle();
    let mut service = layer.layer(hosts_backend());
    open(&mut service, "a").await;
    assert!(is_open(&send_to(&mut service, "a", Call::Succeed).await));

    send_to(&mut service, "b", Call::Succeed).await.unwrap();
    assert!(handle.get(&"a".to_owned()).is_none());

    send_to(&mut service, "a", Call::Succeed).await.unwrap();
    let a = handle.get(&"a".to_owned()).unwrap();
    assert_eq!(a.state(), BreakerState::Closed);
    assert_eq!(a.metrics().openings, 0);
}

#[tokio::test(start_paused = true)]
async fn keys_idle_longer_than_idle_timeout_are_forgotten_and_start_closed() {
    let idle_timeout = Duration::from_secs(10);
    let layer = KeyedCircuitBreakerLayer::new(config(), host)
        .unwrap()
        .with_limits(100, idle_timeout)
        .unwrap();
    let handle = layer.handle();
    let mut service = layer.layer(hosts_backend());
    open(&mut service, "a").await;
    send_to(&mut service, "b", Call::Succeed).await.unwrap();

    sleep(idle_timeout - Duration::from_millis(1)).await;
    send_to(&mut service, "b", Call::Succeed).await.unwrap();
    assert_eq!(handle.len(), 2);

    sleep(Duration::from_millis(1)).await;
    send_to(&mut service, "c", Call::Succeed).await.unwrap();
    assert!(
        handle.get(&"a".to_owned()).is_none(),
        "a was idle for idle_timeout"
    );
    assert!(handle.get(&"b".to_owned()).is_some(), "b was used since");
    assert_eq!(handle.len(), 2);

    // a's breaker would still be open (OPEN_FOR is a minute): the key starts afresh.
    send_to(&mut service, "a", Call::Succeed).await.unwrap();
    let a = handle.get(&"a".to_owned()).unwrap();
    assert_eq!(a.state(), BreakerState::Closed);
    assert_eq!(a.metrics().openings, 0);
}

/// The docs promise that a key unused for `idle_timeout` is forgotten and starts again
/// closed; that must not depend on another key arriving first.
#[tokio::test(start_paused = true)]
async fn a_key_idle_longer_than_idle_timeout_starts_closed_on_its_own_next_call() {
    let idle_timeout = Duration::from_secs(10);
    let layer = KeyedCircuitBreakerLayer::new(config(), host)
        .unwrap()
        .with_limits(100, idle_timeout)
        .unwrap();
    let mut service = layer.layer(hosts_backend());
    open(&mut service, "a").await;

    sleep(idle_timeout * 2).await;
    let result = send_to(&mut service, "a", Call::Succeed).await;
    assert!(
        result.is_ok(),
        "a, idle for 20 s, is still held and rejects: {result:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn transitions_name_the_key_in_its_debug_form() {
    let layer = KeyedCircuitBreakerLayer::new(config(), host).unwrap();
    let handle = layer.handle();
    let mut transitions = handle.subscribe();
    let mut service = layer.layer(hosts_backend());
    send_to(&mut service, "b", Call::Succeed).await.unwrap();
    open(&mut service, "api.example.com").await;

    let opened = transitions.try_recv().unwrap();
    assert_eq!(&*opened.breaker, "\"api.example.com\"");
    assert_eq!(
        &*opened.breaker,
        format!("{:?}", "api.example.com".to_owned())
    );
    assert_eq!(
        (opened.from, opened.to),
        (BreakerState::Closed, BreakerState::Open)
    );
    // No call: the key's own driver ends the open period.
    let half_open = transitions.recv().await.unwrap();
    assert_eq!(&*half_open.breaker, "\"api.example.com\"");
    assert_eq!(
        (half_open.from, half_open.to),
        (BreakerState::Open, BreakerState::HalfOpen)
    );
    assert_eq!(half_open.at - opened.at, OPEN_FOR);
    assert!(transitions.try_recv().is_err(), "b never changed state");
}

#[test]
fn with_limits_rejects_out_of_range_bounds_naming_the_field() {
    let layer = || KeyedCircuitBreakerLayer::new(config(), host).unwrap();
    let err = layer().with_limits(0, Duration::from_secs(60)).unwrap_err();
    assert_eq!(err.field(), "max_keys");
    assert_eq!(err.got(), "0");
    let err = layer()
        .with_limits(10, Duration::from_millis(10))
        .unwrap_err();
    assert_eq!(err.field(), "idle_timeout");
    layer().with_limits(1, Duration::from_secs(1)).unwrap();
}

#[test]
fn an_invalid_config_is_refused_naming_the_field() {
    let config = BreakerConfig {
        minimum_calls: 0,
        ..config()
    };
    let err = KeyedCircuitBreakerLayer::new(config, host).unwrap_err();
    assert_eq!(err.field(), "minimum_calls");
}

#[tokio::test(start_paused = true)]
async fn max_keys_and_idle_timeout_can_be_set_one_at_a_time() {
    let layer = KeyedCircuitBreakerLayer::new(config(), |req: &Request| req.0.clone())
        .unwrap()
        .max_keys(2)
        .unwrap()
        .idle_timeout(Duration::from_secs(5))
        .unwrap();
    let handle = layer.handle();
    let mut service = layer.layer(backend().map_request(|(_, call): Request| call));
    for host in ["a", "b", "c"] {
        service
            .ready()
            .await
            .unwrap()
            .call((host.to_owned(), Call::Succeed))
            .await
            .unwrap();
    }
    assert_eq!(handle.len(), 2);
    let err = KeyedCircuitBreakerLayer::new(config(), |req: &Request| req.0.clone())
        .unwrap()
        .max_keys(0)
        .unwrap_err();
    assert_eq!(err.field(), "max_keys");
}
