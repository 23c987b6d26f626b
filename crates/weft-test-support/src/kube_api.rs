//! A Kubernetes API server for tests: HTTPS on loopback (or on a listener the test bound elsewhere, in
//! a pod's network namespace), speaking the API server's protocol to any client, `kube`'s included:
//! bearer-token authentication of the caller, `Status` objects for errors, and the
//! `authentication.k8s.io/v1` TokenReview the CA asks, and list/watch of objects: a JSON list with
//! `metadata.resourceVersion` (paged with `limit`/`continue`), `?watch=1&resourceVersion=..` streaming
//! `ADDED`/`MODIFIED`/`DELETED`/`BOOKMARK` events, and an `ERROR` event with `410 Gone` for a version
//! older than the history it keeps. It holds service-account tokens as the API server would (opaque to
//! the caller, bound to audiences, expired on demand) and writes a kubeconfig for its clients. Objects
//! are the `k8s-openapi` types serialized, or YAML as `kubectl get -o yaml` prints it.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus, UserInfo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

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
    /// Lists (each page counts) and watches started, by resource path (`/api/v1/services`).
    pub lists: BTreeMap<String, u64>,
    pub watches: BTreeMap<String, u64>,
    /// Watches answered with `410 Gone`.
    pub expired_watches: u64,
}

/// How often an idle watch gets a bookmark.
const BOOKMARK_EVERY: Duration = Duration::from_millis(500);

/// A kind the server serves: its API version and kind, by resource path.
#[derive(Debug, Clone)]
struct Served {
    api_version: String,
    kind: String,
}

#[derive(Debug, Clone)]
struct Change {
    path: String,
    version: u64,
    kind: &'static str,
    namespace: String,
    object: Value,
}

/// The objects, their history, and the global resourceVersion (etcd's revision).
#[derive(Debug, Default)]
struct Objects {
    version: u64,
    served: BTreeMap<String, Served>,
    /// Resource path -> (namespace, name) -> object.
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    history: Vec<Change>,
    /// Versions at or below this are forgotten: a watch from one gets 410.
    compacted: u64,
    /// Bumped to end every open watch.
    generation: u64,
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
    objects: Objects,
    /// Resource paths whose lists are held unanswered until released (a slow API server).
    held_lists: std::collections::HashSet<String>,
}

