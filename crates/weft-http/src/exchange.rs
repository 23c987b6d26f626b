//! Istio's metadata exchange on the request path: which headers each side of a hop adds, removes and
//! believes (see `weft_telemetry::peer_metadata` for the format and the trust rule).

use std::sync::Arc;

use http::HeaderMap;
use http::uri::Authority;
use weft_model::UpstreamTls;
use weft_telemetry::peer_metadata::{self, OwnMetadata, OwnWorkload, PeerMetadataDecoder, is_identity_of};
use weft_telemetry::{Label, Peers, WorkloadLabels};

#[derive(Debug)]
pub(crate) struct PeerExchange {
    own: OwnMetadata,
    decoder: PeerMetadataDecoder,
    /// This workload's namespace, which a short service name is resolved in.
    namespace: String,
}

impl PeerExchange {
    pub(crate) fn new(own: &OwnWorkload) -> Self {
        Self {
            own: OwnMetadata::new(own),
            decoder: PeerMetadataDecoder::default(),
            namespace: own.namespace.clone(),
        }
    }

    /// Server side: the service a request was addressed to, as Istio's `destination_service` names it,
    /// from the authority the caller used (`reviews`, `reviews.shop`, `reviews.shop.svc` resolved as a
    /// pod in this namespace resolves them, `*.svc.cluster.local`); an IP address or another host as it
    /// was written.
    pub(crate) fn called_service(&self, authority: &Authority) -> Label {
        let host = authority.host();
        if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
            return Label::from(host);
        }
        let host = host.to_ascii_lowercase();
        let dots = host.matches('.').count();
        Label::from(match dots {
            0 => format!("{host}.{}.svc.cluster.local", self.namespace),
            1 => format!("{host}.svc.cluster.local"),
            _ if host.ends_with(".svc") => format!("{host}.cluster.local"),
            _ => host,
        })
    }

    /// Server side, a request arriving: the caller's workload, when its metadata is that of the
    /// identity its certificate proved (`peers.source_principal`). The headers never reach the app.
    pub(crate) fn caller(&self, headers: &mut HeaderMap, proven: Option<&Arc<str>>, peers: &mut Peers) {
        let (Some(value), Some(identity)) = (peer_metadata::take(headers), proven) else {
            return;
        };
        let principal = &peers.source_principal;
        match self.decoder.verified(&value, |ns, sa| {
            is_identity_of(identity, ns, sa).then(|| principal.clone())
        }) {
            Ok(source) => peers.set_source(&source),
            Err(err) => tracing::debug!(%identity, error = %err, "peer metadata not believed"),
        }
    }

    /// Client side, a request leaving: this sidecar's metadata to a mesh peer, none (and none of the
    /// app's) to anything else.
    pub(crate) fn announce(&self, headers: &mut HeaderMap, to: Option<&UpstreamTls>) {
        match to {
            Some(_) => self.own.insert(headers),
            None => {
                peer_metadata::take(headers);
            }
        }
    }

    /// Client side, a response arriving: the called workload, from its metadata when the identity it
    /// names is one the cluster's certificate check accepts, else from discovery's endpoint metadata.
    pub(crate) fn callee(
        &self,
        headers: &mut HeaderMap,
        tls: Option<&UpstreamTls>,
        endpoint: Option<&Arc<WorkloadLabels>>,
        peers: &mut Peers,
    ) {
        let told = match (peer_metadata::take(headers), tls) {
            (Some(value), Some(tls)) => self
                .decoder
                .verified(&value, |ns, sa| {
                    tls.identities
                        .iter()
                        .find(|id| id.namespace == ns && id.service_account == sa)
                        .map(|id| Label::from(id.to_string()))
                })
                .map_err(|err| tracing::debug!(error = %err, "peer metadata not believed"))
                .ok(),
            _ => None,
        };
        match (told, endpoint) {
            (Some(destination), _) => peers.set_destination(&destination),
            (None, Some(destination)) => peers.set_destination(destination),
            (None, None) => {}
        }
    }

    /// Server side, a response leaving: this sidecar's metadata to a caller that proved a mesh
    /// identity; never the app's own.
    pub(crate) fn answer(&self, headers: &mut HeaderMap, to_peer: bool) {
        peer_metadata::take(headers);
        if to_peer {
            self.own.insert(headers);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_called_service_is_the_host_a_pod_here_would_resolve() {
        let exchange = PeerExchange::new(&OwnWorkload {
            namespace: "shop".into(),
            ..Default::default()
        });
        let called = |authority: &str| {
            exchange
                .called_service(&authority.parse().expect("an authority"))
                .as_str()
                .to_owned()
        };
        assert_eq!(called("reviews:9080"), "reviews.shop.svc.cluster.local");
        assert_eq!(called("Reviews.Other"), "reviews.other.svc.cluster.local");
        assert_eq!(called("reviews.other.svc:80"), "reviews.other.svc.cluster.local");
        assert_eq!(
            called("reviews.other.svc.cluster.local"),
            "reviews.other.svc.cluster.local"
        );
        assert_eq!(called("api.example.com"), "api.example.com");
        assert_eq!(called("10.0.0.7:8080"), "10.0.0.7");
        assert_eq!(called("[::1]:8080"), "[::1]");
    }
}
