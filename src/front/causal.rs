//! Causal tokens: read-your-writes across requests and processes (cargo
//! feature `causal`).
//!
//! Within one [`Sessions`] scope, a read on a replica waits for the scope's
//! own commits (see [`crate::EngineConfig::replica_of`]). A causal token
//! carries those commit positions out of the scope — into a cookie, a
//! redirect, a header to another service — and back into another scope,
//! which then reads as if it had written them itself:
//!
//! ```no_run
//! # async fn demo(registry: pgassist::Registry) -> pgassist::Result<()> {
//! // Request 1 writes, and hands the token to the client.
//! let db = registry.sessions();
//! db.writer()?.execute("UPDATE users SET name = 'ann' WHERE id = 7", &[]).await?;
//! let token: Option<String> = db.causal_token()?; // None when nothing was written
//!
//! // Request 2 (maybe another process with the same engines and key):
//! let db = match &token {
//!     Some(t) => registry.sessions_after(t)?,
//!     None => registry.sessions(),
//! };
//! // Waits for the replica to replay request 1's commit, or reads the primary.
//! db.reader()?.query("SELECT name FROM users WHERE id = 7", &[]).await?;
//! # Ok(()) }
//! ```
//!
//! A token names each primary engine written (by name, so that processes
//! with the same configuration understand each other) with its WAL insert
//! position after the commit, and the time it was issued; it is signed
//! with HMAC-SHA256 under the registry's key
//! ([`RegistryBuilder::causal_key`]). Its text is ASCII letters, digits,
//! `.`, `-` and `_` only: it goes into a cookie, a header or a URL as is.
//!
//! What a token can do: raise the WAL position a scope's replica reads wait
//! for. A forged or altered token is refused ([`CausalTokenError`]), so a
//! client cannot make a server wait for positions of its choosing. What a
//! valid token cannot do: it grants no access, carries no data and no
//! identity; a stolen one makes its thief's reads wait for the victim's
//! writes for at most the token's max age — nothing more.
//!
//! Tokens older than the max age ([`DEFAULT_CAUSAL_MAX_AGE`], set with
//! [`RegistryBuilder::causal_max_age`]) are ignored, not refused: by then
//! any healthy replica has replayed the write, so honouring it would only
//! send reads to the primary when a replica is far behind; an old token is
//! the normal case of a user coming back after a while and must not fail
//! the request; and after a failover or restore the old positions may mean
//! nothing on the new timeline — a bound on age is a bound on the harm.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::registry::{Registry, RegistryBuilder};
use super::sessions::Sessions;
use crate::error::{CausalTokenError, Error, Result};

/// How long a causal token is honoured by default: one minute, far above
/// the replication lag of a healthy replica and the time between a write
/// and the redirect that follows it.
pub const DEFAULT_CAUSAL_MAX_AGE: Duration = Duration::from_secs(60);

/// The longest token accepted (a browser keeps about 4 KB per cookie):
/// longer input is refused before anything else is done with it.
pub const MAX_CAUSAL_TOKEN_LEN: usize = 4096;

/// Shortest key accepted: HMAC-SHA256's own output size.
const MIN_KEY_LEN: usize = 32;
/// Keys accepted for checking (the signing key included).
const MAX_KEYS: usize = 8;
/// How far in the future an issue time may be (clocks of two processes).
const CLOCK_SKEW: Duration = Duration::from_secs(30);
/// The format version, the token's first field.
const VERSION: &str = "1";
/// Prepended to what is signed, so a key shared with another use cannot
/// produce a valid token by accident.
const DOMAIN: &[u8] = b"pgassist causal token\0";

type HmacSha256 = Hmac<Sha256>;

/// Keys and max age as given to the builder.
#[derive(Default)]
pub(crate) struct CausalConfig {
    /// The signing key first, then retired keys still accepted.
    keys: Vec<Vec<u8>>,
    max_age: Option<Duration>,
}

/// A registry's keys, ready to use.
pub(crate) struct CausalKeys {
    /// Keyed MACs (key already absorbed), the first signs.
    macs: Vec<HmacSha256>,
    max_age: Duration,
}

