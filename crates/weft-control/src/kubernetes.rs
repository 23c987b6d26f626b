//! Discovery from the Kubernetes API: the control plane lists and watches Services, EndpointSlices,
//! Pods and the Istio kinds it reads, and turns what it holds into the same [`Catalog`] the directory
//! source makes ([`crate::resources::load_objects`]: one path from resources to xDS).
//!
//! Each kind is followed by `kube`'s watcher: list, then watch from the list's resourceVersion with
//! bookmarks, relist after `410 Gone`, reconnect with backoff. A relist replaces a kind's objects only
//! once it has completed, and no catalog is made before the first list of every kind has: a proxy never
//! gets a half-listed mesh.
//!
//! Endpoints come from EndpointSlices and Pods together: a pod is a workload of the mesh while an
//! EndpointSlice lists it as ready and the pod itself is ready and not terminating (a pod being
//! deleted leaves at once, before the EndpointSlice controller catches up). The pod gives the labels
//! (subsets), the service account (the identity the client expects) and its named ports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Resource;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::resources::{self, Catalog, Problem};

/// How long changes are gathered before a new catalog is made: a rollout's burst of events becomes
/// one push, and a change still reaches the proxies well within a second.
const SETTLE: Duration = Duration::from_millis(50);

/// The Istio kinds weft control reads, under their real API groups and versions (group, version,
/// kind, plural).
const ISTIO_KINDS: [(&str, &str, &str, &str); 7] = [
    ("networking.istio.io", "v1", "VirtualService", "virtualservices"),
    ("networking.istio.io", "v1", "DestinationRule", "destinationrules"),
    ("networking.istio.io", "v1", "WorkloadEntry", "workloadentries"),
    ("networking.istio.io", "v1", "Sidecar", "sidecars"),
    (
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        "peerauthentications",
    ),
    (
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    ("telemetry.istio.io", "v1", "Telemetry", "telemetries"),
];

/// Namespace and name.
type Key = (String, String);

/// What is held of one kind.
#[derive(Debug, Default)]
struct Kind {
    /// The first list has completed (or the kind is not served: no CRD installed).
    synced: bool,
    objects: BTreeMap<Key, Value>,
    /// A list in progress, swapped in when it completes.
    listing: Option<BTreeMap<Key, Value>>,
}

/// Everything held, by kind.
#[derive(Debug, Default)]
struct Held {
    kinds: BTreeMap<&'static str, Kind>,
}

/// The catalog the API's objects make, kept current while the watches run.
#[derive(Debug)]
pub struct Discovery {
    pub catalog: watch::Receiver<Arc<Catalog>>,
    pub tasks: Vec<JoinHandle<()>>,
}

/// A client of the API server the environment names: `$KUBECONFIG` (or `~/.kube/config`), else the
/// pod's own service account (in-cluster).
pub async fn client_from_environment() -> Result<kube::Client, kube::Error> {
    kube::Client::try_default().await
}

/// Starts following the API server `client` talks to; returns once every kind has been listed, with
/// the catalog they make. `problems` is kept to the problems of the current catalog.
pub async fn discover(client: kube::Client, problems: Arc<Mutex<Vec<Problem>>>) -> Discovery {
    let held = Arc::new(Mutex::new(Held::default()));
    let changed = Arc::new(Notify::new());
    let mut tasks = vec![
        follow(
            Api::<Service>::all(client.clone()),
            "Service",
            compact_service,
            &held,
            &changed,
        ),
        follow(
            Api::<EndpointSlice>::all(client.clone()),
            "EndpointSlice",
            compact_slice,
            &held,
            &changed,
        ),
        follow(
            Api::<Pod>::all(client.clone()),
            "Pod",
            compact_pod,
            &held,
            &changed,
        ),
    ];
    for (group, version, kind, plural) in ISTIO_KINDS {
        let resource =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
        let api_version = resource.api_version.clone();
        let compact = move |o: DynamicObject| compact_custom(o, &api_version, kind);
        tasks.push(follow(api, kind, compact, &held, &changed));
    }

    // The first catalog, once every kind is listed.
    let mut waited = tokio::time::interval(Duration::from_secs(10));
    waited.tick().await;
    loop {
        let notified = changed.notified();
        let waiting = unsynced(&held);
        if waiting.is_empty() {
            break;
        }
        tokio::select! {
            () = notified => {}
            _ = waited.tick() => tracing::info!(?waiting, "waiting for the first list of every kind before serving"),
        }
    }
    let (first, found) = catalog_of(&held);
    report_new(&[], &found);
    tracing::info!(
        services = first.services.len(),
        workloads = first.workload_entries.len(),
        "listed the mesh from the Kubernetes API"
    );
    if let Ok(mut p) = problems.lock() {
        *p = found;
    }
    let (tx, rx) = watch::channel(Arc::new(first));
    tasks.push(tokio::spawn(rebuild(held, changed, tx, problems)));
    Discovery { catalog: rx, tasks }
}

fn unsynced(held: &Mutex<Held>) -> Vec<&'static str> {
    held.lock()
        .map(|h| {
            h.kinds
                .iter()
                .filter(|(_, k)| !k.synced)
                .map(|(n, _)| *n)
                .collect()
        })
        .unwrap_or_default()
}

