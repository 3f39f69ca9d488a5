//! The meshkit demo: a fleet of three HTTP instances survives failures behind one client stack.
//!
//! Run it with `cargo run --example mesh`. It needs no server or network beyond 127.0.0.1,
//! prints progress while it runs, ends with a report, and finishes in well under 30 seconds.
//!
//! Three axum instances of a "users" service start on OS-chosen ports: `users-1` healthy,
//! `users-2` failing every other request with a 500, `users-3` slow. They register with HTTP
//! health checks. A `Mesh` builds a `reqwest` client stack from the TOML in
//! `scenario.rs` (peak-EWMA balancing with outlier ejection, a breaker, budgeted retries, a
//! timeout) and sends a few thousand concurrent requests. A third of the way through,
//! `users-1` stops; two thirds of the way, it starts again. Retries hide the 500s and the
//! refused connections, ejection keeps `users-2` out most of the time, peak-EWMA sends little
//! to the slow `users-3`, and the health checks take `users-1` out and bring it back.

mod scenario;

use scenario::{run, Scenario};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), tower::BoxError> {
    println!("meshkit demo: 3 instances of \"users\", one healthy, one flaky, one slow\n");
    let report = run(Scenario {
        requests: 4_000,
        concurrency: 32,
        slow_for: Duration::from_millis(50),
        progress: true,
    })
    .await?;
    println!("\n{report}");
    Ok(())
}
