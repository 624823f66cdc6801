//! The unit of work across engines and its two-phase commit (docs on
//! [`UnitOfWork`]).

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::front::registry::Registry;
use crate::front::session::Session;
use crate::front::sessions::ScopeRef;
use crate::front::sessions::Sessions;
use crate::sql::gid;
use crate::tx::hooks::{Callback, run_after_commit};
use crate::tx::options::TxOptions;
use crate::tx::sql::quote_literal;
use crate::tx::transaction::Transaction;

/// The coordinator's table of commit decisions.
pub(crate) const DECISIONS_TABLE: &str = "pgassist_2pc_decisions";

/// A point in the commit protocol, for crash tests (feature `testing`).
#[cfg(feature = "testing")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// After the n-th (1-based) PREPARE TRANSACTION.
    AfterPrepare(usize),
    /// After the coordinator committed the decision.
    AfterDecision,
    /// After the n-th (1-based) COMMIT PREPARED.
    AfterCommitPrepared(usize),
}

/// One unit of work across engines, committed atomically.
///
/// A [`UnitOfWork`] enlists a transaction per engine as each is touched. With
/// one engine, commit is a plain COMMIT. With several it is a two-phase
/// commit with a decision record (z3c.zalchemy's idea, on PostgreSQL's
/// PREPARE TRANSACTION):
///
/// 1. every engine but the coordinator (the first one enlisted) runs
///    `PREPARE TRANSACTION gid`, each confirmed through `pg_prepared_xacts`;
/// 2. the coordinator writes the global id into `pgassist_2pc_decisions` in
///    its own transaction and commits it (last-resource commit): that commit
///    is the decision;
/// 3. every prepared engine runs `COMMIT PREPARED gid`, and the decision
///    record is deleted.
///
/// A failure before the decision rolls everything back (`ROLLBACK PREPARED`).
/// A crash anywhere leaves at most prepared transactions and decision
/// records behind, which [`crate::Registry::recover`] resolves: commit where
/// the decision exists, roll back where it does not.
///
/// Global ids are `{prefix}:{unique id}:{coordinator}:{engine}`, where the
/// prefix is set with [`crate::RegistryBuilder::two_phase_prefix`] (letters,
/// digits, `_`, `-`), the unique id is 32 hex digits, and both engine names
/// are percent-encoded: every byte outside `[A-Za-z0-9_-]` becomes `%XX`
/// (upper-case hex, UTF-8 bytes). Engine names may hold anything (`:`,
/// spaces, quotes, `заказы`), so the pieces must never hold the `:`
/// separator, or recovery would cut an id at the wrong place and look for
/// the decision on the wrong coordinator. Plain names such as `writer`
/// encode to themselves, so ids written before the encoding read the same.
/// The part before the last `:` is the *global id*, the decision record's
/// key; the record's `engines` column lists the prepared engines, encoded
/// the same way and joined with `,`.
///
/// PostgreSQL caps an id at 199 bytes (`GIDSIZE` 200 with the terminating
/// NUL), so [`crate::RegistryBuilder::build`] refuses a registry whose two
/// longest encoded engine names would make a longer one.
///
/// ```no_run
/// # async fn demo(registry: pgassist::Registry) -> Result<(), pgassist::Error> {
/// let mut uow = registry.unit_of_work();
/// uow.get("writer").await?.execute("INSERT INTO orders(item) VALUES ('book')", &[]).await?;
/// uow.get("logger").await?.execute("INSERT INTO audit(msg) VALUES ('order')", &[]).await?;
/// uow.commit().await?; // two engines touched: two-phase commit
/// # Ok(()) }
/// ```
pub struct UnitOfWork {
    registry: Registry,
    options: TxOptions,
    /// Sessions of the request scope, if the unit of work belongs to one.
    scope: Option<ScopeRef>,
    /// Enlisted engines in order: (engine index, transaction). The first is the coordinator.
    enlisted: Vec<(usize, Transaction<'static>)>,
    #[cfg(feature = "testing")]
    crash_after: Option<CrashPoint>,
}

impl std::fmt::Debug for UnitOfWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self
            .enlisted
            .iter()
            .map(|(_, tx)| tx.engine_name())
            .collect();
        f.debug_struct("UnitOfWork")
            .field("enlisted", &names)
            .finish()
    }
}

impl Registry {
    /// A unit of work across engines: a transaction per engine as each is
    /// touched, committed atomically (two-phase commit with several).
    pub fn unit_of_work(&self) -> UnitOfWork {
        UnitOfWork::new(self.clone(), None)
    }
}

impl Sessions {
    /// A unit of work whose transactions belong to this request (they show
    /// in [`Sessions::report`]): see [`UnitOfWork`].
    pub fn unit_of_work(&self) -> UnitOfWork {
        UnitOfWork::new(
            self.registry().clone(),
            Some(self.scope_ref(self.registry().default_index())),
        )
    }
}

impl UnitOfWork {
    pub(crate) fn new(registry: Registry, scope: Option<ScopeRef>) -> UnitOfWork {
        UnitOfWork {
            registry,
            options: TxOptions::new(),
            scope,
            enlisted: Vec::new(),
            #[cfg(feature = "testing")]
            crash_after: None,
        }
    }

