//! `Mesh::client` end to end: real axum instances, a reqwest or hyper-util leaf.

mod support;

use axum::http::StatusCode;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use meshkit::breaker::{BreakerState, CircuitOpen};
use meshkit::http::ReplayBody;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::mesh_with;
use tower::{Service, ServiceExt};

async fn serve(app: axum::Router) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

fn get_user() -> reqwest::Request {
    reqwest::Request::new(
        reqwest::Method::GET,
        "http://users/users/1".parse().unwrap(),
    )
}

/// A hyper-util client for bodiless requests; `set_host`: whether it derives `Host` itself.
fn hyper_client(
    set_host: bool,
) -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    ReplayBody<http_body_util::Empty<Bytes>>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .set_host(set_host)
        .build_http()
}

/// An instance that answers `path` (any method) with `failing` on the first, third, ...
/// request and with `ok` and the request's body on the others; `calls` counts requests.
async fn every_other(
    path: &str,
    failing: StatusCode,
    ok: StatusCode,
    calls: &Arc<AtomicUsize>,
) -> u16 {
    let calls = calls.clone();
    serve(axum::Router::new().route(
        path,
        axum::routing::any(move |body: Bytes| async move {
            if calls.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
                (failing, Bytes::new())
            } else {
                (ok, body)
            }
        }),
    ))
    .await
}

/// One retry, 1 ms after the first try.
const RETRY_ONCE: &str = "[services.users.retry]\nmax_attempts = 2\n\
                          backoff = { kind = \"constant\", base = \"1ms\", jitter = \"none\" }";

/// A mesh whose "users" instance fails every other request with a 503 (counted in
/// `calls`), retried once, with bodies up to 1 024 bytes replayed.
async fn flaky_users_with_a_body_limit(calls: &Arc<AtomicUsize>) -> meshkit::Mesh {
    let port = every_other(
        "/users/{id}",
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::OK,
        calls,
    )
    .await;
    mesh_with(
        &format!("[services.users.http]\nbody_limit = 1024\n{RETRY_ONCE}"),
        &[port],
    )
    .await
}

