//! Discovery: snapshot reads, register/deregister throughput, change-to-watcher latency and
//! memory per instance, with 10 000 instances over 100 services.
//!
//! * `discovery/snapshot_read/meshkit_*` – `MemoryRegistry::snapshot` and the trait's
//!   `Registry::instances` (a boxed future, polled once) for one service of a registry
//!   holding 10 000 instances: over 100 services (100 each), or all in one service.
//! * `discovery/snapshot_read/naive_*` – a `RwLock<HashMap<String, Vec<Instance>>>` that
//!   clones the service's instances on every read, as a hand-rolled registry would, with the
//!   same two layouts.
//! * `discovery/register_deregister` – registering one more instance and dropping its
//!   `Registration` (which deregisters it) on the 10 000-instance registry.
//! * `discovery/change_to_watcher` – on a 2-worker runtime, from a registration to a watcher
//!   task receiving its `Upsert` (the time includes waking the watcher's task).
//!
//! Memory per instance is measured with a counting allocator and printed before the groups.
//!
//! Regenerate the table in BENCHMARKS.md with `cargo bench --bench discovery`.

// Benchmarks measure real elapsed time; paused tokio time has no place here.
#![allow(clippy::disallowed_types)]

#[path = "common/mod.rs"]
mod common;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use futures::{FutureExt, StreamExt};
use meshkit::discovery::{Instance, MemoryRegistry, Registry, Update};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant};

/// Counts bytes allocated and not yet freed.
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments, adding only a count.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` shares.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const INSTANCES: usize = 10_000;

fn instance(service: &str, n: usize) -> Instance {
    Instance::builder(
        service,
        format!("10.{}.{}.{}", n / 65_536, (n / 256) % 256, n % 256),
        8080,
    )
    .tag("v2")
    .metadata("version", "2.4.1")
    .zone("eu-west-1a")
    .build()
    .unwrap()
}

/// A registry with 10 000 instances over `services` services; the registrations keep them.
fn filled(services: usize) -> (MemoryRegistry, Vec<meshkit::discovery::Registration>) {
    let registry = MemoryRegistry::new();
    let registrations = (0..INSTANCES)
        .map(|n| {
            let service = format!("svc-{}", n % services);
            registry
                .register(instance(&service, n))
                .now_or_never()
                .expect("the memory registry answers at once")
                .unwrap()
        })
        .collect();
    (registry, registrations)
}

fn naive(services: usize) -> RwLock<HashMap<String, Vec<Instance>>> {
    let mut map: HashMap<String, Vec<Instance>> = HashMap::new();
    for n in 0..INSTANCES {
        let service = format!("svc-{}", n % services);
        map.entry(service.clone())
            .or_default()
            .push(instance(&service, n));
    }
    RwLock::new(map)
}

fn memory_per_instance() {
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let (registry, registrations) = filled(100);
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    let per_instance = (after - before) as f64 / INSTANCES as f64;
    let lone = instance("svc-0", 1);
    eprintln!(
        "memory: {per_instance:.0} bytes per registered instance (10 000 over 100 services, \
         registrations included; the Instance struct itself is {} bytes plus its strings)",
        std::mem::size_of_val(&lone)
    );
    drop((registry, registrations));
}

fn snapshot_read(c: &mut Criterion) {
    memory_per_instance();
    let mut g = c.benchmark_group("discovery/snapshot_read");
    g.throughput(Throughput::Elements(1));
    for services in [100, 1] {
        let (registry, _keep) = filled(services);
        let layout = if services == 1 { "1x10000" } else { "100x100" };
        g.bench_function(format!("meshkit_snapshot/{layout}"), |b| {
            b.iter(|| black_box(registry.snapshot(black_box("svc-0"))))
        });
        g.bench_function(format!("meshkit_instances_trait/{layout}"), |b| {
            b.iter(|| {
                black_box(
                    registry
                        .instances(black_box("svc-0"))
                        .now_or_never()
                        .unwrap()
                        .unwrap(),
                )
            })
        });
        let naive = naive(services);
        g.bench_function(format!("naive_rwlock_clone/{layout}"), |b| {
            b.iter(|| {
                let map = naive.read().unwrap();
                black_box(map.get(black_box("svc-0")).cloned())
            })
        });
    }
    g.finish();
}

fn register_deregister(c: &mut Criterion) {
    let (registry, _keep) = filled(100);
    let mut g = c.benchmark_group("discovery/register_deregister");
    g.throughput(Throughput::Elements(1));
    let template = instance("svc-7", 20_000);
    g.bench_function("meshkit", |b| {
        // The instance is built outside the timed part: only register and deregister count.
        b.iter_batched(
            || {
                let mut fresh = template.clone();
                fresh.id = meshkit::discovery::InstanceId::new();
                fresh
            },
            |fresh| {
                let registration = registry.register(fresh).now_or_never().unwrap().unwrap();
                drop(black_box(registration));
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn change_to_watcher(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (registry, _keep) = filled(100);
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<Instant>();
    let mut watch = registry.watch("svc-3");
    runtime.spawn(async move {
        while let Some(update) = watch.next().await {
            if let Update::Upsert { .. } = update {
                let _ = seen_tx.send(Instant::now());
            }
        }
    });
    std::thread::sleep(Duration::from_millis(50));
    let template = instance("svc-3", 30_000);
    let mut g = c.benchmark_group("discovery/change_to_watcher");
    g.bench_function("meshkit", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut fresh = template.clone();
                fresh.id = meshkit::discovery::InstanceId::new();
                let started = Instant::now();
                let registration = registry.register(fresh).now_or_never().unwrap().unwrap();
                let seen = seen_rx.recv().unwrap();
                total += seen.saturating_duration_since(started);
                drop(registration);
            }
            total
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = snapshot_read, register_deregister, change_to_watcher
}
criterion_main!(benches);
