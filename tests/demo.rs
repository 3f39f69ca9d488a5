//! The README's demo scenario (`cargo run --example mesh`), shortened: real axum instances,
//! a reqwest client stack built by a `Mesh`, an instance stopped and started again.

#[path = "../examples/mesh/scenario.rs"]
mod scenario;

use scenario::{run, Scenario};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_fleet_survives_a_flaky_a_slow_and_a_stopped_instance() {
    let report = run(Scenario {
        requests: 3_000,
        concurrency: 16,
        slow_for: Duration::from_millis(50),
        progress: false,
    })
    .await
    .unwrap();
    println!("{report}");

    let failed: usize = report.failures.values().sum();
    assert_eq!(report.successes + failed, report.requests);
    assert!(
        report.successes * 100 >= report.requests * 98,
        "retries and ejection hide the failures: {report}"
    );
    let served = |name: &str| {
        report
            .instances
            .iter()
            .find(|i| i.0 == name)
            .map(|i| i.2)
            .unwrap()
    };
    assert!(
        served("users-2") < served("users-1"),
        "the flaky instance is ejected: {report}"
    );
    assert!(served("users-3") > 0, "the slow one still serves");
    assert!(report.events.get("EndpointEjected").copied().unwrap_or(0) >= 1);
    assert_eq!(report.events.get("InstanceRegistered"), Some(&3));
    assert!(
        report.events.get("HealthChanged").copied().unwrap_or(0) >= 5,
        "three instances turned passing, the stopped one critical, then passing: {report}"
    );
    assert!(
        report.served_after_restart > 0,
        "the restarted instance serves again: {report}"
    );
    assert!(report.elapsed < Duration::from_secs(30));
}
