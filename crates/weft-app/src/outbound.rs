//! Outbound: the app's connections to other services, redirected to 15001, and explicit listeners.

use std::sync::Arc;

use weft_model::{Egress, ExplicitListener, HttpSettings, PeerAuthentication, Target};
use weft_telemetry::{Label, ResponseFlags, TcpLabels};
use weft_transport::Accepted;

use crate::destination::{AuthzKey, Destination, Routed, TargetKey};
use crate::forward::{Stage, serve};
use crate::inputs::Inputs;

/// A connection the app made to some `ip:port`, captured by iptables.
pub(crate) async fn transparent(inputs: Arc<Inputs>, conn: Accepted) -> Option<Stage> {
    let orig_dst = inputs.original_dst(&conn)?;
    let mesh = inputs.mesh();
    let policy = mesh.outbound.as_ref()?;

    let (destination, service, http, access_log, tracing) = match policy.service_for(orig_dst) {
        Some(target) => (
            Destination::Target(target.clone(), TargetKey::Service(orig_dst)),
            service_label(target),
            target.http,
            target.access_log.clone(),
            target.tracing.clone(),
        ),
        None => match policy.egress {
            Egress::AllowAny => (
                inputs.passthrough(orig_dst),
                Label::from(orig_dst.to_string()),
                HttpSettings::default(),
                policy.access_log.clone(),
                Default::default(),
            ),
            Egress::RegistryOnly => {
                let peers = inputs.source_peers(Label::from(orig_dst.to_string()));
                let labels = TcpLabels {
                    peers,
                    response_flags: ResponseFlags::NO_ROUTE,
                };
                inputs.metrics.tcp_closed.get_or_create(&labels).inc();
                tracing::info!(%orig_dst, "refused: no service for this destination and egress is registry_only");
                return None;
            }
        },
    };
    let peers = inputs.source_peers(service);
    let routed = Routed {
        stream: conn.stream,
        source: conn.peer,
        authz: None,
        orig_dst,
        destination,
        protocol: None,
        peers,
        inbound: false,
        peer_authentication: PeerAuthentication::Disable,
        http,
        access_log,
        tracing,
    };
    serve(inputs, routed, mesh.detect_timeout).await
}

/// A connection to a listener bound on a fixed address: it goes to the listener's target.
pub(crate) async fn explicit(
    inputs: Arc<Inputs>,
    listener: ExplicitListener,
    conn: Accepted,
) -> Option<Stage> {
    let detect_timeout = inputs.mesh().detect_timeout;
    // A listener that authenticates peers is a workload's entry point (the server side of a hop).
    let entry = listener.peer_authentication != PeerAuthentication::Disable;
    let service = service_label(&listener.target);
    let peers = if entry {
        inputs.destination_peers(service)
    } else {
        inputs.source_peers(service)
    };
    // An entry point, or a listener with policies, authorizes what arrives.
    let authz =
        (entry || !listener.authorization.is_empty()).then(|| AuthzKey::Listener(listener.name.clone()));
    let routed = Routed {
        stream: conn.stream,
        source: conn.peer,
        authz,
        // The clients dialled the listener's own address; requests without an authority use it.
        orig_dst: conn.local,
        peers,
        http: listener.target.http,
        access_log: listener.target.access_log.clone(),
        tracing: listener.target.tracing.clone(),
        destination: Destination::Target(listener.target, TargetKey::Listener(listener.name)),
        protocol: None,
        inbound: entry,
        peer_authentication: listener.peer_authentication,
    };
    serve(inputs, routed, detect_timeout).await
}

/// `destination_service`: the cluster a service sends everything to, else its route table's name.
fn service_label(target: &Target) -> Label {
    match &target.cluster {
        Some(cluster) if target.route.name == cluster.name => Label::service_of_cluster(&cluster.name),
        _ => target.route.name.as_str().into(),
    }
}
