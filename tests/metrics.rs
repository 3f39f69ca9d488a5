//! meshkit's metrics through the `metrics` facade, read back from a Prometheus recorder.

use meshkit::discovery::Instance;
use meshkit::{Mesh, MeshConfig};
use metrics_exporter_prometheus::PrometheusBuilder;
use std::time::Duration;
use tower::{Service, ServiceExt};

/// The value of the sample `series` (name and labels as Prometheus prints them).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_system_events_are_counted_under_the_documented_names() {
    let prometheus = PrometheusBuilder::new().install_recorder().unwrap();
    meshkit::metrics::describe();
    let config = MeshConfig::from_toml(
        r#"
        [defaults.retry]
        max_attempts = 2
        backoff = { kind = "constant", base = "1ms", jitter = "none" }
        [defaults.breaker]
        minimum_calls = 4
        window = { kind = "count", size = 4 }
        "#,
    )
    .unwrap();
    let mesh = Mesh::builder().config(config).build().unwrap();
    for service in ["users", "broken"] {
        mesh.register(
            Instance::builder(service, "10.0.0.7", 8080)
                .build()
                .unwrap(),
        )
        .await
        .unwrap()
        .forget();
    }
    let ok = tower::service_fn(|_: http::Request<()>| async {
        Ok::<_, std::io::Error>(http::Response::new(()))
    });
    let failing = tower::service_fn(|_: http::Request<()>| async {
        Ok::<_, std::io::Error>(http::Response::builder().status(500).body(()).unwrap())
    });
    let mut users = mesh.client("users", ok).unwrap();
    let mut broken = mesh.client("broken", failing).unwrap();
    let get = || http::Request::get("http://any/").body(()).unwrap();
    for _ in 0..5 {
        users.ready().await.unwrap().call(get()).await.unwrap();
    }
    // Two tries each: the breaker (4 calls, all failed) opens after the second request.
    let mut rejected = 0;
    for _ in 0..3 {
        if broken.ready().await.unwrap().call(get()).await.is_err() {
            rejected += 1;
        }
    }
    assert_eq!(rejected, 1);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let text = prometheus.render();
    let value =
        |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series} in\n{text}"));
    assert_eq!(
        value(r#"meshkit_requests_total{service="users",outcome="success"}"#),
        5.0
    );
    assert_eq!(
        value(r#"meshkit_requests_total{service="broken",outcome="failure"}"#),
        2.0
    );
    assert_eq!(
        value(r#"meshkit_requests_total{service="broken",outcome="rejected"}"#),
        1.0
    );
    assert_eq!(
        value(r#"meshkit_request_duration_seconds_count{service="users"}"#),
        5.0
    );
    assert_eq!(value(r#"meshkit_requests_in_flight{service="users"}"#), 0.0);
    assert_eq!(value(r#"meshkit_retries_total{service="broken"}"#), 2.0);
    assert_eq!(
        value(r#"meshkit_retries_exhausted_total{service="broken"}"#),
        2.0
    );
    assert_eq!(
        value(r#"meshkit_breaker_transitions_total{breaker="broken",to="open"}"#),
        1.0
    );
    assert_eq!(value(r#"meshkit_breaker_state{breaker="broken"}"#), 1.0);
    assert_eq!(
        value(r#"meshkit_instances_registered_total{service="users"}"#),
        1.0
    );
    assert!(text.contains("# HELP meshkit_requests_total"), "described");
}
