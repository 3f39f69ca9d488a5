//! [`Hedge`]: the service.

use super::config::{HedgeConfig, HedgeDelay};
use super::future::ResponseFuture;
use super::latency::Latencies;
use crate::classify::{Classify, DefaultClassifier};
use crate::retry::{CloneRequest, Replay, RetryBudget};
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower::Service;

/// What a hedge service and its clones share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: HedgeConfig,
    pub(crate) budget: RetryBudget,
    pub(crate) latencies: Latencies,
    pub(crate) name: Arc<str>,
}

impl Shared {
    /// How long to wait for a try before hedging, `None` for no hedge (a percentile delay
    /// without enough samples yet).
    pub(crate) fn delay(&self) -> Option<Duration> {
        match self.config.delay {
            HedgeDelay::Fixed(delay) => Some(delay),
            HedgeDelay::Percentile(_) => self.latencies.percentile(Instant::now()),
        }
    }
}

/// Sends extra copies of slow requests to `S`: after the configured delay without an answer,
/// another copy (up to `max_hedges`); the first success wins and the other tries are dropped,
/// which cancels them.
///
/// Built by [`HedgeLayer`](super::HedgeLayer). Only requests the replay policy `K` can copy
/// are hedged (hedge only idempotent requests: a copy may reach the server even when the
/// first try also does). Each call is deposited in the layer's budget and each hedge withdrawn
/// from it. The caller gets the winning response or, if every try fails, the last failure,
/// exactly as `S` produced it. `S` must be `Clone`.
pub struct Hedge<S, C = DefaultClassifier, K = CloneRequest> {
    inner: S,
    shared: Arc<Shared>,
    classifier: C,
    replay: K,
}

impl<S, C, K> Hedge<S, C, K> {
    pub(crate) fn from_parts(inner: S, shared: Arc<Shared>, classifier: C, replay: K) -> Self {
        Self {
            inner,
            shared,
            classifier,
            replay,
        }
    }

    /// The budget hedges draw on.
    pub fn budget(&self) -> &RetryBudget {
        &self.shared.budget
    }

    crate::macros::inner_accessors!();
}

impl<S, C, K, Req> Service<Req> for Hedge<S, C, K>
where
    S: Service<Req> + Clone,
    S::Error: 'static,
    C: Classify<S::Response, S::Error> + Clone,
    K: Replay<Req> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S, Req, C, K>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        self.shared.budget.deposit();
        let delay = self.shared.delay();
        let spare = delay.and_then(|_| self.replay.replay(&request));
        let service = spare.as_ref().map(|_| self.inner.clone());
        let started = Instant::now();
        // With a hedge to come, learn which endpoint (of a balancer below) this try goes to,
        // so that hedges go elsewhere.
        let (first, sent) = if spare.is_some() {
            crate::tried::sending(&[], || self.inner.call(request))
        } else {
            (self.inner.call(request), None)
        };
        ResponseFuture::new(
            first,
            sent,
            started,
            delay,
            service,
            spare,
            self.shared.clone(),
            self.classifier.clone(),
            self.replay.clone(),
        )
    }
}

impl<S: Clone, C: Clone, K: Clone> Clone for Hedge<S, C, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            classifier: self.classifier.clone(),
            replay: self.replay.clone(),
        }
    }
}

impl<S: fmt::Debug, C, K> fmt::Debug for Hedge<S, C, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hedge")
            .field("name", &self.shared.name)
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}
