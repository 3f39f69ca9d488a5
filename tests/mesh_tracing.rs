//! The spans a `MeshClient` call opens, and what a reload says.

use meshkit::discovery::Instance;
use meshkit::{Mesh, MeshConfig};
use std::fmt::{Debug, Write};
use std::sync::{Arc, Mutex};
use tower::{Service, ServiceExt};
use tracing::field::{Field, Visit};
use tracing::span;
use tracing::{Event, Metadata, Subscriber};

/// Records each span's name and fields as `name field=value ...`, and each event's level
/// and fields as `LEVEL field=value ...` in the second list.
#[derive(Default)]
struct Spans(Arc<Mutex<Vec<String>>>, Arc<Mutex<Vec<String>>>);

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }
}

impl Subscriber for Spans {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attributes: &span::Attributes<'_>) -> span::Id {
        let mut fields = Fields(attributes.metadata().name().to_string());
        attributes.record(&mut fields);
        let mut spans = self.0.lock().unwrap();
        spans.push(fields.0);
        span::Id::from_u64(spans.len() as u64)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = Fields(event.metadata().level().to_string());
        event.record(&mut fields);
        self.1.lock().unwrap().push(fields.0);
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

#[test]
fn a_call_opens_a_request_span_an_endpoint_span_per_try_and_a_retry_span_per_retry() {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    tracing::subscriber::with_default(Spans(spans.clone(), Arc::default()), || {
        runtime.block_on(async {
            let config = MeshConfig::from_toml(
                "[services.users.retry]\nmax_attempts = 2\nbackoff = { kind = \"constant\", base = \"1ms\", jitter = \"none\" }",
            )
            .unwrap();
            let mesh = Mesh::builder().config(config).build().unwrap();
            mesh.register(Instance::builder("users", "10.0.0.7", 8080).build().unwrap())
                .await
                .unwrap()
                .forget();
            let leaf = tower::service_fn(|_: http::Request<()>| async {
                Ok::<_, std::io::Error>(http::Response::builder().status(503).body(()).unwrap())
            });
            let mut users = mesh.client("users", leaf).unwrap();
            let request = http::Request::get("http://users/").body(()).unwrap();
            let response = users.ready().await.unwrap().call(request).await.unwrap();
            assert_eq!(response.status(), 503);
        })
    });
    let spans = spans.lock().unwrap().clone();
    assert_eq!(
        spans
            .iter()
            .filter(|s| s.starts_with("meshkit.request"))
            .collect::<Vec<_>>(),
        ["meshkit.request service=users attempt=1 breaker=Closed"]
    );
    assert_eq!(
        spans
            .iter()
            .filter(|s| s.starts_with("meshkit.endpoint"))
            .collect::<Vec<_>>(),
        [
            "meshkit.endpoint service=users instance=10.0.0.7:8080",
            "meshkit.endpoint service=users instance=10.0.0.7:8080"
        ],
        "one per try"
    );
    assert_eq!(
        spans
            .iter()
            .filter(|s| s.starts_with("meshkit.retry"))
            .collect::<Vec<_>>(),
        ["meshkit.retry service=users attempt=2"],
        "the retry's span, around its endpoint span"
    );
    let retry = spans
        .iter()
        .position(|s| s.starts_with("meshkit.retry"))
        .unwrap();
    assert!(spans[retry + 1].starts_with("meshkit.endpoint"));
}

#[test]
fn a_client_says_when_it_takes_reloaded_policies() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    tracing::subscriber::with_default(Spans(Arc::default(), events.clone()), || {
        runtime.block_on(async {
            let mesh = Mesh::builder().build().unwrap();
            mesh.register(
                Instance::builder("users", "10.0.0.7", 8080)
                    .build()
                    .unwrap(),
            )
            .await
            .unwrap()
            .forget();
            let leaf = tower::service_fn(|_: http::Request<()>| async {
                Ok::<_, std::io::Error>(http::Response::new(()))
            });
            let mut users = mesh.client("users", leaf).unwrap();
            let taken = |events: &Mutex<Vec<String>>| {
                let events = events.lock().unwrap();
                assert!(!events.iter().any(|e| e.starts_with("WARN")), "{events:?}");
                events
                    .iter()
                    .filter(|e| e.contains("client policies reloaded"))
                    .count()
            };
            // Each section, the balancer's and the http one's included, reloads in place.
            for edit in [
                |users: &mut meshkit::mesh::ServiceConfig| users.timeout = None,
                |users: &mut meshkit::mesh::ServiceConfig| users.http.body_limit = 1,
                |users: &mut meshkit::mesh::ServiceConfig| {
                    users.balance.failfast_after = std::time::Duration::from_secs(5)
                },
            ] {
                let before = taken(&events);
                let mut config = mesh.config();
                let mut section = config.service("users").clone();
                edit(&mut section);
                config.services.insert("users".into(), section);
                mesh.reload(config).unwrap();
                let request = http::Request::get("http://users/").body(()).unwrap();
                users.ready().await.unwrap().call(request).await.unwrap();
                assert_eq!(taken(&events), before + 1);
            }
        })
    });
    let events = events.lock().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("INFO") && e.contains("service=users")),
        "{events:?}"
    );
}
