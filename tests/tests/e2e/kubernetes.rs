//! `weft control` in a Kubernetes cluster, against an API server fixture that speaks the real
//! protocol to `kube`'s client: the CA takes projected service-account tokens and has the API server
//! review them (TokenReview), binding the identity to the token's service account; a proxy reads its
//! token file for every certificate request, so a token the kubelet rotated is the one sent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use weft_control::ControlPlane;
use weft_control::authn::{Authenticator, TokenReviewer};
use weft_control::ca::CertificateAuthority;
use weft_identity::{BearerToken, CaClient, CaError, SpiffeId, csr};
use weft_test_support::kube_api::ApiServer;
use weft_test_support::{TestProxy, admin_get, assert_eventually, metric};

async fn kube_client(kubeconfig: &str) -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(kubeconfig).unwrap();
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// A control plane in Kubernetes mode reviewing tokens with `api` (as the client `kubeconfig` says),
/// serving the CA over TLS. Returns it, its CA and the TLS address.
async fn control_plane(kubeconfig: &str) -> (ControlPlane, Arc<CertificateAuthority>, String) {
    let ca = Arc::new(CertificateAuthority::ephemeral("cluster.local").unwrap());
    let reviewer = TokenReviewer::new(kube_client(kubeconfig).await, "cluster.local");
    let dir = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start_with(
        weft_control::Source::Directory(dir.keep()),
        "127.0.0.1:0".parse().unwrap(),
        ca.clone(),
        Authenticator::Kubernetes(reviewer),
    )
    .await
    .unwrap();
    let tls = cp.serve_tls("127.0.0.1:0".parse().unwrap()).await.unwrap();
    (cp, ca, format!("https://{tls}"))
}

/// weft control in Kubernetes mode: the mesh discovered from the API server `kubeconfig` names, and
/// tokens reviewed by it. Returns once every kind has been listed.
async fn discovering(kubeconfig: String, ca: Arc<CertificateAuthority>) -> std::io::Result<ControlPlane> {
    let client = kube_client(&kubeconfig).await;
    ControlPlane::start_with(
        weft_control::Source::Kubernetes(client.clone()),
        "127.0.0.1:0".parse().unwrap(),
        ca,
        Authenticator::Kubernetes(TokenReviewer::new(client, "cluster.local")),
    )
    .await
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).unwrap()
}

