//! Scraping a server's Prometheus endpoint the way Prometheus does: `GET /metrics`.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One scrape's text.
#[derive(Debug, Clone)]
pub struct Scrape(pub String);

impl Scrape {
    /// Scrapes `addr` over plain HTTP/1.1.
    pub async fn scrape(addr: SocketAddr) -> Self {
        let mut stream = TcpStream::connect(addr).await.expect("connect to metrics");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
            .await
            .expect("send the scrape");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .expect("read the scrape");
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
        Self(body.to_owned())
    }

    /// The value of the sample written exactly as `series` (name and labels), if present.
    pub fn value(&self, series: &str) -> Option<f64> {
        self.0.lines().find_map(|line| {
            let value = line.strip_prefix(series)?.strip_prefix(' ')?;
            Some(value.parse().expect("a numeric sample"))
        })
    }

    /// Like [`Scrape::value`], failing the test when the series is absent.
    pub fn get(&self, series: &str) -> f64 {
        self.value(series)
            .unwrap_or_else(|| panic!("no sample {series} in:\n{}", self.0))
    }
}
