//! Which SQL is transaction control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT,
//! …), and refusing it where pgassist must be the one to send it.
//!
//! In autocommit such a statement would leave a pooled connection inside a
//! transaction without pgassist knowing; inside a transaction it would end
//! or reshape the transaction behind its back. A statement run with
//! parameters (extended protocol) is always a single statement, so only its
//! first keyword is looked at, cheaply, on every statement. A batch (simple
//! protocol) may hold many, so every statement of it is looked at, split
//! the way the server splits it: semicolons inside quotes, dollar quotes,
//! comments or a `BEGIN ATOMIC … END` body do not end a statement.

use crate::error::{Error, Result};

/// Refuses `sql` if its (first) statement is transaction control.
#[inline]
pub(crate) fn reject_transaction_control(sql: &str) -> Result<()> {
    if surely_not_control(sql) {
        return Ok(());
    }
    match control_keyword(sql) {
        Some(word) => Err(refusal(word)),
        None => Ok(()),
    }
}

/// Refuses `batch` if any of its statements is transaction control.
pub(crate) fn reject_control_in_batch(batch: &str) -> Result<()> {
    match statements(batch).find_map(control_keyword) {
        Some(word) => Err(refusal(word)),
        None => Ok(()),
    }
}

fn refusal(word: &str) -> Error {
    Error::Usage(format!(
        "`{word}` is a transaction control statement; in autocommit use session.begin() and the transaction's commit()/rollback()"
    ))
}

/// The control keyword `sql` starts with, if it starts with one.
fn control_keyword(sql: &str) -> Option<&str> {
    let word = first_keyword(sql);
    // By length first: the common statements (SELECT, INSERT, UPDATE, WITH…)
    // are out after one comparison at most.
    let is = |k: &str| word.eq_ignore_ascii_case(k);
    let is_control = match word.len() {
        3 => is("END"),
        5 => is("BEGIN") || is("START") || is("ABORT"),
        6 => is("COMMIT"),
        7 => {
            is("RELEASE")
                || (is("PREPARE") && {
                    // `word` borrows from `sql`: what follows it.
                    let after = word.as_ptr() as usize - sql.as_ptr() as usize + word.len();
                    first_keyword(&sql[after..]).eq_ignore_ascii_case("TRANSACTION")
                })
        }
        8 => is("ROLLBACK"),
        9 => is("SAVEPOINT"),
        _ => false,
    };
    is_control.then_some(word)
}

/// Decides most statements from their first two bytes: every control
/// keyword starts with a, b, c, e, p, r or s, and `SELECT` / `SET` (the
/// common statements among those) start with "se". Anything else — white
/// space, a comment — goes to the full check.
fn surely_not_control(sql: &str) -> bool {
    match sql.as_bytes() {
        [first, second, ..] => match first.to_ascii_lowercase() {
            b'a' | b'b' | b'c' | b'e' | b'p' | b'r' => false,
            b's' => second.eq_ignore_ascii_case(&b'e'),
            other => other.is_ascii_lowercase(),
        },
        _ => false,
    }
}

/// The first keyword of `sql`, after white space and comments (bytes only:
/// it runs on every statement).
pub(crate) fn first_keyword(sql: &str) -> &str {
    let b = sql.as_bytes();
    let mut i = 0;
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        match b.get(i..i + 2) {
            Some(b"--") | Some(b"/*") => i = skip_comment(b, i),
            _ => break,
        }
    }
    let start = i;
    while i < b.len() && b[i].is_ascii_alphabetic() {
        i += 1;
    }
    &sql[start..i]
}

/// The statements of a batch, split at the semicolons the server splits at.
fn statements(batch: &str) -> impl Iterator<Item = &str> {
    let mut rest = batch;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = statement_end(rest.as_bytes());
        let statement = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or("");
        Some(statement)
    })
}

