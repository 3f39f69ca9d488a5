//! meshkit on the server side of a real axum service: protection layers on a `Router` and
//! meshkit's errors as responses (the `axum` and `reqwest` features).
#![cfg(all(feature = "axum", feature = "reqwest"))]

use axum::http::StatusCode;
use axum::routing::get;
use meshkit::breaker::{BreakerState, CircuitOpen};
use meshkit::http::ErrorResponseLayer;
use meshkit::limit::{ConcurrencyLimitLayer, RateLimitConfig, RateLimitLayer};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tower::ServiceBuilder;

async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{address}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_router_answers_429_with_retry_after() {
    let app = axum::Router::new()
        .route("/users", get(|| async { "ok" }))
        .layer(
            ServiceBuilder::new()
                .layer(ErrorResponseLayer::new())
                .layer(
                    RateLimitLayer::new(RateLimitConfig {
                        rate: 0.5,
                        burst: 2,
                    })
                    .unwrap(),
                ),
        );
    let base = serve(app).await;
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    let mut hint = None;
    for _ in 0..3 {
        let response = client.get(format!("{base}/users")).send().await.unwrap();
        statuses.push(response.status());
        hint = response.headers().get("retry-after").cloned();
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    // One request every two seconds: the next is admitted in (1, 2] seconds, rounded up.
    assert_eq!(hint.unwrap(), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_limited_router_answers_503_beyond_its_limit() {
    let release = Arc::new(Notify::new());
    let entered = Arc::new(Notify::new());
    let app = axum::Router::new()
        .route(
            "/slow",
            get({
                let (release, entered) = (release.clone(), entered.clone());
                move || async move {
                    entered.notify_one();
                    release.notified().await;
                    "done"
                }
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(ErrorResponseLayer::new())
                .layer(ConcurrencyLimitLayer::new(1).unwrap()),
        );
    let base = serve(app).await;
    let client = reqwest::Client::new();
    let first = tokio::spawn(client.get(format!("{base}/slow")).send());
    entered.notified().await;
    let second = client.get(format!("{base}/slow")).send().await.unwrap();
    assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
    release.notify_one();
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
    // The permit came back with the first response.
    let third = tokio::spawn(client.get(format!("{base}/slow")).send());
    entered.notified().await;
    release.notify_one();
    assert_eq!(third.await.unwrap().unwrap().status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshkit_errors_returned_by_handlers_become_responses() {
    let app = axum::Router::new().route(
        "/open",
        get(|| async {
            Err::<&'static str, _>(CircuitOpen::new(
                BreakerState::Open,
                Duration::from_millis(2_500),
            ))
        }),
    );
    let base = serve(app).await;
    let response = reqwest::get(format!("{base}/open")).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "3");
}
