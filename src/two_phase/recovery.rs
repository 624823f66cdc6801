//! Resolving in-doubt two-phase commits after a crash.
//!
//! A unit of work that died mid-commit leaves prepared transactions (and
//! perhaps a decision record) behind. [`Registry::recover`] lists every
//! prepared transaction with this registry's prefix on every engine, commits
//! those whose decision record exists on their coordinator, rolls back those
//! without one once they are older than a grace period (younger ones may
//! belong to a unit of work still committing), and removes decision records
//! that nothing refers to any more.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::error::SqlState;

use crate::error::{Error, Result};
use crate::front::engine::Engine;
use crate::front::registry::Registry;
use crate::two_phase::unit_of_work::{DECISIONS_TABLE, run_autocommit};
use crate::tx::sql::quote_literal;

/// How old an undecided prepared transaction must be before
/// [`Registry::recover`] rolls it back.
pub const DEFAULT_RECOVERY_GRACE: Duration = Duration::from_secs(60);

/// One prepared transaction that recovery looked at.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct InDoubt {
    /// The engine it was prepared on.
    pub engine: String,
    /// Its global transaction id.
    pub gid: String,
}

/// What [`Registry::recover`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct RecoveryReport {
    /// Committed: their coordinator had recorded the decision.
    pub committed: Vec<InDoubt>,
    /// Rolled back: no decision, and older than the grace period.
    pub rolled_back: Vec<InDoubt>,
    /// Left alone: no decision yet, younger than the grace period.
    pub left_in_doubt: Vec<InDoubt>,
    /// Decision records removed because no prepared transaction needs them.
    pub decisions_removed: u64,
}

impl Registry {
    /// Resolves in-doubt prepared transactions; see the
    /// [module docs](crate::two_phase::recovery). Rolls back undecided ones older than
    /// [`DEFAULT_RECOVERY_GRACE`].
    pub async fn recover(&self) -> Result<RecoveryReport> {
        self.recover_older_than(DEFAULT_RECOVERY_GRACE).await
    }

    /// [`Registry::recover`] with another grace period (`Duration::ZERO`
    /// when no unit of work can be committing, e.g. at startup).
    pub async fn recover_older_than(&self, grace: Duration) -> Result<RecoveryReport> {
        let prefix = self.two_phase_prefix();
        let mut report = RecoveryReport::default();
        let mut pending_globals = BTreeSet::new();
        // Replicas show their primary's prepared transactions but cannot resolve them.
        let primaries: Vec<&Engine> = self
            .engines()
            .filter(|e| e.config().replica_of_engine().is_none())
            .collect();
        for engine in &primaries {
            for (gid, age) in prepared_with_prefix(engine, prefix).await? {
                let Some((global, coordinator)) = parse_gid(prefix, &gid) else {
                    continue;
                };
                let entry = InDoubt {
                    engine: engine.name().to_owned(),
                    gid: gid.clone(),
                };
                let decided = match self.engine(coordinator) {
                    Ok(c) => has_decision(c, global).await?,
                    Err(_) => false,
                };
                let sql = if decided {
                    format!("COMMIT PREPARED {}", quote_literal(&gid))
                } else if age >= grace {
                    format!("ROLLBACK PREPARED {}", quote_literal(&gid))
                } else {
                    pending_globals.insert(global.to_owned());
                    report.left_in_doubt.push(entry);
                    continue;
                };
                match run_autocommit(engine, &sql).await {
                    Ok(()) => {}
                    // Two engines on one database see the same one: already resolved.
                    Err(e) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => continue,
                    Err(e) => return Err(e),
                }
                if decided {
                    report.committed.push(entry)
                } else {
                    report.rolled_back.push(entry)
                }
            }
        }
        for engine in &primaries {
            report.decisions_removed += forget_decisions(engine, grace, &pending_globals).await?;
        }
        Ok(report)
    }
}

/// `{prefix}:{id}:{coordinator}:{engine}` → (`{prefix}:{id}:{coordinator}`, coordinator).
fn parse_gid<'a>(prefix: &str, gid: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = gid.strip_prefix(prefix)?.strip_prefix(':')?;
    let (id, rest) = rest.split_once(':')?;
    let (coordinator, _engine) = rest.split_once(':')?;
    let global_len = prefix.len() + 1 + id.len() + 1 + coordinator.len();
    Some((&gid[..global_len], coordinator))
}

fn rows(messages: &[SimpleQueryMessage]) -> impl Iterator<Item = &tokio_postgres::SimpleQueryRow> {
    messages.iter().filter_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    })
}

/// (gid, age) of this database's prepared transactions with our prefix.
async fn prepared_with_prefix(engine: &Engine, prefix: &str) -> Result<Vec<(String, Duration)>> {
    let like = format!(
        "{}:%",
        prefix
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    );
    let sql = format!(
        "SELECT gid, extract(epoch FROM now() - prepared)::float8 FROM pg_prepared_xacts \
         WHERE database = current_database() AND gid LIKE {}",
        quote_literal(&like)
    );
    let conn = engine.checkout().await?;
    let messages = conn
        .client
        .simple_query(&sql)
        .await
        .map_err(|e| Error::from_pg(engine.name(), e))?;
    Ok(rows(&messages)
        .filter_map(|r| {
            let age: f64 = r.get(1)?.parse().ok()?;
            Some((r.get(0)?.to_owned(), Duration::from_secs_f64(age.max(0.0))))
        })
        .collect())
}

/// Whether the coordinator recorded the commit decision for `global`.
async fn has_decision(coordinator: &Engine, global: &str) -> Result<bool> {
    let conn = coordinator.checkout().await?;
    let sql = format!(
        "SELECT 1 FROM {DECISIONS_TABLE} WHERE gid = {}",
        quote_literal(global)
    );
    match conn.client.simple_query(&sql).await {
        Ok(messages) => Ok(rows(&messages).next().is_some()),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Ok(false),
        Err(e) => Err(Error::from_pg(coordinator.name(), e)),
    }
}

/// Deletes decision records older than `grace` that no pending prepared
/// transaction refers to (their work is committed everywhere).
async fn forget_decisions(
    engine: &Engine,
    grace: Duration,
    pending: &BTreeSet<String>,
) -> Result<u64> {
    let conn = engine.checkout().await?;
    let keep: Vec<&str> = pending.iter().map(String::as_str).collect();
    let sql = format!(
        "DELETE FROM {DECISIONS_TABLE} WHERE decided_at <= now() - make_interval(secs => $1) AND gid <> ALL($2)"
    );
    match conn
        .client
        .execute(&sql, &[&grace.as_secs_f64(), &keep])
        .await
    {
        Ok(n) => Ok(n),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Ok(0),
        Err(e) => Err(Error::from_pg(engine.name(), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_parse_back_to_their_global_id_and_coordinator() {
        let gid = "pgassist:00ff:writer:logger";
        assert_eq!(
            parse_gid("pgassist", gid),
            Some(("pgassist:00ff:writer", "writer"))
        );
        assert_eq!(parse_gid("other", gid), None);
        assert_eq!(parse_gid("pgassist", "pgassist:broken"), None);
    }
}
