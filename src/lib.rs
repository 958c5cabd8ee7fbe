//! campaign-stats: records campaign events and serves their statistics over gRPC while it
//! carries its owners through a live storage migration.
//!
//! * [`domain`] — events, metrics, date ranges and the validation rules;
//! * [`storage`] — the storage contract and its SQLite and PostgreSQL backends;
//! * [`grpc`] — the gRPC services, conversions and the error mapping;
//! * [`server`] — wiring it all into a running server ([`server::launch`]);
//! * [`telemetry`] — logs and Prometheus metrics;
//! * [`app`] — the use cases the handlers call;
//! * [`health`] — the health service follows the database;
//! * [`cli`] — the command line.

pub mod app;
pub mod cli;
pub mod domain;
pub mod grpc;
pub mod health;
pub mod migration;
pub mod rollout;
pub mod server;
pub mod storage;
pub mod telemetry;
