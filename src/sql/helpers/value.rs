//! [`Value`] and [`columns_as_dict`] (feature `value`): any column of a row
//! as a dynamic value, decoded from the binary wire format by hand.
//!
//! Why not postgres-types' `with-*` features: they would replace only the
//! trivial arms (integers, floats, text, bytea already decode in one line
//! each) and uuid, at the price of a dependency, while the rest must print
//! exactly as the server prints it: `numeric` has no `FromSql` of arbitrary
//! precision (rust_decimal stops at 28 digits and has no `NaN` or
//! `Infinity`), chrono, time and jiff cannot hold PostgreSQL's last date
//! (5874897-12-31) and print BC years as negative ones, serde_json would
//! rewrite a `json` document's text, and arrays of several dimensions are
//! refused by `Vec<T>`'s `FromSql`. So the decoding stays here, and the
//! feature keeps it out of the core.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, Kind, Type};

/// One column value of a row, as [`columns_as_dict`] returns it. Decodes
/// any column type (it implements [`FromSql`], so `row.get::<_, Value>(i)`
/// works too):
///
/// | PostgreSQL | `Value` |
/// | --- | --- |
/// | NULL | `Null` |
/// | `boolean` | `Bool` |
/// | `smallint`, `integer`, `bigint`, `oid` | `Int` |
/// | `real`, `double precision` | `Float` |
/// | `numeric` | `Numeric`: the exact decimal text, as PostgreSQL prints it (`NaN`, `Infinity` too) |
/// | `text`, `varchar`, `char(n)`, `name`, `"char"`, `citext`, enums | `Text` |
/// | `uuid` | `Text`, lower-case hyphenated |
/// | `date`, `time`, `timestamp`, `timestamptz` | `Text` in ISO form as PostgreSQL prints it with `DateStyle = ISO` and `TimeZone = UTC` (`2024-03-01 12:00:00.5+00`, `infinity`) |
/// | `bytea` | `Bytes` |
/// | `json`, `jsonb` | `Json`: the document's text |
/// | arrays | `Array`, nested for several dimensions |
/// | domains | as their base type |
/// | anything else | `Other`: the type's name and its binary wire form |
///
/// With the `serde` feature it serialises untagged: `null`, `true`, `7`,
/// `"text"`; `Json` as a string holding the document.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize), serde(untagged))]
#[non_exhaustive]
pub enum Value {
    /// SQL NULL.
    Null,
    /// `boolean`.
    Bool(bool),
    /// `smallint`, `integer`, `bigint`, `oid`.
    Int(i64),
    /// `real`, `double precision`.
    Float(f64),
    /// `numeric`, as exact decimal text.
    Numeric(String),
    /// Text types, enums, and the types shown as text (uuid, dates, times).
    Text(String),
    /// `bytea`.
    Bytes(Vec<u8>),
    /// `json` / `jsonb`: the document's text.
    Json(String),
    /// An array; a multi-dimensional one as arrays of arrays.
    Array(Vec<Value>),
    /// A type this enum does not decode.
    Other {
        /// The PostgreSQL type name, e.g. `interval`.
        type_name: String,
        /// The value in PostgreSQL's binary wire format.
        raw: Vec<u8>,
    },
}

impl<'a> FromSql<'a> for Value {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(decode(ty, raw))
    }

    fn from_sql_null(
        _: &Type,
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Value::Null)
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// A row as a map from column name to [`Value`] (SQLAlchemy's
/// `columns_as_dict`). With two columns of the same name (a join), the
/// later one wins; alias them to keep both.
pub fn columns_as_dict(row: &Row) -> BTreeMap<String, Value> {
    row.columns()
        .iter()
        .enumerate()
        .map(|(i, column)| {
            let value = row.try_get::<_, Value>(i).unwrap_or_else(|_| Value::Other {
                type_name: column.type_().name().to_owned(),
                raw: Vec::new(),
            });
            (column.name().to_owned(), value)
        })
        .collect()
}

/// Decodes one binary value; whatever cannot be decoded becomes `Other`.
fn decode(ty: &Type, raw: &[u8]) -> Value {
    decode_known(ty, raw).unwrap_or_else(|| Value::Other {
        type_name: ty.name().to_owned(),
        raw: raw.to_vec(),
    })
}