async fn refusal(client: &CaClient, csr: &str) -> tonic::Status {
    match client.certify(csr, Duration::from_secs(600)).await {
        Err(CaError::Refused(status)) => status,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn the_ca_signs_for_the_service_account_the_api_server_says_the_token_belongs_to() {
    weft_test_support::init_tracing();
    let api = ApiServer::start().await;
    let (cp, ca, url) = control_plane(&api.kubeconfig()).await;
    let client = |token: &str| {
        CaClient::with_root(&url, BearerToken::Inline(token.to_owned()), Some(ca.root_pem())).unwrap()
    };
    let reviews = api.service_account_token("shop", "reviews", &["istio-ca"]);
    let (_, mine) = csr::new_csr(&id("shop", "reviews")).unwrap();
    let chain = client(&reviews)
        .certify(&mine, Duration::from_secs(600))
        .await
        .unwrap();
    let leaf = weft_identity::Credentials::new(id("shop", "reviews"), chain, String::new()).unwrap();
    assert_eq!(leaf.id.to_string(), "spiffe://cluster.local/ns/shop/sa/reviews");
    assert_eq!(api.reviews_of(&reviews), 1, "the CA asked the API server");

    // The token is reviews'; a CSR for payments (or for reviews in another namespace) is refused.
    for other in [id("shop", "payments"), id("default", "reviews")] {
        let (_, theirs) = csr::new_csr(&other).unwrap();
        let status = refusal(&client(&reviews), &theirs).await;
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(
            status.message().contains(&format!(
                "asks for {other} but the caller proves spiffe://cluster.local/ns/shop/sa/reviews"
            )),
            "{}",
            status.message()
        );
    }

    // Tokens the API server does not vouch for, for this audience: refused, saying why.
    let legacy = api.service_account_token("shop", "reviews", &[]);
    let expired = api.service_account_token("shop", "reviews", &["istio-ca"]);
    api.expire(&expired);
    let weft_token = ca
        .tokens()
        .issue("shop", "reviews", Duration::from_secs(300))
        .unwrap();
    for (token, expect) in [
        (legacy.as_str(), "token audiences is invalid"),
        (expired.as_str(), "service account token has expired"),
        ("made-up", "invalid bearer token"),
        (weft_token.as_str(), "accepts only service-account tokens"),
    ] {
        let status = refusal(&client(token), &mine).await;
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{token}");
        assert!(status.message().contains(expect), "{token}: {}", status.message());
    }
    assert_eq!(
        api.reviews_of(&weft_token),
        0,
        "a weft token is not sent to the API server"
    );

    // Service-account tokens travel over TLS only: the plaintext port has no CA.
    let plaintext = CaClient::new(
        &format!("http://{}", cp.address()),
        BearerToken::Inline(reviews.clone()),
    )
    .unwrap();
    assert_eq!(
        refusal(&plaintext, &mine).await.code(),
        tonic::Code::Unimplemented
    );
    assert_eq!(
        api.reviews_of(&reviews),
        3,
        "two refused CSRs were reviewed too, nothing more"
    );
    cp.stop().await;
}

#[tokio::test]
async fn when_the_api_server_refuses_the_control_plane_callers_are_told_to_retry() {
    let api = ApiServer::start().await;
    // The control plane's own credential is wrong: the API server answers 401.
    let kubeconfig = api.kubeconfig().replace("token: ", "token: not-");
    let (cp, ca, url) = control_plane(&kubeconfig).await;
    let token = api.service_account_token("shop", "reviews", &["istio-ca"]);
    let client = CaClient::with_root(&url, BearerToken::Inline(token), Some(ca.root_pem())).unwrap();
    let (_, mine) = csr::new_csr(&id("shop", "reviews")).unwrap();
    let status = refusal(&client, &mine).await;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{}", status.message());
    assert!(
        status
            .message()
            .contains("cannot review the token with the API server")
            && status.message().contains("Unauthorized"),
        "{}",
        status.message()
    );
    assert_eq!(api.counts().unauthorized, 1);
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_sends_the_token_the_kubelet_rotated_into_its_file() {
    weft_test_support::init_tracing();
    let api = ApiServer::start().await;
    let (cp, ca, url) = control_plane(&api.kubeconfig()).await;
    let dir = tempfile::tempdir().unwrap();
    let (token_file, root_file) = (dir.path().join("istio-token"), dir.path().join("root.pem"));
    std::fs::write(&root_file, ca.root_pem()).unwrap();
    let first = api.service_account_token("shop", "reviews", &["istio-ca"]);
    std::fs::write(&token_file, format!("{first}\n")).unwrap();
    // 2 s certificates: a renewal about every second.
    let proxy = TestProxy::start(&format!(
        "access_log: {{ path: off }}\n\
         node: {{ workload: reviews-v1, namespace: shop, service_account: reviews }}\n\
         identity: {{ ca_address: \"{url}\", ca_root_file: \"{}\", token_file: \"{}\", validity: 2s }}\n",
        root_file.display(),
        token_file.display()
    ))
    .await;
    assert_eventually!(
        admin_get(proxy.admin(), "/ready").await.0 == 200,
        "no certificate"
    );
    let identity: serde_json::Value =
        serde_json::from_str(&admin_get(proxy.admin(), "/identity").await.1).unwrap();
    assert_eq!(
        identity["identity"], "spiffe://cluster.local/ns/shop/sa/reviews",
        "{identity}"
    );

    // The kubelet writes a new token in place of the old one well before the old one expires (at 80 %
    // of its life); the next renewal sends the new one. Then the old one expires.
    let second = api.service_account_token("shop", "reviews", &["istio-ca"]);
    let tmp = dir.path().join(".istio-token.new");
    std::fs::write(&tmp, &second).unwrap();
    std::fs::rename(&tmp, &token_file).unwrap();
    assert_eventually!(api.reviews_of(&second) >= 1, "the rotated token was never sent");
    api.expire(&first);
    let reviews_of_first = api.reviews_of(&first);
    let renewals = |text: &str| metric(text, "weft_certificate_renewals_total", &[]);
    let before = renewals(&proxy.metrics().await);
    assert_eventually!(
        renewals(&proxy.metrics().await) >= before + 2.0,
        "no renewals after the old token expired"
    );
    assert_eq!(
        api.reviews_of(&first),
        reviews_of_first,
        "the old token is not sent again"
    );
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric(&metrics, "weft_certificate_renewal_failures_total", &[]),
        0.0,
        "no renewal failed: every request carried a token the API server accepts"
    );
    proxy.stop().await;
    cp.stop().await;
}

fn pod(name: &str, ip: &str, terminating: bool) -> serde_json::Value {
    let mut pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "shop", "labels": { "app": "reviews", "version": "v1" } },
        "spec": { "serviceAccountName": "reviews", "containers": [{ "name": "app", "ports": [{ "name": "http", "containerPort": 9080 }] }] },
        "status": { "phase": "Running", "podIP": ip, "conditions": [{ "type": "Ready", "status": "True" }] },
    });
    if terminating {
        pod["metadata"]["deletionTimestamp"] = serde_json::json!("2026-12-04T05:00:00Z");
    }
    pod
}

