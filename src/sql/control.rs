//! Which SQL is transaction control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT,
//! …), and refusing it where pgassist must be the one to send it.
//!
//! In autocommit such a statement would leave a pooled connection inside a
//! transaction without pgassist knowing; inside a transaction it would end
//! or reshape the transaction behind its back.
//!
//! A statement run with parameters (extended protocol) is parsed by the
//! server as exactly one statement, after dropping empty ones: `;BEGIN` and
//! `/* x */ ; ; begin` are a BEGIN. So its first key word after white space,
//! comments and semicolons is looked at — cheaply, on every statement, and
//! no string can come before it, so nothing there is ambiguous.
//!
//! A batch (simple protocol) may hold many statements, so every statement
//! is looked at, split the way the server's grammar splits it: by a small
//! hand-written lexer that follows PostgreSQL's (`scan.l`) for everything
//! that can hide or reveal a semicolon — '…' strings and their
//! continuations over newlines, E'…' / B'…' / X'…' / N'…' / U&'…' strings,
//! "…" and U&"…" identifiers, $tag$…$tag$ strings, `--` comments (ended by
//! `\n` or `\r`) and nested `/* */` comments — and a `BEGIN ATOMIC … END`
//! body, whose semicolons belong to its CREATE FUNCTION / PROCEDURE
//! statement.
//!
//! Where the text alone cannot say how the server will read it, both
//! readings are checked and the batch is refused if either finds control:
//! - `standard_conforming_strings`: a backslash in a plain '…' string is an
//!   escape when the setting is off (per session, invisible to us). A batch
//!   holding a backslash is lexed both ways.
//! - client encodings such as SJIS or BIG5 (never set by pgassist, but a
//!   statement can `SET client_encoding`): there a backslash right after a
//!   non-ASCII byte can be the second half of one character, not an escape.
//!   A string with backslash escapes holding such a backslash before a quote
//!   or a backslash is refused outright.
//!
//! Every misreading left goes the safe way: a `BEGIN ATOMIC` body is only
//! opened where the grammar can have one (at parenthesis depth 0 of a
//! statement starting `CREATE [OR REPLACE] FUNCTION|PROCEDURE`, BEGIN and
//! ATOMIC adjacent), and closed at the first END that starts a statement
//! inside it (the grammar allows no other: BEGIN / END statements exist
//! only at top level); a nested body closes ours early, so the rest is
//! checked as top-level statements — refused, never let through.

use crate::error::{Error, Result};

/// Refuses `sql` if it is a transaction control statement (the extended
/// protocol runs exactly one statement, empty ones dropped).
#[inline]
pub(crate) fn reject_transaction_control(sql: &str) -> Result<()> {
    if surely_not_control(sql) {
        return Ok(());
    }
    match leading_control(Lexer::new(sql, false)) {
        Some(keyword) => Err(refusal(keyword, Reading::AsWritten)),
        None => Ok(()),
    }
}

/// Refuses `batch` if any of its statements is transaction control, under
/// any reading the server might give it.
pub(crate) fn reject_control_in_batch(batch: &str) -> Result<()> {
    let standard = scan_batch(batch, false);
    if let Some(keyword) = standard.control {
        return Err(refusal(keyword, Reading::AsWritten));
    }
    if !batch.as_bytes().contains(&b'\\') {
        // Without a backslash both readings are the same.
        return Ok(());
    }
    let escaped = scan_batch(batch, true);
    if let Some(keyword) = escaped.control {
        return Err(refusal(keyword, Reading::BackslashEscapes));
    }
    if standard.encoding_doubt || escaped.encoding_doubt {
        return Err(Error::Usage(
            "a backslash right after a non-ASCII character, before a quote or a backslash, in a \
             string with backslash escapes: under some client encodings (SJIS, BIG5, GBK…) it is \
             part of the character, not an escape, and the batch would split differently; \
             pgassist refuses it rather than guess — pass the value as a parameter"
                .into(),
        ));
    }
    Ok(())
}

/// What a statement may do to the session, beyond its transaction (see
/// `docs/session-state.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SessionEffect {
    /// Nothing the text shows.
    None,
    /// It may change session state where the text cannot tell for sure: a
    /// call of `set_config`, a session-level advisory lock function, a name
    /// in `pg_temp`, a `DO` block. It runs, and its connection is reset
    /// before anyone else gets it.
    Maybe,
    /// A statement that changes session state (`SET`, `CREATE TEMP …`,
    /// `LISTEN`, …), named: refused in autocommit, flagged for a reset in a
    /// transaction or on a pinned connection.
    Statement(&'static str),
}

impl SessionEffect {
    /// The stronger of two effects (a named statement over a maybe).
    fn or(self, other: SessionEffect) -> SessionEffect {
        match (self, other) {
            (SessionEffect::Statement(_), _) => self,
            (_, SessionEffect::Statement(_)) | (_, SessionEffect::Maybe) => other,
            _ => self,
        }
    }
}

/// What one statement (extended protocol) may do to the session.
#[inline]
pub(crate) fn session_effect(sql: &str) -> SessionEffect {
    let maybe = mentions_session_functions(sql);
    if !maybe.1 && surely_no_session_statement(sql) {
        return maybe.0;
    }
    maybe.0.or(scan_session(Lexer::new(sql, false)))
}

/// What a batch (simple protocol) may do to the session: every statement,
/// under both readings of a backslash (see [`reject_control_in_batch`]).
pub(crate) fn session_effect_in_batch(batch: &str) -> SessionEffect {
    let mut effect = mentions_session_functions(batch)
        .0
        .or(scan_session(Lexer::new(batch, false)));
    if batch.as_bytes().contains(&b'\\') {
        effect = effect.or(scan_session(Lexer::new(batch, true)));
    }
    effect
}

/// Refuses a statement that changes session state, for autocommit; `true`
/// if the statement may change it unseen (its connection must be reset).
#[inline]
pub(crate) fn check_autocommit_session(sql: &str) -> Result<bool> {
    autocommit(session_effect(sql))
}

/// Both checks of one autocommit statement — [`reject_transaction_control`]
/// and [`check_autocommit_session`] — with the texts that passed both
/// remembered per thread: a service runs the same few statements over and
/// over, and comparing a text with a remembered one costs a tenth of
/// scanning it (W1 client cost, callgrind). Texts are compared in full, so
/// a remembered verdict is only ever reused for the very same text.
pub(crate) fn check_autocommit(sql: &str) -> Result<bool> {
    if PLAIN.with(|memo| memo.borrow().holds(sql)) {
        return Ok(false);
    }
    reject_transaction_control(sql)?;
    let flagged = check_autocommit_session(sql)?;
    if !flagged {
        PLAIN.with(|memo| memo.borrow_mut().remember(sql));
    }
    Ok(flagged)
}

/// How many plain texts a thread remembers, and how long each may be.
const MEMO_SLOTS: usize = 4;
const MEMO_BYTES: usize = 120;

/// Autocommit statements found plain (neither transaction control nor
/// session state) on this thread, in fixed buffers: remembering allocates
/// nothing, and a miss costs a length comparison per slot.
struct PlainMemo {
    texts: [[u8; MEMO_BYTES]; MEMO_SLOTS],
    /// Each slot's length; 0 is empty (an empty text is not remembered).
    lens: [u8; MEMO_SLOTS],
    /// The slot the next text replaces.
    next: u8,
}

impl PlainMemo {
    const fn new() -> PlainMemo {
        PlainMemo {
            texts: [[0; MEMO_BYTES]; MEMO_SLOTS],
            lens: [0; MEMO_SLOTS],
            next: 0,
        }
    }

    #[inline]
    fn holds(&self, sql: &str) -> bool {
        let b = sql.as_bytes();
        (0..MEMO_SLOTS).any(|i| {
            let len = self.lens[i] as usize;
            len == b.len() && len != 0 && self.texts[i][..len] == *b
        })
    }

