//! Istio's HTTP metadata exchange: each sidecar tells the other which workload it is, in the
//! `x-envoy-peer-metadata` header (a base64 `google.protobuf.Struct` in Istio's node-metadata keys) and
//! `x-envoy-peer-metadata-id` (its node id), so both sides' metrics name both workloads. The client's
//! sidecar sends it with requests to mesh peers, the server's with responses to them; both remove it
//! before the app sees a request or a response.
//!
//! The exchange only labels metrics. A peer's metadata is believed only when its namespace and service
//! account are those of the SPIFFE identity its certificate proved; anything else (a client without a
//! certificate, an app writing the header, a workload claiming another's name) is removed unread.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderMap, HeaderName, HeaderValue};
use prost::Message as _;
use prost_types::value::Kind;
use prost_types::{Struct, Value};

use crate::{Label, WorkloadLabels};

pub const PEER_METADATA: HeaderName = HeaderName::from_static("x-envoy-peer-metadata");
pub const PEER_METADATA_ID: HeaderName = HeaderName::from_static("x-envoy-peer-metadata-id");

const CANONICAL_NAME: &str = "service.istio.io/canonical-name";
const CANONICAL_REVISION: &str = "service.istio.io/canonical-revision";

/// Decoded peers kept, by header value; past this the cache starts over (a proxy talks to far fewer
/// distinct workloads, so this only bounds what a hostile peer could make it hold).
const CACHE_ENTRIES: usize = 1024;

/// Who this workload is, as the metadata exchange tells it.
#[derive(Debug, Clone, Default)]
pub struct OwnWorkload {
    /// The pod (or instance) name.
    pub name: String,
    pub namespace: String,
    pub workload: String,
    pub service_account: String,
    pub cluster: String,
    pub node_id: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
}

/// The headers this sidecar sends, encoded once.
#[derive(Debug, Clone)]
pub struct OwnMetadata {
    metadata: HeaderValue,
    id: HeaderValue,
}

impl OwnMetadata {
    pub fn new(own: &OwnWorkload) -> Self {
        let mut labels = BTreeMap::new();
        for (key, value) in [
            ("app", &own.app),
            ("version", &own.version),
            (CANONICAL_NAME, &own.canonical_service),
            (CANONICAL_REVISION, &own.canonical_revision),
        ] {
            if !value.is_empty() {
                labels.insert(key.to_owned(), string(value));
            }
        }
        let mut fields = BTreeMap::new();
        for (key, value) in [
            ("NAME", &own.name),
            ("NAMESPACE", &own.namespace),
            ("WORKLOAD_NAME", &own.workload),
            ("SERVICE_ACCOUNT", &own.service_account),
            ("CLUSTER_ID", &own.cluster),
        ] {
            if !value.is_empty() {
                fields.insert(key.to_owned(), string(value));
            }
        }
        fields.insert(
            "OWNER".to_owned(),
            string(&format!(
                "kubernetes://apis/apps/v1/namespaces/{}/deployments/{}",
                own.namespace, own.workload
            )),
        );
        fields.insert(
            "LABELS".to_owned(),
            Value {
                kind: Some(Kind::StructValue(Struct { fields: labels })),
            },
        );
        let encoded = STANDARD.encode(Struct { fields }.encode_to_vec());
        Self {
            // Base64 and a node id made of names are visible ASCII; anything else is left out.
            metadata: HeaderValue::try_from(encoded).unwrap_or_else(|_| HeaderValue::from_static("")),
            id: HeaderValue::try_from(own.node_id.as_str()).unwrap_or_else(|_| HeaderValue::from_static("")),
        }
    }

    /// Replaces whatever metadata `headers` carry with this sidecar's.
    pub fn insert(&self, headers: &mut HeaderMap) {
        headers.insert(PEER_METADATA, self.metadata.clone());
        headers.insert(PEER_METADATA_ID, self.id.clone());
    }
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

/// Removes the exchange's headers; returns the metadata value if there was one.
pub fn take(headers: &mut HeaderMap) -> Option<HeaderValue> {
    headers.remove(PEER_METADATA_ID);
    headers.remove(PEER_METADATA)
}

/// Why a peer's metadata was not believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerMetadataError {
    #[error("not base64")]
    Base64,
    #[error("not a google.protobuf.Struct")]
    Struct,
    #[error("no {0}")]
    Missing(&'static str),
    #[error(
        "namespace {namespace:?} and service account {service_account:?} are not the peer's proven identity"
    )]
    NotTheIdentity {
        namespace: String,
        service_account: String,
    },
}

