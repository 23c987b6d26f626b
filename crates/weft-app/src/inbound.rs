//! Inbound: connections from other workloads to this pod's ports, redirected to 15006, forwarded to
//! the app on the same port.

use std::sync::Arc;

use weft_telemetry::{ConnectionSecurity, Label, Peers, Reporter};
use weft_transport::Accepted;

use crate::app::Inputs;
use crate::forward::{AuthzKey, Routed, serve};

pub(crate) async fn transparent(inputs: Arc<Inputs>, conn: Accepted) {
    let Some(orig_dst) = inputs.original_dst(&conn) else {
        return;
    };
    let mesh = inputs.mesh();
    let Some(policy) = &mesh.inbound else { return };
    let app = policy.app_for(orig_dst);
    // Istio's name for the inbound cluster of a port.
    let peers = destination_peers(&inputs, format!("inbound|{}||", orig_dst.port()).into());
    let routed = Routed {
        stream: conn.stream,
        source: conn.peer,
        authz: Some(AuthzKey::Inbound),
        orig_dst,
        destination: inputs.app(app, policy.idle_timeout, policy.source_for(app)),
        protocol: Some(policy.protocol_for(orig_dst.port())),
        peers,
        inbound: true,
        peer_authentication: policy.peer_authentication,
        http: policy.http,
    };
    serve(inputs, routed, mesh.detect_timeout).await;
}

/// Labels for the server side of a hop; the caller is unknown until mutual TLS names it.
pub(crate) fn destination_peers(inputs: &Inputs, destination_service: Label) -> Peers {
    let node = &inputs.bootstrap.node;
    Peers {
        reporter: Reporter::destination,
        source_workload: Label::unknown(),
        source_workload_namespace: Label::unknown(),
        source_principal: Label::unknown(),
        destination_workload: node.workload.as_str().into(),
        destination_workload_namespace: node.namespace.as_str().into(),
        destination_principal: inputs
            .bootstrap
            .identity
            .as_ref()
            .map_or_else(Label::unknown, |i| Label::from(i.id.as_str())),
        destination_service,
        connection_security_policy: ConnectionSecurity::none,
    }
}
