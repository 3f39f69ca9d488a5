//! Event bus throughput against raw `tokio::sync::broadcast`, and the memory event store.
//!
//! * `events/bus/<subscribers>/<payload>/raw` – `broadcast::Sender<Arc<Event<T>>>::send` and
//!   a `recv` on each receiver, per event.
//! * `events/bus/<subscribers>/<payload>/meshkit` – `EventBus::publish` and a `recv` on each
//!   `Subscription`, per event.
//!   Subscribers: 1 and 8; payloads: a `u64` and 256 bytes.
//! * `events/store/append_1` and `append_100` – `MemoryEventStore::append` of one event, and
//!   of a batch of 100 (per event), to a store that keeps growing through the run.
//! * `events/store/append_after_1M` – one-event appends to a store already holding 1 000 000.
//! * `events/store/read_all` – `read_all` over 10 000 events (per event).
//!
//! Regenerate the table in BENCHMARKS.md with `cargo bench --bench events`.

// Benchmarks measure real elapsed time; paused tokio time has no place here.
#![allow(clippy::disallowed_types)]

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use futures::FutureExt;
use meshkit::events::{Event, EventBus, EventStore, ExpectedVersion, MemoryEventStore};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn bus<T: Clone + Send + Sync + 'static>(c: &mut Criterion, payload: &str, data: T) {
    let rt = runtime();
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
    let fresh = |template: &Event| {
        let mut event = template.clone();
        event.id = uuid::Uuid::now_v7();
        event
    };
    g.throughput(Throughput::Elements(1));
    let store = MemoryEventStore::new();
    g.bench_function("append_1", |b| {
        b.iter_batched(
            || vec![fresh(&template)],
            |events| {
                store
                    .append("counter", ExpectedVersion::Any, events)
                    .now_or_never()
                    .unwrap()
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Elements(100));
    let store = MemoryEventStore::new();
    g.bench_function("append_100", |b| {
        b.iter_batched(
            || (0..100).map(|_| fresh(&template)).collect::<Vec<_>>(),
            |events| {
                store
                    .append("counter", ExpectedVersion::Any, events)
                    .now_or_never()
                    .unwrap()
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Elements(1));
    let big = MemoryEventStore::new();
    for _ in 0..10_000 {
        let batch = (0..100).map(|_| fresh(&template)).collect();
        big.append("counter", ExpectedVersion::Any, batch)
            .now_or_never()
            .unwrap()
            .unwrap();
    }
    g.bench_function("append_after_1M", |b| {
        b.iter_batched(
            || vec![fresh(&template)],
            |events| {
                big.append("counter", ExpectedVersion::Any, events)
                    .now_or_never()
                    .unwrap()
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("read_all", |b| {
        b.iter(|| big.read_all(1, 10_000).now_or_never().unwrap())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    targets = bus_groups, store
}
criterion_main!(benches);
