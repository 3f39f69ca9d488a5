//! [`Endpoint`]: sends each request to one instance, by rewriting its URI's authority (and
//! scheme, when the instance names one).

use super::intern::intern;
use crate::discovery::Instance;
use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::uri::{Authority, InvalidUri, Scheme, Uri};
use http::{Request, Version};
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;
use tracing::instrument::{Instrument, Instrumented};

/// A request whose destination can be rewritten: `http::Request<B>`, and `reqwest::Request`
/// with the `reqwest` feature.
pub trait Routable {
    /// Points the request at `authority` (host and port) and at `scheme` when one is given
    /// (else it keeps its own, `http` if it has none), keeping its path and query.
    fn route_to(&mut self, scheme: Option<&Scheme>, authority: &Authority);

    /// Sets the `Host` header to `host` if the request has none and will go over HTTP/1.
    /// [`Endpoint`] calls it after [`route_to`](Self::route_to) with the value an HTTP/1
    /// client would derive from the new authority, made once per endpoint instead of once
    /// per request. The default does nothing: the client derives the header itself.
    fn set_default_host(&mut self, host: &HeaderValue) {
        let _ = host;
    }
}

impl<B> Routable for Request<B> {
    fn route_to(&mut self, scheme: Option<&Scheme>, authority: &Authority) {
        // Taken apart, not copied: the scheme and path move into the new URI.
        let mut parts = std::mem::take(self.uri_mut()).into_parts();
        match scheme {
            Some(scheme) => parts.scheme = Some(scheme.clone()),
            None => _ = parts.scheme.get_or_insert(Scheme::HTTP),
        }
        parts.authority = Some(authority.clone());
        parts
            .path_and_query
            .get_or_insert_with(|| http::uri::PathAndQuery::from_static("/"));
        // Scheme, authority and path are all set: the parts always make a URI.
        if let Ok(uri) = Uri::from_parts(parts) {
            *self.uri_mut() = uri;
        }
    }

    /// Only for a plain `http` request of an HTTP/1 version: over HTTP/2 the authority
    /// travels as `:authority`, and servers such as nginx and Google's refuse a request that
    /// carries `Host` as well. An `https` request may be sent over HTTP/2 (the client and the
    /// server negotiate it), so its `Host` is left to the client; a client that speaks
    /// HTTP/2 over plain `http` by prior knowledge is told so by requests marked
    /// `Version::HTTP_2` (as tonic's are).
    #[inline]
    fn set_default_host(&mut self, host: &HeaderValue) {
        let http1 = matches!(
            self.version(),
            Version::HTTP_11 | Version::HTTP_10 | Version::HTTP_09
        );
        if http1 && self.uri().scheme_str() == Some("http") {
            self.headers_mut()
                .entry(HOST)
                .or_insert_with(|| host.clone());
        }
    }
}

#[cfg(feature = "reqwest")]
impl Routable for reqwest::Request {
    fn route_to(&mut self, scheme: Option<&Scheme>, authority: &Authority) {
        let url = self.url_mut();
        if let Some(scheme) = scheme {
            // `http` and `https` replace each other; a URL refuses other changes, which
            // leave the request's scheme as it is.
            let _ = url.set_scheme(scheme.as_str());
        }
        // Both come from a valid authority, which a URL accepts.
        let _ = url.set_host(Some(authority.host()));
        let _ = url.set_port(authority.port_u16());
    }

    // `set_default_host` stays a no-op: reqwest follows redirects, keeping the request's
    // headers, so a `Host` set here would go along to another host's redirect target.
}

