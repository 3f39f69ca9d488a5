//! meshkit stacks over real HTTP: axum servers on 127.0.0.1 and a `reqwest::Client` leaf
//! (the `reqwest` feature).
#![cfg(feature = "reqwest")]

use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use meshkit::balance::{Balance, RoundRobin};
use meshkit::discovery::{discover, Instance, MemoryRegistry, Registry};
use meshkit::http::{Endpoint, HttpClassifier, HttpReplay};
use meshkit::retry::{RetryConfig, RetryLayer};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

/// Serves `app` on an OS-chosen port of 127.0.0.1; returns the port and the server's task.
async fn serve(app: axum::Router) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, task)
}

fn retry() -> RetryLayer<HttpClassifier, HttpReplay> {
    let config: RetryConfig = serde_json::from_value(serde_json::json!({
        "max_attempts": 3,
        "backoff": { "kind": "constant", "base": "1ms", "jitter": "none" },
        "budget": "unlimited",
    }))
    .unwrap();
    RetryLayer::new(config)
        .unwrap()
        .classify(HttpClassifier::default())
        .replay(HttpReplay::default())
}

/// A route that answers 503 with `Retry-After: 1` the first time, then 200; counts calls.
fn busy_once(calls: Arc<AtomicUsize>) -> axum::Router {
    let handler = move || {
        let calls = calls.clone();
        async move {
            let mut headers = HeaderMap::new();
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                headers.insert("retry-after", "1".parse().unwrap());
                (StatusCode::SERVICE_UNAVAILABLE, headers, "busy")
            } else {
                (StatusCode::OK, headers, "ok")
            }
        }
    };
    axum::Router::new()
        .route("/users", get(handler.clone()))
        .route("/users", post(handler))
}

/// Sends one `method` request through a retrying reqwest client to a fresh [`busy_once`]
/// server: the response, how many calls the server saw, and how long it took.
async fn through_retries_to_busy_once(
    method: reqwest::Method,
) -> (reqwest::Response, usize, Duration) {
    let calls = Arc::new(AtomicUsize::new(0));
    let (port, _server) = serve(busy_once(calls.clone())).await;
    let mut client = ServiceBuilder::new()
        .layer(retry())
        .service(reqwest::Client::new());
    let url = format!("http://127.0.0.1:{port}/users").parse().unwrap();
    let started = Instant::now();
    let response = client
        .ready()
        .await
        .unwrap()
        .call(reqwest::Request::new(method, url))
        .await
        .unwrap();
    (response, calls.load(Ordering::SeqCst), started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_from_a_real_server_is_honoured() {
    let (response, calls, took) = through_retries_to_busy_once(reqwest::Method::GET).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(calls, 2);
    // The 1 ms backoff is overridden by the server's one second.
    assert!(took >= Duration::from_secs(1), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_sent_once_and_its_response_returned_as_is() {
    let (response, calls, _) = through_retries_to_busy_once(reqwest::Method::POST).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(calls, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_over_to_a_live_instance_when_one_dies() {
    let registry = MemoryRegistry::new();
    let mut servers = Vec::new();
    let mut registrations = Vec::new();
    for name in ["a", "b"] {
        let app = axum::Router::new().route("/whoami", get(move || async move { name }));
        let (port, task) = serve(app).await;
        servers.push(task);
        registrations.push(
            registry
                .register(
                    Instance::builder("users", "127.0.0.1", port)
                        .build()
                        .unwrap(),
                )
                .await
                .unwrap(),
        );
    }
    // No pooled connections: once a server stops listening, it is gone for the client too
    // (axum keeps serving connections it already accepted).
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let endpoints = discover(&registry, "users", move |instance: &Instance| {
        Endpoint::for_instance(client.clone(), instance).unwrap()
    });
    let balance = Balance::new(endpoints, RoundRobin);
    let mut users = ServiceBuilder::new().layer(retry()).service(balance);
    let whoami =
        || reqwest::Request::new(reqwest::Method::GET, "http://users/whoami".parse().unwrap());
    let mut answers = Vec::new();
    for _ in 0..4 {
        let response = users.ready().await.unwrap().call(whoami()).await.unwrap();
        answers.push(response.text().await.unwrap());
    }
    answers.sort();
    assert_eq!(answers, ["a", "a", "b", "b"], "round robin over both");

    // Instance "a" dies without deregistering: its connections are refused from now on.
    servers[0].abort();
    let _ = (&mut servers[0]).await;
    for _ in 0..10 {
        let response = users.ready().await.unwrap().call(whoami()).await.unwrap();
        assert_eq!(response.text().await.unwrap(), "b");
    }
}

/// A port of 127.0.0.1 that refuses connections: bound, then let go.
async fn refusing_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_refused_a_connection_is_sent_to_another_instance_once() {
    let posts = Arc::new(AtomicUsize::new(0));
    let counted = posts.clone();
    let app = axum::Router::new().route(
        "/orders",
        post(move || {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                (StatusCode::CREATED, "created")
            }
        }),
    );
    let (live, _server) = serve(app).await;
    let dead = refusing_port().await;
    let registry = MemoryRegistry::new();
    let mut registrations = Vec::new();
    for port in [dead, live] {
        let instance = Instance::builder("orders", "127.0.0.1", port)
            .build()
            .unwrap();
        registrations.push(registry.register(instance).await.unwrap());
    }
    let client = reqwest::Client::new();
    let endpoints = discover(&registry, "orders", move |instance: &Instance| {
        Endpoint::for_instance(client.clone(), instance).unwrap()
    });
    let mut orders = ServiceBuilder::new()
        .layer(retry())
        .service(Balance::new(endpoints, RoundRobin));
    let create = || {
        let mut request = reqwest::Request::new(
            reqwest::Method::POST,
            "http://orders/orders".parse().unwrap(),
        );
        *request.body_mut() = Some("{}".into());
        request
    };
    for _ in 0..10 {
        let response = orders.ready().await.unwrap().call(create()).await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    // Half of them went first to the dead instance: never sent there, sent once to the live one.
    assert_eq!(
        posts.load(Ordering::SeqCst),
        10,
        "each POST created one order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_recognised_as_never_sent() {
    let dead = refusing_port().await;
    let mut client = ServiceBuilder::new()
        .layer(retry())
        .service(reqwest::Client::new());
    let url = format!("http://127.0.0.1:{dead}/orders").parse().unwrap();
    let error = client
        .ready()
        .await
        .unwrap()
        .call(reqwest::Request::new(reqwest::Method::POST, url))
        .await
        .unwrap_err();
    assert!(error.is_connect(), "{error}");
    assert!(meshkit::error::is_unsent(&error));
}