impl std::fmt::Debug for CausalKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CausalKeys")
            .field("keys", &self.macs.len())
            .field("max_age", &self.max_age)
            .finish()
    }
}

impl CausalConfig {
    /// Checks the keys; `None` when none was given.
    pub(crate) fn build(self) -> Result<Option<CausalKeys>> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        if self.keys.len() > MAX_KEYS {
            return Err(Error::Config(format!(
                "at most {MAX_KEYS} causal keys (one signing, the others retired)"
            )));
        }
        if self.keys[0].is_empty() {
            return Err(Error::Config(
                "causal_retired_key without a signing key: add causal_key".into(),
            ));
        }
        let mut macs = Vec::with_capacity(self.keys.len());
        for key in &self.keys {
            if key.len() < MIN_KEY_LEN {
                return Err(Error::Config(format!(
                    "a causal key needs at least {MIN_KEY_LEN} bytes of secret"
                )));
            }
            macs.push(
                HmacSha256::new_from_slice(key)
                    .map_err(|_| Error::Config("a causal key was refused by HMAC-SHA256".into()))?,
            );
        }
        Ok(Some(CausalKeys {
            macs,
            max_age: self.max_age.unwrap_or(DEFAULT_CAUSAL_MAX_AGE),
        }))
    }
}

/// A checked token: when it was issued and the positions it carries.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Decoded {
    pub(crate) issued: u64,
    pub(crate) positions: Vec<(String, u64)>,
}

impl CausalKeys {
    fn signature(&self, mac: &HmacSha256, body: &str) -> HmacSha256 {
        let mut mac = mac.clone();
        mac.update(DOMAIN);
        mac.update(body.as_bytes());
        mac
    }

    /// The token for `positions` (engine name, WAL position) issued at
    /// `issued` (seconds since the Unix epoch).
    pub(crate) fn encode(&self, issued: u64, positions: &[(&str, u64)]) -> String {
        let entries: Vec<String> = positions
            .iter()
            .map(|(name, lsn)| format!("{}-{lsn:x}", hex(name.as_bytes())))
            .collect();
        let body = format!("{VERSION}.{issued:x}.{}", entries.join("_"));
        let tag = self.signature(&self.macs[0], &body).finalize().into_bytes();
        format!("{body}.{}", hex(&tag))
    }

