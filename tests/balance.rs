//! The balancer through the public API, with paused time.

use futures::channel::mpsc;
use meshkit::balance::{
    Balance, ConsistentHash, LeastRequests, NoEndpoints, PeakEwma, Random, RoundRobin,
};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tower::discover::Change;
use tower::{BoxError, Service, ServiceExt};

type Endpoint = tower::util::BoxCloneSyncService<u64, &'static str, BoxError>;

/// An endpoint that answers `name` after `latency`.
fn endpoint(name: &'static str, latency: Duration) -> Endpoint {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |_: u64| async move {
        tokio::time::sleep(latency).await;
        Ok::<_, BoxError>(name)
    }))
}

type Discovered = Result<Change<&'static str, Endpoint>, Infallible>;

/// A discovery stream the test feeds by hand.
fn changes() -> (
    mpsc::UnboundedSender<Discovered>,
    mpsc::UnboundedReceiver<Discovered>,
) {
    mpsc::unbounded()
}

fn insert(name: &'static str) -> Discovered {
    Ok(Change::Insert(name, endpoint(name, Duration::ZERO)))
}

async fn tally<S>(balance: &mut S, calls: u64) -> BTreeMap<&'static str, u64>
where
    S: Service<u64, Response = &'static str, Error = BoxError>,
{
    let mut counts = BTreeMap::new();
    for n in 0..calls {
        let name = balance.ready().await.unwrap().call(n).await.unwrap();
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(start_paused = true)]
async fn round_robin_is_exactly_even_over_discovered_endpoints() {
    let (tx, rx) = changes();
    for name in ["a", "b", "c"] {
        tx.unbounded_send(insert(name)).unwrap();
    }
    let mut balance = Balance::new(rx, RoundRobin);
    balance.ready().await.unwrap();
    // Let the worker publish all three before counting.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let counts = tally(&mut balance, 300).await;
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [100, 100, 100],
        "{counts:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn random_spreads_calls_over_every_endpoint() {
    let (tx, rx) = changes();
    for name in ["a", "b", "c", "d"] {
        tx.unbounded_send(insert(name)).unwrap();
    }
    let mut balance = Balance::new(rx, Random::seeded(9));
    balance.ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let counts = tally(&mut balance, 4_000).await;
    assert!(counts.values().all(|&c| c > 850 && c < 1_150), "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn without_endpoints_calls_fail_fast_then_resume() {
    let (tx, rx) = changes();
    let mut balance = Balance::with_options(rx, RoundRobin, "users", Duration::from_millis(500));
    let started = tokio::time::Instant::now();
    let error = balance.ready().await.unwrap().call(1).await.unwrap_err();
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(500),
        "waited failfast_after, no more"
    );
    let no_endpoints = error.downcast_ref::<NoEndpoints>().expect("NoEndpoints");
    assert_eq!(no_endpoints.service(), "users");
    assert_eq!(
        (
            no_endpoints.known(),
            no_endpoints.ready(),
            no_endpoints.ejected()
        ),
        (0, 0, 0)
    );
    assert_eq!(
        error.to_string(),
        "no endpoint of users is ready (0 known, 0 ready, 0 ejected)"
    );
    assert!(
        meshkit::error::is_rejection(&*error),
        "a meshkit rejection: not retried"
    );

    // Still failing fast, at once.
    let started = tokio::time::Instant::now();
    assert!(balance.ready().await.unwrap().call(2).await.is_err());
    assert_eq!(started.elapsed(), Duration::ZERO);

    tx.unbounded_send(insert("a")).unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(balance.ready().await.unwrap().call(3).await.unwrap(), "a");
}

#[tokio::test(start_paused = true)]
async fn a_handle_made_during_an_outage_fails_fast_at_once() {
    let (tx, rx) = changes();
    tx.unbounded_send(insert("a")).unwrap();
    let mut balance = Balance::with_options(rx, RoundRobin, "users", Duration::from_millis(500));
    assert_eq!(balance.ready().await.unwrap().call(1).await.unwrap(), "a");
    tx.unbounded_send(Ok(Change::Remove("a"))).unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;

    // A clone made an hour into the outage (a retry's copy, a new client) does not wait
    // `failfast_after` again: the balancer has had no endpoint for longer than that.
    let mut fresh = balance.clone();
    let started = tokio::time::Instant::now();
    let error = fresh.ready().await.unwrap().call(2).await.unwrap_err();
    assert!(error.is::<NoEndpoints>(), "{error}");
    assert_eq!(started.elapsed(), Duration::ZERO);

    // Once an endpoint is back, a handle that finds none again waits afresh.
    tx.unbounded_send(insert("b")).unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(fresh.ready().await.unwrap().call(3).await.unwrap(), "b");
}

#[tokio::test(start_paused = true)]
async fn discovery_goes_on_after_an_error() {
    let (tx, rx) = mpsc::unbounded::<Result<Change<&'static str, Endpoint>, std::io::Error>>();
    let send = |change| tx.unbounded_send(change).unwrap();
    send(Ok(Change::Insert("a", endpoint("a", Duration::ZERO))));
    let mut balance = Balance::new(rx, RoundRobin);
    assert_eq!(balance.ready().await.unwrap().call(1).await.unwrap(), "a");
    send(Err(std::io::Error::other("registry unreachable")));
    send(Ok(Change::Insert("b", endpoint("b", Duration::ZERO))));
    send(Ok(Change::Remove("a")));
    // The endpoints known stay while discovery fails; it is asked again a second later.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let counts = tally(&mut balance, 4).await;
    assert_eq!(counts.get("b"), Some(&4), "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn a_waiting_call_proceeds_as_soon_as_an_endpoint_is_ready() {
    let (tx, rx) = changes();
    let mut balance = Balance::new(rx, RoundRobin);
    let waiter = tokio::spawn(async move { balance.ready().await.unwrap().call(1).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished());
    tx.unbounded_send(insert("late")).unwrap();
    assert_eq!(waiter.await.unwrap().unwrap(), "late");
}

#[tokio::test(start_paused = true)]
async fn endpoints_become_ready_without_traffic() {
    let (mock, mut handle) = tower_test::mock::pair::<u64, &'static str>();
    handle.allow(0);
    let (tx, rx) = mpsc::unbounded::<Result<Change<&'static str, _>, Infallible>>();
    tx.unbounded_send(Ok(Change::Insert("mock", mock))).unwrap();
    let mut balance = Balance::with_options(rx, RoundRobin, "mocked", Duration::from_secs(60));
    // One poll starts the worker; then no request for a while.
    assert!(futures::poll!(std::future::poll_fn(|cx| balance.poll_ready(cx))).is_pending());
    tokio::time::sleep(Duration::from_secs(5)).await;
    handle.allow(1);
    // The worker, not a request, saw the endpoint become ready.
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(futures::poll!(std::future::poll_fn(|cx| balance.poll_ready(cx))).is_ready());
}

/// An endpoint whose `poll_ready` fails while `failing` is set.
#[derive(Clone)]
struct FlakyReadiness {
    name: &'static str,
    failing: Arc<AtomicBool>,
}

impl Service<u64> for FlakyReadiness {
    type Response = &'static str;
    type Error = BoxError;
    type Future = std::future::Ready<Result<&'static str, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(if self.failing.load(Ordering::SeqCst) {
            Err(BoxError::from("not ready"))
        } else {
            Ok(())
        })
    }

    fn call(&mut self, _: u64) -> Self::Future {
        std::future::ready(Ok(self.name))
    }
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_whose_readiness_failed_is_polled_again_not_dropped() {
    // tower's balancer drops an endpoint for good after one readiness error.
    let failing = Arc::new(AtomicBool::new(true));
    let (tx, rx) = changes();
    tx.unbounded_send(insert("steady")).unwrap();
    tx.unbounded_send(Ok(Change::Insert(
        "flaky",
        tower::util::BoxCloneSyncService::new(FlakyReadiness {
            name: "flaky",
            failing: Arc::clone(&failing),
        }),
    )))
    .unwrap();
    let mut balance = Balance::new(rx, RoundRobin);
    balance.ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let counts = tally(&mut balance, 10).await;
    assert_eq!(counts.get("flaky"), None, "not ready: no calls {counts:?}");

    // It recovers, with no request in between: the worker polls it again and it takes its
    // share.
    failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let counts = tally(&mut balance, 10).await;
    assert_eq!(
        counts.get("flaky"),
        Some(&5),
        "back in rotation: {counts:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn least_requests_prefers_the_idle_endpoint() {
    let (tx, rx) = changes();
    tx.unbounded_send(Ok(Change::Insert(
        "slow",
        endpoint("slow", Duration::from_secs(1)),
    )))
    .unwrap();
    tx.unbounded_send(Ok(Change::Insert(
        "fast",
        endpoint("fast", Duration::from_millis(1)),
    )))
    .unwrap();
    let mut balance = Balance::new(rx, LeastRequests::seeded(5));
    balance.ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    // Keep calls in flight: each slow one holds its endpoint busy for a second.
    let mut calls = Vec::new();
    for n in 0..200 {
        let call = balance.ready().await.unwrap().call(n);
        calls.push(tokio::spawn(call));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut counts = BTreeMap::new();
    for call in calls {
        *counts.entry(call.await.unwrap().unwrap()).or_insert(0) += 1;
    }
    assert!(counts["fast"] > 150, "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn consistent_hash_keeps_a_key_on_one_endpoint() {
    let (tx, rx) = changes();
    for name in ["a", "b", "c", "d", "e"] {
        tx.unbounded_send(insert(name)).unwrap();
    }
    let mut balance = Balance::new(rx, ConsistentHash::new(|user: &u64| *user % 97));
    balance.ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let mut owner = BTreeMap::new();
    for n in 0..1_000u64 {
        let name = balance.ready().await.unwrap().call(n).await.unwrap();
        assert_eq!(*owner.entry(n % 97).or_insert(name), name, "key {}", n % 97);
    }
    assert!(
        owner
            .values()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            > 1
    );
}

#[tokio::test(start_paused = true)]
async fn handles_are_clone_and_share_one_balancer_across_tasks() {
    let (tx, rx) = changes();
    for name in ["a", "b"] {
        tx.unbounded_send(insert(name)).unwrap();
    }
    let balance = Balance::new(rx, RoundRobin);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let mut handle = balance.clone();
            tokio::spawn(async move {
                let mut answered = 0u64;
                let mut names = BTreeMap::new();
                for n in 0..100 {
                    let ready = handle.ready().await.expect("ready");
                    let name = ready.call(n).await.expect("answered");
                    *names.entry(name).or_insert(0u64) += 1;
                    answered += 1;
                }
                (answered, names)
            })
        })
        .collect();
    let mut names = BTreeMap::new();
    for task in tasks {
        let (answered, answers) = task.await.unwrap();
        assert_eq!(answered, 100);
        for (name, count) in answers {
            *names.entry(name).or_insert(0) += count;
        }
    }
    // Every handle balanced over both endpoints the shared worker discovered.
    assert_eq!(names.get("a"), Some(&200), "{names:?}");
    assert_eq!(names.get("b"), Some(&200), "{names:?}");
}

/// Flags its own drop: held by the discovery stream, so by the worker.
struct Flag(Arc<AtomicBool>);

impl Drop for Flag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn dropping_every_handle_stops_the_worker() {
    let stopped = Arc::new(AtomicBool::new(false));
    let flag = Flag(stopped.clone());
    let (tx, rx) = changes();
    tx.unbounded_send(insert("a")).unwrap();
    let rx = futures::StreamExt::map(rx, move |change| {
        let _keep = &flag;
        change
    });
    let mut balance = Balance::new(Box::pin(rx), RoundRobin);
    balance.ready().await.unwrap();
    let clone = balance.clone();
    drop(balance);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!stopped.load(Ordering::SeqCst), "a handle is left");
    drop(clone);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(
        stopped.load(Ordering::SeqCst),
        "the worker dropped its discovery stream"
    );
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn weights_from_the_builder_shape_weighted_round_robin() {
    use meshkit::balance::WeightedRoundRobin;
    let (tx, rx) = changes();
    for name in ["heavy", "light"] {
        tx.unbounded_send(insert(name)).unwrap();
    }
    let mut balance = Balance::builder(rx, WeightedRoundRobin)
        .weights(|name: &&'static str| if *name == "heavy" { 3 } else { 1 })
        .build();
    balance.ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let counts = tally(&mut balance, 400).await;
    assert_eq!((counts["heavy"], counts["light"]), (300, 100), "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn a_balancer_from_config_uses_the_named_picker() {
    use meshkit::balance::{BalanceConfig, PickerKind};
    let (tx, rx) = changes();
    for name in ["a", "b", "c"] {
        tx.unbounded_send(insert(name)).unwrap();
    }
    let config = BalanceConfig {
        picker: PickerKind::RoundRobin,
        ..BalanceConfig::default()
    };
    let mut balance = Balance::from_config(rx, &config).unwrap();
    balance.ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let counts = tally(&mut balance, 300).await;
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [100, 100, 100]
    );

    let bad = BalanceConfig {
        failfast_after: Duration::from_secs(7_200),
        ..BalanceConfig::default()
    };
    let (_tx, rx) = changes();
    let error = Balance::<Endpoint, u64, _>::from_config(rx, &bad).unwrap_err();
    assert_eq!(error.field(), "failfast_after");
}

#[tokio::test(start_paused = true)]
async fn weights_come_from_registered_instances() {
    use meshkit::balance::WeightedRoundRobin;
    use meshkit::discovery::{discover, weights, Instance, MemoryRegistry, Registry};
    let registry = MemoryRegistry::new();
    let heavy = Instance::builder("users", "10.0.0.1", 80)
        .weight(4)
        .build()
        .unwrap();
    let light = Instance::builder("users", "10.0.0.2", 80).build().unwrap();
    let _heavy = registry.register(heavy).await.unwrap();
    let _light = registry.register(light).await.unwrap();
    let endpoints = discover(&registry, "users", |instance: &Instance| {
        let host: &'static str = if instance.host.ends_with(".1") {
            "heavy"
        } else {
            "light"
        };
        endpoint(host, Duration::ZERO)
    });
    let mut balance = Balance::builder(endpoints, WeightedRoundRobin)
        .weights(weights(&registry, "users"))
        .build();
    balance.ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let counts = tally(&mut balance, 500).await;
    assert_eq!((counts["heavy"], counts["light"]), (400, 100), "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn zone_aware_routing_stays_in_the_local_zone_until_it_empties() {
    use meshkit::discovery::{discover, zones, Instance, MemoryRegistry, Registry};
    let registry = MemoryRegistry::new();
    let register = |host: &str, zone: &str| {
        Instance::builder("users", host, 80)
            .zone(zone)
            .build()
            .unwrap()
    };
    let local_1 = registry
        .register(register("10.0.0.1", "eu-1a"))
        .await
        .unwrap();
    let local_2 = registry
        .register(register("10.0.0.2", "eu-1a"))
        .await
        .unwrap();
    let _remote = registry
        .register(register("10.0.0.3", "eu-1b"))
        .await
        .unwrap();
    let endpoints = discover(&registry, "users", |instance: &Instance| {
        let zone: &'static str = if instance.zone.as_deref() == Some("eu-1a") {
            "local"
        } else {
            "remote"
        };
        endpoint(zone, Duration::ZERO)
    });
    let mut balance = Balance::builder(endpoints, RoundRobin)
        .zones("eu-1a", 2, zones(&registry, "users"))
        .build();
    balance.ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let counts = tally(&mut balance, 300).await;
    assert_eq!(counts.get("local"), Some(&300), "{counts:?}");

    // One local endpoint left, below the two required: every zone serves.
    local_1.deregister().await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    let counts = tally(&mut balance, 300).await;
    assert_eq!(
        (counts["local"], counts["remote"]),
        (150, 150),
        "{counts:?}"
    );
    drop(local_2);
}

/// An endpoint that counts how often it is copied and whether it is ever called without
/// having been ready; with `first_ask_pending`, each copy's first `poll_ready` is `Pending`
/// (waking its task at once), as a service with a queue of its own can be.
#[derive(Debug)]
struct Copied {
    copies: Arc<AtomicUsize>,
    unready_calls: Arc<AtomicUsize>,
    first_ask_pending: bool,
    asked: bool,
    ready: bool,
}

impl Copied {
    fn new(first_ask_pending: bool) -> Self {
        Self {
            copies: Arc::default(),
            unready_calls: Arc::default(),
            first_ask_pending,
            asked: false,
            ready: false,
        }
    }
}

impl Clone for Copied {
    fn clone(&self) -> Self {
        self.copies.fetch_add(1, Ordering::SeqCst);
        Self {
            copies: self.copies.clone(),
            unready_calls: self.unready_calls.clone(),
            first_ask_pending: self.first_ask_pending,
            asked: false,
            ready: false,
        }
    }
}

impl Service<u64> for Copied {
    type Response = u64;
    type Error = Infallible;
    type Future = std::future::Ready<Result<u64, Infallible>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        if self.first_ask_pending && !std::mem::replace(&mut self.asked, true) {
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        self.ready = true;
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: u64) -> Self::Future {
        if !std::mem::replace(&mut self.ready, false) {
            self.unready_calls.fetch_add(1, Ordering::SeqCst);
        }
        std::future::ready(Ok(request))
    }
}

#[tokio::test(start_paused = true)]
async fn a_handle_calls_its_own_copy_of_a_ready_endpoint() {
    let endpoint = Copied::new(false);
    let (copies, unready) = (endpoint.copies.clone(), endpoint.unready_calls.clone());
    let discover = futures::stream::iter([Ok::<_, Infallible>(Change::Insert("a", endpoint))]);
    let mut balance = Balance::new(discover, RoundRobin);
    balance.ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let before = copies.load(Ordering::SeqCst);
    for n in 0..100 {
        assert_eq!(balance.ready().await.unwrap().call(n).await.unwrap(), n);
    }
    // One copy for this handle, made on its first call; none per call.
    assert_eq!(copies.load(Ordering::SeqCst) - before, 1);
    assert_eq!(unready.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_copy_that_is_not_ready_is_readied_before_its_call() {
    let endpoint = Copied::new(true);
    let unready = endpoint.unready_calls.clone();
    let discover = futures::stream::iter([Ok::<_, Infallible>(Change::Insert("a", endpoint))]);
    let mut balance = Balance::new(discover, RoundRobin);
    balance.ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    for n in 0..20 {
        assert_eq!(balance.ready().await.unwrap().call(n).await.unwrap(), n);
    }
    assert_eq!(
        unready.load(Ordering::SeqCst),
        0,
        "a call without readiness"
    );
}

/// 200 sequential calls through a `PeakEwma` balancer over `endpoints`, counted by the name
/// each endpoint answers.
async fn peak_ewma_tally<const N: usize>(
    endpoints: [(&'static str, Endpoint); N],
) -> BTreeMap<&'static str, u64> {
    let discover = futures::stream::iter(
        endpoints.map(|(name, endpoint)| Ok::<_, Infallible>(Change::Insert(name, endpoint))),
    );
    let mut balance = Balance::new(discover, PeakEwma::seeded(7));
    balance.ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    tally(&mut balance, 200).await
}

#[tokio::test(start_paused = true)]
async fn peak_ewma_sends_calls_to_the_endpoint_that_answers_sooner() {
    let counts = peak_ewma_tally([
        ("fast", endpoint("fast", Duration::from_millis(1))),
        ("slow", endpoint("slow", Duration::from_millis(50))),
    ])
    .await;
    assert!(counts["fast"] >= 190, "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn peak_ewma_prefers_an_endpoint_that_answers_at_once() {
    // "now" answers on the first poll, with no clock read for its round trip; "later" takes
    // 5 ms: "now" must win every comparison once both have answered.
    let now = tower::util::BoxCloneSyncService::new(tower::service_fn(|_: u64| {
        std::future::ready(Ok::<_, BoxError>("now"))
    }));
    let counts = peak_ewma_tally([
        ("now", now),
        ("later", endpoint("later", Duration::from_millis(5))),
    ])
    .await;
    assert!(counts["now"] >= 190, "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn peak_ewma_does_not_flood_an_endpoint_that_has_not_answered() {
    // "hangs" never answers, so it never gets a round-trip time; "answers" takes 5 ms. A
    // call every millisecond, none awaited: "hangs" must not take the calls that see it
    // with no history and a zero score.
    let counted =
        |name: &'static str, hang: bool, calls: Arc<std::sync::Mutex<Vec<&'static str>>>| {
            tower::util::BoxCloneSyncService::new(tower::service_fn(move |_: u64| {
                calls.lock().unwrap().push(name);
                async move {
                    if hang {
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Ok::<_, BoxError>(name)
                }
            }))
        };
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    let discover = futures::stream::iter([
        Ok::<_, Infallible>(Change::Insert(
            "hangs",
            counted("hangs", true, calls.clone()),
        )),
        Ok(Change::Insert(
            "answers",
            counted("answers", false, calls.clone()),
        )),
    ]);
    let mut balance = Balance::new(discover, PeakEwma::seeded(7));
    balance.ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    for n in 0..100 {
        let call = balance.ready().await.unwrap().call(n);
        tokio::spawn(call);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let calls = calls.lock().unwrap();
    let hung = calls.iter().filter(|&&name| name == "hangs").count();
    assert!(
        hung <= 5,
        "{hung} of {} calls to the endpoint that never answers",
        calls.len()
    );
}

#[tokio::test(start_paused = true)]
async fn calls_to_an_endpoint_at_its_concurrency_limit_wait_their_turn() {
    // One call at a time: a handle's copy is not ready while another call holds the permit,
    // and its call must wait for the permit rather than fail or skip readiness (tower's
    // `ConcurrencyLimit` panics on a call without a permit).
    let limited = tower::ServiceBuilder::new()
        .concurrency_limit(1)
        .service(endpoint("a", Duration::from_millis(10)));
    let discover = futures::stream::iter([Ok::<_, Infallible>(Change::Insert("a", limited))]);
    let mut balance = Balance::new(discover, RoundRobin);
    balance.ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let started = tokio::time::Instant::now();
    let calls = (0..5u64).map(|n| {
        let mut handle = balance.clone();
        async move { handle.ready().await.unwrap().call(n).await.unwrap() }
    });
    let answers = tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(calls))
        .await
        .expect("the calls waited for a permit that never came back");
    assert_eq!(answers, ["a"; 5]);
    // One at a time: five calls of 10 ms each.
    assert!(
        started.elapsed() >= Duration::from_millis(50),
        "{:?}",
        started.elapsed()
    );
}

/// Answers every request `mock` receives with `name`, in a task of its own.
fn answer_all(mut handle: tower_test::mock::Handle<u64, &'static str>, name: &'static str) {
    tokio::spawn(async move {
        while let Some((_, send)) = handle.next_request().await {
            send.send_response(name);
        }
    });
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_that_stops_being_ready_is_passed_over() {
    // tower-test mocks: `a` takes one call, then is never ready again; `b` takes them all.
    let ((a, mut a_handle), (b, mut b_handle)) = (
        tower_test::mock::pair::<u64, &'static str>(),
        tower_test::mock::pair::<u64, &'static str>(),
    );
    a_handle.allow(1);
    b_handle.allow(1_000);
    answer_all(a_handle, "a");
    answer_all(b_handle, "b");
    let discover = futures::stream::iter([
        Ok::<_, Infallible>(Change::Insert("a", a)),
        Ok(Change::Insert("b", b)),
    ]);
    let mut balance = Balance::new(discover, RoundRobin);
    balance.ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let mut counts = BTreeMap::new();
    for n in 0..20 {
        let call = balance.ready().await.unwrap().call(n);
        let name = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("a call waited for the endpoint that is no longer ready")
            .unwrap();
        *counts.entry(name).or_insert(0) += 1;
    }
    assert_eq!(counts, BTreeMap::from([("a", 1), ("b", 19)]));
}

/// An endpoint answering `name`, ready only while `open` is set (a waiting `poll_ready` is
/// woken when it opens); a call without readiness panics, as tower's services do.
#[derive(Clone)]
struct Gate {
    name: &'static str,
    open: Arc<AtomicBool>,
    wakers: Arc<std::sync::Mutex<Vec<std::task::Waker>>>,
    ready: bool,
}

impl Gate {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            open: Arc::new(AtomicBool::new(true)),
            wakers: Arc::default(),
            ready: false,
        }
    }

    fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
        if open {
            self.wakers.lock().unwrap().drain(..).for_each(|w| w.wake());
        }
    }
}

impl Service<u64> for Gate {
    type Response = &'static str;
    type Error = Infallible;
    type Future = std::future::Ready<Result<&'static str, Infallible>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        if self.open.load(Ordering::SeqCst) {
            self.ready = true;
            return std::task::Poll::Ready(Ok(()));
        }
        self.wakers.lock().unwrap().push(cx.waker().clone());
        std::task::Poll::Pending
    }

    fn call(&mut self, _: u64) -> Self::Future {
        assert!(
            std::mem::take(&mut self.ready),
            "{} called unready",
            self.name
        );
        std::future::ready(Ok(self.name))
    }
}

#[tokio::test(start_paused = true)]
async fn calls_return_to_an_endpoint_once_it_is_ready_again() {
    let (a, b, c) = (Gate::new("a"), Gate::new("b"), Gate::new("c"));
    let discover = futures::stream::iter(
        [&a, &b, &c].map(|gate| Ok::<_, Infallible>(Change::Insert(gate.name, gate.clone()))),
    );
    let mut balance = Balance::new(discover, RoundRobin);
    balance.ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    a.set_open(false);
    let closed = tokio::time::timeout(Duration::from_secs(5), tally(&mut balance, 30))
        .await
        .expect("a call waited for the endpoint that is not ready");
    assert_eq!(closed.get("a"), None, "{closed:?}");
    assert_eq!(closed["b"] + closed["c"], 30);
    a.set_open(true);
    let open = tally(&mut balance, 30).await;
    assert_eq!(open, BTreeMap::from([("a", 10), ("b", 10), ("c", 10)]));
    // With none ready, a call waits for the one it picked rather than fail.
    [&a, &b, &c].iter().for_each(|gate| gate.set_open(false));
    let mut call = balance.ready().await.unwrap().call(0);
    assert!(futures::poll!(&mut call).is_pending());
    [&a, &b, &c].iter().for_each(|gate| gate.set_open(true));
    assert!(["a", "b", "c"].contains(&call.await.unwrap()));
}

#[tokio::test(start_paused = true)]
async fn consistent_hash_sends_the_keys_of_an_endpoint_not_ready_where_they_would_go_without_it() {
    let gates = ["a", "b", "c", "d", "e"].map(Gate::new);
    let over = |gates: &[Gate]| {
        let discover = futures::stream::iter(
            gates
                .iter()
                .map(|gate| Ok::<_, Infallible>(Change::Insert(gate.name, gate.clone())))
                .collect::<Vec<_>>(),
        );
        Balance::new(discover, ConsistentHash::new(|user: &u64| *user))
    };
    let (mut all, mut without_a) = (over(&gates), over(&gates[1..]));
    all.ready().await.unwrap();
    without_a.ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let mut owners = BTreeMap::new();
    for user in 0..300u64 {
        owners.insert(user, all.ready().await.unwrap().call(user).await.unwrap());
    }

    gates[0].set_open(false);
    let mut moved_to = BTreeMap::new();
    for (&user, &owner) in &owners {
        let now = tokio::time::timeout(Duration::from_secs(5), async {
            all.ready().await.unwrap().call(user).await.unwrap()
        })
        .await
        .expect("a call waited for the endpoint that is not ready");
        if owner == "a" {
            let without = without_a.ready().await.unwrap().call(user).await.unwrap();
            assert_eq!(now, without, "user {user}: where it goes without a");
            *moved_to.entry(now).or_insert(0) += 1;
        } else {
            assert_eq!(now, owner, "user {user}: only a's keys move");
        }
    }
    assert!(
        moved_to.len() > 1,
        "a's keys spread round the ring: {moved_to:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn round_robins_stay_even_over_the_ready_endpoints_when_one_is_not_ready() {
    use meshkit::balance::WeightedRoundRobin;
    for endpoints in [3, 4, 5] {
        let gates: Vec<Gate> = ["a", "b", "c", "d", "e"][..endpoints]
            .iter()
            .map(|name| Gate::new(name))
            .collect();
        let discover = futures::stream::iter(
            gates
                .iter()
                .map(|gate| Ok::<_, Infallible>(Change::Insert(gate.name, gate.clone())))
                .collect::<Vec<_>>(),
        );
        let mut balance = Balance::new(discover, RoundRobin);
        balance.ready().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        gates[0].set_open(false);
        let calls = 60 * (endpoints as u64 - 1);
        let counts = tally(&mut balance, calls).await;
        assert_eq!(counts.get("a"), None);
        for gate in &gates[1..] {
            assert_eq!(counts[gate.name], 60, "{endpoints} endpoints: {counts:?}");
        }
    }

    // Weights 1, 2, 1 with the first not ready: the other two keep their 2 : 1.
    let gates = ["a", "b", "c"].map(Gate::new);
    let discover = futures::stream::iter(
        gates
            .iter()
            .map(|gate| Ok::<_, Infallible>(Change::Insert(gate.name, gate.clone())))
            .collect::<Vec<_>>(),
    );
    let weights = |name: &&'static str| if *name == "b" { 2 } else { 1 };
    let mut balance = Balance::builder(discover, WeightedRoundRobin)
        .weights(weights)
        .build();
    balance.ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    gates[0].set_open(false);
    let counts = tally(&mut balance, 300).await;
    assert_eq!(counts.get("a"), None);
    assert_eq!((counts["b"], counts["c"]), (200, 100), "{counts:?}");
}

/// A round-robin balancer, started, over "a" and "b": each takes one call at a time, and
/// answers call 0 after 100 ms, any other after 10 ms.
async fn two_limited_endpoints(
) -> impl Service<u64, Response = &'static str, Error = BoxError, Future: Send + 'static> + Clone {
    let limited = |name: &'static str| {
        tower::ServiceBuilder::new()
            .concurrency_limit(1)
            .service(tower::service_fn(move |n: u64| async move {
                let latency = if n == 0 { 100 } else { 10 };
                tokio::time::sleep(Duration::from_millis(latency)).await;
                Ok::<_, Infallible>(name)
            }))
    };
    let discover = futures::stream::iter([
        Ok::<_, Infallible>(Change::Insert("a", limited("a"))),
        Ok(Change::Insert("b", limited("b"))),
    ]);
    let mut balance = Balance::new(discover, RoundRobin);
    balance.ready().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    balance
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_at_its_concurrency_limit_is_passed_over_for_one_with_room() {
    // Two endpoints of one call at a time, where call 0 takes 100 ms and the others 10 ms.
    // While one endpoint holds call 0, the calls round robin gives it go to the other,
    // instead of queueing behind call 0.
    let mut balance = two_limited_endpoints().await;
    let first = tokio::spawn(balance.ready().await.unwrap().call(0));
    let started = tokio::time::Instant::now();
    let mut answers = Vec::new();
    for n in 1..=4 {
        answers.push(balance.ready().await.unwrap().call(n).await.unwrap());
    }
    assert_eq!(started.elapsed(), Duration::from_millis(40), "{answers:?}");
    let busy = first.await.unwrap().unwrap();
    assert!(
        answers.iter().all(|&name| name != busy),
        "{busy}: {answers:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_handle_that_passed_over_a_busy_endpoint_does_not_keep_its_place_in_line() {
    // Two endpoints of one call at a time; call 0 holds one for 100 ms. A second handle's
    // calls pass over it meanwhile; once it is free, a third handle's calls reach it again
    // (a copy left queued for its permit, with no one to wake, would take the permit freed).
    let mut balance = two_limited_endpoints().await;
    let first = tokio::spawn(balance.ready().await.unwrap().call(0));
    let mut second = balance.clone();
    for n in 1..=2 {
        second.ready().await.unwrap().call(n).await.unwrap();
    }
    let busy = first.await.unwrap().unwrap();
    let mut third = balance.clone();
    let counts = tally(&mut third, 10).await;
    assert_eq!(
        counts.get(busy),
        Some(&5),
        "{busy} is free again: {counts:?}"
    );
    drop(second);
}
