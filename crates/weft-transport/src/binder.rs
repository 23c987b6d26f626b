//! Listeners and original destinations.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use nix::sys::socket::{getsockopt, sockopt};
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// Pending connections the kernel queues per listener before accept, for bursts of new connections from a
/// busy app; `net.core.somaxconn` caps it.
const LISTEN_BACKLOG: i32 = 1024;

/// Binds listeners and tells where a redirected connection was originally going.
pub trait Binder: fmt::Debug + Send + Sync + 'static {
    fn bind(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        bind_listener(addr)
    }

    /// The address the client connected to before iptables redirected it to us.
    fn original_dst(&self, conn: &TcpStream) -> io::Result<SocketAddr>;
}

/// The kernel's answer: `SO_ORIGINAL_DST` for IPv4, `IP6T_SO_ORIGINAL_DST` for IPv6 (both set by the
/// nat table's REDIRECT target).
#[derive(Debug, Clone, Copy, Default)]
pub struct OsBinder;

impl Binder for OsBinder {
    fn original_dst(&self, conn: &TcpStream) -> io::Result<SocketAddr> {
        // A dual-stack listener sees IPv4 clients as IPv4-mapped IPv6 addresses, but the kernel keeps
        // their NAT record under IPv4.
        match canonical(conn.local_addr()?) {
            SocketAddr::V4(_) => {
                let raw = getsockopt(conn, sockopt::OriginalDst).map_err(io::Error::from)?;
                let ip = Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr));
                Ok(SocketAddrV4::new(ip, u16::from_be(raw.sin_port)).into())
            }
            SocketAddr::V6(_) => {
                let raw = getsockopt(conn, sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
                let ip = Ipv6Addr::from(raw.sin6_addr.s6_addr);
                Ok(SocketAddrV6::new(ip, u16::from_be(raw.sin6_port), 0, raw.sin6_scope_id).into())
            }
        }
    }
}

/// Binds a TCP listener with SO_REUSEADDR, so that a restarted proxy can bind while old connections
/// sit in TIME_WAIT. An IPv6 wildcard listener also accepts IPv4 (dual stack).
pub fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// A connection as the proxy sees it on accept.
#[derive(Debug)]
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// The address of our listening socket the connection arrived on.
    pub local: SocketAddr,
}

/// Accepts one connection, with the socket options every proxied connection gets.
pub async fn accept(listener: &TcpListener) -> io::Result<Accepted> {
    let (stream, peer) = listener.accept().await?;
    stream.set_nodelay(true)?;
    let local = canonical(stream.local_addr()?);
    Ok(Accepted {
        stream,
        peer: canonical(peer),
        local,
    })
}

/// Turns IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) into the IPv4 addresses they are.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}
