//! The demo's scenario, shared by `cargo run --example mesh` and `tests/demo.rs`.
//!
//! Three instances of an axum "users" service run on 127.0.0.1 with OS-chosen ports: one
//! healthy, one failing every other request with a 500, one slow. They register with HTTP
//! health checks; a `reqwest` client stack built by a `Mesh` from an embedded TOML config
//! drives concurrent requests; a third of the way through the healthy instance is stopped
//! (its port closes), and two thirds of the way, once its health check has seen it gone, it
//! starts again on the same port; the last third of the requests is sent once it passes its
//! health check again.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures::FutureExt;
use meshkit::discovery::{Health, HealthCheck, Instance};
use meshkit::events::system::SystemEvent;
use meshkit::events::RecvError;
use meshkit::{Mesh, MeshConfig};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceExt};

/// The client's policies: what a service would keep in `meshkit.toml`.
pub const CONFIG: &str = r#"
shutdown_timeout = "5s"

[services.users]
timeout = "3s"

[services.users.balance]
picker = "peak_ewma"
failfast_after = "2s"
# Take an instance out when 4 of its last 10 calls failed, for 1 s, longer if it repeats.
ejection = { failures = 10, failure_rate = 0.4, base_ejection = "1s", max_ejection = "4s" }

[services.users.breaker]
failure_rate = 0.5
minimum_calls = 50
window = { kind = "time", duration = "5s" }
open_for = "1s"

[services.users.retry]
max_attempts = 3
backoff = { kind = "exponential", base = "5ms", max = "100ms", jitter = "full" }
budget = { ratio = 0.5, min_per_sec = 50, ttl = "10s" }
"#;

/// How big a run is.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    /// Requests sent in all.
    pub requests: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// How long the slow instance takes per request.
    pub slow_for: Duration,
    /// Print progress lines while running.
    pub progress: bool,
}

/// How an instance answers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Behaviour {
    Healthy,
    Flaky,
    Slow(Duration),
}

/// One running instance of the users service, and what it served.
struct UsersInstance {
    name: &'static str,
    behaviour: Behaviour,
    port: u16,
    served: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
}

impl UsersInstance {
    async fn start(name: &'static str, behaviour: Behaviour) -> Result<Self, BoxError> {
        let mut instance = Self {
            name,
            behaviour,
            port: 0,
            served: Arc::default(),
            failed: Arc::default(),
            stop: None,
        };
        instance.listen().await?;
        Ok(instance)
    }

    /// Serves on `self.port` (an OS-chosen one the first time) until `stop`.
    async fn listen(&mut self) -> Result<(), BoxError> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await?;
        self.port = listener.local_addr()?.port();
        let (stop, stopped) = oneshot::channel::<()>();
        self.stop = Some(stop);
        let app = axum::Router::new()
            .route("/users/{id}", get(user))
            .route("/health", get(|| async { "ok" }))
            .with_state((self.behaviour, self.served.clone(), self.failed.clone()));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(())
    }

    /// Closes the port: new connections are refused, open ones end after their request.
    fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    fn instance(&self) -> Result<Instance, BoxError> {
        Ok(Instance::builder("users", "127.0.0.1", self.port)
            .metadata("name", self.name)
            .check(HealthCheck::Http {
                path: "/health".into(),
                interval: Duration::from_millis(200),
                timeout: Duration::from_millis(200),
                failures_before_critical: 1,
                successes_before_passing: 1,
            })
            .build()?)
    }
}

async fn user(
    State((behaviour, served, failed)): State<(Behaviour, Arc<AtomicU64>, Arc<AtomicU64>)>,
    axum::extract::Path(id): axum::extract::Path<u64>,
) -> (StatusCode, String) {
    let n = served.fetch_add(1, Ordering::Relaxed);
    match behaviour {
        Behaviour::Flaky if n % 2 == 0 => {
            failed.fetch_add(1, Ordering::Relaxed);
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "database unavailable".into(),
            )
        }
        Behaviour::Slow(delay) => {
            tokio::time::sleep(delay).await;
            (StatusCode::OK, format!("user {id}"))
        }
        _ => (StatusCode::OK, format!("user {id}")),
    }
}

/// What a run saw.
#[derive(Debug)]
pub struct Report {
    /// Per instance: name, behaviour, requests served, 500s sent.
    pub instances: Vec<(String, String, u64, u64)>,
    /// Requests sent.
    pub requests: usize,
    /// Requests answered 2xx.
    pub successes: usize,
    /// Requests that failed, by what the caller saw.
    pub failures: BTreeMap<String, usize>,
    /// Retries the budget allowed, and refused.
    pub retries: (u64, u64),
    /// The service breaker's transitions, in order.
    pub transitions: Vec<String>,
    /// Transitions of the per-instance ejection breakers.
    pub ejection_transitions: usize,
    /// System events seen, by type.
    pub events: BTreeMap<&'static str, usize>,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Requests served by the stopped instance after it started again.
    pub served_after_restart: u64,
}

