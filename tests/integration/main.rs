//! Integration tests: the real server on a free port, called with real tonic clients, on
//! SQLite and on PostgreSQL (see `common` for how the PostgreSQL half is enabled).

mod auth;
mod backfill;
mod cli;
mod common;
mod crash;
mod fuzz;
mod group_commit;
mod guard;
mod limits;
mod load;
mod metrics;
mod migration;
mod overflow;
mod read;
mod record;
mod repair;
mod retention;
mod rollout;
mod rollups;
mod schema;
mod service;
mod shadow;
mod streams;
mod timeouts;
mod tls;