/// `GET http://users/users/1`, without `Host`.
fn get_user_http() -> http::Request<ReplayBody<http_body_util::Empty<Bytes>>> {
    http::Request::get("http://users/users/1")
        .body(ReplayBody::buffered(Bytes::new()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_on_a_failing_instance_and_closes_after_it_heals() {
    let healthy = Arc::new(AtomicBool::new(false));
    let app = axum::Router::new().route(
        "/users/{id}",
        get({
            let healthy = healthy.clone();
            move || async move {
                if healthy.load(Ordering::SeqCst) {
                    StatusCode::OK
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            }
        }),
    );
    let port = serve(app).await;
    let mesh = mesh_with(
        r#"
        [services.users]
        breaker = { failure_rate = 0.5, minimum_calls = 4, window = { kind = "count", size = 10 }, open_for = "300ms", half_open_calls = 1 }
        retry = { max_attempts = 1 }
        "#,
        &[port],
    )
    .await;
    let mut users = mesh.client("users", reqwest::Client::new()).unwrap();
    for _ in 0..4 {
        let response = users.ready().await.unwrap().call(get_user()).await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(users.breaker().state(), BreakerState::Open);
    let refused = users
        .ready()
        .await
        .unwrap()
        .call(get_user())
        .await
        .unwrap_err();
    assert!(meshkit::error::is::<CircuitOpen>(&*refused), "{refused}");

    healthy.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let probe = users.ready().await.unwrap().call(get_user()).await.unwrap();
    assert_eq!(probe.status(), StatusCode::OK);
    assert_eq!(users.breaker().state(), BreakerState::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hyper_util_client_is_a_leaf_and_buffered_bodies_are_replayed() {
    // Every other PUT fails with a 503: a retry must send the same body again.
    let calls = Arc::new(AtomicUsize::new(0));
    let mesh = flaky_users_with_a_body_limit(&calls).await;
    let hyper_client: hyper_util::client::legacy::Client<_, ReplayBody<Full<Bytes>>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let mut users = mesh.buffered_client("users", hyper_client).unwrap();
    let request = http::Request::put("http://users/users/1")
        .body(Full::new(Bytes::from_static(b"{\"name\":\"Ada\"}")))
        .unwrap();
    let response = users.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, Bytes::from_static(b"{\"name\":\"Ada\"}"));
    assert_eq!(calls.load(Ordering::SeqCst), 2, "sent twice");

    // A body over the limit is streamed once: the 503 comes back as is.
    let large = http::Request::put("http://users/users/1")
        .body(Full::new(Bytes::from(vec![b'x'; 4096])))
        .unwrap();
    let response = users.ready().await.unwrap().call(large).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls.load(Ordering::SeqCst), 3, "sent once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_bodies_over_the_body_limit_are_sent_once() {
    // Every other request gets a 503: a retried request succeeds on its second try.
    let calls = Arc::new(AtomicUsize::new(0));
    let mesh = flaky_users_with_a_body_limit(&calls).await;
    let mut users = mesh.client("users", reqwest::Client::new()).unwrap();
    let put_user = |body: Vec<u8>| {
        let mut request = reqwest::Request::new(
            reqwest::Method::PUT,
            "http://users/users/1".parse().unwrap(),
        );
        *request.body_mut() = Some(body.into());
        request
    };

    let response = users
        .ready()
        .await
        .unwrap()
        .call(put_user(vec![b'a'; 1024]))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "retried");
    assert_eq!(response.bytes().await.unwrap().len(), 1024);
    assert_eq!(calls.swap(0, Ordering::SeqCst), 2, "sent twice");

    let response = users
        .ready()
        .await
        .unwrap()
        .call(put_user(vec![b'a'; 1025]))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "over the limit: sent once");
}

/// An instance whose `/users/{id}` answers every other request with a 408, counted in
/// `calls`.
async fn every_other_408(calls: &Arc<AtomicUsize>) -> u16 {
    every_other(
        "/users/{id}",
        StatusCode::REQUEST_TIMEOUT,
        StatusCode::OK,
        calls,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retried_statuses_come_from_the_config() {
    // Every other request gets a 408: retried only when the config lists it.
    let calls = Arc::new(AtomicUsize::new(0));
    let port = every_other_408(&calls).await;
    for (statuses, status, sent) in [
        ("", StatusCode::REQUEST_TIMEOUT, 1),
        ("retry_statuses = [408, 503]", StatusCode::OK, 2),
    ] {
        calls.store(0, Ordering::SeqCst);
        let mesh = mesh_with(
            &format!("[services.users.http]\n{statuses}\n{RETRY_ONCE}"),
            &[port],
        )
        .await;
        let mut users = mesh.client("users", reqwest::Client::new()).unwrap();
        let response = users.ready().await.unwrap().call(get_user()).await.unwrap();
        assert_eq!(response.status(), status, "{statuses:?}");
        assert_eq!(calls.load(Ordering::SeqCst), sent);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloaded_retry_statuses_apply_to_a_client_built_before() {
    // Every other request gets a 408: retried once the reloaded config lists it.
    let calls = Arc::new(AtomicUsize::new(0));
    let port = every_other_408(&calls).await;
    let mesh = mesh_with(RETRY_ONCE, &[port]).await;
    let mut users = mesh.client("users", reqwest::Client::new()).unwrap();
    let response = users.ready().await.unwrap().call(get_user()).await.unwrap();
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    assert_eq!(calls.swap(0, Ordering::SeqCst), 1, "408 is not retried");

    let mut config = mesh.config();
    config
        .services
        .get_mut("users")
        .unwrap()
        .http
        .retry_statuses = Some(vec![408, 503]);
    mesh.reload(config).unwrap();
    let response = users.ready().await.unwrap().call(get_user()).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "retried after the reload"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_body_limit_applies_to_a_buffered_client_built_before() {
    let calls = Arc::new(AtomicUsize::new(0));
    let mesh = flaky_users_with_a_body_limit(&calls).await;
    let hyper_client: hyper_util::client::legacy::Client<_, ReplayBody<Full<Bytes>>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let mut users = mesh.buffered_client("users", hyper_client).unwrap();
    let put = || {
        http::Request::put("http://users/users/1")
            .body(Full::new(Bytes::from(vec![b'x'; 4096])))
            .unwrap()
    };
    let response = users.ready().await.unwrap().call(put()).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        calls.swap(0, Ordering::SeqCst),
        1,
        "over 1 024 bytes: sent once"
    );

    let mut config = mesh.config();
    config.services.get_mut("users").unwrap().http.body_limit = 8192;
    mesh.reload(config).unwrap();
    let response = users.ready().await.unwrap().call(put()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "held and sent again");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 4096);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_are_retried_only_when_the_config_allows_every_method() {
    let calls = Arc::new(AtomicUsize::new(0));
    let port = every_other(
        "/users",
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::CREATED,
        &calls,
    )
    .await;
    for (all_methods, status, sent) in [
        (false, StatusCode::SERVICE_UNAVAILABLE, 1),
        (true, StatusCode::CREATED, 2),
    ] {
        calls.store(0, Ordering::SeqCst);
        let mesh = mesh_with(
            &format!("[services.users.http]\nretry_all_methods = {all_methods}\n{RETRY_ONCE}"),
            &[port],
        )
        .await;
        let mut users = mesh.client("users", reqwest::Client::new()).unwrap();
        let post =
            reqwest::Request::new(reqwest::Method::POST, "http://users/users".parse().unwrap());
        let response = users.ready().await.unwrap().call(post).await.unwrap();
        assert_eq!(
            response.status(),
            status,
            "retry_all_methods = {all_methods}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), sent);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_try_carries_the_host_of_the_instance_it_is_sent_to() {
    // Instance A always answers 503, B 200: a call that tries A first is retried, and ends
    // on B. Each instance records the `Host` it received.
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(u16, String)>::new()));
    let instance = |port: Arc<std::sync::OnceLock<u16>>, status: StatusCode| {
        let seen = seen.clone();
        axum::Router::new().route(
            "/users/{id}",
            get(move |headers: axum::http::HeaderMap| async move {
                let host = headers[http::header::HOST].to_str().unwrap().to_owned();
                seen.lock().unwrap().push((*port.get().unwrap(), host));
                status
            }),
        )
    };
    let (a, b) = (Arc::default(), Arc::default());
    let port_a = serve(instance(Arc::clone(&a), StatusCode::SERVICE_UNAVAILABLE)).await;
    let port_b = serve(instance(Arc::clone(&b), StatusCode::OK)).await;
    a.set(port_a).unwrap();
    b.set(port_b).unwrap();
    let mesh = mesh_with(
        r#"
        [services.users]
        balance = { picker = "round_robin" }
        retry = { max_attempts = 4, backoff = { kind = "constant", base = "1ms", jitter = "none" } }
        "#,
        &[port_a, port_b],
    )
    .await;
    // A client that sets no `Host` itself: every one the instances see is the endpoint's.
    let mut users = mesh.client("users", hyper_client(false)).unwrap();
    // Until one call was sent to A and then, retried, to B.
    let mut moved = false;
    for _ in 0..20 {
        let before = seen.lock().unwrap().len();
        let response = users
            .ready()
            .await
            .unwrap()
            .call(get_user_http())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let tries = seen.lock().unwrap()[before..].to_vec();
        if tries.first().map(|t| t.0) == Some(port_a) && tries.last().map(|t| t.0) == Some(port_b) {
            moved = true;
            break;
        }
    }
    assert!(
        moved,
        "no call was retried from A to B: {:?}",
        seen.lock().unwrap()
    );
    for (port, host) in seen.lock().unwrap().iter() {
        assert_eq!(host, &format!("127.0.0.1:{port}"));
    }

    // A `Host` the caller sets is sent as it is, to whichever instance.
    seen.lock().unwrap().clear();
    let mut request = get_user_http();
    request
        .headers_mut()
        .insert(http::header::HOST, "users.internal".parse().unwrap());
    users.ready().await.unwrap().call(request).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|(_, host)| host == "users.internal"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_set_host_off_the_host_is_left_to_the_client() {
    let hosts = Arc::new(std::sync::Mutex::new(Vec::<Option<String>>::new()));
    let app = axum::Router::new().route(
        "/users/{id}",
        get({
            let hosts = hosts.clone();
            move |headers: axum::http::HeaderMap| async move {
                let host = headers.get(http::header::HOST);
                hosts
                    .lock()
                    .unwrap()
                    .push(host.map(|h| h.to_str().unwrap().to_owned()));
                StatusCode::OK
            }
        }),
    );
    let port = serve(app).await;
    let off = mesh_with("[services.users.http]\nset_host = false\n", &[port]).await;
    // The client sets none either: the request goes without one. Then the client's own.
    for set_host in [false, true] {
        let mut users = off.client("users", hyper_client(set_host)).unwrap();
        users
            .ready()
            .await
            .unwrap()
            .call(get_user_http())
            .await
            .unwrap();
    }
    assert_eq!(
        *hosts.lock().unwrap(),
        [None, Some(format!("127.0.0.1:{port}"))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_longer_than_the_calls_timeout_returns_the_response_at_once() {
    // 503 with `Retry-After: 15` under the default 10 s timeout: waiting would end in a 504
    // and lose the server's answer.
    let calls = Arc::new(AtomicUsize::new(0));
    let port = serve(axum::Router::new().route(
        "/users/{id}",
        get({
            let calls = calls.clone();
            move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(axum::http::header::RETRY_AFTER, "15")],
                )
            }
        }),
    ))
    .await;
    let mesh = mesh_with(
        "[services.users]
timeout = \"10s\"",
        &[port],
    )
    .await;
    let mut users = mesh.client("users", reqwest::Client::new()).unwrap();
    let started = tokio::time::Instant::now();
    let response = users.ready().await.unwrap().call(get_user()).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "15");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A leaf that answers 503 with `Retry-After: retry_after` after 3 s, counting its calls.
fn unavailable_after_3s(
    retry_after: &'static str,
    calls: Arc<AtomicUsize>,
) -> impl Service<
    http::Request<()>,
    Response = http::Response<()>,
    Error = std::io::Error,
    Future: Send,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |_: http::Request<()>| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok::<_, std::io::Error>(
                http::Response::builder()
                    .status(503)
                    .header("retry-after", retry_after)
                    .body(())
                    .unwrap(),
            )
        }
    })
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_longer_than_what_is_left_of_the_timeout_returns_the_response_then() {
    // The answer takes 3 s and asks for 8 s more: under a 10 s timeout the retry could not
    // finish, so the 503 is returned when it comes, not a 504 seven seconds later.
    let calls = Arc::new(AtomicUsize::new(0));
    let leaf = unavailable_after_3s("8", calls.clone());
    let mesh = mesh_with("[services.users]\ntimeout = \"10s\"", &[9]).await;
    let mut users = mesh.client("users", leaf).unwrap();
    let started = tokio::time::Instant::now();
    let request = http::Request::get("http://users/users/1").body(()).unwrap();
    let response = users.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(started.elapsed(), Duration::from_secs(3));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // With time for it, the retry is made: a 2 s wait after a 3 s answer, then another 3 s
    // answer, fit in 10 s.
    let mesh = mesh_with(
        "[services.users]\ntimeout = \"10s\"\nretry = { max_attempts = 2 }",
        &[9],
    )
    .await;
    let quick = unavailable_after_3s("2", Arc::default());
    let mut users = mesh.client("users", quick).unwrap();
    let started = tokio::time::Instant::now();
    let request = http::Request::get("http://users/users/1").body(()).unwrap();
    let response = users.ready().await.unwrap().call(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(8),
        "waited, retried once"
    );
}
