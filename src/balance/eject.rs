//! Outlier ejection: [`EjectionConfig`], and [`Guarded`], an endpoint behind its own circuit
//! breaker when ejection is on.

use super::EndpointEjected;
use crate::breaker::{BreakerConfig, CircuitBreaker, CircuitOpen, WindowConfig};
use crate::classify::{Classify, DefaultClassifier, Outcome};
use crate::config::{duration_in_range, int_in_range, ConfigError};
use crate::padded::Hold;
use pin_project_lite::pin_project;
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{BoxError, Service};

/// When an endpoint is taken out of rotation, and for how long.
///
/// Each endpoint gets its own circuit breaker, with two rules: `consecutive_failures` in a row,
/// or a `failure_rate` of its last `failures` calls. By default only the first, at 5; a
/// config that sets `failures` alone uses the rate rule alone (at the default rate, 1.0,
/// that is `failures` in a row). Either rule ejects an endpoint for `base_ejection`, doubling
/// with each ejection in a row up to `max_ejection` (each ejection after the first jittered
/// up to 10 % shorter, as a breaker's open periods are, so that endpoints ejected together
/// do not come back together); after that, the next call to it is a probe, and its success
/// re-admits the endpoint (and a later ejection starts again from `base_ejection`). Ejection never takes more than
/// `max_ejection_percent` of the ready endpoints out (counted after the ejection it would
/// cause), and when fewer than `panic_threshold` of them are healthy, the balancer uses all of
/// them, calling the ejected ones past their breakers (a degraded service keeps serving).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EjectionConfig {
    /// Failures in a row that eject an endpoint, in `[0, 1000]`; `0` turns the rule off.
    /// Default (unset): `5` when the rate rule is off (`failures = 0`), off when it is on.
    pub consecutive_failures: Option<u32>,
    /// Calls the failure-rate rule looks at (the endpoint's last ones), in `[0, 1000]`; `0`
    /// turns the rule off. Default `0`.
    pub failures: u32,
    /// Share of the last `failures` calls that must have failed to eject the endpoint, in
    /// `(0, 1]` (`1.0`: all of them). Default `1.0`.
    pub failure_rate: f64,
    /// First ejection time, in `[1s, 1h]`. Default `"30s"`.
    #[serde(with = "crate::duration")]
    pub base_ejection: Duration,
    /// Longest ejection time, in `[base_ejection, 1day]`. Default `"5m"`.
    #[serde(with = "crate::duration")]
    pub max_ejection: Duration,
    /// Most of the ready endpoints that may be ejected at once, in `(0, 1]`. Default `0.5`.
    pub max_ejection_percent: f64,
    /// Below this share of healthy endpoints, balance over all of them, in `[0, 1]`. Default
    /// `0.5`.
    pub panic_threshold: f64,
}

/// Failures in a row that eject an endpoint when nothing else is set.
const DEFAULT_RUN: u32 = 5;

impl Default for EjectionConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: None,
            failures: 0,
            failure_rate: 1.0,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 0.5,
            panic_threshold: 0.5,
        }
    }
}

impl EjectionConfig {
    /// Checks every field.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first invalid field and its range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        int_in_range("failures", self.failures, 0, 1_000)?;
        if let Some(run) = self.consecutive_failures {
            int_in_range("consecutive_failures", run, 0, 1_000)?;
        }
        if self.failures == 0 && self.consecutive_failures == Some(0) {
            // Without the rate rule, runs of failures are the only way to eject.
            return Err(ConfigError::new(
                "consecutive_failures",
                "in [1, 1000] when failures is 0",
                0,
            ));
        }
        crate::config::rate_in_unit_interval("failure_rate", self.failure_rate)?;
        duration_in_range(
            "base_ejection",
            self.base_ejection,
            Duration::from_secs(1),
            Duration::from_secs(3_600),
        )?;
        duration_in_range(
            "max_ejection",
            self.max_ejection,
            self.base_ejection,
            Duration::from_secs(86_400),
        )?;
        crate::config::rate_in_unit_interval("max_ejection_percent", self.max_ejection_percent)?;
        if !(0.0..=1.0).contains(&self.panic_threshold) {
            return Err(ConfigError::new(
                "panic_threshold",
                "in [0, 1]",
                self.panic_threshold,
            ));
        }
        Ok(())
    }

    /// Failures in a row that eject, if that rule is on: set, or by default 5 when the rate
    /// rule is off.
    pub(crate) fn run_limit(&self) -> Option<u32> {
        match (self.consecutive_failures, self.failures) {
            (Some(0), _) | (None, 1..) => None,
            (Some(run), _) => Some(run),
            (None, 0) => Some(DEFAULT_RUN),
        }
    }

    /// The breaker each endpoint gets.
    pub(crate) fn breaker(&self) -> BreakerConfig {
        let run = self.run_limit();
        // With the rate rule off, the window is the run itself: all of the last
        // `consecutive_failures` calls failed.
        let (window, failure_rate) = match self.failures {
            0 => (run.unwrap_or(DEFAULT_RUN), 1.0),
            calls => (calls, self.failure_rate),
        };
        BreakerConfig {
            failure_rate,
            window: WindowConfig::Count { size: window },
            minimum_calls: window,
            consecutive_failures: run,
            open_for: self.base_ejection,
            open_for_max: self.max_ejection,
            open_backoff: 2.0,
            half_open_calls: 1,
            ..BreakerConfig::default()
        }
    }
}

