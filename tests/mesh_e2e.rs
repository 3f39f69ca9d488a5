//! `Mesh::client` end to end, as a service sees it: the whole stack built from TOML over a
//! `reqwest::Client` leaf, real axum instances on 127.0.0.1 that die or ask for a pause, and
//! meshkit's errors answered by an axum gateway (the `reqwest` and `axum` features).
#![cfg(all(feature = "reqwest", feature = "axum"))]

mod support;

use axum::http::{header, HeaderMap, StatusCode};
use meshkit::balance::NoEndpoints;
use meshkit::http::ErrorResponseLayer;
use meshkit::retry::TimedOut;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::mesh_with;
use tokio::sync::Notify;
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

/// A listener that keeps a handle on every connection it accepts, so that [`Server::kill`] can
/// close them as a crash would: axum's connection tasks outlive its serve task and then shut
/// down gracefully, answering the requests they hold first (or, for a request that hangs,
/// never closing).
struct Tracked {
    listener: tokio::net::TcpListener,
    connections: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl axum::serve::Listener for Tracked {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, address) = axum::serve::Listener::accept(&mut self.listener).await;
        let stream = stream.into_std().unwrap();
        let handle = stream.try_clone().unwrap();
        self.connections.lock().unwrap().push(handle);
        (tokio::net::TcpStream::from_std(stream).unwrap(), address)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// An axum instance on an OS-chosen port of 127.0.0.1.
struct Server {
    port: u16,
    task: tokio::task::JoinHandle<()>,
    connections: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

async fn serve(app: axum::Router) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(Mutex::new(Vec::new()));
    let tracked = Tracked {
        listener,
        connections: connections.clone(),
    };
    let task = tokio::spawn(async move { axum::serve(tracked, app).await.unwrap() });
    Server {
        port,
        task,
        connections,
    }
}

impl Server {
    /// Kills the instance the way a crashed process goes: its port refuses connections, and
    /// every connection it had is closed, whatever it was doing.
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
        for connection in self.connections.lock().unwrap().drain(..) {
            let _ = connection.shutdown(Shutdown::Both);
        }
    }
}

fn get(path: &str) -> reqwest::Request {
    reqwest::Request::new(
        reqwest::Method::GET,
        format!("http://users{path}").parse().unwrap(),
    )
}

/// An instance whose requests never get an answer.
async fn hanging_instance() -> Server {
    serve(axum::Router::new().route(
        "/users/{id}",
        axum::routing::get(std::future::pending::<()>),
    ))
    .await
}

/// A gateway calls "users" through the mesh from its handlers; the gateway's port.
async fn gateway(app: axum::Router) -> u16 {
    serve(app).await.port
}