fn slice(pods: &[&str]) -> serde_json::Value {
    let endpoints: Vec<_> = pods
        .iter()
        .map(|p| serde_json::json!({ "addresses": ["10.0.0.1"], "conditions": { "ready": true }, "targetRef": { "kind": "Pod", "name": p, "namespace": "shop" } }))
        .collect();
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": "reviews-abc", "namespace": "shop", "labels": { "kubernetes.io/service-name": "reviews" } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 9080, "protocol": "TCP" }],
        "endpoints": endpoints,
    })
}

/// The mesh comes from the API server's list and watch: the first catalog holds everything listed;
/// a terminating pod leaves at once; a watch that dies resumes, and one from a compacted version
/// lists again.
#[tokio::test]
async fn the_control_plane_follows_the_mesh_in_the_api_server() {
    weft_test_support::init_tracing();
    let api = ApiServer::start().await;
    api.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: reviews\n  namespace: shop\n  resourceVersion: \"1\"\nspec:\n  clusterIP: 10.96.0.10\n  type: ClusterIP\n  selector:\n    app: reviews\n  ports:\n  - name: http\n    port: 9080\n    protocol: TCP\n    targetPort: 9080\n",
    );
    api.apply(&pod("reviews-1", "10.1.0.1", false));
    api.apply(&slice(&["reviews-1"]));
    let ca = Arc::new(CertificateAuthority::ephemeral("cluster.local").unwrap());
    let cp = discovering(api.kubeconfig(), ca.clone()).await.unwrap();
    let catalog = cp.catalog();
    assert_eq!(catalog.services.len(), 1, "{catalog:?}");
    assert_eq!(catalog.workload_entries.len(), 1, "{catalog:?}");
    let w = &catalog.workload_entries[0].spec;
    assert_eq!(w.address, "10.1.0.1");
    assert_eq!(w.service_account.as_deref(), Some("reviews"));
    assert_eq!(w.ports.get("http"), Some(&9080));

    // Scale up, then the first pod starts terminating: it leaves before its slice is updated.
    api.apply(&pod("reviews-2", "10.1.0.2", false));
    api.apply(&slice(&["reviews-1", "reviews-2"]));
    assert_eventually!(
        cp.catalog().workload_entries.len() == 2,
        "never: cp.catalog().workload_entries.len() == 2"
    );
    api.apply(&pod("reviews-1", "10.1.0.1", true));
    let addresses = || {
        cp.catalog()
            .workload_entries
            .iter()
            .map(|w| w.spec.address.clone())
            .collect::<Vec<_>>()
    };
    assert_eventually!(addresses() == ["10.1.0.2"], "never: addresses() == ['10.1.0.2']");

    // The watches die; what changes meanwhile arrives when they resume, without a new list.
    let lists = api.counts().lists.get("/api/v1/pods").copied().unwrap_or(0);
    api.break_watches();
    api.delete("v1", "Pod", "shop", "reviews-1");
    api.apply(&pod("reviews-3", "10.1.0.3", false));
    api.apply(&slice(&["reviews-2", "reviews-3"]));
    assert_eventually!(
        addresses() == ["10.1.0.2", "10.1.0.3"],
        "never: addresses() == ['10.1.0.2', '10.1.0.3']"
    );
    assert_eq!(
        api.counts().lists.get("/api/v1/pods").copied().unwrap_or(0),
        lists,
        "resumed, not relisted"
    );

    // History compacted while the watches are down: 410, a new list, and the state it shows.
    api.compact();
    api.break_watches();
    api.delete("v1", "Pod", "shop", "reviews-2");
    assert_eventually!(addresses() == ["10.1.0.3"], "never: addresses() == ['10.1.0.3']");
    assert!(api.counts().expired_watches > 0, "{:?}", api.counts());
    assert!(api.counts().lists.get("/api/v1/pods").copied().unwrap_or(0) > lists);
    cp.stop().await;
}

