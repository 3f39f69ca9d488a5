//! Races, deadlock freedom and runtime changes: the breaker under concurrent use.

mod support;

use meshkit::breaker::{
    BreakerConfig, BreakerHandle, BreakerState, CircuitBreakerLayer, WindowConfig,
};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use support::{
    backend, finishes_within, is_open, opens_on_second_failure, resets_the_breaker_when_it_opens,
    runtime, send, send_n, Call, OnEvent,
};
use tower::{Layer, Service, ServiceExt};
use tracing::Event;

// ---------------------------------------------------------------------------------------------
// 1. Deadlock: machine -> announcing (Locked::drop) vs announcing -> machine (a subscriber
//    reading the breaker from inside an announcement), across two threads.

/// On the "opened" event: tells the test it is announcing, waits a little so that another
/// thread can take the machine lock and queue behind `announcing`, then reads the breaker.
fn reads_metrics_when_opened(
    handle: BreakerHandle,
    entered: mpsc::Sender<()>,
) -> OnEvent<impl Fn(&Event<'_>) + Send + Sync + 'static> {
    let entered = Mutex::new(Some(entered));
    OnEvent(move |event: &Event<'_>| {
        if *event.metadata().level() != tracing::Level::WARN {
            return;
        }
        if let Some(tx) = entered.lock().unwrap().take() {
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            // Same thing the existing single-threaded test does: read the breaker.
            let _ = handle.metrics();
        }
    })
}

/// Opens the breaker behind `layer` with two failures, on a runtime of its own, while
/// `subscriber` is the thread's default.
fn open_with(layer: CircuitBreakerLayer, subscriber: impl tracing::Subscriber + Send + Sync) {
    let _guard = tracing::subscriber::set_default(subscriber);
    runtime().block_on(async {
        let mut service = layer.layer(backend());
        send_n(&mut service, Call::Fail, 2).await;
    });
}