/// One instance as a service: points every request at the instance's address, then calls
/// the client it wraps (a `reqwest::Client`, a hyper-util client, any HTTP `Service`), in a
/// `meshkit.endpoint` span naming the `instance` (and its `service`, when made with
/// [`for_instance`](Self::for_instance)). An instance whose metadata names a `scheme`
/// (`https`) gets its requests with that scheme.
///
/// A plain `http` request of an HTTP/1 version (`http::Request`'s default) without a `Host`
/// header gets `host:port` of the instance: the value hyper-util's client derives from the
/// new URI when it sends the request over HTTP/1, made once per endpoint instead of
/// formatted for each request. A `Host` the request carries is kept. The client is left to
/// derive the header (or not) on port 80 or 443, where the value depends on the scheme;
/// for `https`, which the client may send over HTTP/2; for requests marked
/// `Version::HTTP_2`; and for `reqwest::Request`, whose client follows redirects with the
/// request's headers. A redirect-following layer between the endpoint and the client must
/// drop or replace `Host` on a redirect to another origin, as it must for a `Host` the
/// caller sets.
///
/// Used as the endpoint a balancer picks:
/// `discover(&registry, "users", |instance| Endpoint::for_instance(client.clone(), instance))`.
///
/// ```
/// use meshkit::http::Endpoint;
/// use tower::{service_fn, Service, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let client = service_fn(|request: http::Request<()>| async move {
///     Ok::<_, std::convert::Infallible>(request)
/// });
/// let mut endpoint = Endpoint::new(client, "10.0.0.7:8080".parse().unwrap());
/// let request = http::Request::get("http://users/profile?id=7").body(()).unwrap();
/// let sent = endpoint.ready().await.unwrap().call(request).await.unwrap();
/// assert_eq!(sent.uri(), "http://10.0.0.7:8080/profile?id=7");
/// assert_eq!(sent.headers()[http::header::HOST], "10.0.0.7:8080");
/// # }
/// ```
#[derive(Debug)]
pub struct Endpoint<S> {
    inner: S,
    /// The instance's scheme, when it names one (metadata `scheme`).
    scheme: Option<Scheme>,
    authority: Authority,
    /// The instance's service, for the span.
    service: Option<Arc<str>>,
    /// The `Host` for requests without one: `None` on the default ports (where it depends
    /// on the request's scheme) and for an authority without a port.
    host: Option<HostValue>,
}

impl<S: Clone> Clone for Endpoint<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            scheme: self.scheme.clone(),
            authority: self.authority.clone(),
            service: self.service.clone(),
            host: self.host.clone(),
        }
    }
}

/// The header value HTTP/1 clients derive from an authority with a non-default port.
#[derive(Debug)]
struct HostValue {
    value: HeaderValue,
    /// On interned static bytes: copies count no references.
    interned: bool,
}

impl Clone for HostValue {
    fn clone(&self) -> Self {
        Self {
            // Not interned, each copy gets bytes of its own: every request clones the value,
            // and the reference count it writes is then this copy's, not one shared by the
            // copies that other handles (on other cores) use.
            value: if self.interned {
                self.value.clone()
            } else {
                // The bytes came from a valid value: they make one again.
                HeaderValue::from_bytes(self.value.as_bytes())
                    .unwrap_or_else(|_| self.value.clone())
            },
            interned: self.interned,
        }
    }
}

fn host_value(authority: &Authority) -> Option<HostValue> {
    let port = match authority.port_u16() {
        None | Some(80 | 443) => return None,
        Some(port) => port,
    };
    let text = format!("{}:{port}", authority.host());
    if let Some(value) = intern(&text)
        .and_then(|kept| HeaderValue::from_maybe_shared(Bytes::from_static(kept.as_bytes())).ok())
    {
        return Some(HostValue {
            value,
            interned: true,
        });
    }
    let value = HeaderValue::try_from(text).ok()?;
    Some(HostValue {
        value,
        interned: false,
    })
}

/// `authority` on interned static bytes (see [`super::intern`]), or as it is once the
/// interned addresses are at their limit.
fn interned(authority: Authority) -> Authority {
    intern(authority.as_str())
        .and_then(|kept| Authority::from_maybe_shared(Bytes::from_static(kept.as_bytes())).ok())
        .unwrap_or(authority)
}