/// What each proxy is sent follows what its namespace sees: a `Sidecar` from the API server scopes
/// one namespace's proxies to their own services, an EndpointSlice change reaches only the proxies
/// that see the service, and an edit of the Sidecar (an Istio CRD) widens the scope at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_from_the_api_server_scopes_what_each_proxy_is_sent() {
    weft_test_support::init_tracing();
    let api = ApiServer::start().await;
    api.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: { name: reviews, namespace: shop }\n\
         spec: { clusterIP: 10.96.0.10, selector: { app: reviews }, ports: [{ name: http, port: 9080 }] }\n\
         ---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: { name: default, namespace: batch }\n\
         spec: { egress: [{ hosts: [\"./*\"] }] }\n",
    );
    api.apply(&pod("reviews-1", "10.1.0.1", false));
    api.apply(&slice(&["reviews-1"]));
    let ca = Arc::new(CertificateAuthority::ephemeral("cluster.local").unwrap());
    let mut cp = discovering(api.kubeconfig(), ca.clone()).await.unwrap();
    let url = format!(
        "https://{}",
        cp.serve_tls("127.0.0.1:0".parse().unwrap()).await.unwrap()
    );
    let dir = tempfile::tempdir().unwrap();
    let root_file = dir.path().join("root.pem");
    std::fs::write(&root_file, ca.root_pem()).unwrap();
    let proxy_in = |namespace: &str, sa: &str| {
        let token_file = dir.path().join(format!("{namespace}-token"));
        std::fs::write(
            &token_file,
            api.service_account_token(namespace, sa, &["istio-ca"]),
        )
        .unwrap();
        format!(
            "access_log: {{ path: off }}\n\
             node: {{ workload: {sa}, namespace: {namespace}, service_account: {sa} }}\n\
             identity: {{ ca_address: \"{url}\", ca_root_file: \"{root}\", token_file: \"{}\" }}\n\
             xds: {{ address: \"{url}\", root_file: \"{root}\" }}\n",
            token_file.display(),
            root = root_file.display(),
        )
    };
    let web = TestProxy::start(&proxy_in("shop", "web")).await;
    let batch = TestProxy::start(&proxy_in("batch", "job")).await;
    for proxy in [&web, &batch] {
        assert_eventually!(admin_get(proxy.admin(), "/ready").await.0 == 200, "not ready");
    }
    let clusters = |proxy: &TestProxy| {
        let admin = proxy.admin();
        async move { admin_get(admin, "/clusters").await.1 }
    };
    const REVIEWS: &str = "outbound|9080||reviews.shop.svc.cluster.local::10.1.0.1:9080";
    assert_eventually!(clusters(&web).await.contains(REVIEWS), "web never got reviews");
    assert!(
        !clusters(&batch).await.contains("reviews.shop"),
        "batch's Sidecar keeps shop out: {}",
        clusters(&batch).await
    );

    // Scale-up: the new endpoint reaches web; batch, which does not see reviews, is sent nothing.
    let batch_pushes = cp.pushes("sidecar~~job.batch");
    assert!(batch_pushes > 0, "batch's node id is not what this test thinks");
    api.apply(&pod("reviews-2", "10.1.0.2", false));
    api.apply(&slice(&["reviews-1", "reviews-2"]));
    assert_eventually!(
        clusters(&web)
            .await
            .contains("reviews.shop.svc.cluster.local::10.1.0.2:9080"),
        "the new endpoint never reached web"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        cp.pushes("sidecar~~job.batch"),
        batch_pushes,
        "batch was pushed a change it cannot see"
    );

    // The Sidecar edited in the API server: batch now sees shop.
    api.apply_yaml(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: { name: default, namespace: batch }\n\
         spec: { egress: [{ hosts: [\"./*\", \"shop/*\"] }] }\n",
    );
    assert_eventually!(
        clusters(&batch)
            .await
            .contains("reviews.shop.svc.cluster.local::10.1.0.2:9080"),
        "the Sidecar edit never widened batch's scope"
    );
    web.stop().await;
    batch.stop().await;
    cp.stop().await;
}

/// A pod of `reviews` in `shop` at `ip`, serving on 9080.
fn reviews_pod(name: &str, ip: &str, terminating: bool) -> serde_json::Value {
    let mut pod = pod(name, ip, terminating);
    pod["metadata"]["labels"]["pod"] = serde_json::json!(name);
    pod
}

/// The EndpointSlice controller's view of `pods` (name, IP): ready unless terminating.
fn reviews_slice(pods: &[(&str, &str, bool)]) -> serde_json::Value {
    let endpoints: Vec<_> = pods
        .iter()
        .map(|(name, ip, terminating)| {
            serde_json::json!({
                "addresses": [ip],
                "conditions": { "ready": !terminating, "serving": true, "terminating": terminating },
                "targetRef": { "kind": "Pod", "name": name, "namespace": "shop" },
            })
        })
        .collect();
    let mut slice = slice(&[]);
    slice["endpoints"] = serde_json::json!(endpoints);
    slice
}

/// A Deployment scaled up and down under load, the way the cluster does it: new pods join when ready;
/// a pod being removed turns terminating (and leaves the endpoints) while its app still serves, and
/// its process is killed only after the grace period. Not one request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_scaled_up_and_down_under_load_fail_no_request() {
    weft_test_support::init_tracing();
    use weft_test_support::http::{HttpServer, client, drain_body, empty};
    const CLUSTER_IP: &str = "127.0.96.51";
    let ips = ["127.0.51.1", "127.0.51.2", "127.0.51.3", "127.0.51.4"];
    let names = ["reviews-1", "reviews-2", "reviews-3", "reviews-4"];
    let mut apps = Vec::new();
    for (ip, name) in ips.iter().zip(names) {
        apps.push(HttpServer::start_on(format!("{ip}:9080").parse().unwrap(), name).await);
    }
    let api = ApiServer::start().await;
    api.apply_yaml(&format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: reviews\n  namespace: shop\nspec:\n  clusterIP: {CLUSTER_IP}\n  selector:\n    app: reviews\n  ports:\n  - name: http\n    port: 9080\n    targetPort: 9080\n"
    ));
    for i in 0..2 {
        api.apply(&reviews_pod(names[i], ips[i], false));
    }
    api.apply(&reviews_slice(&[
        (names[0], ips[0], false),
        (names[1], ips[1], false),
    ]));
    let ca = Arc::new(CertificateAuthority::ephemeral("cluster.local").unwrap());
    let cp = discovering(api.kubeconfig(), ca.clone()).await.unwrap();
    let proxy = TestProxy::start(&format!(
        "access_log: {{ path: off }}\n\
         node: {{ workload: web, namespace: shop }}\n\
         xds: {{ address: \"http://{}\" }}\n",
        cp.address()
    ))
    .await;
    assert_eventually!(admin_get(proxy.admin(), "/ready").await.0 == 200, "not ready");
    let endpoints = || async {
        let clusters = admin_get(proxy.admin(), "/clusters").await.1;
        ips.iter()
            .filter(|ip| {
                clusters.contains(&format!(
                    "outbound|9080||reviews.shop.svc.cluster.local::{ip}:9080"
                ))
            })
            .map(|ip| (*ip).to_owned())
            .collect::<Vec<_>>()
    };
    assert_eventually!(endpoints().await == ips[..2], "{:?}", endpoints().await);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let http = client(
            proxy
                .orig_dst
                .connector(proxy.outbound(), format!("{CLUSTER_IP}:9080").parse().unwrap()),
            false,
        );
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let (mut sent, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let request = http::Request::get("http://reviews.shop:9080/reviews")
                    .body(empty())
                    .unwrap();
                match http.request(request).await {
                    Ok(response) if response.status() == 200 => {
                        drain_body(response.into_body()).await.unwrap();
                    }
                    Ok(response) => failed.push(format!("status {}", response.status())),
                    Err(err) => failed.push(err.to_string()),
                }
                sent += 1;
            }
            (sent, failed)
        }));
    }
    let served = |i: usize| apps[i].request_count();

    // Scale up to four: each new pod takes requests once it is ready and listed.
    for i in 2..4 {
        api.apply(&reviews_pod(names[i], ips[i], false));
        let listed: Vec<_> = (0..=i).map(|j| (names[j], ips[j], false)).collect();
        api.apply(&reviews_slice(&listed));
        let before = served(i);
        assert_eventually!(served(i) > before + 20, "{} took no requests", names[i]);
    }

    // Scale down to two: each pod turns terminating and leaves; its app is killed after the grace.
    for i in 0..2 {
        api.apply(&reviews_pod(names[i], ips[i], true));
        let listed: Vec<_> = (0..4).map(|j| (names[j], ips[j], j <= i)).collect();
        api.apply(&reviews_slice(&listed));
        assert_eventually!(
            !endpoints().await.contains(&ips[i].to_owned()),
            "{} is still an endpoint",
            names[i]
        );
        // The grace period: what was in flight on the terminating pod finishes, and nothing new
        // comes, though its app still answers.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let after_removal = served(i);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            served(i),
            after_removal,
            "{} was sent requests after it left",
            names[i]
        );
        apps[i].kill();
        api.delete("v1", "Pod", "shop", names[i]);
        let remaining: Vec<_> = (i + 1..4).map(|j| (names[j], ips[j], false)).collect();
        api.apply(&reviews_slice(&remaining));
    }
    let before = (served(2), served(3));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        served(2) > before.0 && served(3) > before.1,
        "the two pods left share the load"
    );

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut sent, mut failed) = (0, Vec::new());
    for task in load {
        let (s, f) = task.await.unwrap();
        sent += s;
        failed.extend(f);
    }
    assert!(sent > 200, "only {sent} requests");
    assert!(
        failed.is_empty(),
        "{} of {sent} requests failed, first: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    proxy.stop().await;
    cp.stop().await;
}