fn decode_known(ty: &Type, raw: &[u8]) -> Option<Value> {
    match ty.kind() {
        Kind::Domain(base) => return Some(decode(base, raw)),
        Kind::Enum(_) => return utf8(raw).map(Value::Text),
        Kind::Array(element) => return decode_array(element, raw),
        _ => {}
    }
    Some(match *ty {
        Type::BOOL => Value::Bool(be::<1>(raw)?[0] != 0),
        Type::INT2 => Value::Int(i16::from_be_bytes(be(raw)?).into()),
        Type::INT4 => Value::Int(i32::from_be_bytes(be(raw)?).into()),
        Type::INT8 => Value::Int(i64::from_be_bytes(be(raw)?)),
        Type::OID => Value::Int(u32::from_be_bytes(be(raw)?).into()),
        Type::FLOAT4 => Value::Float(f32::from_be_bytes(be(raw)?).into()),
        Type::FLOAT8 => Value::Float(f64::from_be_bytes(be(raw)?)),
        Type::NUMERIC => Value::Numeric(numeric_text(raw)?),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN | Type::CHAR => {
            Value::Text(utf8(raw)?)
        }
        Type::UUID => Value::Text(uuid_text(be(raw)?)),
        Type::DATE => Value::Text(date_text(i32::from_be_bytes(be(raw)?))),
        Type::TIME => Value::Text(time_text(i64::from_be_bytes(be(raw)?))?),
        Type::TIMESTAMP => Value::Text(timestamp_text(i64::from_be_bytes(be(raw)?), "")),
        Type::TIMESTAMPTZ => Value::Text(timestamp_text(i64::from_be_bytes(be(raw)?), "+00")),
        Type::BYTEA => Value::Bytes(raw.to_vec()),
        Type::JSON => Value::Json(utf8(raw)?),
        Type::JSONB => match raw.split_first() {
            Some((1, doc)) => Value::Json(utf8(doc)?),
            _ => return None,
        },
        _ if ty.name() == "citext" => Value::Text(utf8(raw)?),
        _ => return None,
    })
}

/// Exactly `N` bytes, for a fixed-size value.
fn be<const N: usize>(raw: &[u8]) -> Option<[u8; N]> {
    raw.try_into().ok()
}

fn utf8(raw: &[u8]) -> Option<String> {
    String::from_utf8(raw.to_vec()).ok()
}

/// Reads big-endian fields off the front of a binary value.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn i16(&mut self) -> Option<i16> {
        Some(i16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
}

/// An array in binary form: dimensions, lower bounds, then each element
/// with its length (-1 for NULL).
fn decode_array(element: &Type, raw: &[u8]) -> Option<Value> {
    let mut r = Reader(raw);
    let ndim = usize::try_from(r.i32()?).ok()?;
    let _has_nulls = r.i32()?;
    let _element_oid = r.i32()?;
    let mut dims = Vec::with_capacity(ndim.min(6));
    for _ in 0..ndim {
        dims.push(usize::try_from(r.i32()?).ok()?);
        let _lower_bound = r.i32()?;
    }
    let total = if dims.is_empty() {
        0
    } else {
        dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))?
    };
    let mut items = Vec::with_capacity(total.min(raw.len()));
    for _ in 0..total {
        let len = r.i32()?;
        items.push(if len < 0 {
            Value::Null
        } else {
            decode(element, r.take(usize::try_from(len).ok()?)?)
        });
    }
    if !r.0.is_empty() {
        return None;
    }
    let mut items = items.into_iter();
    Some(nest(&dims, &mut items))
}

fn nest(dims: &[usize], items: &mut impl Iterator<Item = Value>) -> Value {
    match dims {
        [] => Value::Array(Vec::new()),
        [n] => Value::Array(items.take(*n).collect()),
        [n, inner @ ..] => Value::Array((0..*n).map(|_| nest(inner, items)).collect()),
    }
}

/// `numeric` in binary form: digit count, weight (of the first base-10000
/// digit), sign, display scale, then the base-10000 digits.
fn numeric_text(raw: &[u8]) -> Option<String> {
    let mut r = Reader(raw);
    let ndigits = usize::try_from(r.i16()?).ok()?;
    let weight = i32::from(r.i16()?);
    let sign = r.u16()?;
    let dscale = usize::from(r.u16()?);
    let digits = (0..ndigits)
        .map(|_| r.i16().filter(|d| (0..10_000).contains(d)))
        .collect::<Option<Vec<i16>>>()?;
    if !r.0.is_empty() {
        return None;
    }
    let mut out = match sign {
        0x0000 => String::new(),
        0x4000 => String::from("-"),
        0xC000 => return Some("NaN".into()),
        0xD000 => return Some("Infinity".into()),
        0xF000 => return Some("-Infinity".into()),
        _ => return None,
    };
    let digit = |i: i32| {
        usize::try_from(i)
            .ok()
            .and_then(|i| digits.get(i).copied())
            .unwrap_or(0)
    };
    if weight < 0 {
        out.push('0');
    } else {
        let _ = write!(out, "{}", digit(0));
        for i in 1..=weight {
            let _ = write!(out, "{:04}", digit(i));
        }
    }
    if dscale > 0 {
        let mut fraction = String::with_capacity(dscale + 4);
        let mut i = weight + 1;
        while fraction.len() < dscale {
            let _ = write!(fraction, "{:04}", digit(i));
            i += 1;
        }
        fraction.truncate(dscale);
        out.push('.');
        out.push_str(&fraction);
    }
    Some(out)
}

