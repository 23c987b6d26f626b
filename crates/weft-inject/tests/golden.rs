//! `weft inject` over a corpus of real-world manifests (`tests/corpus/*.in.*`), each compared with
//! its golden output (`*.out.*`) and warnings (`*.warnings`). `WEFT_UPDATE_GOLDEN=1` rewrites the
//! golden files; read the diff before committing it. The outputs are also checked against
//! Kubernetes' own schemas, strictly, for 1.29 and the newest release.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};

use weft_inject::{DEFAULT_CONTROL_PLANE, Placement, Settings, inject};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

/// The corpus inputs, with the settings their names ask for (`-classic`: a classic sidecar).
fn inputs() -> Vec<(PathBuf, Settings)> {
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(corpus())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().contains(".in."))
        .collect();
    inputs.sort();
    assert!(inputs.len() >= 8, "the corpus is missing: {inputs:?}");
    inputs
        .into_iter()
        .map(|path| {
            let classic = path.to_str().unwrap().contains("-classic");
            let settings = Settings {
                image: "registry.example.com/weft:0.1.0".into(),
                init_image: "registry.example.com/weft-init:0.1.0".into(),
                control_plane: DEFAULT_CONTROL_PLANE.into(),
                placement: if classic {
                    Placement::Classic
                } else {
                    Placement::Native
                },
            };
            (path, settings)
        })
        .collect()
}

fn golden(input: &Path, suffix: &str) -> PathBuf {
    let name = input.file_name().unwrap().to_str().unwrap();
    let stem = name.split(".in.").next().unwrap();
    let ext = name.rsplit('.').next().unwrap();
    input.with_file_name(match suffix {
        "out" => format!("{stem}.out.{ext}"),
        other => format!("{stem}.{other}"),
    })
}

#[test]
fn the_corpus_injects_as_its_golden_files_say() {
    let update = std::env::var_os("WEFT_UPDATE_GOLDEN").is_some();
    let mut differ = Vec::new();
    for (input, settings) in inputs() {
        let text = std::fs::read_to_string(&input).unwrap();
        let name = input.file_name().unwrap().to_str().unwrap();
        let result = inject(name, &text, &settings).unwrap_or_else(|e| panic!("{e}"));
        let warnings: String = result.warnings.iter().map(|w| format!("{w}\n")).collect();
        for (path, got) in [
            (golden(&input, "out"), &result.text),
            (golden(&input, "warnings"), &warnings),
        ] {
            if update {
                std::fs::write(&path, got).unwrap();
            } else if std::fs::read_to_string(&path).ok().as_ref() != Some(got) {
                differ.push(path.display().to_string());
            }
        }
    }
    assert!(
        differ.is_empty(),
        "differ from the injector's output (WEFT_UPDATE_GOLDEN=1 rewrites them): {differ:?}"
    );
}

#[test]
fn injecting_twice_gives_the_bytes_of_injecting_once() {
    for (input, settings) in inputs() {
        let text = std::fs::read_to_string(&input).unwrap();
        let once = inject("once", &text, &settings).unwrap();
        let twice = inject("twice", &once.text, &settings).unwrap();
        assert_eq!(twice.text, once.text, "{}", input.display());
        assert_eq!(twice.injected, 0, "{}", input.display());
    }
}

#[test]
fn documents_without_pods_and_pods_left_alone_come_out_byte_for_byte() {
    let left = corpus().join("left-alone.in.yaml");
    let text = std::fs::read_to_string(&left).unwrap();
    let result = inject("left", &text, &inputs()[0].1).unwrap();
    assert_eq!(result.text, text);
    assert_eq!(result.injected, 0);
    assert_eq!(result.warnings.len(), 3, "{:?}", result.warnings);
}

/// Every golden output passes `kubernetes-validate --strict` for 1.29 (the first release with native
/// sidecars) and the newest release it knows. CI installs the tool (`WEFT_REQUIRE_KUBERNETES_VALIDATE`
/// makes its absence a failure); elsewhere the test says it skipped.
#[test]
fn injected_manifests_pass_the_kubernetes_schemas_strictly() {
    if !support::installed("kubernetes-validate", &["--version"]) {
        return;
    }
    // The schemas have no `List`: its items are checked as documents of their own.
    let dir = tempfile::tempdir().unwrap();
    let outputs: Vec<PathBuf> = inputs()
        .iter()
        .map(|(input, _)| {
            let out = golden(input, "out");
            let text = std::fs::read_to_string(&out).unwrap();
            let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap_or_default();
            if value["kind"] != "List" {
                return out;
            }
            let items: Vec<String> = value["items"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|item| serde_yaml_ng::to_string(item).unwrap())
                .collect();
            let path = dir
                .path()
                .join(out.file_name().unwrap())
                .with_extension("items.yaml");
            std::fs::write(&path, items.join("---\n")).unwrap();
            path
        })
        .collect();
    support::validate_strictly(&outputs);
}