/// An instance that dies under traffic fails no call (in flight or later) and answers none after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_when_an_instance_dies() {
    // "a" answers at once until `hang` is set; from then on its calls hang, each announced
    // by `entered`, until the instance dies under them.
    let (hang, entered) = (Arc::new(AtomicBool::new(false)), Arc::new(Notify::new()));
    let a = serve(axum::Router::new().route(
        "/whoami",
        axum::routing::get({
            let (hang, entered) = (hang.clone(), entered.clone());
            move || async move {
                if hang.load(Ordering::SeqCst) {
                    entered.notify_one();
                    std::future::pending::<()>().await;
                }
                "a"
            }
        }),
    ))
    .await;
    let b = serve(axum::Router::new().route("/whoami", axum::routing::get(|| async { "b" }))).await;
    let port_a = a.port;
    // Round robin, so that both instances serve before the failure. An instance is ejected
    // at its first failure (one of two may be); a GET is tried up to 4 times.
    let mesh = mesh_with(
        r#"
        [services.users]
        balance = { picker = "round_robin", ejection = { failures = 1 } }
        [services.users.retry]
        max_attempts = 4
        backoff = { kind = "constant", base = "20ms", jitter = "none" }
        "#,
        &[a.port, b.port],
    )
    .await;
    let users = mesh.client("users", reqwest::Client::new()).unwrap();

    // Three callers, each sending one call after another until told to stop; each answer
    // says whether its call was sent after the failure was complete.
    let killed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, mut answers) = tokio::sync::mpsc::unbounded_channel();
    let callers: Vec<_> = (0..3)
        .map(|_| {
            let (mut users, answered) = (users.clone(), answered.clone());
            let (killed, stop) = (killed.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let after_the_kill = killed.load(Ordering::SeqCst);
                    let answer = async {
                        let response = users.ready().await?.call(get("/whoami")).await?;
                        match response.status() {
                            StatusCode::OK => Ok::<_, BoxError>(response.text().await?),
                            status => Err(format!("answered {status}").into()),
                        }
                    }
                    .await
                    .map_err(|error| error.to_string());
                    let _ = answered.send((after_the_kill, answer));
                }
            })
        })
        .collect();
    drop(answered);

    let scenario = async {
        let mut before = Vec::new();
        while !(before.iter().any(|name| name == "a") && before.iter().any(|name| name == "b")) {
            let (_, answer) = answers.recv().await.expect("the callers stopped");
            before.push(answer.unwrap_or_else(|e| panic!("a call before the failure: {e}")));
        }
        // "a" dies with a call in flight, while the other calls go on.
        hang.store(true, Ordering::SeqCst);
        entered.notified().await;
        a.kill().await;
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port_a))
                .await
                .is_err(),
            "the dead instance still accepts connections"
        );
        killed.store(true, Ordering::SeqCst);
        // Every call ends, and succeeds: until 60 were sent after the failure, then until the
        // callers have stopped (the calls "a" held included).
        let mut after = Vec::new();
        while let Some((after_the_kill, answer)) = answers.recv().await {
            let name = answer.unwrap_or_else(|e| panic!("a call failed over the failure: {e}"));
            if after_the_kill {
                after.push(name);
            }
            if after.len() == 60 {
                stop.store(true, Ordering::SeqCst);
            }
        }
        after
    };
    let after = tokio::time::timeout(Duration::from_secs(10), scenario)
        .await
        .expect("calls still unanswered after 10 s");
    for caller in callers {
        caller.await.unwrap();
    }
    assert!(after.len() >= 60);
    assert!(after.iter().all(|name| name == "b"), "{after:?}");
    // The calls that found "a" dead were retried.
    assert!(users.retry_budget().snapshot().withdrawals >= 1);
}

/// A 503 with `Retry-After: 1` is retried only once that second has passed, not after the backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honours_retry_after_through_the_mesh() {
    let seen = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let app = axum::Router::new().route(
        "/users/{id}",
        axum::routing::get({
            let seen = seen.clone();
            move || async move {
                let first = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(Instant::now());
                    seen.len() == 1
                };
                let mut headers = HeaderMap::new();
                if first {
                    headers.insert(header::RETRY_AFTER, "1".parse().unwrap());
                    (StatusCode::SERVICE_UNAVAILABLE, headers, "busy")
                } else {
                    (StatusCode::OK, headers, "ok")
                }
            }
        }),
    );
    let server = serve(app).await;
    // Without the hint the retry would go 1 ms after the 503; a hint up to 2 s is waited for.
    let mesh = mesh_with(
        r#"
        [services.users.retry]
        max_attempts = 2
        backoff = { kind = "constant", base = "1ms", jitter = "none" }
        max_retry_after = "2s"
        "#,
        &[server.port],
    )
    .await;
    let mut users = mesh.client("users", reqwest::Client::new()).unwrap();
    let response = users
        .ready()
        .await
        .unwrap()
        .call(get("/users/1"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "ok");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one 503, one retry");
    let gap = seen[1] - seen[0];
    assert!(gap >= Duration::from_secs(1), "retried after {gap:?}");
}

