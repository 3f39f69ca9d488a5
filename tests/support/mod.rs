//! Helpers shared by the integration tests.
#![allow(dead_code)]

use meshkit::breaker::{BreakerConfig, BreakerHandle, CircuitBreakerLayer, WindowConfig};
use std::fmt::{Debug, Write as _};
use std::future::Future;
use std::pin::Pin;
use std::sync::{mpsc, Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{BoxError, Service, ServiceExt};
use tracing::field::{Field, Visit};
use tracing::{span, Event, Metadata, Subscriber};

/// What the test backend does with a request.
#[derive(Clone, Copy, Debug)]
pub enum Call {
    Succeed,
    Fail,
    /// Succeeds after this long (tokio time).
    Slow(Duration),
    /// Fails after this long (tokio time).
    SlowFail(Duration),
    /// Never finishes.
    Hang,
}

/// A backend that does what each request says.
#[derive(Clone, Copy, Debug, Default)]
pub struct Backend;

pub fn backend() -> Backend {
    Backend
}

impl Service<Call> for Backend {
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        Box::pin(async move {
            match call {
                Call::Succeed => Ok(()),
                Call::Fail => Err(BoxError::from("backend failed")),
                Call::Slow(delay) => {
                    tokio::time::sleep(delay).await;
                    Ok(())
                }
                Call::SlowFail(delay) => {
                    tokio::time::sleep(delay).await;
                    Err(BoxError::from("backend failed slowly"))
                }
                Call::Hang => std::future::pending().await,
            }
        })
    }
}

/// Waits for readiness, then sends one request.
pub async fn send<S>(service: &mut S, call: Call) -> Result<(), BoxError>
where
    S: Service<Call, Response = (), Error = BoxError>,
{
    service.ready().await?.call(call).await
}

/// Sends `n` identical requests one after another, ignoring their results.
pub async fn send_n<S>(service: &mut S, call: Call, n: usize)
where
    S: Service<Call, Response = (), Error = BoxError>,
{
    for _ in 0..n {
        let _ = send(service, call).await;
    }
}

/// Whether `result` is a rejection by a breaker.
pub fn is_open(result: &Result<(), BoxError>) -> bool {
    matches!(result, Err(err) if err.downcast_ref::<meshkit::breaker::CircuitOpen>().is_some())
}

/// A breaker that opens on its second failure: a count window of 10, `minimum_calls` 2.
pub fn opens_on_second_failure() -> CircuitBreakerLayer {
    CircuitBreakerLayer::new(BreakerConfig {
        window: WindowConfig::Count { size: 10 },
        minimum_calls: 2,
        ..BreakerConfig::default()
    })
    .unwrap()
}

/// A current-thread runtime with every driver enabled.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A current-thread runtime with every driver enabled and its clock paused.
pub fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
}

/// Runs `f` on a thread of its own and returns what it returns; panics with `what` if it has
/// not finished within `limit` (a deadlock, a spin), and with `f`'s own panic if it panicked.
pub fn finishes_within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (done, finished) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let _ = done.send(f());
    });
    match finished.recv_timeout(limit) {
        Ok(value) => value,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what} (not finished within {limit:?})"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match thread.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the thread ended without sending its result"),
        },
    }
}

/// A `tracing` subscriber that hands every event to a closure; spans are accepted and ignored.
pub struct OnEvent<F>(pub F);

impl<F> Subscriber for OnEvent<F>
where
    F: Fn(&Event<'_>) + Send + Sync + 'static,
{
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, event: &Event<'_>) {
        (self.0)(event)
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

/// An event's level and fields as text: `WARN breaker="billing" from=closed to=open `.
pub fn describe_event(event: &Event<'_>) -> String {
    struct Fields(String);
    impl Visit for Fields {
        fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
            let _ = write!(self.0, "{}={:?} ", field.name(), value);
        }
    }
    let mut fields = Fields(format!("{} ", event.metadata().level()));
    event.record(&mut fields);
    fields.0
}

/// A subscriber that resets the breaker in `cell`, once it is set, from inside the WARN event
/// announcing that it opened.
pub fn resets_the_breaker_when_it_opens(
    cell: Arc<OnceLock<BreakerHandle>>,
) -> OnEvent<impl Fn(&Event<'_>) + Send + Sync + 'static> {
    OnEvent(move |event: &Event<'_>| {
        if let Some(handle) = cell.get() {
            if *event.metadata().level() == tracing::Level::WARN {
                handle.reset();
            }
        }
    })
}

/// Runs `test` on a paused runtime under a subscriber that records every event (described by
/// [`describe_event`]); returns them in order.
pub fn events_during<F: Future<Output = ()>>(test: impl FnOnce() -> F) -> Vec<String> {
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let subscriber = OnEvent({
        let events = events.clone();
        move |event: &Event<'_>| events.lock().unwrap().push(describe_event(event))
    });
    let runtime = paused_runtime();
    tracing::subscriber::with_default(subscriber, || runtime.block_on(test()));
    let events = events.lock().unwrap().clone();
    events
}

/// Waits (real time: health checks do real I/O) until `watch` reports an instance at `want`;
/// panics after 5 s.
pub async fn next_health(watch: &mut meshkit::discovery::Watch, want: meshkit::discovery::Health) {
    use futures::StreamExt;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, watch.next()).await {
            Ok(Some(meshkit::discovery::Update::Upsert { instance, .. }))
                if instance.health == want =>
            {
                return
            }
            Ok(Some(_)) => {}
            other => panic!("never reached {want}: {other:?}"),
        }
    }
}

/// A mesh configured by `config` (TOML) with `instances` registered (for good).
pub async fn mesh_of(
    config: &str,
    instances: impl IntoIterator<Item = meshkit::discovery::Instance>,
) -> meshkit::Mesh {
    let mesh = meshkit::Mesh::builder()
        .config(meshkit::MeshConfig::from_toml(config).unwrap())
        .build()
        .unwrap();
    for instance in instances {
        mesh.register(instance).await.unwrap().forget();
    }
    mesh
}

/// An instance of `service` at `host`:`port`.
pub fn instance(service: &str, host: &str, port: u16) -> meshkit::discovery::Instance {
    meshkit::discovery::Instance::builder(service, host, port)
        .build()
        .unwrap()
}

/// A mesh configured by `config` (TOML) with an instance of "users" on 127.0.0.1 at each of
/// `ports`.
pub async fn mesh_with(config: &str, ports: &[u16]) -> meshkit::Mesh {
    let users = ports
        .iter()
        .map(|&port| instance("users", "127.0.0.1", port));
    mesh_of(config, users).await
}
