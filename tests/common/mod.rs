//! Shared test fixtures: a fresh database per test on the harness's cluster,
//! a plain second connection, and readers for the server's log and
//! `pg_stat_activity`.
#![allow(dead_code)]

use std::time::Duration;

use pgassist::testing::{TestCluster, TestDatabase};
use pgassist::{EngineConfig, Registry};

/// One test's database, with an `items` table.
pub struct Db {
    pub cluster: &'static TestCluster,
    pub db: TestDatabase,
    /// application_name of every pgassist connection of this test.
    pub app: String,
}

impl Db {
    pub async fn new() -> Db {
        let cluster = TestCluster::shared();
        let db = cluster
            .create_database()
            .await
            .expect("create test database");
        let app = format!("pgassist_{}", db.name);
        let this = Db { cluster, db, app };
        this.plain()
            .await
            .batch_execute("CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL)")
            .await
            .unwrap();
        this
    }

    pub fn config(&self) -> EngineConfig {
        EngineConfig::from_url(&self.db.url)
            .unwrap()
            .application_name(&self.app)
    }

    /// A registry with one engine, "writer", on this database.
    pub async fn registry(&self, tune: impl FnOnce(EngineConfig) -> EngineConfig) -> Registry {
        Registry::builder()
            .engine("writer", tune(self.config()))
            .build()
            .await
            .unwrap()
    }

    /// A plain tokio-postgres connection, outside pgassist.
    pub async fn plain(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.db.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }

    pub async fn plain_count(&self, sql: &str) -> i64 {
        self.plain().await.query_one(sql, &[]).await.unwrap().get(0)
    }

    pub async fn plain_names(&self) -> Vec<String> {
        let rows = self
            .plain()
            .await
            .query("SELECT name FROM items ORDER BY name", &[])
            .await
            .unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// Whether the server log can be read (not with an external `DATABASE_URL`).
    pub fn has_log(&self) -> bool {
        self.cluster.log_path().is_some()
    }

    pub fn log_offset(&self) -> u64 {
        self.cluster.log_len()
    }

    /// Statements the server logged for this test's database since `from`.
    pub fn statements_since(&self, from: u64) -> Vec<String> {
        let tag = format!("db={} ", self.db.name);
        self.cluster
            .log_since(from)
            .lines()
            .filter(|l| l.contains(&tag) && (l.contains("statement: ") || l.contains("execute ")))
            .map(str::to_owned)
            .collect()
    }

    /// (pid, state) of this test's pgassist backends.
    pub async fn backends(&self) -> Vec<(i32, String)> {
        let rows = self
            .plain()
            .await
            .query(
                "SELECT pid, coalesce(state, '') FROM pg_stat_activity WHERE application_name = $1",
                &[&self.app],
            )
            .await
            .unwrap();
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    /// Waits (bounded) until no backend of ours is idle in transaction.
    pub async fn wait_no_transactions(&self) {
        for _ in 0..200 {
            if in_transaction_backends(self).await == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "backends left in a transaction: {:?}",
            self.backends().await
        );
    }
}

/// Backends of ours that the server shows inside a transaction.
pub async fn in_transaction_backends(db: &Db) -> usize {
    db.backends()
        .await
        .iter()
        .filter(|(_, s)| s.starts_with("idle in transaction"))
        .count()
}
