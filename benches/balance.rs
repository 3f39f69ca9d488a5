//! Balancer overhead per call over trivial endpoints, against tower's p2c.
//!
//! Every endpoint is the same always-ready service (`Trivial`); each variant is driven with
//! `ready().await`, `call`, `.await` on a `&mut` service, in one criterion run:
//!
//! * `balance/per_call/<n>/meshkit_*` – `meshkit::balance::Balance` with `RoundRobin`,
//!   `Random`, `LeastRequests`, `PeakEwma`, over `n` endpoints (8 and 1 000).
//! * `balance/per_call/<n>/tower_p2c_pending_requests` – `tower::balance::p2c::Balance` over
//!   the same endpoints wrapped in `PendingRequests`.
//! * `balance/per_call/<n>/raw` – one endpoint called directly.
//! * `balance/consistent_hash_lookup/10000` – a `ConsistentHash` pick at 10 000 endpoints.
//! * `balance/two_tasks` – `one_task/<v>` and `two_tasks/<v>` on a 2-worker runtime, 8
//!   endpoints; scaling = 2 × t(one_task) / t(two_tasks).
//!
//! Regenerate the table in BENCHMARKS.md with `cargo bench --bench balance`.

// Benchmarks measure real elapsed time; paused tokio time has no place here.
#![allow(clippy::disallowed_types)]

#[path = "common/mod.rs"]
mod common;

use common::*;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use meshkit::balance::{
    Balance, ConsistentHash, LeastRequests, PeakEwma, Picker, Random, RoundRobin,
};
use std::convert::Infallible;
use tower::discover::{Change, ServiceList};
use tower::load::{CompleteOnResponse, PendingRequests};

fn endpoints(
    n: usize,
) -> impl futures::Stream<Item = Result<Change<usize, Trivial>, Infallible>> + Unpin + Send {
    futures::stream::iter((0..n).map(|i| Ok(Change::Insert(i, Trivial))))
}

fn meshkit<P: Picker<u64> + Send>(
    n: usize,
    picker: P,
) -> impl FnOnce() -> Balance<Trivial, u64, P> {
    move || Balance::new(endpoints(n), picker)
}

type TowerP2c = tower::balance::p2c::Balance<ServiceList<Vec<PendingRequests<Trivial>>>, u64>;

fn tower_p2c(n: usize) -> impl FnOnce() -> TowerP2c {
    move || {
        let services = (0..n)
            .map(|_| PendingRequests::new(Trivial, CompleteOnResponse::default()))
            .collect::<Vec<_>>();
        tower::balance::p2c::Balance::new(ServiceList::new(services))
    }
}

fn per_call(c: &mut Criterion) {
    let rt = current_thread_rt();
    for n in [8, 1_000] {
        let mut g = c.benchmark_group(format!("balance/per_call/{n}"));
        g.throughput(Throughput::Elements(1));
        bench_single(&mut g, &rt, "raw", || Trivial);
        bench_single(&mut g, &rt, "meshkit_round_robin", meshkit(n, RoundRobin));
        bench_single(&mut g, &rt, "meshkit_random", meshkit(n, Random::new()));
        bench_single(
            &mut g,
            &rt,
            "meshkit_least_requests",
            meshkit(n, LeastRequests::default()),
        );
        bench_single(
            &mut g,
            &rt,
            "meshkit_peak_ewma",
            meshkit(n, PeakEwma::default()),
        );
        bench_single(&mut g, &rt, "tower_p2c_pending_requests", tower_p2c(n));
        g.finish();
    }
}

fn consistent_hash_lookup(c: &mut Criterion) {
    let picker = ConsistentHash::new(|key: &u64| *key);
    let keys: Vec<u64> = (0..10_000u64)
        .map(|k| k.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect();
    let ring = <ConsistentHash<_> as Picker<u64>>::prepare(&picker, &[], &keys);
    let loads = meshkit::balance::EndpointLoads::new(vec![1u32; 10_000]);
    let mut g = c.benchmark_group("balance/consistent_hash_lookup");
    g.throughput(Throughput::Elements(1));
    let mut key = 0u64;
    g.bench_function("10000", |b| {
        b.iter(|| {
            key = key.wrapping_add(1);
            black_box(picker.pick(black_box(&key), &loads, &ring, &mut ()))
        })
    });
    g.finish();
}

fn two_tasks(c: &mut Criterion) {
    let rt = multi_thread_rt();
    let mut g = c.benchmark_group("balance/two_tasks");
    for (tasks, label) in [(1, "one_task"), (2, "two_tasks")] {
        g.throughput(Throughput::Elements(tasks as u64));
        let id = |name: &str| format!("{label}/{name}");
        bench_tasks(&mut g, &rt, &id("raw"), tasks, || Trivial);
        bench_tasks(
            &mut g,
            &rt,
            &id("meshkit_round_robin"),
            tasks,
            meshkit(8, RoundRobin),
        );
        bench_tasks(
            &mut g,
            &rt,
            &id("meshkit_least_requests"),
            tasks,
            meshkit(8, LeastRequests::default()),
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = per_call, consistent_hash_lookup, two_tasks
}
criterion_main!(benches);
