//! The Kubernetes and Istio resources the control plane reads, as users write them (apiVersion, kind,
//! metadata, spec), and loading them from a directory of YAML files. Every problem is reported with the
//! file, the resource and the field; a bad resource is left out and never stops the rest.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_NAMESPACE: &str = "default";
pub const CLUSTER_DOMAIN: &str = "svc.cluster.local";

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl Metadata {
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }
}

// ---- core/v1 Service ----

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub target_port: Option<TargetPort>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// What a service port speaks, by Istio's rules: `appProtocol`, else the port name's prefix
/// (`http-web`, `grpc`, ...), else unknown (detected by the proxy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortProtocol {
    Http,
    Tcp,
    Unknown,
}

impl ServicePort {
    pub fn protocol(&self) -> PortProtocol {
        let classify = |p: &str| match p.to_ascii_lowercase().as_str() {
            "http" | "http2" | "grpc" | "grpc-web" | "h2c" => Some(PortProtocol::Http),
            "tcp" | "tls" | "https" | "mysql" | "mongo" | "redis" => Some(PortProtocol::Tcp),
            _ => None,
        };
        if let Some(p) = self.app_protocol.as_deref().and_then(classify) {
            return p;
        }
        let name = self.name.as_deref().unwrap_or_default();
        let prefix = name.split('-').next().unwrap_or_default();
        classify(prefix).unwrap_or(PortProtocol::Unknown)
    }
}

// ---- networking.istio.io WorkloadEntry ----

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntrySpec {
    pub address: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Service port name -> the port this workload listens on for it.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub weight: Option<u32>,
}

// ---- networking.istio.io VirtualService ----

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    pub hosts: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    /// The namespaces whose proxies get these routes (see [`exported_to`]).
    #[serde(default)]
    pub export_to: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatch>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub retries: Option<Retries>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    #[serde(default)]
    pub uri: Option<StringMatch>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub method: Option<StringMatch>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StringMatch {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteDestination {
    pub destination: Destination,
    #[serde(default)]
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    pub host: String,
    #[serde(default)]
    pub subset: Option<String>,
    #[serde(default)]
    pub port: Option<PortSelector>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PortSelector {
    pub number: u16,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    pub attempts: u32,
    #[serde(default, with = "humantime_serde")]
    pub per_try_timeout: Option<Duration>,
    #[serde(default)]
    pub retry_on: Option<IstioRetryOn>,
}

/// Istio's `retryOn`: Envoy retry conditions and HTTP status codes, comma-separated (`5xx,503`).
#[derive(Debug, Clone, PartialEq)]
pub struct IstioRetryOn {
    pub conditions: weft_model::RetryOn,
    pub status_codes: Vec<u32>,
}

impl<'de> Deserialize<'de> for IstioRetryOn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let mut words = Vec::new();
        let mut status_codes = Vec::new();
        for item in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match item.parse::<u32>() {
                Ok(code @ 100..=599) => status_codes.push(code),
                Ok(code) => return Err(serde::de::Error::custom(format!("{code} is not an HTTP status"))),
                Err(_) => words.push(item),
            }
        }
        let mut conditions: weft_model::RetryOn =
            words.join(",").parse().map_err(serde::de::Error::custom)?;
        if !status_codes.is_empty() {
            conditions = conditions.union(weft_model::RetryOn::RETRIABLE_STATUS_CODES);
        }
        Ok(Self {
            conditions,
            status_codes,
        })
    }
}

