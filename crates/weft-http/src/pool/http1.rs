//! Upstream HTTP/1 connections to one endpoint, driven by the request that uses them.
//!
//! A connection has no task of its own: the request that checked it out polls its I/O while it waits
//! for the response head, and the response body polls it while the client reads. So a request and
//! its upstream exchange run in the downstream connection's task, with no channel or wake-up between
//! tasks on the way. Once the body has ended, the connection goes back to the endpoint's idle list
//! (last in, first out) unless it has served the cluster's `max_requests_per_connection`. An idle
//! connection is checked when it is taken: one the peer has closed is dropped there, and a request
//! that a closed connection never wrote is sent again on a new one (the keep-alive race every
//! client meets). A request that asks for an upgrade (WebSocket, CONNECT) gets a connection of its
//! own, run by a task of its own, which becomes the tunnel when the upstream agrees.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self as conn, Builder, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use weft_identity::tls::TlsMaterial;
use weft_transport::DialSettings;

use super::{PoolIo, UPSTREAM_HTTP1_BUFFER};
use crate::UpstreamError;
use crate::replay::RequestBody;

/// One endpoint's idle HTTP/1 connections and how new ones are made.
#[derive(Debug)]
pub(crate) struct Http1Connections {
    endpoint: SocketAddr,
    settings: DialSettings,
    tls: watch::Receiver<Option<TlsMaterial>>,
    idle: Mutex<Vec<Idle>>,
}

#[derive(Debug)]
struct Idle {
    connection: Box<Connection>,
    since: Instant,
}

/// One upstream HTTP/1 connection: where requests are handed to hyper, and its I/O.
struct Connection {
    sender: SendRequest<RequestBody>,
    io: conn::Connection<PoolIo, RequestBody>,
    /// Responses it has carried.
    served: u32,
    ended: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("served", &self.served)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Moves the connection's I/O on as far as it can go now; whether the connection has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.ended
            && let Poll::Ready(result) = Pin::new(&mut self.io).poll(cx)
        {
            self.ended = true;
            if let Err(err) = result {
                tracing::debug!(error = %err, "upstream HTTP/1 connection ended");
            }
        }
        self.ended
    }
}

/// Why one exchange did not give a response.
enum Failure {
    /// The connection closed before it wrote the request, which comes back to be sent elsewhere.
    Unsent(Box<Request<RequestBody>>, hyper::Error),
    Failed(hyper::Error),
}

impl Http1Connections {
    pub(crate) fn new(
        endpoint: SocketAddr,
        settings: DialSettings,
        tls: watch::Receiver<Option<TlsMaterial>>,
    ) -> Self {
        Self {
            endpoint,
            settings,
            tls,
            idle: Mutex::default(),
        }
    }