/// Makes a new catalog after each burst of changes and publishes it if it differs.
async fn rebuild(
    held: Arc<Mutex<Held>>,
    changed: Arc<Notify>,
    catalog: watch::Sender<Arc<Catalog>>,
    problems: Arc<Mutex<Vec<Problem>>>,
) {
    loop {
        changed.notified().await;
        tokio::time::sleep(SETTLE).await;
        let (mut next, found) = catalog_of(&held);
        let before = problems.lock().map(|p| p.clone()).unwrap_or_default();
        report_new(&before, &found);
        resources::keep_last_good(&catalog.borrow(), &mut next, &found);
        if let Ok(mut p) = problems.lock() {
            *p = found;
        }
        catalog.send_if_modified(|current| {
            if **current == next {
                return false;
            }
            tracing::debug!("the mesh changed in the API; pushing to the proxies it affects");
            *current = Arc::new(next);
            true
        });
    }
}

/// Problems are logged when they appear, not on every change of anything else.
fn report_new(before: &[Problem], now: &[Problem]) {
    for problem in now.iter().filter(|p| !before.contains(p)) {
        tracing::warn!("{problem}");
    }
}

/// Follows one kind: its objects, compacted to what the catalog needs, go into `held`.
fn follow<K, C>(
    api: Api<K>,
    kind: &'static str,
    compact: C,
    held: &Arc<Mutex<Held>>,
    changed: &Arc<Notify>,
) -> JoinHandle<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    C: Fn(K) -> Value + Send + 'static,
{
    if let Ok(mut h) = held.lock() {
        h.kinds.entry(kind).or_default();
    }
    let (held, changed) = (held.clone(), changed.clone());
    tokio::spawn(async move {
        let key = |o: &K| {
            let meta = o.meta();
            (
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            )
        };
        let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default()).default_backoff());
        while let Some(event) = events.next().await {
            let Ok(mut h) = held.lock() else {
                return;
            };
            let Some(state) = h.kinds.get_mut(kind) else {
                return;
            };
            match event {
                Ok(Event::Init) => state.listing = Some(BTreeMap::new()),
                Ok(Event::InitApply(o)) => {
                    let k = key(&o);
                    state.listing.get_or_insert_default().insert(k, compact(o));
                }
                Ok(Event::InitDone) => {
                    state.objects = state.listing.take().unwrap_or_default();
                    if !state.synced {
                        tracing::info!(kind, objects = state.objects.len(), "listed");
                    }
                    state.synced = true;
                    changed.notify_one();
                }
                Ok(Event::Apply(o)) => {
                    let k = key(&o);
                    state.objects.insert(k, compact(o));
                    changed.notify_one();
                }
                Ok(Event::Delete(o)) => {
                    state.objects.remove(&key(&o));
                    changed.notify_one();
                }
                Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                    if status.code == 404 && !state.synced =>
                {
                    // The CRD is not installed: there is none of this kind, and the list is tried
                    // again (with backoff) in case it is installed later.
                    tracing::warn!(
                        kind,
                        "the API server does not serve this kind (CRD not installed?); taking it as empty"
                    );
                    state.synced = true;
                    changed.notify_one();
                }
                Err(error) => tracing::warn!(kind, %error, "watch failed; retrying with backoff"),
            }
        }
    })
}

fn metadata(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Value {
    json!({
        "name": meta.name,
        "namespace": meta.namespace,
        "labels": meta.labels.clone().unwrap_or_default(),
    })
}

fn compact_service(s: Service) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(&s.metadata),
        "spec": s.spec,
    })
}

fn compact_custom(o: DynamicObject, api_version: &str, kind: &str) -> Value {
    json!({
        "apiVersion": o.types.as_ref().map_or(api_version, |t| t.api_version.as_str()),
        "kind": kind,
        "metadata": metadata(&o.metadata),
        "spec": o.data.get("spec").cloned().unwrap_or(Value::Null),
    })
}