fn uuid_text(b: [u8; 16]) -> String {
    let mut out = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// Days from 1970-01-01 to the proleptic Gregorian (year, month, day), year
/// 0 being 1 BC (the classic era-based civil-from-days conversion).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days between 1970-01-01 and PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;
const MICROS_PER_DAY: i64 = 86_400_000_000;

/// `YYYY-MM-DD` for a day counted from 2000-01-01, and whether it is BC.
fn ymd(days_since_2000: i64) -> (String, bool) {
    let (year, month, day) = civil_from_days(days_since_2000 + PG_EPOCH_DAYS);
    let (year, bc) = if year <= 0 {
        (1 - year, true)
    } else {
        (year, false)
    };
    (format!("{year:04}-{month:02}-{day:02}"), bc)
}

fn bc_suffix(bc: bool) -> &'static str {
    if bc { " BC" } else { "" }
}

fn date_text(days: i32) -> String {
    match days {
        i32::MAX => "infinity".into(),
        i32::MIN => "-infinity".into(),
        _ => {
            let (date, bc) = ymd(days.into());
            format!("{date}{}", bc_suffix(bc))
        }
    }
}

/// `HH:MM:SS` with the fraction, trailing zeros dropped, as PostgreSQL prints it.
fn time_text(micros: i64) -> Option<String> {
    if !(0..=MICROS_PER_DAY).contains(&micros) {
        return None;
    }
    let secs = micros / 1_000_000;
    let mut out = format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    let fraction = micros % 1_000_000;
    if fraction != 0 {
        let digits = format!("{fraction:06}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
    Some(out)
}

/// A timestamp counted in microseconds from 2000-01-01 00:00 (UTC for
/// `timestamptz`), with `zone` after the time.
fn timestamp_text(micros: i64, zone: &str) -> String {
    match micros {
        i64::MAX => "infinity".into(),
        i64::MIN => "-infinity".into(),
        _ => {
            let (date, bc) = ymd(micros.div_euclid(MICROS_PER_DAY));
            let time = time_text(micros.rem_euclid(MICROS_PER_DAY)).unwrap_or_default();
            format!("{date} {time}{zone}{}", bc_suffix(bc))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(ndigits: i16, weight: i16, sign: u16, dscale: u16, digits: &[i16]) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.extend(ndigits.to_be_bytes());
        raw.extend(weight.to_be_bytes());
        raw.extend(sign.to_be_bytes());
        raw.extend(dscale.to_be_bytes());
        for d in digits {
            raw.extend(d.to_be_bytes());
        }
        raw
    }

    #[test]
    fn numeric_text_reads_base_10000_digits() {
        assert_eq!(numeric_text(&numeric(0, 0, 0, 0, &[])).unwrap(), "0");
        assert_eq!(
            numeric_text(&numeric(3, 1, 0x4000, 6, &[12, 3456, 7800])).unwrap(),
            "-123456.780000"
        );
        assert_eq!(
            numeric_text(&numeric(1, -2, 0, 5, &[1000])).unwrap(),
            "0.00001"
        );
        assert_eq!(numeric_text(&numeric(0, 0, 0xC000, 0, &[])).unwrap(), "NaN");
        // Malformed: a digit out of range, trailing bytes, a bad sign.
        assert!(numeric_text(&numeric(1, 0, 0, 0, &[10_000])).is_none());
        assert!(numeric_text(&numeric(0, 0, 0x1234, 0, &[])).is_none());
        let mut long = numeric(0, 0, 0, 0, &[]);
        long.push(0);
        assert!(numeric_text(&long).is_none());
    }

    #[test]
    fn dates_and_times_print_like_postgres() {
        assert_eq!(date_text(0), "2000-01-01");
        assert_eq!(date_text(-1), "1999-12-31");
        assert_eq!(date_text(i32::MAX), "infinity");
        assert_eq!(time_text(0).unwrap(), "00:00:00");
        assert_eq!(time_text(MICROS_PER_DAY).unwrap(), "24:00:00");
        assert_eq!(time_text(3_723_450_000).unwrap(), "01:02:03.45");
        assert_eq!(timestamp_text(-1, "+00"), "1999-12-31 23:59:59.999999+00");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-719_528), (0, 1, 1)); // 1 BC
    }
}
