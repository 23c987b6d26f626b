//! `weft inject`: the sidecar added to the pods of Kubernetes manifests (files, directories, stdin),
//! written to stdout; nothing is written unless every input could be injected.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use weft_inject::{Placement, Settings};

#[derive(Args, Debug)]
pub(crate) struct InjectArgs {
    /// Manifests to inject: YAML (several documents, `List`s) or JSON files, directories (their
    /// `.yaml`, `.yml` and `.json` files, in name order), or `-` for stdin.
    #[arg(default_value = "-")]
    inputs: Vec<PathBuf>,
    #[command(flatten)]
    injection: InjectionArgs,
}

/// What the injector puts in pods, for `weft inject` and for weft control's webhook alike.
#[derive(Args, Debug)]
pub(crate) struct InjectionArgs {
    /// The proxy's image (deploy/Dockerfile's `proxy` target: `weft` alone).
    #[arg(long, env = "WEFT_IMAGE", default_value = concat!("weft:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// The capture init container's image (the `init` target: `weft` with iptables).
    #[arg(long, env = "WEFT_INIT_IMAGE", default_value = concat!("weft-init:", env!("CARGO_PKG_VERSION")))]
    init_image: String,
    /// The control plane as pods reach it: xDS and the CA on weft control's TLS port.
    #[arg(long, env = "WEFT_CONTROL_PLANE", default_value = weft_inject::DEFAULT_CONTROL_PLANE)]
    control_plane: String,
    /// Where the proxy goes: `native`, an init container with `restartPolicy: Always` (Kubernetes
    /// 1.29+); `classic`, a regular container, for older clusters.
    #[arg(long, value_enum, default_value_t = Sidecar::Native)]
    sidecar: Sidecar,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Sidecar {
    Native,
    Classic,
}

impl InjectionArgs {
    pub(crate) fn settings(&self) -> Result<Settings, String> {
        if !self.control_plane.starts_with("https://") {
            return Err(format!(
                "--control-plane: \"{}\" must start with https:// (pods send their token to the CA)",
                self.control_plane
            ));
        }
        Ok(Settings {
            image: self.image.clone(),
            init_image: self.init_image.clone(),
            control_plane: self.control_plane.clone(),
            placement: match self.sidecar {
                Sidecar::Native => Placement::Native,
                Sidecar::Classic => Placement::Classic,
            },
        })
    }
}

pub(crate) fn run(args: InjectArgs) -> ExitCode {
    let settings = match args.injection.settings() {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(crate::EXIT_BAD_CONFIG);
        }
    };
    let mut output = String::new();
    let mut injected = 0;
    let mut documents = 0;
    for input in &args.inputs {
        let files = match files(input) {
            Ok(files) => files,
            Err(err) => {
                eprintln!("error: {err}");
                return ExitCode::FAILURE;
            }
        };
        for (name, text) in files {
            let result = match weft_inject::inject(&name, &text, &settings) {
                Ok(result) => result,
                Err(err) => {
                    eprintln!("error: {err}");
                    return ExitCode::FAILURE;
                }
            };
            for warning in &result.warnings {
                eprintln!("warning: {warning}");
            }
            if documents > 0 && !output.ends_with("---\n") {
                if !output.ends_with('\n') {
                    output.push('\n');
                }
                output.push_str("---\n");
            }
            output.push_str(&result.text);
            injected += result.injected;
            documents += 1;
        }
    }
    eprintln!("weft inject: {injected} pod(s) injected");
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(output.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: cannot write the output: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The texts of an input: stdin, a file, or a directory's manifests in name order.
fn files(input: &Path) -> Result<Vec<(String, String)>, String> {
    if input == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("stdin: {e}"))?;
        return Ok(vec![("stdin".into(), text)]);
    }
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .map(|text| (path.display().to_string(), text))
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    if !input.is_dir() {
        return Ok(vec![read(input)?]);
    }
    let entries = std::fs::read_dir(input).map_err(|e| format!("{}: {e}", input.display()))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", input.display()))?.path();
        let manifest = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        if manifest && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    paths.iter().map(|p| read(p)).collect()
}
