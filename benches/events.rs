//! Event bus throughput against raw `tokio::sync::broadcast`, and the memory event store.
//!
//! * `events/bus/<subscribers>/<payload>/raw` – `broadcast::Sender<Arc<Event<T>>>::send` and
//!   a `recv` on each receiver, per event.
//! * `events/bus/<subscribers>/<payload>/meshkit` – `EventBus::publish` and a `recv` on each
//!   `Subscription`, per event.
//!   Subscribers: 1 and 8; payloads: a `u64` and 256 bytes.
//! * `events/store/append_1` and `append_100` – `MemoryEventStore::append` of one event, and
//!   of a batch of 100 (per event), to a store that keeps growing through the run.
//! * `events/store/append_at/<n>` – one-event appends to a store already holding `n` events
//!   (10 000, 1 000 000 and 10 000 000): the cost must not grow with the store.
//! * `events/store/read_all` – `read_all` over 10 000 events (per event).
//!
//! Regenerate the table in BENCHMARKS.md with `cargo bench --bench events`.

// Benchmarks measure real elapsed time; paused tokio time has no place here.
#![allow(clippy::disallowed_types)]

#[path = "common/mod.rs"]
mod common;

use common::current_thread_rt;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::FutureExt;
use meshkit::events::{Event, EventBus, EventStore, ExpectedVersion, MemoryEventStore};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

fn bus<T: Clone + Send + Sync + 'static>(c: &mut Criterion, payload: &str, data: T) {
    let rt = current_thread_rt();
    for subscribers in [1usize, 8] {
        let mut g = c.benchmark_group(format!("events/bus/{subscribers}/{payload}"));
        g.throughput(Throughput::Elements(1));
        let template = Event::new("Measured", "bench", data.clone());
        g.bench_function("raw", |b| {
            let (sender, _) = broadcast::channel::<Arc<Event<T>>>(1024);
            let mut receivers: Vec<_> = (0..subscribers).map(|_| sender.subscribe()).collect();
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let _ = sender.send(Arc::new(template.clone()));
                        for receiver in &mut receivers {
                            receiver.recv().await.unwrap();
                        }
                    }
                    start.elapsed()
                })
            })
        });
        g.bench_function("meshkit", |b| {
            let bus = EventBus::<T>::new(1024);
            let mut subscriptions: Vec<_> = (0..subscribers).map(|_| bus.subscribe()).collect();
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let _ = bus.publish(template.clone());
                        for subscription in &mut subscriptions {
                            subscription.recv().await.unwrap();
                        }
                    }
                    start.elapsed()
                })
            })
        });
        g.finish();
    }
}

fn bus_groups(c: &mut Criterion) {
    bus(c, "u64", 7u64);
    bus(c, "256B", [7u8; 256].to_vec());
}

fn store(c: &mut Criterion) {
    let mut g = c.benchmark_group("events/store");
    let template = Event::new("Counted", "counter", json!({ "n": 1 }));
    // Each store is dropped before the next is filled, so no run appends beside another's
    // millions of events.
    for batch in [1, 100] {
        g.throughput(Throughput::Elements(batch as u64));
        let store = MemoryEventStore::new();
        g.bench_function(format!("append_{batch}"), |b| {
            b.iter_custom(|iters| appends(&store, &template, iters, batch))
        });
    }
    g.throughput(Throughput::Elements(1));
    for (label, size) in [("10k", 10_000), ("1M", 1_000_000), ("10M", 10_000_000)] {
        let big = filled(size);
        g.bench_function(format!("append_at/{label}"), |b| {
            b.iter_custom(|iters| appends(&big, &template, iters, 1))
        });
        if size == 1_000_000 {
            g.throughput(Throughput::Elements(10_000));
            g.bench_function("read_all", |b| {
                b.iter(|| big.read_all(1, 10_000).now_or_never().unwrap())
            });
            g.throughput(Throughput::Elements(1));
        }
    }
    g.finish();
}

/// Times `iters` appends of `batch` fresh copies of `template` each. The events are built
/// (untimed) just before they are appended, about 64 events at a time (64 single appends, or
/// one batch of 100), as a service appends events it has just created: building them all up
/// front would time cache misses on events made long before, which no caller sees.
fn appends(store: &MemoryEventStore, template: &Event, iters: u64, batch: usize) -> Duration {
    let per_chunk = (64 / batch).max(1) as u64;
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let chunk = left.min(per_chunk);
        left -= chunk;
        let inputs: Vec<Vec<Event>> = (0..chunk)
            .map(|_| {
                (0..batch)
                    .map(|_| {
                        let mut event = template.clone();
                        event.id = uuid::Uuid::now_v7();
                        event
                    })
                    .collect()
            })
            .collect();
        let start = Instant::now();
        for events in inputs {
            std::hint::black_box(
                store
                    .append("counter", ExpectedVersion::Any, events)
                    .now_or_never()
                    .unwrap()
                    .unwrap(),
            );
        }
        total += start.elapsed();
    }
    total
}

/// A store holding `size` events of one aggregate (small payloads: 10 M events must fit in
/// memory), appended in batches of 1 000.
fn filled(size: u64) -> MemoryEventStore {
    let store = MemoryEventStore::new();
    for batch in 0..size / 1_000 {
        let events = (0..1_000)
            .map(|n| Event::new("Counted", "counter", json!(batch * 1_000 + n)))
            .collect();
        store
            .append("counter", ExpectedVersion::Any, events)
            .now_or_never()
            .unwrap()
            .unwrap();
    }
    store
}

criterion_group! {
    name = benches;
    config = common::criterion().sample_size(20);
    targets = bus_groups, store
}
criterion_main!(benches);
