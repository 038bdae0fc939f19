//! Whether the client of a request is still connected, for requests that wait in an order lane.
//!
//! actix-web keeps running a handler after its client has hung up (it notices only when it next reads or
//! writes the socket), so a queued order would be committed for nobody. At accept time [`watch`] keeps a
//! duplicate handle of the connection's socket in the connection's data; [`PeerSocket::is_closed`] peeks at it
//! without blocking or consuming anything: end of stream (the client closed) or a reset means gone. A client
//! that half-closes its sending side while it waits for the answer is taken for gone too: HTTP/1.1 clients do
//! not do that.

use std::any::Any;
use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::sync::Arc;

use actix_web::HttpRequest;
use actix_web::dev::Extensions;
use shop_domain::ports::Connection;

/// A duplicate of a client's TCP socket (the same connection, another descriptor), dropped with the
/// connection's data.
#[derive(Debug)]
pub struct PeerSocket(std::net::TcpStream);

impl Connection for PeerSocket {
    fn is_closed(&self) -> bool {
        let mut byte = [0_u8; 1];
        // The descriptor shares the accepted socket's non-blocking mode, so this never waits.
        match self.0.peek(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted),
        }
    }
}

/// `HttpServer::on_connect`: keeps a [`PeerSocket`] of each plain TCP connection in its data.
pub fn watch(connection: &dyn Any, data: &mut Extensions) {
    let Some(tcp) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() else { return };
    match tcp.as_fd().try_clone_to_owned() {
        Ok(fd) => {
            data.insert(Arc::new(PeerSocket(std::net::TcpStream::from(fd))));
        }
        Err(e) => tracing::debug!(error = %e, "cannot watch a connection; its requests are not dropped if it closes"),
    }
}

/// The request's connection, when [`watch`] saw it.
#[must_use]
pub fn of(req: &HttpRequest) -> Option<Arc<dyn Connection>> {
    req.conn_data::<Arc<PeerSocket>>().map(|socket| {
        let socket: Arc<dyn Connection> = socket.clone();
        socket
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    use super::*;

    #[test]
    fn a_peer_that_closes_is_seen_closed_and_pending_data_is_not_consumed() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let watched = PeerSocket(server.try_clone().unwrap());
        assert!(!watched.is_closed(), "connected, nothing sent");
        client.write_all(b"GET").unwrap();
        client.flush().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!watched.is_closed(), "data waiting");
        let mut buf = [0_u8; 3];
        assert_eq!(server.peek(&mut buf).unwrap(), 3, "the peek consumed nothing");
        drop(client);
        std::thread::sleep(std::time::Duration::from_millis(50));
        // The unread bytes come first; the close is seen once they are read.
        std::io::Read::read_exact(&mut &server, &mut buf).unwrap();
        assert!(watched.is_closed(), "the client hung up");
    }
}