impl<S> Endpoint<S> {
    /// Sends requests to `authority` through `inner`.
    ///
    /// The address is interned: kept for the life of the process, once per distinct
    /// address (up to 10 000 of them), so that the copies each request and the client take
    /// of it count no references.
    pub fn new(inner: S, authority: Authority) -> Self {
        let authority = interned(authority);
        Self {
            inner,
            scheme: None,
            host: host_value(&authority),
            authority,
            service: None,
        }
    }

    /// Sends every request with `scheme` (`https` for an instance that serves TLS) instead of
    /// the request's own. An `https` request is left to derive its own `Host`.
    pub fn scheme(mut self, scheme: Scheme) -> Self {
        self.scheme = Some(scheme);
        self
    }

    /// Whether requests get the instance's `Host` as described above (on by default). Off,
    /// the endpoint leaves every request's `Host` to the client: for a client that speaks
    /// HTTP/2 over plain `http` by prior knowledge and sends requests not marked
    /// `Version::HTTP_2`.
    pub fn default_host(mut self, on: bool) -> Self {
        self.host = if on {
            host_value(&self.authority)
        } else {
            None
        };
        self
    }

    /// Sends requests to `instance`'s host and port through `inner`, with the scheme its
    /// metadata names under `scheme` (`"https"`, say) if it names one.
    ///
    /// # Errors
    /// The instance's host does not make a valid authority, or its `scheme` a valid scheme.
    pub fn for_instance(inner: S, instance: &Instance) -> Result<Self, InvalidUri> {
        let mut endpoint = Self::new(inner, instance.authority().parse()?);
        if let Some(scheme) = instance.metadata.get("scheme") {
            endpoint = endpoint.scheme(scheme.parse()?);
        }
        endpoint.service = Some(instance.service.as_str().into());
        Ok(endpoint)
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
        request.route_to(self.scheme.as_ref(), &self.authority);
        if let Some(host) = &self.host {
            request.set_default_host(&host.value);
        }
        // The level check inline (a static load): no call at all when nothing records
        // debug spans.
        let span = if tracing::level_enabled!(tracing::Level::DEBUG) {
            endpoint_span(self.service.as_deref(), &self.authority)
        } else {
            tracing::Span::none()
        };
        self.inner.call(request).instrument(span)
    }
}

