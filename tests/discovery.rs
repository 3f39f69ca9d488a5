//! The embedded registry, health checks and the `discover` adapter through the public API.

mod support;

use futures::StreamExt;
use meshkit::discovery::{
    discover, filter_watch, Filter, Health, HealthCheck, Instance, MemoryRegistry, Registry,
    RegistryError, Update,
};
use std::time::Duration;
use tower::{Service, ServiceExt};

fn instance(service: &str, host: &str, port: u16) -> Instance {
    Instance::builder(service, host, port).build().unwrap()
}

fn ttl(secs: u64) -> HealthCheck {
    HealthCheck::Ttl {
        ttl: Duration::from_secs(secs),
    }
}

#[tokio::test(start_paused = true)]
async fn a_missing_service_differs_from_one_with_zero_instances() {
    let registry = MemoryRegistry::new();
    let missing = registry.instances("users").await.unwrap();
    assert!(!missing.exists());
    let users = registry
        .register(instance("users", "10.0.0.1", 80))
        .await
        .unwrap();
    users.deregister().await;
    let empty = registry.instances("users").await.unwrap();
    assert!(empty.exists());
    assert!(empty.instances().is_empty());
    assert!(empty.revision() > missing.revision());
}

#[tokio::test(start_paused = true)]
async fn reads_share_one_snapshot_until_the_service_changes() {
    let registry = MemoryRegistry::new();
    let _a = registry
        .register(instance("users", "10.0.0.1", 80))
        .await
        .unwrap();
    let first = registry.instances("users").await.unwrap();
    let second = registry.instances("users").await.unwrap();
    assert!(
        std::ptr::eq(first.instances(), second.instances()),
        "an Arc clone, not a copy"
    );
    let _b = registry
        .register(instance("users", "10.0.0.2", 80))
        .await
        .unwrap();
    let third = registry.instances("users").await.unwrap();
    assert_eq!(third.instances().len(), 2);
    assert_eq!(first.instances().len(), 1, "old snapshots do not change");
}

#[tokio::test(start_paused = true)]
async fn watchers_see_a_reset_then_changes_in_revision_order() {
    let registry = MemoryRegistry::new();
    let a = registry
        .register(instance("users", "10.0.0.1", 80))
        .await
        .unwrap();
    let mut watch = registry.watch("users");
    let Some(Update::Reset(snapshot)) = watch.next().await else {
        panic!("a reset comes first")
    };
    assert_eq!(snapshot.instances().len(), 1);
    let b = registry
        .register(instance("users", "10.0.0.2", 80))
        .await
        .unwrap();
    let _other = registry
        .register(instance("orders", "10.0.0.3", 80))
        .await
        .unwrap();
    drop(a);
    let mut revisions = vec![snapshot.revision()];
    match watch.next().await.unwrap() {
        Update::Upsert { revision, instance } => {
            assert_eq!(instance.id, b.id());
            revisions.push(revision);
        }
        other => panic!("{other:?}"),
    }
    match watch.next().await.unwrap() {
        Update::Remove { revision, .. } => revisions.push(revision),
        other => panic!("{other:?}"),
    }
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
}

#[tokio::test(start_paused = true)]
async fn a_watcher_that_falls_behind_gets_a_fresh_reset() {
    let registry = MemoryRegistry::new();
    let mut watch = registry.watch("users");
    assert!(matches!(watch.next().await, Some(Update::Reset(_))));
    let mut kept = Vec::new();
    for i in 0..1_000u32 {
        let registration = registry
            .register(instance("users", "10.0.0.1", 1 + (i % 60_000) as u16))
            .await
            .unwrap();
        if i % 2 == 0 {
            kept.push(registration);
        }
    }
    let Some(Update::Reset(snapshot)) = watch.next().await else {
        panic!("a lagging watcher is reset, not fed 2000 queued updates")
    };
    assert_eq!(snapshot.instances().len(), 500);
    assert_eq!(snapshot.revision(), registry.revision());
}

