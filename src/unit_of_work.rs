//! One unit of work across engines, committed atomically.
//!
//! A [`UnitOfWork`] enlists a transaction per engine as each is touched. With
//! one engine, commit is a plain COMMIT. With several it is a two-phase
//! commit with a decision record (z3c.zalchemy's idea, on PostgreSQL's
//! PREPARE TRANSACTION):
//!
//! 1. every engine but the coordinator (the first one enlisted) runs
//!    `PREPARE TRANSACTION gid`, each confirmed through `pg_prepared_xacts`;
//! 2. the coordinator writes the global id into `pgassist_2pc_decisions` in
//!    its own transaction and commits it (last-resource commit): that commit
//!    is the decision;
//! 3. every prepared engine runs `COMMIT PREPARED gid`, and the decision
//!    record is deleted.
//!
//! A failure before the decision rolls everything back (`ROLLBACK PREPARED`).
//! A crash anywhere leaves at most prepared transactions and decision
//! records behind, which [`crate::Registry::recover`] resolves: commit where
//! the decision exists, roll back where it does not.
//!
//! Global ids are `{prefix}:{unique id}:{coordinator}:{engine}`, where the
//! prefix is set with [`crate::RegistryBuilder::two_phase_prefix`] (letters,
//! digits, `_`, `-`), the unique id is 32 hex digits, and both engine names
//! are percent-encoded: every byte outside `[A-Za-z0-9_-]` becomes `%XX`
//! (upper-case hex, UTF-8 bytes). Engine names may hold anything (`:`,
//! spaces, quotes, `заказы`), so the pieces must never hold the `:`
//! separator, or recovery would cut an id at the wrong place and look for
//! the decision on the wrong coordinator. Plain names such as `writer`
//! encode to themselves, so ids written before the encoding read the same.
//! The part before the last `:` is the *global id*, the decision record's
//! key; the record's `engines` column lists the prepared engines, encoded
//! the same way and joined with `,`.
//!
//! PostgreSQL caps an id at 199 bytes (`GIDSIZE` 200 with the terminating
//! NUL), so [`crate::RegistryBuilder::build`] refuses a registry whose two
//! longest encoded engine names would make a longer one.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::hooks::{Callback, run_after_commit};
use crate::registry::Registry;
use crate::session::Session;
use crate::sessions::ScopeRef;
use crate::transaction::{Transaction, TxOptions, quote_literal};

/// The coordinator's table of commit decisions.
pub(crate) const DECISIONS_TABLE: &str = "pgassist_2pc_decisions";

/// A point in the commit protocol, for crash tests (feature `testing`).
#[cfg(feature = "testing")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// After the n-th (1-based) PREPARE TRANSACTION.
    AfterPrepare(usize),
    /// After the coordinator committed the decision.
    AfterDecision,
    /// After the n-th (1-based) COMMIT PREPARED.
    AfterCommitPrepared(usize),
}

