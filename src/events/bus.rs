//! [`EventBus`]: typed events on `tokio::sync::broadcast`, shared (`Arc`) with every subscriber.

use super::event::Event;
use super::store::EventStore;
use futures::future::BoxFuture;
use futures::{FutureExt, Stream};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::TryRecvError;
use tower::BoxError;

/// Why a subscriber got no event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvError {
    /// The subscriber fell this many events behind and they were dropped for it (the bus
    /// never waits for a slow subscriber); the next call returns the oldest event kept. When
    /// the events come from a store, [`Subscription::catch_up`] reads the missed ones from it.
    Lagged(u64),
    /// The bus was shut down (or dropped) and every event before that was delivered.
    Closed,
}

impl fmt::Display for RecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Lagged(n) => write!(f, "subscriber fell behind by {n} events"),
            Self::Closed => f.write_str("event bus closed"),
        }
    }
}

impl std::error::Error for RecvError {}

/// The bus was shut down: the event was not published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusClosed;

impl fmt::Display for BusClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("event bus is shut down")
    }
}

impl std::error::Error for BusClosed {}

/// Reacts to events on its own task (see [`EventBus::handle`]).
///
/// Implemented for closures `Fn(Arc<Event<T>>) -> impl Future<Output = Result<(), BoxError>>`.
pub trait EventHandler<T>: Send + Sync + 'static {
    /// Handles one event; an error (or a panic) is reported and the handler goes on.
    fn handle(&self, event: Arc<Event<T>>) -> BoxFuture<'static, Result<(), BoxError>>;
}

impl<T, F, Fut> EventHandler<T> for F
where
    F: Fn(Arc<Event<T>>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    fn handle(&self, event: Arc<Event<T>>) -> BoxFuture<'static, Result<(), BoxError>> {
        Box::pin(self(event))
    }
}

/// Counts of a bus since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BusStats {
    /// Handler calls that returned an error.
    pub handler_errors: u64,
    /// Handler calls that panicked.
    pub handler_panics: u64,
    /// Events handlers missed by falling behind.
    pub handler_lagged: u64,
}

/// A typed event bus: `publish` never blocks or waits for subscribers; each subscriber gets
/// every event (shared, not cloned) or a visible [`RecvError::Lagged`].
///
/// ```
/// use meshkit::events::{Event, EventBus};
/// use serde_json::json;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let bus = EventBus::new(1024);
/// let mut users = bus.subscribe_to_type("UserCreated");
/// bus.publish(Event::new("OrderPlaced", "order-1", json!({}))).unwrap();
/// bus.publish(Event::new("UserCreated", "user-7", json!({ "name": "Ada" }))).unwrap();
/// let event = users.recv().await.unwrap();
/// assert_eq!(event.aggregate_id, "user-7");
/// # }
/// ```
pub struct EventBus<T = serde_json::Value> {
    inner: Arc<Inner<T>>,
}

/// What the channel carries: events (with their store position, 0 if not from a store), then
/// one `Shutdown` that tells subscribers the bus is closed once they have everything published
/// before it (no extra wake-up source needed).
enum Message<T> {
    Event(Arc<Event<T>>, u64),
    Shutdown,
}

// By hand: an `Arc` clones whatever `T` is.
impl<T> Clone for Message<T> {
    fn clone(&self) -> Self {
        match self {
            Self::Event(event, position) => Self::Event(event.clone(), *position),
            Self::Shutdown => Self::Shutdown,
        }
    }
}

struct Inner<T> {
    sender: broadcast::Sender<Message<T>>,
    closed: AtomicBool,
    /// The highest store position published (see [`EventBus::publish_stored`]).
    position: AtomicU64,
    handlers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Held by the `shutdown` call that is joining the handlers: another one waits for it.
    draining: tokio::sync::Mutex<()>,
    /// Shared with the handlers' tasks, which hold nothing else of the bus: when the last
    /// bus handle is dropped, the sender goes, and the handlers' subscriptions close.
    counts: Arc<HandlerCounts>,
}

/// What handlers count (see [`BusStats`]).
#[derive(Default)]
struct HandlerCounts {
    errors: AtomicU64,
    panics: AtomicU64,
    lagged: AtomicU64,
}

