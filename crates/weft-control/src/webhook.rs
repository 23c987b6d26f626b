//! The sidecar injector as a mutating admission webhook (Istio's port 15017, path `/inject`), over
//! TLS with a serving certificate from the control plane's own CA (the MutatingWebhookConfiguration's
//! `caBundle` is that CA's root). The injection itself is `weft inject`'s ([`weft_inject::webhook`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_stream::wrappers::ReceiverStream;
use weft_inject::Settings;
use weft_inject::webhook::{Outcome, review};

use crate::tls::TlsConn;

/// The API server sends a pod of at most a few hundred KiB; anything past this is not a review.
const MAX_REVIEW_BYTES: usize = 8 << 20;

/// How the injector has answered so far.
#[derive(Debug, Default)]
pub struct WebhookCounts {
    pub injected: AtomicU64,
    pub unchanged: AtomicU64,
    /// Reviews allowed unchanged because the injector could not act (each logged with why).
    pub failed: AtomicU64,
}

pub(crate) async fn serve(
    mut connections: ReceiverStream<Result<TlsConn, std::io::Error>>,
    settings: Arc<Settings>,
    counts: Arc<WebhookCounts>,
) {
    while let Some(connection) = connections.next().await {
        let Ok(connection) = connection else { continue };
        let (settings, counts) = (settings.clone(), counts.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (settings, counts) = (settings.clone(), counts.clone());
                async move { Ok::<_, Infallible>(answer(req, &settings, &counts).await) }
            });
            let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(connection), service)
                .await;
            if let Err(err) = served {
                tracing::debug!(error = %err, "admission webhook connection ended");
            }
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    settings: &Settings,
    counts: &WebhookCounts,
) -> Response<Full<Bytes>> {
    if req.uri().path() != "/inject" {
        return respond(StatusCode::NOT_FOUND, "text/plain", "not found\n");
    }
    if req.method() != Method::POST {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use POST\n");
    }
    // A body that cannot be read still gets a review back: the injector never blocks a pod.
    let body = match Limited::new(req.into_body(), MAX_REVIEW_BYTES).collect().await {
        Ok(body) => body.to_bytes(),
        Err(err) => {
            tracing::warn!(error = %err, "admission review body could not be read");
            Bytes::new()
        }
    };
    let (reviewed, outcome) = review(&body, settings);
    match &outcome {
        Outcome::Injected => counts.injected.fetch_add(1, Ordering::Relaxed),
        Outcome::Unchanged => counts.unchanged.fetch_add(1, Ordering::Relaxed),
        Outcome::Failed(why) => {
            tracing::warn!(%why, "admission review allowed without injection");
            counts.failed.fetch_add(1, Ordering::Relaxed)
        }
    };
    respond(StatusCode::OK, "application/json", reviewed.to_string())
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
