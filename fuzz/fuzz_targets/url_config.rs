//! URL / config parsing: `EngineConfig::from_url`, its `Display` / `Debug`,
//! and `Registry::builder().build()` must never panic, must fail only with
//! `Error::Config`, and must never show the password.
//!
//! ```text
//! cargo +nightly fuzz run url_config -- -max_total_time=180
//! ```
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgassist::{EngineConfig, Error, Registry};

fuzz_target!(|data: &[u8]| {
    if let Ok(input) = std::str::from_utf8(data) {
        check(input);
    }
});

fn check(input: &str) {
    let cfg = match EngineConfig::from_url(input) {
        Err(e) => {
            assert!(matches!(e, Error::Config(_)), "{input:?}: {e:?}");
            let shown = format!("{e} {e:?}");
            for pw in password_candidates(input) {
                if pw.len() >= 6 && shown.contains(pw.as_str()) {
                    // Unless the text is in the message anyway (fixed words).
                    let other = input.replace(pw.as_str(), &"Q".repeat(pw.len()));
                    let baseline = match EngineConfig::from_url(&other) {
                        Err(e) => format!("{e} {e:?}"),
                        Ok(_) => String::new(),
                    };
                    assert!(
                        baseline.contains(pw.as_str()),
                        "{input:?}: {pw:?} in {shown}"
                    );
                }
            }
            return;
        }
        Ok(cfg) => cfg,
    };
    let pg = cfg.pg_config();
    // The URL means what it says: the password is what stands between the
    // ':' and the '@' of the authority, never a piece of something else.
    if input.starts_with("postgres://") || input.starts_with("postgresql://") {
        let rest = input.split_once("://").unwrap().1;
        let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
        let query_sets_password = rest.contains("password=");
        match authority.split_once('@') {
            Some((userinfo, _)) if !query_sets_password => {
                let expected = userinfo.split_once(':').map(|(_, pw)| percent_decode(pw));
                assert_eq!(
                    pg.get_password(),
                    expected.as_deref(),
                    "{input:?}: the password is not the URL's"
                );
            }
            None if !query_sets_password && !rest.contains("user=") => {
                assert_eq!(pg.get_user(), None, "{input:?}: a user name out of nowhere");
                assert_eq!(
                    pg.get_password(),
                    None,
                    "{input:?}: a password out of nowhere"
                );
            }
            _ => {}
        }
    }
    // The password is never shown: the text differs from that of the same
    // config with another password only where the password would be.
    let shown = render(input, cfg.clone());
    if let Some(pw) = pg.get_password().filter(|pw| pw.len() >= 6) {
        let pw = String::from_utf8_lossy(pw).into_owned();
        if shown.contains(pw.as_str()) {
            let mut other = pg.clone();
            other.password(vec![b'Q'; pw.len()]);
            let baseline = render(input, EngineConfig::from_pg_config(other));
            assert!(
                baseline.contains(pw.as_str()),
                "{input:?}: password {pw:?} shown in {shown}"
            );
        }
    }
}

/// The config's Display and Debug and the registry's Debug (or its build
/// error); building must not panic and may fail only with `Error::Config`.
fn render(input: &str, cfg: EngineConfig) -> String {
    let mut shown = format!("{cfg} {cfg:?}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        match Registry::builder().engine("w", cfg).build().await {
            Ok(registry) => shown.push_str(&format!(" {registry:?}")),
            Err(e) => {
                assert!(matches!(e, Error::Config(_)), "{input:?}: {e:?}");
                shown.push_str(&format!(" {e} {e:?}"));
            }
        }
    });
    shown
}

/// The password by syntax: after the first ':' of the user info (the
/// authority ends at the first '/' or '?'), raw and percent-decoded, and
/// `password=` values of key=value strings and query parameters.
fn password_candidates(input: &str) -> Vec<String> {
    let mut out = Vec::new();
    let url = input.starts_with("postgres://") || input.starts_with("postgresql://");
    if let Some((_, rest)) = input.split_once("://").filter(|_| url) {
        let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
        if let Some(at) = authority.rfind('@')
            && let Some((_, pw)) = authority[..at].split_once(':')
        {
            out.push(pw.to_owned());
            out.push(String::from_utf8_lossy(&percent_decode(pw)).into_owned());
        }
    }
    // Query parameters of a URL, or the pairs of a key=value string.
    let pairs: Vec<&str> = if url {
        input
            .split_once('?')
            .map_or(vec![], |(_, q)| q.split('&').collect())
    } else {
        input.split(' ').collect()
    };
    for part in pairs {
        if let Some(v) = part.strip_prefix("password=") {
            out.push(v.trim_matches('\'').to_owned());
        }
    }
    out
}

/// Percent-decoding as the driver does it: invalid escapes are kept.
fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}