impl HandlerCounts {
    /// Runs `handler` on `event`: an error or a panic (while making the future, or while
    /// running it) is counted and reported, and the handler goes on.
    async fn deliver<T>(&self, name: &str, handler: &impl EventHandler<T>, event: Arc<Event<T>>) {
        let outcome =
            match std::panic::catch_unwind(AssertUnwindSafe(|| handler.handle(event.clone()))) {
                Ok(call) => AssertUnwindSafe(call).catch_unwind().await,
                Err(panic) => Err(panic),
            };
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(handler = %name, event = %event.id, event_type = %event.event_type, %error, "event handler failed");
            }
            Err(_) => {
                self.panics.fetch_add(1, Ordering::Relaxed);
                tracing::error!(handler = %name, event = %event.id, event_type = %event.event_type, "event handler panicked");
            }
        }
    }

    fn lagged(&self, name: &str, missed: u64) {
        self.lagged.fetch_add(missed, Ordering::Relaxed);
        tracing::warn!(handler = %name, missed, "event handler fell behind");
    }
}

impl<T> Clone for EventBus<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<T: Send + Sync + 'static> EventBus<T> {
    /// A bus keeping the last `capacity` events (at least 1) for subscribers that are behind.
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        Self {
            inner: Arc::new(Inner {
                sender,
                closed: AtomicBool::new(false),
                position: AtomicU64::new(0),
                handlers: Mutex::new(Vec::new()),
                draining: tokio::sync::Mutex::new(()),
                counts: Arc::default(),
            }),
        }
    }

    /// Whether anyone (a subscription or a handler) would receive an event published now.
    pub(crate) fn has_subscribers(&self) -> bool {
        self.inner.sender.receiver_count() > 0
    }

    /// Publishes an event to every current subscriber; never blocks. Returns how many
    /// subscriptions received it, filtered ones included (which drop it when their filter
    /// refuses it).
    ///
    /// # Errors
    /// [`BusClosed`] after [`shutdown`](Self::shutdown).
    #[inline]
    pub fn publish(&self, event: Event<T>) -> Result<usize, BusClosed> {
        self.publish_shared(Arc::new(event))
    }

    /// Publishes an event already shared (the store hands them out so).
    ///
    /// # Errors
    /// [`BusClosed`] after [`shutdown`](Self::shutdown).
    #[inline]
    pub fn publish_shared(&self, event: Arc<Event<T>>) -> Result<usize, BusClosed> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(BusClosed);
        }
        Ok(self
            .inner
            .sender
            .send(Message::Event(event, 0))
            .unwrap_or(0))
    }

    /// Publishes an event a store holds at global `position`. Positions let a subscriber that
    /// lagged read exactly what it missed from the store ([`Subscription::catch_up`]); the
    /// store calls this under its append lock, so positions go out in order.
    pub(crate) fn publish_stored(&self, event: Arc<Event<T>>, position: u64) {
        if self.inner.closed.load(Ordering::Relaxed) {
            return;
        }
        let _ = self.inner.sender.send(Message::Event(event, position));
        // After the send: a subscriber that reads this position before subscribing cannot
        // receive the event too, so it never drops it as a duplicate.
        self.inner.position.fetch_max(position, Ordering::SeqCst);
    }

    /// Every event published from now on.
    pub fn subscribe(&self) -> Subscription<T> {
        self.subscription(None)
    }

    fn subscription(&self, keep: Option<Filter<T>>) -> Subscription<T> {
        // Read before subscribing: every stored event at or below `seen` went out before the
        // receiver existed (see `publish_stored`).
        let seen = self.inner.position.load(Ordering::SeqCst);
        let closed = self.inner.closed.load(Ordering::SeqCst);
        Subscription::new(Receiving {
            receiver: self.inner.sender.subscribe(),
            keep,
            closed,
            seen,
        })
    }

    /// The events `keep` accepts.
    pub fn subscribe_filtered(
        &self,
        keep: impl Fn(&Event<T>) -> bool + Send + Sync + 'static,
    ) -> Subscription<T> {
        self.subscription(Some(Box::new(keep)))
    }

    /// The events of one type.
    pub fn subscribe_to_type(&self, event_type: impl Into<String>) -> Subscription<T> {
        let event_type = event_type.into();
        self.subscribe_filtered(move |event| event.event_type == event_type)
    }

    /// The events of one aggregate.
    pub fn subscribe_to_aggregate(&self, aggregate_id: impl Into<String>) -> Subscription<T> {
        let aggregate_id = aggregate_id.into();
        self.subscribe_filtered(move |event| event.aggregate_id == aggregate_id)
    }

    /// Runs `handler` on its own task (on the current tokio runtime) for every event from now
    /// on. An error or a panic in one call is reported (a `tracing` event and a count in
    /// [`stats`](Self::stats)) and the handler goes on with the next event; other handlers
    /// never notice.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn handle(&self, name: impl Into<String>, handler: impl EventHandler<T>) {
        let name = name.into();
        let mut subscription = self.subscribe();
        let counts = self.inner.counts.clone();
        self.spawn_handler(async move {
            loop {
                let event = match subscription.recv().await {
                    Ok(event) => event,
                    Err(RecvError::Lagged(missed)) => {
                        counts.lagged(&name, missed);
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                };
                counts.deliver(&name, &handler, event).await;
            }
        });
    }

    fn spawn_handler(&self, run: impl Future<Output = ()> + Send + 'static) {
        let task = tokio::spawn(run);
        self.inner
            .handlers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }

    /// Stops intake (`publish` fails from now on), lets every handler finish the events
    /// already published, and waits for them. Subscribers get what was published, then
    /// [`RecvError::Closed`]. A `publish` that runs at the same moment as `shutdown`, on
    /// another thread, may return `Ok` for an event that goes out after the close and is
    /// not delivered: stop the publishers first. Every call waits for the drain, concurrent
    /// ones and one made after an earlier call was cancelled included.
    pub async fn shutdown(&self) {
        if !self.inner.closed.swap(true, Ordering::SeqCst) {
            let _ = self.inner.sender.send(Message::Shutdown);
        }
        let _draining = self.inner.draining.lock().await;
        let handlers = &self.inner.handlers;
        let pop = || handlers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        while let Some(handler) = pop() {
            // Put back if this call is cancelled while waiting, for the next call to join.
            let mut waiting = PutBack {
                handler: Some(handler),
                handlers,
            };
            let _ = waiting.handler.as_mut().expect("set above").await;
            waiting.handler = None;
        }
    }

    /// Counts since creation.
    pub fn stats(&self) -> BusStats {
        BusStats {
            handler_errors: self.inner.counts.errors.load(Ordering::Relaxed),
            handler_panics: self.inner.counts.panics.load(Ordering::Relaxed),
            handler_lagged: self.inner.counts.lagged.load(Ordering::Relaxed),
        }
    }
}

