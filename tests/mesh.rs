//! The mesh runtime: configuration files, environment overrides, reloading and shutdown.

mod support;

use meshkit::breaker::{BreakerState, CircuitOpen};
use meshkit::classify::DefaultClassifier;
use meshkit::discovery::Instance;
use meshkit::mesh::{MeshClosed, MeshConfigError};
use meshkit::retry::CloneRequest;
use meshkit::{Mesh, MeshConfig};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tower::{BoxError, Service, ServiceExt};

fn error_of(toml: &str) -> String {
    MeshConfig::from_toml(toml).unwrap_err().to_string()
}

/// The error `toml` gets, after checking that it names the key at `path`.
fn error_at(toml: &str, path: &str) -> MeshConfigError {
    let error = MeshConfig::from_toml(toml).unwrap_err();
    assert_eq!(error.path(), Some(path), "{error}");
    error
}

#[test]
fn out_of_range_values_are_named_by_their_path_and_range() {
    assert_eq!(
        error_of("[services.users.breaker]\nfailure_rate = 1.5"),
        "services.users.breaker.failure_rate: must be in (0, 1], got 1.5"
    );
    assert_eq!(
        error_of("[services.users.balance]\nzone = \"eu-1a\"\nmin_local_endpoints = 0"),
        "services.users.balance.min_local_endpoints: must be in [1, 1000], got 0"
    );
    assert_eq!(
        error_of("[defaults.retry]\nmax_attempts = 0"),
        "defaults.retry.max_attempts: must be in [1, 100], got 0"
    );
    assert!(
        error_of("[services.users]\ntimeout = \"0s\"")
            .starts_with("services.users.timeout: must be in [1ms, 1h]"),
        "{}",
        error_of("[services.users]\ntimeout = \"0s\"")
    );
    assert_eq!(
        error_of("[services.users.http]\nretry_statuses = [503, 1000]"),
        "services.users.http.retry_statuses[1]: must be in [100, 999], got 1000"
    );
}

#[test]
fn the_documented_example_config_is_valid() {
    // The example in `MeshConfig`'s docs, word for word.
    let config = MeshConfig::from_toml(
        r#"
[defaults.retry]
max_attempts = 3

[services.users]
timeout = "2s"

[services.users.breaker]
failure_rate = 0.5
window = { kind = "time", duration = "30s" }

[services.users.balance]
picker = "peak_ewma"
ejection = { consecutive_failures = 5 }
"#,
    )
    .unwrap();
    let users = config.service("users");
    assert_eq!(users.retry.max_attempts, 3);
    let ejection = users.balance.ejection.as_ref().unwrap();
    assert_eq!(
        (ejection.consecutive_failures, ejection.failures),
        (Some(5), 0)
    );
}

#[test]
fn ejection_and_breaker_runs_of_failures_are_checked() {
    assert_eq!(
        error_of(
            "[services.users.balance]
ejection = { consecutive_failures = 0 }"
        ),
        "services.users.balance.ejection.consecutive_failures: must be in [1, 1000] when \
         failures is 0, got 0"
    );
    assert_eq!(
        error_of(
            "[services.users.breaker]
consecutive_failures = 0"
        ),
        "services.users.breaker.consecutive_failures: must be in [1, 1000000], got 0"
    );
}

#[test]
fn a_service_turns_off_the_ejection_its_defaults_set_with_none() {
    let config = MeshConfig::from_toml(
        r#"
[defaults.balance]
ejection = { consecutive_failures = 3 }

[services.users.balance]
ejection = "none"
"#,
    )
    .unwrap();
    assert_eq!(config.service("users").balance.ejection, None);
    assert!(config.service("orders").balance.ejection.is_some());
    // Written back as "none", so that reading it again keeps it off.
    let text = toml::to_string(&config).unwrap();
    assert_eq!(MeshConfig::from_toml(&text).unwrap(), config);
    let json: MeshConfig = serde_json::from_str(
        r#"{ "defaults": { "balance": { "ejection": { "consecutive_failures": 3 } } },
             "services": { "users": { "balance": { "ejection": null } } } }"#,
    )
    .unwrap();
    assert_eq!(json.service("users").balance.ejection, None);
    assert_eq!(
        error_of("[services.users.balance]\nejection = \"off\""),
        "services.users.balance.ejection: invalid value: string \"off\", expected a table of \
         ejection settings, or \"none\""
    );
    error_at(
        "[services.users.balance]\nejection = { colour = 1 }",
        "services.users.balance.ejection.colour",
    );
}

