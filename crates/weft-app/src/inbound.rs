//! Inbound: connections from other workloads to this pod's ports, redirected to 15006, forwarded to
//! the app on the same port.

use std::sync::Arc;

use weft_transport::Accepted;

use crate::destination::{AuthzKey, Routed};
use crate::forward::{Stage, serve};
use crate::inputs::Inputs;

pub(crate) async fn transparent(inputs: Arc<Inputs>, conn: Accepted) -> Option<Stage> {
    let orig_dst = inputs.original_dst(&conn)?;
    let mesh = inputs.mesh();
    let policy = mesh.inbound.as_ref()?;
    let app = policy.app_for(orig_dst);
    // Istio's name for the inbound cluster of a port.
    let peers = inputs.destination_peers(format!("inbound|{}||", orig_dst.port()).into());
    let routed = Routed {
        stream: conn.stream,
        source: conn.peer,
        authz: Some(AuthzKey::Inbound),
        orig_dst,
        destination: inputs.app(app, policy.idle_timeout, policy.source_for(app)),
        protocol: Some(policy.protocol_for(orig_dst.port())),
        peers,
        inbound: true,
        peer_authentication: policy.peer_authentication_for(orig_dst.port()),
        http: policy.http,
        access_log: policy.access_log.clone(),
        tracing: policy.tracing.clone(),
    };
    serve(inputs, routed, mesh.detect_timeout).await
}