    fn remember(&mut self, sql: &str) {
        let b = sql.as_bytes();
        if b.is_empty() || b.len() > MEMO_BYTES {
            return;
        }
        let i = self.next as usize % MEMO_SLOTS;
        self.texts[i][..b.len()].copy_from_slice(b);
        self.lens[i] = b.len() as u8;
        self.next = self.next.wrapping_add(1);
    }
}

thread_local! {
    static PLAIN: std::cell::RefCell<PlainMemo> = const { std::cell::RefCell::new(PlainMemo::new()) };
}

/// [`check_autocommit_session`] for a batch, statement by statement.
pub(crate) fn check_autocommit_session_in_batch(batch: &str) -> Result<bool> {
    autocommit(session_effect_in_batch(batch))
}

fn autocommit(effect: SessionEffect) -> Result<bool> {
    match effect {
        SessionEffect::None => Ok(false),
        SessionEffect::Maybe => Ok(true),
        SessionEffect::Statement(what) => Err(Error::Usage(format!(
            "`{what}` changes session state, which would outlive this autocommit statement on a \
             pooled connection and reach its next user; instead use `SET LOCAL` (or \
             set_config(…, true)) inside session.begin(), a pinned connection (session.pin()) for \
             session-scoped work, or the engine's connect-time settings \
             (EngineConfig::setting / after_connect) — see docs/session-state.md"
        ))),
    }
}

/// Whether `sql` names a function or schema that changes session state
/// (anywhere in the text, strings included, since a DO block or dynamic
/// SQL hides calls in strings): `(Maybe, true)` if so, and in the second
/// place whether the text holds `temp` (for `SELECT … INTO TEMP`). A
/// Unicode-escaped identifier or string (`U&"set\005fconfig"`, `U&'…'`)
/// can spell a needle without its letters, so any `U&` followed by a
/// quote is a maybe too.
fn mentions_session_functions(sql: &str) -> (SessionEffect, bool) {
    const NEEDLES: [&[u8]; 3] = [b"advisory_lock", b"set_config", b"pg_temp"];
    let b = sql.as_bytes();
    let at = |i: usize, needle: &[u8]| {
        b.get(i..i + needle.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(needle))
    };
    let mut temp = false;
    let mut found = SessionEffect::None;
    let mut check = |i: usize| match b[i] {
        // Each needle holds one underscore at a known place.
        b'_' if (i >= 8 && at(i - 8, NEEDLES[0]))
            || (i >= 3 && at(i - 3, NEEDLES[1]))
            || (i >= 2 && at(i - 2, NEEDLES[2])) =>
        {
            found = SessionEffect::Maybe;
        }
        b'p' | b'P' if i >= 3 && at(i - 3, b"temp") => temp = true,
        b'&' if i >= 1
            && b[i - 1].eq_ignore_ascii_case(&b'u')
            && matches!(b.get(i + 1), Some(b'"' | b'\'')) =>
        {
            found = SessionEffect::Maybe;
        }
        _ => {}
    };
    // This runs on every autocommit statement: eight bytes at a time, and
    // only the words holding a `_`, a `p` (rare in SQL; the last letter of
    // `temp`) or a `&` are looked at byte by byte.
    let mut chunks = b.chunks_exact(8);
    for (n, chunk) in chunks.by_ref().enumerate() {
        let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        // Lower-cased, `_` (0x5F) reads as 0x7F and `P` as `p`.
        let lowered = word | 0x2020_2020_2020_2020;
        let mut hits =
            bytes_equal(lowered, 0x7F) | bytes_equal(lowered, b'p') | bytes_equal(lowered, b'&');
        while hits != 0 {
            check(n * 8 + hits.trailing_zeros() as usize / 8);
            hits &= hits - 1;
        }
    }
    let tail = b.len() - chunks.remainder().len();
    (tail..b.len()).for_each(&mut check);
    (found, temp)
}

/// The high bit of every byte of `word` that equals `byte`, and of no
/// other (exact: no carry crosses bytes, as the `0x7F` masking keeps each
/// byte's sum below 0x100).
#[inline(always)]
fn bytes_equal(word: u64, byte: u8) -> u64 {
    const LOWS: u64 = 0x7F7F_7F7F_7F7F_7F7F;
    let x = word ^ (0x0101_0101_0101_0101 * u64::from(byte));
    !(((x & LOWS) + LOWS) | x | LOWS)
}

/// Decides most statements from their first bytes: every session-state
/// statement starts with c, d, l, p, r, s (but not `sel`) or u; `SELECT …
/// INTO TEMP` is caught by the `temp` test of
/// [`mentions_session_functions`]. Anything else — white space, a comment,
/// a parenthesis — goes to the full check.
#[inline]
fn surely_no_session_statement(sql: &str) -> bool {
    let b = sql.as_bytes();
    match b.first().map(u8::to_ascii_lowercase) {
        Some(b's') => b.get(1..3).is_some_and(|w| w.eq_ignore_ascii_case(b"el")),
        // UPDATE and DELETE (the common ones among these letters) are out
        // at once; UNLISTEN, DECLARE, DEALLOCATE, DISCARD, DO go on.
        Some(b'u') => !b.get(1).is_some_and(|c| c.eq_ignore_ascii_case(&b'n')),
        Some(b'd') => b.get(1..3).is_some_and(|w| w.eq_ignore_ascii_case(b"el")),
        Some(b'c' | b'l' | b'p' | b'r') => false,
        Some(c) => c.is_ascii_lowercase(),
        None => true,
    }
}

/// The strongest session effect of the statements `tokens` hold.
fn scan_session(mut tokens: Lexer<'_>) -> SessionEffect {
    let mut effect = SessionEffect::None;
    // The current statement's first words (lower-cased comparisons) and
    // what has been seen in it.
    let mut position = 0usize;
    let mut first = Lead::Other;
    let mut prev_word: Option<Token> = None;
    let mut into_temp = false;
    // After INTO, still among [LOCAL | GLOBAL] where TEMP may come.
    let mut after_into = false;
    // Still among CREATE [OR REPLACE] [GLOBAL | LOCAL], where TEMP may come.
    let mut create_prefix = false;
    while let Some(t) = tokens.next() {
        if t.kind == Kind::Semicolon {
            position = 0;
            first = Lead::Other;
            prev_word = None;
            into_temp = false;
            after_into = false;
            create_prefix = false;
            continue;
        }
        let word = (t.kind == Kind::Word).then(|| tokens.text(t));
        let is = |k: &str| word.is_some_and(|w| w.eq_ignore_ascii_case(k));
        let prev_is = |k: &str| prev_word.is_some_and(|p| tokens.text(p).eq_ignore_ascii_case(k));
        let found = if position == 0 {
            first = Lead::of(word.unwrap_or(""));
            create_prefix = first == Lead::Create;
            match first {
                Lead::Reset => Some("RESET"),
                Lead::Deallocate => Some("DEALLOCATE"),
                Lead::Listen => Some("LISTEN"),
                Lead::Unlisten => Some("UNLISTEN"),
                Lead::Load => Some("LOAD"),
                Lead::Discard => Some("DISCARD"),
                Lead::Do => {
                    effect = effect.or(SessionEffect::Maybe);
                    None
                }
                _ => None,
            }
        } else {
            match first {
                Lead::Set if position == 1 => {
                    (!(is("LOCAL") || is("TRANSACTION") || is("CONSTRAINTS"))).then_some("SET")
                }
                Lead::Prepare if position == 1 => (!is("TRANSACTION")).then_some("PREPARE"),
                // CREATE [OR REPLACE] [GLOBAL | LOCAL] TEMP | TEMPORARY …
                Lead::Create if create_prefix && (is("TEMP") || is("TEMPORARY")) => {
                    Some("CREATE TEMP")
                }
                Lead::Create => {
                    create_prefix &= is("OR") || is("REPLACE") || is("GLOBAL") || is("LOCAL");
                    None
                }
                Lead::Declare if is("HOLD") && prev_is("WITH") => Some("DECLARE … WITH HOLD"),
                Lead::Select if into_temp => {
                    into_temp = false;
                    // INTO TEMP [TABLE] name: not `INTO temp FROM` (a table named temp).
                    (word.is_some_and(|w| !w.eq_ignore_ascii_case("FROM")) || t.kind == Kind::Other)
                        .then_some("SELECT … INTO TEMP")
                }
                // INTO [LOCAL | GLOBAL] TEMP | TEMPORARY …
                Lead::Select => {
                    into_temp = (is("TEMP") || is("TEMPORARY")) && after_into;
                    after_into = is("INTO") || (after_into && (is("LOCAL") || is("GLOBAL")));
                    None
                }
                _ => None,
            }
        };
        if let Some(what) = found {
            return SessionEffect::Statement(what);
        }
        if word.is_some() {
            prev_word = Some(t);
        } else {
            prev_word = None;
        }
        position += 1;
    }
    effect
}

