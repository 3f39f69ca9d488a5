//! Per-call metrics of a [`MeshClient`](super::MeshClient) (feature `metrics`; without it,
//! zero-sized no-ops).

use crate::classify::Outcome;
use tower::BoxError;

/// How a client's classifier judges a result.
pub(crate) type ClassifyResult<Res> = Box<dyn Fn(&Result<Res, BoxError>) -> Outcome + Send + Sync>;

#[cfg(feature = "metrics")]
mod enabled {
    use super::*;
    use crate::metrics::ClientMetrics;
    use std::sync::Arc;
    use tokio::time::Instant;

    /// One client's metric handles and classifier.
    pub(crate) struct Observer<Res> {
        metrics: ClientMetrics,
        classify: ClassifyResult<Res>,
    }

    impl<Res> Observer<Res> {
        pub(crate) fn new(service: &str, classify: ClassifyResult<Res>) -> Arc<Self> {
            Arc::new(Self {
                metrics: ClientMetrics::new(service),
                classify,
            })
        }

        pub(crate) fn start(self: &Arc<Self>) -> Observation<Res> {
            self.metrics.started();
            Observation {
                observer: Some((self.clone(), Instant::now())),
            }
        }
    }

    /// One call being measured; a call dropped before finishing only leaves the in-flight
    /// gauge.
    pub(crate) struct Observation<Res> {
        observer: Option<(Arc<Observer<Res>>, Instant)>,
    }

    impl<Res> Observation<Res> {
        pub(crate) fn finish(&mut self, result: &Result<Res, BoxError>) {
            if let Some((observer, started)) = self.observer.take() {
                let outcome = match result {
                    Err(error) if crate::error::is_rejection(&**error) => None,
                    result => Some((observer.classify)(result)),
                };
                observer.metrics.finished(Some(started.elapsed()), outcome);
            }
        }
    }

    impl<Res> Drop for Observation<Res> {
        fn drop(&mut self) {
            if let Some((observer, _)) = self.observer.take() {
                observer.metrics.finished(None, None);
            }
        }
    }
}

#[cfg(not(feature = "metrics"))]
mod enabled {
    use super::*;
    use std::marker::PhantomData;
    use std::sync::Arc;

    /// Nothing to observe without the `metrics` feature.
    pub(crate) struct Observer<Res>(PhantomData<fn(Res)>);

    impl<Res> Observer<Res> {
        pub(crate) fn new(_: &str, _: ClassifyResult<Res>) -> Arc<Self> {
            Arc::new(Self(PhantomData))
        }

        #[inline]
        pub(crate) fn start(self: &Arc<Self>) -> Observation<Res> {
            Observation(PhantomData)
        }
    }

    /// Zero-sized.
    pub(crate) struct Observation<Res>(PhantomData<fn(Res)>);

    impl<Res> Observation<Res> {
        #[inline]
        pub(crate) fn finish(&mut self, _: &Result<Res, BoxError>) {}
    }
}

pub(crate) use enabled::{Observation, Observer};
