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