// ---- networking.istio.io DestinationRule ----

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    pub host: String,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    /// The namespaces whose proxies apply this rule (see [`exported_to`]).
    #[serde(default)]
    pub export_to: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct LoadBalancer {
    pub simple: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct ConnectionPool {
    #[serde(default)]
    pub tcp: Option<TcpPool>,
    #[serde(default)]
    pub http: Option<HttpPool>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TcpPool {
    #[serde(default)]
    pub max_connections: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpPool {
    #[serde(default)]
    pub http1_max_pending_requests: Option<u32>,
    #[serde(default)]
    pub http2_max_requests: Option<u32>,
    #[serde(default)]
    pub max_requests_per_connection: Option<u32>,
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// Idle time after which a pooled upstream connection is closed.
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    #[serde(default)]
    pub h2_upgrade_policy: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    #[serde(default)]
    pub consecutive5xx_errors: Option<u32>,
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub base_ejection_time: Option<Duration>,
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
    #[serde(default)]
    pub split_external_local_origin_errors: bool,
    #[serde(default)]
    pub consecutive_local_origin_failures: Option<u32>,
    /// Istio's panic threshold: below this percentage of healthy endpoints, ejections are ignored.
    #[serde(default)]
    pub min_health_percent: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

// ---- networking.istio.io Sidecar ----

/// Istio's Sidecar: what the proxies of a namespace (or the workloads it selects) see of the mesh.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    #[serde(default)]
    pub workload_selector: Option<SidecarSelector>,
    #[serde(default)]
    pub egress: Vec<SidecarEgress>,
    #[serde(default)]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SidecarSelector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SidecarEgress {
    /// `namespace/dnsName`: the namespace `*`, `.` (the Sidecar's own) or a name, `~` for none; the
    /// name `*`, `*.suffix` or a service's FQDN.
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct OutboundTrafficPolicy {
    pub mode: OutboundMode,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum OutboundMode {
    #[serde(rename = "ALLOW_ANY")]
    AllowAny,
    #[serde(rename = "REGISTRY_ONLY")]
    RegistryOnly,
}

/// Istio's `exportTo` (and a Service's `networking.istio.io/exportTo` annotation): whether a resource
/// of `namespace` is visible to the proxies of `viewer`. Empty is Istio's default, `*`: everyone.
pub fn exported_to(export_to: &[String], namespace: &str, viewer: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || e == viewer || (e == "." && namespace == viewer))
}

/// The annotation by which a Kubernetes Service says who sees it.
pub const SERVICE_EXPORT_TO: &str = "networking.istio.io/exportTo";

impl Resource<ServiceSpec> {
    /// The Service's `networking.istio.io/exportTo`, as a list.
    pub fn export_to(&self) -> Vec<String> {
        self.metadata
            .annotations
            .get(SERVICE_EXPORT_TO)
            .map(|a| {
                a.split(',')
                    .map(|e| e.trim().to_owned())
                    .filter(|e| !e.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }
}

// ---- security.istio.io PeerAuthentication ----

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub mtls: Option<MutualTls>,
    /// Modes for single ports of the workload (its container ports, not the Service's), over `mtls`.
    #[serde(default)]
    pub port_level_mtls: BTreeMap<PortNumber, MutualTls>,
}

/// A port as a map key: a number in YAML (`8080:`), a string in JSON (`"8080":`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortNumber(pub u16);

impl<'de> Deserialize<'de> for PortNumber {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Key {
            Number(u64),
            Text(String),
        }
        let port = match Key::deserialize(d)? {
            Key::Number(n) => u16::try_from(n).ok(),
            Key::Text(t) => t.parse::<u16>().ok(),
        };
        port.filter(|p| *p != 0)
            .map(PortNumber)
            .ok_or_else(|| serde::de::Error::custom("a port is a number from 1 to 65535"))
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct MutualTls {
    pub mode: MtlsMode,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum MtlsMode {
    #[serde(rename = "UNSET")]
    Unset,
    #[serde(rename = "DISABLE")]
    Disable,
    #[serde(rename = "PERMISSIVE")]
    Permissive,
    #[serde(rename = "STRICT")]
    Strict,
}

// ---- telemetry.istio.io Telemetry ----

/// Istio's Telemetry: which proxies write access logs. Only `accessLogging` is read; `tracing` and
/// `metrics` are reported as not supported.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub access_logging: Vec<AccessLogging>,
    /// Gateway API targets (`targetRef`, `targetRefs`): not supported, so such a Telemetry is not applied.
    #[serde(default)]
    pub target_ref: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    pub target_refs: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    pub tracing: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    pub metrics: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogging {
    #[serde(default)]
    pub providers: Vec<ProviderRef>,
    #[serde(default)]
    pub disabled: Option<bool>,
    #[serde(default, rename = "match")]
    pub matcher: Option<LoggingMatch>,
    #[serde(default)]
    pub filter: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProviderRef {
    pub name: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoggingMatch {
    #[serde(default)]
    pub mode: LoggingMode,
}

/// Which side of a hop logs: the client's sidecar (outbound), the server's (inbound), or both.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum LoggingMode {
    #[default]
    #[serde(rename = "CLIENT_AND_SERVER")]
    ClientAndServer,
    #[serde(rename = "CLIENT")]
    Client,
    #[serde(rename = "SERVER")]
    Server,
}

/// The access-log provider Istio has built in: Envoy's file logger to the proxy's stdout.
pub const ENVOY_PROVIDER: &str = "envoy";

/// Istio's default root namespace: a PeerAuthentication or AuthorizationPolicy there without a selector
/// applies mesh-wide. `WEFT_ROOT_NAMESPACE` changes it (Istio's `meshConfig.rootNamespace`).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// The root namespace in force, read once.
pub fn root_namespace() -> &'static str {
    static ROOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        std::env::var("WEFT_ROOT_NAMESPACE")
            .ok()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| DEFAULT_ROOT_NAMESPACE.to_owned())
    })
}

// ---- loading ----

/// One resource of a kind the control plane understands.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource<S> {
    pub metadata: Metadata,
    pub spec: S,
    /// Where it was read from, for reports.
    pub file: PathBuf,
}

/// Everything loaded from the configuration directory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    pub services: Vec<Resource<ServiceSpec>>,
    pub workload_entries: Vec<Resource<WorkloadEntrySpec>>,
    pub virtual_services: Vec<Resource<VirtualServiceSpec>>,
    pub destination_rules: Vec<Resource<DestinationRuleSpec>>,
    pub peer_authentications: Vec<Resource<PeerAuthenticationSpec>>,
    pub authorization_policies: Vec<Resource<weft_authz::istio::AuthorizationPolicySpec>>,
    pub telemetries: Vec<Resource<TelemetrySpec>>,
    pub sidecars: Vec<Resource<SidecarSpec>>,
    /// Kinds read and left alone because they are not mesh configuration (a Deployment, a
    /// ServiceAccount), with how many of each: reported by name, never silently.
    pub ignored: BTreeMap<String, usize>,
    /// Indexes and translated snapshots, made on first use.
    pub(crate) derived: crate::index::Derived,
}

impl Catalog {
    /// One line per resource read and what the control plane does with it, then the kinds it ignores:
    /// nothing read is passed over in silence.
    pub fn summary(&self) -> Vec<String> {
        use weft_authz::istio::IstioAction;
        fn lines<S>(out: &mut Vec<String>, kind: &str, list: &[Resource<S>], what: impl Fn(&S) -> String) {
            for r in list {
                out.push(format!(
                    "{kind} {}/{}: {}",
                    r.metadata.namespace(),
                    r.metadata.name,
                    what(&r.spec)
                ));
            }
        }
        let mut out = Vec::new();
        lines(&mut out, "Service", &self.services, |_| {
            "served as clusters, listeners and routes".into()
        });
        lines(&mut out, "WorkloadEntry", &self.workload_entries, |_| {
            "served as endpoints".into()
        });
        lines(&mut out, "VirtualService", &self.virtual_services, |_| {
            "served as routes".into()
        });
        lines(&mut out, "DestinationRule", &self.destination_rules, |_| {
            "served as cluster policy".into()
        });
        lines(&mut out, "PeerAuthentication", &self.peer_authentications, |_| {
            "enforced on inbound".into()
        });
        lines(&mut out, "Sidecar", &self.sidecars, |spec| {
            let hosts: Vec<_> = spec.egress.iter().flat_map(|e| e.hosts.iter().cloned()).collect();
            let mut line = match &spec.workload_selector {
                Some(_) => "scopes the workloads it selects".to_owned(),
                None => "scopes its namespace's proxies (mesh-wide in the root namespace)".to_owned(),
            };
            if !spec.egress.is_empty() {
                line.push_str(&format!(" to {}", hosts.join(", ")));
            }
            if spec.outbound_traffic_policy.as_ref().map(|p| p.mode) == Some(OutboundMode::RegistryOnly) {
                line.push_str("; REGISTRY_ONLY: other destinations are refused");
            }
            line
        });
        lines(&mut out, "Telemetry", &self.telemetries, |_| {
            "access logging served to the proxies it selects".into()
        });
        lines(
            &mut out,
            "AuthorizationPolicy",
            &self.authorization_policies,
            |spec| {
                let action = match spec.action {
                    IstioAction::Allow => "ALLOW",
                    IstioAction::Deny => "DENY",
                    IstioAction::Audit => "AUDIT (observed, never enforced)",
                    IstioAction::Custom => "CUSTOM (no external authorizer: its rules deny)",
                };
                let scope = match &spec.selector {
                    Some(s) => format!(
                        "workloads with {}",
                        s.match_labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                    None => "every workload of its namespace (mesh-wide in the root namespace)".into(),
                };
                let mut line = format!(
                    "enforced on inbound, {action}, {} rule(s), on {scope}",
                    spec.rules.len()
                );
                for finding in weft_authz::istio::tcp_findings(spec) {
                    line.push_str(&format!("; on TCP ports: {}: {}", finding.field, finding.problem));
                }
                line
            },
        );
        for (kind, count) in &self.ignored {
            out.push(format!("{kind} x{count}: ignored (not mesh configuration)"));
        }
        out
    }
}

/// A problem with one resource (or one document).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// `Kind namespace/name`, or the document's position when it has no name.
    pub resource: String,
    pub field: String,
    pub problem: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: field `{}`: {}",
            self.file.display(),
            self.resource,
            self.field,
            self.problem
        )
    }
}

/// Kubernetes kinds that are not mesh configuration: read, counted and listed as ignored.
const NOT_MESH_CONFIGURATION: [&str; 13] = [
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Job",
    "CronJob",
    "Pod",
    "ServiceAccount",
    "Namespace",
    "ConfigMap",
    "Secret",
    "Role",
    "RoleBinding",
];

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<Metadata>,
    spec: Option<serde_yaml_ng::Value>,
}