/// What an ejection breaker counts as a failure: the balancer's classifier, with its response
/// type erased so that endpoints stay generic over their service alone (the balancer checks
/// the type when the classifier is set, so the downcast always succeeds). Without one, the
/// default: errors fail, responses succeed.
///
/// Every call an ejection breaker admits carries a clone, so each balancer handle holds its
/// own [`fork`](Self::fork): handles on other cores never write the same reference count.
#[derive(Clone, Default)]
pub(crate) struct EjectionClassifier(Option<Hold<ClassifyAny>>);

/// A classifier of `&Result<Res, BoxError>` behind `&dyn Any`.
type ClassifyAny = dyn Fn(&dyn Any) -> Outcome + Send + Sync;

impl EjectionClassifier {
    /// Classifies results of type `Result<Res, BoxError>` with `classifier`.
    pub(crate) fn new<Res, C>(classifier: C) -> Self
    where
        Res: 'static,
        C: Classify<Res, BoxError> + Send + Sync + 'static,
    {
        let classify: Arc<ClassifyAny> = Arc::new(move |result: &dyn Any| {
            match result.downcast_ref::<Result<Res, BoxError>>() {
                Some(result) => classifier.classify(result),
                None => Outcome::Ignored,
            }
        });
        Self(Some(Hold::new(classify)))
    }

    /// The same classifier on a hold of its own, for one balancer handle.
    pub(crate) fn fork(&self) -> Self {
        Self(self.0.as_ref().map(Hold::fork))
    }
}

impl<Res: 'static> Classify<Res, BoxError> for EjectionClassifier {
    #[inline]
    fn classify(&self, result: &Result<Res, BoxError>) -> Outcome {
        match &self.0 {
            Some(classify) => (**classify)(result),
            None => DefaultClassifier.classify(result),
        }
    }
}

/// An endpoint as the balancer calls it (through [`GuardedCall`]): as discovered, or behind
/// its ejection breaker.
#[derive(Clone)]
pub(crate) struct Guarded<S>(Kind<S>);

#[derive(Clone)]
enum Kind<S> {
    Plain(S),
    // Boxed: a plain endpoint stays the size of the service itself.
    Breaker(Box<CircuitBreaker<S, EjectionClassifier>>),
}

impl<S> Guarded<S> {
    pub(crate) fn plain(service: S) -> Self {
        Self(Kind::Plain(service))
    }

    pub(crate) fn breaker(service: CircuitBreaker<S, EjectionClassifier>) -> Self {
        Self(Kind::Breaker(Box::new(service)))
    }

    /// Polls the endpoint (through its breaker, if any) for readiness.
    pub(crate) fn poll_ready<Req>(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>>
    where
        S: Service<Req>,
        S::Error: Into<BoxError>,
        S::Response: 'static,
    {
        match &mut self.0 {
            Kind::Plain(service) => service.poll_ready(cx).map_err(Into::into),
            Kind::Breaker(service) => service.poll_ready(cx),
        }
    }
}

impl<S> fmt::Debug for Guarded<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Kind::Plain(_) => "Guarded::Plain",
            Kind::Breaker(_) => "Guarded::Breaker",
        })
    }
}

