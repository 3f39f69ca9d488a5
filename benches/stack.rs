//! The full client stack a `Mesh` builds, per call and over loopback HTTP.
//!
//! * `stack/per_call/raw` – the trivial always-ready service, called directly.
//! * `stack/per_call/tower_p2c_timeout` – tower's `Timeout` over `p2c::Balance` over
//!   `PendingRequests`, 8 endpoints: what tower alone offers.
//! * `stack/per_call/meshkit_mesh_client` – `Mesh::client_with` over 8 registered instances
//!   of the same service: discovery, balance (least requests) with outlier ejection, breaker,
//!   retry (budget on), timeout, as configured by `MeshConfig`.
//! * `stack/two_tasks/{one_task,two_tasks}/{raw,meshkit_mesh_client}` – the same with one
//!   task, then two tasks on a two-worker runtime, each calling its own clone of one client;
//!   scaling = 2 × t(one task) / t(two tasks).
//! * `stack/http_in_process/{raw,meshkit}` – the HTTP path without a network: a leaf that
//!   answers at once, alone and as the leaf of `Mesh::client`.
//! * `stack/http_in_process_pending/{raw,meshkit}` – the same with a leaf that yields once
//!   before answering, as a network call does: the timeout arms its timer.
//! * `stack/http/raw_hyper` and `stack/http/meshkit_hyper` – requests per second over
//!   loopback HTTP/1 to an axum server (its own runtime and thread), 16 in flight, with a
//!   hyper-util client alone and as the leaf of `Mesh::client`; then `stack/http/alternating`
//!   prints the median ratio of the two over rounds that alternate them, and
//!   `stack/http/alternating_host_set` the same with requests that carry their own `Host`
//!   (the client then derives none, on either side: the mesh's own cost alone).
//!
//! Regenerate the table in BENCHMARKS.md with `cargo bench --bench stack`.

// Benchmarks measure real elapsed time; paused tokio time has no place here.
#![allow(clippy::disallowed_types)]

#[path = "common/mod.rs"]
mod common;

use bytes::Bytes;
use common::*;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http_body_util::Empty;
use meshkit::classify::DefaultClassifier;
use meshkit::discovery::Instance;
use meshkit::retry::CloneRequest;
use meshkit::{Mesh, MeshClient, MeshConfig};
use std::time::{Duration, Instant};
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PendingRequests};
use tower::{Service, ServiceExt};

const CONFIG: &str = r#"
[services.users]
timeout = "10s"
balance = { picker = "least_requests", ejection = { failures = 5 } }
breaker = { failure_rate = 0.5, minimum_calls = 20 }
retry = { max_attempts = 3 }
"#;

/// A mesh configured by `CONFIG` with an instance of "users" on each of `ports`. A client
/// outlives it: the client holds the registry it discovers from.
async fn mesh(ports: impl IntoIterator<Item = u16>) -> Mesh {
    let mesh = Mesh::builder()
        .config(MeshConfig::from_toml(CONFIG).unwrap())
        .build()
        .unwrap();
    for port in ports {
        mesh.register(
            Instance::builder("users", "127.0.0.1", port)
                .build()
                .unwrap(),
        )
        .await
        .unwrap()
        .forget();
    }
    mesh
}

/// Eight instances (never connected to: their endpoints are in-process services).
const EIGHT: std::ops::Range<u16> = 10_000..10_008;

fn mesh_client() -> MeshClient<u64, u64> {
    futures::executor::block_on(mesh(EIGHT))
        .client_with(
            "users",
            |_: &Instance| Trivial,
            DefaultClassifier,
            CloneRequest,
        )
        .unwrap()
}

type TowerStack = tower::timeout::Timeout<
    tower::balance::p2c::Balance<ServiceList<Vec<PendingRequests<Trivial>>>, u64>,
>;

