//! Kubernetes' own tools, as the manifest tests use them.

use std::path::PathBuf;
use std::process::Command;

/// Whether `name` runs (`probe` are its arguments for a harmless call). CI installs the tools and
/// sets `WEFT_REQUIRE_KUBERNETES_VALIDATE`, which makes a missing one a failure; elsewhere the test
/// says it skipped.
pub(crate) fn installed(name: &str, probe: &[&str]) -> bool {
    let found = Command::new(name)
        .args(probe)
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("WEFT_REQUIRE_KUBERNETES_VALIDATE").is_none(),
            "{name} is required here and not installed"
        );
        eprintln!("SKIP: {name} is not installed");
    }
    found
}

/// Every document of `paths` passes `kubernetes-validate --strict` for 1.29 (the first release with
/// native sidecars) and the newest release the tool knows. A document it has no schema for is only a
/// warning to the tool, and unchecked: here it fails.
pub(crate) fn validate_strictly(paths: &[PathBuf]) {
    for version in ["1.29.0", "1.37.0"] {
        let out = Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", version])
            .args(paths)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !said.contains("ERROR") && !said.contains("WARN"),
            "Kubernetes {version}: {said}"
        );
    }
}