#[test]
fn unknown_keys_and_wrong_types_are_errors_naming_the_key() {
    let unknown = error_at(
        "[services.users.breaker]\ncolour = \"red\"",
        "services.users.breaker.colour",
    );
    assert!(
        unknown.to_string().contains("unknown field `colour`"),
        "{unknown}"
    );

    let top = MeshConfig::from_toml("[servises.users]").unwrap_err();
    assert!(
        top.to_string().contains("unknown field `servises`"),
        "{top}"
    );

    error_at(
        "[services.users.retry]\nmax_attempts = \"many\"",
        "services.users.retry.max_attempts",
    );
    error_at(
        "[services.users]\ntimeout = \"soon\"",
        "services.users.timeout",
    );
    let picker = error_at(
        "[services.users.balance]\npicker = \"fastest\"",
        "services.users.balance.picker",
    );
    assert!(
        picker.to_string().contains("round_robin"),
        "lists the allowed values: {picker}"
    );

    assert!(matches!(
        MeshConfig::from_toml("[services.users"),
        Err(MeshConfigError::Syntax(_))
    ));
    let syntax = error_of("[services.users]\ntimeout = \"2s\"\nretry = { max_attempts 3 }\n");
    assert!(
        syntax.starts_with("invalid TOML: line 3, column "),
        "says where: {syntax}"
    );
    assert!(!syntax.contains('\n'), "one line: {syntax}");
    let extended = error_of(
        "[services.users]\nbalance = { picker = \"random\" }\n[services.users.balance.ejection]\n",
    );
    assert!(
        extended.starts_with("invalid TOML: line 3, column 1: ") && !extended.contains('\n'),
        "{extended}"
    );
    assert_eq!(
        error_of("[services.users.http]\nbody_limit = 100000000"),
        "services.users.http.body_limit: must be in [0, 67108864], got 100000000"
    );
}

#[test]
fn every_value_has_a_default() {
    let config = MeshConfig::from_toml("").unwrap();
    assert_eq!(config, MeshConfig::default());
    assert_eq!(
        config.service("anything").timeout,
        Some(Duration::from_secs(10))
    );
}

#[test]
fn a_service_table_lies_over_the_defaults_key_by_key() {
    let config = MeshConfig::from_toml(
        r#"
        [defaults]
        timeout = "5s"
        [defaults.retry]
        max_attempts = 4
        [defaults.breaker]
        window = { kind = "count", size = 50 }

        [services.users.retry]
        deadline = "3s"
        [services.users.breaker]
        window = { kind = "time", duration = "30s" }
        "#,
    )
    .unwrap();
    let users = config.service("users");
    assert_eq!(users.retry.max_attempts, 4, "kept from the defaults");
    assert_eq!(users.retry.deadline, Some(Duration::from_secs(3)));
    assert_eq!(users.timeout, Some(Duration::from_secs(5)));
    assert_eq!(
        users.breaker.window,
        meshkit::breaker::WindowConfig::Time {
            duration: Duration::from_secs(30)
        },
        "a table with a kind replaces the default's"
    );
    assert_eq!(config.service("orders").retry.max_attempts, 4);
}

#[test]
fn infinite_and_nan_values_are_named_by_their_path_and_range() {
    for (toml, message) in [
        (
            "[services.users.breaker]\nfailure_rate = inf",
            "services.users.breaker.failure_rate: must be in (0, 1], got inf",
        ),
        (
            "[services.users.breaker]\nfailure_rate = nan",
            "services.users.breaker.failure_rate: must be in (0, 1], got NaN",
        ),
        (
            "[defaults.balance.ejection]\npanic_threshold = -inf",
            "defaults.balance.ejection.panic_threshold: must be in [0, 1], got -inf",
        ),
    ] {
        assert_eq!(error_of(toml), message);
    }
    // Where a whole number is wanted, serde's own words, with the value as written.
    let error = error_at(
        "[services.users.retry]\nmax_attempts = inf",
        "services.users.retry.max_attempts",
    );
    assert!(error.to_string().contains("inf"), "{error}");
    assert!(!error.to_string().contains("123456789"), "{error}");
    // From the environment too.
    let error = MeshConfig::from_toml_with_env(
        "",
        [("MESHKIT_SERVICES__USERS__BREAKER__SLOW_CALL_RATE", "nan")],
    )
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "services.users.breaker.slow_call_rate: must be in (0, 1], got NaN"
    );
}

#[test]
fn an_unknown_key_in_a_breaker_window_is_named_by_its_path() {
    error_at(
        "[services.users.breaker.window]\nkind = \"count\"\nsizee = 3",
        "services.users.breaker.window.sizee",
    );
    // A key of the other kind is unknown to this one.
    error_at(
        "[services.users.breaker.window]\nkind = \"count\"\nduration = \"30s\"",
        "services.users.breaker.window.duration",
    );
    error_at(
        "[defaults.breaker.window]\nkind = \"time\"\nsize = 3",
        "defaults.breaker.window.size",
    );
}

#[test]
fn a_breaker_window_without_a_kind_takes_it_from_its_fields() {
    use meshkit::breaker::WindowConfig;
    let window = |toml: &str| {
        MeshConfig::from_toml(toml)
            .unwrap()
            .service("users")
            .breaker
            .window
    };
    assert_eq!(
        window("[services.users.breaker]\nwindow = { size = 50 }"),
        WindowConfig::Count { size: 50 }
    );
    assert_eq!(
        window("[services.users.breaker]\nwindow = { duration = \"30s\" }"),
        WindowConfig::Time {
            duration: Duration::from_secs(30)
        }
    );
    assert_eq!(
        window("[services.users.breaker]\nwindow = { kind = \"count\" }"),
        WindowConfig::default()
    );
    // A service's window replaces the defaults' whole, whatever its kind.
    assert_eq!(
        window(
            "[defaults.breaker]\nwindow = { kind = \"time\", duration = \"30s\" }\n\
             [services.users.breaker]\nwindow = { size = 50 }"
        ),
        WindowConfig::Count { size: 50 }
    );
    let config = MeshConfig::from_toml_with_env(
        "[defaults.breaker]\nwindow = { kind = \"time\", duration = \"30s\" }",
        [("MESHKIT_SERVICES__USERS__BREAKER__WINDOW__SIZE", "50")],
    )
    .unwrap();
    assert_eq!(
        config.service("users").breaker.window,
        WindowConfig::Count { size: 50 }
    );
    assert!(
        error_of("[services.users.breaker]\nwindow = { size = 5, duration = \"1s\" }")
            .contains("not both")
    );
    assert!(
        error_of("[services.users.breaker]\nwindow = { kind = \"time\" }")
            .contains("missing field `duration`")
    );
}