fn tower_stack() -> TowerStack {
    let services = (0..8)
        .map(|_| PendingRequests::new(Trivial, CompleteOnResponse::default()))
        .collect::<Vec<_>>();
    tower::timeout::Timeout::new(
        tower::balance::p2c::Balance::new(ServiceList::new(services)),
        Duration::from_secs(10),
    )
}

fn per_call(c: &mut Criterion) {
    let rt = current_thread_rt();
    let mut g = c.benchmark_group("stack/per_call");
    g.throughput(Throughput::Elements(1));
    bench_single(&mut g, &rt, "raw", || Trivial);
    bench_single(&mut g, &rt, "tower_p2c_timeout", tower_stack);
    bench_single(&mut g, &rt, "meshkit_mesh_client", mesh_client);
    g.finish();

    // Two tasks on two workers, each with its own clone of one client (as the tasks of a
    // multi-threaded service share one): the calls of different clones must not contend.
    let rt2 = multi_thread_rt();
    let mut g = c.benchmark_group("stack/two_tasks");
    for (name, tasks, elements) in [("one_task", 1, 1), ("two_tasks", 2, 2)] {
        g.throughput(Throughput::Elements(elements));
        bench_tasks(&mut g, &rt2, &format!("{name}/raw"), tasks, || Trivial);
        bench_tasks(
            &mut g,
            &rt2,
            &format!("{name}/meshkit_mesh_client"),
            tasks,
            mesh_client,
        );
    }
    g.finish();

    // The HTTP path without a network: a leaf that answers at once, called raw and through
    // `Mesh::client` (URI rewrite, request copy for retries, HTTP classification).
    http_in_process(
        c,
        &rt,
        "stack/http_in_process",
        tower::service_fn(|_: http::Request<()>| {
            std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(())))
        }),
    );
    // The same, with a leaf that is not ready at once (it yields once before answering, as
    // every network call does): the timeout arms its timer and the layers take their slow
    // paths.
    http_in_process(
        c,
        &rt,
        "stack/http_in_process_pending",
        tower::service_fn(|_: http::Request<()>| async {
            tokio::task::yield_now().await;
            Ok::<_, std::convert::Infallible>(http::Response::new(()))
        }),
    );
}

/// `group/raw` calls `leaf` directly, `group/meshkit` through `Mesh::client` over 8
/// instances; each call sends a freshly built `http::Request<()>`.
fn http_in_process<L>(c: &mut Criterion, rt: &tokio::runtime::Runtime, group: &str, leaf: L)
where
    L: Service<http::Request<()>, Response = http::Response<()>, Error = std::convert::Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    L::Future: Send,
{
    async fn drive_http<S>(service: &mut S, iters: u64) -> Duration
    where
        S: Service<http::Request<()>, Response = http::Response<()>>,
        S::Error: std::fmt::Debug,
    {
        let start = Instant::now();
        for _ in 0..iters {
            let request = http::Request::get("http://users/users/7").body(()).unwrap();
            let response = service.ready().await.unwrap().call(request).await.unwrap();
            criterion::black_box(response);
        }
        start.elapsed()
    }
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(1));
    let mut raw = leaf.clone();
    g.bench_function("raw", |b| {
        b.iter_custom(|iters| rt.block_on(drive_http(&mut raw, iters)))
    });
    let mut client = rt.block_on(async { mesh(EIGHT).await.client("users", leaf).unwrap() });
    g.bench_function("meshkit", |b| {
        b.iter_custom(|iters| rt.block_on(drive_http(&mut client, iters)))
    });
    g.finish();
}

/// An axum server on its own thread and runtime; returns its port.
fn server() -> u16 {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = current_thread_rt();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap().port()).unwrap();
            let app =
                axum::Router::new().route("/users/{id}", axum::routing::get(|| async { "ok" }));
            axum::serve(listener, app).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