/// A handler's task being joined by `shutdown`: back on the list if the wait is cancelled.
struct PutBack<'a> {
    handler: Option<tokio::task::JoinHandle<()>>,
    handlers: &'a Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for PutBack<'_> {
    fn drop(&mut self) {
        if let Some(handler) = self.handler.take() {
            self.handlers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(handler);
        }
    }
}

impl<T> fmt::Debug for EventBus<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBus")
            .field("subscribers", &self.inner.sender.receiver_count())
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish()
    }
}

/// A subscription's predicate.
type Keep<T> = dyn Fn(&Event<T>) -> bool + Send + Sync;
type Filter<T> = Box<Keep<T>>;

/// What a subscription yields.
type Received<T> = Result<Arc<Event<T>>, RecvError>;

/// One subscriber's view of a bus: [`recv`](Self::recv) events one at a time, or use it as a
/// `Stream` of `Result<Arc<Event<T>>, RecvError>`.
pub struct Subscription<T> {
    /// `None` while a `Stream` receive owns it (in `pending`).
    receiving: Option<Receiving<T>>,
    /// The receive in progress when used as a `Stream`.
    pending: Option<PendingReceive<T>>,
    /// Where a `Stream` receive dropped before it completed leaves the receiving end (made
    /// by the first `Stream` poll).
    returned: Option<Returned<T>>,
}

/// The receiving end a dropped `Stream` receive gives back.
type Returned<T> = Arc<Mutex<Option<Receiving<T>>>>;

/// Holds the receiving end for a `Stream` receive; gives it back if the receive is dropped.
struct GiveBack<T> {
    receiving: Option<Receiving<T>>,
    to: Returned<T>,
}

impl<T> Drop for GiveBack<T> {
    fn drop(&mut self) {
        if let Some(receiving) = self.receiving.take() {
            *self.to.lock().unwrap_or_else(|p| p.into_inner()) = Some(receiving);
        }
    }
}

