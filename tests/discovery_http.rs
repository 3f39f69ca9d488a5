//! HTTP health checks against a real axum server on 127.0.0.1 (the `http` feature).
#![cfg(feature = "http")]

mod support;

use axum::http::StatusCode;
use axum::routing::get;
use meshkit::discovery::{Health, HealthCheck, Instance, MemoryRegistry, Registry};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test]
async fn http_checks_follow_the_status_a_real_server_returns() {
    let status = Arc::new(AtomicU16::new(200));
    let app = axum::Router::new().route(
        "/health",
        get({
            let status = status.clone();
            move || async move { StatusCode::from_u16(status.load(Ordering::SeqCst)).unwrap() }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let registry = MemoryRegistry::new();
    let check = HealthCheck::Http {
        path: "/health".into(),
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(100),
        failures_before_critical: 2,
        successes_before_passing: 2,
    };
    let mut watch = registry.watch("users");
    let users = registry
        .register(
            Instance::builder("users", "127.0.0.1", port)
                .check(check)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        registry.snapshot("users").get(&users.id()).unwrap().health,
        Health::Unknown
    );

    support::next_health(&mut watch, Health::Passing).await;
    status.store(500, Ordering::SeqCst);
    support::next_health(&mut watch, Health::Critical).await;
    status.store(429, Ordering::SeqCst);
    support::next_health(&mut watch, Health::Warning).await;
    status.store(200, Ordering::SeqCst);
    support::next_health(&mut watch, Health::Passing).await;
}

#[tokio::test]
async fn an_http_check_on_a_closed_port_turns_critical() {
    // Bind and drop: the port is (almost certainly) closed now.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let registry = MemoryRegistry::new();
    let check = HealthCheck::Http {
        path: "/health".into(),
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(100),
        failures_before_critical: 1,
        successes_before_passing: 1,
    };
    let mut watch = registry.watch("users");
    let _users = registry
        .register(
            Instance::builder("users", "127.0.0.1", port)
                .check(check)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    support::next_health(&mut watch, Health::Critical).await;
}