#[derive(Debug)]
pub struct ApiServer {
    address: SocketAddr,
    ca_pem: String,
    reviewer_token: String,
    state: Arc<Mutex<State>>,
    /// Ticks on every change, for open watches.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
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
        let mut objects = Objects::default();
        for (api_version, kind) in SERVED {
            objects.served.insert(
                resource_path(api_version, kind),
                Served {
                    api_version: api_version.to_owned(),
                    kind: kind.to_owned(),
                },
            );
        }
        let state = Arc::new(Mutex::new(State {
            reviewers: vec![reviewer_token.clone()],
            objects,
            ..State::default()
        }));
        let changes = Arc::new(tokio::sync::watch::channel(0).0);
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let served = state.clone();
        let ticks = changes.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, state, ticks) = (acceptor.clone(), served.clone(), ticks.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let (state, ticks) = (state.clone(), ticks.clone());
                        async move { Ok::<_, Infallible>(handle(req, &state, &ticks).await) }
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
            changes,
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

/// The kinds served from the start: the built-in ones weft control watches and the Istio kinds.
const SERVED: [(&str, &str); 10] = [
    ("v1", "Service"),
    ("v1", "Pod"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
    ("networking.istio.io/v1", "VirtualService"),
    ("networking.istio.io/v1", "DestinationRule"),
    ("networking.istio.io/v1", "WorkloadEntry"),
    ("networking.istio.io/v1", "Sidecar"),
    ("security.istio.io/v1", "PeerAuthentication"),
    ("security.istio.io/v1", "AuthorizationPolicy"),
    ("telemetry.istio.io/v1", "Telemetry"),
];

/// `/api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`: where a kind is listed across
/// namespaces.
fn resource_path(api_version: &str, kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    let plural = match lower.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None => format!("{lower}s"),
    };
    if api_version.contains('/') {
        format!("/apis/{api_version}/{plural}")
    } else {
        format!("/api/{api_version}/{plural}")
    }
}

impl ApiServer {
    /// Creates or replaces an object (anything that serializes with `apiVersion`, `kind` and
    /// `metadata`, a `k8s-openapi` type or a `serde_json::Value`); returns its new resourceVersion.
    pub fn apply(&self, object: &impl serde::Serialize) -> u64 {
        let mut object = serde_json::to_value(object).unwrap();
        let (path, namespace, name) = identify(&object);
        let mut state = self.state.lock().unwrap();
        let objects = &mut state.objects;
        assert!(objects.served.contains_key(&path), "{path} is not served");
        objects.version += 1;
        let version = objects.version;
        let metadata = object["metadata"].as_object_mut().unwrap();
        metadata.insert("namespace".into(), json!(namespace));
        metadata.insert("resourceVersion".into(), json!(version.to_string()));
        metadata
            .entry("uid")
            .or_insert_with(|| json!(format!("uid-{version}")));
        let held = objects.objects.entry(path.clone()).or_default();
        let kind = if held.contains_key(&(namespace.clone(), name.clone())) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        held.insert((namespace.clone(), name), object.clone());
        objects.history.push(Change {
            path,
            version,
            kind,
            namespace,
            object,
        });
        drop(state);
        self.changes.send_modify(|v| *v += 1);
        version
    }

    /// Applies every document of `yaml` (as `kubectl get -o yaml` prints objects, or a `List`).
    pub fn apply_yaml(&self, yaml: &str) {
        for document in serde_yaml_ng::Deserializer::from_str(yaml) {
            let value: Value = serde::Deserialize::deserialize(document).unwrap();
            if value.is_null() {
                continue;
            }
            if value["kind"] == "List" {
                for item in value["items"].as_array().into_iter().flatten() {
                    self.apply(item);
                }
            } else {
                self.apply(&value);
            }
        }
    }

    /// Deletes an object; returns whether it was there.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let path = resource_path(api_version, kind);
        let mut state = self.state.lock().unwrap();
        let objects = &mut state.objects;
        let Some(mut object) = objects
            .objects
            .get_mut(&path)
            .and_then(|held| held.remove(&(namespace.to_owned(), name.to_owned())))
        else {
            return false;
        };
        objects.version += 1;
        let version = objects.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        objects.history.push(Change {
            path,
            version,
            kind: "DELETED",
            namespace: namespace.to_owned(),
            object,
        });
        drop(state);
        self.changes.send_modify(|v| *v += 1);
        true
    }

    /// Forgets the history so far, as etcd's compaction does: a watch from an older version gets
    /// `410 Gone` and its client must list again.
    pub fn compact(&self) {
        let mut state = self.state.lock().unwrap();
        state.objects.compacted = state.objects.version;
        state.objects.history.clear();
    }

    /// Ends every open watch (as a restarting API server or a dropped connection does); clients
    /// watch again from the last version they saw.
    pub fn break_watches(&self) {
        self.state.lock().unwrap().objects.generation += 1;
        self.changes.send_modify(|v| *v += 1);
    }

    /// Stops serving a kind (its CRD deleted): lists and watches of it get 404.
    pub fn stop_serving(&self, api_version: &str, kind: &str) {
        let path = resource_path(api_version, kind);
        self.state.lock().unwrap().objects.served.remove(&path);
    }

    /// Holds every list of a kind unanswered (an API server slow to list it) until
    /// [`ApiServer::release_lists`].
    pub fn hold_lists(&self, api_version: &str, kind: &str) {
        let path = resource_path(api_version, kind);
        self.state.lock().unwrap().held_lists.insert(path);
    }

    pub fn release_lists(&self, api_version: &str, kind: &str) {
        let path = resource_path(api_version, kind);
        self.state.lock().unwrap().held_lists.remove(&path);
        self.changes.send_modify(|v| *v += 1);
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.state.lock().unwrap().objects.version
    }
}

/// An object's resource path, namespace (`default` when unset) and name.
fn identify(object: &Value) -> (String, String, String) {
    let api_version = object["apiVersion"].as_str().expect("apiVersion");
    let kind = object["kind"].as_str().expect("kind");
    let name = object["metadata"]["name"].as_str().expect("metadata.name");
    let namespace = object["metadata"]["namespace"].as_str().unwrap_or("default");
    (
        resource_path(api_version, kind),
        namespace.to_owned(),
        name.to_owned(),
    )
}

type Body = BoxBody<Bytes, Infallible>;