/// The offset of the semicolon ending the first statement of `b` (or its
/// length). Follows PostgreSQL's lexer where it matters for splitting:
/// '…' strings ('' inside; backslash escapes in E'…'), "…" identifiers,
/// $tag$…$tag$ bodies, -- and nested /* */ comments, and `BEGIN ATOMIC`
/// bodies, whose semicolons belong to the CREATE statement until the
/// matching END.
fn statement_end(b: &[u8]) -> usize {
    let mut i = 0;
    // Inside `BEGIN ATOMIC`: BEGIN / CASE … END nesting depth.
    let mut depth = 0u32;
    let mut previous_word: &[u8] = b"";
    while i < b.len() {
        let c = b[i];
        match c {
            b';' if depth == 0 => return i,
            b'\'' => {
                let escapes =
                    i > 0 && b[i - 1].eq_ignore_ascii_case(&b'e') && !(i > 1 && is_ident(b[i - 2]));
                i = skip_quoted(b, i, b'\'', escapes);
                continue;
            }
            b'"' => {
                i = skip_quoted(b, i, b'"', false);
                continue;
            }
            b'-' | b'/' if matches!(b.get(i..i + 2), Some(b"--") | Some(b"/*")) => {
                i = skip_comment(b, i);
                continue;
            }
            b'$' if i == 0 || !is_ident(b[i - 1]) => {
                if let Some(end) = skip_dollar_quoted(b, i) {
                    i = end;
                    continue;
                }
            }
            _ if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < b.len() && is_ident(b[i]) {
                    i += 1;
                }
                let word = &b[start..i];
                let is = |k: &[u8]| word.eq_ignore_ascii_case(k);
                if depth == 0 {
                    if is(b"ATOMIC") && previous_word.eq_ignore_ascii_case(b"BEGIN") {
                        depth = 1;
                    }
                } else if is(b"BEGIN") || is(b"CASE") {
                    depth += 1;
                } else if is(b"END") {
                    depth -= 1;
                }
                previous_word = word;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    b.len()
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// Past the quoted text starting at `b[start] == quote` (a doubled quote
/// stays inside; with `escapes`, so does a backslash-escaped character).
fn skip_quoted(b: &[u8], start: usize, quote: u8, escapes: bool) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        if escapes && b[i] == b'\\' {
            i += 2;
        } else if b[i] == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return i + 1;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

/// Past the comment starting at `b[start]` (`--` to the end of the line, or
/// a nested `/* */`).
fn skip_comment(b: &[u8], start: usize) -> usize {
    if b[start] == b'-' {
        return b[start..]
            .iter()
            .position(|&c| c == b'\n')
            .map_or(b.len(), |p| start + p + 1);
    }
    let mut depth = 0u32;
    let mut i = start;
    while i + 1 < b.len() {
        match &b[i..i + 2] {
            b"/*" => {
                depth += 1;
                i += 2;
            }
            b"*/" => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return i;
                }
            }
            _ => i += 1,
        }
    }
    b.len()
}

/// Past the `$tag$…$tag$` body starting at `b[start] == '$'`, or `None`
/// if no dollar quote starts there (`$1` is a parameter).
fn skip_dollar_quoted(b: &[u8], start: usize) -> Option<usize> {
    let tag_end = start
        + 1
        + b[start + 1..]
            .iter()
            .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80))?;
    if b[tag_end] != b'$' || b.get(start + 1).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    let tag = &b[start..=tag_end];
    let body = tag_end + 1;
    Some(
        b[body..]
            .windows(tag.len())
            .position(|w| w == tag)
            .map_or(b.len(), |p| body + p + tag.len()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_statements_are_refused() {
        for sql in [
            "BEGIN",
            "begin;",
            "  -- c\n START TRANSACTION",
            "/* x */ commit",
            "/* a /* nested */ comment */ ROLLBACK",
            "savepoint a",
            "Prepare Transaction 'x'",
            "/* c */ PREPARE  TRANSACTION 'x'",
            "END",
        ] {
            assert!(
                matches!(reject_transaction_control(sql), Err(Error::Usage(_))),
                "{sql}"
            );
            assert!(reject_control_in_batch(sql).is_err(), "{sql}");
        }
        for sql in [
            "SELECT 1",
            "DO $$ BEGIN PERFORM 1; END $$",
            "PREPARE q AS SELECT 1",
            "INSERT INTO begin_log VALUES (1)",
            "",
            "beginning",
            "select 1",
            "SET search_path = x",
            "UPDATE t SET a = 1",
            "with x as (select 1) select * from x",
        ] {
            assert!(reject_transaction_control(sql).is_ok(), "{sql}");
            assert!(reject_control_in_batch(sql).is_ok(), "{sql}");
        }
        // The two-byte shortcut never decides for a control statement.
        for sql in ["BEGIN", "start transaction", "Savepoint a", "end", "x"] {
            assert!(!surely_not_control(sql), "{sql}");
        }
    }

    #[test]
    fn every_statement_of_a_batch_is_checked() {
        for batch in [
            "SELECT 1; COMMIT",
            "SELECT 1;BEGIN",
            "INSERT INTO t VALUES (';'); ROLLBACK",
            "SELECT 'it''s; fine'; END",
            "SELECT E'a\\'; b'; commit",
            "SELECT \"odd;name\" FROM t; BEGIN",
            "DO $f$ BEGIN PERFORM 1; END $f$; COMMIT",
            "SELECT $1; BEGIN",
            "SELECT 1 -- ; not here\n; savepoint s",
            "SELECT 1 /* ; /* ; */ ; */; release s",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END; COMMIT",
        ] {
            assert!(reject_control_in_batch(batch).is_err(), "{batch}");
        }
        for batch in [
            "SELECT 1; SELECT 2;",
            "CREATE TABLE t (a int); INSERT INTO t VALUES (1)",
            "DO $$ BEGIN PERFORM 1; END $$; SELECT 1",
            "DO $body$ BEGIN COMMIT; END $body$",
            "SELECT 'x; COMMIT'",
            "SELECT E'\\'; COMMIT'",
            "SELECT \"a;\"\"b\" FROM t",
            "SELECT 1 -- ; COMMIT",
            "SELECT 1 /* ; COMMIT */",
            "SELECT a$b FROM t; SELECT 2",
            "CREATE FUNCTION f(x int) RETURNS int LANGUAGE sql \
             BEGIN ATOMIC SELECT CASE WHEN x > 0 THEN 1 ELSE 0 END; SELECT 2; END; SELECT 3",
            ";;",
        ] {
            assert!(reject_control_in_batch(batch).is_ok(), "{batch}");
        }
    }

    #[test]
    fn splitting_never_panics_on_odd_input() {
        for batch in [
            "'",
            "\"",
            "$",
            "$a",
            "$a$",
            "$a$ b",
            "/*",
            "/* /*",
            "--",
            "E'\\",
            "e'",
            "é;ü$x$;",
            "BEGIN ATOMIC",
            "END END END;",
        ] {
            let _ = reject_control_in_batch(batch);
            let _ = reject_transaction_control(batch);
        }
    }
}