    /// Sends `request` on an idle connection, or a new one, and returns the response, whose body keeps
    /// the connection going until it ends. `limit`: responses a connection carries before it retires.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut request: Request<RequestBody>,
        limit: Option<u32>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let method = request.method().clone();
        request_target(request.uri_mut(), &method);
        if method == Method::CONNECT || request.headers().contains_key(http::header::UPGRADE) {
            return self.send_upgrade(request).await;
        }
        if let Some(connection) = poll_fn(|cx| Poll::Ready(self.take_idle(cx))).await {
            match exchange(connection, request).await {
                Ok((response, connection)) => return Ok(self.respond(response, connection, limit)),
                Err(Failure::Unsent(unsent, err)) => {
                    tracing::debug!(endpoint = %self.endpoint, error = %err, "idle upstream connection had closed; sending on a new one");
                    request = *unsent;
                }
                Err(Failure::Failed(err)) => return Err(classify(err)),
            }
        }
        let connection = self.connect().await?;
        match exchange(connection, request).await {
            Ok((response, connection)) => Ok(self.respond(response, connection, limit)),
            Err(Failure::Unsent(_, err) | Failure::Failed(err)) => Err(classify(err)),
        }
    }

    /// The most recently used idle connection that is still open and within the idle timeout.
    fn take_idle(&self, cx: &mut Context<'_>) -> Option<Box<Connection>> {
        loop {
            let idle = self.lock().pop()?;
            let mut connection = idle.connection;
            if idle.since.elapsed() < self.settings.idle_timeout
                && !connection.drive(cx)
                && connection.sender.is_ready()
            {
                return Some(connection);
            }
        }
    }

    async fn send_upgrade(
        &self,
        request: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let Connection { mut sender, io, .. } = *self.connect().await?;
        tokio::spawn(async move {
            if let Err(err) = io.with_upgrades().await {
                tracing::debug!(error = %err, "upstream HTTP/1 connection for an upgrade ended");
            }
        });
        let response = sender.send_request(request).await.map_err(classify)?;
        Ok(response.map(UpstreamBody::detached))
    }

    async fn connect(&self) -> Result<Box<Connection>, UpstreamError> {
        let io = weft_transport::dial(self.endpoint, &self.settings, &self.tls, &[b"http/1.1"])
            .await
            .map_err(|err| UpstreamError::Connect(Box::new(err)))?;
        let io = PoolIo {
            inner: TokioIo::new(io),
        };
        let (sender, io) = Builder::new()
            // What a response may have read ahead while its client reads slowly.
            .max_buf_size(UPSTREAM_HTTP1_BUFFER)
            .handshake(io)
            .await
            .map_err(|err| UpstreamError::Connect(Box::new(err)))?;
        Ok(Box::new(Connection {
            sender,
            io,
            served: 0,
            ended: false,
        }))
    }

    fn respond(
        self: &Arc<Self>,
        response: Response<Incoming>,
        mut connection: Box<Connection>,
        limit: Option<u32>,
    ) -> Response<UpstreamBody> {
        connection.served = connection.served.saturating_add(1);
        let reuse = limit.is_none_or(|limit| connection.served < limit);
        response.map(|body| UpstreamBody {
            body,
            connection: Some(Lease {
                connection,
                home: self.clone(),
                reuse,
            }),
            ended: false,
        })
    }

    fn put_back(&self, connection: Box<Connection>) {
        self.lock().push(Idle {
            connection,
            since: Instant::now(),
        });
    }

    /// Drops idle connections past the idle timeout (closing them once the list is unlocked);
    /// whether any are left.
    pub(crate) fn expire(&self) -> bool {
        let timeout = self.settings.idle_timeout;
        let mut idle = self.lock();
        let expired: Vec<Idle> = idle.extract_if(.., |i| i.since.elapsed() >= timeout).collect();
        let any_left = !idle.is_empty();
        drop(idle);
        drop(expired);
        any_left
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // A poisoned lock only means another thread panicked while pushing or popping: still a list.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Hands `request` to the connection and drives it until the response head has arrived.
async fn exchange(
    mut connection: Box<Connection>,
    request: Request<RequestBody>,
) -> Result<(Response<Incoming>, Box<Connection>), Failure> {
    let mut sent = pin!(connection.sender.try_send_request(request));
    let result = poll_fn(|cx| {
        connection.drive(cx);
        sent.as_mut().poll(cx)
    })
    .await;
    match result {
        Ok(response) => Ok((response, connection)),
        Err(mut err) => match err.take_message() {
            Some(request) => Err(Failure::Unsent(Box::new(request), err.into_error())),
            None => Err(Failure::Failed(err.into_error())),
        },
    }
}

fn classify(err: hyper::Error) -> UpstreamError {
    if err.is_parse() || err.is_parse_status() {
        UpstreamError::Protocol(Box::new(err))
    } else {
        UpstreamError::Terminated(Box::new(err))
    }
}

/// An HTTP/1 request names only its path (origin form), or for CONNECT its authority; the app's
/// Host header says where it goes. The forwarder sends origin form already; this covers the rest.
fn request_target(uri: &mut Uri, method: &Method) {
    if uri.authority().is_none() {
        return;
    }
    let mut target = http::uri::Parts::default();
    match method {
        &Method::CONNECT => target.authority = uri.authority().cloned(),
        _ => {
            target.path_and_query = Some(
                uri.path_and_query()
                    .cloned()
                    .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
            )
        }
    }
    *uri = Uri::from_parts(target).unwrap_or_else(|_| Uri::from_static("/"));
}

/// A response body from upstream. Over HTTP/1 it carries its connection, driven as the body is read,
/// back to the idle list once the body has ended.
#[derive(Debug)]
pub(crate) struct UpstreamBody {
    body: Incoming,
    connection: Option<Lease>,
    /// The body has ended: hyper's `is_end_stream` knows that only of bodies with a length, so a
    /// chunked body's end is the `None` it yields.
    ended: bool,
}

#[derive(Debug)]
struct Lease {
    connection: Box<Connection>,
    home: Arc<Http1Connections>,
    reuse: bool,
}

impl UpstreamBody {
    /// A body whose connection runs on a task of its own (HTTP/2, an HTTP/1 upgrade).
    pub(crate) fn detached(body: Incoming) -> Self {
        Self {
            body,
            connection: None,
            ended: false,
        }
    }

    /// The connection goes back to the idle list if the whole response was read from it.
    fn release(&mut self) {
        if let Some(lease) = self.connection.take()
            && lease.reuse
            && !lease.connection.ended
            && (self.ended || self.body.is_end_stream())
        {
            lease.home.put_back(lease.connection);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(lease) = &mut this.connection else {
            return Pin::new(&mut this.body).poll_frame(cx);
        };
        let mut frame = Pin::new(&mut this.body).poll_frame(cx);
        if frame.is_pending() {
            // The connection reads what the body waits for.
            lease.connection.drive(cx);
            frame = Pin::new(&mut this.body).poll_frame(cx);
        }
        if matches!(frame, Poll::Ready(None)) {
            this.ended = true;
        }
        if this.ended || this.body.is_end_stream() {
            // hyper sees the end of the response, and readies the connection for the next request.
            lease.connection.drive(cx);
            this.release();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(uri: &str, method: Method) -> String {
        let mut uri: Uri = uri.parse().expect("a test URI");
        request_target(&mut uri, &method);
        uri.to_string()
    }

    #[test]
    fn an_http1_request_names_its_path_or_for_connect_its_authority() {
        assert_eq!(target("http://web:8080/a?b=c", Method::GET), "/a?b=c");
        assert_eq!(target("http://web:8080", Method::POST), "/");
        assert_eq!(target("/already?x", Method::GET), "/already?x");
        assert_eq!(target("http://web:8080/", Method::CONNECT), "web:8080");
    }
}