/// A subscription's receiving end.
struct Receiving<T> {
    receiver: broadcast::Receiver<Message<T>>,
    keep: Option<Filter<T>>,
    /// The bus closed (its `Shutdown` was received, or went out before subscribing).
    closed: bool,
    /// The highest store position received or caught up: stored events at or below it are
    /// duplicates of what was delivered and are dropped.
    seen: u64,
}

/// A receive started by `poll_next`, owning the receiving end until it completes.
type PendingReceive<T> = Pin<Box<dyn Future<Output = (Received<T>, Receiving<T>)> + Send>>;

impl<T: Send + Sync + 'static> Receiving<T> {
    /// The next event `keep` accepts, or why there is none.
    #[inline]
    async fn next(&mut self) -> Received<T> {
        if self.closed {
            return Err(RecvError::Closed);
        }
        loop {
            // An event already waiting is taken without building a receive future (and its
            // waiter); only an empty channel waits.
            let received = match self.receiver.try_recv() {
                Ok(message) => Ok(message),
                Err(broadcast::error::TryRecvError::Empty) => self.receiver.recv().await,
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    Err(broadcast::error::RecvError::Lagged(n))
                }
                Err(broadcast::error::TryRecvError::Closed) => {
                    Err(broadcast::error::RecvError::Closed)
                }
            };
            match received {
                Ok(Message::Event(event, position)) => {
                    if let Some(event) = self.accept(event, position) {
                        return Ok(event);
                    }
                }
                Ok(Message::Shutdown) | Err(broadcast::error::RecvError::Closed) => {
                    self.closed = true;
                    return Err(RecvError::Closed);
                }
                Err(broadcast::error::RecvError::Lagged(n)) => return Err(RecvError::Lagged(n)),
            }
        }
    }
}

impl<T: Send + Sync + 'static> Subscription<T> {
    fn new(receiving: Receiving<T>) -> Self {
        Self {
            receiving: Some(receiving),
            pending: None,
            returned: None,
        }
    }

    /// The next event, or why there is none.
    ///
    /// # Errors
    /// [`RecvError::Lagged`] once after falling behind; [`RecvError::Closed`] after shutdown.
    #[inline]
    pub async fn recv(&mut self) -> Result<Arc<Event<T>>, RecvError> {
        if let Some(pending) = self.pending.as_mut() {
            // A `Stream` poll left a receive half done: finish it (in place, so that if this
            // call is cancelled the receive stays with the subscription).
            let (received, receiving) = pending.await;
            self.pending = None;
            self.receiving = Some(receiving);
            return received;
        }
        match self.receiving.as_mut() {
            Some(receiving) => receiving.next().await,
            None => Err(RecvError::Closed),
        }
    }
}

