//! A TCP proxy a test can cut and restore, to make a database "go away" while the server
//! keeps running, or freeze, to make it stop answering while its connections stay open.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    open: watch::Sender<bool>,
    flowing: watch::Sender<bool>,
}

/// Copies `from` to `to`, holding every byte while `flowing` says no.
async fn forward(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut flowing: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        if flowing.wait_for(|flowing| *flowing).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    /// Forwards connections made to `addr` to `upstream` while open.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (open, _) = watch::channel(true);
        let (flowing, _) = watch::channel(true);
        let (state, flow) = (open.clone(), flowing.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut open = state.subscribe();
                if !*open.borrow() {
                    continue; // refused: dropping the socket closes it
                }
                let flow = flow.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        () = forward(client_read, server_write, flow.subscribe()) => {}
                        () = forward(server_read, client_write, flow.subscribe()) => {}
                        _ = open.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Self {
            addr,
            open,
            flowing,
        }
    }

    /// A proxy in front of the PostgreSQL server `database_url` names, and the same URL
    /// through the proxy.
    pub async fn in_front_of(database_url: &str) -> (Self, String) {
        let mut url = url::Url::parse(database_url).expect("database URL");
        let upstream =
            tokio::net::lookup_host((url.host_str().expect("host"), url.port().unwrap_or(5432)))
                .await
                .expect("resolve PostgreSQL")
                .next()
                .expect("an address");
        let proxy = Self::start(upstream).await;
        url.set_host(Some("127.0.0.1")).expect("host");
        url.set_port(Some(proxy.addr.port())).expect("port");
        (proxy, url.to_string())
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }

    /// Holds every byte in both directions, keeping the connections open: a database that
    /// stops answering without closing anything.
    pub fn freeze(&self) {
        self.flowing.send_replace(false);
    }

    /// Lets the held bytes, and all after them, through again.
    pub fn thaw(&self) {
        self.flowing.send_replace(true);
    }
}