pin_project! {
    /// One call to a [`Guarded`] endpoint: waits for its readiness, then its response.
    ///
    /// Its fields name only the endpoint's own types (never a projection through a `Service`
    /// impl with conditions on the error type), so a spawned call stays `Send` even when the
    /// endpoint's error type carries a lifetime the compiler erases (`Box<dyn Error + ..>`).
    pub(crate) struct GuardedCall<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        inner: CallInner<S, Req>,
    }
}

pin_project! {
    #[project = CallInnerProjection]
    enum CallInner<S, Req>
    where
        S: Service<Req>,
    {
        // The handle's copy of the endpoint was ready: its call, nothing else.
        Direct { #[pin] call: S::Future },
        // The same, admitted by a closed ejection breaker, whose future records the outcome.
        // In place: with ejection on, this is every call's path, and a box would cost each
        // call an allocation.
        AdmittedDirect { #[pin] call: crate::breaker::ResponseFuture<S::Future, EjectionClassifier> },
        // The handle's copy was not ready: it goes on with the call, readied as it is polled.
        Plain { call: Pin<Box<tower::util::Oneshot<S, Req>>> },
        Admitted { call: Pin<Box<crate::breaker::ResponseFuture<tower::util::Oneshot<S, Req>, EjectionClassifier>>> },
        // The ejection breaker is not closed: it decides as the call is polled. The request
        // waits in the box too, so that it does not make every call's future larger.
        Breaker {
            service: Box<(CircuitBreaker<S, EjectionClassifier>, Option<Req>)>,
            future: Option<Pin<Box<crate::breaker::ResponseFuture<S::Future, EjectionClassifier>>>>,
        },
    }
}

/// What [`GuardedCall::ready_now`] found.
pub(crate) enum Readiness {
    /// The copy is ready: the call is admitted under this word by the endpoint's closed
    /// ejection breaker, or the endpoint has none (`None`).
    Ready(Option<u64>),
    /// The copy is not ready now (or its readiness failed): it was dropped.
    NotReady,
    /// The ejection breaker is open or half-open: [`GuardedCall::new`] decides.
    Decide,
}

impl<S, Req> GuardedCall<S, Req>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    S::Response: 'static,
{
    /// A call to `endpoint`, sent through `copy`, the calling handle's own copy of the
    /// endpoint's service (made here on first use), when that copy is ready at once: then
    /// nothing is copied per call, and the future is the endpoint's own. A copy that is not
    /// ready, or whose readiness failed, is dropped and gives the request back (`Err`),
    /// unless the call may `wait`: then a copy that is not ready goes on with the call,
    /// readied as the call is polled (keeping whatever place its readiness holds), and the
    /// handle makes a new copy next time; a failed one is dropped, and a fresh copy takes the
    /// call. Behind a closed ejection breaker,
    /// the breaker admits the call at once. Behind an open one (the snapshot still lists the
    /// endpoint: `panic` mode, an ejection `max_ejection_percent` refused, or one the worker
    /// has not published yet), the call goes elsewhere unless it may `wait` or in `panic`
    /// mode; then to the endpoint past its breaker, which records nothing while open.
    /// Otherwise (half-open: a probe), the breaker is copied too and decides.
    ///
    /// `classifier` is the handle's own copy of the ejection classifier, which an admitted
    /// call carries.
    #[inline(always)]
    pub(crate) fn new(
        endpoint: &Guarded<S>,
        copy: &mut Option<S>,
        classifier: &EjectionClassifier,
        panic: bool,
        request: Req,
        wait: bool,
    ) -> Result<Self, Req> {
        let (service, admitted) = match &endpoint.0 {
            Kind::Plain(service) => (service, None),
            Kind::Breaker(breaker) => match breaker.admit_closed() {
                Some(word) => (breaker.get_ref(), Some((&**breaker, word))),
                // Open, yet in the snapshot: in panic mode, or the worker has not ejected it
                // (yet, or at all: `max_ejection_percent` keeps it in rotation). Outside panic
                // mode the call goes elsewhere if it can; else (and in panic mode, which
                // spreads calls over every endpoint) past the breaker, which records nothing
                // while open.
                None if breaker.is_open() => match panic || wait {
                    true => (breaker.get_ref(), None),
                    false => return Err(request),
                },
                None => return Self::through_breaker(breaker, classifier, request, wait),
            },
        };
        let own = copy.get_or_insert_with(|| service.clone());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match own.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Pending | Poll::Ready(Err(_)) if !wait => {
                // Not ready now: the call goes elsewhere if it can. The copy goes too, with
                // whatever place in a queue its readiness took (a semaphore's waiter, say),
                // which it would otherwise hold with no one to wake it.
                *copy = None;
                return Err(request);
            }
            Poll::Pending => {
                // The copy goes on with this call, keeping whatever place its readiness holds
                // (a queued permit, say); the next call makes a new copy.
                let pending = copy.take().expect("made above");
                return Ok(Self::through_copy(pending, admitted, classifier, request));
            }
            Poll::Ready(Err(_)) => {
                // A failed copy is dropped: a fresh one reports the error (or has recovered).
                *copy = None;
                return Ok(Self::through_copy(
                    service.clone(),
                    admitted,
                    classifier,
                    request,
                ));
            }
        }
        let word = admitted.map(|(_, word)| word);
        Ok(Self::direct(endpoint, copy, classifier, word, request))
    }

    /// The hot path of [`new`](Self::new) for a call that may not wait, asked before the
    /// request moves: whether the handle's copy of `endpoint` takes a call now, with no
    /// ejection breaker or admitted by a closed one ([`Readiness::Ready`]); not ready, or its
    /// readiness failed, the copy dropped as `new` drops it ([`Readiness::NotReady`]: the
    /// call goes elsewhere); or an open or half-open ejection breaker, which `new` decides
    /// ([`Readiness::Decide`]).
    #[inline(always)]
    pub(crate) fn ready_now(endpoint: &Guarded<S>, copy: &mut Option<S>) -> Readiness {
        let (service, word) = match &endpoint.0 {
            Kind::Plain(service) => (service, None),
            Kind::Breaker(breaker) => match breaker.admit_closed() {
                Some(word) => (breaker.get_ref(), Some(word)),
                None => return Readiness::Decide,
            },
        };
        let own = copy.get_or_insert_with(|| service.clone());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match own.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => Readiness::Ready(word),
            Poll::Pending | Poll::Ready(Err(_)) => {
                // As in `new`: the copy goes, with whatever place in a queue its readiness
                // took, which it would otherwise hold with no one to wake it.
                *copy = None;
                Readiness::NotReady
            }
        }
    }

    /// The call through the handle's `copy`, which is ready: admitted under `word` by the
    /// endpoint's closed ejection breaker, or past it (`None`).
    #[inline(always)]
    pub(crate) fn direct(
        endpoint: &Guarded<S>,
        copy: &mut Option<S>,
        classifier: &EjectionClassifier,
        word: Option<u64>,
        request: Req,
    ) -> Self {
        let call = copy.as_mut().expect("a ready copy").call(request);
        let inner = match (&endpoint.0, word) {
            (Kind::Breaker(breaker), Some(word)) => CallInner::AdmittedDirect {
                call: breaker.admitted(call, word, classifier.clone()),
            },
            _ => CallInner::Direct { call },
        };
        Self { inner }
    }

    /// The handle's copy was not ready: the call goes through `service`, readied as the call
    /// is polled.
    #[cold]
    #[inline(never)]
    fn through_copy(
        service: S,
        admitted: Option<(&CircuitBreaker<S, EjectionClassifier>, u64)>,
        classifier: &EjectionClassifier,
        request: Req,
    ) -> Self {
        let call = tower::util::Oneshot::new(service, request);
        let inner = match admitted {
            Some((breaker, word)) => CallInner::Admitted {
                call: Box::pin(breaker.admitted(call, word, classifier.clone())),
            },
            None => CallInner::Plain {
                call: Box::pin(call),
            },
        };
        Self { inner }
    }

    /// The ejection breaker is not closed: a copy of it (judging with the handle's
    /// classifier) decides. Asked at once: a probe slot it grants takes the call now; a
    /// refusal (open, or every probe slot taken), or an endpoint not ready, gives the request
    /// back, unless the call may `wait`. A call that waits is decided as it is polled (and
    /// fails with [`EndpointEjected`] if refused).
    #[cold]
    #[inline(never)]
    fn through_breaker(
        breaker: &CircuitBreaker<S, EjectionClassifier>,
        classifier: &EjectionClassifier,
        request: Req,
        wait: bool,
    ) -> Result<Self, Req> {
        let mut service = breaker.clone_with(classifier.clone());
        let mut future = None;
        let mut request = Some(request);
        if !wait {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            match service.poll_ready(&mut cx) {
                Poll::Ready(Ok(())) if !service.rejects_next_call() => {
                    let request = request.take().expect("not sent yet");
                    future = Some(Box::pin(service.call(request)));
                }
                // Dropping the copy gives back any probe slot it held.
                _ => return Err(request.take().expect("not sent yet")),
            }
        }
        Ok(Self {
            inner: CallInner::Breaker {
                service: Box::new((service, request)),
                future,
            },
        })
    }
}

