//! [`Mesh::client`]: the client stack for an HTTP service.

use super::runtime::Parts;
use super::{HttpConfig, Mesh, MeshClient, MeshConfigError};
use crate::discovery::Instance;
use crate::http::{
    BufferBody, Endpoint, HttpClassifier, HttpReplay, HttpResponse, ReplayBody, Routable,
};
use crate::retry::Replay;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tower::{BoxError, Service};

impl Mesh {
    /// The client stack for the HTTP service `service`, sending requests through `leaf` (a
    /// `reqwest::Client` with the `reqwest` feature, a hyper-util client, any HTTP service):
    /// each request goes to the instance the balancer picks ([`Endpoint`] rewrites its
    /// authority and, unless `http.set_host` is off, sets its `Host`); [`HttpClassifier`]
    /// decides failures and retries (retrying the statuses of `http.retry_statuses` when
    /// set); [`HttpReplay`] lets only idempotent requests with bodies held whole, and no
    /// longer than the service's `http.body_limit`, be sent again. A reload that changes the
    /// service's `http` section applies to the client's next calls (with a new balancer:
    /// endpoints are made from that section).
    ///
    /// # Errors
    /// The service's policies are invalid (they were checked when set: not expected).
    pub fn client<S, Req>(
        &self,
        service: &str,
        leaf: S,
    ) -> Result<MeshClient<Req, S::Response>, MeshConfigError>
    where
        S: Service<Req> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send,
        S::Response: HttpResponse + Send + 'static,
        Req: Routable + Send + 'static,
        HttpReplay: Replay<Req>,
    {
        self.client_from(service, true, move |http: &HttpConfig| parts(&leaf, http))
    }

    /// [`client`](Self::client) for `http::Request<B>` with any body: bodies up to the
    /// service's `http.body_limit` are held in memory so that retries can send them again
    /// ([`BufferBody`]); larger ones are sent once. For a hyper-util client built for
    /// `ReplayBody<B>` bodies. A reloaded `body_limit` applies from the client's next
    /// `poll_ready`.
    ///
    /// # Errors
    /// The service's policies are invalid (they were checked when set: not expected).
    #[allow(clippy::type_complexity)]
    pub fn buffered_client<S, B>(
        &self,
        service: &str,
        leaf: S,
    ) -> Result<BufferBody<MeshClient<http::Request<ReplayBody<B>>, S::Response>>, MeshConfigError>
    where
        S: Service<http::Request<ReplayBody<B>>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send,
        S::Response: HttpResponse + Send + 'static,
        B: http_body::Body + Send + 'static,
        B::Error: Send,
    {
        // Set whenever the client makes its parts: first, then after each reload that
        // changes the `http` section (in the `poll_ready` that takes the new policies, before
        // the call that reads it).
        let limit = Arc::new(AtomicUsize::new(0));
        let set = limit.clone();
        let client = self.client_from(service, true, move |http: &HttpConfig| {
            set.store(http.body_limit, Ordering::Relaxed);
            parts(&leaf, http)
        })?;
        Ok(BufferBody::with_shared_limit(client, limit))
    }
}

/// An HTTP client's endpoints, classifier and replay, as its service's `http` section says.
#[allow(clippy::type_complexity)]
fn parts<S: Clone + Send + 'static>(
    leaf: &S,
    http: &HttpConfig,
) -> Parts<impl FnMut(&Instance) -> Endpoint<S> + Send + 'static, HttpClassifier, HttpReplay> {
    let classifier = match &http.retry_statuses {
        // Checked to lie in [100, 999] when the config was.
        Some(statuses) => HttpClassifier::retrying(
            statuses
                .iter()
                .filter_map(|status| http::StatusCode::from_u16(*status).ok()),
        ),
        None => HttpClassifier::default(),
    };
    let replay = if http.retry_all_methods {
        HttpReplay::all_methods()
    } else {
        HttpReplay::default()
    }
    .body_limit(http.body_limit as u64);
    let (leaf, set_host) = (leaf.clone(), http.set_host);
    Parts {
        make_endpoint: move |instance: &Instance| {
            Endpoint::for_instance(leaf.clone(), instance)
                .expect(
                    "a registered instance's host, port and scheme are valid (checked when built)",
                )
                .default_host(set_host)
        },
        classifier,
        replay,
    }
}
