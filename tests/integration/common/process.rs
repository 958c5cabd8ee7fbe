//! The real `campaign-stats` binary as a separate server process (a second replica, say).

use std::net::SocketAddr;
use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use super::Metrics;

/// A `campaign-stats serve` process on free ports, logging JSON to a pipe this test reads.
pub struct ServerProcess {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    child: Child,
}

impl ServerProcess {
    /// Starts `campaign-stats serve` on `database_url` with `extra` arguments, and returns
    /// once it has said where it listens (both ports are bound by then).
    pub async fn start(database_url: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_campaign-stats"))
            .args([
                "serve",
                "--listen-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--database-url",
                database_url,
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start campaign-stats serve");
        let mut logs = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let (mut addr, mut metrics_addr) = (None, None);
        while addr.is_none() || metrics_addr.is_none() {
            let line = logs
                .next_line()
                .await
                .expect("read the server's log")
                .unwrap_or_else(|| panic!("the server exited before listening"));
            let Ok(entry) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let bound = || {
                entry["addr"]
                    .as_str()
                    .and_then(|a| a.parse::<SocketAddr>().ok())
            };
            match entry["message"].as_str() {
                Some("serving gRPC") => addr = bound(),
                Some("serving metrics") => metrics_addr = bound(),
                _ => {}
            }
        }
        // Keep draining the log so that the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = logs.next_line().await {} });
        Self {
            addr: addr.expect("gRPC address"),
            metrics_addr: metrics_addr.expect("metrics address"),
            child,
        }
    }

    pub async fn channel(&self) -> Channel {
        super::connect(self.addr).await
    }

    pub async fn metrics(&self) -> Metrics {
        Metrics::scrape(self.metrics_addr).await
    }

    /// Kills the process with SIGKILL: no shutdown, no flushing, as in a crash.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill -9 the server");
    }

    /// Sends SIGTERM, as an orchestrator does, and asserts a clean exit.
    pub async fn stop(mut self) {
        let pid = self.child.id().expect("still running").to_string();
        let signalled = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .expect("run kill");
        assert!(signalled.success(), "kill -TERM {pid} failed");
        let status = self.child.wait().await.expect("wait for the server");
        assert!(status.success(), "the server exited with {status}");
    }
}