/// Runs the scenario.
pub async fn run(scenario: Scenario) -> Result<Report, BoxError> {
    let started = Instant::now();
    let mesh = Mesh::builder()
        .config(MeshConfig::from_toml(CONFIG)?)
        .build()?;
    // This mesh's own events (the demo test runs beside other tests in its binary).
    let mut events = mesh.events().subscribe();
    let mut instances = vec![
        UsersInstance::start("users-1", Behaviour::Healthy).await?,
        UsersInstance::start("users-2", Behaviour::Flaky).await?,
        UsersInstance::start("users-3", Behaviour::Slow(scenario.slow_for)).await?,
    ];
    for instance in &instances {
        // Kept registered until the mesh shuts down.
        mesh.register(instance.instance()?).await?.forget();
    }
    wait_until_passing(&mesh, 3).await?;
    say(
        scenario,
        format!(
            "3 instances passing their health checks after {:?}",
            started.elapsed()
        ),
    );

    let client = mesh.client("users", reqwest::Client::new())?;
    let (kill_at, restart_at) = (scenario.requests / 3, 2 * scenario.requests / 3);
    // The last third of the requests waits until users-1 is back and passing, so that every
    // run shows the recovery, however fast the requests go.
    let (resume, resumed) = tokio::sync::watch::channel(false);
    let next = Arc::new(AtomicUsize::new(0));
    let successes = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(BTreeMap::<String, usize>::new()));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..scenario.concurrency {
        let (mut client, next, successes, failures, mut resumed) = (
            client.clone(),
            next.clone(),
            successes.clone(),
            failures.clone(),
            resumed.clone(),
        );
        workers.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= scenario.requests {
                    return;
                }
                if n >= restart_at {
                    // Only an error if the driver is gone, and then the run is over anyway.
                    let _ = resumed.wait_for(|resumed| *resumed).await;
                }
                let request = reqwest::Request::new(
                    reqwest::Method::GET,
                    format!("http://users/users/{n}")
                        .parse()
                        .expect("a valid URL"),
                );
                let outcome = match client.ready().await {
                    Ok(ready) => ready.call(request).await,
                    Err(error) => Err(error),
                };
                match outcome {
                    Ok(response) if response.status().is_success() => {
                        successes.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(response) => {
                        record(&failures, format!("HTTP {}", response.status().as_u16()))
                    }
                    Err(error) => record(&failures, describe(&error)),
                }
            }
        });
    }

    // The driver: progress, the outage and the recovery.
    let (mut killed, mut restarted, mut served_before_restart) = (false, false, 0);
    let mut waiting_since = None;
    let mut last_progress = 0;
    while !workers.is_empty() {
        tokio::select! {
            _ = workers.join_next() => continue,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        let sent = next.load(Ordering::Relaxed).min(scenario.requests);
        if !killed && sent >= kill_at {
            killed = true;
            instances[0].kill();
            say(
                scenario,
                format!(
                    "{sent:>6} sent: users-1 stopped (port {} closed)",
                    instances[0].port
                ),
            );
        }
        // Started again once its health check has seen it gone, so that the run always shows
        // both transitions, however fast the requests go.
        if killed && !restarted && sent >= restart_at && is_critical(&mesh, instances[0].port) {
            restarted = true;
            served_before_restart = instances[0].served.load(Ordering::Relaxed);
            instances[0].listen().await?;
            say(
                scenario,
                format!(
                    "{sent:>6} sent: users-1 started again on port {}",
                    instances[0].port
                ),
            );
        }
        // The last third waits from here, for 10 s at most whatever the health checks say.
        if sent >= restart_at && !*resume.borrow() {
            let waited = waiting_since.get_or_insert_with(Instant::now).elapsed();
            if restarted && is_passing(&mesh, instances[0].port) {
                let _ = resume.send(true);
                say(scenario, format!("{sent:>6} sent: users-1 passing again"));
            } else if waited > Duration::from_secs(10) {
                let _ = resume.send(true);
                say(
                    scenario,
                    format!("{sent:>6} sent: users-1 not back after 10 s; going on without it"),
                );
            }
        }
        if sent >= last_progress + scenario.requests / 10 {
            last_progress = sent;
            say(
                scenario,
                format!(
                    "{sent:>6} sent, {:>6} succeeded, breaker {:?}",
                    successes.load(Ordering::Relaxed),
                    client.breaker().state()
                ),
            );
        }
    }
    let budget = client.retry_budget().snapshot();
    mesh.shutdown().await;
    for instance in &mut instances {
        instance.kill();
    }

    let mut seen = BTreeMap::new();
    let mut transitions = Vec::new();
    let mut ejection_transitions = 0;
    loop {
        match events.recv().now_or_never() {
            Some(Ok(event)) => {
                *seen.entry(event.data.event_type()).or_insert(0) += 1;
                if let SystemEvent::BreakerTransition { breaker, from, to } = &event.data {
                    // The service's breaker is named after it; each endpoint's ejection
                    // breaker after the service and the endpoint.
                    if breaker == "users" {
                        transitions.push(format!("{from:?} → {to:?}"));
                    } else {
                        ejection_transitions += 1;
                    }
                }
            }
            Some(Err(RecvError::Lagged(_))) => continue,
            _ => break,
        }
    }
    let failures = failures.lock().expect("not poisoned").clone();
    Ok(Report {
        instances: instances
            .iter()
            .map(|i| {
                (
                    i.name.to_string(),
                    match i.behaviour {
                        Behaviour::Healthy => "healthy (stopped, restarted)".to_string(),
                        Behaviour::Flaky => "fails every other request".to_string(),
                        Behaviour::Slow(delay) => format!("slow ({delay:?})"),
                    },
                    i.served.load(Ordering::Relaxed),
                    i.failed.load(Ordering::Relaxed),
                )
            })
            .collect(),
        requests: scenario.requests,
        successes: successes.load(Ordering::Relaxed),
        failures,
        retries: (budget.withdrawals, budget.refusals),
        transitions,
        ejection_transitions,
        events: seen,
        elapsed: started.elapsed(),
        served_after_restart: if restarted {
            instances[0].served.load(Ordering::Relaxed) - served_before_restart
        } else {
            0
        },
    })
}