/// A slice's service, its ports (service port name -> the port the endpoints serve it on) and the pods
/// it lists as ready.
fn compact_slice(s: EndpointSlice) -> Value {
    let service = s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/service-name"))
        .cloned();
    let ports: BTreeMap<String, i32> = s
        .ports
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| Some((p.name.unwrap_or_default(), p.port?)))
        .collect();
    let mut ready = Vec::new();
    let mut other = Vec::new();
    for endpoint in s.endpoints {
        let conditions = endpoint.conditions.unwrap_or_default();
        // Unset `ready` means ready; a terminating endpoint is never ready for new requests.
        let is_ready = conditions.ready != Some(false) && conditions.terminating != Some(true);
        match endpoint.target_ref {
            Some(target) if target.kind.as_deref() == Some("Pod") => {
                if is_ready {
                    ready.push(target.name.unwrap_or_default());
                }
            }
            _ => other.extend(endpoint.addresses),
        }
    }
    json!({ "service": service, "ports": ports, "pods": ready, "unmanaged": other })
}

/// What the mesh needs of a pod: labels, service account, address, named container ports, and
/// whether it can take requests.
fn compact_pod(p: Pod) -> Value {
    let spec = p.spec.unwrap_or_default();
    let status = p.status.unwrap_or_default();
    let ready = status
        .conditions
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let terminating = p.metadata.deletion_timestamp.is_some();
    let ports: BTreeMap<String, i32> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|port| Some((port.name.clone()?, port.container_port)))
        .collect();
    json!({
        "metadata": metadata(&p.metadata),
        "serviceAccount": spec.service_account_name.unwrap_or_else(|| "default".to_owned()),
        "address": status.pod_ip,
        "ports": ports,
        "serving": ready && !terminating && status.phase.as_deref() == Some("Running"),
    })
}

/// The catalog of everything held: Services and the Istio kinds as they are, and a WorkloadEntry for
/// each pod an EndpointSlice lists as ready and that is serving.
fn catalog_of(held: &Mutex<Held>) -> (Catalog, Vec<Problem>) {
    let Ok(held) = held.lock() else {
        return (Catalog::default(), Vec::new());
    };
    let source = |kind: &str, (ns, name): &Key| PathBuf::from(format!("kubernetes {kind} {ns}/{name}"));
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    for (kind, state) in &held.kinds {
        if matches!(*kind, "Pod" | "EndpointSlice") {
            continue;
        }
        for (key, object) in &state.objects {
            match serde_yaml_ng::to_value(object) {
                Ok(value) => objects.push((source(kind, key), value)),
                Err(e) => problems.push(Problem {
                    file: source(kind, key),
                    resource: format!("{kind} {}/{}", key.0, key.1),
                    field: "-".into(),
                    problem: format!("cannot read: {e}"),
                }),
            }
        }
    }

    // Pod -> the ports the slices listing it give, by service port name.
    let mut listed: BTreeMap<Key, BTreeMap<String, Value>> = BTreeMap::new();
    let mut unmanaged = BTreeSet::new();
    if let Some(slices) = held.kinds.get("EndpointSlice") {
        for ((ns, _), slice) in &slices.objects {
            let ports = slice["ports"].as_object().cloned().unwrap_or_default();
            for pod in slice["pods"].as_array().into_iter().flatten() {
                let entry = listed
                    .entry((ns.clone(), pod.as_str().unwrap_or_default().to_owned()))
                    .or_default();
                entry.extend(
                    ports
                        .iter()
                        .filter(|(n, _)| !n.is_empty())
                        .map(|(n, p)| (n.clone(), p.clone())),
                );
            }
            if slice["unmanaged"].as_array().is_some_and(|a| !a.is_empty()) {
                unmanaged.insert((
                    ns.clone(),
                    slice["service"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
    }
    for (ns, service) in unmanaged {
        problems.push(Problem {
            file: PathBuf::from(format!("kubernetes EndpointSlice {ns}/{service}")),
            resource: format!("Service {ns}/{service}"),
            field: "endpoints".into(),
            problem: "endpoints that are not pods (no targetRef) are not routed to yet".into(),
        });
    }
    if let Some(pods) = held.kinds.get("Pod") {
        for (key, ports) in listed {
            let Some(pod) = pods.objects.get(&key) else {
                continue; // listed by a slice before the pod's own event arrived
            };
            if pod["serving"] != Value::Bool(true) || pod["address"].is_null() {
                continue;
            }
            let mut named = pod["ports"].as_object().cloned().unwrap_or_default();
            named.extend(ports);
            let entry = json!({
                "apiVersion": "networking.istio.io/v1",
                "kind": "WorkloadEntry",
                "metadata": pod["metadata"],
                "spec": {
                    "address": pod["address"],
                    "labels": pod["metadata"]["labels"],
                    "ports": named,
                    "serviceAccount": pod["serviceAccount"],
                },
            });
            if let Ok(value) = serde_yaml_ng::to_value(&entry) {
                objects.push((source("Pod", &key), value));
            }
        }
    }
    drop(held);
    let (catalog, mut found) = resources::load_objects(objects);
    problems.append(&mut found);
    (catalog, problems)
}
