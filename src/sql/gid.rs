//! Global transaction ids of two-phase commit: how they are built, read
//! back, and how long they can get. Pure text, so recovery, the commit
//! protocol and the registry's build-time check share one definition of the
//! format: `{prefix}:{32 hex digits}:{coordinator}:{engine}`, each engine
//! name percent-encoded (every byte outside `[A-Za-z0-9_-]` as `%XX`), so no
//! name — with colons, quotes, spaces or any letters — can be misread.

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
pub(crate) fn check_fits<'a>(prefix: &str, names: impl IntoIterator<Item = &'a str>) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
