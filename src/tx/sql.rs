//! The SQL of every transaction step, as pure functions (sqlx's
//! `begin/commit/rollback_ansi_transaction_sql(depth)` is the model), so
//! what goes on the wire is unit-tested without a server.

/// A savepoint's name: numbered per transaction, never reused within it.
pub(crate) fn savepoint_name(number: u32) -> String {
    format!("pgassist_sp_{number}")
}

/// Opens savepoint `number`; with `begin` (BEGIN not sent yet), the BEGIN
/// goes in the same round trip first.
pub(crate) fn savepoint(begin: Option<&str>, number: u32) -> String {
    match begin {
        Some(begin) => format!("{begin}; SAVEPOINT {}", savepoint_name(number)),
        None => format!("SAVEPOINT {}", savepoint_name(number)),
    }
}

/// Releases (commits into its parent) savepoint `number`.
pub(crate) fn release(number: u32) -> String {
    format!("RELEASE SAVEPOINT {}", savepoint_name(number))
}

/// Undoes savepoint `number` and removes it, in one round trip.
pub(crate) fn rollback_to(number: u32) -> String {
    let sp = savepoint_name(number);
    format!("ROLLBACK TO SAVEPOINT {sp}; RELEASE SAVEPOINT {sp}")
}

/// Ends the outermost transaction with a rollback.
pub(crate) const ROLLBACK: &str = "ROLLBACK";

/// The COMMIT of an outermost transaction.
///
/// `probe`: a statement's future was cut off, so the server may have aborted
/// the transaction without our knowing; `SELECT 1` fails in an aborted
/// transaction and the COMMIT behind it is then skipped, so a COMMIT the
/// server turned into a ROLLBACK is never reported as a success.
/// `lsn`: read the WAL insert position in the same round trip (it covers
/// this commit's record), for read-your-writes on replicas.
pub(crate) fn commit(probe: bool, lsn: bool) -> &'static str {
    match (probe, lsn) {
        (false, false) => "COMMIT",
        (true, false) => "SELECT 1; COMMIT",
        (false, true) => "COMMIT; SELECT pg_current_wal_insert_lsn()::text",
        (true, true) => "SELECT 1; COMMIT; SELECT pg_current_wal_insert_lsn()::text",
    }
}

/// PREPARE TRANSACTION behind a probe (the server answers a PREPARE of an
/// aborted transaction with a ROLLBACK, not an error), confirmed through
/// `pg_prepared_xacts` in the same round trip.
pub(crate) fn prepare(gid: &str) -> String {
    let gid = quote_literal(gid);
    format!(
        "SELECT 1; PREPARE TRANSACTION {gid}; SELECT count(*) FROM pg_prepared_xacts WHERE gid = {gid}"
    )
}

/// `text` as a SQL string literal (standard_conforming_strings on, which
/// every supported server defaults to; an `E''` literal is never produced).
pub(crate) fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Asks the server whether the connection is inside a transaction block,
/// sent pipelined right behind a batch (no extra round trip). In autocommit
/// the probe's own implicit transaction starts with the probe, so
/// `now()` (the transaction's start) equals `statement_timestamp()`; inside
/// a block begun by an earlier message it is earlier. In an aborted block
/// the probe fails (25P02), which also says "in a block".
pub const STATUS_PROBE: &str = "SELECT pg_catalog.now() <> pg_catalog.statement_timestamp()";

/// What [`STATUS_PROBE`] answered: `Some(true)` inside a transaction block,
/// `Some(false)` in autocommit, `None` if the answer has no row.
pub(crate) fn probe_says_in_block(messages: &[tokio_postgres::SimpleQueryMessage]) -> Option<bool> {
    messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(|v| v == "t"),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_step_sends_what_it_says() {
        assert_eq!(savepoint(None, 3), "SAVEPOINT pgassist_sp_3");
        assert_eq!(
            savepoint(Some("BEGIN ISOLATION LEVEL SERIALIZABLE"), 1),
            "BEGIN ISOLATION LEVEL SERIALIZABLE; SAVEPOINT pgassist_sp_1"
        );
        assert_eq!(release(2), "RELEASE SAVEPOINT pgassist_sp_2");
        assert_eq!(
            rollback_to(2),
            "ROLLBACK TO SAVEPOINT pgassist_sp_2; RELEASE SAVEPOINT pgassist_sp_2"
        );
        assert_eq!(commit(false, false), "COMMIT");
        assert!(commit(true, false).starts_with("SELECT 1; COMMIT"));
        assert!(commit(true, true).ends_with("pg_current_wal_insert_lsn()::text"));
        assert!(commit(false, true).starts_with("COMMIT;"));
        assert_eq!(
            prepare("a'b"),
            "SELECT 1; PREPARE TRANSACTION 'a''b'; SELECT count(*) FROM pg_prepared_xacts WHERE gid = 'a''b'"
        );
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