/// A namespace of 100 services already in the cluster when weft control starts, with an API server
/// slow to list one kind: the first catalog, and so the first configuration a proxy gets, holds all
/// of them and every endpoint, never part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_initial_sync_of_a_hundred_service_namespace_is_whole() {
    let api = ApiServer::start().await;
    for n in 0..100u32 {
        let (name, ip) = (format!("svc-{n}"), format!("10.2.{}.{}", n / 200, n % 200 + 1));
        api.apply_yaml(&format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  clusterIP: 10.96.1.{}\n  selector:\n    app: {name}\n  ports:\n  - name: http\n    port: 9080\n",
            n + 1
        ));
        let mut pod = pod(&format!("{name}-0"), &ip, false);
        pod["metadata"]["labels"] = serde_json::json!({ "app": name });
        api.apply(&pod);
        let mut slice = reviews_slice(&[(&format!("{name}-0"), &ip, false)]);
        slice["metadata"]["name"] = serde_json::json!(format!("{name}-abc"));
        slice["metadata"]["labels"]["kubernetes.io/service-name"] = serde_json::json!(name);
        api.apply(&slice);
    }
    // The API server is slow to list EndpointSlices: weft control waits for them before it serves.
    api.hold_lists("discovery.k8s.io/v1", "EndpointSlice");
    let ca = Arc::new(CertificateAuthority::ephemeral("cluster.local").unwrap());
    let starting = tokio::spawn(discovering(api.kubeconfig(), ca));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!starting.is_finished(), "served before every kind was listed");
    api.release_lists("discovery.k8s.io/v1", "EndpointSlice");
    let cp = starting.await.unwrap().unwrap();
    let catalog = cp.catalog();
    assert_eq!(
        (catalog.services.len(), catalog.workload_entries.len()),
        (100, 100)
    );
    let proxy = TestProxy::start(&format!(
        "node: {{ workload: web, namespace: shop }}\nxds: {{ address: \"http://{}\" }}\n",
        cp.address()
    ))
    .await;
    assert_eventually!(admin_get(proxy.admin(), "/ready").await.0 == 200, "not ready");
    // Ready means the first configuration arrived; it was already the whole namespace.
    let clusters = admin_get(proxy.admin(), "/clusters").await.1;
    let endpoints = (0..100u32)
        .filter(|n| {
            clusters.contains(&format!(
                "outbound|9080||svc-{n}.shop.svc.cluster.local::10.2.{}.{}:9080",
                n / 200,
                n % 200 + 1
            ))
        })
        .count();
    assert_eq!(endpoints, 100, "{clusters}");
    // One response per type (clusters, endpoints, listeners, routes), nothing sent after to fill in.
    assert_eq!(cp.pushes("sidecar~~web.shop"), 4);
    proxy.stop().await;
    cp.stop().await;
}