/// Reads every `.yaml`/`.yml` file under `dir` (sorted, so reports and versions are stable).
pub fn load_dir(dir: &Path) -> (Catalog, Vec<Problem>) {
    DirLoader::default().load(dir)
}

/// Loads a directory again and again, parsing only the files whose size or modification time changed
/// since the last load (a 10,000-service mesh is 10,000 files; one edit should cost one parse). The
/// checks across resources run on the whole catalog each time.
#[derive(Debug, Default)]
pub struct DirLoader {
    files: HashMap<PathBuf, ParsedFile>,
    /// Files parsed by the last load.
    parsed: usize,
}

#[derive(Debug)]
struct ParsedFile {
    len: u64,
    modified: Option<std::time::SystemTime>,
    /// The file's resources, unchecked.
    catalog: Catalog,
    problems: Vec<Problem>,
}

impl DirLoader {
    pub fn load(&mut self, dir: &Path) -> (Catalog, Vec<Problem>) {
        let mut problems = Vec::new();
        let mut files = Vec::new();
        collect_files(dir, &mut files, &mut problems);
        files.sort();
        self.parsed = 0;
        let mut parsed = HashMap::with_capacity(files.len());
        for file in &files {
            // Through symlinks: a ConfigMap key is a link whose target changes.
            let meta = std::fs::metadata(file).ok();
            let (len, modified) = (
                meta.as_ref().map_or(0, |m| m.len()),
                meta.and_then(|m| m.modified().ok()),
            );
            if let Some(known) = self.files.remove(file)
                && known.len == len
                && known.modified == modified
            {
                parsed.insert(file.clone(), known);
                continue;
            }
            self.parsed += 1;
            let mut catalog = Catalog::default();
            let mut found = Vec::new();
            match std::fs::read_to_string(file) {
                Ok(text) => load_text(file, &text, &mut catalog, &mut found),
                Err(e) => found.push(Problem {
                    file: file.clone(),
                    resource: "-".into(),
                    field: "-".into(),
                    problem: format!("cannot read: {e}"),
                }),
            }
            parsed.insert(
                file.clone(),
                ParsedFile {
                    len,
                    modified,
                    catalog,
                    problems: found,
                },
            );
        }
        self.files = parsed;
        let mut catalog = Catalog::default();
        for file in &files {
            if let Some(p) = self.files.get(file) {
                catalog.extend_from(&p.catalog);
                problems.extend(p.problems.iter().cloned());
            }
        }
        validate(&mut catalog, &mut problems);
        (catalog, problems)
    }
}