fn say(scenario: Scenario, line: String) {
    if scenario.progress {
        println!("  {line}");
    }
}

fn record(failures: &std::sync::Mutex<BTreeMap<String, usize>>, what: String) {
    *failures
        .lock()
        .expect("not poisoned")
        .entry(what)
        .or_insert(0) += 1;
}

/// A short name for an error the caller saw: meshkit's own by type, others by message.
fn describe(error: &BoxError) -> String {
    if meshkit::error::is::<meshkit::breaker::CircuitOpen>(&**error) {
        "circuit open".into()
    } else if meshkit::error::is::<meshkit::balance::NoEndpoints>(&**error) {
        "no endpoints".into()
    } else if error.is::<tower::timeout::error::Elapsed>() {
        "timed out".into()
    } else if let Some(error) = error.downcast_ref::<reqwest::Error>() {
        if error.is_connect() {
            "connection refused".into()
        } else {
            "connection error".into()
        }
    } else {
        error.to_string()
    }
}

/// Whether the registry marks the instance on `port` critical.
fn is_critical(mesh: &Mesh, port: u16) -> bool {
    health_is(mesh, port, Health::Critical)
}

/// Whether the registry marks the instance on `port` passing.
fn is_passing(mesh: &Mesh, port: u16) -> bool {
    health_is(mesh, port, Health::Passing)
}

fn health_is(mesh: &Mesh, port: u16, health: Health) -> bool {
    mesh.registry()
        .snapshot("users")
        .instances()
        .iter()
        .any(|i| i.port == port && i.health == health)
}

async fn wait_until_passing(mesh: &Mesh, count: usize) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snapshot = mesh.registry().snapshot("users");
        let passing = snapshot
            .instances()
            .iter()
            .filter(|i| i.health == Health::Passing)
            .count();
        if passing >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("only {passing} of {count} instances passing after 10 s").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<10} {:<30} {:>8} {:>8}",
            "instance", "behaviour", "served", "500s"
        )?;
        for (name, behaviour, served, failed) in &self.instances {
            writeln!(f, "{name:<10} {behaviour:<30} {served:>8} {failed:>8}")?;
        }
        writeln!(f)?;
        let rate = 100.0 * self.successes as f64 / self.requests as f64;
        writeln!(f, "requests            {:>8}", self.requests)?;
        writeln!(
            f,
            "succeeded           {:>8}  ({rate:.2} %)",
            self.successes
        )?;
        for (what, count) in &self.failures {
            writeln!(f, "failed: {what:<20} {count:>8}")?;
        }
        writeln!(
            f,
            "retries             {:>8}  (refused by the budget: {})",
            self.retries.0, self.retries.1
        )?;
        writeln!(
            f,
            "users-1 after restart {:>6}  requests served",
            self.served_after_restart
        )?;
        let transitions = if self.transitions.is_empty() {
            "none (retries and ejection kept failures below its threshold)".to_string()
        } else {
            self.transitions.join(", ")
        };
        writeln!(f, "service breaker     {transitions}")?;
        writeln!(
            f,
            "ejection breakers   {} transitions (ejected {}, re-admitted {})",
            self.ejection_transitions,
            self.events.get("EndpointEjected").copied().unwrap_or(0),
            self.events.get("EndpointReadmitted").copied().unwrap_or(0)
        )?;
        writeln!(f, "system events:")?;
        for (kind, count) in &self.events {
            writeln!(f, "  {kind:<22} {count:>6}")?;
        }
        write!(f, "finished in {:.1} s", self.elapsed.as_secs_f64())
    }
}
