//! [`HttpReplay`]: which HTTP requests a retry or hedge may send again.

use super::body::ReplayBody;
use crate::retry::Replay;
use bytes::Bytes;
use http::{Method, Request};
use http_body::Body;

/// Whether `method` is idempotent (RFC 9110 §9.2.2): sending it twice has the effect of
/// sending it once, so a retry cannot do harm. `GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT` and
/// `DELETE` are; `POST`, `PATCH` and `CONNECT` are not.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A request body that can be copied for another try, or not.
pub trait ReplayableBody: Sized {
    /// A copy to send again, or `None` if this body can be sent only once.
    fn try_clone_body(&self) -> Option<Self>;

    /// The body's length in bytes, when it is known without reading it (checked against
    /// [`HttpReplay::body_limit`]). The default: unknown, never over a limit.
    fn known_len(&self) -> Option<u64> {
        None
    }
}

impl<B: Body> ReplayableBody for ReplayBody<B> {
    fn try_clone_body(&self) -> Option<Self> {
        self.try_clone()
    }

    fn known_len(&self) -> Option<u64> {
        self.buffered_len()
    }
}

macro_rules! cloned_bodies {
    ($($body:ty => $len:expr),* $(,)?) => {$(
        impl ReplayableBody for $body {
            fn try_clone_body(&self) -> Option<Self> {
                Some(self.clone())
            }

            fn known_len(&self) -> Option<u64> {
                let len: fn(&Self) -> Option<u64> = $len;
                len(self)
            }
        }
    )*};
}

cloned_bodies!(
    () => |_| Some(0),
    String => |body| Some(body.len() as u64),
    Vec<u8> => |body| Some(body.len() as u64),
    Bytes => |body| Some(body.len() as u64),
    http_body_util::Full<Bytes> => |body| body.size_hint().exact(),
    http_body_util::Empty<Bytes> => |_| Some(0),
);

/// Replays HTTP requests for retries and hedges: by default only idempotent methods (see
/// [`is_idempotent`]) and only bodies held whole (see
/// [`BufferBodyLayer`](super::BufferBodyLayer)), of any size unless a
/// [`body_limit`](Self::body_limit) is set; any other request is sent once, except that a
/// retry sends a request of any method again when its try was never sent (a refused
/// connection: see [`Replay::replay_unsent`]).
///
/// ```
/// use meshkit::retry::Replay;
/// use meshkit::http::HttpReplay;
///
/// let get = http::Request::get("http://users/42").body(String::new()).unwrap();
/// let post = http::Request::post("http://users").body("{}".to_string()).unwrap();
/// assert!(HttpReplay::default().replay(&get).is_some());
/// assert!(HttpReplay::default().replay(&post).is_none());
/// assert!(HttpReplay::all_methods().replay(&post).is_some());
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpReplay {
    all_methods: bool,
    body_limit: Option<u64>,
}

impl HttpReplay {
    /// Replays requests of every method, idempotent or not (when the server deduplicates,
    /// with an idempotency key say).
    pub const fn all_methods() -> Self {
        Self {
            all_methods: true,
            body_limit: None,
        }
    }

    /// Sends a request whose body is longer than `bytes` once: its copy would hold that much
    /// memory for every try in flight. [`Mesh::client`](crate::Mesh::client) sets the
    /// service's `http.body_limit`.
    ///
    /// ```
    /// use meshkit::retry::Replay;
    /// use meshkit::http::HttpReplay;
    ///
    /// let replay = HttpReplay::default().body_limit(4);
    /// let small = http::Request::put("http://users/1").body("1234".to_string()).unwrap();
    /// let large = http::Request::put("http://users/1").body("12345".to_string()).unwrap();
    /// assert!(replay.replay(&small).is_some());
    /// assert!(replay.replay(&large).is_none());
    /// ```
    pub const fn body_limit(mut self, bytes: u64) -> Self {
        self.body_limit = Some(bytes);
        self
    }

    fn allows(&self, method: &Method) -> bool {
        self.all_methods || is_idempotent(method)
    }

    /// Whether a body of `len` bytes (`None`: unknown) is over the limit.
    #[inline]
    fn too_long(&self, len: Option<u64>) -> bool {
        matches!((self.body_limit, len), (Some(limit), Some(len)) if len > limit)
    }
}

impl<B: ReplayableBody> Replay<Request<B>> for HttpReplay {
    fn replay(&self, request: &Request<B>) -> Option<Request<B>> {
        if !self.allows(request.method()) {
            return None;
        }
        copy(self, request)
    }

    /// Every method's requests: one that was never sent can be sent elsewhere.
    fn replay_unsent(&self, request: &Request<B>) -> Option<Request<B>> {
        copy(self, request)
    }
}

/// A copy of `request` for another try, unless its body cannot be copied or is over the
/// limit.
#[inline]
fn copy<B: ReplayableBody>(replay: &HttpReplay, request: &Request<B>) -> Option<Request<B>> {
    if replay.too_long(request.body().known_len()) {
        return None;
    }
    let mut copy = Request::new(request.body().try_clone_body()?);
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    // The copy starts with empty headers and extensions: copied only when there are some.
    if !request.headers().is_empty() {
        *copy.headers_mut() = request.headers().clone();
    }
    if !request.extensions().is_empty() {
        *copy.extensions_mut() = request.extensions().clone();
    }
    Some(copy)
}

