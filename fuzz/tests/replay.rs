//! Every fuzz target on its seeds, its saved inputs and a fixed set of mutations (the same on every
//! run), as part of the test suite. `WEFT_FUZZ_ITERATIONS` runs more mutations.
#![allow(clippy::unwrap_used, clippy::expect_used)]

const ITERATIONS: usize = 2_000;

fn replay(name: &str) {
    let target = weft_fuzz::find(name).expect("a target of that name");
    let seeds = (target.seeds)();
    assert!(!seeds.is_empty(), "{name} has no seeds");
    let iterations = std::env::var("WEFT_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ITERATIONS);
    match weft_fuzz::replay(target, 0x5eed_0000 ^ name.len() as u64, iterations) {
        Ok(ran) => assert!(ran >= iterations + seeds.len(), "{name}: ran {ran}"),
        Err((input, message)) => {
            let dir = weft_fuzz::corpus_dir(name);
            let _ = std::fs::create_dir_all(&dir);
            let file = dir.join(format!("failure-{:016x}", fnv(&input)));
            let _ = std::fs::write(&file, &input);
            panic!(
                "{name} failed on an input (saved as {}): {message}\ninput: {:?}",
                file.display(),
                String::from_utf8_lossy(&input)
            );
        }
    }
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[test]
fn every_target_is_replayed_here() {
    let mut names: Vec<&str> = weft_fuzz::all().iter().map(|t| t.name).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "authorization_policy",
            "client_hello",
            "first_bytes",
            "h2_frames",
            "http1_request",
            "istio_resources",
            "path_normalize",
            "proxy_file",
            "xds_cluster",
            "xds_endpoints",
            "xds_listener",
            "xds_route"
        ]
    );
}

#[test]
fn first_bytes() {
    replay("first_bytes");
}

#[test]
fn client_hello() {
    replay("client_hello");
}

#[test]
fn http1_request() {
    replay("http1_request");
}

#[test]
fn h2_frames() {
    replay("h2_frames");
}

#[test]
fn xds_listener() {
    replay("xds_listener");
}

#[test]
fn xds_cluster() {
    replay("xds_cluster");
}

#[test]
fn xds_route() {
    replay("xds_route");
}

#[test]
fn xds_endpoints() {
    replay("xds_endpoints");
}

#[test]
fn proxy_file() {
    replay("proxy_file");
}

#[test]
fn istio_resources() {
    replay("istio_resources");
}

#[test]
fn authorization_policy() {
    replay("authorization_policy");
}

#[test]
fn path_normalize() {
    replay("path_normalize");
}
