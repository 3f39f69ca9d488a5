//! [`ReplayBody`] and [`BufferBodyLayer`]: request bodies buffered so a retry can send them
//! again.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use http::{HeaderMap, Request};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::{Layer, Service};

/// A request body that is either held whole in memory (and can be sent any number of times)
/// or streamed once: what [`BufferBodyLayer`] hands to the services below it.
pub struct ReplayBody<B: Body> {
    kind: Kind<B>,
}

enum Kind<B: Body> {
    /// The whole body; `sent` once its data has been yielded. Trailers are rare and a
    /// `HeaderMap` is large: boxed, they keep every request (moved through each layer, and
    /// copied for a retry) small.
    Buffered {
        data: Bytes,
        trailers: Option<Box<HeaderMap>>,
        sent: bool,
    },
    /// Too large to keep (or failed while read): what was read while finding out, the error
    /// met then, if any, and the rest as it comes.
    Streaming {
        head: Option<Bytes>,
        failed: Option<B::Error>,
        rest: B,
    },
}

impl<B: Body> ReplayBody<B> {
    /// A body held whole: it can be replayed.
    pub fn buffered(data: impl Into<Bytes>) -> Self {
        Self::whole(data.into(), None)
    }

    fn whole(data: Bytes, trailers: Option<Box<HeaderMap>>) -> Self {
        Self {
            kind: Kind::Buffered {
                data,
                trailers,
                sent: false,
            },
        }
    }

    /// A body sent once, as it streams.
    pub fn streaming(body: B) -> Self {
        streaming_after(Bytes::new(), None, body)
    }

    /// Whether it is held whole (and so can be sent again).
    pub fn is_buffered(&self) -> bool {
        matches!(self.kind, Kind::Buffered { .. })
    }

    /// The length of a body held whole; `None` for one that streams.
    pub(crate) fn buffered_len(&self) -> Option<u64> {
        match &self.kind {
            Kind::Buffered { data, .. } => Some(data.len() as u64),
            Kind::Streaming { .. } => None,
        }
    }

    /// A fresh copy to send again, if it is held whole.
    pub fn try_clone(&self) -> Option<Self> {
        match &self.kind {
            Kind::Buffered { data, trailers, .. } => {
                Some(Self::whole(data.clone(), trailers.clone()))
            }
            Kind::Streaming { .. } => None,
        }
    }
}

// Nothing in it is pinned: the inner body is `Unpin` wherever it is polled, and the error
// kept for later is only moved, never polled.
impl<B: Body + Unpin> Unpin for ReplayBody<B> {}

impl<B> Body for ReplayBody<B>
where
    B: Body + Unpin,
    B::Data: Buf,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match &mut self.get_mut().kind {
            Kind::Buffered {
                data,
                trailers,
                sent,
            } => {
                if !*sent {
                    *sent = true;
                    if !data.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(data.clone()))));
                    }
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(*t))))
            }
            Kind::Streaming { head, failed, rest } => {
                if let Some(head) = head.take() {
                    return Poll::Ready(Some(Ok(Frame::data(head))));
                }
                if let Some(error) = failed.take() {
                    return Poll::Ready(Some(Err(error)));
                }
                Poll::Ready(match std::task::ready!(Pin::new(rest).poll_frame(cx)) {
                    Some(Ok(frame)) => Some(Ok(
                        frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))
                    )),
                    Some(Err(error)) => Some(Err(error)),
                    None => None,
                })
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Buffered {
                data,
                trailers,
                sent,
            } => (*sent || data.is_empty()) && trailers.is_none(),
            Kind::Streaming { head, failed, rest } => {
                head.is_none() && failed.is_none() && rest.is_end_stream()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Buffered { data, sent, .. } => {
                SizeHint::with_exact(if *sent { 0 } else { data.len() as u64 })
            }
            Kind::Streaming { head, rest, .. } => {
                let extra = head.as_ref().map_or(0, |h| h.len() as u64);
                let hint = rest.size_hint();
                let mut sum = SizeHint::new();
                sum.set_lower(hint.lower() + extra);
                if let Some(upper) = hint.upper() {
                    sum.set_upper(upper + extra);
                }
                sum
            }
        }
    }
}

impl<B: Body> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Buffered { data, .. } => f.debug_tuple("Buffered").field(&data.len()).finish(),
            Kind::Streaming { .. } => f.write_str("Streaming"),
        }
    }
}

/// Buffers request bodies up to `limit` bytes, so the retry and hedge layers below it can
/// send them again; larger bodies stream through once (and are never retried).
///
/// Place it above the retry layer: `ServiceBuilder::new().layer(BufferBodyLayer::new(64 *
/// 1024)).layer(retry).service(client)`. Services below see `Request<ReplayBody<B>>`.
#[derive(Clone, Copy, Debug)]
pub struct BufferBodyLayer {
    limit: usize,
}

