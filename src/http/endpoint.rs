//! [`Endpoint`]: sends each request to one instance, by rewriting its URI's authority.

use crate::discovery::Instance;
use http::uri::{Authority, InvalidUri, Scheme, Uri};
use http::Request;
use std::task::{Context, Poll};
use tower::Service;
use tracing::instrument::{Instrument, Instrumented};

/// A request whose destination can be rewritten: `http::Request<B>`, and `reqwest::Request`
/// with the `reqwest` feature.
pub trait Routable {
    /// Points the request at `authority` (host and port), keeping its scheme (`http` if it
    /// has none), path and query.
    fn route_to(&mut self, authority: &Authority);
}

impl<B> Routable for Request<B> {
    fn route_to(&mut self, authority: &Authority) {
        // Taken apart, not copied: the scheme and path move into the new URI.
        let mut parts = std::mem::take(self.uri_mut()).into_parts();
        parts.scheme.get_or_insert(Scheme::HTTP);
        parts.authority = Some(authority.clone());
        parts
            .path_and_query
            .get_or_insert_with(|| http::uri::PathAndQuery::from_static("/"));
        // Scheme, authority and path are all set: the parts always make a URI.
        if let Ok(uri) = Uri::from_parts(parts) {
            *self.uri_mut() = uri;
        }
    }
}

#[cfg(feature = "reqwest")]
impl Routable for reqwest::Request {
    fn route_to(&mut self, authority: &Authority) {
        let url = self.url_mut();
        // Both come from a valid authority, which a URL accepts.
        let _ = url.set_host(Some(authority.host()));
        let _ = url.set_port(authority.port_u16());
    }
}

/// One instance as a service: points every request at the instance's address, then calls
/// the client it wraps (a `reqwest::Client`, a hyper-util client, any HTTP `Service`), in a
/// `meshkit.endpoint` span naming the `instance`.
///
/// Used as the endpoint a balancer picks:
/// `discover(&registry, "users", |instance| Endpoint::for_instance(client.clone(), instance))`.
///
/// ```
/// use meshkit::http::{Endpoint, Routable};
/// use tower::{service_fn, Service, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let client = service_fn(|request: http::Request<()>| async move {
///     Ok::<_, std::convert::Infallible>(request.uri().to_string())
/// });
/// let mut endpoint = Endpoint::new(client, "10.0.0.7:8080".parse().unwrap());
/// let request = http::Request::get("http://users/profile?id=7").body(()).unwrap();
/// let sent_to = endpoint.ready().await.unwrap().call(request).await.unwrap();
/// assert_eq!(sent_to, "http://10.0.0.7:8080/profile?id=7");
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Endpoint<S> {
    inner: S,
    authority: Authority,
}

impl<S> Endpoint<S> {
    /// Sends requests to `authority` through `inner`.
    pub fn new(inner: S, authority: Authority) -> Self {
        Self { inner, authority }
    }

    /// Sends requests to `instance`'s host and port through `inner`.
    ///
    /// # Errors
    /// The instance's host does not make a valid authority.
    pub fn for_instance(inner: S, instance: &Instance) -> Result<Self, InvalidUri> {
        Ok(Self::new(inner, instance.authority().parse()?))
    }

    /// Where requests go.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }
}

crate::macros::inner_accessors!(Endpoint);

impl<S, R> Service<R> for Endpoint<S>
where
    S: Service<R>,
    R: Routable,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline(always)]
    fn call(&mut self, mut request: R) -> Self::Future {
        request.route_to(&self.authority);
        let span = tracing::debug_span!("meshkit.endpoint", instance = %self.authority);
        self.inner.call(request).instrument(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keeps_scheme_path_and_query() {
        let authority: Authority = "127.0.0.1:9000".parse().unwrap();
        let mut request = Request::get("https://users/a/b?c=d").body(()).unwrap();
        request.route_to(&authority);
        assert_eq!(request.uri(), "https://127.0.0.1:9000/a/b?c=d");
        let mut relative = Request::get("/health").body(()).unwrap();
        relative.route_to(&authority);
        assert_eq!(relative.uri(), "http://127.0.0.1:9000/health");
    }

    #[test]
    fn ipv6_instances_get_brackets() {
        let instance = Instance::builder("users", "::1", 8080).build().unwrap();
        let endpoint = Endpoint::for_instance((), &instance).unwrap();
        assert_eq!(endpoint.authority().as_str(), "[::1]:8080");
    }
}
