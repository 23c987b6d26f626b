//! A Kubernetes API server for tests: HTTPS on loopback (or on a listener the test bound elsewhere, in
//! a pod's network namespace), speaking the API server's protocol to any client, `kube`'s included:
//! bearer-token authentication of the caller, `Status` objects for errors, and the
//! `authentication.k8s.io/v1` TokenReview the CA asks. It holds service-account tokens as the API
//! server would (opaque to the caller, bound to audiences, expired on demand) and writes a kubeconfig
//! for its clients. Objects are the `k8s-openapi` types, serialized.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The audience an unbound token (and a review without audiences) is for, as a kubeadm cluster's.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

#[derive(Debug, Clone)]
struct ServiceAccountToken {
    namespace: String,
    name: String,
    audiences: Vec<String>,
    expired: bool,
}

/// What the server has seen, for assertions.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    /// TokenReviews answered, by whether the token was authenticated.
    pub reviews_authenticated: u64,
    pub reviews_refused: u64,
    /// Requests refused for the caller's own credentials (401) or rights (403).
    pub unauthorized: u64,
}

#[derive(Debug, Default)]
struct State {
    tokens: HashMap<String, ServiceAccountToken>,
    /// Callers' tokens allowed to create TokenReviews (the control plane's, bound to
    /// `system:auth-delegator`); any other known token is authenticated but forbidden.
    reviewers: Vec<String>,
    counts: Counts,
    /// Token -> times a review of it was answered.
    reviewed: HashMap<String, u64>,
}

#[derive(Debug)]
pub struct ApiServer {
    address: SocketAddr,
    ca_pem: String,
    reviewer_token: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn random_token() -> String {
    let bytes: [u8; 24] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl ApiServer {
    /// Serves on a new loopback port.
    pub async fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Self::serve(listener)
    }

    /// Serves on `listener` (bound wherever the clients are); its address must be an IP the
    /// certificate can name.
    pub fn serve(listener: std::net::TcpListener) -> Self {
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["kubernetes.default.svc".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(address.ip()));
        params.is_ca = rcgen::IsCa::NoCa;
        let cert = params.self_signed(&key).unwrap();
        let ca_pem = cert.pem();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let reviewer_token = random_token();
        let state = Arc::new(Mutex::new(State {
            reviewers: vec![reviewer_token.clone()],
            ..State::default()
        }));
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let served = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, state) = (acceptor.clone(), served.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(req, &state).await) }
                    });
                    let _ =
                        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                            .await;
                });
            }
        });
        Self {
            address,
            ca_pem,
            reviewer_token,
            state,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.address)
    }

    /// The server certificate (self-signed: it is its own CA), PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A kubeconfig for a client allowed to review tokens (the control plane's).
    pub fn kubeconfig(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.ca_pem.as_bytes());
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority-data: {b64}\n\
             users:\n- name: weft-control\n  user:\n    token: {}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: weft-control\n",
            self.url(),
            self.reviewer_token
        )
    }

    pub fn write_kubeconfig(&self, path: &Path) {
        std::fs::write(path, self.kubeconfig()).unwrap();
    }

    /// A new token for service account `namespace`/`name`, valid for `audiences` (a projected token;
    /// none: the API server's own audience, as a legacy Secret token).
    pub fn service_account_token(&self, namespace: &str, name: &str, audiences: &[&str]) -> String {
        let token = random_token();
        let audiences = if audiences.is_empty() {
            vec![API_AUDIENCE.to_owned()]
        } else {
            audiences.iter().map(|a| (*a).to_owned()).collect()
        };
        self.state.lock().unwrap().tokens.insert(
            token.clone(),
            ServiceAccountToken {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                audiences,
                expired: false,
            },
        );
        token
    }

    /// From now on `token` is refused as expired (the kubelet would have rotated it by then).
    pub fn expire(&self, token: &str) {
        if let Some(t) = self.state.lock().unwrap().tokens.get_mut(token) {
            t.expired = true;
        }
    }

    pub fn counts(&self) -> Counts {
        self.state.lock().unwrap().counts.clone()
    }

    /// How many reviews of `token` were answered.
    pub fn reviews_of(&self, token: &str) -> u64 {
        self.state
            .lock()
            .unwrap()
            .reviewed
            .get(token)
            .copied()
            .unwrap_or(0)
    }
}

async fn handle(req: Request<Incoming>, state: &Mutex<State>) -> Response<Full<Bytes>> {
    let caller = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    {
        let mut state = state.lock().unwrap();
        let known = caller
            .as_deref()
            .is_some_and(|c| state.reviewers.iter().any(|r| r == c) || state.tokens.contains_key(c));
        if !known {
            state.counts.unauthorized += 1;
            return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
        }
        let reviewer = caller
            .as_deref()
            .is_some_and(|c| state.reviewers.iter().any(|r| r == c));
        if !reviewer {
            state.counts.unauthorized += 1;
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                "tokenreviews.authentication.k8s.io is forbidden: User cannot create resource \
                 \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope",
            );
        }
    }
    if method != Method::POST || path != "/apis/authentication.k8s.io/v1/tokenreviews" {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({method} {path})"),
        );
    }
    let Ok(body) = req.into_body().collect().await else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
    };
    let mut review: TokenReview = match serde_json::from_slice(&body.to_bytes()) {
        Ok(review) => review,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
    };
    let token = review.spec.token.clone().unwrap_or_default();
    let wanted = review
        .spec
        .audiences
        .clone()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| vec![API_AUDIENCE.to_owned()]);
    let mut state = state.lock().unwrap();
    *state.reviewed.entry(token.clone()).or_default() += 1;
    let answer = match state.tokens.get(&token) {
        None => refused("[invalid bearer token, square/go-jose: compact JWS format must have three parts]"),
        Some(t) if t.expired => refused("[invalid bearer token, service account token has expired]"),
        Some(t) => {
            let audiences: Vec<String> = wanted
                .iter()
                .filter(|a| t.audiences.contains(a))
                .cloned()
                .collect();
            if audiences.is_empty() {
                refused("[invalid bearer token, token audiences is invalid for the target audiences]")
            } else {
                TokenReviewStatus {
                    authenticated: Some(true),
                    audiences: Some(audiences),
                    user: Some(UserInfo {
                        username: Some(format!("system:serviceaccount:{}:{}", t.namespace, t.name)),
                        groups: Some(vec![
                            "system:serviceaccounts".to_owned(),
                            format!("system:serviceaccounts:{}", t.namespace),
                            "system:authenticated".to_owned(),
                        ]),
                        ..UserInfo::default()
                    }),
                    error: None,
                }
            }
        }
    };
    if answer.authenticated == Some(true) {
        state.counts.reviews_authenticated += 1;
    } else {
        state.counts.reviews_refused += 1;
    }
    review.status = Some(answer);
    json(StatusCode::CREATED, &serde_json::to_vec(&review).unwrap())
}

fn refused(error: &str) -> TokenReviewStatus {
    TokenReviewStatus {
        authenticated: Some(false),
        error: Some(error.to_owned()),
        ..TokenReviewStatus::default()
    }
}

fn json(code: StatusCode, body: &[u8]) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap()
}

/// An API error, as the API server writes it: a `Status` object.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    json(code, body.to_string().as_bytes())
}
