//! [`Mesh::client`]: the client stack for an HTTP service.

use super::{Mesh, MeshClient, MeshConfigError};
use crate::discovery::Instance;
use crate::http::{Endpoint, HttpClassifier, HttpReplay, HttpResponse, Routable};
use crate::retry::Replay;
use tower::{BoxError, Service};

impl Mesh {
    /// The client stack for the HTTP service `service`, sending requests through `leaf` (a
    /// `reqwest::Client` with the `reqwest` feature, a hyper-util client, any HTTP service):
    /// each request goes to the instance the balancer picks ([`Endpoint`] rewrites its
    /// authority); [`HttpClassifier`] decides failures and retries, [`HttpReplay`] lets only
    /// idempotent requests with bodies held whole be sent again.
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
        self.client_with(
            service,
            move |instance: &Instance| {
                Endpoint::for_instance(leaf.clone(), instance)
                    .expect("a registered instance's host and port make a valid authority")
            },
            HttpClassifier::default(),
            HttpReplay::default(),
        )
    }
}