/// Several engines' transactions, committed together. See the
/// [module docs](crate::unit_of_work).
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
    crash_after: Option<Step>,
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
            let engines = self.enlisted.iter().map(|(_, tx)| tx.engine());
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
    pub fn crash_after(&mut self, step: Step) {
        self.crash_after = Some(step);
    }

    #[cfg(feature = "testing")]
    fn crashes_at(&self, step: Step) -> Result<()> {
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
        let (_, coordinator) = enlisted.remove(0);
        let prefix = self.registry.two_phase_prefix();
        let id = unique_id();
        let global = gid::global_id(prefix, &id, coordinator.engine_name());
        let engine_of = |tx: &Transaction<'static>| tx.engine().clone();
        ensure_decision_table(coordinator.engine()).await?;

        // Phase 1: prepare all but the coordinator.
        let mut prepared = Vec::new();
        let mut callbacks: Vec<Callback> = Vec::new();
        for (n, (_, tx)) in enlisted.into_iter().enumerate() {
            let engine = engine_of(&tx);
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
            self.crashes_at(Step::AfterPrepare(n + 1))?;
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
        let coordinator_engine = engine_of(&coordinator);
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
        self.crashes_at(Step::AfterDecision)?;

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
            self.crashes_at(Step::AfterCommitPrepared(n + 1))?;
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

/// Two-phase commit facts cached per engine.
#[derive(Debug)]
pub(crate) struct TwoPhaseState {
    /// `max_prepared_transactions`, or `u64::MAX` while unknown.
    max_prepared: AtomicU64,
    /// The decision table is known to exist.
    decision_table: std::sync::atomic::AtomicBool,
}

impl Default for TwoPhaseState {
    fn default() -> Self {
        TwoPhaseState {
            max_prepared: AtomicU64::new(u64::MAX),
            decision_table: Default::default(),
        }
    }
}

/// Global transaction ids: how they are built, read back, and how long they
/// can get. Pure functions, so recovery and the registry's build-time check
/// share one definition of the format (see the [module docs](crate::unit_of_work)).
pub(crate) mod gid {
    use std::borrow::Cow;

    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

    use crate::error::{Error, Result};

    /// Every byte but `[A-Za-z0-9_-]` is escaped: an encoded name never holds
    /// the `:` separator, the `,` of the decision record's list, a quote or a
    /// `%` of its own, and is plain ASCII whatever the server encoding.
    const ESCAPED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'_').remove(b'-');

    /// PostgreSQL's longest transaction id in bytes (`GIDSIZE` is 200,
    /// counting the terminating NUL: "must be less than 200 bytes").
    pub(crate) const MAX_GID_BYTES: usize = 199;

    /// Length of the unique id between prefix and names (32 hex digits).
    pub(crate) const ID_LEN: usize = 32;

    /// `name` with every byte outside `[A-Za-z0-9_-]` as `%XX`.
    pub(crate) fn encode_name(name: &str) -> Cow<'_, str> {
        utf8_percent_encode(name, ESCAPED).into()
    }

    /// The name `piece` encodes, only if `piece` is exactly what
    /// [`encode_name`] makes of it: a stray `%`, lower-case hex, an escape
    /// that was not needed or bytes that are not UTF-8 make it `None`, so
    /// that every accepted piece has one reading.
    pub(crate) fn decode_name(piece: &str) -> Option<String> {
        let name = percent_decode_str(piece).decode_utf8().ok()?;
        (encode_name(&name) == piece).then(|| name.into_owned())
    }

    /// `{prefix}:{id}:{coordinator}`, the decision record's key.
    pub(crate) fn global_id(prefix: &str, id: &str, coordinator: &str) -> String {
        format!("{prefix}:{id}:{}", encode_name(coordinator))
    }

    /// `{global}:{engine}`, the id `engine` prepares under.
    pub(crate) fn gid(global: &str, engine: &str) -> String {
        format!("{global}:{}", encode_name(engine))
    }

    /// A prepared transaction's id, read back.
    #[derive(Debug, PartialEq, Eq)]
    pub(crate) struct Parsed<'a> {
        /// `{prefix}:{id}:{coordinator}` as it appears in the id.
        pub(crate) global: &'a str,
        /// The coordinator's name, decoded.
        pub(crate) coordinator: String,
        /// The preparing engine's name, decoded.
        pub(crate) engine: String,
    }

    fn id_and_rest<'a>(prefix: &str, gid: &'a str) -> Option<&'a str> {
        let rest = gid.strip_prefix(prefix)?.strip_prefix(':')?;
        let (id, names) = rest.split_once(':')?;
        let hex = !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit());
        hex.then_some(names)
    }

    /// Reads `{prefix}:{id}:{coordinator}:{engine}` exactly: three pieces
    /// after the prefix, a hex id, and two non-empty, canonically encoded
    /// names. Anything else is `None`.
    pub(crate) fn parse<'a>(prefix: &str, gid: &'a str) -> Option<Parsed<'a>> {
        let names = id_and_rest(prefix, gid)?;
        let (coordinator, engine) = names.split_once(':')?;
        if engine.contains(':') {
            return None;
        }
        let decoded = |piece: &str| decode_name(piece).filter(|n| !n.is_empty());
        Some(Parsed {
            global: &gid[..gid.len() - engine.len() - 1],
            coordinator: decoded(coordinator)?,
            engine: decoded(engine)?,
        })
    }

    /// Reads an id written before names were encoded (raw names, so possibly
    /// several `:` after the id): the one cut of the names into two that
    /// `known` both accepts, as (global id, coordinator). `None` when no cut,
    /// or more than one, fits.
    pub(crate) fn parse_legacy<'a>(
        prefix: &str,
        gid: &'a str,
        known: impl Fn(&str) -> bool,
    ) -> Option<(&'a str, &'a str)> {
        let names = id_and_rest(prefix, gid)?;
        let mut cuts = names
            .match_indices(':')
            .map(|(i, _)| i)
            .filter(|&i| known(&names[..i]) && known(&names[i + 1..]));
        let cut = cuts.next()?;
        if cuts.next().is_some() {
            return None;
        }
        let start = gid.len() - names.len();
        Some((&gid[..start + cut], &names[..cut]))
    }

    /// Length of the id between engines `a` and `b` (either coordinating).
    pub(crate) fn gid_len(prefix: &str, a: &str, b: &str) -> usize {
        prefix.len() + 1 + ID_LEN + 1 + encode_name(a).len() + 1 + encode_name(b).len()
    }

    /// Fails with [`Error::Config`] if two of `names` would make an id
    /// longer than PostgreSQL accepts: better at build time than at the
    /// first PREPARE TRANSACTION, after the work is done.
    pub(crate) fn check_fits<'a>(
        prefix: &str,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<()> {
        let mut by_length: Vec<&str> = names.into_iter().collect();
        by_length.sort_by_key(|n| std::cmp::Reverse(encode_name(n).len()));
        let [a, b, ..] = by_length[..] else {
            return Ok(()); // one engine never commits in two phases
        };
        let len = gid_len(prefix, a, b);
        if len <= MAX_GID_BYTES {
            return Ok(());
        }
        Err(Error::Config(format!(
            "engines `{a}` and `{b}`: a two-phase commit between them needs a transaction id of \
             {len} bytes (prefix `{prefix}`, {ID_LEN}-byte id, the names percent-encoded to {} and {} bytes), \
             and PostgreSQL allows at most {MAX_GID_BYTES}; shorten the names (or the prefix) by {} bytes",
            encode_name(a).len(),
            encode_name(b).len(),
            len - MAX_GID_BYTES
        )))
    }
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

