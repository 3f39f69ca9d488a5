//! What every benchmark shares: trivial always-ready services and the drivers that time
//! calls on one task or several. Included with `#[path]` by each bench file.
#![allow(dead_code)]

use std::convert::Infallible;
use std::fmt::Debug;
use std::future::Ready;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use criterion::measurement::WallTime;
use criterion::{black_box, BenchmarkGroup, Criterion};
use tokio::runtime::Runtime;
use tower::{BoxError, Service, ServiceExt};

/// An always-ready `Service<u64>` with the given error type, answering each request with
/// `$answer` (which sees the service as `$this` and the request as `$req`).
macro_rules! always_ready {
    ($(#[$doc:meta])* $name:ident $(($field:ty))?, $error:ty, |$this:ident, $req:ident| $answer:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default)]
        pub struct $name $(($field))?;

        impl Service<u64> for $name {
            type Response = u64;
            type Error = $error;
            type Future = Ready<Result<u64, $error>>;

            #[inline]
            fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
                Poll::Ready(Ok(()))
            }

            #[inline]
            #[allow(clippy::redundant_locals, unused_variables)]
            fn call(&mut self, $req: u64) -> Self::Future {
                let $this = self;
                std::future::ready(Ok($answer))
            }
        }
    };
}

always_ready!(
    /// Always ready, echoes the request.
    Trivial, Infallible, |this, req| req
);

always_ready!(
    /// Always ready, and spends about 10 ns of arithmetic on each request in registers and
    /// its own field: a service with nothing shared, whose two-task scaling shows what the
    /// machine allows (two busy cores may each run slower than one).
    Compute(u64), Infallible, |this, req| {
        let mut x = req;
        for _ in 0..20 {
            x = black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
        this.0 = this.0.wrapping_add(x);
        x
    }
);

always_ready!(
    /// [`Trivial`] with a boxed error, for layers that make errors of their own.
    TrivialBoxed, BoxError, |this, req| req
);

pub async fn drive<S>(svc: &mut S, iters: u64)
where
    S: Service<u64, Response = u64>,
    S::Error: Debug,
{
    for i in 0..iters {
        let ready = svc.ready().await.expect("service not ready");
        let fut = ready.call(black_box(i));
        let out = fut.await.expect("call failed");
        black_box(out);
    }
}

pub fn current_thread_rt() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub fn multi_thread_rt() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// One long-lived service per benchmark (built lazily inside the runtime so
/// that filtered-out benchmarks cost nothing), driven on a current-thread runtime.
pub fn bench_single<S, F>(g: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, id: &str, make: F)
where
    F: FnOnce() -> S,
    S: Service<u64, Response = u64>,
    S::Error: Debug,
{
    let mut make = Some(make);
    let mut svc: Option<S> = None;
    g.bench_function(id, |b| {
        let svc = svc.get_or_insert_with(|| {
            let make = make.take().unwrap();
            rt.block_on(async move { make() })
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

/// `tasks` spawned tasks on the 2-worker runtime, each with its own clone of
/// ONE shared-state service, each doing `iters` calls. Returns the wall time from the first
/// task's start to the last task's end.
///
/// The tasks start together: each waits (spinning, at most 100 ms) until every task is
/// running. The calls never yield, so without this start line tokio may run two freshly
/// spawned tasks one after the other on one worker while the other worker is still waking,
/// and the figure would measure that race, not the service. A spinning task holds its worker,
/// so the others are taken by the other workers.
pub fn bench_tasks<S, F>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    id: &str,
    tasks: usize,
    make: F,
) where
    F: FnOnce() -> S,
    S: Service<u64, Response = u64> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Debug + Send + 'static,
{
    let mut make = Some(make);
    let mut svc: Option<S> = None;
    g.bench_function(id, |b| {
        let svc = svc.get_or_insert_with(|| {
            let make = make.take().unwrap();
            rt.block_on(async move { make() })
        });
        b.iter_custom(|iters| {
            let clones: Vec<S> = (0..tasks).map(|_| svc.clone()).collect();
            let running = Arc::new(AtomicUsize::new(0));
            rt.block_on(async move {
                let handles: Vec<_> = clones
                    .into_iter()
                    .map(|mut s| {
                        let running = running.clone();
                        tokio::spawn(async move {
                            start_together(&running, tasks);
                            let start = Instant::now();
                            drive(&mut s, iters).await;
                            (start, Instant::now())
                        })
                    })
                    .collect();
                let mut first: Option<Instant> = None;
                let mut last: Option<Instant> = None;
                for h in handles {
                    let (start, end) = h.await.expect("bench task panicked");
                    first = Some(first.map_or(start, |f| f.min(start)));
                    last = Some(last.map_or(end, |l| l.max(end)));
                }
                last.unwrap() - first.unwrap()
            })
        });
    });
}

/// Counts this task as running, then spins until `tasks` are (or 100 ms have passed).
fn start_together(running: &AtomicUsize, tasks: usize) {
    running.fetch_add(1, Ordering::AcqRel);
    let deadline = Instant::now() + std::time::Duration::from_millis(100);
    while running.load(Ordering::Acquire) < tasks && Instant::now() < deadline {
        std::hint::spin_loop();
    }
}

/// The settings every bench starts from: 30 samples of 2 s after 0.5 s of warm-up. Benches
/// whose iterations are long adjust them on the value returned.
pub fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(30)
        .measurement_time(std::time::Duration::from_secs(2))
        .warm_up_time(std::time::Duration::from_millis(500))
}
