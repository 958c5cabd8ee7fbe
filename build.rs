//! Compiles the protos with `protox` (pure Rust, no `protoc` needed) and writes the encoded
//! descriptor set to `OUT_DIR` for server reflection.

use std::path::PathBuf;

use protox::prost::Message;

const PROTOS: &[&str] = &[
    "proto/stats/v1/common.proto",
    "proto/stats/v1/stats.proto",
    "proto/stats/v1/rollout.proto",
    "proto/stats/v1/migration.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The PostgreSQL half of the tests runs when the tests are built with a PostgreSQL URL;
    // without one, those tests are built as ignored, so that the test summary counts them
    // as skipped instead of passed.
    println!("cargo::rustc-check-cfg=cfg(postgres_tests)");
    println!("cargo:rerun-if-env-changed=STATS_TEST_POSTGRES_URL");
    if std::env::var("STATS_TEST_POSTGRES_URL").is_ok_and(|url| !url.is_empty()) {
        println!("cargo:rustc-cfg=postgres_tests");
    }
    println!("cargo:rerun-if-changed=proto");
    // `sqlx::migrate!` embeds the migrations, but cannot tell cargo about a new file itself.
    println!("cargo:rerun-if-changed=migrations");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("stats_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    // No default stubs: a handler the services lack fails the build, rather than answering
    // UNIMPLEMENTED.
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