impl<S, Req> Future for GuardedCall<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    S::Response: 'static,
{
    type Output = Result<S::Response, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().inner.project() {
            CallInnerProjection::Direct { call } => call.poll(cx).map_err(Into::into),
            CallInnerProjection::AdmittedDirect { call } => call.poll(cx),
            CallInnerProjection::Plain { call } => call.as_mut().poll(cx).map_err(Into::into),
            CallInnerProjection::Admitted { call } => call.as_mut().poll(cx),
            CallInnerProjection::Breaker { service, future } => {
                if future.is_none() {
                    let (service, request) = &mut **service;
                    std::task::ready!(service.poll_ready(cx)).map_err(ejected)?;
                    let request = request.take().expect("called once");
                    *future = Some(Box::pin(service.call(request)));
                }
                let result =
                    std::task::ready!(future.as_mut().expect("set above").as_mut().poll(cx));
                Poll::Ready(result.map_err(ejected))
            }
        }
    }
}

/// The ejection breaker's own refusal becomes [`EndpointEjected`], which retries may retry
/// (another endpoint will be picked); the endpoint's errors pass through.
fn ejected(error: BoxError) -> BoxError {
    if error.is::<CircuitOpen>() {
        Box::new(EndpointEjected)
    } else {
        error
    }
}