#[cfg(test)]
mod tests {
    use super::gid::*;

    const HOSTILE: &[&str] = &[
        "shop:orders",
        "a::b:",
        ":",
        "100%",
        "%41",
        "%",
        "with space",
        "it's \"quoted\"",
        "back\\slash",
        "a,b",
        "заказы",
        "日本",
        "tab\tnew\nline",
        "emoji 🦀",
        "",
    ];

    #[test]
    fn names_round_trip_and_encode_to_plain_ascii_without_separators() {
        for name in HOSTILE {
            let encoded = encode_name(name);
            assert!(
                encoded
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-%".contains(&b)),
                "{name:?} -> {encoded}"
            );
            assert_eq!(decode_name(&encoded).as_deref(), Some(*name), "{encoded}");
        }
        assert_eq!(encode_name("shop:orders"), "shop%3Aorders");
        assert_eq!(
            encode_name("заказы"),
            "%D0%B7%D0%B0%D0%BA%D0%B0%D0%B7%D1%8B"
        );
    }

    #[test]
    fn plain_names_encode_to_themselves_so_old_ids_still_read() {
        for name in ["writer", "logger", "audit", "db_2", "eu-west-1", "A9"] {
            assert_eq!(encode_name(name), name);
        }
        let old = "pgassist:00ff:writer:logger";
        let parsed = parse("pgassist", old).unwrap();
        assert_eq!(parsed.global, "pgassist:00ff:writer");
        assert_eq!(
            (&*parsed.coordinator, &*parsed.engine),
            ("writer", "logger")
        );
    }

    #[test]
    fn only_canonical_encodings_decode() {
        for piece in [
            "%3a", "%zz", "%", "%4", "a b", "a:b", "%41", "%2D", "%FF", "%C3", "a'b", "é",
        ] {
            assert_eq!(decode_name(piece), None, "{piece}");
        }
        assert_eq!(decode_name("%3A").as_deref(), Some(":"));
        assert_eq!(decode_name("%25").as_deref(), Some("%"));
        assert_eq!(decode_name("").as_deref(), Some(""));
    }

