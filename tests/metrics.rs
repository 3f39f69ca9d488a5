//! meshkit's metrics through the `metrics` facade, read back from a Prometheus recorder.

mod support;

use meshkit::Mesh;
use metrics_exporter_prometheus::PrometheusBuilder;
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
    let mesh = mesh_of(
        r#"
        [defaults.retry]
        max_attempts = 2
        backoff = { kind = "constant", base = "1ms", jitter = "none" }
        [defaults.breaker]
        minimum_calls = 4
        window = { kind = "count", size = 4 }
        "#,
        &["users", "broken"],
    )
    .await;
    let mut users = mesh.client("users", answering(200)).unwrap();
    let mut broken = mesh.client("broken", answering(500)).unwrap();
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
    // No wait: system events are counted as they are published.
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

/// A mesh configured by `config` (TOML) with an instance of each of `services`.
async fn mesh_of(config: &str, services: &[&str]) -> Mesh {
    let instances = services
        .iter()
        .map(|service| support::instance(service, "10.0.0.7", 8080));
    support::mesh_of(config, instances).await
}

/// A leaf that answers every request with `status`.
fn answering(
    status: u16,
) -> impl Service<
    http::Request<()>,
    Response = http::Response<()>,
    Error = std::io::Error,
    Future: Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |_: http::Request<()>| async move {
        Ok(http::Response::builder().status(status).body(()).unwrap())
    })
}

/// A mesh whose breakers open after 2 calls that all failed, and a client of `service` over
/// an instance that answers 500.
async fn failing_client(
    service: &str,
) -> (
    Mesh,
    meshkit::MeshClient<http::Request<()>, http::Response<()>>,
) {
    let mesh = mesh_of(
        r#"
        [defaults]
        retry = { max_attempts = 1 }
        breaker = { minimum_calls = 2, window = { kind = "count", size = 2 } }
        "#,
        &[service],
    )
    .await;
    let client = mesh.client(service, answering(500)).unwrap();
    (mesh, client)
}

// Each of these runs on its own runtime, with a recorder of its own for its thread: the
// second one to run would see nothing if system events were turned into metrics by a task
// of the first runtime.
#[tokio::test]
async fn a_thread_local_recorder_sees_breaker_metrics_at_once() {
    breaker_metrics_are_recorded("local-one").await;
}

#[tokio::test]
async fn another_runtime_and_recorder_see_theirs_too() {
    breaker_metrics_are_recorded("local-two").await;
}

async fn breaker_metrics_are_recorded(service: &str) {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _local = metrics::set_default_local_recorder(&recorder);
    let (_mesh, mut client) = failing_client(service).await;
    let state = format!(r#"meshkit_breaker_state{{breaker="{service}"}}"#);
    assert_eq!(
        sample(&handle.render(), &state),
        Some(0.0),
        "closed, before any call"
    );
    for _ in 0..2 {
        let get = http::Request::get("http://any/").body(()).unwrap();
        client.ready().await.unwrap().call(get).await.unwrap();
    }
    let text = handle.render();
    let opened = format!(r#"meshkit_breaker_transitions_total{{breaker="{service}",to="open"}}"#);
    assert_eq!(sample(&text, &opened), Some(1.0), "{text}");
    assert_eq!(sample(&text, &state), Some(1.0), "{text}");
    let registered = format!(r#"meshkit_instances_registered_total{{service="{service}"}}"#);
    assert_eq!(sample(&text, &registered), Some(1.0), "{text}");
}