/// Sends `total` GETs, `in_flight` at a time, each on a clone of `client`; each request
/// carries `host` as its `Host` header when one is given.
async fn load<S>(
    client: S,
    total: u64,
    in_flight: u64,
    base: &str,
    host: Option<&http::HeaderValue>,
) -> Duration
where
    S: Service<http::Request<meshkit::http::ReplayBody<Empty<Bytes>>>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
    S::Response: Send,
{
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..in_flight {
        let (mut client, base, host) = (client.clone(), base.to_owned(), host.cloned());
        tasks.spawn(async move {
            let mut n = worker;
            while n < total {
                let mut request = http::Request::get(format!("{base}/users/{n}"));
                if let Some(host) = &host {
                    request = request.header(http::header::HOST, host.clone());
                }
                let request = request
                    .body(meshkit::http::ReplayBody::buffered(Bytes::new()))
                    .unwrap();
                client.ready().await.unwrap().call(request).await.unwrap();
                n += in_flight;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    started.elapsed()
}

/// Runs `raw` and `mesh` (each returns the time of one round of the same load) alternately,
/// round after round, so that both see the same machine, and prints the median of the
/// per-round throughput ratios. Short rounds keep the machine's drift within a pair small;
/// which load goes first alternates, so neither always runs second.
fn alternate(name: &str, raw: impl Fn() -> Duration, mesh: impl Fn() -> Duration) {
    const ROUNDS: usize = 101;
    let mut ratios: Vec<f64> = (0..ROUNDS)
        .map(|round| {
            let (raw_time, mesh_time) = if round % 2 == 0 {
                let raw_time = raw();
                (raw_time, mesh())
            } else {
                let mesh_time = mesh();
                (raw(), mesh_time)
            };
            raw_time.as_secs_f64() / mesh_time.as_secs_f64()
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    println!(
        "{name}: mesh / raw requests per second over {ROUNDS} rounds of {PER_ROUND}: \
         median {:.3}, min {:.3}, max {:.3}",
        ratios[ROUNDS / 2],
        ratios[0],
        ratios[ROUNDS - 1]
    );
}

/// Requests per round of an alternating comparison.
const PER_ROUND: u64 = 5_000;

fn http(c: &mut Criterion) {
    let port = server();
    let rt = current_thread_rt();
    let mut g = c.benchmark_group("stack/http");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    let hyper_client = || {
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<meshkit::http::ReplayBody<Empty<Bytes>>>()
    };
    let raw = rt.block_on(async { hyper_client() });
    let base = format!("http://127.0.0.1:{port}");
    g.bench_function("raw_hyper", |b| {
        b.iter_custom(|iters| rt.block_on(load(raw.clone(), iters, 16, &base, None)))
    });
    let meshed = rt.block_on(async { mesh([port]).await.client("users", hyper_client()).unwrap() });
    g.bench_function("meshkit_hyper", |b| {
        b.iter_custom(|iters| rt.block_on(load(meshed.clone(), iters, 16, "http://users", None)))
    });
    g.finish();

    // The same two loads alternated: requests as a caller writes them, without `Host`
    // (hyper-util derives it from the URI; the mesh's endpoint sets the instance's, made
    // once); then with a `Host` the caller sets, so that the client does the same work on
    // both sides and the difference is the mesh's own (which then includes copying a
    // header map for replay).
    let raw_load = |host| rt.block_on(load(raw.clone(), PER_ROUND, 16, &base, host));
    let mesh_load = |host| rt.block_on(load(meshed.clone(), PER_ROUND, 16, "http://users", host));
    alternate(
        "stack/http/alternating",
        || raw_load(None),
        || mesh_load(None),
    );
    let host = http::HeaderValue::try_from(format!("127.0.0.1:{port}")).unwrap();
    alternate(
        "stack/http/alternating_host_set",
        || raw_load(Some(&host)),
        || mesh_load(Some(&host)),
    );
}

criterion_group! {
    name = benches;
    config = common::criterion()
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    targets = per_call, http
}
criterion_main!(benches);