impl<S: Service<Req>, Req> fmt::Debug for GuardedCall<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GuardedCall")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        EjectionConfig::default().validate().unwrap();
        let bad = EjectionConfig {
            max_ejection_percent: 0.0,
            ..EjectionConfig::default()
        };
        assert_eq!(bad.validate().unwrap_err().field(), "max_ejection_percent");
        let bad = EjectionConfig {
            max_ejection: Duration::from_secs(10),
            ..EjectionConfig::default()
        };
        assert_eq!(bad.validate().unwrap_err().field(), "max_ejection");
        let neither = EjectionConfig {
            consecutive_failures: Some(0),
            ..EjectionConfig::default()
        };
        assert_eq!(
            neither.validate().unwrap_err().to_string(),
            "consecutive_failures must be in [1, 1000] when failures is 0, got 0"
        );
        let rate_alone = EjectionConfig {
            consecutive_failures: Some(0),
            failures: 20,
            failure_rate: 0.5,
            ..EjectionConfig::default()
        };
        rate_alone.validate().unwrap();
        let too_long = EjectionConfig {
            consecutive_failures: Some(1_001),
            ..EjectionConfig::default()
        };
        assert_eq!(
            too_long.validate().unwrap_err().field(),
            "consecutive_failures"
        );
    }

    #[test]
    fn each_rule_becomes_the_endpoint_breakers_own() {
        let runs = EjectionConfig::default().breaker();
        assert_eq!(runs.consecutive_failures, Some(5));
        assert_eq!(runs.window, WindowConfig::Count { size: 5 });
        assert_eq!(runs.failure_rate, 1.0);
        runs.validate().unwrap();
        let with = |consecutive_failures, failures| {
            EjectionConfig {
                consecutive_failures,
                failures,
                failure_rate: 0.4,
                ..EjectionConfig::default()
            }
            .breaker()
        };
        let both = with(Some(5), 20);
        assert_eq!(both.consecutive_failures, Some(5));
        assert_eq!(both.window, WindowConfig::Count { size: 20 });
        assert_eq!((both.minimum_calls, both.failure_rate), (20, 0.4));
        assert_eq!(with(Some(0), 20).consecutive_failures, None);
        // `failures` set alone: the rate rule alone, as before there was a run rule.
        assert_eq!(with(None, 20).consecutive_failures, None);
        let runs_of_three = with(Some(3), 0);
        assert_eq!(runs_of_three.consecutive_failures, Some(3));
        assert_eq!(runs_of_three.window, WindowConfig::Count { size: 3 });
        assert_eq!(runs_of_three.failure_rate, 1.0);
    }
}
