//! Circuit-breaker overhead benchmarks.
//!
//! Everything runs in one process / one criterion run so that ratios between
//! variants are meaningful.
//!
//! Variants (all wrap the same trivial, always-ready service and are driven
//! with `ServiceExt::ready` + `call` + `.await` on a `&mut` service):
//!
//! * `raw`                   – the trivial service itself
//! * `meshkit_count`         – meshkit breaker, `BreakerConfig::default()` (count window, 100 calls)
//! * `meshkit_time`          – meshkit breaker, 60 s time window
//! * `tower_resilience_count`– tower-resilience 0.13 breaker, failure rate 0.5, count window 100
//! * `tower_resilience_time` – tower-resilience 0.13 breaker, failure rate 0.5, 60 s time window
//! * `failsafe`              – failsafe 1.3 `futures::CircuitBreaker::call(fut)` around the same
//!   trivial future; policy `success_rate_over_time_window(0.5, 100, 60 s, constant(30 s))`
//!   (failsafe has no count window).
//!
//! Groups:
//!
//! * `breaker/closed_single_task` – per-call time on a current-thread runtime.
//! * `breaker/closed_two_tasks`   – 2-worker multi-thread runtime; `one_task/<v>` is one spawned
//!   task doing `iters` calls, `two_tasks/<v>` is two spawned tasks (each with its own clone of
//!   the shared-state service) each doing `iters` calls. The reported time is the wall time, so
//!   per iteration `two_tasks` does 2 calls. Scaling = `2 * t(one_task) / t(two_tasks)`
//!   (throughput is set to 1 resp. 2 elements, so criterion's elem/s can be compared directly).
//!   `compute` is a service that shares nothing and spends ~10 ns per call in arithmetic: its
//!   scaling is what the machine allows two busy cores.
//! * `breaker/time_window_flat`   – per-call cost of a 60 s time-window breaker that has already
//!   served N calls (pre-warm is outside the timed region).
//!
//! Default settings (overridable from the command line): sample size 30, measurement 2 s,
//! warm-up 500 ms.
//!
//! Regenerate the table in BENCHMARKS.md with `cargo bench --bench breaker`.

// Benchmarks measure real elapsed time; paused tokio time has no place here.
#![allow(clippy::disallowed_types)]

use std::convert::Infallible;
use std::fmt::Debug;
use std::future::Ready;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;

use common::*;
use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode, Throughput,
};
use tokio::runtime::Runtime;
use tower::{Layer, Service};

use meshkit::breaker::{BreakerConfig, CircuitBreakerLayer, WindowConfig};

use tower_resilience::circuitbreaker::{
    CircuitBreakerLayer as TrCircuitBreakerLayer, SlidingWindowType as TrSlidingWindowType,
};

// ---------------------------------------------------------------------------
// The trivial service
// ---------------------------------------------------------------------------
// ---------------------------------------------------------------------------
// failsafe adapter: not a tower layer, so we guard the inner future with
// `failsafe::futures::CircuitBreaker::call` — i.e. "guarded call of the same
// trivial future". Readiness is delegated to the inner service unchanged.
// ---------------------------------------------------------------------------

struct Failsafe<P> {
    inner: Trivial,
    cb: failsafe::StateMachine<P, ()>,
}

// Manual impl: `StateMachine` is an `Arc` handle (Clone for any policy), so
// clones share one breaker; `derive` would wrongly require `P: Clone`.
impl<P> Clone for Failsafe<P> {
    fn clone(&self) -> Self {
        Failsafe {
            inner: self.inner,
            cb: self.cb.clone(),
        }
    }
}

impl<P> Service<u64> for Failsafe<P>
where
    P: failsafe::FailurePolicy + Send + Sync,
{
    type Response = u64;
    type Error = failsafe::Error<Infallible>;
    type Future =
        failsafe::futures::ResponseFuture<Ready<Result<u64, Infallible>>, P, (), failsafe::Any>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(failsafe::Error::Inner)
    }

    #[inline]
    fn call(&mut self, req: u64) -> Self::Future {
        failsafe::futures::CircuitBreaker::call(&self.cb, self.inner.call(req))
    }
}

// ---------------------------------------------------------------------------
// Constructors (must be called inside a tokio runtime context)
// ---------------------------------------------------------------------------

const WINDOW_60S: Duration = Duration::from_secs(60);

fn meshkit_count() -> <CircuitBreakerLayer as Layer<Trivial>>::Service {
    let layer = CircuitBreakerLayer::new(BreakerConfig::default()).unwrap();
    layer.layer(Trivial)
}

fn meshkit_time() -> <CircuitBreakerLayer as Layer<Trivial>>::Service {
    let cfg = BreakerConfig {
        window: WindowConfig::Time {
            duration: WINDOW_60S,
        },
        ..BreakerConfig::default()
    };
    let layer = CircuitBreakerLayer::new(cfg).unwrap();
    layer.layer(Trivial)
}

fn tower_resilience_count() -> tower_resilience::circuitbreaker::CircuitBreaker<
    Trivial,
    tower_resilience::circuitbreaker::DefaultClassifier,
> {
    let layer = TrCircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_type(TrSlidingWindowType::CountBased)
        .sliding_window_size(100)
        .minimum_number_of_calls(100)
        .wait_duration_in_open(Duration::from_secs(30))
        .build()
        .unwrap();
    layer.layer(Trivial)
}

fn tower_resilience_time() -> tower_resilience::circuitbreaker::CircuitBreaker<
    Trivial,
    tower_resilience::circuitbreaker::DefaultClassifier,
