//! Retry overhead: a call that succeeds on its first try, with and without a budget.
//!
//! Every variant wraps the same always-ready service (`TrivialBoxed`, which answers at once)
//! and runs in one criterion run, so the ratios between them are what to read:
//!
//! * `raw` – the service alone.
//! * `meshkit` – `RetryLayer::new(RetryConfig::default())`: 3 attempts, exponential backoff,
//!   the default budget (ratio 0.2, 10/s, 10 s) on.
//! * `meshkit_unlimited` – the same with `budget: "unlimited"`.
//! * `tower_never` – `tower::retry::Retry` with a policy that clones the request and never
//!   retries (no budget).
//! * `tower_tps_budget` – `tower::retry::Retry` whose policy deposits into a `TpsBudget`
//!   (ratio 0.2, 10/s, 10 s) on success, as tower's docs show.
//! * `tower_resilience` – tower-resilience 0.13 retry, 3 attempts, exponential backoff (it
//!   boxes its future; no budget).
//! * `tower_resilience_budget` – the same with its token-bucket budget.
//!
//! Groups: `retry/first_try_single_task` (per call on a current-thread runtime) and
//! `retry/first_try_two_tasks` (a 2-worker runtime: `one_task/<v>` is one spawned task doing
//! `iters` calls, `two_tasks/<v>` two tasks with a clone each doing `iters` calls; scaling is
//! `2 × t(one_task) / t(two_tasks)`).
//!
//! Regenerate the table in BENCHMARKS.md with `cargo bench --bench retry`.

// Benchmarks measure real elapsed time; paused tokio time has no place here.
#![allow(clippy::disallowed_types)]

#[path = "common/mod.rs"]
mod common;

use common::*;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use meshkit::retry::{BudgetConfig, RetryConfig, RetryLayer};
use std::future::Ready;
use std::sync::Arc;
use std::time::Duration;
use tower::retry::budget::{Budget, TpsBudget};
use tower::{BoxError, Layer};

/// A tower policy that never retries; with a budget, it deposits on success.
#[derive(Clone)]
struct NeverRetry(Option<Arc<TpsBudget>>);

impl tower::retry::Policy<u64, u64, BoxError> for NeverRetry {
    type Future = Ready<()>;

    fn retry(&mut self, _: &mut u64, result: &mut Result<u64, BoxError>) -> Option<Ready<()>> {
        if let (Some(budget), Ok(_)) = (&self.0, result) {
            budget.deposit();
        }
        None
    }

    fn clone_request(&mut self, request: &u64) -> Option<u64> {
        Some(*request)
    }
}

fn meshkit(budget: BudgetConfig) -> impl FnOnce() -> meshkit::retry::Retry<TrivialBoxed> {
    move || {
        let config = RetryConfig {
            budget,
            ..RetryConfig::default()
        };
        RetryLayer::new(config).unwrap().layer(TrivialBoxed)
    }
}

fn tower_never() -> tower::retry::Retry<NeverRetry, TrivialBoxed> {
    tower::retry::Retry::new(NeverRetry(None), TrivialBoxed)
}

fn tower_tps_budget() -> tower::retry::Retry<NeverRetry, TrivialBoxed> {
    let budget = TpsBudget::new(Duration::from_secs(10), 10, 0.2);
    tower::retry::Retry::new(NeverRetry(Some(Arc::new(budget))), TrivialBoxed)
}

type TowerResilience = tower_resilience::retry::Retry<TrivialBoxed, u64, u64, BoxError>;

fn tower_resilience(with_budget: bool) -> impl FnOnce() -> TowerResilience {
    move || {
        let mut builder = tower_resilience::retry::RetryLayer::<u64, u64, BoxError>::builder()
            .max_attempts(3)
            .exponential_backoff(Duration::from_millis(50));
        if with_budget {
            let budget = tower_resilience::retry::RetryBudgetBuilder::new()
                .token_bucket()
                .tokens_per_second(10.0)
                .max_tokens(100)
                .build()
                .unwrap();
            builder = builder.budget(budget);
        }
        builder.build().layer(TrivialBoxed)
    }
}

fn first_try_single_task(c: &mut Criterion) {
    let rt = current_thread_rt();
    let mut g = c.benchmark_group("retry/first_try_single_task");
    g.throughput(Throughput::Elements(1));
    bench_single(&mut g, &rt, "raw", || TrivialBoxed);
    bench_single(&mut g, &rt, "meshkit", meshkit(BudgetConfig::default()));
    bench_single(
        &mut g,
        &rt,
        "meshkit_unlimited",
        meshkit(BudgetConfig::Unlimited),
    );
    bench_single(&mut g, &rt, "tower_never", tower_never);
    bench_single(&mut g, &rt, "tower_tps_budget", tower_tps_budget);
    bench_single(&mut g, &rt, "tower_resilience", tower_resilience(false));
    bench_single(
        &mut g,
        &rt,
        "tower_resilience_budget",
        tower_resilience(true),
    );
    g.finish();
}

fn first_try_two_tasks(c: &mut Criterion) {
    let rt = multi_thread_rt();
    let mut g = c.benchmark_group("retry/first_try_two_tasks");
    for (tasks, label) in [(1, "one_task"), (2, "two_tasks")] {
        g.throughput(Throughput::Elements(tasks as u64));
        let id = |name: &str| format!("{label}/{name}");
        bench_tasks(&mut g, &rt, &id("raw"), tasks, || TrivialBoxed);
        bench_tasks(
            &mut g,
            &rt,
            &id("meshkit"),
            tasks,
            meshkit(BudgetConfig::default()),
        );
        bench_tasks(&mut g, &rt, &id("tower_never"), tasks, tower_never);
        bench_tasks(
            &mut g,
            &rt,
            &id("tower_tps_budget"),
            tasks,
            tower_tps_budget,
        );
        bench_tasks(
            &mut g,
            &rt,
            &id("tower_resilience"),
            tasks,
            tower_resilience(false),
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = first_try_single_task, first_try_two_tasks
}
criterion_main!(benches);