/// Whether a statement of `batch` starts with `DEALLOCATE` or `DISCARD`,
/// which may drop the server-side prepared statements of the connection's
/// statement cache (`DEALLOCATE ALL`, `DISCARD ALL`, or `DEALLOCATE s1`
/// naming one of ours): the cache must then be cleared. A false positive
/// only costs re-preparing; under either reading of a backslash (see
/// [`reject_control_in_batch`]).
pub(crate) fn drops_prepared_statements(batch: &str) -> bool {
    let b = batch.as_bytes();
    let mentions = |needle: &[u8]| {
        b.windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
    };
    if !mentions(b"dealloc") && !mentions(b"discard") {
        return false;
    }
    let leads = |mut tokens: Lexer<'_>| {
        let mut at_start = true;
        while let Some(t) = tokens.next() {
            if t.kind == Kind::Semicolon {
                at_start = true;
                continue;
            }
            if at_start
                && t.kind == Kind::Word
                && matches!(Lead::of(tokens.text(t)), Lead::Deallocate | Lead::Discard)
            {
                return true;
            }
            at_start = false;
        }
        false
    };
    leads(Lexer::new(batch, false)) || (b.contains(&b'\\') && leads(Lexer::new(batch, true)))
}

/// The first word of a statement, as far as session state goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lead {
    Set,
    Reset,
    Create,
    Prepare,
    Deallocate,
    Listen,
    Unlisten,
    Declare,
    Load,
    Discard,
    Do,
    /// SELECT, WITH, `(`: may end `INTO TEMP name`.
    Select,
    Other,
}

impl Lead {
    fn of(word: &str) -> Lead {
        let is = |k: &str| word.eq_ignore_ascii_case(k);
        match word.len() {
            2 if is("DO") => Lead::Do,
            3 if is("SET") => Lead::Set,
            4 if is("LOAD") => Lead::Load,
            4 if is("WITH") => Lead::Select,
            5 if is("RESET") => Lead::Reset,
            6 if is("CREATE") => Lead::Create,
            6 if is("LISTEN") => Lead::Listen,
            6 if is("SELECT") => Lead::Select,
            7 if is("PREPARE") => Lead::Prepare,
            7 if is("DECLARE") => Lead::Declare,
            7 if is("DISCARD") => Lead::Discard,
            8 if is("UNLISTEN") => Lead::Unlisten,
            10 if is("DEALLOCATE") => Lead::Deallocate,
            _ => Lead::Other,
        }
    }
}

/// The first key word of `sql` after white space, comments and empty
/// statements ("" if it starts with something else): the operation name
/// for telemetry.
#[cfg(any(feature = "tracing", test))]
pub(crate) fn first_keyword(sql: &str) -> &str {
    let mut tokens = Lexer::new(sql, false);
    match tokens.find(|t| t.kind != Kind::Semicolon) {
        Some(t) if t.kind == Kind::Word => tokens.text(t),
        _ => "",
    }
}

/// How the server must read the text for the refused statement to be
/// transaction control.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reading {
    AsWritten,
    /// Only if backslashes in '…' strings are escapes.
    BackslashEscapes,
}

fn refusal(keyword: &str, reading: Reading) -> Error {
    let advice = "in autocommit use session.begin() and the transaction's commit()/rollback()";
    Error::Usage(match reading {
        Reading::AsWritten => {
            format!("`{keyword}` is a transaction control statement; {advice}")
        }
        Reading::BackslashEscapes => format!(
            "the batch holds a `{keyword}` transaction control statement if backslashes in '…' \
             strings are escapes (standard_conforming_strings = off, which pgassist cannot rule \
             out); write such strings as E'…', or pass values as parameters, so that it reads \
             the same either way; {advice}"
        ),
    })
}

/// Decides most statements from their first two bytes: every control
/// keyword starts with a, b, c, e, p, r or s, and `SELECT` / `SET` (the
/// common statements among those) start with "se". Anything else — white
/// space, a comment, a semicolon — goes to the full check.
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

/// The control statement `tokens` start with (after empty statements).
fn leading_control(mut tokens: Lexer<'_>) -> Option<&'static str> {
    let first = tokens.find(|t| t.kind != Kind::Semicolon)?;
    if first.kind != Kind::Word {
        return None;
    }
    match control_word(tokens.text(first))? {
        "PREPARE" => {
            let next = tokens.next()?;
            (next.kind == Kind::Word && tokens.text(next).eq_ignore_ascii_case("TRANSACTION"))
                .then_some("PREPARE TRANSACTION")
        }
        keyword => Some(keyword),
    }
}

/// The control key word `word` is (PREPARE: if TRANSACTION follows).
fn control_word(word: &str) -> Option<&'static str> {
    // By length first: most words are out after one comparison at most.
    let is = |k: &str| word.eq_ignore_ascii_case(k);
    let keyword = match word.len() {
        3 if is("END") => "END",
        5 if is("BEGIN") => "BEGIN",
        5 if is("START") => "START",
        5 if is("ABORT") => "ABORT",
        6 if is("COMMIT") => "COMMIT",
        7 if is("RELEASE") => "RELEASE",
        7 if is("PREPARE") => "PREPARE",
        8 if is("ROLLBACK") => "ROLLBACK",
        9 if is("SAVEPOINT") => "SAVEPOINT",
        _ => return None,
    };
    Some(keyword)
}

/// What one reading of a batch found.
struct Scan {
    /// The first transaction control statement.
    control: Option<&'static str>,
    /// A backslash escape whose meaning depends on the client encoding.
    encoding_doubt: bool,
}

/// Where a statement of a CREATE FUNCTION / PROCEDURE is, for its body.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Routine {
    /// After `CREATE`, `CREATE OR`, `CREATE OR REPLACE`.
    Create,
    CreateOr,
    CreateOrReplace,
    /// In a CREATE FUNCTION / PROCEDURE statement.
    Yes,
    No,
}

