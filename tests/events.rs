//! The event bus and the memory event store through the public API.

use futures::StreamExt;
use meshkit::events::{
    AppendError, Event, EventBus, EventStore, ExpectedVersion, MemoryEventStore, RecvError,
};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn event(event_type: &str, aggregate: &str, n: u64) -> Event {
    Event::new(event_type, aggregate, json!({ "n": n }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_with_optimistic_concurrency_lose_and_duplicate_nothing() {
    let store = MemoryEventStore::new();
    let writers: Vec<_> = (0..8)
        .map(|writer| {
            let store = store.clone();
            tokio::spawn(async move {
                // The version this writer last saw; a conflict means others appended since.
                let mut known = 0u64;
                for n in 0..10_000u64 {
                    let event = event("Counted", "counter", writer * 1_000_000 + n);
                    loop {
                        match store
                            .append(
                                "counter",
                                ExpectedVersion::Exact(known),
                                vec![event.clone()],
                            )
                            .await
                        {
                            Ok(version) => {
                                known = version;
                                break;
                            }
                            Err(AppendError::Conflict { actual, .. }) => known = actual,
                            Err(other) => panic!("{other}"),
                        }
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let stream = store.read_stream("counter", 1).await;
    assert_eq!(stream.len(), 80_000);
    for (i, stored) in stream.iter().enumerate() {
        assert_eq!(stored.event.version, i as u64 + 1, "contiguous versions");
    }
    let mut ns: Vec<u64> = stream
        .iter()
        .map(|s| s.event.data["n"].as_u64().unwrap())
        .collect();
    ns.sort_unstable();
    ns.dedup();
    assert_eq!(ns.len(), 80_000, "none lost, none duplicated");
}

#[tokio::test]
async fn re_appending_an_event_is_idempotent() {
    let store = MemoryEventStore::new();
    let created = event("UserCreated", "user-1", 1);
    assert_eq!(
        store
            .append("user-1", ExpectedVersion::NoStream, vec![created.clone()])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .append("user-1", ExpectedVersion::NoStream, vec![created])
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.len(), 1);
}

#[tokio::test]
async fn conflicts_carry_the_actual_version_and_store_nothing() {
    let store = MemoryEventStore::new();
    store
        .append(
            "a",
            ExpectedVersion::Any,
            vec![event("E", "a", 1), event("E", "a", 2)],
        )
        .await
        .unwrap();
    match store
        .append("a", ExpectedVersion::Exact(1), vec![event("E", "a", 3)])
        .await
    {
        Err(AppendError::Conflict { actual, .. }) => assert_eq!(actual, 2),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        store
            .append("a", ExpectedVersion::NoStream, vec![event("E", "a", 4)])
            .await,
        Err(AppendError::Conflict { actual: 2, .. })
    ));
    assert_eq!(store.len(), 2);
}

#[tokio::test]
async fn oversized_events_are_rejected_not_stored() {
    let store = MemoryEventStore::with_options(None, 256);
    let big = Event::new("Big", "a", json!({ "blob": "x".repeat(1_000) }));
    assert!(matches!(
        store.append("a", ExpectedVersion::Any, vec![big]).await,
        Err(AppendError::TooLarge { limit: 256, .. })
    ));
    assert!(store.is_empty());
}

#[tokio::test]
async fn read_all_is_in_global_order() {
    let store = MemoryEventStore::new();
    for n in 0..10 {
        let aggregate = if n % 2 == 0 { "even" } else { "odd" };
        store
            .append(
                aggregate,
                ExpectedVersion::Any,
                vec![event("E", aggregate, n)],
            )
            .await
            .unwrap();
    }
    let all = store.read_all(1, 100).await;
    let ns: Vec<u64> = all
        .iter()
        .map(|s| s.event.data["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, (0..10).collect::<Vec<_>>());
    assert_eq!(
        store
            .read_all(4, 2)
            .await
            .iter()
            .map(|s| s.position)
            .collect::<Vec<_>>(),
        [4, 5]
    );
}

/// Past 65 536 events a store grows in segments, prepared ahead by a helper thread once it
/// holds 16 384: every read still sees every event, in order, across the boundaries.
#[tokio::test]
async fn a_store_past_several_segments_reads_back_every_event_in_order() {
    const TOTAL: u64 = 150_000;
    let store = MemoryEventStore::new();
    let mut first_ids = Vec::new();
    for batch in 0..TOTAL / 1_000 {
        // Two aggregates, interleaved batch by batch: each stream's positions skip.
        let aggregate = if batch % 2 == 0 { "even" } else { "odd" };
        let events: Vec<Event> = (0..1_000)
            .map(|n| event("E", aggregate, batch * 1_000 + n))
            .collect();
        if batch < 2 {
            first_ids.push(events[0].clone());
        }
        store
            .append(aggregate, ExpectedVersion::Any, events)
            .await
            .unwrap();
    }
    assert_eq!(store.len() as u64, TOTAL);

    let all = store.read_all(1, usize::MAX).await;
    assert_eq!(all.len() as u64, TOTAL);
    for (index, stored) in all.iter().enumerate() {
        assert_eq!(stored.position, index as u64 + 1);
        assert_eq!(stored.event.data["n"], index as u64);
    }
    // A page that starts just before a segment boundary.
    let page = store.read_all(65_530, 10).await;
    let positions: Vec<u64> = page.iter().map(|s| s.position).collect();
    assert_eq!(positions, (65_530..65_540).collect::<Vec<_>>());

    let odd = store.read_stream("odd", 40_000).await;
    assert_eq!(odd.len(), 35_001);
    for (offset, stored) in odd.iter().enumerate() {
        assert_eq!(stored.event.version, 40_000 + offset as u64);
        assert_eq!(stored.event.aggregate_id, "odd");
    }

    // Ids from the first segment are still known: re-appending them stores nothing.
    for event in first_ids {
        let aggregate = event.aggregate_id.clone();
        store
            .append(&aggregate, ExpectedVersion::Any, vec![event])
            .await
            .unwrap();
    }
    assert_eq!(store.len() as u64, TOTAL);

    let replayed: Vec<u64> = store
        .subscribe(TOTAL - 70_000)
        .take(70_001)
        .map(|s| s.position)
        .collect()
        .await;
    assert_eq!(replayed, (TOTAL - 70_000..=TOTAL).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_subscription_replays_then_follows_with_no_gap_and_no_duplicate() {
    let store = MemoryEventStore::new();
    for n in 0..500 {
        store
            .append("a", ExpectedVersion::Any, vec![event("E", "a", n)])
            .await
            .unwrap();
    }
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for n in 500..5_000 {
                store
                    .append("a", ExpectedVersion::Any, vec![event("E", "a", n)])
                    .await
                    .unwrap();
            }
        })
    };
    let positions: Vec<u64> = store
        .subscribe(1)
        .take(5_000)
        .map(|s| s.position)
        .collect()
        .await;
    writer.await.unwrap();
    assert_eq!(positions, (1..=5_000).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_lagging_subscriber_is_told_and_catches_up_from_the_store_without_loss() {
    let bus = EventBus::new(16);
    let store = MemoryEventStore::with_bus(bus.clone());
    let mut subscription = bus.subscribe();
    for n in 0..100 {
        store
            .append("a", ExpectedVersion::Any, vec![event("E", "a", n)])
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    match subscription.recv().await {
        Err(RecvError::Lagged(missed)) => assert_eq!(missed, 84),
        other => panic!("a lag is visible: {other:?}"),
    }
    // Catch up from the store: everything from the start, then live.
    let mut catch_up = store.subscribe(1);
    while seen.len() < 100 {
        seen.push(
            catch_up.next().await.unwrap().event.data["n"]
                .as_u64()
                .unwrap(),
        );
    }
    store
        .append("a", ExpectedVersion::Any, vec![event("E", "a", 100)])
        .await
        .unwrap();
    seen.push(
        catch_up.next().await.unwrap().event.data["n"]
            .as_u64()
            .unwrap(),
    );
    assert_eq!(seen, (0..=100).collect::<Vec<_>>());
}

#[tokio::test]
async fn catch_up_returns_exactly_what_a_lagging_subscriber_missed() {
    let bus = EventBus::new(16);
    let store = MemoryEventStore::with_bus(bus.clone());
    // Stored before subscribing: not missed, never caught up.
    store
        .append("a", ExpectedVersion::Any, vec![event("E", "a", 0)])
        .await
        .unwrap();
    let mut subscription = bus.subscribe();
    for n in 1..=100 {
        store
            .append("a", ExpectedVersion::Any, vec![event("E", "a", n)])
            .await
            .unwrap();
    }
    assert!(matches!(
        subscription.recv().await,
        Err(RecvError::Lagged(84))
    ));
    let missed = subscription.catch_up(&store).await;
    let numbers: Vec<u64> = missed
        .iter()
        .map(|e| e.data["n"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (1..=100).collect::<Vec<_>>());
    // The 16 events the bus still holds were caught up: the next one received is new.
    store
        .append("a", ExpectedVersion::Any, vec![event("E", "a", 101)])
        .await
        .unwrap();
    assert_eq!(subscription.recv().await.unwrap().data["n"], 101);
}

#[tokio::test]
async fn catch_up_keeps_the_subscriptions_filter() {
    let bus = EventBus::new(4);
    let store = MemoryEventStore::with_bus(bus.clone());
    let mut subscription = bus.subscribe_to_type("Wanted");
    for n in 0..20 {
        let kind = if n % 2 == 0 { "Wanted" } else { "Other" };
        store
            .append("a", ExpectedVersion::Any, vec![event(kind, "a", n)])
            .await
            .unwrap();
    }
    assert!(matches!(
        subscription.recv().await,
        Err(RecvError::Lagged(_))
    ));
    let missed = subscription.catch_up(&store).await;
    assert!(missed.iter().all(|e| e.event_type == "Wanted"));
    assert_eq!(missed.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_lags_and_catches_up_while_writers_run_loses_nothing() {
    const EVENTS: u64 = 20_000;
    let bus = EventBus::new(8);
    let store = MemoryEventStore::with_bus(bus.clone());
    let mut subscription = bus.subscribe();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for n in 0..EVENTS {
                store
                    .append("a", ExpectedVersion::Any, vec![event("E", "a", n)])
                    .await
                    .unwrap();
                if n % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut received = Vec::new();
    let mut lags = 0;
    while received.len() < EVENTS as usize {
        match subscription.recv().await {
            Ok(event) => received.push(event.data["n"].as_u64().unwrap()),
            Err(RecvError::Lagged(_)) => {
                lags += 1;
                received.extend(
                    subscription
                        .catch_up(&store)
                        .await
                        .iter()
                        .map(|e| e.data["n"].as_u64().unwrap()),
                );
            }
            Err(RecvError::Closed) => panic!("the bus is open"),
        }
    }
    writer.await.unwrap();
    assert_eq!(
        received,
        (0..EVENTS).collect::<Vec<_>>(),
        "after {lags} lags"
    );
}

#[tokio::test]
async fn subscriptions_filter_by_type_aggregate_and_predicate() {
    let bus: EventBus = EventBus::new(64);
    let mut by_type = bus.subscribe_to_type("UserCreated");
    let mut by_aggregate = bus.subscribe_to_aggregate("order-9");
    let mut by_predicate = bus.subscribe_filtered(|e| e.data["n"].as_u64() == Some(3));
    bus.publish(event("OrderPlaced", "order-9", 1)).unwrap();
    bus.publish(event("UserCreated", "user-1", 2)).unwrap();
    bus.publish(event("OrderPlaced", "order-2", 3)).unwrap();
    assert_eq!(by_type.recv().await.unwrap().aggregate_id, "user-1");
    assert_eq!(by_aggregate.recv().await.unwrap().event_type, "OrderPlaced");
    assert_eq!(by_predicate.recv().await.unwrap().aggregate_id, "order-2");
}

#[tokio::test]
async fn subscribers_share_one_event_not_copies() {
    let bus: EventBus = EventBus::new(8);
    let (mut a, mut b) = (bus.subscribe(), bus.subscribe());
    bus.publish(event("E", "a", 1)).unwrap();
    assert!(Arc::ptr_eq(
        &a.recv().await.unwrap(),
        &b.recv().await.unwrap()
    ));
}

#[tokio::test]
async fn a_panicking_handler_does_not_stop_the_others() {
    let bus: EventBus = EventBus::new(64);
    let handled = Arc::new(AtomicU64::new(0));
    bus.handle("panics", |_event: Arc<Event>| async move {
        panic!("handler bug");
    });
    bus.handle("fails", |_event: Arc<Event>| async move {
        Err::<(), tower::BoxError>("refused".into())
    });
    bus.handle("counts", {
        let handled = handled.clone();
        move |_event: Arc<Event>| {
            let handled = handled.clone();
            async move {
                handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }
    });
    for n in 0..10 {
        bus.publish(event("E", "a", n)).unwrap();
    }
    bus.shutdown().await;
    assert_eq!(handled.load(Ordering::SeqCst), 10);
    let stats = bus.stats();
    assert_eq!((stats.handler_panics, stats.handler_errors), (10, 10));
}

#[tokio::test]
async fn a_handler_that_panics_before_its_future_is_counted_and_goes_on() {
    let bus: EventBus = EventBus::new(64);
    let handled = Arc::new(AtomicU64::new(0));
    bus.handle("panics early on odd events", {
        let handled = handled.clone();
        move |event: Arc<Event>| {
            assert!(event.data["n"].as_u64().unwrap() % 2 == 0, "odd event");
            let handled = handled.clone();
            async move {
                handled.fetch_add(1, Ordering::SeqCst);
                Ok::<(), tower::BoxError>(())
            }
        }
    });
    for n in 0..10 {
        bus.publish(event("E", "a", n)).unwrap();
    }
    bus.shutdown().await;
    assert_eq!(handled.load(Ordering::SeqCst), 5, "the even events");
    assert_eq!(bus.stats().handler_panics, 5);
}

#[tokio::test]
async fn dropping_every_bus_handle_closes_subscribers_even_with_handlers_running() {
    let bus: EventBus = EventBus::new(64);
    let mut subscription = bus.subscribe();
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let done = std::sync::Mutex::new(Some(done));
    bus.handle("holds nothing", move |_event: Arc<Event>| {
        let _ = done.lock().unwrap().take().map(|done| done.send(()));
        async { Ok::<(), tower::BoxError>(()) }
    });
    bus.publish(event("E", "a", 1)).unwrap();
    finished.await.unwrap();
    drop(bus);
    assert_eq!(subscription.recv().await.unwrap().data, json!({ "n": 1 }));
    assert!(matches!(subscription.recv().await, Err(RecvError::Closed)));
}

#[tokio::test]
async fn a_cancelled_recv_after_a_stream_poll_keeps_the_subscription() {
    let bus: EventBus = EventBus::new(64);
    let mut subscription = bus.subscribe();
    // A stream poll starts a receive and leaves it pending...
    assert!(futures::poll!(subscription.next()).is_pending());
    // ...a `recv` that takes it over is cancelled...
    let cancelled = tokio::time::timeout(Duration::from_millis(10), subscription.recv()).await;
    assert!(cancelled.is_err());
    // ...and the subscription still receives.
    bus.publish(event("E", "a", 7)).unwrap();
    assert_eq!(subscription.recv().await.unwrap().data, json!({ "n": 7 }));
}

#[tokio::test]
async fn an_empty_append_still_checks_the_expected_version() {
    let store = MemoryEventStore::new();
    store
        .append("a", ExpectedVersion::Any, vec![event("E", "a", 1)])
        .await
        .unwrap();
    let error = store
        .append("a", ExpectedVersion::NoStream, vec![])
        .await
        .unwrap_err();
    assert!(
        matches!(error, AppendError::Conflict { actual: 1, .. }),
        "{error:?}"
    );
    assert_eq!(
        store
            .append("a", ExpectedVersion::Exact(1), vec![])
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn a_handler_that_falls_behind_catches_up_from_the_store() {
    let bus: EventBus = EventBus::new(4);
    let store = MemoryEventStore::with_bus(bus.clone());
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    bus.handle_from_store("slow", store.clone(), {
        let seen = seen.clone();
        move |event: Arc<Event>| {
            let seen = seen.clone();
            async move {
                // Slower than the writer: the bus's 4 slots overflow.
                tokio::task::yield_now().await;
                seen.lock().unwrap().push(event.data["n"].as_u64().unwrap());
                Ok::<(), tower::BoxError>(())
            }
        }
    });
    for n in 0..50 {
        store
            .append("a", ExpectedVersion::Any, vec![event("E", "a", n)])
            .await
            .unwrap();
    }
    bus.shutdown().await;
    assert!(bus.stats().handler_lagged > 0, "the handler fell behind");
    assert_eq!(
        *seen.lock().unwrap(),
        (0..50).collect::<Vec<_>>(),
        "none lost, in order"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_intake_and_drains_handlers() {
    let bus: EventBus = EventBus::new(64);
    let handled = Arc::new(AtomicU64::new(0));
    bus.handle("slow", {
        let handled = handled.clone();
        move |_event: Arc<Event>| {
            let handled = handled.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }
    });
    let mut subscription = bus.subscribe();
    for n in 0..5 {
        bus.publish(event("E", "a", n)).unwrap();
    }
    bus.shutdown().await;
    assert_eq!(
        handled.load(Ordering::SeqCst),
        5,
        "every published event was handled"
    );
    assert!(bus.publish(event("E", "a", 9)).is_err(), "intake stopped");
    for _ in 0..5 {
        subscription.recv().await.unwrap();
    }
    assert_eq!(subscription.recv().await.unwrap_err(), RecvError::Closed);
}

#[tokio::test]
async fn a_payload_that_does_not_fit_the_subscribers_type_is_an_error() {
    #[derive(serde::Deserialize)]
    struct Order {
        #[allow(dead_code)]
        total: u64,
    }
    let bus: EventBus = EventBus::new(8);
    let mut subscription = bus.subscribe();
    bus.publish(Event::new("OrderPlaced", "o", json!({ "total": "lots" })))
        .unwrap();
    let received = subscription.recv().await.unwrap();
    assert!(received.decode::<Order>().is_err());
}

#[tokio::test(start_paused = true)]
async fn catch_up_after_a_stream_poll_that_gave_up_returns_at_once_and_loses_nothing() {
    let bus = EventBus::new(8);
    let store = MemoryEventStore::with_bus(bus.clone());
    let mut subscription = bus.subscribe();
    let event = |n: u64| Event::new("Counted", "counter", serde_json::json!(n));
    store
        .append("counter", ExpectedVersion::Any, vec![event(1)])
        .await
        .unwrap();
    assert!(subscription.next().await.unwrap().is_ok());
    // A `select!` or a timeout around `next()` that gives up leaves a receive half done.
    let gave_up = tokio::time::timeout(Duration::from_millis(10), subscription.next()).await;
    assert!(gave_up.is_err());
    let caught_up = tokio::time::timeout(Duration::from_secs(1), subscription.catch_up(&store))
        .await
        .expect("nothing was missed: catch_up does not wait for the next event");
    assert!(caught_up.is_empty());
    // Receiving goes on, from the same place.
    store
        .append("counter", ExpectedVersion::Any, vec![event(2)])
        .await
        .unwrap();
    let next = subscription.next().await.unwrap().unwrap();
    assert_eq!(next.data, serde_json::json!(2));
}

/// A bus whose one handler takes 10 ms per event, with 10 events published; the count of
/// those handled.
fn ten_events_for_a_slow_handler() -> (EventBus<serde_json::Value>, Arc<AtomicU64>) {
    let bus = EventBus::new(64);
    let handled = Arc::new(AtomicU64::new(0));
    let counted = handled.clone();
    bus.handle("slow", move |_: Arc<Event>| {
        let counted = counted.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            counted.fetch_add(1, Ordering::SeqCst);
            Ok::<(), tower::BoxError>(())
        }
    });
    for n in 0..10 {
        bus.publish(Event::new("T", "x", serde_json::json!(n)))
            .unwrap();
    }
    (bus, handled)
}

#[tokio::test(start_paused = true)]
async fn every_shutdown_call_waits_for_the_handlers_to_drain() {
    // Two at once: the second returns only once the handler drained.
    let (bus, handled) = ten_events_for_a_slow_handler();
    let second = async {
        bus.shutdown().await;
        handled.load(Ordering::SeqCst)
    };
    let ((), at_second) = tokio::join!(bus.shutdown(), second);
    assert_eq!(at_second, 10u64);

    // A shutdown cancelled while it waits leaves the wait to the next call.
    let (bus, handled) = ten_events_for_a_slow_handler();
    assert!(
        tokio::time::timeout(Duration::from_millis(25), bus.shutdown())
            .await
            .is_err()
    );
    bus.shutdown().await;
    assert_eq!(handled.load(Ordering::SeqCst), 10);
}