impl Catalog {
    /// Appends copies of `other`'s resources (unchecked: [`validate`] runs on the whole).
    fn extend_from(&mut self, other: &Catalog) {
        self.services.extend(other.services.iter().cloned());
        self.workload_entries
            .extend(other.workload_entries.iter().cloned());
        self.virtual_services
            .extend(other.virtual_services.iter().cloned());
        self.destination_rules
            .extend(other.destination_rules.iter().cloned());
        self.peer_authentications
            .extend(other.peer_authentications.iter().cloned());
        self.authorization_policies
            .extend(other.authorization_policies.iter().cloned());
        self.telemetries.extend(other.telemetries.iter().cloned());
        self.sidecars.extend(other.sidecars.iter().cloned());
        for (kind, count) in &other.ignored {
            *self.ignored.entry(kind.clone()).or_default() += count;
        }
    }
}

/// Parses files of resources (each multi-document YAML) and checks them across each other: what is
/// wrong is reported, naming the resource and field, and left out of the catalog.
pub fn load_files<'a>(files: impl IntoIterator<Item = (&'a Path, &'a str)>) -> (Catalog, Vec<Problem>) {
    let mut catalog = Catalog::default();
    let mut problems = Vec::new();
    for (file, text) in files {
        load_text(file, text, &mut catalog, &mut problems);
    }
    validate(&mut catalog, &mut problems);
    (catalog, problems)
}

fn collect_files(dir: &Path, files: &mut Vec<PathBuf>, problems: &mut Vec<Problem>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            problems.push(Problem {
                file: dir.into(),
                resource: "-".into(),
                field: "-".into(),
                problem: format!("cannot read directory: {e}"),
            });
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // A ConfigMap mount keeps each version in a hidden directory (`..2026_12_03...`, `..data`)
        // behind the keys' symlinks: the visible names are the files, each once.
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            collect_files(&path, files, problems);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
}