    /// Options for the transactions enlisted from now on.
    pub fn options(mut self, options: TxOptions) -> Self {
        self.options = options;
        self
    }

    /// Engine `name`'s transaction in this unit of work, begun on first use.
    /// Enlisting a second engine checks that every engine that would have to
    /// PREPARE allows it (`max_prepared_transactions > 0`), so a unit of work
    /// that cannot commit atomically fails before anything is written there.
    pub async fn get(&mut self, name: &str) -> Result<&Transaction<'static>> {
        let index = self.registry.engine_index(name)?;
        self.enlist(index).await
    }

    /// The transaction of the engine that owns `table` (see
    /// [`crate::RegistryBuilder::route_table`]; the default engine for
    /// unmapped tables).
    pub async fn for_table(&mut self, table: &str) -> Result<&Transaction<'static>> {
        let index = self.registry.table_engine_index(table);
        self.enlist(index).await
    }

    async fn enlist(&mut self, index: usize) -> Result<&Transaction<'static>> {
        if let Some(pos) = self.enlisted.iter().position(|(i, _)| *i == index) {
            return Ok(&self.enlisted[pos].1);
        }
        let engine = self.registry.engine_at(index).clone();
        if !self.enlisted.is_empty() {
            let engines = self
                .enlisted
                .iter()
                .map(|(i, _)| self.registry.engine_at(*i));
            if let Some(e) = engines.chain([&engine]).find(|e| e.config().is_pgbouncer()) {
                return Err(Error::Config(format!(
                    "engine `{}` runs through PgBouncer: a unit of work across several engines needs \
                     two-phase commit, and PREPARE TRANSACTION cannot work through transaction pooling",
                    e.name()
                )));
            }
            allows_prepare(&engine).await?;
        }
        let session = match &self.scope {
            Some(scope) => Session::scoped(engine, scope.for_index(index)),
            None => Session::new(engine),
        };
        let tx = session.begin_outermost(self.options.clone()).await?;
        self.enlisted.push((index, tx));
        Ok(&self.enlisted.last().expect("just pushed").1)
    }

    /// The names of the enlisted engines, coordinator first.
    pub fn engines(&self) -> Vec<&str> {
        self.enlisted
            .iter()
            .map(|(_, tx)| tx.engine_name())
            .collect()
    }

    /// Stops the commit protocol at `step`, as if the process died there
    /// (open transactions are dropped, which rolls them back; prepared ones
    /// stay for [`crate::Registry::recover`]).
    #[cfg(feature = "testing")]
    pub fn crash_after(&mut self, step: CrashPoint) {
        self.crash_after = Some(step);
    }

    #[cfg(feature = "testing")]
    fn crashes_at(&self, step: CrashPoint) -> Result<()> {
        match self.crash_after {
            Some(s) if s == step => Err(Error::Usage(format!("simulated crash after {step:?}"))),
            _ => Ok(()),
        }
    }

    /// Rolls every enlisted transaction back.
    pub async fn rollback(self) -> Result<()> {
        for (_, tx) in self.enlisted {
            tx.rollback().await?;
        }
        Ok(())
    }

    /// Commits every enlisted transaction: a plain COMMIT for one engine,
    /// two-phase commit for several. After the decision the unit of work is
    /// committed: a COMMIT PREPARED that fails then is left for
    /// [`crate::Registry::recover`] and logged, not reported as a failure.
    pub async fn commit(mut self) -> Result<()> {
        let mut enlisted = std::mem::take(&mut self.enlisted);
        if enlisted.len() <= 1 {
            return match enlisted.pop() {
                Some((_, tx)) => tx.commit().await,
                None => Ok(()),
            };
        }
        let (coordinator_index, coordinator) = enlisted.remove(0);
        let prefix = self.registry.two_phase_prefix();
        let id = unique_id();
        let global = gid::global_id(prefix, &id, coordinator.engine_name());
        let engine_of = |index: usize| self.registry.engine_at(index).clone();
        ensure_decision_table(self.registry.engine_at(coordinator_index)).await?;

        // Phase 1: prepare all but the coordinator.
        let mut prepared = Vec::new();
        let mut callbacks: Vec<Callback> = Vec::new();
        for (n, (index, tx)) in enlisted.into_iter().enumerate() {
            let engine = engine_of(index);
            let gid = gid::gid(&global, engine.name());
            match tx.prepare(&gid).await {
                Ok(Some(cbs)) => {
                    callbacks.extend(cbs);
                    prepared.push((engine, gid));
                }
                Ok(None) => {}
                Err(e) => {
                    // Cut off mid-PREPARE, it may exist: roll it back too.
                    prepared.push((engine, gid));
                    abort_prepared(&prepared).await;
                    drop(coordinator);
                    return Err(e);
                }
            }
            #[cfg(feature = "testing")]
            self.crashes_at(CrashPoint::AfterPrepare(n + 1))?;
            #[cfg(not(feature = "testing"))]
            let _ = n;
        }

        // The decision: the coordinator's commit, with the record in it.
        let decision = format!(
            "INSERT INTO {DECISIONS_TABLE}(gid, engines) VALUES ({}, {})",
            quote_literal(&global),
            quote_literal(
                &prepared
                    .iter()
                    .map(|(e, _)| gid::encode_name(e.name()))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        );
        let coordinator_engine = engine_of(coordinator_index);
        if let Err(e) = coordinator.batch_execute(&decision).await {
            abort_prepared(&prepared).await;
            drop(coordinator);
            return Err(e);
        }
        match coordinator.commit().await {
            Ok(()) => {}
            Err(e @ Error::CommitOutcomeUnknown { .. }) => return Err(e), // recover() decides
            Err(e) => {
                abort_prepared(&prepared).await;
                return Err(e);
            }
        }
        #[cfg(feature = "testing")]
        self.crashes_at(CrashPoint::AfterDecision)?;

        // Phase 2: the decision is made; finish it everywhere.
        let mut all_done = true;
        for (n, (engine, gid)) in prepared.iter().enumerate() {
            if let Err(e) =
                run_autocommit(engine, &format!("COMMIT PREPARED {}", quote_literal(gid))).await
            {
                all_done = false;
                crate::telemetry::warn(&format!(
                    "pgassist: COMMIT PREPARED {gid} on `{}` failed ({e}); registry.recover() will finish it",
                    engine.name()
                ));
            }
            #[cfg(feature = "testing")]
            self.crashes_at(CrashPoint::AfterCommitPrepared(n + 1))?;
            #[cfg(not(feature = "testing"))]
            let _ = n;
        }
        if all_done {
            let forget = format!(
                "DELETE FROM {DECISIONS_TABLE} WHERE gid = {}",
                quote_literal(&global)
            );
            let _ = run_autocommit(&coordinator_engine, &forget).await;
        }
        run_after_commit(callbacks).await;
        Ok(())
    }
}