impl EventBus<serde_json::Value> {
    /// [`handle`](Self::handle) for a bus that `store` publishes to (see
    /// [`MemoryEventStore::with_bus`](super::MemoryEventStore::with_bus)): when the handler
    /// falls behind, what it missed is read back from the store ([`Subscription::catch_up`])
    /// and handled in order, so it misses no stored event. The lag is still counted in
    /// [`stats`](Self::stats).
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn handle_from_store<S>(
        &self,
        name: impl Into<String>,
        store: S,
        handler: impl EventHandler<serde_json::Value>,
    ) where
        S: EventStore + Send + Sync + 'static,
    {
        let name = name.into();
        let mut subscription = self.subscribe();
        let counts = self.inner.counts.clone();
        self.spawn_handler(async move {
            loop {
                match subscription.recv().await {
                    Ok(event) => counts.deliver(&name, &handler, event).await,
                    Err(RecvError::Lagged(missed)) => {
                        counts.lagged(&name, missed);
                        for event in subscription.catch_up(&store).await {
                            counts.deliver(&name, &handler, event).await;
                        }
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
    }
}

impl Subscription<serde_json::Value> {
    /// The events this subscription missed, read from `store`: call it after
    /// [`RecvError::Lagged`] on a bus the store publishes to (see
    /// [`MemoryEventStore::with_bus`](super::MemoryEventStore::with_bus)).
    ///
    /// Returns, in order, every stored event after the last one this subscription received
    /// (or, if none, after the last one published before it subscribed) that its filter
    /// accepts, followed by what the bus still holds for it; receiving then goes on with the
    /// next event published. Nothing is lost and nothing arrives twice. Events published on
    /// the bus directly, without the store, cannot be read back: those the bus dropped are
    /// lost (the `Lagged` count says how many events were dropped in all).
    ///
    /// ```
    /// use meshkit::events::{Event, EventBus, EventStore, ExpectedVersion, MemoryEventStore, RecvError};
    /// use serde_json::json;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let bus = EventBus::new(4);
    /// let store = MemoryEventStore::with_bus(bus.clone());
    /// let mut subscription = bus.subscribe();
    /// for n in 1..=10 {
    ///     store.append("counter", ExpectedVersion::Any, vec![Event::new("Counted", "counter", json!(n))]).await?;
    /// }
    /// assert!(matches!(subscription.recv().await, Err(RecvError::Lagged(6))));
    /// let missed = subscription.catch_up(&store).await;
    /// assert_eq!(missed.len(), 10); // the 6 dropped and the 4 the bus held
    /// assert_eq!(missed[9].data, json!(10));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn catch_up<S: EventStore + ?Sized>(&mut self, store: &S) -> Vec<Arc<Event>> {
        /// Events read from the store at a time.
        const PAGE: usize = 4_096;
        let mut caught_up = Vec::new();
        if let Some(pending) = self.pending.as_mut() {
            // A receive a `Stream` poll started: its event comes first if it has one now;
            // otherwise it is dropped (a broadcast receive loses nothing when cancelled), and
            // gives the receiving end back, rather than waiting for the next event.
            let done = std::future::poll_fn(|cx| Poll::Ready(pending.as_mut().poll(cx))).await;
            self.pending = None;
            match done {
                Poll::Ready((received, receiving)) => {
                    self.receiving = Some(receiving);
                    if let Ok(event) = received {
                        caught_up.push(event);
                    }
                }
                Poll::Pending => {
                    self.receiving = self.returned.as_ref().and_then(|returned| {
                        returned.lock().unwrap_or_else(|p| p.into_inner()).take()
                    });
                }
            }
        }
        let Some(receiving) = self.receiving.as_mut() else {
            return caught_up;
        };
        loop {
            // What the store holds after the last position seen...
            loop {
                let page = store.read_all(receiving.seen + 1, PAGE).await;
                let full = page.len() == PAGE;
                for stored in page {
                    caught_up.extend(receiving.accept(stored.event, stored.position));
                }
                if !full {
                    break;
                }
            }
            // ...then what the bus still holds for this subscriber, so that receiving goes
            // on from the newest event (older ones would be overwritten and lag again).
            loop {
                match receiving.receiver.try_recv() {
                    Ok(Message::Event(event, position)) => {
                        caught_up.extend(receiving.accept(event, position));
                    }
                    Ok(Message::Shutdown) | Err(TryRecvError::Closed) => {
                        receiving.closed = true;
                        return caught_up;
                    }
                    Err(TryRecvError::Empty) => return caught_up,
                    // Fell behind again while draining: back to the store.
                    Err(TryRecvError::Lagged(_)) => break,
                }
            }
        }
    }
}

impl<T> Receiving<T> {
    /// `event`, published at store `position` (0: not from a store), if this subscriber is to
    /// get it: not a stored event it already had, and accepted by its filter.
    #[inline]
    fn accept(&mut self, event: Arc<Event<T>>, position: u64) -> Option<Arc<Event<T>>> {
        if position != 0 {
            if position <= self.seen {
                return None;
            }
            self.seen = position;
        }
        self.keep
            .as_deref()
            .is_none_or(|keep| keep(&event))
            .then_some(event)
    }
}

impl<T: Send + Sync + 'static> Stream for Subscription<T> {
    type Item = Received<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.pending.is_none() {
            let Some(receiving) = this.receiving.take().filter(|r| !r.closed) else {
                return Poll::Ready(None);
            };
            let to = this.returned.get_or_insert_with(Arc::default).clone();
            this.pending = Some(Box::pin(async move {
                let mut held = GiveBack {
                    receiving: Some(receiving),
                    to,
                };
                let received = held.receiving.as_mut().expect("held").next().await;
                (received, held.receiving.take().expect("held"))
            }));
        }
        let pending = this.pending.as_mut().expect("set above");
        let (received, receiving) = std::task::ready!(pending.as_mut().poll(cx));
        this.pending = None;
        this.receiving = Some(receiving);
        match received {
            Err(RecvError::Closed) => Poll::Ready(None),
            other => Poll::Ready(Some(other)),
        }
    }
}

impl<T> fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Subscription")
    }
}