/// Parses one multi-document file into the catalog (unchecked: [`load_files`] checks).
fn load_text(file: &Path, text: &str, catalog: &mut Catalog, problems: &mut Vec<Problem>) {
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let position = format!("document {}", index + 1);
        let value = match serde_yaml_ng::Value::deserialize(document) {
            Ok(serde_yaml_ng::Value::Null) => continue, // an empty document between `---`
            Ok(value) => value,
            Err(e) => {
                problems.push(Problem {
                    file: file.into(),
                    resource: position,
                    field: "-".into(),
                    problem: format!("not YAML: {e}"),
                });
                break; // the parser cannot resynchronise after a syntax error
            }
        };
        load_object(file, &position, value, catalog, problems);
    }
}

/// Objects from the Kubernetes API (or anywhere else that gives them one by one), each named by
/// `source` in reports, parsed and checked as [`load_files`] does files: one path from resources to
/// the catalog, whichever source fed them.
pub fn load_objects(
    objects: impl IntoIterator<Item = (PathBuf, serde_yaml_ng::Value)>,
) -> (Catalog, Vec<Problem>) {
    let mut catalog = Catalog::default();
    let mut problems = Vec::new();
    for (index, (source, value)) in objects.into_iter().enumerate() {
        load_object(
            &source,
            &format!("object {}", index + 1),
            value,
            &mut catalog,
            &mut problems,
        );
    }
    validate(&mut catalog, &mut problems);
    (catalog, problems)
}

/// Parses one resource into the catalog (unchecked).
fn load_object(
    file: &Path,
    position: &str,
    value: serde_yaml_ng::Value,
    catalog: &mut Catalog,
    problems: &mut Vec<Problem>,
) {
    let problem = |resource: &str, field: &str, problem: String| Problem {
        file: file.into(),
        resource: resource.into(),
        field: field.into(),
        problem,
    };
    let envelope: Envelope = match serde_yaml_ng::from_value(value) {
        Ok(e) => e,
        Err(e) => {
            problems.push(problem(position, "-", e.to_string()));
            return;
        }
    };
    let Some(kind) = envelope.kind else {
        problems.push(problem(position, "kind", "missing".into()));
        return;
    };
    let Some(metadata) = envelope.metadata else {
        problems.push(problem(
            &format!("{kind} ({position})"),
            "metadata.name",
            "missing".into(),
        ));
        return;
    };
    let resource = format!("{kind} {}/{}", metadata.namespace(), metadata.name);
    let api = envelope.api_version.unwrap_or_default();
    let spec = envelope.spec.unwrap_or(serde_yaml_ng::Value::Null);
    macro_rules! push {
        ($list:expr, $api_ok:expr) => {{
            if !$api_ok {
                problems.push(problem(
                    &resource,
                    "apiVersion",
                    format!("\"{api}\" is not an API version of {kind}"),
                ));
                return;
            }
            let mut unread = Vec::new();
            let read =
                serde_path_to_error::deserialize(serde_ignored::Deserializer::new(spec, &mut |path| {
                    unread.push(spec_field(&path))
                }));
            match read {
                Ok(spec) => {
                    // Istio's kinds are read field by field: one weft does not apply is named, never
                    // passed over (Kubernetes' own Service carries many that do not concern the mesh).
                    if kind != "Service" {
                        for field in unread {
                            problems.push(problem(&resource, &field, NOT_APPLIED.into()));
                        }
                    }
                    $list.push(Resource {
                        metadata,
                        spec,
                        file: file.into(),
                    })
                }
                Err(e) => {
                    let path = e.path().to_string();
                    let field = if path == "." {
                        "spec".to_owned()
                    } else {
                        format!("spec.{path}")
                    };
                    problems.push(problem(&resource, &field, e.into_inner().to_string()));
                }
            }
        }};
    }
    let istio = api.starts_with("networking.istio.io/");
    match kind.as_str() {
        "Service" => push!(catalog.services, api == "v1"),
        "WorkloadEntry" => push!(catalog.workload_entries, istio),
        "VirtualService" => push!(catalog.virtual_services, istio),
        "DestinationRule" => push!(catalog.destination_rules, istio),
        "Sidecar" => push!(catalog.sidecars, istio),
        "PeerAuthentication" => push!(
            catalog.peer_authentications,
            api.starts_with("security.istio.io/")
        ),
        "AuthorizationPolicy" => {
            let before = catalog.authorization_policies.len();
            push!(
                catalog.authorization_policies,
                matches!(api.as_str(), "security.istio.io/v1" | "security.istio.io/v1beta1")
            );
            // Enforced, but where a part cannot be evaluated it fails closed: say which part.
            if let Some(p) = catalog.authorization_policies.get(before) {
                for finding in weft_authz::istio::check(&p.spec) {
                    problems.push(problem(&resource, &finding.field, finding.problem));
                }
            }
        }
        "Telemetry" => {
            let before = catalog.telemetries.len();
            push!(catalog.telemetries, api.starts_with("telemetry.istio.io/"));
            if let Some(t) = catalog.telemetries.get_mut(before) {
                for (field, why) in telemetry_findings(&mut t.spec) {
                    problems.push(problem(&resource, &field, why));
                }
            }
        }
        "RequestAuthentication" => problems.push(problem(
            &resource,
            "kind",
            "RequestAuthentication (JWT) is not supported yet: no request is authenticated by it, and AuthorizationPolicy fields that need a JWT fail closed".into(),
        )),
        k if NOT_MESH_CONFIGURATION.contains(&k) => {
            *catalog.ignored.entry(k.to_owned()).or_default() += 1;
        }
        other => problems.push(problem(
            &resource,
            "kind",
            format!("{other} is not a kind weft control reads"),
        )),
    }
}

