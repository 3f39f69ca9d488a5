//! [`Retry`]: the service, and the state its in-flight calls find again by id.

use super::budget::RetryBudget;
use super::config::RetryConfig;
use super::error::carries;
use super::future::{ResponseFuture, Timeouts};
use super::replay::Replay;
use crate::classify::{ClassifyRetry, DefaultRetryClassifier};
use crate::keepalive::Owner;
use crate::random::RandomSource;
use crate::registry::Registry;
use crate::retry::CloneRequest;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;

/// Every live retry service's shared state, for in-flight calls that hold only its id.
static RETRIES: Registry<Shared> = Registry::new();

/// The shared state with this id, if it still exists (see [`crate::keepalive`]).
pub(crate) fn find(id: u64) -> Option<Arc<Shared>> {
    crate::keepalive::find(id).or_else(|| RETRIES.get(id))
}

/// What a retry service and its clones share; calls reach it by id on their retry path.
pub(crate) struct Shared {
    pub(crate) config: RetryConfig,
    pub(crate) limits: Limits,
    pub(crate) budget: RetryBudget,
    pub(crate) random: Arc<dyn RandomSource>,
    pub(crate) name: Arc<str>,
    /// Where retries exhausted and budget refusals are reported.
    pub(crate) sink: crate::events::system::Sink,
    warned_uncut: AtomicBool,
}

/// The part of the config every call carries, so that a call that succeeds at once never
/// looks anything up. Timeouts are read from [`Shared`] when a call starts, and only if set.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) id: u64,
    pub(crate) max_attempts: u32,
    pub(crate) retry_rejections: bool,
    /// Whether `per_try_timeout` or `deadline` is set.
    pub(crate) timed: bool,
}

impl Shared {
    pub(crate) fn new(
        config: RetryConfig,
        budget: RetryBudget,
        random: Arc<dyn RandomSource>,
        name: Arc<str>,
        retry_rejections: bool,
        sink: crate::events::system::Sink,
    ) -> Owner<Self> {
        let limits = Limits {
            id: RETRIES.next_id(),
            max_attempts: config.max_attempts,
            retry_rejections,
            timed: config.per_try_timeout.is_some() || config.deadline.is_some(),
        };
        let shared = Arc::new(Self {
            config,
            limits,
            budget,
            random,
            name,
            sink,
            warned_uncut: AtomicBool::new(false),
        });
        RETRIES.insert(limits.id, Arc::downgrade(&shared));
        Owner::new(limits.id, shared)
    }
}

impl Shared {
    /// Whether tries can be cut short with error type `E`; warns once per service if not.
    fn can_cut<E: 'static>(&self) -> bool {
        let cut = carries::<E>();
        if !cut && !self.warned_uncut.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                service = &*self.name,
                error_type = std::any::type_name::<E>(),
                "per_try_timeout and deadline cannot cut a try short with this error type \
                 (use tower::BoxError or std::io::Error); the deadline only stops retries"
            );
        }
        cut
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        RETRIES.remove(self.limits.id);
    }
}

/// Retries failed calls to `S` with backoff, within a budget, a deadline and the server's
/// delay hints.
///
/// Built by [`RetryLayer`](super::RetryLayer). Each call is a first try (deposited in the
/// budget); if the classifier `C` asks for a retry and attempts, budget and deadline allow it,
/// the request copied by `K` is sent again after the backoff. The caller gets the last response
/// or error exactly as `S` produced it; the only error this service makes is [`TimedOut`](super::TimedOut)
/// (see there for the error types that can carry it). Any error type works.
///
/// `S` must be `Clone` (as hyper, reqwest and tonic clients are): each call keeps a clone to
/// send its retries through.
pub struct Retry<S, C = DefaultRetryClassifier, K = CloneRequest> {
    inner: S,
    shared: Owner<Shared>,
    classifier: C,
    replay: K,
}

impl<S, C, K> Retry<S, C, K> {
    pub(crate) fn from_parts(inner: S, shared: Owner<Shared>, classifier: C, replay: K) -> Self {
        Self {
            inner,
            shared,
            classifier,
            replay,
        }
    }

    /// The budget this service draws on.
    pub fn budget(&self) -> &RetryBudget {
        &self.shared.budget
    }

    crate::macros::inner_accessors!();
}

impl<S, C, K> Retry<S, C, K> {
    /// What a call with a per-try timeout or a deadline starts from (out of the fast path).
    #[cold]
    #[inline(never)]
    fn timeouts<E: 'static>(&self) -> Timeouts {
        Timeouts {
            per_try: self.shared.config.per_try_timeout,
            deadline: self.shared.config.deadline,
            max_attempts: self.shared.limits.max_attempts,
            cut: self.shared.can_cut::<E>(),
            shared: self.shared.arc(),
        }
    }
}

impl<S, C, K, Req> Service<Req> for Retry<S, C, K>
where
    S: Service<Req> + Clone,
    S::Error: 'static,
    C: ClassifyRetry<S::Response, S::Error> + Clone,
    K: Replay<Req> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S, Req, C, K>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline(always)]
    fn call(&mut self, request: Req) -> Self::Future {
        let shared = &*self.shared;
        shared.budget.deposit();
        let limits = shared.limits;
        let spare = if limits.max_attempts > 1 {
            match self.replay.replay(&request) {
                Some(copy) => (Some(copy), false),
                None => (self.replay.replay_unsent(&request), true),
            }
        } else {
            (None, false)
        };
        let service = spare.0.as_ref().map(|_| self.inner.clone());
        let call = self.inner.call(request);
        let timeouts = if limits.timed {
            Some(self.timeouts::<S::Error>())
        } else {
            None
        };
        ResponseFuture::new(
            call,
            service,
            spare,
            self.classifier.clone(),
            self.replay.clone(),
            limits.id,
            timeouts,
        )
    }
}

impl<S: Clone, C: Clone, K: Clone> Clone for Retry<S, C, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            classifier: self.classifier.clone(),
            replay: self.replay.clone(),
        }
    }
}

impl<S: fmt::Debug, C, K> fmt::Debug for Retry<S, C, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("name", &self.shared.name)
            .field("inner", &self.inner)
            .field("max_attempts", &self.shared.limits.max_attempts)
            .field("budget", &self.shared.budget)
            .finish_non_exhaustive()
    }
}