#[test]
fn environment_variables_override_the_file() {
    let env = [
        ("MESHKIT_SERVICES__USERS__RETRY__MAX_ATTEMPTS", "5"),
        ("MESHKIT_SERVICES__USERS__TIMEOUT", "750ms"),
        ("MESHKIT_DEFAULTS__BREAKER__FAILURE_RATE", "0.25"),
        ("PATH", "/usr/bin"),
    ];
    let config =
        MeshConfig::from_toml_with_env("[services.users.retry]\nmax_attempts = 2", env).unwrap();
    let users = config.service("users");
    assert_eq!(users.retry.max_attempts, 5);
    assert_eq!(users.timeout, Some(Duration::from_millis(750)));
    assert_eq!(
        users.breaker.failure_rate, 0.25,
        "defaults reach services too"
    );

    let bad = MeshConfig::from_toml_with_env(
        "",
        [("MESHKIT_SERVICES__USERS__BREAKER__FAILURE_RATE", "2")],
    )
    .unwrap_err();
    assert_eq!(
        bad.to_string(),
        "services.users.breaker.failure_rate: must be in (0, 1], got 2"
    );
    let unknown = MeshConfig::from_toml_with_env("", [("MESHKIT_SERVICES__USERS__RETRIES", "2")])
        .unwrap_err();
    assert_eq!(unknown.path(), Some("services.users.retries"), "{unknown}");

    // A variable's name cannot hold `-` or `.`: `_` stands for them in a service's name.
    let config = MeshConfig::from_toml_with_env(
        "[services.user-api]\n[services.\"billing.v2\"]",
        [
            ("MESHKIT_SERVICES__USER_API__RETRY__MAX_ATTEMPTS", "4"),
            ("MESHKIT_SERVICES__BILLING_V2__TIMEOUT", "3s"),
        ],
    )
    .unwrap();
    assert_eq!(config.service("user-api").retry.max_attempts, 4);
    let both = MeshConfig::from_toml_with_env(
        "[services.user-api]\n[services.user_api]",
        [("MESHKIT_SERVICES__USER_API__RETRY__MAX_ATTEMPTS", "4")],
    )
    .unwrap();
    assert_eq!(
        both.service("user_api").retry.max_attempts,
        4,
        "the exact name first"
    );
    assert_eq!(both.service("user-api").retry.max_attempts, 3);
    assert_eq!(
        config.service("billing.v2").timeout,
        Some(Duration::from_secs(3))
    );
}

#[test]
fn serde_deserialize_lays_services_over_defaults_and_checks_values() {
    // As a section of an application's own config, in any serde format.
    #[derive(serde::Deserialize)]
    struct App {
        mesh: MeshConfig,
    }
    let app: App = toml::from_str(
        "[mesh.defaults.retry]\nmax_attempts = 5\n[mesh.services.users]\ntimeout = \"2s\"",
    )
    .unwrap();
    let users = app.mesh.service("users");
    assert_eq!(users.retry.max_attempts, 5, "from the defaults");
    assert_eq!(users.timeout, Some(Duration::from_secs(2)));

    let error = serde_json::from_str::<MeshConfig>(
        r#"{"services": {"users": {"breaker": {"failure_rate": 1.5}}}}"#,
    )
    .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("services.users.breaker.failure_rate: must be in (0, 1], got 1.5"),
        "{error}"
    );
    let error = serde_json::from_str::<MeshConfig>(
        r#"{"services": {"users": {"retry": {"max_attemps": 2}}}}"#,
    )
    .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("services.users.retry.max_attemps: unknown field"),
        "{error}"
    );
}