/// What is said of a field of an Istio resource that weft reads past.
const NOT_APPLIED: &str = "not supported by weft: this field is not applied (the rest of the resource is)";

/// `spec.http[0].fault`, as users write a field's place (and as `serde_path_to_error` reports one).
fn spec_field(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => "spec".into(),
        Path::Seq { parent, index } => format!("{}[{index}]", spec_field(parent)),
        Path::Map { parent, key } => format!("{}.{key}", spec_field(parent)),
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => {
            spec_field(parent)
        }
    }
}

/// A resource that was valid and now has a problem keeps its last good version: a typo in an edit never
/// takes a route away from traffic that had it. (A resource that never was valid stays out.)
pub fn keep_last_good(previous: &Catalog, next: &mut Catalog, problems: &[Problem]) {
    fn carry<S: Clone>(kind: &str, prev: &[Resource<S>], next: &mut Vec<Resource<S>>, problems: &[Problem]) {
        for p in prev {
            let id = format!("{kind} {}/{}", p.metadata.namespace(), p.metadata.name);
            let broken = problems.iter().any(|problem| problem.resource == id);
            let present = next.iter().any(|n| {
                n.metadata.name == p.metadata.name && n.metadata.namespace() == p.metadata.namespace()
            });
            if broken && !present {
                tracing::warn!(resource = %id, "keeping the last good version");
                next.push(p.clone());
            }
        }
    }
    carry("Service", &previous.services, &mut next.services, problems);
    carry(
        "WorkloadEntry",
        &previous.workload_entries,
        &mut next.workload_entries,
        problems,
    );
    carry(
        "VirtualService",
        &previous.virtual_services,
        &mut next.virtual_services,
        problems,
    );
    carry(
        "DestinationRule",
        &previous.destination_rules,
        &mut next.destination_rules,
        problems,
    );
    carry(
        "PeerAuthentication",
        &previous.peer_authentications,
        &mut next.peer_authentications,
        problems,
    );
    carry(
        "Telemetry",
        &previous.telemetries,
        &mut next.telemetries,
        problems,
    );
    carry("Sidecar", &previous.sidecars, &mut next.sidecars, problems);
    // A policy that stops parsing keeps its last good version: an edit with a typo must never open a
    // workload that the policy protected.
    carry(
        "AuthorizationPolicy",
        &previous.authorization_policies,
        &mut next.authorization_policies,
        problems,
    );
}