> {
    let layer = TrCircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_type(TrSlidingWindowType::TimeBased)
        .sliding_window_duration(WINDOW_60S)
        .sliding_window_size(100)
        .minimum_number_of_calls(100)
        .wait_duration_in_open(Duration::from_secs(30))
        .build()
        .unwrap();
    layer.layer(Trivial)
}

type FailsafePolicy =
    failsafe::failure_policy::SuccessRateOverTimeWindow<failsafe::backoff::Constant>;

fn failsafe_svc() -> Failsafe<FailsafePolicy> {
    let policy = failsafe::failure_policy::success_rate_over_time_window(
        0.5, // required success rate == failure-rate threshold 0.5
        100, // minimum requests in window
        WINDOW_60S,
        failsafe::backoff::constant(Duration::from_secs(30)),
    );
    let cb = failsafe::Config::new().failure_policy(policy).build();
    Failsafe { inner: Trivial, cb }
}

/// Per-call cost after the breaker has already served `prewarm` calls.
///
/// * `fresh_per_sample == true`: every criterion sample (and warm-up round) builds a
///   new breaker and pre-warms it (untimed, outside `iter_custom`) — used for small `prewarm` so that the breaker's
///   history really is ~`prewarm` calls (plus the sample's own calls), instead of
///   accumulating every call criterion makes.
/// * `fresh_per_sample == false`: one breaker is pre-warmed once (lazily, untimed)
///   and reused; its history is therefore `prewarm` + all calls made so far.
///
/// Note: the timed calls themselves also feed the window.
fn bench_flat<S, F>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    id: &str,
    prewarm: u64,
    fresh_per_sample: bool,
    make: F,
) where
    F: Fn() -> S,
    S: Service<u64, Response = u64>,
    S::Error: Debug,
{
    if fresh_per_sample {
        g.bench_function(id, |b| {
            // Build + pre-warm here, *outside* `iter_custom`: criterion's
            // warm-up phase uses the wall time of the `iter_custom` routine to
            // pick iteration counts, so pre-warm work inside it would skew that.
            let mut svc = rt.block_on(async {
                let mut svc = make();
                drive(&mut svc, prewarm).await;
                svc
            });
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    drive(&mut svc, iters).await;
                    start.elapsed()
                })
            });
            drop(svc);
        });
    } else {
        let mut svc: Option<S> = None;
        g.bench_function(id, |b| {
            let svc = svc.get_or_insert_with(|| {
                rt.block_on(async {
                    let t = Instant::now();
                    let mut svc = make();
                    drive(&mut svc, prewarm).await;
                    eprintln!("[{id}] pre-warmed {prewarm} calls in {:?}", t.elapsed());
                    svc
                })
            });
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    drive(svc, iters).await;
                    start.elapsed()
                })
            });
        });
    }
}

// ---------------------------------------------------------------------------
// Groups
// ---------------------------------------------------------------------------

fn closed_single_task(c: &mut Criterion) {
    let rt = current_thread_rt();
    let mut g = c.benchmark_group("breaker/closed_single_task");
    g.throughput(Throughput::Elements(1));

    bench_single(&mut g, &rt, "raw", || Trivial);
    bench_single(&mut g, &rt, "meshkit_count", meshkit_count);
    bench_single(&mut g, &rt, "meshkit_time", meshkit_time);
    bench_single(
        &mut g,
        &rt,
        "tower_resilience_count",
        tower_resilience_count,
    );
    // NB: tower-resilience's time-based window keeps one record per call in a
    // VecDeque and rescans it on every call (O(calls in window)), so this
    // number depends on how many calls criterion has made so far (see
    // `breaker/time_window_flat` for a controlled measurement).
    bench_single(&mut g, &rt, "tower_resilience_time", tower_resilience_time);
    bench_single(&mut g, &rt, "failsafe", failsafe_svc);

    g.finish();
}

fn closed_two_tasks(c: &mut Criterion) {
    let rt = multi_thread_rt();
    let mut g = c.benchmark_group("breaker/closed_two_tasks");

    macro_rules! pair {
        ($name:literal, $make:expr) => {
            g.throughput(Throughput::Elements(1));
            bench_tasks(&mut g, &rt, concat!("one_task/", $name), 1, $make);
            g.throughput(Throughput::Elements(2));
            bench_tasks(&mut g, &rt, concat!("two_tasks/", $name), 2, $make);
        };
    }

    pair!("raw", || Trivial);
    pair!("compute", Compute::default);
    pair!("meshkit_count", meshkit_count);
    pair!("meshkit_time", meshkit_time);
    pair!("tower_resilience", tower_resilience_count);
    pair!("failsafe", failsafe_svc);

    g.finish();
}

fn time_window_flat(c: &mut Criterion) {
    let rt = current_thread_rt();
    let mut g = c.benchmark_group("breaker/time_window_flat");
    g.throughput(Throughput::Elements(1));
    // Same number of iterations in every sample: the sample's own calls also
    // grow the window, so keep samples comparable.
    g.sampling_mode(SamplingMode::Flat);

    bench_flat(&mut g, &rt, "after_10k", 10_000, true, meshkit_time);
    bench_flat(&mut g, &rt, "after_10M", 10_000_000, false, meshkit_time);

    // tower-resilience's time window is O(n) per call (VecDeque rescan), so
    // pre-warming is O(n^2): 10M is infeasible, 200k is used instead.
    bench_flat(
        &mut g,
        &rt,
        "tower_resilience_after_10k",
        10_000,
        true,
        tower_resilience_time,
    );
    bench_flat(
        &mut g,
        &rt,
        "tower_resilience_after_200k",
        200_000,
        false,
        tower_resilience_time,
    );

    g.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = closed_single_task, closed_two_tasks, time_window_flat
}
criterion_main!(benches);