/// Rolls back prepared transactions after a failure before the decision.
async fn abort_prepared(prepared: &[(crate::Engine, String)]) {
    for (engine, gid) in prepared {
        let sql = format!("ROLLBACK PREPARED {}", quote_literal(gid));
        if let Err(e) = run_autocommit(engine, &sql).await {
            // "does not exist" is the expected answer for one never prepared.
            if e.code() != Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) {
                crate::telemetry::warn(&format!(
                    "pgassist: ROLLBACK PREPARED {gid} on `{}` failed ({e}); registry.recover() will retry",
                    engine.name()
                ));
            }
        }
    }
}

/// Runs one control statement in autocommit on a fresh checkout.
pub(crate) async fn run_autocommit(engine: &crate::Engine, sql: &str) -> Result<()> {
    let conn = engine.checkout().await?;
    conn.client
        .batch_execute(sql)
        .await
        .map_err(|e| Error::from_pg(engine.name(), e))
}

/// Creates the decision table on the coordinator if it does not exist.
pub(crate) async fn ensure_decision_table(engine: &crate::Engine) -> Result<()> {
    if engine
        .inner
        .two_phase
        .decision_table
        .load(Ordering::Acquire)
    {
        return Ok(());
    }
    let ddl = format!(
        "CREATE TABLE IF NOT EXISTS {DECISIONS_TABLE} \
         (gid text PRIMARY KEY, engines text NOT NULL, decided_at timestamptz NOT NULL DEFAULT now())"
    );
    match run_autocommit(engine, &ddl).await {
        Ok(()) => {}
        // Two first commits racing to create it: the other one won.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {}
        Err(e) => return Err(e),
    }
    engine
        .inner
        .two_phase
        .decision_table
        .store(true, Ordering::Release);
    Ok(())
}

/// Fails with a clear error if `engine`'s server does not allow PREPARE TRANSACTION.
async fn allows_prepare(engine: &crate::Engine) -> Result<()> {
    let known = engine.inner.two_phase.max_prepared.load(Ordering::Acquire);
    let max = if known != u64::MAX {
        known
    } else {
        let conn = engine.checkout().await?;
        let messages = conn
            .client
            .simple_query("SHOW max_prepared_transactions")
            .await
            .map_err(|e| Error::from_pg(engine.name(), e))?;
        let max = messages
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
                _ => None,
            })
            .unwrap_or(0);
        engine
            .inner
            .two_phase
            .max_prepared
            .store(max, Ordering::Release);
        max
    };
    if max == 0 {
        return Err(Error::Config(format!(
            "engine `{}`: a unit of work across several engines commits with two-phase commit, \
             and this server has max_prepared_transactions = 0 (set it above 0 and restart it)",
            engine.name()
        )));
    }
    Ok(())
}

/// A 128-bit random hex id (std's randomly seeded hasher, the clock and a counter).
fn unique_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let half = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(nanos ^ salt);
        h.write_u64(n);
        h.write_u32(std::process::id());
        h.finish()
    };
    format!("{:016x}{:016x}", half(0x5151), half(0xa3a3))
}