/// Checks across resources; what fails is reported and removed.
fn validate(catalog: &mut Catalog, problems: &mut Vec<Problem>) {
    let report =
        |problems: &mut Vec<Problem>, file: &Path, resource: String, field: String, problem: String| {
            problems.push(Problem {
                file: file.into(),
                resource,
                field,
                problem,
            });
        };
    catalog.services.retain(|s| {
        let resource = format!("Service {}/{}", s.metadata.namespace(), s.metadata.name);
        for (i, p) in s.spec.ports.iter().enumerate() {
            if p.port == 0 {
                report(
                    problems,
                    &s.file,
                    resource,
                    format!("spec.ports[{i}].port"),
                    "port 0 is not a port".into(),
                );
                return false;
            }
        }
        if let Some(ip) = &s.spec.cluster_ip
            && ip != "None"
            && ip.parse::<std::net::IpAddr>().is_err()
        {
            report(
                problems,
                &s.file,
                resource,
                "spec.clusterIP".into(),
                format!("\"{ip}\" is not an IP address"),
            );
            return false;
        }
        true
    });
    catalog.workload_entries.retain(|w| {
        if w.spec.address.parse::<std::net::IpAddr>().is_err() {
            let resource = format!("WorkloadEntry {}/{}", w.metadata.namespace(), w.metadata.name);
            report(
                problems,
                &w.file,
                resource,
                "spec.address".into(),
                format!("\"{}\" is not an IP address", w.spec.address),
            );
            return false;
        }
        true
    });
    // HTTP/1 between sidecars always travels as HTTP/2 (the proxies tell each other apart by ALPN), so
    // a rule that asks for HTTP/1 on the hop cannot be honoured.
    catalog.destination_rules.retain(|dr| {
        let policy = dr
            .spec
            .traffic_policy
            .as_ref()
            .and_then(|t| t.connection_pool.as_ref())
            .and_then(|c| c.http.as_ref())
            .and_then(|h| h.h2_upgrade_policy.as_deref());
        match policy {
            None | Some("DEFAULT" | "UPGRADE") => true,
            Some(other) => {
                let resource = format!("DestinationRule {}/{}", dr.metadata.namespace(), dr.metadata.name);
                report(
                    problems,
                    &dr.file,
                    resource,
                    "spec.trafficPolicy.connectionPool.http.h2UpgradePolicy".into(),
                    format!(
                        "\"{other}\" is not supported: HTTP/1 requests between sidecars always travel as HTTP/2 (DEFAULT and UPGRADE are accepted)"
                    ),
                );
                false
            }
        }
    });
    let hosts: std::collections::HashSet<String> = catalog
        .services
        .iter()
        .map(|s| fqdn(&s.metadata.name, s.metadata.namespace()))
        .collect();
    // Per host, the subsets its DestinationRules define.
    let mut subsets: std::collections::HashMap<String, std::collections::HashSet<&str>> =
        std::collections::HashMap::new();
    for dr in &catalog.destination_rules {
        subsets
            .entry(resolve_host(&dr.spec.host, dr.metadata.namespace()))
            .or_default()
            .extend(dr.spec.subsets.iter().map(|s| s.name.as_str()));
    }
    catalog.virtual_services.retain(|vs| {
        let resource = format!("VirtualService {}/{}", vs.metadata.namespace(), vs.metadata.name);
        for (i, rule) in vs.spec.http.iter().enumerate() {
            if rule.route.is_empty() {
                report(
                    problems,
                    &vs.file,
                    resource.clone(),
                    format!("spec.http[{i}].route"),
                    "at least one destination is required".into(),
                );
                return false;
            }
            for (j, m) in rule.matches.iter().enumerate() {
                let uri = m
                    .uri
                    .iter()
                    .map(|u| (format!("spec.http[{i}].match[{j}].uri"), u));
                let headers = m
                    .headers
                    .iter()
                    .chain(&m.without_headers)
                    .map(|(h, v)| (format!("spec.http[{i}].match[{j}].headers.{h}"), v));
                for (field, sm) in uri.chain(headers) {
                    let set = [&sm.exact, &sm.prefix, &sm.regex]
                        .iter()
                        .filter(|o| o.is_some())
                        .count();
                    if set != 1 {
                        report(
                            problems,
                            &vs.file,
                            resource.clone(),
                            field,
                            "give exactly one of exact, prefix, regex".into(),
                        );
                        return false;
                    }
                    if let Some(re) = &sm.regex
                        && regex_is_invalid(re)
                    {
                        report(
                            problems,
                            &vs.file,
                            resource.clone(),
                            field,
                            format!("invalid regex \"{re}\""),
                        );
                        return false;
                    }
                }
            }
            for (j, dest) in rule.route.iter().enumerate() {
                let host = resolve_host(&dest.destination.host, vs.metadata.namespace());
                let field = format!("spec.http[{i}].route[{j}].destination");
                if !hosts.contains(&host) {
                    report(
                        problems,
                        &vs.file,
                        resource.clone(),
                        format!("{field}.host"),
                        format!("no Service \"{host}\""),
                    );
                    return false;
                }
                if let Some(subset) = &dest.destination.subset {
                    let defined = subsets.get(&host).is_some_and(|s| s.contains(subset.as_str()));
                    if !defined {
                        report(
                            problems,
                            &vs.file,
                            resource.clone(),
                            format!("{field}.subset"),
                            format!("no DestinationRule defines subset \"{subset}\" of {host}"),
                        );
                        return false;
                    }
                }
            }
            let weights: u32 = rule.route.iter().map(|r| r.weight.unwrap_or(0)).sum();
            if rule.route.len() > 1 && weights != 100 {
                report(
                    problems,
                    &vs.file,
                    resource.clone(),
                    format!("spec.http[{i}].route"),
                    format!("weights add up to {weights}, not 100"),
                );
                return false;
            }
        }
        true
    });
    validate_scoping(catalog, problems);
}