#[test]
fn no_timeout_is_written_none_and_survives_a_round_trip() {
    let config = MeshConfig::from_toml("[services.users]\ntimeout = \"none\"").unwrap();
    assert_eq!(config.service("users").timeout, None);
    let json = serde_json::from_str::<MeshConfig>(r#"{"services": {"users": {"timeout": null}}}"#)
        .unwrap();
    assert_eq!(json.service("users").timeout, None);
    let written = toml::to_string(&config).unwrap();
    assert_eq!(
        MeshConfig::from_toml(&written).unwrap(),
        config,
        "{written}"
    );
}

#[test]
fn a_config_file_is_read_from_disk() {
    let path = std::env::temp_dir().join(format!("meshkit-{}.toml", std::process::id()));
    std::fs::write(&path, "[services.users.retry]\nmax_attempts = 7\n").unwrap();
    let config = MeshConfig::load(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(config.service("users").retry.max_attempts, 7);
    let missing = MeshConfig::load("/nonexistent/meshkit.toml").unwrap_err();
    assert!(matches!(missing, MeshConfigError::Io(_)), "{missing:?}");
    assert!(
        missing
            .to_string()
            .starts_with("cannot read the config file /nonexistent/meshkit.toml: "),
        "{missing}"
    );
}

#[test]
fn one_word_environment_variables_are_not_config_keys() {
    let env = [
        ("MESHKIT_CONFIG", "/etc/meshkit.toml"),
        ("MESHKIT_LOG", "debug"),
        ("MESHKIT_SHUTDOWN_TIMEOUT", "3s"),
    ];
    let config = MeshConfig::from_toml_with_env("", env).unwrap();
    assert_eq!(config.shutdown_timeout, Duration::from_secs(3));
    // A path with a typo is still an error.
    let error = MeshConfig::from_toml_with_env("", [("MESHKIT_SERVICE__USERS__TIMEOUT", "2s")])
        .unwrap_err();
    assert!(error.to_string().contains("service"), "{error}");
}

/// A mesh whose "users" service has one instance answering with `endpoint`.
async fn mesh_with_failing_users(calls: Arc<AtomicUsize>) -> (Mesh, meshkit::MeshClient<u32, u32>) {
    let config = MeshConfig::from_toml(
        r#"
        [services.users]
        timeout = "10s"
        balance = { picker = "round_robin", failfast_after = "1s" }
        breaker = { minimum_calls = 100 }
        [services.users.retry]
        max_attempts = 1
        budget = "unlimited"
        backoff = { kind = "constant", base = "1ms", jitter = "none" }
        "#,
    )
    .unwrap();
    let mesh = Mesh::builder().config(config).build().unwrap();
    let registration = mesh
        .register(Instance::builder("users", "127.0.0.1", 9).build().unwrap())
        .await
        .unwrap();
    registration.forget();
    let client = refused_users(&mesh, calls);
    (mesh, client)
}

/// A client of "users" whose instances refuse every call, counted in `calls`.
fn refused_users(mesh: &Mesh, calls: Arc<AtomicUsize>) -> meshkit::MeshClient<u32, u32> {
    mesh.client_with(
        "users",
        move |_: &Instance| {
            let calls = calls.clone();
            tower::service_fn(move |_: u32| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<u32, BoxError>("refused".into()) }
            })
        },
        DefaultClassifier,
        CloneRequest,
    )
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn reloaded_policies_apply_without_a_restart() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (mesh, mut client) = mesh_with_failing_users(calls.clone()).await;
    let mut other_clone = client.clone();
    assert!(client.ready().await.unwrap().call(1).await.is_err());
    assert_eq!(calls.swap(0, Ordering::SeqCst), 1, "one attempt");

    let mut config = mesh.config();
    config.services.get_mut("users").unwrap().retry.max_attempts = 3;
    mesh.reload(config).unwrap();
    assert!(client.ready().await.unwrap().call(1).await.is_err());
    assert_eq!(
        calls.swap(0, Ordering::SeqCst),
        3,
        "three attempts after the reload"
    );
    assert!(other_clone.ready().await.unwrap().call(1).await.is_err());
    assert_eq!(calls.swap(0, Ordering::SeqCst), 3, "every clone switches");

    let mut invalid = mesh.config();
    invalid
        .services
        .get_mut("users")
        .unwrap()
        .retry
        .max_attempts = 0;
    let refused = mesh.reload(invalid).unwrap_err();
    assert_eq!(refused.path(), Some("services.users.retry.max_attempts"));
    assert!(client.ready().await.unwrap().call(1).await.is_err());
    assert_eq!(
        calls.swap(0, Ordering::SeqCst),
        3,
        "the valid policies stay"
    );
}

