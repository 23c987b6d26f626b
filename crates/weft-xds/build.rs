//! Envoy's protobuf descriptors, for `/config_dump`'s JSON (Envoy's admin output is the protobuf JSON
//! mapping of its admin protos, which needs the descriptors of every type inside an `Any`).
//!
//! They come from the `envoy-types` crate, which generates the Rust types from them and ships them as
//! `src/generated/types.bin` without exposing them; `cargo metadata` says where that crate is.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Only the target's packages: a build downloads no others, and offline metadata of the whole graph
    // would need them all.
    let target = std::env::var("TARGET").expect("set by cargo");
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--filter-platform",
            &target,
        ])
        .current_dir(&manifest_dir)
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).expect("cargo metadata is JSON");
    let manifest = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "envoy-types")
        .and_then(|p| p["manifest_path"].as_str())
        .expect("envoy-types is a dependency");
    let descriptors = PathBuf::from(manifest)
        .parent()
        .expect("a manifest has a directory")
        .join("src/generated/types.bin");
    println!("cargo:rerun-if-changed={}", descriptors.display());
    let bytes =
        std::fs::read(&descriptors).unwrap_or_else(|e| panic!("cannot read {}: {e}", descriptors.display()));
    let mut set = <prost_types::FileDescriptorSet as prost::Message>::decode(bytes.as_slice())
        .expect("envoy-types' descriptors decode");
    prune(&mut set);
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("envoy_descriptors.bin");
    std::fs::write(&out, prost::Message::encode_to_vec(&set)).expect("OUT_DIR is writable");
}

/// The files a config dump can need (Envoy's admin dumps, the bootstrap, the four resource types and
/// every extension the proxy accepts inside them) and what they import: a fraction of Envoy's API, so
/// loading it for a dump costs a few megabytes rather than fifty.
const ROOTS: &[&str] = &[
    "envoy/admin/v3/",
    "envoy/config/bootstrap/v3/",
    "envoy/config/cluster/v3/",
    "envoy/config/endpoint/v3/",
    "envoy/config/listener/v3/",
    "envoy/config/route/v3/",
    "envoy/config/trace/v3/opentelemetry.proto",
    "envoy/extensions/access_loggers/file/v3/",
    "envoy/extensions/access_loggers/stream/v3/",
    "envoy/extensions/filters/http/rbac/v3/",
    "envoy/extensions/filters/http/router/v3/",
    "envoy/extensions/filters/network/http_connection_manager/v3/",
    "envoy/extensions/filters/network/rbac/v3/",
    "envoy/extensions/filters/network/tcp_proxy/v3/",
    "envoy/extensions/path/match/uri_template/v3/",
    "envoy/extensions/transport_sockets/tls/v3/",
    "envoy/extensions/upstreams/http/v3/",
    "google/protobuf/struct.proto",
];

fn prune(set: &mut prost_types::FileDescriptorSet) {
    use std::collections::{BTreeSet, HashMap};
    let by_name: HashMap<String, &prost_types::FileDescriptorProto> =
        set.file.iter().map(|f| (f.name().to_owned(), f)).collect();
    let mut keep = BTreeSet::new();
    let mut todo: Vec<String> = set
        .file
        .iter()
        .map(|f| f.name().to_owned())
        .filter(|n| ROOTS.iter().any(|r| n.starts_with(r)))
        .collect();
    while let Some(name) = todo.pop() {
        if !keep.insert(name.clone()) {
            continue;
        }
        if let Some(file) = by_name.get(&name) {
            todo.extend(file.dependency.iter().cloned());
        }
    }
    set.file.retain(|f| keep.contains(f.name()));
    // Dependencies first, as a pool is built.
    let mut ordered = Vec::with_capacity(set.file.len());
    let mut placed = BTreeSet::new();
    let files: HashMap<String, prost_types::FileDescriptorProto> =
        set.file.drain(..).map(|f| (f.name().to_owned(), f)).collect();
    fn place(
        name: &str,
        files: &HashMap<String, prost_types::FileDescriptorProto>,
        placed: &mut BTreeSet<String>,
        ordered: &mut Vec<prost_types::FileDescriptorProto>,
    ) {
        if placed.contains(name) {
            return;
        }
        let Some(file) = files.get(name) else { return };
        placed.insert(name.to_owned());
        for dependency in &file.dependency {
            place(dependency, files, placed, ordered);
        }
        ordered.push(file.clone());
    }
    let mut names: Vec<&String> = files.keys().collect();
    names.sort();
    for name in names {
        place(name, &files, &mut placed, &mut ordered);
    }
    set.file = ordered;
}