#[tokio::test(start_paused = true)]
async fn dropping_a_registration_deregisters_the_instance() {
    let registry = MemoryRegistry::new();
    let registration = registry
        .register(instance("users", "10.0.0.1", 80))
        .await
        .unwrap();
    let id = registration.id();
    drop(registration);
    assert!(registry
        .instances("users")
        .await
        .unwrap()
        .get(&id)
        .is_none());
    assert!(matches!(
        registry.deregister(&id).await,
        Err(RegistryError::NotFound(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn ttl_instances_turn_critical_without_heartbeats_and_recover_with_one() {
    let registry = MemoryRegistry::new();
    let users = registry
        .register(
            Instance::builder("users", "10.0.0.1", 80)
                .check(ttl(10))
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let health =
        |registry: &MemoryRegistry| registry.snapshot("users").get(&users.id()).unwrap().health;
    tokio::time::sleep(Duration::from_secs(6)).await;
    registry.heartbeat(&users.id()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(
        health(&registry),
        Health::Passing,
        "the heartbeat at 6 s holds until 16 s"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(health(&registry), Health::Critical);
    registry.heartbeat(&users.id()).await.unwrap();
    assert_eq!(health(&registry), Health::Passing);
}

#[tokio::test(start_paused = true)]
async fn critical_instances_are_removed_after_deregister_after() {
    let registry = MemoryRegistry::new();
    let users = registry
        .register(
            Instance::builder("users", "10.0.0.1", 80)
                .check(ttl(5))
                .deregister_after(Duration::from_secs(30))
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(
        registry.snapshot("users").get(&users.id()).unwrap().health,
        Health::Critical
    );
    tokio::time::sleep(Duration::from_secs(16)).await;
    assert!(
        registry.snapshot("users").get(&users.id()).is_none(),
        "critical since 5 s, gone at 35 s"
    );
}

#[tokio::test(start_paused = true)]
async fn heartbeats_need_a_ttl_check() {
    let registry = MemoryRegistry::new();
    let users = registry
        .register(instance("users", "10.0.0.1", 80))
        .await
        .unwrap();
    assert!(matches!(
        registry.heartbeat(&users.id()).await,
        Err(RegistryError::NotTtl(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn reads_and_watches_filter_by_tag_metadata_zone_and_health() {
    let registry = MemoryRegistry::new();
    let v2 = Instance::builder("users", "10.0.0.1", 80)
        .tag("v2")
        .metadata("tier", "gold")
        .zone("a")
        .build()
        .unwrap();
    let v1 = Instance::builder("users", "10.0.0.2", 80)
        .tag("v1")
        .zone("b")
        .build()
        .unwrap();
    let (_v2, _v1) = (
        registry.register(v2.clone()).await.unwrap(),
        registry.register(v1).await.unwrap(),
    );
    let snapshot = registry.instances("users").await.unwrap();
    let filter = Filter::new()
        .tag("v2")
        .metadata("tier", "gold")
        .zone("a")
        .health(&[Health::Passing]);
    let found: Vec<_> = snapshot.filtered(&filter).map(|i| i.id).collect();
    assert_eq!(found, [v2.id]);
    let mut watch = filter_watch(registry.watch("users"), Filter::new().zone("b"));
    let Some(Update::Reset(reset)) = watch.next().await else {
        panic!()
    };
    assert_eq!(reset.instances().len(), 1);
    assert_eq!(reset.instances()[0].zone.as_deref(), Some("b"));
}

#[tokio::test]
async fn tcp_checks_follow_a_real_listener() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accept = tokio::spawn(async move {
        loop {
            if listener.accept().await.is_err() {
                break;
            }
        }
    });
    let registry = MemoryRegistry::new();
    let check = HealthCheck::Tcp {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(100),
        failures_before_critical: 2,
        successes_before_passing: 2,
    };
    let _users = registry
        .register(
            Instance::builder("users", "127.0.0.1", port)
                .check(check)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let mut watch = registry.watch("users");
    let mut health_changes = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout_at(deadline, watch.next()).await {
            Ok(Some(Update::Upsert { instance, .. })) => {
                health_changes.push(instance.health);
                if instance.health == Health::Passing {
                    break;
                }
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    assert_eq!(
        health_changes,
        [Health::Passing],
        "Unknown, then passing after two connects"
    );
    accept.abort();
    let _ = accept.await;
    let started = tokio::time::Instant::now();
    support::next_health(&mut watch, Health::Critical).await;
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "two failures, not one"
    );
}

#[tokio::test(start_paused = true)]
async fn discover_feeds_tower_p2c_while_instances_come_and_go() {
    let registry = MemoryRegistry::new();
    let a = registry
        .register(instance("users", "10.0.0.1", 80))
        .await
        .unwrap();
    let b = registry
        .register(instance("users", "10.0.0.2", 80))
        .await
        .unwrap();
    let endpoints = discover(&registry, "users", |instance: &Instance| {
        let host = instance.host.clone();
        let endpoint = tower::service_fn(move |()| {
            let host = host.clone();
            async move { Ok::<_, tower::BoxError>(host) }
        });
        // p2c compares loads; every endpoint here costs the same.
        tower::load::Constant::new(endpoint, 0usize)
    });
    let mut balance = tower::balance::p2c::Balance::new(endpoints);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..50 {
        seen.insert(balance.ready().await.unwrap().call(()).await.unwrap());
    }
    assert_eq!(seen.len(), 2, "both instances serve: {seen:?}");
    drop(a);
    for _ in 0..50 {
        let host = balance.ready().await.unwrap().call(()).await.unwrap();
        assert_eq!(host, "10.0.0.2", "the deregistered instance gets nothing");
    }
    let _c = registry
        .register(instance("users", "10.0.0.3", 80))
        .await
        .unwrap();
    drop(b);
    for _ in 0..20 {
        let host = balance.ready().await.unwrap().call(()).await.unwrap();
        assert_eq!(host, "10.0.0.3");
    }
}

#[tokio::test(start_paused = true)]
async fn discover_yields_only_passing_instances() {
    let registry = MemoryRegistry::new();
    let users = registry
        .register(
            Instance::builder("users", "10.0.0.1", 80)
                .check(ttl(5))
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let mut endpoints = discover(&registry, "users", |instance: &Instance| instance.id);
    assert!(matches!(
        endpoints.next().await,
        Some(Ok(tower::discover::Change::Insert(id, _))) if id == users.id()
    ));
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(matches!(
        endpoints.next().await,
        Some(Ok(tower::discover::Change::Remove(id))) if id == users.id()
    ));
    registry.heartbeat(&users.id()).await.unwrap();
    assert!(matches!(
        endpoints.next().await,
        Some(Ok(tower::discover::Change::Insert(id, _))) if id == users.id()
    ));
}

#[tokio::test(start_paused = true)]
async fn re_registering_an_id_survives_the_old_guard() {
    let registry = MemoryRegistry::new();
    let first = registry
        .register(instance("users", "10.0.0.1", 80))
        .await
        .unwrap();
    let moved = Instance::builder("users", "10.0.0.9", 80)
        .id(first.id())
        .build()
        .unwrap();
    let second = registry.register(moved).await.unwrap();
    drop(first); // the old guard must not remove the new registration
    let snapshot = registry.snapshot("users");
    assert_eq!(snapshot.get(&second.id()).unwrap().host, "10.0.0.9");
    assert_eq!(snapshot.instances().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_instance_registered_critical_is_still_removed_after_deregister_after() {
    let registry = MemoryRegistry::new();
    let users = registry
        .register(
            Instance::builder("users", "10.0.0.1", 80)
                .check(ttl(5))
                .deregister_after(Duration::from_secs(10))
                .health(Health::Critical)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(registry.snapshot("users").get(&users.id()).is_none());
}

#[tokio::test(start_paused = true)]
async fn watching_names_that_do_not_exist_does_not_grow_the_registry() {
    let registry = MemoryRegistry::new();
    for n in 0..1_000 {
        let mut watch = registry.watch(&format!("ghost-{n}"));
        let _ = watch.next().await;
    }
    let description = format!("{registry:?}");
    assert!(description.contains("services: 1,"), "{description}");
}

#[tokio::test]
async fn an_actively_checked_instance_critical_for_deregister_after_is_removed() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let registry = MemoryRegistry::new();
    let check = HealthCheck::Tcp {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(100),
        failures_before_critical: 1,
        successes_before_passing: 1,
    };
    let mut watch = registry.watch("users");
    let users = registry
        .register(
            Instance::builder("users", "127.0.0.1", port)
                .check(check)
                .deregister_after(Duration::from_secs(1))
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let removed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(update) = watch.next().await {
            if let Update::Remove { id, .. } = update {
                return id;
            }
        }
        panic!("the watch ended")
    })
    .await
    .expect("removed within 5 s");
    assert_eq!(removed, users.id());
    users.forget();
}

#[tokio::test(start_paused = true)]
async fn discover_drives_p2c_over_tower_test_mocks() {
    use tower_test::mock;
    let registry = MemoryRegistry::new();
    let a = registry
        .register(instance("users", "10.0.0.1", 80))
        .await
        .unwrap();
    let _b = registry
        .register(instance("users", "10.0.0.2", 80))
        .await
        .unwrap();
    // Each endpoint is a tower-test mock answered by a task that replies with its host.
    let endpoints = discover(&registry, "users", |instance: &Instance| {
        let (service, mut handle) = mock::pair::<(), String>();
        let host = instance.host.clone();
        tokio::spawn(async move {
            while let Some(((), respond)) = handle.next_request().await {
                respond.send_response(host.clone());
            }
        });
        tower::load::Constant::new(service, 0usize)
    });
    let mut balance = tower::balance::p2c::Balance::new(endpoints);
    let mut hosts = std::collections::BTreeSet::new();
    for _ in 0..40 {
        hosts.insert(balance.ready().await.unwrap().call(()).await.unwrap());
    }
    assert_eq!(hosts.len(), 2, "{hosts:?}");
    a.deregister().await;
    for _ in 0..40 {
        assert_eq!(
            balance.ready().await.unwrap().call(()).await.unwrap(),
            "10.0.0.2"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_balancer_over_discover_reads_weights_and_zones_from_the_instances() {
    use meshkit::balance::{Balance, BalanceConfig, PickerKind, WeightedRoundRobin};
    let registry = MemoryRegistry::new();
    let mut guards = Vec::new();
    for (host, weight, zone) in [("10.0.0.1", 3, "eu-1a"), ("10.0.0.2", 1, "eu-1b")] {
        let instance = Instance::builder("users", host, 80)
            .weight(weight)
            .zone(zone)
            .build()
            .unwrap();
        guards.push(registry.register(instance).await.unwrap());
    }
    let answer = |instance: &Instance| {
        let host = instance.host.clone();
        tower::service_fn(move |_: ()| {
            let host = host.clone();
            async move { Ok::<_, tower::BoxError>(host) }
        })
    };
    async fn tally<S>(mut balance: S) -> std::collections::BTreeMap<String, u32>
    where
        S: Service<(), Response = String, Error = tower::BoxError>,
    {
        balance.ready().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..400 {
            let host = balance.ready().await.unwrap().call(()).await.unwrap();
            *counts.entry(host).or_insert(0) += 1;
        }
        counts
    }

    // No `.weights(..)`: the registered weights, 3 to 1.
    let weighted = Balance::new(discover(&registry, "users", answer), WeightedRoundRobin);
    let counts = tally(weighted).await;
    assert_eq!(
        (counts["10.0.0.1"], counts["10.0.0.2"]),
        (300, 100),
        "{counts:?}"
    );

    // A config's zone, with no `.zones(..)`: the registered zones.
    let config = BalanceConfig {
        picker: PickerKind::RoundRobin,
        zone: Some("eu-1b".into()),
        ..BalanceConfig::default()
    };
    let zoned = Balance::from_config(discover(&registry, "users", answer), &config).unwrap();
    let counts = tally(zoned).await;
    assert_eq!(counts.get("10.0.0.2"), Some(&400), "{counts:?}");
}