#[test]
fn a_subscriber_reading_the_breaker_does_not_deadlock_with_a_concurrent_transition() {
    let layer = opens_on_second_failure();
    let handle = layer.handle();
    let (entered_tx, entered_rx) = mpsc::channel();
    let subscriber = reads_metrics_when_opened(handle.clone(), entered_tx);
    finishes_within(
        Duration::from_secs(5),
        "deadlock: A holds `announcing` and waits for the machine; B holds the machine and waits for `announcing`",
        move || {
            // Thread B: an operator resets the breaker while A is announcing.
            let b = std::thread::spawn(move || {
                entered_rx.recv().unwrap();
                handle.reset();
            });
            // Thread A: opens the breaker; its subscriber reads the breaker while announcing.
            open_with(layer, subscriber);
            b.join().unwrap();
        },
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Gate mode: a probe slot reserved by poll_ready that went stale (the half-open period it
//    was reserved in ended) keeps poll_ready Ready while the breaker is open, and call fails.

#[tokio::test(start_paused = true)]
async fn gated_poll_ready_stays_pending_once_a_reserved_probe_went_stale() {
    let layer = CircuitBreakerLayer::new(BreakerConfig {
        window: WindowConfig::Count { size: 4 },
        minimum_calls: 2,
        open_for: Duration::from_secs(10),
        half_open_calls: 1,
        half_open_timeout: Duration::from_secs(1),
        ..BreakerConfig::default()
    })
    .unwrap()
    .gate();
    let breaker = layer.handle();
    let mut service = layer.layer(backend());
    send_n(&mut service, Call::Fail, 2).await;
    assert_eq!(breaker.state(), BreakerState::Open);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(breaker.state(), BreakerState::HalfOpen);

    service.ready().await.unwrap(); // reserves the probe slot; the request comes later
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        breaker.state(),
        BreakerState::Open,
        "the reservation timed out"
    );

    // Gate mode promises Pending while the breaker rejects.
    let ready = futures::poll!(std::future::poll_fn(|cx| service.poll_ready(cx)));
    let call = if ready.is_ready() {
        Some(service.call(Call::Succeed).await)
    } else {
        None
    };
    assert!(
        ready.is_pending(),
        "gate mode: poll_ready returned {ready:?} while open; the call then gave {call:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Gate mode: a task waiting on runtime B is never woken if the driver's runtime A shuts
//    down (the docs: "when that runtime shuts down, the next runtime to use the breaker takes
//    over"). Nothing wakes the parked task, so nothing on B ever uses the breaker again.

/// A gated breaker (open for 200 ms) opened by two failures through a service on runtime A,
/// a one-worker multi-thread runtime, which now runs its driver. Returns the layer, runtime A
/// and the service used on it.
fn gated_and_opened_on_runtime_a() -> (
    CircuitBreakerLayer,
    tokio::runtime::Runtime,
    meshkit::breaker::CircuitBreaker<support::Backend>,
) {
    let layer = CircuitBreakerLayer::new(BreakerConfig {
        window: WindowConfig::Count { size: 4 },
        minimum_calls: 2,
        open_for: Duration::from_millis(200),
        half_open_calls: 1,
        ..BreakerConfig::default()
    })
    .unwrap()
    .gate();
    let runtime_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut service_a = layer.layer(backend());
    runtime_a.block_on(send_n(&mut service_a, Call::Fail, 2));
    (layer, runtime_a, service_a)
}

/// Spawns, on the current runtime, a task waiting for a new service of `layer` to be ready,
/// and yields until it parks as a gate waiter.
async fn park_a_gated_waiter(layer: &CircuitBreakerLayer) -> tokio::task::JoinHandle<()> {
    let mut service_b = layer.layer(backend());
    let waiting = tokio::spawn(async move {
        service_b.ready().await.unwrap();
    });
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    waiting
}

#[test]
fn a_gated_waiter_is_woken_after_the_drivers_runtime_shuts_down() {
    let (layer, runtime_a, _service_a) = gated_and_opened_on_runtime_a();
    let breaker = layer.handle();
    assert_eq!(breaker.state(), BreakerState::Open); // the driver now runs on A

    let runtime_b = runtime();
    let woke = runtime_b.block_on(async {
        let waiting = park_a_gated_waiter(&layer).await;
        assert!(!waiting.is_finished());
        // Runtime A ends (a parallel test finishing, say).
        std::thread::spawn(move || drop(runtime_a)).join().unwrap();
        tokio::time::timeout(Duration::from_secs(3), waiting)
            .await
            .is_ok()
    });
    assert!(
        woke,
        "the gated task on runtime B was still pending 3 s after a 200 ms open period (state now {:?})",
        breaker.state()
    );
}

/// In fail-fast mode, a call rejected on runtime B after the driver's runtime A shut down
/// starts a driver on B, which ends the open period with no further call and announces it.
#[test]
fn a_rejected_call_on_the_next_runtime_takes_the_breaker_over() {
    let layer = CircuitBreakerLayer::new(BreakerConfig {
        window: WindowConfig::Count { size: 4 },
        minimum_calls: 2,
        open_for: Duration::from_millis(50),
        ..BreakerConfig::default()
    })
    .unwrap();
    let breaker = layer.handle();
    let runtime_a = runtime();
    let mut service = layer.layer(backend());
    runtime_a.block_on(send_n(&mut service, Call::Fail, 2));
    assert_eq!(breaker.state(), BreakerState::Open);
    drop(runtime_a);

    let mut transitions = breaker.subscribe();
    let half_open = runtime().block_on(async {
        assert!(is_open(&send(&mut service, Call::Succeed).await));
        tokio::time::timeout(Duration::from_secs(3), transitions.recv())
            .await
            .map(|transition| transition.unwrap().to)
    });
    assert_eq!(
        half_open.ok(),
        Some(BreakerState::HalfOpen),
        "no driver on the new runtime: nothing announced the end of the open period"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Fast-path check-then-act: a success that saw FAST, racing a failure on another thread,
//    is counted after the failure read the totals and after FAST was cleared, so the call that
//    lifts the window to minimum_calls is never evaluated.
//    Every serial order of {warm-up success, s, f} opens the breaker (1 failure of 3 >= 0.3).

#[test]
// Spins for real nanoseconds between two OS threads: no tokio clock is involved.
#[allow(clippy::disallowed_types)]
fn a_success_racing_a_failure_never_leaves_the_breaker_closed() {
    use std::sync::Barrier;
    use std::task::{Context, Poll, Waker};
    type Svc = meshkit::breaker::CircuitBreaker<support::Backend>;

    fn ready_call(service: &mut Svc, call: Call) -> <Svc as Service<Call>>::Future {
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(service.poll_ready(&mut cx), Poll::Ready(Ok(()))));
        service.call(call)
    }
    fn finish(mut future: <Svc as Service<Call>>::Future) {
        let mut cx = Context::from_waker(Waker::noop());
        assert!(std::pin::Pin::new(&mut future).poll(&mut cx).is_ready());
    }
    use std::future::Future;

    const TRIALS: usize = 5_000;
    let start = Arc::new(Barrier::new(2));
    let (to_a, from_main_a) = mpsc::channel::<(Svc, u64)>();
    let (to_b, from_main_b) = mpsc::channel::<Svc>();
    let (done, finished) = mpsc::channel::<()>();
    let (start_a, done_a) = (start.clone(), done.clone());
    let a = std::thread::spawn(move || {
        for (mut service, delay_ns) in from_main_a {
            finish(ready_call(&mut service, Call::Succeed)); // warm-up: this thread's cell exists
            let s = ready_call(&mut service, Call::Succeed); // admitted with FAST
            start_a.wait();
            let t = std::time::Instant::now();
            while (t.elapsed().as_nanos() as u64) < delay_ns {
                std::hint::spin_loop();
            }
            finish(s);
            done_a.send(()).unwrap();
        }
    });
    let b = std::thread::spawn(move || {
        for mut service in from_main_b {
            let f = ready_call(&mut service, Call::Fail);
            start.wait();
            finish(f);
            done.send(()).unwrap();
        }
    });
    let mut stayed_closed = 0;
    for trial in 0..TRIALS {
        let layer = CircuitBreakerLayer::new(BreakerConfig {
            window: WindowConfig::Count { size: 10 },
            minimum_calls: 3,
            failure_rate: 0.3,
            ..BreakerConfig::default()
        })
        .unwrap();
        let handle = layer.handle();
        let service = layer.layer(backend());
        to_a.send((service.clone(), (trial as u64 * 7) % 3000))
            .unwrap();
        to_b.send(service).unwrap();
        finished.recv().unwrap();
        finished.recv().unwrap();
        let m = handle.metrics();
        if m.state == BreakerState::Closed {
            stayed_closed += 1;
            if stayed_closed == 1 {
                eprintln!("trial {trial}: closed with {m:?}");
            }
        }
    }
    drop((to_a, to_b));
    a.join().unwrap();
    b.join().unwrap();
    assert_eq!(
        stayed_closed, 0,
        "{stayed_closed} of {TRIALS} trials ended closed with 3 calls and 1 failure (rate 0.3, minimum 3)"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Keyed: the eviction event is emitted under the registry lock; a subscriber that looks at
//    the keyed handle from inside it deadlocks.

#[test]
fn a_subscriber_may_read_the_keyed_handle_when_a_key_is_evicted() {
    finishes_within(
        Duration::from_secs(5),
        "deadlock: the eviction event is emitted under the keyed registry's lock",
        || {
            let cell = Arc::new(OnceLock::<meshkit::breaker::KeyedBreakerHandle<u32>>::new());
            // Reads the keyed handle from inside every DEBUG event (eviction is one).
            let _guard = tracing::subscriber::set_default(OnEvent({
                let cell = cell.clone();
                move |event: &Event<'_>| {
                    if *event.metadata().level() == tracing::Level::DEBUG {
                        if let Some(handle) = cell.get() {
                            let _ = handle.len();
                        }
                    }
                }
            }));
            runtime().block_on(async {
                let layer = meshkit::breaker::KeyedCircuitBreakerLayer::new(
                    BreakerConfig::default(),
                    |key: &u32| *key,
                )
                .unwrap()
                .max_keys(1)
                .unwrap();
                cell.set(layer.handle()).unwrap();
                let mut service = layer.layer(tower::service_fn(|_: u32| async {
                    Ok::<(), tower::BoxError>(())
                }));
                service.ready().await.unwrap().call(1).await.unwrap();
                service.ready().await.unwrap().call(2).await.unwrap(); // evicts key 1
            });
        },
    );
}

// Controls: the same setups without the trigger pass.

#[test]
fn a_gated_waiter_on_another_runtime_is_woken_while_the_drivers_runtime_lives() {
    let (layer, runtime_a, _service_a) = gated_and_opened_on_runtime_a();
    let runtime_b = runtime();
    let woke = runtime_b.block_on(async {
        let waiting = park_a_gated_waiter(&layer).await;
        tokio::time::timeout(Duration::from_secs(3), waiting)
            .await
            .is_ok()
    });
    assert!(woke);
    drop(runtime_a);
}

#[test]
fn a_subscriber_reading_the_breaker_alone_is_fine() {
    let layer = opens_on_second_failure();
    let (entered_tx, _entered_rx) = mpsc::channel();
    let subscriber = reads_metrics_when_opened(layer.handle(), entered_tx);
    finishes_within(
        Duration::from_secs(5),
        "deadlock: a subscriber reading the breaker with no one else around",
        move || open_with(layer, subscriber),
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Ordering: a transition made from inside an announcement (the case commit 3879fd2 made
//    deadlock-free) is broadcast BEFORE the transition being announced, so receivers end up
//    believing the breaker is open while it is closed.

#[test]
fn a_transition_made_while_announcing_is_broadcast_after_it() {
    let cell = Arc::new(OnceLock::new());
    let _guard = tracing::subscriber::set_default(resets_the_breaker_when_it_opens(cell.clone()));
    runtime().block_on(async {
        let layer = opens_on_second_failure();
        cell.set(layer.handle()).unwrap();
        let mut transitions = layer.handle().subscribe();
        let mut service = layer.layer(backend());
        send_n(&mut service, Call::Fail, 2).await;
        let mut seen = Vec::new();
        while let Ok(t) = transitions.try_recv() {
            seen.push((t.from, t.to));
        }
        assert_eq!(layer.handle().state(), BreakerState::Closed);
        assert_eq!(
            seen,
            vec![
                (BreakerState::Closed, BreakerState::Open),
                (BreakerState::Open, BreakerState::Closed)
            ],
            "transitions broadcast in the wrong order; the last one says {:?} but the breaker is Closed",
            seen.last().map(|t| t.1)
        );
    });
}
