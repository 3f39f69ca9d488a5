//! The HTTP check: `GET` a path on the instance's own address (the `http` feature).

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tower::BoxError;

/// `GET http://{authority}{path}` over a fresh connection; the response's status code.
///
/// The request goes only to `authority`, the registered instance's own `host:port`: `path`
/// was validated as a plain absolute path, so it cannot name another host.
pub(crate) async fn get(authority: &str, path: &str) -> Result<u16, BoxError> {
    let stream = tokio::net::TcpStream::connect(authority).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let request = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::USER_AGENT, "meshkit-health-check")
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request);
    tokio::pin!(connection);
    tokio::select! {
        response = response => Ok(response?.status().as_u16()),
        closed = &mut connection => match closed {
            Ok(()) => Err("connection closed before the response".into()),
            Err(error) => Err(error.into()),
        },
    }
}
