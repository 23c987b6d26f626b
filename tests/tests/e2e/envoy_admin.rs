//! The rest of Envoy's admin API as Envoy's tools read it: `/certs`, `/clusters?format=json` and
//! `/listeners?format=json` decoded into Envoy's admin protos, `/stats` under Envoy's names, and
//! `/drain_listeners`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::SystemTime;

use envoy_types::pb::envoy::admin::v3::{Certificates, Clusters, Listeners, subject_alternate_name};
use envoy_types::pb::envoy::config::core::v3::{HealthStatus, address, socket_address};
use weft_test_support::{admin_get, admin_post, assert_eventually};

use crate::mtls::{get, plain_client};

/// `/stats` as a map of name to value.
async fn stats(admin: SocketAddr, query: &str) -> HashMap<String, u64> {
    let (status, body) = admin_get(admin, &format!("/stats{query}")).await;
    assert_eq!(status, 200, "{body}");
    body.lines()
        .map(|line| {
            let (name, value) = line
                .split_once(": ")
                .unwrap_or_else(|| panic!("not `name: value`: {line}"));
            (
                name.to_owned(),
                value.parse().unwrap_or_else(|_| panic!("{line}")),
            )
        })
        .collect()
}

async fn decoded<M: prost::Name + Default>(admin: SocketAddr, path: &str) -> M {
    let (status, body) = admin_get(admin, path).await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    weft_xds::dump::decode_admin::<M>(&json).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

fn port_of(address: &Option<envoy_types::pb::envoy::config::core::v3::Address>) -> (String, u32) {
    match address.as_ref().and_then(|a| a.address.clone()) {
        Some(address::Address::SocketAddress(s)) => match s.port_specifier {
            Some(socket_address::PortSpecifier::PortValue(port)) => (s.address, port),
            other => panic!("no port: {other:?}"),
        },
        other => panic!("not a socket address: {other:?}"),
    }
}

/// A sidecar configured and certified by weft control over TLS: its certificates, clusters, stats
/// and listeners as Envoy shows them, and its listeners drained through admin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoys_admin_views_and_drain_listeners() {
    let sidecar = crate::config_dump::OrderSidecar::start().await;
    let (proxy, app, v1) = (&sidecar.proxy, &sidecar.app, &sidecar.v1);
    let admin = proxy.admin();
    let front = proxy.listener("front");
    let client = plain_client(false);
    for _ in 0..7 {
        assert_eq!(get(&client, front).await, 200);
    }

    // /certs: the workload chain with its SPIFFE ID and the CA's root, as Envoy's Certificates.
    let certs: Certificates = decoded(admin, "/certs").await;
    let [certificate] = certs.certificates.as_slice() else {
        panic!("one certificate set: {certs:?}")
    };
    let leaf = &certificate.cert_chain[0];
    let sans: Vec<_> = leaf
        .subject_alt_names
        .iter()
        .filter_map(|s| match &s.name {
            Some(subject_alternate_name::Name::Uri(uri)) => Some(uri.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(sans, ["spiffe://cluster.local/ns/default/sa/client"]);
    let identity: serde_json::Value = serde_json::from_str(&admin_get(admin, "/identity").await.1).unwrap();
    assert_eq!(
        leaf.serial_number,
        identity["serial"].as_str().unwrap().replace(':', ""),
        "the serial of the certificate in use"
    );
    let expires = leaf.expiration_time.unwrap().seconds;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        leaf.valid_from.unwrap().seconds <= now && expires > now,
        "{leaf:?}"
    );
    // Whole days left, counted from a clock read a fraction of a second apart from ours.
    let days = |seconds: i64| seconds as u64 / 86_400;
    assert!(
        (days(expires - now - 1)..=days(expires - now)).contains(&leaf.days_until_expiration),
        "{leaf:?}"
    );
    assert_eq!(certificate.ca_cert.len(), 1, "the CA's root: {certificate:?}");
    assert!(certificate.ca_cert[0].expiration_time.unwrap().seconds >= expires);

    // /clusters?format=json: the file's cluster with its endpoint's counts, the control plane's
    // clusters added via the API, the breakers in force.
    let clusters: Clusters = decoded(admin, "/clusters?format=json").await;
    let by_name: HashMap<&str, _> = clusters
        .cluster_statuses
        .iter()
        .map(|c| (c.name.as_str(), c))
        .collect();
    let app_cluster = by_name["app"];
    assert!(!app_cluster.added_via_api);
    let [host] = app_cluster.host_statuses.as_slice() else {
        panic!("{app_cluster:?}")
    };
    assert_eq!(
        port_of(&host.address),
        (app.addr.ip().to_string(), u32::from(app.addr.port()))
    );
    let stat = |name: &str| host.stats.iter().find(|s| s.name == name).map(|s| s.value);
    assert_eq!(
        (stat("rq_total"), stat("rq_success"), stat("rq_error")),
        (Some(7), Some(7), Some(0))
    );
    let health = host.health_status.unwrap();
    assert_eq!(health.eds_health_status, HealthStatus::Healthy as i32);
    assert!(!health.failed_outlier_check);
    let thresholds = &app_cluster.circuit_breakers.as_ref().unwrap().thresholds[0];
    assert_eq!(thresholds.max_requests.unwrap().value, 1024, "Envoy's default");
    let v1_cluster = by_name["outbound|8080|v1|order-svc.default.svc.cluster.local"];
    assert!(v1_cluster.added_via_api);
    assert_eq!(
        port_of(&v1_cluster.host_statuses[0].address).1,
        u32::from(v1.addr.port())
    );

    // /stats under Envoy's names.
    let all = stats(admin, "").await;
    for (name, value) in [
        ("cluster.app.upstream_rq_total", 7),
        ("cluster.app.upstream_rq_2xx", 7),
        ("cluster.app.upstream_rq_5xx", 0),
        ("cluster.app.upstream_rq_retry", 0),
        ("cluster.app.membership_total", 1),
        ("cluster.app.membership_healthy", 1),
        ("cluster.app.outlier_detection.ejections_active", 0),
        ("server.state", 0),
        ("server.live", 1),
        ("control_plane.connected_state", 1),
        ("listener_manager.workers_started", 1),
        ("listener_manager.total_listeners_active", 3),
    ] {
        assert_eq!(all.get(name), Some(&value), "{name} in {all:?}");
    }
    assert!(all["cluster_manager.cds.update_success"] >= 1, "{all:?}");
    assert_eq!(all["cluster_manager.cds.update_rejected"], 0);
    assert!(all["cluster_manager.active_clusters"] >= 3, "app, v1, v2");
    assert!(all.contains_key("server.uptime"));
    assert_eq!(
        all["server.days_until_first_cert_expiring"],
        leaf.days_until_expiration
    );
    let (_, text) = admin_get(admin, "/stats").await;
    let names: Vec<&str> = text.lines().map(|l| l.split(": ").next().unwrap()).collect();
    assert!(names.is_sorted(), "sorted by name, as Envoy prints them");

    let filtered = stats(admin, "?filter=%5Ecluster%5C.app%5C.upstream_rq_%5B0-9%5Dxx%24").await;
    let mut keys: Vec<_> = filtered.keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        (1..=5)
            .map(|c| format!("cluster.app.upstream_rq_{c}xx"))
            .collect::<Vec<_>>()
    );
    let used = stats(admin, "?usedonly").await;
    assert!(used.values().all(|v| *v != 0), "{used:?}");
    assert_eq!(used.get("cluster.app.upstream_rq_2xx"), Some(&7));
    assert!(!used.contains_key("cluster.app.upstream_rq_5xx"));

    let (status, body) = admin_get(admin, "/stats?format=json&filter=upstream_rq_total").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let entries = json["stats"].as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|s| s["name"] == "cluster.app.upstream_rq_total" && s["value"] == 7),
        "{body}"
    );
    assert!(
        entries
            .iter()
            .all(|s| s["name"].as_str().unwrap().contains("upstream_rq_total"))
    );
    let (status, prometheus) = admin_get(admin, "/stats?format=prometheus").await;
    assert_eq!(status, 200);
    assert!(prometheus.contains("istio_requests_total"), "{prometheus}");
    for bad in ["?filter=%28", "?format=xml", "?histogram_buckets=cumulative"] {
        let (status, body) = admin_get(admin, &format!("/stats{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }

    // /listeners: the transparent outbound and inbound listeners and the file's.
    let (_, text) = admin_get(admin, "/listeners").await;
    let expected = format!(
        "outbound::{}\ninbound::{}\nfront::{front}\n",
        proxy.outbound(),
        proxy.inbound()
    );
    assert_eq!(text, expected);
    let listeners: Listeners = decoded(admin, "/listeners?format=json").await;
    let ports: Vec<(&str, u32)> = listeners
        .listener_statuses
        .iter()
        .map(|l| (l.name.as_str(), port_of(&l.local_address).1))
        .collect();
    assert_eq!(
        ports,
        [
            ("outbound", u32::from(proxy.outbound().port())),
            ("inbound", u32::from(proxy.inbound().port())),
            ("front", u32::from(front.port()))
        ]
    );

    // Draining the inbound listener only leaves the others accepting; a full drain closes them while
    // open connections are still served, and the proxy stays LIVE unless the drain is graceful.
    assert_eq!(admin_post(admin, "/drain_listeners?inboundonly").await.0, 200);
    assert_eventually!(
        tokio::net::TcpStream::connect(proxy.inbound()).await.is_err(),
        "the inbound listener still accepts"
    );
    assert_eq!(
        admin_get(admin, "/listeners").await.1,
        format!("outbound::{}\nfront::{front}\n", proxy.outbound())
    );
    assert_eq!(get(&client, front).await, 200);
    let open = tokio::net::TcpStream::connect(front).await.unwrap();
    assert_eq!(admin_get(admin, "/drain_listeners").await.0, 405, "POST only");
    assert_eq!(admin_post(admin, "/drain_listeners?bogus").await.0, 400);
    assert_eq!(admin_post(admin, "/drain_listeners").await.0, 200);
    assert_eventually!(
        tokio::net::TcpStream::connect(front).await.is_err(),
        "the front listener still accepts"
    );
    assert_eq!(admin_get(admin, "/listeners").await.1, "");
    assert_eq!(
        stats(admin, "").await["listener_manager.total_listeners_active"],
        0
    );
    assert_eq!(
        admin_get(admin, "/ready").await.0,
        200,
        "not graceful: still ready"
    );
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut open = open;
        open.write_all(b"GET /reviews HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        open.read_to_string(&mut response).await.unwrap();
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "an open connection is served: {response}"
        );
    }
    assert_eq!(admin_post(admin, "/drain_listeners?graceful").await.0, 200);
    let (status, reason) = admin_get(admin, "/ready").await;
    assert_eq!((status, reason.as_str()), (503, "not ready: draining\n"));
    assert_eq!(stats(admin, "").await["server.state"], 1, "DRAINING");
}
