//! [`LazyClone`]: a service whose clones cost one reference count until they are used.

use crate::padded::Hold;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;

/// Wraps the part of a client stack under the retry layer (breaker and balancer). The retry
/// layer clones the service below it on every call, for the retries it may send; a breaker
/// and a balancer handle are costly to clone (reference counts, a balancer's per-handle
/// loads). A `LazyClone` clone shares a prototype and makes its own copy of the service only
/// when it is first polled, which for a retry's spare copy is only when a retry happens.
///
/// Each instance that is used (polled) moves onto an `Arc` of its own, which its spare copies
/// share: the retry clones the instance on every call, and those clones must not count on a
/// reference count that the clients of other tasks, on other cores, write as well.
pub(crate) struct LazyClone<S> {
    prototype: Hold<S>,
    // Boxed: a spare copy rides in every retry future, which should stay small (futures are
    // moved as they are wrapped) while the service is large.
    live: Option<Box<S>>,
}

impl<S: Clone> LazyClone<S> {
    pub(crate) fn new(service: S) -> Self {
        Self {
            prototype: Hold::new(Arc::new(service)),
            live: None,
        }
    }

    #[inline]
    fn live(&mut self) -> &mut S {
        if self.live.is_none() {
            self.make_live();
        }
        self.live.as_mut().expect("made live above")
    }

    /// This instance's first use: its own copy of the service. Out of line: every later call
    /// only checks that it is there.
    #[cold]
    #[inline(never)]
    fn make_live(&mut self) {
        // From here on, this instance's spare copies share a hold of its own.
        self.prototype = self.prototype.fork();
        self.live = Some(Box::new(S::clone(&self.prototype)));
    }
}

impl<S> Clone for LazyClone<S> {
    #[inline]
    fn clone(&self) -> Self {
        Self {
            prototype: self.prototype.clone(),
            live: None,
        }
    }
}

impl<S: Service<Req> + Clone, Req> Service<Req> for LazyClone<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.live().poll_ready(cx)
    }

    #[inline(always)]
    fn call(&mut self, request: Req) -> S::Future {
        self.live().call(request)
    }
}
