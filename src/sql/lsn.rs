//! WAL positions (`16/B374D848`) as comparable numbers, for read-your-writes
//! on replicas.

use tokio_postgres::SimpleQueryMessage;

/// The WAL insert position of the primary, read right after a write.
pub(crate) const INSERT_LSN_SQL: &str = "SELECT pg_current_wal_insert_lsn()::text";

/// `16/B374D848` → a comparable number.
pub(crate) fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// The first column of the first row of a simple query, as an LSN.
pub(crate) fn first_lsn(messages: &[SimpleQueryMessage]) -> Option<u64> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0).and_then(parse_lsn),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_compare_as_numbers() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374D848));
        assert!(parse_lsn("1/FF").unwrap() > parse_lsn("0/FFFFFFFF").unwrap());
        assert_eq!(parse_lsn("nonsense"), None);
    }
}
