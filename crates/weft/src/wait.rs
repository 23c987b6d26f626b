//! `weft wait`: returns once the proxy beside it is ready. A classic (non-native) sidecar's
//! `postStart` hook runs it, so the kubelet starts the app's containers only after the proxy has its
//! certificate and first configuration. The image has no shell or curl; this is its probe.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use http_body_util::Empty;
use hyper::body::Bytes;
use tokio::net::TcpStream;

#[derive(Args, Debug)]
pub(crate) struct WaitArgs {
    /// The readiness endpoint to poll.
    #[arg(long, default_value = "http://127.0.0.1:15021/healthz/ready")]
    url: hyper::Uri,
    /// How long to wait before giving up (exit 1).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

pub(crate) async fn run(args: WaitArgs) -> ExitCode {
    let (Some("http"), Some(authority)) = (args.url.scheme_str(), args.url.authority().cloned()) else {
        eprintln!("error: --url: \"{}\" must be http://host:port/path", args.url);
        return ExitCode::from(crate::EXIT_BAD_CONFIG);
    };
    let deadline = Instant::now() + args.timeout;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), ready(&args.url, authority.as_str())).await {
            Ok(Ok(())) => return ExitCode::SUCCESS,
            Ok(Err(why)) => last = why,
            Err(_) => last = "no answer within 1 s".into(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("error: the proxy was not ready within {:?}: {last}", args.timeout);
    ExitCode::FAILURE
}

/// One readiness request: `Ok` on 200, else what the proxy said.
async fn ready(url: &hyper::Uri, authority: &str) -> Result<(), String> {
    let stream = TcpStream::connect(authority).await.map_err(|e| e.to_string())?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, connection) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    match response.status() {
        hyper::StatusCode::OK => Ok(()),
        status => Err(format!("answered {status}")),
    }
}