/// A peer's workload as its metadata says, with the namespace and service account it claims.
#[derive(Debug, Clone)]
struct Claimed {
    labels: WorkloadLabels,
    service_account: String,
}

/// Decodes peers' metadata, remembering what it decoded.
#[derive(Debug, Default)]
pub struct PeerMetadataDecoder {
    decoded: Mutex<HashMap<HeaderValue, Arc<Claimed>>>,
}

impl PeerMetadataDecoder {
    /// The peer's workload labels if `proven` accepts the namespace and service account its metadata
    /// names, answering with the principal they stand for (the SPIFFE ID the peer's certificate proved).
    pub fn verified(
        &self,
        value: &HeaderValue,
        proven: impl FnOnce(&str, &str) -> Option<Label>,
    ) -> Result<WorkloadLabels, PeerMetadataError> {
        let claimed = self.decode(value)?;
        let namespace: &str = claimed.labels.namespace.as_str();
        let Some(principal) = proven(namespace, &claimed.service_account) else {
            return Err(PeerMetadataError::NotTheIdentity {
                namespace: namespace.to_owned(),
                service_account: claimed.service_account.clone(),
            });
        };
        let mut labels = claimed.labels.clone();
        labels.principal = principal;
        Ok(labels)
    }

    fn decode(&self, value: &HeaderValue) -> Result<Arc<Claimed>, PeerMetadataError> {
        if let Some(claimed) = self.decoded.lock().ok().and_then(|d| d.get(value).cloned()) {
            return Ok(claimed);
        }
        let claimed = Arc::new(decode(value.as_bytes())?);
        if let Ok(mut decoded) = self.decoded.lock() {
            if decoded.len() >= CACHE_ENTRIES {
                decoded.clear();
            }
            decoded.insert(value.clone(), claimed.clone());
        }
        Ok(claimed)
    }
}

fn decode(value: &[u8]) -> Result<Claimed, PeerMetadataError> {
    let bytes = STANDARD.decode(value).map_err(|_| PeerMetadataError::Base64)?;
    let metadata = Struct::decode(bytes.as_slice()).map_err(|_| PeerMetadataError::Struct)?;
    let field = |s: &Struct, key: &str| match s.fields.get(key).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(v)) if !v.is_empty() => Some(v.clone()),
        _ => None,
    };
    let namespace = field(&metadata, "NAMESPACE").ok_or(PeerMetadataError::Missing("NAMESPACE"))?;
    let service_account =
        field(&metadata, "SERVICE_ACCOUNT").ok_or(PeerMetadataError::Missing("SERVICE_ACCOUNT"))?;
    let workload = field(&metadata, "WORKLOAD_NAME")
        .or_else(|| field(&metadata, "NAME"))
        .ok_or(PeerMetadataError::Missing("WORKLOAD_NAME"))?;
    let labels = match metadata.fields.get("LABELS").and_then(|v| v.kind.as_ref()) {
        Some(Kind::StructValue(labels)) => labels.clone(),
        _ => Struct::default(),
    };
    let app = field(&labels, "app");
    let version = field(&labels, "version");
    // Istio's rules: the canonical service is the label, else the app, else the workload; the
    // revision the label, else the version, else `latest`.
    let canonical_service = field(&labels, CANONICAL_NAME)
        .or_else(|| app.clone())
        .unwrap_or_else(|| workload.clone());
    let canonical_revision = field(&labels, CANONICAL_REVISION)
        .or_else(|| version.clone())
        .unwrap_or_else(|| "latest".to_owned());
    let label = |v: Option<String>| v.map_or_else(Label::unknown, Label::from);
    Ok(Claimed {
        labels: WorkloadLabels {
            workload: Label::from(workload),
            namespace: Label::from(namespace),
            principal: Label::unknown(),
            app: label(app),
            version: label(version),
            canonical_service: Label::from(canonical_service),
            canonical_revision: Label::from(canonical_revision),
            cluster: label(field(&metadata, "CLUSTER_ID")),
        },
        service_account,
    })
}