/// `exportTo` entries and Sidecar hosts: what scopes the mesh is refused when it does not parse, so a
/// typo never reads as "visible to nobody" or "to everyone".
fn validate_scoping(catalog: &mut Catalog, problems: &mut Vec<Problem>) {
    fn bad_export(export_to: &[String]) -> Option<String> {
        export_to
            .iter()
            .find(|e| !(matches!(e.as_str(), "*" | "." | "~") || is_dns_label(e)))
            .map(|e| format!("\"{e}\" is not `*`, `.`, `~` or a namespace"))
    }
    let mut refuse = |file: &Path, resource: String, field: &str, problem: String| {
        problems.push(Problem {
            file: file.into(),
            resource,
            field: field.into(),
            problem,
        });
        false
    };
    catalog.services.retain(|s| match bad_export(&s.export_to()) {
        Some(why) => refuse(
            &s.file,
            format!("Service {}/{}", s.metadata.namespace(), s.metadata.name),
            &format!("metadata.annotations.{SERVICE_EXPORT_TO}"),
            why,
        ),
        None => true,
    });
    catalog
        .virtual_services
        .retain(|v| match bad_export(&v.spec.export_to) {
            Some(why) => refuse(
                &v.file,
                format!("VirtualService {}/{}", v.metadata.namespace(), v.metadata.name),
                "spec.exportTo",
                why,
            ),
            None => true,
        });
    catalog
        .destination_rules
        .retain(|d| match bad_export(&d.spec.export_to) {
            Some(why) => refuse(
                &d.file,
                format!("DestinationRule {}/{}", d.metadata.namespace(), d.metadata.name),
                "spec.exportTo",
                why,
            ),
            None => true,
        });
    catalog.sidecars.retain(|sc| {
        let resource = format!("Sidecar {}/{}", sc.metadata.namespace(), sc.metadata.name);
        for (i, egress) in sc.spec.egress.iter().enumerate() {
            for (j, host) in egress.hosts.iter().enumerate() {
                let valid = host.split_once('/').is_some_and(|(ns, name)| {
                    (matches!(ns, "*" | "." | "~") || is_dns_label(ns)) && !name.is_empty()
                });
                if !valid {
                    return refuse(
                        &sc.file,
                        resource,
                        &format!("spec.egress[{i}].hosts[{j}]"),
                        format!("\"{host}\" is not `namespace/host` (namespace `*`, `.`, `~` or a name)"),
                    );
                }
            }
        }
        true
    });
}

/// A Kubernetes namespace name: lower-case letters, digits and `-`, at most 63.
fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Istio's patterns are RE2; the proxy compiles them with the same engine as this check.
fn regex_is_invalid(pattern: &str) -> bool {
    regex::Regex::new(pattern).is_err()
}

/// `reviews.default.svc.cluster.local`.
pub fn fqdn(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}.{CLUSTER_DOMAIN}")
}

/// A host as written in a VirtualService or DestinationRule, made fully qualified: `reviews` and
/// `reviews.default` are names in the resource's namespace or the given one.
pub fn resolve_host(host: &str, namespace: &str) -> String {
    let parts: Vec<&str> = host.split('.').collect();
    match parts.len() {
        1 => fqdn(host, namespace),
        2 => fqdn(parts[0], parts[1]),
        _ => host.to_owned(),
    }
}

#[cfg(test)]
mod tests;

/// What of a Telemetry the proxies cannot do, by field; entries that cannot be honoured as written are
/// removed (a filtered log is not turned into an unfiltered one, nor an unknown provider into Envoy's).
fn telemetry_findings(spec: &mut TelemetrySpec) -> Vec<(String, String)> {
    let mut findings = Vec::new();
    if spec.target_ref.is_some() || spec.target_refs.is_some() {
        // Applied without its target it would reach every workload its namespace holds.
        findings.push((
            "spec.targetRefs".into(),
            "targetRef/targetRefs are not supported; this Telemetry is not applied".into(),
        ));
        spec.access_logging.clear();
    }
    if spec.tracing.is_some() {
        findings.push((
            "spec.tracing".into(),
            "tracing is not supported yet; ignored".into(),
        ));
    }
    if spec.metrics.is_some() {
        findings.push((
            "spec.metrics".into(),
            "metric customization is not supported; the standard metrics are reported".into(),
        ));
    }
    let mut kept = Vec::new();
    for (i, mut logging) in std::mem::take(&mut spec.access_logging).into_iter().enumerate() {
        let field = format!("spec.accessLogging[{i}]");
        if logging.filter.is_some() {
            findings.push((
                format!("{field}.filter"),
                "access log filters (CEL) are not supported; this entry logs nothing".into(),
            ));
            continue;
        }
        let before = logging.providers.len();
        logging.providers.retain(|p| p.name == ENVOY_PROVIDER);
        if logging.providers.len() != before {
            findings.push((
                format!("{field}.providers"),
                format!(
                    "only the built-in \"{ENVOY_PROVIDER}\" provider is supported; the others are ignored"
                ),
            ));
            if logging.providers.is_empty() && logging.disabled != Some(true) {
                continue;
            }
        }
        kept.push(logging);
    }
    spec.access_logging = kept;
    findings
}
