//! The real `campaign-stats` binary as a separate server process (a second replica, say).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use campaign_stats::grpc::proto::rollout_service_client::RolloutServiceClient;
use campaign_stats::grpc::proto::{Rollout, WatchRolloutRequest};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_stream::StreamExt;
use tonic::Streaming;
use tonic::transport::Channel;

use super::Scrape;

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

    pub async fn metrics(&self) -> Scrape {
        Scrape::scrape(self.metrics_addr).await
    }

    /// Follows the rollout versions this process applies (WatchRollout).
    pub async fn watch_rollout(&self) -> AppliedVersions {
        let mut stream = RolloutServiceClient::new(self.channel().await)
            .watch_rollout(WatchRolloutRequest {})
            .await
            .expect("watch the replica's rollout")
            .into_inner();
        let version = stream
            .next()
            .await
            .expect("the current state")
            .expect("rollout")
            .version;
        AppliedVersions { stream, version }
    }

    /// Kills the process with SIGKILL: no shutdown, no flushing, as in a crash.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill -9 the server");
    }

    /// Sends SIGTERM, as an orchestrator does, and asserts a clean exit.
    pub async fn stop(self) {
        self.terminate().await;
        self.exits_cleanly().await;
    }

    /// Sends SIGTERM, as an orchestrator does, without waiting for the exit.
    pub async fn terminate(&self) {
        self.signal("-TERM").await;
    }

    /// The process's resident memory, in bytes (Linux: `VmRSS` of `/proc/PID/status`).
    pub fn resident_bytes(&self) -> u64 {
        let pid = self.child.id().expect("still running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kib * 1024
    }

    /// Sends SIGHUP: the server re-reads its tokens file.
    pub async fn hang_up(&self) {
        self.signal("-HUP").await;
    }

    async fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("still running").to_string();
        let signalled = Command::new("kill")
            .args([signal, &pid])
            .status()
            .await
            .expect("run kill");
        assert!(signalled.success(), "kill {signal} {pid} failed");
    }

    /// Waits for the process to exit, and asserts it exited cleanly.
    pub async fn exits_cleanly(mut self) {
        let status = self.child.wait().await.expect("wait for the server");
        assert!(status.success(), "the server exited with {status}");
    }
}

/// A replica's WatchRollout stream and the last version it reported applying.
pub struct AppliedVersions {
    stream: Streaming<Rollout>,
    pub version: u64,
}

impl AppliedVersions {
    /// Waits until the replica applies `version`; returns how long that took since `since`,
    /// failing after 5 s.
    pub async fn until_applied(&mut self, version: u64, since: Instant) -> Duration {
        while self.version < version {
            let update = tokio::time::timeout(Duration::from_secs(5), self.stream.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("version {version} did not reach the second replica within 5 s")
                })
                .expect("stream open")
                .expect("rollout");
            assert_eq!(update.applied_version, update.version);
            self.version = update.version;
        }
        since.elapsed()
    }
}
