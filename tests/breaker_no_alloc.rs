//! The closed-state success path allocates nothing once warm.
//!
//! A counting global allocator records every allocation in a per-thread counter, so that
//! allocations made by other test threads (or the harness) cannot disturb the measurement.

mod support;

use meshkit::breaker::{BreakerConfig, BreakerState, CircuitBreakerLayer, WindowConfig};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::future::Ready;
use std::time::Duration;
use support::runtime;
use tower::{Layer, Service, ServiceExt};

struct CountingAllocator;

thread_local! {
    // `const` and no destructor: reading it never allocates.
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count_one() {
    // `try_with`: the thread may be tearing down its thread-locals.
    let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
}

/// Allocations made by the calling thread so far.
fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

// SAFETY: every method forwards to `System` unchanged; counting touches only a thread-local
// `Cell<usize>`, which neither allocates nor unwinds.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` shares.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        // SAFETY: `ptr` and `layout` come from this allocator, which is `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` and `layout` come from this allocator, which is `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const WARM_UP: usize = 1_000;
const MEASURED: usize = 10_000;

/// A trivial service that is always ready and answers at once.
#[derive(Clone, Copy)]
struct Echo;

impl Service<u64> for Echo {
    type Response = u64;
    type Error = Infallible;
    type Future = Ready<Result<u64, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: u64) -> Self::Future {
        std::future::ready(Ok(request))
    }
}

/// Sends `n` successful calls through `service`; panics on any failure.
async fn succeed<S>(service: &mut S, n: usize)
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    for i in 0..n as u64 {
        let response = service.ready().await.unwrap().call(i).await;
        // Compared without formatting, which would allocate.
        assert!(matches!(response, Ok(r) if r == i));
    }
}

/// Allocations made by `MEASURED` closed-state successes through a warm breaker built from
/// `config`, and the breaker's state afterwards.
fn allocations_of_warm_successes(config: BreakerConfig) -> (usize, BreakerState, u64) {
    runtime().block_on(async {
        let layer = CircuitBreakerLayer::new(config).unwrap();
        let handle = layer.handle();
        let mut service = layer.layer(Echo);

        // The first calls may allocate: the thread's counter cell, its cache slot, the driver.
        succeed(&mut service, WARM_UP).await;
        // Let the driver run once, so that its first pass is not part of the measurement.
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }

        let before = allocations();
        succeed(&mut service, MEASURED).await;
        let allocated = allocations() - before;
        (allocated, handle.state(), handle.metrics().calls)
    })
}

#[test]
fn closed_state_successes_allocate_nothing_once_warm() {
    // Sanity check: the counter sees this thread's allocations.
    let before = allocations();
    drop(std::hint::black_box(Box::new(0_u64)));
    assert_eq!(
        allocations() - before,
        1,
        "the counting allocator is installed"
    );

    let count = BreakerConfig {
        window: WindowConfig::Count { size: 100 },
        minimum_calls: 10,
        ..BreakerConfig::default()
    };
    let (allocated, state, calls) = allocations_of_warm_successes(count);
    assert_eq!(state, BreakerState::Closed);
    assert_eq!(calls, 100, "the count window is full of recorded successes");
    assert_eq!(
        allocated, 0,
        "{MEASURED} successes through a count-window breaker"
    );

    let time = BreakerConfig {
        window: WindowConfig::Time {
            duration: Duration::from_secs(60),
        },
        minimum_calls: 10,
        ..BreakerConfig::default()
    };
    let (allocated, state, calls) = allocations_of_warm_successes(time);
    assert_eq!(state, BreakerState::Closed);
    assert_eq!(
        calls,
        (WARM_UP + MEASURED) as u64,
        "every success is in the 60 s window"
    );
    assert_eq!(
        allocated, 0,
        "{MEASURED} successes through a time-window breaker"
    );
}