impl BufferBodyLayer {
    /// Keeps bodies of at most `limit` bytes.
    pub const fn new(limit: usize) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for BufferBodyLayer {
    type Service = BufferBody<S>;

    fn layer(&self, inner: S) -> BufferBody<S> {
        BufferBody {
            inner,
            limit: Limit::Fixed(self.limit),
        }
    }
}

/// The service [`BufferBodyLayer`] builds.
#[derive(Clone, Debug)]
pub struct BufferBody<S> {
    inner: S,
    limit: Limit,
}

/// A [`BufferBody`]'s limit: its own, or one its owner changes (a mesh client's, which a
/// reload sets).
#[derive(Clone, Debug)]
enum Limit {
    Fixed(usize),
    Shared(Arc<AtomicUsize>),
}

impl<S> BufferBody<S> {
    /// Keeps bodies of at most what `limit` holds when a request is called.
    pub(crate) fn with_shared_limit(inner: S, limit: Arc<AtomicUsize>) -> Self {
        Self {
            inner,
            limit: Limit::Shared(limit),
        }
    }
}

crate::macros::inner_accessors!(BufferBody);

impl<S, B> Service<Request<B>> for BufferBody<S>
where
    S: Service<Request<ReplayBody<B>>> + Clone + Send + 'static,
    S::Future: Send,
    B: Body + Unpin + Send + 'static,
    B::Data: Buf + Send,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let limit = match &self.limit {
            Limit::Fixed(limit) => *limit,
            Limit::Shared(limit) => limit.load(Ordering::Relaxed),
        } as u64;
        let (parts, body) = request.into_parts();
        if body.size_hint().lower() > limit {
            // Known to be too large: never read ahead, and call now.
            let request = Request::from_parts(parts, ReplayBody::streaming(body));
            return Box::pin(self.inner.call(request));
        }
        // The service made ready is the one called, after the body is read.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let body = read_up_to(body, limit).await;
            inner.call(Request::from_parts(parts, body)).await
        })
    }
}

/// Reads `body` whole if it is at most `limit` bytes; otherwise keeps what was read and
/// streams the rest. A body error ends the buffering: the error is sent on with the rest.
///
/// A body that arrives in one frame (`Full<Bytes>`, `String`, most small bodies) is kept as
/// that frame's bytes, without a copy when its data is `Bytes` (which keeps alive whatever
/// buffer the frame was cut from, as long as the request lives); frames are gathered into
/// one buffer only from the second on.
async fn read_up_to<B>(mut body: B, limit: u64) -> ReplayBody<B>
where
    B: Body + Unpin,
    B::Data: Buf,
{
    let mut read = Read::default();
    loop {
        match body.frame().await {
            None => return ReplayBody::whole(read.freeze(), None),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    read.push(data);
                    if read.len() as u64 > limit {
                        return streaming_after(read.freeze(), None, body);
                    }
                }
                Err(frame) => {
                    // Trailers end the body.
                    let trailers = frame.into_trailers().ok().map(Box::new);
                    return ReplayBody::whole(read.freeze(), trailers);
                }
            },
            // Hand the error to the service below, once: a body that failed is not replayed.
            Some(Err(error)) => return streaming_after(read.freeze(), Some(error), body),
        }
    }
}

/// The data of a body read so far: nothing, one frame's bytes as they came, or a buffer
/// gathering several frames.
#[derive(Default)]
enum Read {
    #[default]
    Empty,
    One(Bytes),
    Many(BytesMut),
}

impl Read {
    fn push(&mut self, mut data: impl Buf) {
        match self {
            Read::Empty => *self = Read::One(data.copy_to_bytes(data.remaining())),
            Read::One(first) => {
                let mut all = BytesMut::with_capacity(first.len() + data.remaining());
                all.extend_from_slice(first);
                all.put(data);
                *self = Read::Many(all);
            }
            Read::Many(all) => all.put(data),
        }
    }

    fn len(&self) -> usize {
        match self {
            Read::Empty => 0,
            Read::One(bytes) => bytes.len(),
            Read::Many(all) => all.len(),
        }
    }

    fn freeze(self) -> Bytes {
        match self {
            Read::Empty => Bytes::new(),
            Read::One(bytes) => bytes,
            Read::Many(all) => all.freeze(),
        }
    }
}

fn streaming_after<B: Body>(head: Bytes, failed: Option<B::Error>, rest: B) -> ReplayBody<B> {
    ReplayBody {
        kind: Kind::Streaming {
            head: (!head.is_empty()).then_some(head),
            failed,
            rest,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::convert::Infallible;

    type FrameResult = Result<Frame<Bytes>, Infallible>;

    /// A body of `parts`, one data frame each.
    fn frames(parts: &[&'static str]) -> StreamBody<impl futures::Stream<Item = FrameResult>> {
        let frames: Vec<FrameResult> = parts
            .iter()
            .map(|part| Ok(Frame::data(Bytes::from_static(part.as_bytes()))))
            .collect();
        StreamBody::new(futures::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_body_in_one_frame_is_kept_without_a_copy() {
        let data = Bytes::from(vec![7u8; 1000]);
        let body = read_up_to(Full::new(data.clone()), 4096).await;
        assert!(body.is_buffered());
        let kept = body.collect().await.unwrap().to_bytes();
        assert_eq!(kept, data);
        assert_eq!(
            kept.as_ptr(),
            data.as_ptr(),
            "the frame's own bytes, not a copy"
        );
    }

    #[tokio::test]
    async fn frames_under_the_limit_are_gathered_in_order() {
        let body = read_up_to(frames(&["ab", "cd", "ef"]), 6).await;
        assert!(body.is_buffered());
        let copy = body.try_clone().unwrap();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcdef");
        assert_eq!(copy.collect().await.unwrap().to_bytes(), "abcdef");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_streams_everything_once() {
        let body = read_up_to(frames(&["ab", "cd", "ef", "gh"]), 5).await;
        assert!(!body.is_buffered());
        assert!(body.try_clone().is_none());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcdefgh");
    }
}
