//! A tonic gRPC echo server (`weft.test.v1.Echo`): unary and bidirectional streaming.

use std::net::SocketAddr;
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

pub mod pb {
    #![allow(clippy::all, unreachable_pub, missing_debug_implementations)]
    tonic::include_proto!("weft.test.v1");
}

pub mod health {
    #![allow(clippy::all, unreachable_pub, missing_debug_implementations)]
    tonic::include_proto!("grpc.health.v1");
}

use health::health_check_response::ServingStatus;
use health::health_server::{Health, HealthServer};
use health::{HealthCheckRequest, HealthCheckResponse};
use pb::echo_server::{Echo, EchoServer};
use pb::{EchoRequest, EchoResponse};

#[derive(Debug, Clone, Copy)]
pub struct GrpcServer {
    pub addr: SocketAddr,
}

impl GrpcServer {
    pub async fn start(name: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc server");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(EchoServer::new(EchoService { name }))
                .add_service(HealthServer::new(HealthService))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Self { addr }
    }
}

#[derive(Debug)]
struct EchoService {
    name: &'static str,
}

type EchoStream = Pin<Box<dyn Stream<Item = Result<EchoResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let message = request.into_inner().message;
        if message == "fail" {
            return Err(Status::unavailable("asked to fail"));
        }
        Ok(Response::new(EchoResponse {
            message,
            served_by: self.name.into(),
        }))
    }

    type BidiStream = EchoStream;

    async fn bidi(&self, request: Request<Streaming<EchoRequest>>) -> Result<Response<EchoStream>, Status> {
        let name = self.name;
        let replies = request.into_inner().map(move |m| {
            m.map(|m| EchoResponse {
                message: m.message,
                served_by: name.into(),
            })
        });
        Ok(Response::new(Box::pin(replies)))
    }
}

/// `grpc.health.v1.Health`: the server is `SERVING`; a service named `down` is `NOT_SERVING`, any
/// other service is unknown (`NOT_FOUND`), as gRPC's own health server answers.
#[derive(Debug)]
struct HealthService;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let status = match request.into_inner().service.as_str() {
            "" | "echo" => ServingStatus::Serving,
            "down" => ServingStatus::NotServing,
            other => return Err(Status::not_found(format!("unknown service {other}"))),
        };
        Ok(Response::new(HealthCheckResponse {
            status: status.into(),
        }))
    }
}