/// The `meshkit.endpoint` span of one try. Out of line: a disabled span is a couple of loads,
/// but its expansion is long, and the call path is hot.
#[inline(never)]
fn endpoint_span(service: Option<&str>, authority: &Authority) -> tracing::Span {
    tracing::debug_span!(
        "meshkit.endpoint",
        service = service.map(tracing::field::display),
        instance = %authority,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keeps_scheme_path_and_query() {
        let authority: Authority = "127.0.0.1:9000".parse().unwrap();
        let mut request = Request::get("https://users/a/b?c=d").body(()).unwrap();
        request.route_to(None, &authority);
        assert_eq!(request.uri(), "https://127.0.0.1:9000/a/b?c=d");
        let mut relative = Request::get("/health").body(()).unwrap();
        relative.route_to(None, &authority);
        assert_eq!(relative.uri(), "http://127.0.0.1:9000/health");
    }

    /// What `Endpoint::call` does to a request before the client sees it.
    fn routed(endpoint: &str, request: Request<()>) -> Request<()> {
        send(&mut echo(endpoint), request)
    }

    /// An endpoint at `authority` over a client that answers with the request it got.
    fn echo(
        authority: &str,
    ) -> Endpoint<
        impl Service<Request<()>, Response = Request<()>, Error = std::convert::Infallible> + Clone,
    > {
        let client = tower::service_fn(|request: Request<()>| async move {
            Ok::<_, std::convert::Infallible>(request)
        });
        Endpoint::new(client, authority.parse().unwrap())
    }

    fn send<S>(endpoint: &mut Endpoint<S>, request: Request<()>) -> Request<()>
    where
        S: Service<Request<()>, Response = Request<()>, Error = std::convert::Infallible>,
    {
        futures::executor::block_on(endpoint.call(request)).unwrap()
    }

    #[test]
    fn a_request_without_host_gets_the_instance_host_and_port() {
        let sent = routed(
            "10.0.0.7:8080",
            Request::get("http://users/a").body(()).unwrap(),
        );
        assert_eq!(sent.headers()[HOST], "10.0.0.7:8080");
        let ipv6 = routed("[::1]:8080", Request::get("/a").body(()).unwrap());
        assert_eq!(ipv6.headers()[HOST], "[::1]:8080");
    }

    #[test]
    fn endpoints_at_one_address_send_requests_with_its_interned_bytes() {
        // Two endpoints made apart (as two discoveries of one instance would make them) and a
        // clone: every request they route points at the same bytes, kept for the process,
        // whose copies count no references.
        let mut first = echo("10.0.0.9:8080");
        let mut second = echo("10.0.0.9:8080");
        let mut clone = first.clone();
        let sent: Vec<Request<()>> = [&mut first, &mut second, &mut clone]
            .into_iter()
            .map(|endpoint| send(endpoint, Request::get("http://users/a").body(()).unwrap()))
            .collect();
        let kept = intern("10.0.0.9:8080").unwrap().as_ptr();
        for request in &sent {
            assert_eq!(request.uri(), "http://10.0.0.9:8080/a");
            assert_eq!(request.uri().authority().unwrap().as_str().as_ptr(), kept);
            assert_eq!(request.headers()[HOST].as_bytes().as_ptr(), kept);
        }
    }

    #[test]
    fn a_host_the_request_carries_is_kept() {
        let request = Request::get("http://users/a")
            .header(HOST, "users.example")
            .body(())
            .unwrap();
        let sent = routed("10.0.0.7:8080", request);
        assert_eq!(sent.headers().get_all(HOST).iter().count(), 1);
        assert_eq!(sent.headers()[HOST], "users.example");
    }

    #[test]
    fn the_host_leaves_out_userinfo_as_hyper_util_does() {
        let sent = routed("ada@10.0.0.7:8080", Request::get("/a").body(()).unwrap());
        assert_eq!(sent.headers()[HOST], "10.0.0.7:8080");
    }

    #[test]
    fn requests_that_may_go_over_http2_are_left_to_the_client() {
        let https = routed(
            "10.0.0.7:8443",
            Request::get("https://users/a").body(()).unwrap(),
        );
        assert!(https.headers().get(HOST).is_none());
        let http2 = Request::get("http://users/a")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        let http2 = routed("10.0.0.7:8080", http2);
        assert!(http2.headers().get(HOST).is_none());
        let http10 = Request::get("http://users/a")
            .version(Version::HTTP_10)
            .body(())
            .unwrap();
        assert_eq!(
            routed("10.0.0.7:8080", http10).headers()[HOST],
            "10.0.0.7:8080"
        );
    }

    #[test]
    fn on_default_ports_the_host_is_left_to_the_client() {
        // hyper-util writes `10.0.0.7` for http on 80 but `10.0.0.7:80` for https: the
        // scheme decides, so the endpoint does not.
        for authority in ["10.0.0.7:80", "10.0.0.7:443", "10.0.0.7"] {
            let sent = routed(authority, Request::get("http://users/a").body(()).unwrap());
            assert!(sent.headers().get(HOST).is_none(), "{authority}");
        }
    }

    #[test]
    fn an_endpoint_can_leave_every_host_to_the_client() {
        let mut endpoint = echo("10.0.0.7:8080").default_host(false);
        let sent = send(
            &mut endpoint,
            Request::get("http://users/a").body(()).unwrap(),
        );
        assert!(sent.headers().get(HOST).is_none());
        assert_eq!(sent.uri(), "http://10.0.0.7:8080/a");
    }

    #[test]
    fn a_copy_of_an_endpoint_sets_the_same_host() {
        let endpoint = Endpoint::new((), "10.0.0.7:8080".parse().unwrap());
        let copy = endpoint.clone();
        let (theirs, ours) = (endpoint.host.unwrap(), copy.host.unwrap());
        assert_eq!(ours.value, theirs.value);
        assert!(ours.interned, "the address is interned");
        assert_eq!(copy.authority, endpoint.authority);
    }

    #[test]
    fn a_copy_of_a_host_value_not_interned_has_bytes_of_its_own() {
        // As endpoints made once the interned addresses are at their limit hold it.
        let theirs = HostValue {
            value: HeaderValue::from_bytes(b"10.0.0.7:8080").unwrap(),
            interned: false,
        };
        let ours = theirs.clone();
        assert_eq!(ours.value, theirs.value);
        assert_ne!(
            ours.value.as_bytes().as_ptr(),
            theirs.value.as_bytes().as_ptr(),
            "a copy has bytes of its own"
        );
    }

    #[tokio::test]
    async fn an_instance_that_names_its_scheme_gets_requests_with_it() {
        let instance = Instance::builder("users", "10.0.0.7", 8443)
            .metadata("scheme", "https")
            .build()
            .unwrap();
        let echo = tower::service_fn(|request: Request<()>| async move {
            Ok::<_, std::convert::Infallible>(request)
        });
        let mut endpoint = Endpoint::for_instance(echo, &instance).unwrap();
        let sent = tower::ServiceExt::oneshot(
            &mut endpoint,
            Request::get("http://users/a?b=1").body(()).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(sent.uri(), "https://10.0.0.7:8443/a?b=1");
        assert!(sent.headers().get(HOST).is_none(), "left to the client");

        let bad = Instance::builder("users", "10.0.0.7", 8443)
            .metadata("scheme", "ftp")
            .build()
            .unwrap_err();
        assert_eq!(
            bad.field(),
            "metadata.scheme",
            "refused when the instance is built"
        );
    }

    #[test]
    fn an_https_instance_cannot_have_the_plain_http_health_check() {
        use crate::discovery::HealthCheck;
        use std::time::Duration;
        let https = |check| {
            Instance::builder("users", "10.0.0.7", 8443)
                .metadata("scheme", "https")
                .check(check)
                .build()
        };
        let (interval, timeout) = (Duration::from_secs(5), Duration::from_secs(1));
        let error = https(HealthCheck::Http {
            path: "/health".into(),
            interval,
            timeout,
            failures_before_critical: 1,
            successes_before_passing: 1,
        })
        .unwrap_err();
        assert_eq!(error.field(), "check");
        assert!(error.to_string().contains("does not speak TLS"), "{error}");
        https(HealthCheck::Tcp {
            interval,
            timeout,
            failures_before_critical: 1,
            successes_before_passing: 1,
        })
        .unwrap();
    }

    #[cfg(feature = "reqwest")]
    #[test]
    fn reqwest_requests_take_the_instances_scheme() {
        let mut request =
            reqwest::Request::new(reqwest::Method::GET, "http://users/a?b=1".parse().unwrap());
        request.route_to(Some(&Scheme::HTTPS), &"10.0.0.7:8443".parse().unwrap());
        assert_eq!(request.url().as_str(), "https://10.0.0.7:8443/a?b=1");
        request.route_to(None, &"10.0.0.8:8080".parse().unwrap());
        assert_eq!(request.url().as_str(), "https://10.0.0.8:8080/a?b=1");
    }

    #[test]
    fn ipv6_instances_get_brackets() {
        let instance = Instance::builder("users", "::1", 8080).build().unwrap();
        let endpoint = Endpoint::for_instance((), &instance).unwrap();
        assert_eq!(endpoint.authority().as_str(), "[::1]:8080");
    }
}
