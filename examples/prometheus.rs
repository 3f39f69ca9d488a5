//! meshkit's metrics in Prometheus text format.
//!
//! Run it with `cargo run --example prometheus --features metrics`.
//! It installs the Prometheus recorder, serves a small axum "users" instance on 127.0.0.1
//! (every third request fails), sends 100 requests through a `Mesh` client stack, and prints
//! what a `/metrics` endpoint would serve.

use axum::http::StatusCode;
use axum::routing::get;
use meshkit::discovery::Instance;
use meshkit::{Mesh, MeshConfig};
use metrics_exporter_prometheus::PrometheusBuilder;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tower::{BoxError, Service, ServiceExt};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The recorder first: clients take their metric handles when they are built.
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    meshkit::metrics::describe();

    let served = Arc::new(AtomicU64::new(0));
    let app = axum::Router::new().route(
        "/users/{id}",
        get(move || {
            let n = served.fetch_add(1, Ordering::Relaxed);
            async move {
                if n % 3 == 2 {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let config = MeshConfig::from_toml("[services.users.retry]\nmax_attempts = 2")?;
    let mesh = Mesh::builder().config(config).build()?;
    let _registration = mesh
        .register(Instance::builder("users", "127.0.0.1", port).build()?)
        .await?;
    let mut users = mesh.client("users", reqwest::Client::new())?;
    for id in 0..100 {
        let request = reqwest::Request::new(
            reqwest::Method::GET,
            format!("http://users/users/{id}").parse()?,
        );
        users.ready().await?.call(request).await?;
    }
    // Let the system-event recorder catch up before rendering.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    println!("{}", prometheus.render());
    Ok(())
}