    /// Checks `token`'s form and signature, then reads it. Never panics,
    /// whatever the input.
    pub(crate) fn decode(&self, token: &str) -> Result<Decoded> {
        let bad = |e| Error::CausalToken(e);
        let malformed = |what| bad(CausalTokenError::Malformed(what));
        if token.len() > MAX_CAUSAL_TOKEN_LEN {
            return Err(bad(CausalTokenError::TooLong {
                max: MAX_CAUSAL_TOKEN_LEN,
            }));
        }
        let allowed = |b: u8| matches!(b, b'0'..=b'9' | b'a'..=b'f' | b'.' | b'-' | b'_');
        if !token.bytes().all(allowed) {
            return Err(malformed("unexpected character"));
        }
        let (body, tag) = token.rsplit_once('.').ok_or(malformed("no signature"))?;
        let mut fields = body.split('.');
        if fields.next() != Some(VERSION) {
            return Err(bad(CausalTokenError::UnknownVersion));
        }
        let tag = unhex(tag)
            .filter(|t| t.len() == 32)
            .ok_or(malformed("signature"))?;
        // Constant-time comparison, against every accepted key.
        let signed = self
            .macs
            .iter()
            .any(|mac| self.signature(mac, body).verify_slice(&tag).is_ok());
        if !signed {
            return Err(bad(CausalTokenError::BadSignature));
        }
        let (Some(issued), Some(entries), None) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(malformed("fields"));
        };
        let issued = hex_u64(issued).ok_or(malformed("issue time"))?;
        let mut positions = Vec::new();
        for entry in entries.split('_').filter(|e| !e.is_empty()) {
            let (name, lsn) = entry.split_once('-').ok_or(malformed("entry"))?;
            let name = unhex(name)
                .filter(|n| !n.is_empty())
                .and_then(|n| String::from_utf8(n).ok())
                .ok_or(malformed("engine name"))?;
            let lsn = hex_u64(lsn).ok_or(malformed("position"))?;
            positions.push((name, lsn));
        }
        Ok(Decoded { issued, positions })
    }

    /// Whether a token issued at `issued` is still honoured at `now`.
    pub(crate) fn fresh(&self, issued: u64, now: u64) -> bool {
        let max_age = self.max_age.as_secs();
        issued <= now.saturating_add(CLOCK_SKEW.as_secs()) && now.saturating_sub(issued) <= max_age
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if s.len() % 2 != 0 {
        return None;
    }
    s.chunks(2)
        .map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

/// 1 to 16 lower-case hex digits (`from_str_radix` would take a `+`).
fn hex_u64(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    s.bytes()
        .try_fold(0u64, |n, c| Some(n << 4 | u64::from(nibble(c)?)))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What [`Sessions::observe_causal_token`] did with a valid token.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ObservedToken {
    /// Older than the registry's max age (or issued too far in the
    /// future): ignored.
    pub expired: bool,
    /// Positions applied (engines of this registry).
    pub applied: usize,
    /// Positions for engines this registry does not have (another
    /// service's): ignored.
    pub unknown_engines: usize,
}

impl Sessions {
    fn keys(&self) -> Result<&CausalKeys> {
        self.registry()
            .causal_keys()
            .ok_or(Error::CausalToken(CausalTokenError::NoKey))
    }

    /// A signed token carrying this scope's commit positions — each
    /// primary engine written here (with replicas to read from), and those
    /// observed from earlier tokens — for another request or process to
    /// read after them ([`Sessions::observe_causal_token`],
    /// [`Registry::sessions_after`]). `None` when there is nothing to carry.
    ///
    /// The token is issued now if this scope wrote, else it keeps the issue
    /// time of the token it observed, so passing a token along through
    /// read-only requests does not extend its life. A token is ASCII
    /// letters, digits, `.`, `-` and `_`: a cookie, header or URL takes it
    /// as is. What a token can and cannot do, keys, rotation and max age:
    /// docs/high-availability.md.
    ///
    /// [`Error::CausalToken`] ([`CausalTokenError::NoKey`]) when the
    /// registry has no key.
    pub fn causal_token(&self) -> Result<Option<String>> {
        let keys = self.keys()?;
        let (positions, wrote, observed_at) = self.causal_positions();
        if positions.is_empty() {
            return Ok(None);
        }
        let named: Vec<(&str, u64)> = positions
            .iter()
            .map(|&(index, lsn)| (self.registry().engine_at(index).name(), lsn))
            .collect();
        let issued = match observed_at {
            Some(t) if !wrote => t,
            _ => now_secs(),
        };
        Ok(Some(keys.encode(issued, &named)))
    }

    /// Reads after the writes behind `token` (from
    /// [`Sessions::causal_token`], here or in another process with the
    /// same engine names and key): every read this scope makes on a
    /// replica of an engine named in the token waits for that engine's
    /// position, or goes to the primary.
    ///
    /// A token past the max age, and positions of engines this registry
    /// does not have, are ignored (see [`ObservedToken`]); a token that is
    /// malformed, too long or not signed by one of the registry's keys is
    /// [`Error::CausalToken`], and nothing of it is applied.
    pub fn observe_causal_token(&self, token: &str) -> Result<ObservedToken> {
        let keys = self.keys()?;
        let decoded = keys.decode(token)?;
        if !keys.fresh(decoded.issued, now_secs()) {
            return Ok(ObservedToken {
                expired: true,
                applied: 0,
                unknown_engines: 0,
            });
        }
        let mut observed = ObservedToken {
            expired: false,
            applied: 0,
            unknown_engines: 0,
        };
        for (name, lsn) in &decoded.positions {
            match self.registry().engine_index(name) {
                Ok(index) => {
                    self.observe_lsn(index, *lsn, decoded.issued);
                    observed.applied += 1;
                }
                Err(_) => observed.unknown_engines += 1,
            }
        }
        Ok(observed)
    }
}

impl Registry {
    /// A per-request container ([`Registry::sessions`]) that reads after
    /// the writes behind `token` ([`Sessions::observe_causal_token`]).
    pub fn sessions_after(&self, token: &str) -> Result<Sessions> {
        let sessions = self.sessions();
        sessions.observe_causal_token(token)?;
        Ok(sessions)
    }
}

impl RegistryBuilder {
    /// The secret that signs causal tokens (at least 32 bytes; take it from
    /// a secret store, the same in every process that exchanges tokens).
    /// Calling it again replaces the signing key; keep the old one with
    /// [`RegistryBuilder::causal_retired_key`] while its tokens live.
    pub fn causal_key(mut self, key: impl AsRef<[u8]>) -> Self {
        let config = self.causal_config();
        if config.keys.is_empty() {
            config.keys.push(key.as_ref().to_vec());
        } else {
            config.keys[0] = key.as_ref().to_vec();
        }
        self
    }

    /// A retired key: tokens signed with it are still accepted, none is
    /// signed with it — for rotating the key without refusing the tokens
    /// in flight. Needs a signing key ([`RegistryBuilder::causal_key`]).
    pub fn causal_retired_key(mut self, key: impl AsRef<[u8]>) -> Self {
        let config = self.causal_config();
        if config.keys.is_empty() {
            // Placeholder for the signing key: build() refuses an empty key.
            config.keys.push(Vec::new());
        }
        config.keys.push(key.as_ref().to_vec());
        self
    }

    /// How long a causal token is honoured ([`DEFAULT_CAUSAL_MAX_AGE`]);
    /// older tokens are ignored. Seconds are the unit: anything under one
    /// second honours tokens for the second they were issued in.
    pub fn causal_max_age(mut self, max_age: Duration) -> Self {
        self.causal_config().max_age = Some(max_age);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(list: &[&[u8]]) -> CausalKeys {
        CausalConfig {
            keys: list.iter().map(|k| k.to_vec()).collect(),
            max_age: None,
        }
        .build()
        .unwrap()
        .unwrap()
    }

    const K1: &[u8] = b"0123456789abcdef0123456789abcdef";
    const K2: &[u8] = b"fedcba9876543210fedcba9876543210";

    #[test]
    fn round_trip_with_hostile_names() {
        let k = keys(&[K1]);
        let names = ["writer", "a:b", "\"q'", "ünï", "x.y-z_w", "\0", "a b;c,d"];
        let positions: Vec<(&str, u64)> = names
            .iter()
            .zip(1u64..)
            .map(|(n, i)| (*n, i << 33 | 0xdead))
            .collect();
        let token = k.encode(1_700_000_000, &positions);
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        );
        let back = k.decode(&token).unwrap();
        assert_eq!(back.issued, 1_700_000_000);
        let expect: Vec<(String, u64)> =
            positions.iter().map(|(n, l)| (n.to_string(), *l)).collect();
        assert_eq!(back.positions, expect);
        assert_eq!(k.decode(&k.encode(5, &[])).unwrap().positions, vec![]);
        // docs/high-availability.md: about 100 bytes for `writer`.
        let one = k.encode(1_800_000_000, &[("writer", 0x1_2345_6789)]);
        assert!((90..=110).contains(&one.len()), "{}", one.len());
    }

    #[test]
    fn rotation_and_wrong_keys() {
        let old = keys(&[K2]);
        let new = keys(&[K1, K2]);
        let token = old.encode(1, &[("writer", 7)]);
        assert!(new.decode(&token).is_ok(), "a retired key still verifies");
        assert!(
            new.encode(1, &[("writer", 7)]) != token,
            "the new key signs"
        );
        let other = keys(&[K1]);
        assert_eq!(
            other.decode(&token).unwrap_err().to_string(),
            Error::CausalToken(CausalTokenError::BadSignature).to_string()
        );
    }

    fn refusal(k: &CausalKeys, token: &str) -> CausalTokenError {
        match k.decode(token) {
            Err(Error::CausalToken(e)) => e,
            other => panic!("{token:?} gave {other:?}"),
        }
    }

    #[test]
    fn tampering_truncation_and_garbage_are_refused() {
        let k = keys(&[K1]);
        let token = k.encode(1_700_000_000, &[("writer", 0x1_0000_0000), ("logger", 5)]);
        // Every single-character change and every truncation is refused.
        for i in 0..token.len() {
            let mut bytes = token.clone().into_bytes();
            for c in [b'0', b'f', b'.', b'-', b'_', b'g', b'A'] {
                if token.as_bytes()[i] == c {
                    continue;
                }
                bytes[i] = c;
                let altered = String::from_utf8(bytes.clone()).unwrap();
                assert!(k.decode(&altered).is_err(), "{altered}");
            }
            assert!(k.decode(&token[..i]).is_err(), "truncated at {i}");
        }
        // A higher position with the old signature.
        let forged = token.replacen("-100000000", "-ffffffffff", 1);
        assert_eq!(refusal(&k, &forged), CausalTokenError::BadSignature);
        assert_eq!(
            refusal(&k, &"0".repeat(MAX_CAUSAL_TOKEN_LEN + 1)),
            CausalTokenError::TooLong {
                max: MAX_CAUSAL_TOKEN_LEN
            }
        );
        for garbage in [
            "",
            ".",
            "....",
            "1",
            "1.",
            "2.0.00-1.00",
            "1.0.0.0",
            "ünïcode",
            "1.0.\"writer\"-1.00",
            "1.0.writer:1.00",
            " 1.0..00",
        ] {
            assert!(k.decode(garbage).is_err(), "{garbage:?}");
        }
        assert_eq!(refusal(&k, "2.0..00"), CausalTokenError::UnknownVersion);
    }

    #[test]
    fn signed_nonsense_is_malformed_not_a_panic() {
        // The key holder signs bodies this crate never issues.
        let k = keys(&[K1]);
        let sign = |body: &str| {
            let tag = k.signature(&k.macs[0], body).finalize().into_bytes();
            format!("{body}.{}", hex(&tag))
        };
        for body in [
            "1",
            "1.",
            "1..",
            "1.0",
            "1.0.0",
            "1.0.-",
            "1.0.0-1",
            "1.0.61-",
            "1.0.61-11111111111111111",
            "1.11111111111111111.61-1",
            "1.0.ff-1",
            "1.0.61-1.0",
            "1.0.61-1-2",
        ] {
            assert!(k.decode(&sign(body)).is_err(), "{body:?}");
        }
        assert_eq!(
            k.decode(&sign("1.0.61-1__62-2")).unwrap().positions,
            vec![("a".into(), 1), ("b".into(), 2)]
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let k = keys(&[K1]);
        let valid = k.encode(9, &[("writer", 42)]);
        // xorshift: reproducible without a dependency.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..20_000 {
            let len = (next() % 200) as usize;
            let bytes: Vec<u8> = if round % 2 == 0 {
                (0..len).map(|_| next() as u8).collect()
            } else {
                // Mutations of a valid token, from its alphabet.
                let mut b = valid.clone().into_bytes();
                for _ in 0..1 + next() % 3 {
                    let i = (next() as usize) % b.len();
                    b[i] = b"0123456789abcdef.-_"[(next() % 19) as usize];
                }
                b
            };
            let text = String::from_utf8_lossy(&bytes);
            if let Ok(d) = k.decode(&text) {
                assert_eq!(text, valid, "only the valid token decodes");
                assert_eq!(d.positions, vec![("writer".into(), 42)]);
            }
        }
    }

    #[test]
    fn freshness() {
        let mut k = keys(&[K1]);
        k.max_age = Duration::from_secs(60);
        assert!(k.fresh(1000, 1000));
        assert!(k.fresh(1000, 1060));
        assert!(!k.fresh(1000, 1061));
        assert!(k.fresh(1020, 1000), "small clock skew");
        assert!(!k.fresh(2000, 1000), "far future");
        assert!(k.fresh(u64::MAX, u64::MAX));
        assert!(!k.fresh(u64::MAX, 0));
    }

    #[test]
    fn keys_are_checked() {
        let short = CausalConfig {
            keys: vec![b"short".to_vec()],
            max_age: None,
        };
        assert!(matches!(short.build(), Err(Error::Config(_))));
        let none = CausalConfig::default();
        assert!(none.build().unwrap().is_none());
        let debug = format!("{:?}", keys(&[K1]));
        assert!(!debug.contains("0123"), "{debug}");
    }
}