/// Reads `batch` statement by statement (`escapes`: backslashes escape in
/// '…' strings), stopping at the first control statement.
fn scan_batch(batch: &str, escapes: bool) -> Scan {
    let mut tokens = Lexer::new(batch, escapes);
    // Tokens of the current statement so far.
    let mut position = 0usize;
    let mut prepare = false;
    let mut routine = Routine::No;
    let mut depth = 0u32;
    // The previous token: BEGIN that may open a body; a dot.
    let mut after_begin = false;
    let mut after_dot = false;
    // Inside a BEGIN ATOMIC body; at the start of one of its statements.
    let mut body = false;
    let mut body_statement_start = false;
    let mut control = None;
    while let Some(t) = tokens.next() {
        if body {
            match t.kind {
                Kind::Semicolon => body_statement_start = true,
                Kind::Word
                    if body_statement_start && tokens.text(t).eq_ignore_ascii_case("END") =>
                {
                    body = false;
                    body_statement_start = false;
                }
                _ => body_statement_start = false,
            }
            continue;
        }
        if t.kind == Kind::Semicolon {
            position = 0;
            prepare = false;
            routine = Routine::No;
            depth = 0;
            after_begin = false;
            after_dot = false;
            continue;
        }
        let word = (t.kind == Kind::Word).then(|| tokens.text(t));
        let is = |k: &str| word.is_some_and(|w| w.eq_ignore_ascii_case(k));
        if position == 0 {
            if let Some(keyword) = word.and_then(control_word) {
                if keyword != "PREPARE" {
                    control = Some(keyword);
                    break;
                }
                prepare = true;
            }
            routine = if is("CREATE") {
                Routine::Create
            } else {
                Routine::No
            };
        } else {
            if position == 1 && prepare && is("TRANSACTION") {
                control = Some("PREPARE TRANSACTION");
                break;
            }
            let function = is("FUNCTION") || is("PROCEDURE");
            routine = match routine {
                Routine::Create if is("OR") => Routine::CreateOr,
                Routine::CreateOr if is("REPLACE") => Routine::CreateOrReplace,
                Routine::Create | Routine::CreateOrReplace if function => Routine::Yes,
                Routine::Yes => Routine::Yes,
                _ => Routine::No,
            };
        }
        position += 1;
        if routine == Routine::Yes {
            match t.kind {
                Kind::Open => depth += 1,
                Kind::Close => depth = depth.saturating_sub(1),
                _ => {}
            }
            if after_begin && is("ATOMIC") {
                body = true;
                body_statement_start = true;
            }
            after_begin = depth == 0 && !after_dot && is("BEGIN");
            after_dot = t.kind == Kind::Dot;
        }
    }
    Scan {
        control,
        encoding_doubt: tokens.encoding_doubt,
    }
}

/// What the splitter needs to know of a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// An unquoted identifier or key word.
    Word,
    Semicolon,
    /// `(`
    Open,
    /// `)`
    Close,
    /// `.`
    Dot,
    /// Anything else: literals, quoted identifiers, operators, parameters.
    Other,
}

#[derive(Clone, Copy, Debug)]
struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

/// PostgreSQL's tokens, as far as they matter for splitting (bytes only:
/// every boundary it cuts at is an ASCII byte, so slices stay `str`).
struct Lexer<'a> {
    sql: &'a str,
    at: usize,
    /// Backslash escapes in plain '…' strings (standard_conforming_strings
    /// off).
    escapes: bool,
    /// Seen an escape whose reading depends on the client encoding.
    encoding_doubt: bool,
}

/// How a quoted string reads its body.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Quoting {
    /// `''` is a quote; backslash is a plain character.
    Standard,
    /// `''` is a quote; backslash escapes the next character.
    Escapes,
    /// B'…' / X'…': the first quote ends it.
    Bits,
}

impl<'a> Lexer<'a> {
    fn new(sql: &'a str, escapes: bool) -> Self {
        Lexer {
            sql,
            at: 0,
            escapes,
            encoding_doubt: false,
        }
    }

    fn text(&self, t: Token) -> &'a str {
        &self.sql[t.start..t.end]
    }

    fn plain(&self) -> Quoting {
        if self.escapes {
            Quoting::Escapes
        } else {
            Quoting::Standard
        }
    }

    /// An identifier, or a string with a one-letter prefix (E'…', B'…',
    /// X'…', N'…', U&'…', U&"…"), starting at `start`.
    fn word_at(&mut self, start: usize) -> (Kind, usize) {
        let b = self.sql.as_bytes();
        let next = b.get(start + 1).copied();
        match (b[start].to_ascii_lowercase(), next) {
            (b'e', Some(b'\'')) => (Kind::Other, self.string(start + 1, Quoting::Escapes)),
            (b'b' | b'x', Some(b'\'')) => (Kind::Other, self.string(start + 1, Quoting::Bits)),
            (b'n', Some(b'\'')) => (Kind::Other, self.string(start + 1, self.plain())),
            (b'u', Some(b'&')) if b.get(start + 2) == Some(&b'\'') => {
                // Refused by the server when standard_conforming_strings
                // is off, so read the standard way only.
                (Kind::Other, self.string(start + 2, Quoting::Standard))
            }
            (b'u', Some(b'&')) if b.get(start + 2) == Some(&b'"') => {
                (Kind::Other, quoted_identifier_end(b, start + 2))
            }
            _ => {
                let len = b[start + 1..]
                    .iter()
                    .take_while(|&&c| is_ident_cont(c))
                    .count();
                (Kind::Word, start + 1 + len)
            }
        }
    }

    /// Past the string whose opening quote is at `open`, with the pieces
    /// it continues into (`'a'` newline `'b'` is one string, read the
    /// same way throughout).
    fn string(&mut self, open: usize, quoting: Quoting) -> usize {
        let b = self.sql.as_bytes();
        let mut i = open + 1;
        loop {
            // Find the closing quote.
            loop {
                match b.get(i) {
                    None => return b.len(),
                    Some(b'\\') if quoting == Quoting::Escapes => {
                        // After a non-ASCII byte, some client encodings take
                        // the backslash into the character: then a quote or
                        // backslash after it reads differently.
                        if i > 0 && b[i - 1] >= 0x80 && matches!(b.get(i + 1), Some(b'\'' | b'\\'))
                        {
                            self.encoding_doubt = true;
                        }
                        i += 2;
                    }
                    Some(b'\'') if quoting != Quoting::Bits && b.get(i + 1) == Some(&b'\'') => {
                        i += 2
                    }
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
            match continuation(b, i) {
                Some(quote) => i = quote + 1,
                None => return i,
            }
        }
    }
}

impl Iterator for Lexer<'_> {
    type Item = Token;

    fn next(&mut self) -> Option<Token> {
        let b = self.sql.as_bytes();
        let start = skip_blank(b, self.at);
        let &c = b.get(start)?;
        let (kind, end) = match c {
            b';' => (Kind::Semicolon, start + 1),
            b'(' => (Kind::Open, start + 1),
            b')' => (Kind::Close, start + 1),
            b'.' => (Kind::Dot, start + 1),
            b'\'' => (Kind::Other, self.string(start, self.plain())),
            b'"' => (Kind::Other, quoted_identifier_end(b, start)),
            b'$' => (Kind::Other, dollar_end(b, start)),
            b'0'..=b'9' => (Kind::Other, number_end(b, start)),
            c if is_ident_start(c) => self.word_at(start),
            _ => (Kind::Other, start + 1),
        };
        let end = end.min(b.len());
        self.at = end;
        Some(Token { kind, start, end })
    }
}