/// A gateway whose `/profile` handler calls "users" through `users` and, when the call
/// fails, returns the meshkit error `E` found in the failure (as a handler would, relying on
/// `E`'s `IntoResponse`); then what `GET /profile` got: status, `Retry-After`, body.
async fn profile_through<E>(
    users: meshkit::MeshClient<reqwest::Request, reqwest::Response>,
) -> (StatusCode, Option<String>, String)
where
    E: std::error::Error + Clone + axum::response::IntoResponse + Send + 'static,
{
    let app = axum::Router::new().route(
        "/profile",
        axum::routing::get(move || {
            let users = users.clone();
            async move {
                match users.oneshot(get("/users/1")).await {
                    Ok(response) => Ok(response.text().await.unwrap()),
                    Err(error) => Err(meshkit::error::find::<E>(&*error)
                        .cloned()
                        .unwrap_or_else(|| panic!("not the expected error: {error}"))),
                }
            }
        }),
    );
    let port = gateway(app).await;
    let response = reqwest::get(format!("http://127.0.0.1:{port}/profile"))
        .await
        .unwrap();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .map(|value| value.to_str().unwrap().to_string());
    (
        response.status(),
        retry_after,
        response.text().await.unwrap(),
    )
}

/// A handler that returns the mesh's `NoEndpoints` (no instance to call) answers 503, with why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_returning_no_endpoints_answers_503() {
    let mesh = mesh_with(
        "[services.users.balance]\nfailfast_after = \"100ms\"\n",
        &[],
    )
    .await;
    let users = mesh.client("users", reqwest::Client::new()).unwrap();
    let (status, retry_after, body) = profile_through::<NoEndpoints>(users).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry_after, None);
    assert!(body.contains("no endpoint of users is ready"), "{body}");
}

/// A handler that returns the retry layer's `TimedOut` (a try past `per_try_timeout`) answers 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_returning_a_timed_out_try_answers_504() {
    let server = hanging_instance().await;
    let mesh = mesh_with(
        "[services.users.retry]\nmax_attempts = 1\nper_try_timeout = \"200ms\"\n",
        &[server.port],
    )
    .await;
    let users = mesh.client("users", reqwest::Client::new()).unwrap();
    let (status, _, body) = profile_through::<TimedOut>(users).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(body, "try timed out after 200ms");
}

/// A call past the service's `timeout` (`Elapsed`) answers 504 through `ErrorResponseLayer`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_mesh_call_times_out_answers_504() {
    let server = hanging_instance().await;
    let mesh = mesh_with("[services.users]\ntimeout = \"200ms\"\n", &[server.port]).await;
    let users = mesh.client("users", reqwest::Client::new()).unwrap();
    let proxy = ServiceBuilder::new()
        .layer(ErrorResponseLayer::new())
        .map_request(|_: axum::extract::Request| get("/users/1"))
        .map_response(|response: reqwest::Response| response.status())
        .service(users);
    let port = gateway(axum::Router::new().route_service("/profile", proxy)).await;
    let response = reqwest::get(format!("http://127.0.0.1:{port}/profile"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(response.text().await.unwrap(), "request timed out");
}

/// A gateway handler that returns the mesh's error as it comes (`?` into `MeshError`) answers
/// what the error stands for: 504 for the whole-call timeout, 503 once the mesh is shut down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_returning_mesh_errors_with_question_mark_answers_their_status() {
    let server = hanging_instance().await;
    let mesh = mesh_with("[services.users]\ntimeout = \"200ms\"\n", &[server.port]).await;
    let users = mesh.client("users", reqwest::Client::new()).unwrap();
    let app = axum::Router::new().route(
        "/profile",
        axum::routing::get(move || {
            let users = users.clone();
            async move {
                let response = users.oneshot(get("/users/1")).await?;
                Ok::<_, meshkit::http::MeshError>(response.status().to_string())
            }
        }),
    );
    let port = gateway(app).await;
    let profile = || async {
        reqwest::get(format!("http://127.0.0.1:{port}/profile"))
            .await
            .unwrap()
    };
    let timed_out = profile().await;
    assert_eq!(timed_out.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(timed_out.text().await.unwrap(), "request timed out");
    mesh.shutdown().await;
    let closed = profile().await;
    assert_eq!(closed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(closed.text().await.unwrap(), "the mesh is shut down");
}