    #[test]
    fn ids_parse_back_exactly_whatever_the_names() {
        for coordinator in HOSTILE.iter().filter(|n| !n.is_empty()) {
            for engine in HOSTILE.iter().filter(|n| !n.is_empty()) {
                let global = global_id("pgassist", "0123abcd", coordinator);
                let id = gid(&global, engine);
                assert_eq!(id.matches(':').count(), 3, "{id}");
                let parsed = parse("pgassist", &id).unwrap();
                assert_eq!(parsed.global, global);
                assert_eq!(parsed.coordinator, *coordinator);
                assert_eq!(parsed.engine, *engine);
                assert_eq!(parse("pgassist2", &id), None);
                assert_eq!(parse("pgassis", &id), None);
            }
        }
    }

    #[test]
    fn malformed_ids_do_not_parse() {
        for id in [
            "pgassist",
            "pgassist:",
            "pgassist:broken",
            "pgassist:00ff:writer",
            "pgassist:00ff:writer:",
            "pgassist:00ff::logger",
            "pgassist::writer:logger",
            "pgassist:xyz:writer:logger",
            "pgassist:00ff:shop:orders:shop:ledger",
            "pgassist:00ff:a%3ab:logger",
            "pgassist:00ff:a b:logger",
            "pgassistx:00ff:writer:logger",
            "other:00ff:writer:logger",
        ] {
            assert_eq!(parse("pgassist", id), None, "{id}");
        }
    }

    #[test]
    fn legacy_ids_read_only_when_one_cut_matches_known_names() {
        let known =
            |n: &str| ["shop:orders", "shop:ledger", "writer", "a", "a:b", "b"].contains(&n);
        assert_eq!(
            parse_legacy("pgassist", "pgassist:00ff:shop:orders:shop:ledger", known),
            Some(("pgassist:00ff:shop:orders", "shop:orders"))
        );
        assert_eq!(
            parse_legacy("pgassist", "pgassist:00ff:writer:shop:ledger", known),
            Some(("pgassist:00ff:writer", "writer"))
        );
        // Cuts `a` + `b:b` and `a:b` + `b`: only the second names two engines.
        assert_eq!(
            parse_legacy("pgassist", "pgassist:00ff:a:b:b", known),
            Some(("pgassist:00ff:a:b", "a:b"))
        );
        // Cuts `a` + `a:b` and `a:a` + `b`: only the first names two engines.
        assert_eq!(
            parse_legacy("pgassist", "pgassist:00ff:a:a:b", known),
            Some(("pgassist:00ff:a", "a"))
        );
        let ambiguous = |n: &str| ["a", "a:b", "b:c", "c"].contains(&n);
        assert_eq!(
            parse_legacy("pgassist", "pgassist:00ff:a:b:c", ambiguous),
            None
        );
        assert_eq!(
            parse_legacy("pgassist", "pgassist:00ff:nope:writer", known),
            None
        );
        assert_eq!(
            parse_legacy("pgassist", "pgassist:zz:writer:writer", known),
            None
        );
    }

    #[test]
    fn the_longest_allowed_names_fit_and_one_byte_more_does_not() {
        // prefix 8 + ':' + 32 + ':' + 1 + ':' + n <= 199  =>  n <= 155
        let room = MAX_GID_BYTES - "pgassist".len() - 1 - ID_LEN - 1 - 1 - 1;
        assert_eq!(room, 155);
        let longest = "x".repeat(room);
        assert_eq!(gid_len("pgassist", "w", &longest), MAX_GID_BYTES);
        check_fits("pgassist", ["w", &longest, "v"]).unwrap();
        let over = "x".repeat(room + 1);
        let err = check_fits("pgassist", ["w", &over, "v"]).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, crate::Error::Config(_)), "{err:?}");
        assert!(message.contains(&format!("`{over}`")), "{message}");
        assert!(
            message.contains("200 bytes") || message.contains("199"),
            "{message}"
        );
        // Encoded length counts: each `é` is six bytes once encoded.
        let accented = format!("{}{}", "é".repeat(25), "x".repeat(room - 150));
        assert_eq!(encode_name(&accented).len(), room);
        check_fits("pgassist", ["w", &accented]).unwrap();
        check_fits("pgassist", ["w", &format!("{accented}é")]).unwrap_err();
        // One engine never needs an id; an empty registry neither.
        check_fits("pgassist", [&*"x".repeat(1000)]).unwrap();
        check_fits("pgassist", []).unwrap();
    }
}
