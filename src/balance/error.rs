//! [`NoEndpoints`]: the balancer had nothing to send a request to.

use std::fmt;
use std::sync::Arc;

/// No endpoint was ready for the balancer's `failfast_after`, so the call failed at once
/// instead of waiting. Calls resume as soon as an endpoint is ready again.
///
/// A meshkit rejection: retry layers do not retry it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoEndpoints {
    service: Arc<str>,
    known: usize,
    ready: usize,
    ejected: usize,
}

impl NoEndpoints {
    pub(crate) fn new(service: Arc<str>, known: usize, ready: usize, ejected: usize) -> Self {
        Self {
            service,
            known,
            ready,
            ejected,
        }
    }

    /// The balanced service's name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Endpoints discovered.
    pub fn known(&self) -> usize {
        self.known
    }

    /// Endpoints ready but not usable: zero, or the balancer would have used one.
    pub fn ready(&self) -> usize {
        self.ready
    }

    /// Endpoints ejected as outliers.
    pub fn ejected(&self) -> usize {
        self.ejected
    }
}

impl fmt::Display for NoEndpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no endpoint of {} is ready ({} known, {} ready, {} ejected)",
            self.service, self.known, self.ready, self.ejected
        )
    }
}

impl std::error::Error for NoEndpoints {}

/// The endpoint the balancer picked was ejected between the pick and the call (its ejection
/// breaker opened, or it is probing with another call), so the call was not sent.
///
/// Not a meshkit rejection: the request never reached an endpoint, and a retry goes back
/// through the balancer, which picks another one. Retry layers retry it like any error;
/// breakers above the balancer do not count it (the service did not fail).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointEjected;

impl fmt::Display for EndpointEjected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the picked endpoint was ejected before the call was sent")
    }
}

impl std::error::Error for EndpointEjected {}
