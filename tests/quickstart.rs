//! `cargo run --example quickstart` against a server of the user's
//! (`DATABASE_URL`): the tour runs, leaves nothing behind, never speaks of a
//! replica that is not there, and never prints the password, also when the
//! connection fails.

mod common;

use std::process::Command;

use common::Db;

/// The example's binary, built by `cargo test` next to the test binaries.
fn quickstart() -> Command {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let mut cmd = Command::new(dir.join("examples").join("quickstart"));
    cmd.env_remove("PGASSIST_WRITER_URL");
    cmd
}

#[tokio::test]
async fn quickstart_on_database_url_leaves_nothing_and_prints_no_password() {
    let db = Db::new().await;
    // The harness's server trusts local connections: a password in the URL
    // is carried and must never be printed.
    let url = db.db.url.replacen(
        "postgres://postgres@",
        "postgres://postgres:Pw-quick-7f3@",
        1,
    );
    assert_ne!(
        url, db.db.url,
        "URL shape: the test must put a password in it"
    );
    let databases = db.plain_count("SELECT count(*) FROM pg_database").await;

    let out = quickstart().env("DATABASE_URL", &url).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("inserted cy"), "{text}");
    assert!(!text.contains("Pw-quick-7f3"), "{text}");
    assert!(!text.to_lowercase().contains("replica"), "{text}");
    assert!(!text.to_lowercase().contains("standby"), "{text}");
    assert_eq!(
        db.plain_count("SELECT count(*) FROM pg_class WHERE relname LIKE 'pgassist_quickstart_%'")
            .await,
        0,
        "the tour's table was dropped"
    );
    assert_eq!(
        db.plain_count("SELECT count(*) FROM pg_database").await,
        databases,
        "no database created"
    );

    // A server that cannot be reached: an error, no password.
    let out = quickstart()
        .env("DATABASE_URL", "postgres://ann:Pw-quick-7f3@127.0.0.1:1/x")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("quickstart failed"), "{text}");
    assert!(!text.contains("Pw-quick-7f3"), "{text}");
}
