//! A TCP fault proxy: sits between the application and PostgreSQL or Redis and, on the test's word, cuts every
//! connection (and refuses new ones until restored), resets the live ones once, or delays every chunk.
//!
//! Toxiproxy does this too, but needs a server binary and its HTTP API; this is the few lines of tokio the tests
//! need, in process, on a free port, gone with the test.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mode {
    /// Connections are refused (accepted and reset at once) and live ones were reset.
    cut: bool,
    /// Bumped by [`FaultProxy::reset`] and [`FaultProxy::cut`]: a connection of an older generation ends.
    generation: u64,
    /// Held before each chunk is passed on.
    delay: Duration,
}

pub struct FaultProxy {
    /// Where the application connects instead of the dependency.
    pub addr: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy on a free port of 127.0.0.1 in front of `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let addr = listener.local_addr().expect("an address");
        let mode = Arc::new(watch::Sender::new(Mode { cut: false, generation: 0, delay: Duration::ZERO }));
        let (upstream, watched) = (upstream.to_owned(), mode.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let now = *watched.borrow();
                if now.cut {
                    reset(client);
                    continue;
                }
                tokio::spawn(relay(client, upstream.clone(), watched.subscribe(), now.generation));
            }
        });
        Self { addr, mode, accept }
    }

    /// `url` with `upstream` (`host:port`) replaced by this proxy.
    pub fn route(&self, url: &str, upstream: &str) -> String {
        assert!(url.contains(upstream), "{url} does not name {upstream}");
        url.replacen(upstream, &self.addr.to_string(), 1)
    }

    /// Resets every connection and refuses new ones, until [`FaultProxy::restore`]: the dependency is gone.
    pub fn cut(&self) {
        self.mode.send_modify(|m| {
            m.cut = true;
            m.generation += 1;
        });
    }

    /// Accepts connections again (and ends any delay).
    pub fn restore(&self) {
        self.mode.send_modify(|m| {
            m.cut = false;
            m.delay = Duration::ZERO;
        });
    }

    /// Resets every live connection once; new ones are accepted: a network blip.
    pub fn reset(&self) {
        self.mode.send_modify(|m| m.generation += 1);
    }

    /// Holds every chunk `delay` before passing it on: a slow network or a dependency that stalls.
    pub fn delay(&self, delay: Duration) {
        self.mode.send_modify(|m| m.delay = delay);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Closes `stream` with a TCP RST rather than a FIN, as a connection lost to a crash or a network fault is seen.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

async fn relay(client: TcpStream, upstream: String, mut mode: watch::Receiver<Mode>, generation: u64) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        reset(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client, server) = (Arc::new(client), Arc::new(server));
    let (up, down) = (mode.clone(), mode.clone());
    let pumps = async {
        tokio::select! {
            () = pump(client.clone(), server.clone(), up) => {}
            () = pump(server.clone(), client.clone(), down) => {}
        }
    };
    let ended = async {
        let _ = mode.wait_for(|m| m.generation != generation).await;
    };
    tokio::select! {
        () = pumps => {}
        () = ended => {}
    }
    for stream in [client, server] {
        if let Ok(stream) = Arc::try_unwrap(stream) {
            reset(stream);
        }
    }
}

/// Copies `from` to `to` chunk by chunk, each after the current delay, until either side closes.
async fn pump(from: Arc<TcpStream>, to: Arc<TcpStream>, mode: watch::Receiver<Mode>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match read(&from, &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let delay = mode.borrow().delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if write_all(&to, &buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn read(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => return other,
        }
    }
}

async fn write_all(stream: &TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        stream.writable().await?;
        match stream.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