#[cfg(feature = "reqwest")]
impl Replay<reqwest::Request> for HttpReplay {
    /// Streaming reqwest bodies cannot be cloned: those requests are sent once, as are
    /// bodies over the limit.
    fn replay(&self, request: &reqwest::Request) -> Option<reqwest::Request> {
        if !self.allows(request.method()) {
            return None;
        }
        self.replay_unsent(request)
    }

    /// Every method's requests: one that was never sent can be sent elsewhere.
    fn replay_unsent(&self, request: &reqwest::Request) -> Option<reqwest::Request> {
        let len = request
            .body()
            .map_or(Some(0), |body| body.as_bytes().map(|b| b.len() as u64));
        if self.too_long(len) {
            return None;
        }
        request.try_clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_over_the_limit_are_not_replayed() {
        fn put<B>(body: B) -> Request<B> {
            Request::put("http://users/1").body(body).unwrap()
        }
        let replay = HttpReplay::default().body_limit(3);
        assert!(replay.replay(&put(Bytes::from_static(b"abc"))).is_some());
        assert!(replay.replay(&put(Bytes::from_static(b"abcd"))).is_none());
        let buffered =
            |data: &'static [u8]| put(ReplayBody::<http_body_util::Empty<Bytes>>::buffered(data));
        assert!(replay.replay(&buffered(b"abc")).is_some());
        assert!(replay.replay(&buffered(b"abcd")).is_none());
        let full = put(http_body_util::Full::new(Bytes::from_static(b"abcd")));
        assert!(replay.replay(&full).is_none());
        assert!(
            HttpReplay::default().replay(&full).is_some(),
            "no limit unless one is set"
        );
        assert!(HttpReplay::all_methods()
            .body_limit(3)
            .replay(&put(Bytes::from_static(b"abcd")))
            .is_none());
    }

    #[cfg(feature = "reqwest")]
    #[test]
    fn reqwest_bodies_over_the_limit_are_not_replayed() {
        let replay = HttpReplay::default().body_limit(3);
        let put = |body: &'static [u8]| {
            let mut request = reqwest::Request::new(Method::PUT, "http://users/1".parse().unwrap());
            *request.body_mut() = Some(body.into());
            request
        };
        assert!(replay.replay(&put(b"abc")).is_some());
        assert!(replay.replay(&put(b"abcd")).is_none());
        let get = reqwest::Request::new(Method::GET, "http://users/1".parse().unwrap());
        assert!(replay.replay(&get).is_some(), "no body");
    }

    #[test]
    fn only_idempotent_methods_are_replayed_by_default() {
        for (method, replayed) in [
            (Method::GET, true),
            (Method::HEAD, true),
            (Method::PUT, true),
            (Method::DELETE, true),
            (Method::OPTIONS, true),
            (Method::POST, false),
            (Method::PATCH, false),
        ] {
            let request = Request::builder()
                .method(method.clone())
                .uri("http://users/1")
                .body(Bytes::from_static(b"x"))
                .unwrap();
            assert_eq!(
                HttpReplay::default().replay(&request).is_some(),
                replayed,
                "{method}"
            );
        }
    }

    #[test]
    fn a_replayed_request_is_a_faithful_copy() {
        let mut request = Request::put("http://users/1?x=1")
            .header("x-trace", "abc")
            .body(Bytes::from_static(b"payload"))
            .unwrap();
        request.extensions_mut().insert(7u32);
        let copy = HttpReplay::default().replay(&request).unwrap();
        assert_eq!(copy.method(), Method::PUT);
        assert_eq!(copy.uri(), "http://users/1?x=1");
        assert_eq!(copy.headers()["x-trace"], "abc");
        assert_eq!(copy.extensions().get::<u32>(), Some(&7));
        assert_eq!(copy.body(), &Bytes::from_static(b"payload"));
    }

    #[test]
    fn streaming_bodies_are_sent_once() {
        let streaming = Request::get("http://users/1")
            .body(ReplayBody::streaming(http_body_util::Empty::<Bytes>::new()))
            .unwrap();
        assert!(HttpReplay::default().replay(&streaming).is_none());
        let buffered = Request::get("http://users/1")
            .body(ReplayBody::<http_body_util::Empty<Bytes>>::buffered("x"))
            .unwrap();
        assert!(HttpReplay::default().replay(&buffered).is_some());
    }

    #[tokio::test]
    async fn buffered_trailers_are_sent_with_every_copy() {
        use crate::http::BufferBodyLayer;
        use http_body_util::{BodyExt, StreamBody};
        use tower::{Layer, ServiceExt};

        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", "42".parse().unwrap());
        let frames = vec![
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(b"ab"))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let body = StreamBody::new(futures::stream::iter(frames));
        let buffered = BufferBodyLayer::new(1024)
            .layer(tower::service_fn(
                |request: Request<ReplayBody<_>>| async move {
                    Ok::<_, std::convert::Infallible>(request)
                },
            ))
            .oneshot(Request::put("http://users/1").body(body).unwrap())
            .await
            .unwrap();
        let copy = HttpReplay::default().replay(&buffered).unwrap();
        for request in [buffered, copy] {
            let collected = request.into_body().collect().await.unwrap();
            assert_eq!(collected.trailers().unwrap()["x-checksum"], "42");
            assert_eq!(collected.to_bytes(), Bytes::from_static(b"ab"));
        }
    }
}
