use super::*;

fn settings(placement: Placement) -> Settings {
    Settings {
        image: "weft:test".into(),
        init_image: "weft-init:test".into(),
        control_plane: DEFAULT_CONTROL_PLANE.into(),
        placement,
    }
}

fn deployment(annotations: &str, spec: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: shop}}\nspec:\n  template:\n    metadata:\n      annotations: {{{annotations}}}\n    spec:\n{spec}"
    )
}

const APP: &str = "      containers: [{name: web, image: web:1}]\n";

fn error(text: &str) -> String {
    inject("in.yaml", text, &settings(Placement::Native))
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_input_is_refused_naming_the_document_and_the_field() {
    assert_eq!(
        error("kind: Service\n---\nkind: [unclosed\n"),
        "in.yaml: document 2: not YAML: did not find expected ',' or ']' at line 2 column 1, while parsing a flow sequence at line 1 column 7"
    );
    assert_eq!(
        error("kind: Deployment\nmetadata: {name: web}\nspec: {}\n"),
        "in.yaml: document 1 (Deployment web): spec.template: missing (a Deployment needs a pod template)"
    );
    assert_eq!(
        error("kind: CronJob\nmetadata: {name: n}\nspec: {jobTemplate: {}}\n"),
        "in.yaml: document 1 (CronJob n): spec.jobTemplate.spec: missing (a CronJob needs a pod template)"
    );
    assert_eq!(
        error("- 1\n- 2\n"),
        "in.yaml: document 1: not a Kubernetes object (a mapping with `kind`)"
    );
    assert_eq!(
        error("metadata: {name: x}\n"),
        "in.yaml: document 1: kind: missing"
    );
    // Each annotation that does not parse, and what is said of it after the document and field.
    let annotations = [
        (
            "traffic.sidecar.istio.io/excludeOutboundPorts: \"80,http\"",
            "traffic.sidecar.istio.io/excludeOutboundPorts: \"80,http\": \"http\": invalid digit found in string",
        ),
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges: \"10.0.0.0/33\"",
            "traffic.sidecar.istio.io/excludeOutboundIPRanges: \"10.0.0.0/33\": \"10.0.0.0/33\": prefix length \"33\" is not 0 to 32",
        ),
        (
            "sidecar.istio.io/proxyMemory: lots",
            "sidecar.istio.io/proxyMemory: \"lots\": not a Kubernetes quantity (such as 100m, 0.5, 128Mi, 1Gi)",
        ),
        (
            "sidecar.istio.io/inject: \"yes\"",
            "sidecar.istio.io/inject is \"yes\"; it must be \"true\" or \"false\"",
        ),
        (
            "proxy.istio.io/config: \"terminationDrainDuration: soon\"",
            "proxy.istio.io/config: terminationDrainDuration \"soon\": expected number at 0",
        ),
        (
            "prometheus.io/scrape: \"yes\"",
            "prometheus.io/scrape is \"yes\"; it must be \"true\" or \"false\"",
        ),
    ];
    for (annotation, said) in annotations {
        assert_eq!(
            error(&deployment(annotation, APP)),
            format!("in.yaml: document 1 (Deployment shop/web): spec.template.metadata.annotations: {said}")
        );
    }
    assert_eq!(
        error(&deployment("", "      containers: []\n")),
        "in.yaml: document 1 (Deployment shop/web): spec.template.spec.containers: missing or empty"
    );
    assert_eq!(
        error(&deployment(
            "",
            "      containers: [{name: web}, {name: istio-proxy}]\n"
        )),
        "in.yaml: document 1 (Deployment shop/web): spec.template.spec: the pod already has Istio's sidecar \
         (istio-proxy); a pod takes one mesh's sidecar"
    );
    assert_eq!(
        error(&deployment(
            "",
            &format!("{APP}      volumes: [{{name: weft-token, emptyDir: {{}}}}]\n")
        )),
        "in.yaml: document 1 (Deployment shop/web): spec.template.spec.volumes: a volume is already named weft-token"
    );
    assert_eq!(
        error(&deployment("", &format!("{APP}      volumes: {{}}\n"))),
        "in.yaml: document 1 (Deployment shop/web): spec.template.spec.volumes: not a list"
    );
}

#[test]
fn a_classic_sidecar_goes_after_the_app_unless_it_holds_the_app() {
    let names = |text: &str, placement| {
        let out = inject("in.yaml", text, &settings(placement)).unwrap();
        let value: Value = serde_yaml_ng::from_str(&out.text).unwrap();
        let spec = &value["spec"]["template"]["spec"];
        let of = |field: &str| -> Vec<String> {
            spec[field]
                .as_sequence()
                .map(|s| s.iter().map(|c| c["name"].as_str().unwrap().to_owned()).collect())
                .unwrap_or_default()
        };
        (of("initContainers"), of("containers"))
    };
    let plain = deployment("", APP);
    assert_eq!(
        names(&plain, Placement::Native),
        (vec!["weft-init".into(), "weft-proxy".into()], vec!["web".into()])
    );
    assert_eq!(
        names(&plain, Placement::Classic),
        (vec!["weft-init".into()], vec!["web".into(), "weft-proxy".into()])
    );
    let hold = deployment(
        "proxy.istio.io/config: \"holdApplicationUntilProxyStarts: true\"",
        APP,
    );
    assert_eq!(
        names(&hold, Placement::Classic),
        (vec!["weft-init".into()], vec!["weft-proxy".into(), "web".into()])
    );
}

#[test]
fn the_proxy_configuration_in_the_pod_is_one_the_proxy_accepts() {
    let out = inject("in.yaml", &deployment("", APP), &settings(Placement::Native)).unwrap();
    let value: Value = serde_yaml_ng::from_str(&out.text).unwrap();
    let proxy = &value["spec"]["template"]["spec"]["initContainers"][1];
    let env = proxy["env"].as_sequence().unwrap();
    let config = env
        .iter()
        .find(|e| e["name"] == "WEFT_PROXY_CONFIG")
        .and_then(|e| e["value"].as_str())
        .unwrap();
    assert!(config.contains("mode: pod"), "{config}");
    assert!(
        config.contains(&format!("address: \"{DEFAULT_CONTROL_PLANE}\"")),
        "{config}"
    );
    assert!(config.contains("drain_timeout: \"5s\""), "{config}");
}