async fn handle(
    req: Request<Incoming>,
    state: &Arc<Mutex<State>>,
    changes: &Arc<tokio::sync::watch::Sender<u64>>,
) -> Response<Body> {
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
            let message = if method == Method::POST {
                "tokenreviews.authentication.k8s.io is forbidden: User cannot create resource \
                 \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope"
                    .to_owned()
            } else {
                format!("User cannot list or watch {path} at the cluster scope")
            };
            return status(StatusCode::FORBIDDEN, "Forbidden", &message);
        }
    }
    if method == Method::GET {
        let query = query_of(req.uri().query().unwrap_or_default());
        let mut released = changes.subscribe();
        while !query.contains_key("watch") && state.lock().unwrap().held_lists.contains(&path) {
            if released.changed().await.is_err() {
                break;
            }
        }
        return list_or_watch(&path, &query, state, changes);
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

fn json(code: StatusCode, body: &[u8]) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::copy_from_slice(body)).boxed())
        .unwrap()
}

fn query_of(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.replace("%3A", ":").replace("%2F", "/")),
            None => (p.to_owned(), String::new()),
        })
        .collect()
}

/// `GET` of a resource path, across namespaces or in one (`/api/v1/namespaces/<ns>/pods`).
fn list_or_watch(
    path: &str,
    query: &HashMap<String, String>,
    shared: &Arc<Mutex<State>>,
    changes: &Arc<tokio::sync::watch::Sender<u64>>,
) -> Response<Body> {
    let (resource, namespace) = match path.split_once("/namespaces/") {
        Some((prefix, rest)) => match rest.split_once('/') {
            Some((ns, plural)) => (format!("{prefix}/{plural}"), Some(ns.to_owned())),
            None => (path.to_owned(), None),
        },
        None => (path.to_owned(), None),
    };
    let mut state = shared.lock().unwrap();
    let Some(served) = state.objects.served.get(&resource).cloned() else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource (get {path})"),
        );
    };
    let in_namespace = move |ns: &str| namespace.as_deref().is_none_or(|n| n == ns);
    let watching = matches!(query.get("watch").map(String::as_str), Some("1" | "true"));
    if !watching {
        *state.counts.lists.entry(resource.clone()).or_default() += 1;
        let objects = &state.objects;
        let all: Vec<&Value> = objects
            .objects
            .get(&resource)
            .into_iter()
            .flat_map(|held| held.iter())
            .filter(|((ns, _), _)| in_namespace(ns))
            .map(|(_, o)| o)
            .collect();
        let start: usize = query.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
        let limit: usize = query
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        let page: Vec<&Value> = all.iter().skip(start).take(limit).copied().collect();
        let next = start.saturating_add(page.len());
        let mut metadata = json!({ "resourceVersion": objects.version.to_string() });
        if next < all.len() {
            metadata["continue"] = json!(next.to_string());
        }
        let list = json!({
            "apiVersion": served.api_version,
            "kind": format!("{}List", served.kind),
            "metadata": metadata,
            "items": page,
        });
        return json(StatusCode::OK, list.to_string().as_bytes());
    }

    *state.counts.watches.entry(resource.clone()).or_default() += 1;
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(state.objects.version);
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(300), Duration::from_secs);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    if from < state.objects.compacted {
        state.counts.expired_watches += 1;
        let gone = json!({
            "type": "ERROR",
            "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from} ({})", state.objects.compacted),
                "reason": "Expired", "code": 410,
            },
        });
        let _ = tx.try_send(Bytes::from(format!("{gone}\n")));
    } else {
        let generation = state.objects.generation;
        let (shared, mut ticks) = (shared.clone(), changes.subscribe());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut cursor = from;
            loop {
                let lines: Vec<String> = {
                    let state = shared.lock().unwrap();
                    if state.objects.generation != generation {
                        return;
                    }
                    let lines = state
                        .objects
                        .history
                        .iter()
                        .filter(|c| c.version > cursor && c.path == resource && in_namespace(&c.namespace))
                        .map(|c| json!({ "type": c.kind, "object": c.object }).to_string())
                        .collect();
                    cursor = cursor.max(state.objects.version);
                    lines
                };
                for line in lines {
                    if tx.send(Bytes::from(format!("{line}\n"))).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    changed = ticks.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(BOOKMARK_EVERY), if bookmarks => {
                        let bookmark = json!({
                            "type": "BOOKMARK",
                            "object": {
                                "apiVersion": served.api_version,
                                "kind": served.kind,
                                "metadata": { "resourceVersion": cursor.to_string() },
                            },
                        });
                        if tx.send(Bytes::from(format!("{bookmark}\n"))).await.is_err() {
                            return;
                        }
                    }
                    () = tokio::time::sleep_until(deadline) => return,
                }
            }
        });
    }
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<_, Infallible>(Frame::data(line)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

/// An API error, as the API server writes it: a `Status` object.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
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
