//! The manifests in `deploy/` render with `kubectl kustomize` and pass Kubernetes' own schemas,
//! strictly, for 1.29 and the newest release (the weft binary's own tests start the control plane
//! with the Deployment's arguments). CI installs the tools (`WEFT_REQUIRE_KUBERNETES_VALIDATE` makes their absence a
//! failure); elsewhere the test says it skipped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Command;

fn deploy() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

#[test]
fn the_kustomization_renders_and_passes_the_kubernetes_schemas_strictly() {
    if !support::installed("kubectl", &["version", "--client"])
        || !support::installed("kubernetes-validate", &["--version"])
    {
        return;
    }
    let rendered = Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy())
        .output()
        .unwrap();
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let text = String::from_utf8(rendered.stdout).unwrap();
    for kind in [
        "kind: Namespace",
        "kind: ServiceAccount",
        "kind: ClusterRole\n",
        "kind: ClusterRoleBinding",
        "kind: Deployment",
        "kind: Service\n",
        "kind: MutatingWebhookConfiguration",
    ] {
        assert!(text.contains(kind), "{kind} missing from the rendered install");
    }
    assert!(text.contains("namespace: weft-system"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("install.yaml");
    std::fs::write(&path, &text).unwrap();
    support::validate_strictly(&[path]);
}