#[tokio::test(start_paused = true)]
async fn a_watch_channel_reloads_the_policies() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (mesh, mut client) = mesh_with_failing_users(calls.clone()).await;
    let (updates, receiver) = tokio::sync::watch::channel(mesh.config());
    mesh.reload_from(receiver);
    let mut config = mesh.config();
    config.services.get_mut("users").unwrap().retry.max_attempts = 2;
    updates.send(config).unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(client.ready().await.unwrap().call(1).await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// The mesh's config with "users" retried up to `attempts` tries.
fn users_with_attempts(mesh: &Mesh, attempts: u32) -> MeshConfig {
    let mut config = mesh.config();
    config.services.get_mut("users").unwrap().retry.max_attempts = attempts;
    config
}

/// A mesh of failing "users" (its calls counted) that reloads from a watch channel, whose
/// first value gives 2 attempts.
async fn reloaded_from_a_channel() -> (
    Mesh,
    Arc<AtomicUsize>,
    tokio::sync::watch::Sender<MeshConfig>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let (mesh, _) = mesh_with_failing_users(calls.clone()).await;
    let (updates, receiver) = tokio::sync::watch::channel(users_with_attempts(&mesh, 2));
    mesh.reload_from(receiver);
    (mesh, calls, updates)
}

/// Sends one call that fails; the tries it made, counted in `calls` (then reset).
async fn tries(client: &mut meshkit::MeshClient<u32, u32>, calls: &AtomicUsize) -> usize {
    assert!(client.ready().await.unwrap().call(1).await.is_err());
    calls.swap(0, Ordering::SeqCst)
}

#[tokio::test(start_paused = true)]
async fn a_config_sent_on_the_watch_channel_applies_to_the_very_next_call() {
    let (mesh, calls, updates) = reloaded_from_a_channel().await;
    let with_attempts = |attempts| users_with_attempts(&mesh, attempts);
    assert_eq!(
        mesh.config().service("users").retry.max_attempts,
        2,
        "the channel's value applies at once"
    );
    let mut client = refused_users(&mesh, calls.clone());
    let mut other = client.clone();
    for attempts in [3, 1, 4] {
        // No await in between: the send is seen by the client's own poll_ready.
        updates.send(with_attempts(attempts)).unwrap();
        assert_eq!(tries(&mut client, &calls).await, attempts as usize);
        assert_eq!(
            tries(&mut other, &calls).await,
            attempts as usize,
            "every clone"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_built_later_does_not_apply_an_old_value_of_the_watch_channel() {
    let (mesh, calls, updates) = reloaded_from_a_channel().await;
    let with_attempts = |attempts| users_with_attempts(&mesh, attempts);
    let mut first = refused_users(&mesh, calls.clone());
    updates.send(with_attempts(3)).unwrap();
    assert_eq!(tries(&mut first, &calls).await, 3);
    // A reload by hand after the channel's last value: it stands for clients built later.
    mesh.reload(with_attempts(4)).unwrap();
    let mut later = refused_users(&mesh, calls.clone());
    assert_eq!(tries(&mut later, &calls).await, 4);
    assert_eq!(tries(&mut first, &calls).await, 4);
    tokio::task::yield_now().await; // the mesh's own task, too, leaves it alone
    assert_eq!(mesh.config().service("users").retry.max_attempts, 4);
}

#[tokio::test(start_paused = true)]
async fn a_client_built_right_after_a_send_runs_under_the_sent_config() {
    let (mesh, calls, updates) = reloaded_from_a_channel().await;
    let with_attempts = |attempts| users_with_attempts(&mesh, attempts);
    updates.send(with_attempts(3)).unwrap();
    // Built before the mesh's task has run.
    let mut client = refused_users(&mesh, calls.clone());
    assert_eq!(tries(&mut client, &calls).await, 3);
}

/// A mesh with "users" on ports 1, 2 and 3, a random picker and one retry (unlimited budget,
/// 1 ms backoff), with `retry` (TOML lines) added to the retry section.
async fn three_users_retried_once(retry: &str) -> Mesh {
    support::mesh_with(
        &format!(
            "[services.users]\nbalance = {{ picker = \"random\", ejection = \"none\" }}\n\
             [services.users.retry]\nmax_attempts = 2\nbudget = \"unlimited\"\n\
             backoff = {{ kind = \"constant\", base = \"1ms\", jitter = \"none\" }}\n{retry}"
        ),
        &[1, 2, 3],
    )
    .await
}

#[tokio::test(start_paused = true)]
async fn a_retry_goes_to_another_instance_than_the_try_that_failed() {
    let mesh = three_users_retried_once("").await;
    // Instance 1 refuses every call; 2 and 3 answer with their port.
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut client = mesh
        .client_with(
            "users",
            {
                let calls = calls.clone();
                move |instance: &Instance| {
                    let (port, calls) = (instance.port, calls.clone());
                    tower::service_fn(move |_: u32| {
                        calls.lock().unwrap().push(port);
                        async move {
                            match port {
                                1 => Err::<u16, BoxError>("refused".into()),
                                port => Ok(port),
                            }
                        }
                    })
                }
            },
            DefaultClassifier,
            CloneRequest,
        )
        .unwrap();
    for _ in 0..200 {
        let port = client.ready().await.unwrap().call(0).await.unwrap();
        assert_ne!(port, 1);
    }
    let calls = calls.lock().unwrap();
    let first_tries_refused = calls.iter().filter(|&&port| port == 1).count();
    assert!(first_tries_refused > 20, "the picker chose instance 1 too");
    assert_eq!(
        calls.len(),
        200 + first_tries_refused,
        "each refused try was retried once, elsewhere"
    );
    // Calls go one at a time: a retry is the call right after a refused try. Retries spread
    // over the other instances as the picker spreads calls.
    let retried_to = |port| calls.windows(2).filter(|w| w == &[1, port]).count();
    for port in [2, 3] {
        assert!(
            retried_to(port) * 4 >= first_tries_refused,
            "{} of {first_tries_refused} retries to instance {port}",
            retried_to(port)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_a_try_timed_out_goes_to_another_instance() {
    let mesh = three_users_retried_once("per_try_timeout = \"100ms\"").await;
    // Instance 1 never answers; 2 and 3 answer with their port.
    let mut client = instance_1_hangs(&mesh);
    let started = tokio::time::Instant::now();
    for _ in 0..100 {
        let port = client.ready().await.unwrap().call(0).await.unwrap();
        assert_ne!(port, 1);
    }
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "some first tries went to instance 1 and timed out"
    );
}

/// `mesh`'s config with `edit` applied to the "users" section, reloaded.
fn reload_users(mesh: &Mesh, edit: impl FnOnce(&mut meshkit::mesh::ServiceConfig)) {
    let mut config = mesh.config();
    edit(config.services.get_mut("users").unwrap());
    mesh.reload(config).unwrap();
}

#[tokio::test(start_paused = true)]
async fn reloading_another_services_policies_leaves_this_ones_breaker_alone() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (mesh, mut client) = mesh_with_failing_users(calls.clone()).await;
    client.breaker().force_open();
    let mut config = mesh.config();
    let mut orders = config.service("orders").clone();
    orders.retry.max_attempts = 4;
    config.services.insert("orders".into(), orders);
    mesh.reload(config).unwrap();

    let error = client.ready().await.unwrap().call(1).await.unwrap_err();
    assert!(meshkit::error::is::<CircuitOpen>(&*error), "{error}");
    assert_eq!(client.breaker().state(), BreakerState::ForcedOpen);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "the open breaker still refuses"
    );
}

#[tokio::test(start_paused = true)]
async fn reloading_retry_settings_keeps_the_breaker_and_the_budget() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (mesh, mut client) = mesh_with_failing_users(calls.clone()).await;
    reload_users(&mesh, |users| users.retry.max_attempts = 3);
    assert!(client.ready().await.unwrap().call(1).await.is_err());
    assert_eq!(calls.swap(0, Ordering::SeqCst), 3);
    assert_eq!(client.retry_budget().snapshot().withdrawals, 2);
    let failures = client.breaker().metrics().failures;
    assert!(failures > 0);

    reload_users(&mesh, |users| users.retry.max_attempts = 2);
    assert!(client.ready().await.unwrap().call(1).await.is_err());
    assert_eq!(calls.swap(0, Ordering::SeqCst), 2, "the new attempts apply");
    assert_eq!(
        client.retry_budget().snapshot().withdrawals,
        3,
        "the budget (same terms) kept its count"
    );
    assert!(
        client.breaker().metrics().failures > failures,
        "the breaker kept its count"
    );
}

#[tokio::test(start_paused = true)]
async fn reloading_breaker_thresholds_gives_a_breaker_under_the_new_ones() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (mesh, mut client) = mesh_with_failing_users(calls.clone()).await;
    for _ in 0..10 {
        assert!(client.ready().await.unwrap().call(1).await.is_err());
    }
    assert_eq!(
        client.breaker().state(),
        BreakerState::Closed,
        "below minimum_calls = 100"
    );

    reload_users(&mesh, |users| users.breaker.minimum_calls = 5);
    for _ in 0..5 {
        assert!(client.ready().await.unwrap().call(1).await.is_err());
    }
    assert_eq!(client.breaker().state(), BreakerState::Open);
    calls.store(0, Ordering::SeqCst);
    assert!(client.ready().await.unwrap().call(1).await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the new breaker refuses");
}

#[tokio::test(start_paused = true)]
async fn reloading_ejection_thresholds_applies_to_clients_built_before() {
    let config = MeshConfig::from_toml(
        r#"
        [services.users]
        balance = { picker = "round_robin", ejection = { consecutive_failures = 1000 } }
        breaker = { minimum_calls = 100 }
        retry = { max_attempts = 1 }
        "#,
    )
    .unwrap();
    let mesh = Mesh::builder().config(config).build().unwrap();
    for port in [1, 2] {
        mesh.register(
            Instance::builder("users", "127.0.0.1", port)
                .build()
                .unwrap(),
        )
        .await
        .unwrap()
        .forget();
    }
    // Instance 1 fails every call; 2 answers with its port.
    let mut client = mesh
        .client_with(
            "users",
            |instance: &Instance| {
                let port = instance.port;
                tower::service_fn(move |_: u32| async move {
                    match port {
                        1 => Err::<u16, BoxError>("down".into()),
                        _ => Ok(port),
                    }
                })
            },
            DefaultClassifier,
            CloneRequest,
        )
        .unwrap();
    async fn failures(client: &mut meshkit::MeshClient<u32, u16>, calls: usize) -> usize {
        let mut failed = 0;
        for _ in 0..calls {
            failed += client.ready().await.unwrap().call(0).await.is_err() as usize;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        failed
    }
    assert_eq!(
        failures(&mut client, 20).await,
        10,
        "no ejection under 1000"
    );

    reload_users(&mesh, |users| {
        users
            .balance
            .ejection
            .as_mut()
            .unwrap()
            .consecutive_failures = Some(2);
    });
    let warm_up = failures(&mut client, 10).await;
    assert!(warm_up <= 2, "ejected after two failures, got {warm_up}");
    assert_eq!(
        failures(&mut client, 20).await,
        0,
        "instance 1 ejected under the reloaded threshold"
    );
}

/// A client of "users" whose instance 1 never answers while the others answer at once with
/// their port.
fn instance_1_hangs(mesh: &Mesh) -> meshkit::MeshClient<u32, u16> {
    mesh.client_with(
        "users",
        |instance: &Instance| {
            let port = instance.port;
            tower::service_fn(move |_: u32| async move {
                if port == 1 {
                    std::future::pending::<()>().await;
                }
                Ok::<u16, BoxError>(port)
            })
        },
        DefaultClassifier,
        CloneRequest,
    )
    .unwrap()
}

/// A mesh configured by `toml` over "users" instances on ports 1 and 2, and a client whose
/// instance 1 never answers while 2 answers at once with its port.
async fn one_instance_hangs(toml: &str) -> (Mesh, meshkit::MeshClient<u32, u16>) {
    let mesh = Mesh::builder()
        .config(MeshConfig::from_toml(toml).unwrap())
        .build()
        .unwrap();
    for port in [1, 2] {
        mesh.register(
            Instance::builder("users", "127.0.0.1", port)
                .build()
                .unwrap(),
        )
        .await
        .unwrap()
        .forget();
    }
    let client = instance_1_hangs(&mesh);
    (mesh, client)
}

#[tokio::test(start_paused = true)]
async fn calls_cut_short_by_the_timeout_open_the_breaker_over_a_backend_that_hangs() {
    let (_mesh, mut client) = one_instance_hangs(
        r#"
        [services.users]
        timeout = "100ms"
        balance = { picker = "round_robin", ejection = "none" }
        breaker = { failure_rate = 0.4, minimum_calls = 10 }
        retry = { max_attempts = 1 }
        "#,
    )
    .await;
    for _ in 0..10 {
        let _ = client.ready().await.unwrap().call(0).await;
    }
    assert_eq!(
        client.breaker().state(),
        BreakerState::Open,
        "5 of 10 calls timed out: {:?}",
        client.breaker().metrics()
    );
    let error = client.ready().await.unwrap().call(0).await.unwrap_err();
    assert!(meshkit::error::is::<CircuitOpen>(&*error), "{error}");
}

#[tokio::test(start_paused = true)]
async fn an_instance_whose_tries_time_out_is_ejected() {
    let (_mesh, mut client) = one_instance_hangs(
        r#"
        [services.users]
        balance = { picker = "round_robin", ejection = { consecutive_failures = 2 } }
        breaker = { minimum_calls = 100 }
        [services.users.retry]
        max_attempts = 2
        per_try_timeout = "100ms"
        backoff = { kind = "constant", base = "1ms", jitter = "none" }
        "#,
    )
    .await;
    for _ in 0..6 {
        assert_eq!(client.ready().await.unwrap().call(0).await.unwrap(), 2);
    }
    // Ejected: no call waits out a try on it any more.
    let started = tokio::time::Instant::now();
    for _ in 0..20 {
        assert_eq!(client.ready().await.unwrap().call(0).await.unwrap(), 2);
    }
    assert_eq!(started.elapsed(), Duration::ZERO);
}

/// A client of `service` whose instances answer each call with its number after 5 s.
fn answers_in_5s(mesh: &Mesh, service: &str) -> meshkit::MeshClient<u32, u32> {
    mesh.client_with(
        service,
        |_: &Instance| {
            tower::service_fn(|n: u32| async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok::<u32, BoxError>(n)
            })
        },
        DefaultClassifier,
        CloneRequest,
    )
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn reloading_the_timeout_applies_to_the_next_calls() {
    let mesh = Mesh::builder()
        .config(MeshConfig::from_toml("[services.users]\ntimeout = \"10s\"").unwrap())
        .build()
        .unwrap();
    mesh.register(Instance::builder("users", "127.0.0.1", 9).build().unwrap())
        .await
        .unwrap()
        .forget();
    let mut client = answers_in_5s(&mesh, "users");
    assert_eq!(client.ready().await.unwrap().call(7).await.unwrap(), 7);

    reload_users(&mesh, |users| users.timeout = Some(Duration::from_secs(1)));
    let started = tokio::time::Instant::now();
    let error = client.ready().await.unwrap().call(7).await.unwrap_err();
    assert!(error.is::<tower::timeout::error::Elapsed>(), "{error}");
    assert_eq!(started.elapsed(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn shutdown_deregisters_and_refuses_new_calls() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (mesh, mut client) = mesh_with_failing_users(calls.clone()).await;
    assert_eq!(mesh.registry().snapshot("users").instances().len(), 1);
    assert!(mesh.shutdown().await, "nothing was in flight");
    assert!(mesh.registry().snapshot("users").instances().is_empty());
    let error = client.call(1).await.unwrap_err();
    assert!(error.downcast_ref::<MeshClosed>().is_some(), "{error}");
    // At once, from readiness too: not after the balancer's wait for an instance.
    let started = tokio::time::Instant::now();
    let error = client.clone().oneshot(2).await.unwrap_err();
    assert!(error.downcast_ref::<MeshClosed>().is_some(), "{error}");
    assert_eq!(started.elapsed(), Duration::ZERO);
}

/// A mesh whose "slow" service answers in 5 s (1 h timeout, no retries), its client, and
/// one call made and not yet polled.
async fn a_call_answered_in_5s() -> (
    Mesh,
    meshkit::MeshClient<u32, u32>,
    meshkit::mesh::ResponseFuture<u32>,
) {
    let mesh = support::mesh_of(
        "[services.slow]\ntimeout = \"1h\"\nretry = { max_attempts = 1 }",
        [support::instance("slow", "127.0.0.1", 9)],
    )
    .await;
    let mut client = answers_in_5s(&mesh, "slow");
    let call = client.ready().await.unwrap().call(7);
    (mesh, client, call)
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_calls_in_flight() {
    let (mesh, _client, call) = a_call_answered_in_5s().await;
    let in_flight = tokio::spawn(call);
    let started = tokio::time::Instant::now();
    assert!(mesh.shutdown().await);
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "waited for the call"
    );
    assert_eq!(in_flight.await.unwrap().unwrap(), 7);
}

#[tokio::test(start_paused = true)]
async fn a_call_dropped_on_another_thread_after_its_client_is_counted_out() {
    let (mesh, client, call) = a_call_answered_in_5s().await;
    drop(client);
    // A thread that never saw this mesh: the call finds the mesh's lifecycle from there.
    std::thread::spawn(move || drop(call)).join().unwrap();
    let started = tokio::time::Instant::now();
    assert!(mesh.shutdown().await, "nothing left in flight");
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn calls_of_many_meshes_on_one_thread_are_each_counted_out() {
    // More meshes than a thread keeps track of at once, their calls in turn: every call still
    // counts out of its own mesh.
    let mut meshes = Vec::new();
    for _ in 0..7 {
        let mesh = support::mesh_of(
            "[services.slow]\nretry = { max_attempts = 1 }",
            [support::instance("slow", "127.0.0.1", 9)],
        )
        .await;
        let client = answers_in_5s(&mesh, "slow");
        meshes.push((mesh, client));
    }
    for _ in 0..3 {
        let calls = meshes
            .iter_mut()
            .map(|(_, client)| client.clone().oneshot(7));
        for answer in futures::future::join_all(calls).await {
            assert_eq!(answer.unwrap(), 7);
        }
    }
    let started = tokio::time::Instant::now();
    for (mesh, _) in &meshes {
        assert!(mesh.shutdown().await, "nothing left in flight");
    }
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn each_mesh_sees_only_its_own_system_events() {
    use futures::FutureExt;
    use meshkit::events::system::{self, SystemEvent};
    let mut process = system::bus().subscribe();
    let config = "[defaults]\nretry = { max_attempts = 1 }\n\
                  breaker = { minimum_calls = 2, window = { kind = \"count\", size = 2 } }";
    let (first, second) = (
        Mesh::builder()
            .config(MeshConfig::from_toml(config).unwrap())
            .build()
            .unwrap(),
        Mesh::builder()
            .config(MeshConfig::from_toml(config).unwrap())
            .build()
            .unwrap(),
    );
    let (mut first_events, mut second_events) =
        (first.events().subscribe(), second.events().subscribe());
    first
        .register(Instance::builder("users", "127.0.0.1", 9).build().unwrap())
        .await
        .unwrap()
        .forget();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut users = refused_users(&first, calls);
    for _ in 0..2 {
        let _ = users.ready().await.unwrap().call(1).await;
    }
    let kinds = |events: &mut meshkit::events::Subscription<SystemEvent>| {
        let mut kinds = Vec::new();
        while let Some(Ok(event)) = events.recv().now_or_never() {
            kinds.push(event.event_type.to_string());
        }
        kinds
    };
    assert_eq!(
        kinds(&mut first_events),
        // The breaker opens on the second call's outcome, before the retry layer sees it.
        [
            "InstanceRegistered",
            "RetriesExhausted",
            "BreakerTransition",
            "RetriesExhausted"
        ]
    );
    assert_eq!(
        kinds(&mut second_events),
        Vec::<String>::new(),
        "none of the first's"
    );
    let seen = kinds(&mut process);
    for kind in ["InstanceRegistered", "BreakerTransition"] {
        assert!(
            seen.iter().any(|k| k == kind),
            "the process bus has them too: {seen:?}"
        );
    }
}

/// Calls through a mesh configured by `toml` over "users" on ports 1 and 2, where 1 refuses
/// every call; how many calls reached port 1, of 100 (each retried once at most).
async fn calls_to_the_refusing_instance(toml: &str) -> usize {
    let mesh = support::mesh_with(toml, &[1, 2]).await;
    let refused = Arc::new(AtomicUsize::new(0));
    let mut client = mesh
        .client_with(
            "users",
            {
                let refused = refused.clone();
                move |instance: &Instance| {
                    let (port, refused) = (instance.port, refused.clone());
                    tower::service_fn(move |_: u32| {
                        let result = match port {
                            1 => {
                                refused.fetch_add(1, Ordering::SeqCst);
                                Err::<u16, BoxError>("refused".into())
                            }
                            port => Ok(port),
                        };
                        async move { result }
                    })
                }
            },
            DefaultClassifier,
            CloneRequest,
        )
        .unwrap();
    for _ in 0..100 {
        assert_eq!(client.ready().await.unwrap().call(0).await.unwrap(), 2);
        tokio::task::yield_now().await;
    }
    refused.load(Ordering::SeqCst)
}

#[tokio::test(start_paused = true)]
async fn a_mesh_ejects_a_failing_instance_unless_told_not_to() {
    let config = "[services.users]\nbalance = { picker = \"round_robin\" }\n\
                  retry = { max_attempts = 2, budget = \"unlimited\" }";
    let default = calls_to_the_refusing_instance(config).await;
    assert_eq!(default, 5, "ejected after 5 failures in a row, by default");
    let empty = "[services.users]\nbalance = { picker = \"round_robin\", ejection = {} }\n\
                 retry = { max_attempts = 2, budget = \"unlimited\" }";
    assert_eq!(
        calls_to_the_refusing_instance(empty).await,
        5,
        "an empty ejection table: the defaults"
    );
    let none = "[services.users]\nbalance = { picker = \"round_robin\", ejection = \"none\" }\n\
                retry = { max_attempts = 2, budget = \"unlimited\" }";
    assert_eq!(
        calls_to_the_refusing_instance(none).await,
        50,
        "every other call"
    );
    assert_eq!(
        MeshConfig::default().service("users").balance.ejection,
        Some(meshkit::balance::EjectionConfig::default()),
        "a config built in code ejects too"
    );
}