/// Whether `identity` is `spiffe://<trust domain>/ns/<namespace>/sa/<service_account>`.
pub fn is_identity_of(identity: &str, namespace: &str, service_account: &str) -> bool {
    let Some(rest) = identity.strip_prefix("spiffe://") else {
        return false;
    };
    let Some((_, path)) = rest.split_once('/') else {
        return false;
    };
    let mut parts = path.split('/');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()),
        (Some("ns"), Some(ns), Some("sa"), Some(sa), None) if ns == namespace && sa == service_account
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> OwnWorkload {
        OwnWorkload {
            name: "web-7d9f-abcde".into(),
            namespace: "shop".into(),
            workload: "web".into(),
            service_account: "web-sa".into(),
            cluster: "Kubernetes".into(),
            node_id: "sidecar~10.0.0.7~web-7d9f-abcde.shop~shop.svc.cluster.local".into(),
            app: "web".into(),
            version: "v2".into(),
            canonical_service: String::new(),
            canonical_revision: String::new(),
        }
    }

    fn proven_as(identity: &str) -> impl FnOnce(&str, &str) -> Option<Label> + '_ {
        move |ns, sa| is_identity_of(identity, ns, sa).then(|| Label::from(identity))
    }

    fn sent(own: &OwnWorkload) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(PEER_METADATA, HeaderValue::from_static("forged"));
        OwnMetadata::new(own).insert(&mut headers);
        headers
    }

    #[test]
    fn what_one_side_sends_the_other_reads_back() {
        let mut headers = sent(&own());
        assert_eq!(
            headers[PEER_METADATA_ID],
            "sidecar~10.0.0.7~web-7d9f-abcde.shop~shop.svc.cluster.local"
        );
        let value = take(&mut headers).expect("metadata sent");
        assert!(headers.is_empty(), "both headers removed");
        let decoder = PeerMetadataDecoder::default();
        let peer = decoder
            .verified(&value, proven_as("spiffe://cluster.local/ns/shop/sa/web-sa"))
            .expect("matches the identity");
        assert_eq!(peer.workload.as_str(), "web");
        assert_eq!(peer.namespace.as_str(), "shop");
        assert_eq!(peer.app.as_str(), "web");
        assert_eq!(peer.version.as_str(), "v2");
        // Istio's fallbacks: app for the canonical service, version for the revision.
        assert_eq!(peer.canonical_service.as_str(), "web");
        assert_eq!(peer.canonical_revision.as_str(), "v2");
        assert_eq!(peer.cluster.as_str(), "Kubernetes");
        assert_eq!(
            peer.principal.as_str(),
            "spiffe://cluster.local/ns/shop/sa/web-sa"
        );
        // Read again from the cache, same answer.
        let again = decoder
            .verified(&value, proven_as("spiffe://cluster.local/ns/shop/sa/web-sa"))
            .expect("cached");
        assert_eq!(again, peer);
    }

    #[test]
    fn metadata_that_is_not_the_certificates_identity_is_not_believed() {
        let value = sent(&own())[PEER_METADATA].clone();
        let decoder = PeerMetadataDecoder::default();
        for identity in [
            "spiffe://cluster.local/ns/shop/sa/other",
            "spiffe://cluster.local/ns/other/sa/web-sa",
            "spiffe://cluster.local/ns/shop/sa/web-sa/extra",
            "shop/web-sa",
        ] {
            assert!(
                matches!(
                    decoder.verified(&value, proven_as(identity)),
                    Err(PeerMetadataError::NotTheIdentity { .. })
                ),
                "{identity}"
            );
        }
    }

    #[test]
    fn malformed_metadata_is_named() {
        let decoder = PeerMetadataDecoder::default();
        let id = "spiffe://td/ns/a/sa/b";
        assert_eq!(
            decoder.verified(&HeaderValue::from_static("%%%"), proven_as(id)),
            Err(PeerMetadataError::Base64)
        );
        assert_eq!(
            decoder.verified(&HeaderValue::from_static("/////w=="), proven_as(id)),
            Err(PeerMetadataError::Struct)
        );
        let no_account = OwnWorkload {
            service_account: String::new(),
            ..own()
        };
        assert_eq!(
            decoder.verified(&sent(&no_account)[PEER_METADATA], proven_as(id)),
            Err(PeerMetadataError::Missing("SERVICE_ACCOUNT"))
        );
    }

    #[test]
    fn canonical_labels_win_over_app_and_version() {
        let labelled = OwnWorkload {
            canonical_service: "storefront".into(),
            canonical_revision: "2024-06".into(),
            ..own()
        };
        let peer = PeerMetadataDecoder::default()
            .verified(
                &sent(&labelled)[PEER_METADATA],
                proven_as("spiffe://td/ns/shop/sa/web-sa"),
            )
            .expect("verified");
        assert_eq!(peer.canonical_service.as_str(), "storefront");
        assert_eq!(peer.canonical_revision.as_str(), "2024-06");
    }
}