/// PostgreSQL's white space (`\v` too: PostgreSQL 16 and later take it as
/// a space, older ones reject it outside a literal).
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_cont(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

/// Past white space and comments from `i`.
fn skip_blank(b: &[u8], mut i: usize) -> usize {
    loop {
        while b.get(i).copied().is_some_and(is_space) {
            i += 1;
        }
        match b.get(i..i + 2) {
            Some(b"--") => i = line_comment_end(b, i),
            Some(b"/*") => i = block_comment_end(b, i),
            _ => return i,
        }
    }
}

/// The newline (`\n` or `\r`) ending the `--` comment at `start`, or the
/// end.
fn line_comment_end(b: &[u8], start: usize) -> usize {
    b[start..]
        .iter()
        .position(|&c| c == b'\n' || c == b'\r')
        .map_or(b.len(), |p| start + p)
}

/// Past the nested `/* */` comment at `start`.
fn block_comment_end(b: &[u8], start: usize) -> usize {
    let mut depth = 1u32;
    let mut i = start + 2;
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

/// The quote continuing a string that ended just before `i`: one after
/// white space (and `--` comments) holding a newline.
fn continuation(b: &[u8], mut i: usize) -> Option<usize> {
    let mut newline = false;
    loop {
        match *b.get(i)? {
            b'\n' | b'\r' => {
                newline = true;
                i += 1;
            }
            c if is_space(c) => i += 1,
            b'-' if b.get(i + 1) == Some(&b'-') => i = line_comment_end(b, i),
            b'\'' if newline => return Some(i),
            _ => return None,
        }
    }
}

/// Past the "…" identifier whose opening quote is at `open`.
fn quoted_identifier_end(b: &[u8], open: usize) -> usize {
    let mut i = open + 1;
    while i < b.len() {
        if b[i] == b'"' {
            if b.get(i + 1) == Some(&b'"') {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    b.len()
}

/// Past the token starting with `$` at `start`: a parameter `$1`, a
/// `$tag$…$tag$` string, or the `$` alone (a tag without its closing `$`
/// is read as `$` and a word).
fn dollar_end(b: &[u8], start: usize) -> usize {
    let digits = b[start + 1..]
        .iter()
        .take_while(|c| c.is_ascii_digit())
        .count();
    if digits > 0 {
        return start + 1 + digits;
    }
    let tag_len = b[start + 1..]
        .iter()
        .take_while(|&&c| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80)
        .count();
    let close = start + 1 + tag_len;
    if b.get(close) != Some(&b'$') {
        return start + 1;
    }
    let delimiter = &b[start..=close];
    let body = close + 1;
    b[body..]
        .windows(delimiter.len())
        .position(|w| w == delimiter)
        .map_or(b.len(), |p| body + p + delimiter.len())
}

/// Past the number at `start` (digits, `_`, `.`, and any identifier glued
/// to it: an exponent, a hex prefix, or junk the server rejects).
fn number_end(b: &[u8], start: usize) -> usize {
    let mut i = start;
    while b
        .get(i)
        .is_some_and(|&c| c.is_ascii_digit() || c == b'_' || c == b'.')
    {
        i += 1;
    }
    if b.get(i).copied().is_some_and(is_ident_start) {
        i += 1;
        while b.get(i).copied().is_some_and(is_ident_cont) {
            i += 1;
        }
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Session-state statements hidden behind leading semicolons, comments
    /// and odd case are still seen (the same tricks the transaction-control
    /// check must survive).
    #[test]
    fn session_statements_behind_leading_noise_are_seen() {
        for sql in [
            ";SET statement_timeout = 1",
            "\n;\n;set search_path = x",
            "/* c */ ; SeT ROLE nobody",
            "-- c\nLISTEN ch",
            "/* a /* nested */ b */ PREPARE p AS SELECT 1",
            "; ;CREATE TEMP TABLE t (a int)",
        ] {
            assert_ne!(session_effect(sql), SessionEffect::None, "{sql:?}");
            assert!(check_autocommit_session(sql).is_err(), "{sql:?}");
            let batch = format!("SELECT 'a;b' AS \"set\"; {sql}");
            assert!(
                check_autocommit_session_in_batch(&batch).is_err(),
                "{batch:?}"
            );
        }
        // Columns and strings named like the statements are not statements.
        for sql in [
            "SELECT 1 AS set, 'LISTEN x' AS reset",
            "UPDATE t SET \"listen\" = 1",
        ] {
            assert!(check_autocommit_session(sql).is_ok(), "{sql:?}");
        }
    }

    /// The first-bytes shortcut lets UPDATE and DELETE through and sends
    /// every session-state statement on to the full check.
    #[test]
    fn the_session_shortcut_never_decides_for_a_session_statement() {
        for sql in [
            "UPDATE t SET a = 1",
            "delete from t",
            "INSERT INTO t VALUES (1)",
            "select 1",
        ] {
            assert!(surely_no_session_statement(sql), "{sql}");
        }
        for sql in [
            "UNLISTEN x",
            "unlisten *",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "DEALLOCATE ALL",
            "DISCARD ALL",
            "DO $$ BEGIN END $$",
            "SET a = 1",
            "RESET ALL",
            "LISTEN x",
            "LOAD 'x'",
            "PREPARE p AS SELECT 1",
            "CREATE TEMP TABLE t (a int)",
            " SET a = 1",
            "/* c */ SET a = 1",
            ";SET a = 1",
        ] {
            assert!(!surely_no_session_statement(sql), "{sql}");
        }
    }

    /// The word-at-a-time scan finds every needle wherever it falls
    /// against the eight-byte words, in any case, and nothing else.
    #[test]
    fn session_function_scan_finds_needles_at_every_alignment() {
        for pad in 0..17 {
            let p = " ".repeat(pad);
            for (sql, effect, temp) in [
                (
                    "SELECT set_config('a', 'b', false)",
                    SessionEffect::Maybe,
                    false,
                ),
                ("SELECT PG_ADVISORY_LOCK(1)", SessionEffect::Maybe, false),
                ("SELECT 1 FROM pg_temp.t", SessionEffect::Maybe, true),
                ("SELECT * INTO Temp t FROM x", SessionEffect::None, true),
                (
                    "SELECT id, name FROM users WHERE id = $1",
                    SessionEffect::None,
                    false,
                ),
                ("SELECT user_id FROM tempo_x", SessionEffect::None, true),
                (
                    "SELECT advisory_lockx, set_configs",
                    SessionEffect::Maybe,
                    false,
                ),
            ] {
                let text = format!("{p}{sql}{p}");
                assert_eq!(
                    mentions_session_functions(&text),
                    (effect, temp),
                    "{text:?}"
                );
            }
        }
        let word = u64::from_le_bytes(*b"a_b__cd_");
        assert_eq!(bytes_equal(word, b'_').count_ones(), 4);
        assert_eq!(bytes_equal(word, b'_').trailing_zeros() / 8, 1);
        assert_eq!(bytes_equal(u64::from_le_bytes(*b"abcdefgh"), b'_'), 0);
        // Every byte value, in every position: exact, no neighbour flagged.
        for v in 0..=255u8 {
            for pos in 0..8 {
                let mut bytes = [0u8; 8];
                bytes[pos] = v;
                let hits = bytes_equal(u64::from_le_bytes(bytes), b'_');
                assert_eq!(hits != 0, v == b'_', "{v} at {pos}");
            }
        }
    }

    fn refused(sql: &str) -> bool {
        matches!(reject_transaction_control(sql), Err(Error::Usage(_)))
    }

    fn batch_refused(sql: &str) -> bool {
        matches!(reject_control_in_batch(sql), Err(Error::Usage(_)))
    }

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
            "PREPARE/**/TRANSACTION 'x'",
            "END",
            "abort",
            "Release s",
            "COMMIT AND CHAIN",
            "ROLLBACK TO SAVEPOINT s",
            "COMMIT PREPARED 'x'",
            "ROLLBACK PREPARED 'x'",
        ] {
            assert!(refused(sql), "{sql}");
            assert!(batch_refused(sql), "{sql}");
        }
        for sql in [
            "SELECT 1",
            "DO $$ BEGIN PERFORM 1; END $$",
            "PREPARE q AS SELECT 1",
            "PREPARE \"transaction\" AS SELECT 1",
            "INSERT INTO begin_log VALUES (1)",
            "",
            ";",
            " ; ;",
            "beginning",
            "begin1",
            "begin_x",
            "begin$",
            "select 1",
            "SET search_path = x",
            "UPDATE t SET a = 1",
            "with x as (select 1) select * from x",
            "(SELECT 1)",
            "\"begin\"",
            "E'BEGIN'",
            "CALL begin_work()",
            "EXPLAIN SELECT 1",
        ] {
            assert!(!refused(sql), "{sql}");
            assert!(!batch_refused(sql), "{sql}");
        }
        // The two-byte shortcut never decides for a control statement.
        for sql in [
            "BEGIN",
            "start transaction",
            "Savepoint a",
            "end",
            "x",
            ";B",
            "; begin",
            "\x0bBEGIN",
            "\u{a0}BEGIN",
        ] {
            assert!(!surely_not_control(sql), "{sql}");
        }
    }

    /// The server drops empty statements, so a single extended-protocol
    /// statement may start with any number of them.
    #[test]
    fn empty_statements_before_control_are_seen_through() {
        for sql in [
            ";BEGIN",
            "; BEGIN",
            ";;begin",
            "/* x */ ; START TRANSACTION",
            "\n;\n;begin",
            ";COMMIT",
            "; END",
            ";\tEnd Work",
            ";PREPARE TRANSACTION 'g'",
            "; -- c\n ; /* ; */ ; rollback",
            "/* a /* ; */ b */;savepoint s",
            "--;\r;RELEASE s",
            "\x0b;\x0bBEGIN",
            ";\x0c;ABORT",
            "-- comment ended by a carriage return\rBEGIN",
            "PREPARE -- c\r TRANSACTION 'g'",
            ";\r\n;\r\nCommit",
        ] {
            assert!(refused(sql), "{sql:?}");
            assert!(batch_refused(sql), "{sql:?}");
        }
        assert_eq!(first_keyword(" ; -- x\n;select 1"), "select");
        assert_eq!(first_keyword("/* x */ insert into t"), "insert");
        assert_eq!(first_keyword("(select 1)"), "");
        assert_eq!(first_keyword(";;"), "");
    }

    #[test]
    fn every_statement_of_a_batch_is_checked() {
        for batch in [
            "SELECT 1; COMMIT",
            "SELECT 1;BEGIN",
            "INSERT INTO t VALUES (';'); ROLLBACK",
            "SELECT 'it''s; fine'; END",
            "SELECT E'a\\'; b'; commit",
            "SELECT e'a\\\\'; commit",
            "SELECT \"odd;name\" FROM t; BEGIN",
            "SELECT \"a\"\"b;\" FROM t; BEGIN",
            "SELECT U&\"a;\" FROM t; BEGIN",
            "SELECT U&'a;' ; BEGIN",
            "SELECT B'01'; BEGIN",
            "SELECT X'0A'; BEGIN",
            "SELECT N'x;'; BEGIN",
            "DO $f$ BEGIN PERFORM 1; END $f$; COMMIT",
            "DO $f$ $g$ ; $f$; COMMIT",
            "DO $$ x $$; COMMIT",
            "SELECT $1; BEGIN",
            "SELECT $1$a$ x $a$; BEGIN",
            "SELECT 1 -- ; not here\n; savepoint s",
            "SELECT 1 -- ; not here\r; savepoint s",
            "SELECT 1 /* ; /* ; */ ; */; release s",
            "SELECT 1 +--x\n; BEGIN",
            "SELECT 1 */ ; BEGIN",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END; COMMIT",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC END; COMMIT",
            "create or replace procedure p() language sql begin atomic select 1; end ; commit",
            "CREATE FUNCTION f(x int) RETURNS int LANGUAGE sql BEGIN ATOMIC \
             SELECT CASE WHEN x > 0 THEN 1 ELSE 0 END; END; END",
            // begin / atomic as names do not open a body.
            "SELECT begin, atomic FROM (VALUES (1, 2)) AS v(begin, atomic); BEGIN",
            "SELECT begin atomic FROM t; BEGIN",
            "SELECT 1 AS begin; SELECT 2 AS atomic; BEGIN",
            "CREATE TABLE t (begin int, atomic int); BEGIN",
            "CREATE VIEW v AS SELECT begin atomic FROM t; COMMIT",
            "CREATE FUNCTION f(begin atomic) RETURNS int LANGUAGE sql AS 'select 1'; BEGIN",
            "CREATE FUNCTION f() RETURNS TABLE (begin atomic) LANGUAGE sql AS 'x'; BEGIN",
            "CREATE FUNCTION s.begin() RETURNS int LANGUAGE sql AS 'x'; BEGIN",
            "CREATE FUNCTION f() RETURNS t.begin atomic; BEGIN",
            "CREATE FUNCTION f() RETURNS int BEGIN; ATOMIC; BEGIN",
            "CREATE FUNCTION f() RETURNS int BEGIN, ATOMIC; BEGIN",
            // A nested body closes ours early: the rest is refused.
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC \
             CREATE FUNCTION g() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END; END",
            // A string continued over a newline is one string.
            "SELECT 'a'\n'; b'; BEGIN",
            "SELECT E'a'\n'\\'; x'; BEGIN",
            "SELECT 'a' -- c\n'; b'; BEGIN",
            "SELECT E'a' /* c */\n'\\'; BEGIN; --'",
        ] {
            assert!(batch_refused(batch), "{batch:?}");
        }
        for batch in [
            "SELECT 1; SELECT 2;",
            "CREATE TABLE t (a int); INSERT INTO t VALUES (1)",
            "DO $$ BEGIN PERFORM 1; END $$; SELECT 1",
            "DO $body$ BEGIN COMMIT; END $body$",
            "DO $a$ $b$ ; COMMIT; $b$ $a$",
            "DO $$ BEGIN COMMIT; END $$ ; DO $x$ ROLLBACK $x$",
            "SELECT 'x; COMMIT'",
            "SELECT E'\\'; COMMIT'",
            "SELECT e'\\\\\\'; COMMIT'",
            "SELECT \"a;\"\"b\" FROM t",
            "SELECT \"begin\", \"end\" FROM t",
            "SELECT 1 -- ; COMMIT",
            "SELECT 1 /* ; COMMIT */",
            "SELECT 1 /* /* */ ; COMMIT */",
            "SELECT a$b FROM t; SELECT 2",
            "SELECT 'a'\n'; COMMIT'",
            "SELECT E'a'\n'\\'; COMMIT'",
            "SELECT 'a' -- c\n  -- d\r'; COMMIT'",
            "CREATE FUNCTION f(x int) RETURNS int LANGUAGE sql \
             BEGIN ATOMIC SELECT CASE WHEN x > 0 THEN 1 ELSE 0 END; SELECT 2; END; SELECT 3",
            "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql \
             BEGIN ATOMIC; COMMIT; ROLLBACK; SELECT 1 AS end; END",
            "create procedure p() language sql begin /* c */ atomic \
             insert into t values (1); savepoint s; end; select 1",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC \
             SELECT begin atomic FROM t; RETURN 1; END",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 'END; BEGIN'; END",
            ";;",
            "",
            "SELECT 1; ; ;",
        ] {
            assert!(reject_control_in_batch(batch).is_ok(), "{batch:?}");
        }
    }

    /// A plain '…' string holding a backslash reads two ways, depending on
    /// standard_conforming_strings: both are checked.
    #[test]
    fn both_readings_of_a_backslash_are_checked() {
        for batch in [
            // Hidden when backslashes escape (off): revealed when standard.
            "SELECT 'a\\'; BEGIN; SELECT ''",
            // Hidden when standard (on): revealed when backslashes escape.
            "SELECT 'a\\', '; BEGIN; SELECT '",
            "SELECT 'a\\', '; BEGIN; SELECT ''",
            "SELECT N'a\\', '; COMMIT; SELECT '",
            "SELECT 'x\\'\n'; BEGIN; SELECT '",
            "SELECT '\\\\', '\\'; END; --'",
        ] {
            let err = reject_control_in_batch(batch).unwrap_err();
            assert!(matches!(err, Error::Usage(_)), "{batch:?}");
        }
        let err = reject_control_in_batch("SELECT 'a\\', '; BEGIN; SELECT '").unwrap_err();
        assert!(
            err.to_string().contains("standard_conforming_strings"),
            "{err}"
        );
        // Backslashes that read the same either way.
        for batch in [
            "SELECT 'a\\b'; SELECT 1",
            "SELECT E'a\\'b'",
            "SELECT $$\\'; COMMIT$$",
            "SELECT \"a\\\" FROM t",
            "SELECT B'\\'",
            "SELECT 1 -- \\'\n",
            "SELECT U&'\\0041'",
        ] {
            assert!(reject_control_in_batch(batch).is_ok(), "{batch:?}");
        }
    }

    /// Under SJIS, BIG5, GBK… a backslash after a non-ASCII byte can be
    /// part of the character.
    #[test]
    fn escapes_after_non_ascii_bytes_are_refused() {
        for batch in [
            "SELECT E'\u{c1}\\'; BEGIN; --'",
            "SELECT E'\u{c1}\\\\'",
            "SELECT '\u{c1}\\'",
        ] {
            let err = reject_control_in_batch(batch).unwrap_err();
            assert!(
                err.to_string().contains("client encoding"),
                "{batch:?}: {err}"
            );
        }
        for batch in [
            "SELECT E'\u{c1}\\n'",
            "SELECT '\u{c1}\\x'",
            "SELECT E'\u{c1} \\''",
            "SELECT $$\u{c1}\\'$$",
        ] {
            assert!(reject_control_in_batch(batch).is_ok(), "{batch:?}");
        }
    }

    #[test]
    fn odd_input_never_panics() {
        for batch in [
            "'",
            "\"",
            "$",
            "$a",
            "$a$",
            "$a$ b",
            "$1",
            "$é$ x $é$",
            "/*",
            "/* /*",
            "/*/",
            "--",
            "-",
            "E'\\",
            "e'",
            "e",
            "u&",
            "U&'",
            "U&\"",
            "B'",
            "1e",
            "1.",
            "é;ü$x$;",
            "BEGIN ATOMIC",
            "END END END;",
            "'a'\n",
            "'a'\n'",
            "'a' --",
            "CREATE FUNCTION f() BEGIN ATOMIC",
            "CREATE FUNCTION f() BEGIN ATOMIC ;",
            "CREATE OR",
            "PREPARE",
            ")))",
        ] {
            let _ = reject_control_in_batch(batch);
            let _ = reject_transaction_control(batch);
            let _ = first_keyword(batch);
        }
    }

    /// xorshift64*: a small deterministic generator, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.below(items.len())]
        }

        /// `word` in random case.
        fn case(&mut self, word: &str) -> String {
            word.chars()
                .map(|c| {
                    if self.next() & 1 == 0 {
                        c.to_ascii_lowercase()
                    } else {
                        c.to_ascii_uppercase()
                    }
                })
                .collect()
        }
    }

    /// What may come before a statement: white space, comments, empty
    /// statements.
    const PREFIXES: &[&str] = &[
        "",
        " ",
        "\t",
        "\n",
        "\r\n",
        "\r",
        "\x0b",
        "\x0c",
        ";",
        " ; ",
        ";;",
        "\n;\n",
        "/* c */",
        "/* ; */",
        "/* a /* nested; */ b */",
        "/**/",
        "/*/ x */",
        "-- c\n",
        "-- ; c\r",
        "--\n",
    ];

    /// Between the words of a control statement.
    const GAPS: &[&str] = &[" ", "\t", "\n", "  ", "/* c */", "-- c\n", "\r", "/**/"];

    /// Control statements, as words.
    const CONTROL: &[&[&str]] = &[
        &["BEGIN"],
        &["BEGIN", "TRANSACTION"],
        &["BEGIN", "WORK"],
        &["BEGIN", "ISOLATION", "LEVEL", "SERIALIZABLE"],
        &["START", "TRANSACTION"],
        &["START", "TRANSACTION", "READ", "ONLY"],
        &["COMMIT"],
        &["COMMIT", "AND", "CHAIN"],
        &["END"],
        &["END", "TRANSACTION"],
        &["ROLLBACK"],
        &["ROLLBACK", "TO", "SAVEPOINT", "s"],
        &["ABORT"],
        &["SAVEPOINT", "s"],
        &["RELEASE", "s"],
        &["RELEASE", "SAVEPOINT", "s"],
        &["PREPARE", "TRANSACTION", "'g'"],
        &["COMMIT", "PREPARED", "'g'"],
        &["ROLLBACK", "PREPARED", "'g'"],
    ];

    /// Statements that are not control but hold its words, quotes,
    /// semicolons and bodies; the same under both readings of backslashes.
    const DECOYS: &[&str] = &[
        "SELECT 1",
        "select 'BEGIN'",
        "SELECT 'x; COMMIT'",
        "SELECT 'it''s; END'",
        "SELECT E'\\'; COMMIT'",
        "SELECT $$; ROLLBACK$$",
        "SELECT $t$ $$; COMMIT $t$",
        "SELECT \"begin\", \"end;\" FROM t",
        "SELECT begin, atomic FROM (VALUES (1, 2)) AS v(begin, atomic)",
        "SELECT begin atomic FROM t",
        "SELECT 1 AS end",
        "SELECT t.commit, t.begin FROM t",
        "INSERT INTO begin_log VALUES ('; BEGIN')",
        "PREPARE q AS SELECT 1",
        "DO $x$ BEGIN COMMIT; END $x$",
        "CREATE FUNCTION f(x int) RETURNS int LANGUAGE sql BEGIN ATOMIC \
         SELECT CASE WHEN x > 0 THEN 1 ELSE 0 END; SELECT 2; END",
        "CREATE OR REPLACE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC INSERT INTO t VALUES (1); END",
        "SELECT 'a'\n'; COMMIT'",
        "SELECT 1 -- ; COMMIT\n",
        "SELECT 1 /* ; COMMIT */",
        "SELECT 'a\\b'",
        "SELECT U&'d\\0061t'",
    ];

    fn prefix(rng: &mut Rng) -> String {
        (0..rng.below(4)).map(|_| rng.pick(PREFIXES)).collect()
    }

    fn control(rng: &mut Rng) -> String {
        let words = CONTROL[rng.below(CONTROL.len())];
        let mut out = String::new();
        for (n, word) in words.iter().enumerate() {
            if n > 0 {
                out.push_str(rng.pick(GAPS));
            }
            out.push_str(&rng.case(word));
        }
        out
    }

    #[test]
    fn generated_control_statements_are_always_refused() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..6000 {
            // One statement, as the extended protocol gets it.
            let single = format!(
                "{}{}{}",
                prefix(&mut rng),
                control(&mut rng),
                rng.pick(&["", ";", " ;", ";;", " -- c", " /* c */ ;\n"])
            );
            assert!(refused(&single), "round {round}: {single:?}");
            assert!(batch_refused(&single), "round {round}: {single:?}");

            // A batch with decoys around the control statement.
            let mut batch = String::new();
            for _ in 0..rng.below(4) {
                batch.push_str(&prefix(&mut rng));
                batch.push_str(rng.pick(DECOYS));
                batch.push_str(rng.pick(&[";", " ;", ";\n", "\n;"]));
            }
            let benign = batch.clone();
            batch.push_str(&prefix(&mut rng));
            batch.push_str(&control(&mut rng));
            if rng.below(2) == 0 {
                batch.push(';');
                batch.push_str(rng.pick(DECOYS));
            }
            assert!(batch_refused(&batch), "round {round}: {batch:?}");
            // Without it, the decoys alone pass.
            assert!(
                reject_control_in_batch(&benign).is_ok(),
                "round {round}: {benign:?}"
            );
        }
    }

    #[test]
    fn generated_noise_never_panics() {
        const PIECES: &[&str] = &[
            "'",
            "''",
            "\"",
            "$",
            "$$",
            "$a$",
            "$1",
            "\\",
            ";",
            "/*",
            "*/",
            "--",
            "\n",
            "\r",
            "E'",
            "e'",
            "B'",
            "U&'",
            "U&\"",
            "N'",
            "BEGIN",
            "ATOMIC",
            "END",
            "CASE",
            "(",
            ")",
            "CREATE FUNCTION",
            "OR REPLACE",
            "PREPARE",
            "TRANSACTION",
            "é",
            "日本",
            "\u{c1}",
            " ",
            "x",
            "1",
            ".",
            "-",
        ];
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..20_000 {
            let sql: String = (0..rng.below(16)).map(|_| rng.pick(PIECES)).collect();
            let _ = reject_control_in_batch(&sql);
            let _ = reject_transaction_control(&sql);
            let _ = first_keyword(&sql);
        }
    }

    /// Session-state statements are named; SET LOCAL, SET TRANSACTION and
    /// look-alikes (a table named temp) are not; function calls that change
    /// session state are a "maybe", wherever they hide.
    #[test]
    fn session_state_statements_are_recognised() {
        use SessionEffect::{Maybe, None as Clean, Statement};
        let cases: &[(&str, SessionEffect)] = &[
            ("SET statement_timeout = '1ms'", Statement("SET")),
            ("  set search_path TO x", Statement("SET")),
            ("/* c */ ; SET ROLE nobody", Statement("SET")),
            ("SET SESSION AUTHORIZATION nobody", Statement("SET")),
            (
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
                Statement("SET"),
            ),
            ("SET LOCAL statement_timeout = 5", Clean),
            (
                "SELECT 1 AS a INTO LOCAL TEMP t",
                Statement("SELECT … INTO TEMP"),
            ),
            (
                "select 1 into global temporary t",
                Statement("SELECT … INTO TEMP"),
            ),
            ("SELECT 1 INTO local FROM x", Clean),
            (
                r#"SELECT U&"set\005fconfig"('search_path', 'x', false)"#,
                Maybe,
            ),
            (r#"CREATE TABLE u&"pg\005ftemp".t (a int)"#, Maybe),
            (r"SELECT U&'\0041' AS a", Maybe),
            ("SELECT a & b FROM t", Clean),
            ("SELECT a&b FROM u", Clean),
            ("set transaction isolation level serializable", Clean),
            ("SET CONSTRAINTS ALL DEFERRED", Clean),
            ("RESET ALL", Statement("RESET")),
            ("CREATE TEMP TABLE t (a int)", Statement("CREATE TEMP")),
            (
                "create or replace temporary view v as select 1",
                Statement("CREATE TEMP"),
            ),
            (
                "CREATE GLOBAL TEMPORARY TABLE t (a int)",
                Statement("CREATE TEMP"),
            ),
            ("CREATE TABLE temp (a int)", Clean),
            ("CREATE TABLE pg_temp.t (a int)", Maybe),
            ("SELECT 1 AS a INTO TEMP t", Statement("SELECT … INTO TEMP")),
            (
                "select * into temporary table t from items",
                Statement("SELECT … INTO TEMP"),
            ),
            ("SELECT * INTO temp FROM items", Clean),
            ("INSERT INTO temp VALUES (1)", Clean),
            ("SELECT temperature FROM t", Clean),
            ("PREPARE p AS SELECT 1", Statement("PREPARE")),
            ("DEALLOCATE ALL", Statement("DEALLOCATE")),
            ("LISTEN ch", Statement("LISTEN")),
            ("UNLISTEN *", Statement("UNLISTEN")),
            (
                "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
                Statement("DECLARE … WITH HOLD"),
            ),
            ("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", Clean),
            ("LOAD 'auto_explain'", Statement("LOAD")),
            ("DISCARD ALL", Statement("DISCARD")),
            ("SELECT pg_advisory_lock(1)", Maybe),
            ("SELECT PG_TRY_ADVISORY_LOCK_SHARED(1)", Maybe),
            ("SELECT pg_advisory_xact_lock(1)", Clean),
            ("SELECT pg_advisory_unlock(1)", Clean),
            ("SELECT set_config('search_path', 'x', false)", Maybe),
            ("DO $$ BEGIN PERFORM 1; END $$", Maybe),
            ("SELECT 'SET x = 1'", Clean),
            ("UPDATE items SET name = 'x'", Clean),
            ("SELECT 1", Clean),
            ("", Clean),
        ];
        for (sql, want) in cases {
            assert_eq!(session_effect(sql), *want, "{sql}");
            assert_eq!(session_effect_in_batch(sql), *want, "batch {sql}");
        }
        assert_eq!(
            session_effect_in_batch("SELECT 1; SELECT pg_advisory_lock(1); SET x = 1"),
            Statement("SET")
        );
        assert_eq!(session_effect_in_batch("SELECT 1; set local x = 1"), Clean);
        assert_eq!(
            session_effect_in_batch("SELECT ';'; LISTEN x"),
            Statement("LISTEN")
        );
        assert!(check_autocommit_session("SET x = 1").is_err());
        assert_eq!(
            check_autocommit_session("SELECT pg_advisory_lock(1)").ok(),
            Some(true)
        );
        assert_eq!(check_autocommit_session("SELECT 1").ok(), Some(false));
    }

    /// The per-thread memo of plain texts never lets another text through:
    /// texts of the same length as a remembered one, longer than a slot,
    /// and more texts than slots are all checked in full.
    #[test]
    fn the_plain_memo_answers_only_for_the_same_text() {
        for _ in 0..3 {
            assert_eq!(check_autocommit("SELECT 12").ok(), Some(false));
            assert_eq!(check_autocommit("SELECT 1;").ok(), Some(false));
        }
        // Same length as remembered texts.
        assert!(check_autocommit("SET x = 1").is_err());
        assert!(check_autocommit("COMMIT;--").is_err());
        assert_eq!(check_autocommit("SELECT 12").ok(), Some(false));
        // Flagged texts are not remembered, and stay flagged.
        for _ in 0..2 {
            assert_eq!(
                check_autocommit("SELECT pg_advisory_lock(1)").ok(),
                Some(true)
            );
        }
        // Past the slots' size, and more texts than slots.
        let long = format!("SELECT 1 /*{}*/", "x".repeat(200));
        for _ in 0..2 {
            assert_eq!(check_autocommit(&long).ok(), Some(false));
        }
        let long_set = format!("SET x = 1 /*{}*/", "x".repeat(200));
        assert!(check_autocommit(&long_set).is_err());
        for i in 0..(MEMO_SLOTS * 3) {
            assert_eq!(check_autocommit(&format!("SELECT {i}")).ok(), Some(false));
        }
        assert!(check_autocommit("BEGIN").is_err());
        assert!(check_autocommit("").is_ok());
    }

    #[test]
    fn statements_that_drop_prepared_statements_are_seen() {
        for sql in [
            "DEALLOCATE ALL",
            "deallocate s1",
            "SET x = 1; /* c */ Discard ALL",
            ";;DEALLOCATE PREPARE ALL",
            "SELECT 'a\\'; DEALLOCATE ALL; --'",
        ] {
            assert!(drops_prepared_statements(sql), "{sql}");
        }
        for sql in [
            "SELECT 1",
            "SELECT 'DEALLOCATE ALL'",
            "-- DISCARD ALL\nSELECT 1",
            "SELECT deallocate FROM t",
        ] {
            assert!(!drops_prepared_statements(sql), "{sql}");
        }
    }
}
