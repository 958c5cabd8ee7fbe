//! The schema the service brings: it never takes a long lock on the legacy system's table
//! (issue 8, defect 8), and databases migrated by earlier builds keep starting.

use std::time::Duration;

use campaign_stats::storage::{Database, PoolOptions, PostgresStore, SqliteStore};
use sqlx::Connection;

use crate::common::{Backend, TestDb};

crate::on_both_backends!(
    an_existing_legacy_table_gets_no_index_from_the_service,
    a_legacy_table_the_service_creates_is_indexed,
    a_database_migrated_by_an_earlier_build_still_starts,
);

/// The legacy table as the legacy system made it, with a row.
const LEGACY_SYSTEM_TABLE: &str = "CREATE TABLE campaign_daily_stat_entries (
    id BIGINT PRIMARY KEY, campaign_id TEXT NOT NULL, user_id TEXT NOT NULL,
    stat_date DATE NOT NULL, sent INTEGER DEFAULT 0, opened INTEGER DEFAULT 0,
    replied INTEGER DEFAULT 0, positive_replies INTEGER DEFAULT 0, bounced INTEGER DEFAULT 0,
    created_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    UNIQUE (campaign_id, stat_date));
    INSERT INTO campaign_daily_stat_entries (id, campaign_id, user_id, stat_date, sent)
    VALUES (1, 'c1', 'u1', '2026-03-01', 4);";

/// How many indexes named `name` the database has.
async fn indexes_named(db: &TestDb, name: &str) -> i64 {
    match db.backend {
        Backend::Sqlite => {
            db.scalar(&format!(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = '{name}'"
            ))
            .await
        }
        Backend::Postgres => {
            db.scalar(&format!(
                "SELECT COUNT(*) FROM pg_indexes WHERE indexname = '{name}'"
            ))
            .await
        }
    }
}

async fn an_existing_legacy_table_gets_no_index_from_the_service(db: TestDb) {
    db.execute(LEGACY_SYSTEM_TABLE).await;
    // PostgreSQL: the first migration must not wait for the legacy system's open write
    // transaction, as an index build on its table would (and would then block every later
    // write). SQLite locks the whole file for a write, so there is nothing to show there.
    let legacy_writer = if db.backend == Backend::Postgres {
        let mut writer = sqlx::PgConnection::connect(&db.url).await.expect("connect");
        sqlx::raw_sql(
            "BEGIN; INSERT INTO campaign_daily_stat_entries (id, campaign_id, user_id, \
             stat_date, sent) VALUES (2, 'c2', 'u1', '2026-03-02', 1)",
        )
        .execute(&mut writer)
        .await
        .expect("an open legacy write");
        Some(writer)
    } else {
        None
    };
    tokio::time::timeout(Duration::from_secs(20), migrate_directly(&db))
        .await
        .expect("migrating waits for no legacy writer")
        .expect("migrate");
    if let Some(mut writer) = legacy_writer {
        sqlx::raw_sql("COMMIT")
            .execute(&mut writer)
            .await
            .expect("commit");
    }
    assert_eq!(
        indexes_named(&db, "campaign_daily_stat_entries_by_user_date").await,
        0
    );
    // The service works on it all the same.
    let server = db.start_server().await;
    let mut stats = server.stats().await;
    let metrics =
        crate::common::campaign_metrics(&mut stats, "u1", "c1", "2026-03-01", "2026-03-01").await;
    assert_eq!(metrics.sent, 4);
    server.stop().await;
}

async fn a_legacy_table_the_service_creates_is_indexed(db: TestDb) {
    let server = db.start_server().await;
    assert_eq!(
        indexes_named(&db, "campaign_daily_stat_entries_by_user_date").await,
        1
    );
    server.stop().await;
}

/// The checksum migration 20261121000002 had when it still built the legacy index.
fn shipped_checksum(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => {
            "70a603826d708d65752342cd9900def40a5a2ffa00aa1ef108158e0af9169b80be39035ed121688155d00120e62ca9ff"
        }
        Backend::Postgres => {
            "84be7f9b0e14047be920e6e1767ea2e43535fcbd76ddc09b7a7980436e262732e82a15f6dcd34e501ab4790e5b878e51"
        }
    }
}

async fn a_database_migrated_by_an_earlier_build_still_starts(db: TestDb) {
    let server = db.start_server().await;
    server.stop().await;
    let old = shipped_checksum(db.backend);
    let literal = match db.backend {
        Backend::Sqlite => format!("X'{old}'"),
        Backend::Postgres => format!("decode('{old}', 'hex')"),
    };
    db.execute(&format!(
        "UPDATE _sqlx_migrations SET checksum = {literal} WHERE version = 20261121000002"
    ))
    .await;
    let server = db.start_server_keeping_phase().await;
    let mut stats = server.stats().await;
    crate::common::campaign_metrics(&mut stats, "u1", "c1", "2026-03-01", "2026-03-01").await;
    server.stop().await;
    // An unknown checksum is still refused: only the shipped text is adopted.
    let unknown = match db.backend {
        Backend::Sqlite => "X'00'",
        Backend::Postgres => "decode('00', 'hex')",
    };
    db.execute(&format!(
        "UPDATE _sqlx_migrations SET checksum = {unknown} WHERE version = 20261121000002"
    ))
    .await;
    assert!(migrate_directly(&db).await.is_err());
}

/// Runs the service's migrations on `db` without serving.
async fn migrate_directly(db: &TestDb) -> Result<(), campaign_stats::storage::StorageError> {
    let options = PoolOptions::default();
    match db.backend {
        Backend::Sqlite => {
            let store = SqliteStore::connect(&db.url, &options).await?;
            let migrated = store.update_schema().await;
            store.close().await;
            migrated
        }
        Backend::Postgres => {
            let store = PostgresStore::connect(&db.url, &options).await?;
            let migrated = store.update_schema().await;
            store.close().await;
            migrated
        }
    }
}
