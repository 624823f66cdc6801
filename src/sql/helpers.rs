//! The `Table` query helpers (their docs are on [`Table`]).

use std::fmt::Write as _;

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::error::{Error, Result};
use crate::sql::queryable::Queryable;

#[cfg(feature = "value")]
mod value;
#[cfg(feature = "value")]
pub use value::{Value, columns_as_dict};

/// The longest identifier PostgreSQL keeps (`NAMEDATALEN - 1` bytes in a
/// default build). The server silently truncates longer names, which could
/// address a different object, so [`quote_ident`] refuses them.
pub const MAX_IDENTIFIER_LEN: usize = 63;

/// Quotes one identifier for SQL: wraps it in double quotes and doubles the
/// quotes inside, so any name — `x"; DROP TABLE y; --` included — stays one
/// identifier. The name is taken literally: `"Users"` is not `"users"`
/// (PostgreSQL folds only unquoted names to lower case), and a dot is part of
/// the name, not a schema separator.
///
/// Refuses, with [`Error::Usage`], an empty name, a name containing a NUL
/// byte, and one longer than [`MAX_IDENTIFIER_LEN`] bytes.
///
/// ```
/// assert_eq!(pgassist::quote_ident(r#"a"b"#).unwrap(), r#""a""b""#);
/// assert!(pgassist::quote_ident("").is_err());
/// ```
pub fn quote_ident(name: &str) -> Result<String> {
    if name.is_empty() {
        return Err(Error::Usage("an identifier cannot be empty".into()));
    }
    if name.contains('\0') {
        return Err(Error::Usage(format!(
            "identifier {name:?} contains a NUL byte"
        )));
    }
    if name.len() > MAX_IDENTIFIER_LEN {
        return Err(Error::Usage(format!(
            "identifier of {} bytes is longer than PostgreSQL's {MAX_IDENTIFIER_LEN}",
            name.len()
        )));
    }
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    Ok(out)
}

/// Escapes `%`, `_` and `\` so that `value` matches only itself inside a
/// LIKE / ILIKE pattern written with `ESCAPE '\'`.
///
/// ```
/// assert_eq!(pgassist::escape_like(r"50%_a\b"), r"50\%\_a\\b");
/// ```
pub fn escape_like(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    for c in value.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The ESCAPE clause that goes with [`escape_like`]. `E'\\'` is one
/// backslash whatever `standard_conforming_strings` says.
const LIKE_ESCAPE: &str = r"ESCAPE E'\\'";

/// Sort direction of an ORDER BY column.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Ascending (`ASC`).
    #[default]
    Asc,
    /// Descending (`DESC`).
    Desc,
}

impl Direction {
    fn sql(self) -> &'static str {
        match self {
            Direction::Asc => "ASC",
            Direction::Desc => "DESC",
        }
    }
}

/// How [`Table::get_by_column_similar`] matches: the input is escaped, then
/// used as a case-insensitive (ILIKE) prefix or substring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Similar {
    /// The column starts with the input (`ILIKE 'input%'`).
    Prefix,
    /// The column contains the input (`ILIKE '%input%'`).
    Contains,
}

/// One ORDER BY entry of a [`RangeQuery`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct OrderBy<'a> {
    column: &'a str,
    direction: Direction,
    case_insensitive: bool,
}

/// A page of rows for [`Table::get_range`]: equality filters, ORDER BY
/// columns, offset and limit. Built step by step:
///
/// ```
/// use pgassist::{Direction, RangeQuery};
/// let owner = 7_i64;
/// let q = RangeQuery::new()
///     .filter("owner_id", &owner)
///     .order_by_case_insensitive("name", Direction::Asc)
///     .order_by("created_at", Direction::Desc)
///     .offset(40)
///     .limit(20);
/// # let _ = q;
/// ```
#[derive(Clone, Debug, Default)]
pub struct RangeQuery<'a> {
    offset: u64,
    limit: Option<u64>,
    order: Vec<OrderBy<'a>>,
    filters: Vec<(&'a str, &'a (dyn ToSql + Sync))>,
}

impl<'a> RangeQuery<'a> {
    /// All rows, in key order.
    pub fn new() -> Self {
        Self::default()
    }

    /// Skips the first `n` rows (`OFFSET`, sent as a parameter).
    pub fn offset(mut self, n: u64) -> Self {
        self.offset = n;
        self
    }

    /// Returns at most `n` rows (`LIMIT`, sent as a parameter).
    pub fn limit(mut self, n: u64) -> Self {
        self.limit = Some(n);
        self
    }

    /// Orders by `column`. Columns are applied in the order given; the
    /// table's key column always comes last, so pages are stable. The column
    /// must be in the whitelist passed to [`Table::get_range`].
    pub fn order_by(mut self, column: &'a str, direction: Direction) -> Self {
        self.order.push(OrderBy {
            column,
            direction,
            case_insensitive: false,
        });
        self
    }

    /// Orders by `lower(column)`: `"b"` sorts between `"A"` and `"C"`.
    /// For text columns; otherwise as [`RangeQuery::order_by`].
    pub fn order_by_case_insensitive(mut self, column: &'a str, direction: Direction) -> Self {
        self.order.push(OrderBy {
            column,
            direction,
            case_insensitive: true,
        });
        self
    }

    /// Keeps rows whose `column` equals `value` (`column = $n`; a NULL value
    /// matches nothing). Several filters are combined with AND. The column
    /// is quoted, never interpreted, but it is not checked against the
    /// whitelist: filter columns should come from code, not from a request.
    pub fn filter(mut self, column: &'a str, value: &'a (dyn ToSql + Sync)) -> Self {
        self.filters.push((column, value));
        self
    }
}

/// Query helpers over one table, for anything [`Queryable`].
///
/// A [`Table`] names a table and its key column; its methods build the few
/// statements every application writes by hand — fetch by key, by a column
/// case-insensitively, by prefix, a page of rows, find-or-create — and run
/// them on a [`crate::Session`], a [`crate::Transaction`] or a reference to
/// either.
///
/// - Identifiers (table, schema, columns) are always double-quoted, with
///   inner quotes doubled ([`quote_ident`]): a hostile name addresses a
///   column literally spelled that way, or fails; it never becomes SQL.
/// - Values are always bound parameters, never part of the statement text.
/// - LIKE patterns built from input have `%`, `_` and `\` escaped
///   ([`escape_like`]).
/// - ORDER BY columns of [`Table::get_range`] must be in a whitelist the
///   caller gives ([`Error::ColumnNotAllowed`] otherwise).
///
/// With the `value` feature, `Value` and `columns_as_dict` read any row as
/// a map from column name to a dynamic value.
///
/// ```no_run
/// use pgassist::{Direction, Queryable, RangeQuery, Table};
///
/// # async fn demo(db: &impl Queryable) -> Result<(), pgassist::Error> {
/// let users = Table::new("app.users").key("id");
/// let one = users.get_by_id(db, &7_i64).await?;
/// let page = users
///     .get_range(db, &RangeQuery::new().order_by("email", Direction::Asc).limit(20), &["email"])
///     .await?;
/// let (row, created) = users.find_or_create(db, &[("email", &"ann@example.com")], &[]).await?;
/// # let _ = (one, page, row, created); Ok(()) }
/// ```
///
/// A table and its key column, with helpers that build and run common
/// statements on anything [`Queryable`]. Cheap to clone; it holds names only.
///
/// Names are checked when a statement is built, so a bad one is an
/// [`Error::Usage`] from the call that used it, before anything is sent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Table {
    /// `[name]` or `[schema, name]`; anything else is refused when used.
    parts: Vec<String>,
    key: String,
}

impl Table {
    /// A table by name, with key column `id`. A dot separates a schema:
    /// `"app.users"` is table `users` in schema `app` (for a name that
    /// contains a dot use [`Table::with_schema`]). Names are taken
    /// literally, case included.
    pub fn new(name: &str) -> Table {
        Table {
            parts: name.split('.').map(str::to_owned).collect(),
            key: "id".to_owned(),
        }
    }

    /// A table in an explicit schema; neither name is split on dots.
    pub fn with_schema(schema: &str, name: &str) -> Table {
        Table {
            parts: vec![schema.to_owned(), name.to_owned()],
            key: "id".to_owned(),
        }
    }

    /// Sets the key column used by [`Table::get_by_id`],
    /// [`Table::get_by_ids`] and as the final ORDER BY column (default `id`).
    pub fn key(mut self, column: &str) -> Table {
        self.key = column.to_owned();
        self
    }

    /// The key column.
    pub fn key_column(&self) -> &str {
        &self.key
    }

    /// The table's name as given (`schema.name` when qualified), for messages.
    pub fn name(&self) -> String {
        self.parts.join(".")
    }

    /// The quoted, possibly schema-qualified name to put in your own SQL:
    /// `"app"."users"`.
    pub fn sql_name(&self) -> Result<String> {
        match self.parts.as_slice() {
            [name] => quote_ident(name),
            [schema, name] => Ok(format!("{}.{}", quote_ident(schema)?, quote_ident(name)?)),
            _ => Err(Error::Usage(format!(
                "table name {:?} has more than one dot; use Table::with_schema",
                self.name()
            ))),
        }
    }

    fn multiple(&self, column: &str) -> Error {
        Error::MultipleRows {
            table: self.name(),
            column: column.to_owned(),
        }
    }

    /// `rows` when it holds at most one row, else [`Error::MultipleRows`].
    fn at_most_one(&self, rows: Vec<Row>, column: &str) -> Result<Option<Row>> {
        if rows.len() > 1 {
            return Err(self.multiple(column));
        }
        Ok(rows.into_iter().next())
    }

    /// The row whose key column equals `id`, if any.
    /// (`SELECT * FROM t WHERE key = $1`; `id` must have the key's Rust type,
    /// e.g. `i32` for `integer`, `i64` for `bigint`.)
    pub async fn get_by_id(
        &self,
        db: &impl Queryable,
        id: &(dyn ToSql + Sync),
    ) -> Result<Option<Row>> {
        let sql = format!(
            "SELECT * FROM {} WHERE {} = $1 LIMIT 2",
            self.sql_name()?,
            quote_ident(&self.key)?
        );
        let rows = db.query(&sql, &[id]).await?;
        self.at_most_one(rows, &self.key)
    }

    /// The rows whose key is one of `ids`, in one statement
    /// (`WHERE key = ANY($1)`, the ids bound as one array), ordered by key.
    /// Ids that match nothing are skipped; an empty slice sends nothing.
    pub async fn get_by_ids<T: ToSql + Sync>(
        &self,
        db: &impl Queryable,
        ids: &[T],
    ) -> Result<Vec<Row>> {
        let key = quote_ident(&self.key)?;
        let sql = format!(
            "SELECT * FROM {} WHERE {key} = ANY($1) ORDER BY {key}",
            self.sql_name()?
        );
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        db.query(&sql, &[&ids]).await
    }

    /// The rows where `lower(column) = lower(value)`, ordered by key. Unless
    /// `allow_many`, more than one match is an [`Error::MultipleRows`] (at
    /// most two rows are fetched to find out).
    pub async fn get_by_column_lower(
        &self,
        db: &impl Queryable,
        column: &str,
        value: &str,
        allow_many: bool,
    ) -> Result<Vec<Row>> {
        let sql = format!(
            "SELECT * FROM {} WHERE lower({}) = lower($1::text) ORDER BY {}{}",
            self.sql_name()?,
            quote_ident(column)?,
            quote_ident(&self.key)?,
            if allow_many { "" } else { " LIMIT 2" }
        );
        let rows = db.query(&sql, &[&value]).await?;
        if !allow_many && rows.len() > 1 {
            return Err(self.multiple(column));
        }
        Ok(rows)
    }

    /// The rows whose `column` starts with or contains `value`, ignoring
    /// case (ILIKE), ordered by that column then the key; at most `limit`
    /// rows when given. `%`, `_` and `\` in `value` match only themselves.
    pub async fn get_by_column_similar(
        &self,
        db: &impl Queryable,
        column: &str,
        value: &str,
        how: Similar,
        limit: Option<u64>,
    ) -> Result<Vec<Row>> {
        let col = quote_ident(column)?;
        let mut sql = format!(
            "SELECT * FROM {} WHERE {col} ILIKE $1 {LIKE_ESCAPE} ORDER BY {col}, {}",
            self.sql_name()?,
            quote_ident(&self.key)?
        );
        let escaped = escape_like(value);
        let pattern = match how {
            Similar::Prefix => format!("{escaped}%"),
            Similar::Contains => format!("%{escaped}%"),
        };
        let limit = limit.map(to_i64).transpose()?;
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&pattern];
        if let Some(limit) = &limit {
            sql.push_str(" LIMIT $2");
            params.push(limit);
        }
        db.query(&sql, &params).await
    }

    /// The row whose `column` equals `value` exactly; failing that, the row
    /// that equals it ignoring case (ILIKE on the escaped value, so no
    /// wildcards). Two statements at most. Several rows at the step that
    /// finds something is an [`Error::MultipleRows`]: `"alice"` finds
    /// `alice` even when `Alice` exists, but `"ALICE"` then is ambiguous.
    pub async fn get_by_column_exact_then_ilike(
        &self,
        db: &impl Queryable,
        column: &str,
        value: &str,
    ) -> Result<Option<Row>> {
        let table = self.sql_name()?;
        let col = quote_ident(column)?;
        let exact = format!("SELECT * FROM {table} WHERE {col} = $1 LIMIT 2");
        let rows = db.query(&exact, &[&value]).await?;
        if let Some(row) = self.at_most_one(rows, column)? {
            return Ok(Some(row));
        }
        let ilike = format!("SELECT * FROM {table} WHERE {col} ILIKE $1 {LIKE_ESCAPE} LIMIT 2");
        let rows = db.query(&ilike, &[&escape_like(value)]).await?;
        self.at_most_one(rows, column)
    }

    /// A page of rows: `SELECT * … WHERE filters ORDER BY … , key LIMIT …
    /// OFFSET …`. Every ORDER BY column must appear in `allowed_order`
    /// (exact, case-sensitive match), else [`Error::ColumnNotAllowed`] and
    /// nothing is sent; an empty whitelist allows no ORDER BY column. The key
    /// column is always the last sort key (ascending), unless already
    /// ordered on, so offset paging is stable.
    pub async fn get_range(
        &self,
        db: &impl Queryable,
        query: &RangeQuery<'_>,
        allowed_order: &[&str],
    ) -> Result<Vec<Row>> {
        for o in &query.order {
            if !allowed_order.contains(&o.column) {
                return Err(Error::ColumnNotAllowed {
                    column: o.column.to_owned(),
                    allowed: allowed_order.join(", "),
                });
            }
        }
        let mut sql = format!("SELECT * FROM {}", self.sql_name()?);
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        for (column, value) in &query.filters {
            sql.push_str(if params.is_empty() {
                " WHERE "
            } else {
                " AND "
            });
            params.push(*value);
            let _ = write!(sql, "{} = ${}", quote_ident(column)?, params.len());
        }
        sql.push_str(" ORDER BY ");
        for o in &query.order {
            let col = quote_ident(o.column)?;
            if o.case_insensitive {
                let _ = write!(sql, "lower({col}) {}, ", o.direction.sql());
            } else {
                let _ = write!(sql, "{col} {}, ", o.direction.sql());
            }
        }
        let key_ordered = query
            .order
            .iter()
            .any(|o| o.column == self.key && !o.case_insensitive);
        if key_ordered {
            sql.truncate(sql.len() - 2);
        } else {
            let _ = write!(sql, "{} ASC", quote_ident(&self.key)?);
        }
        let limit = query.limit.map(to_i64).transpose()?;
        let offset = to_i64(query.offset)?;
        if let Some(limit) = &limit {
            params.push(limit);
            let _ = write!(sql, " LIMIT ${}", params.len());
        }
        if offset > 0 {
            params.push(&offset);
            let _ = write!(sql, " OFFSET ${}", params.len());
        }
        db.query(&sql, &params).await
    }

    /// Finds the row whose `find` columns equal the given values, or creates
    /// it from `find` and `create` together; returns the row and whether
    /// this call created it. Race-free: concurrent callers with the same key
    /// all get the one row, and exactly one of them sees `true`.
    ///
    /// It runs `INSERT … ON CONFLICT (find columns) DO NOTHING RETURNING *`;
    /// when that returns nothing the row exists, and `SELECT * … WHERE` the
    /// find columns reads it. Should the row be deleted between the two, it
    /// tries once more, then gives up with [`Error::RowVanished`].
    ///
    /// Requirements: a unique index or constraint on exactly the `find`
    /// columns (otherwise the server refuses the ON CONFLICT, SQLSTATE
    /// 42P10), and no NULL among the find values (NULLs never conflict, so
    /// every call would insert). `create` values are used only when
    /// inserting. In a REPEATABLE READ or SERIALIZABLE transaction a row
    /// committed after the snapshot makes the INSERT fail with a
    /// serialization failure ([`Error::is_retryable`]).
    ///
    /// An empty `find`, or a column named twice, is an [`Error::Usage`].
    pub async fn find_or_create(
        &self,
        db: &impl Queryable,
        find: &[(&str, &(dyn ToSql + Sync))],
        create: &[(&str, &(dyn ToSql + Sync))],
    ) -> Result<(Row, bool)> {
        if find.is_empty() {
            return Err(Error::Usage(
                "find_or_create needs at least one column to find by".into(),
            ));
        }
        let mut columns = Vec::with_capacity(find.len() + create.len());
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(columns.capacity());
        for (i, (column, value)) in find.iter().chain(create).enumerate() {
            if find.iter().chain(create).take(i).any(|(c, _)| c == column) {
                return Err(Error::Usage(format!(
                    "find_or_create: column {column:?} is given twice"
                )));
            }
            columns.push(quote_ident(column)?);
            params.push(*value);
        }
        let table = self.sql_name()?;
        let find_names = find.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ");
        let key_columns = &columns[..find.len()];
        let placeholders: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
        let insert = format!(
            "INSERT INTO {table} ({}) VALUES ({}) ON CONFLICT ({}) DO NOTHING RETURNING *",
            columns.join(", "),
            placeholders.join(", "),
            key_columns.join(", ")
        );
        let conditions: Vec<String> = key_columns
            .iter()
            .zip(&placeholders)
            .map(|(c, p)| format!("{c} = {p}"))
            .collect();
        let select = format!(
            "SELECT * FROM {table} WHERE {} LIMIT 2",
            conditions.join(" AND ")
        );
        for _attempt in 0..2 {
            if let Some(row) = db.query_opt(&insert, &params).await? {
                return Ok((row, true));
            }
            let rows = db.query(&select, &params[..find.len()]).await?;
            if let Some(row) = self.at_most_one(rows, &find_names)? {
                return Ok((row, false));
            }
        }
        Err(Error::RowVanished { table: self.name() })
    }
}

fn to_i64(n: u64) -> Result<i64> {
    i64::try_from(n).map_err(|_| Error::Usage(format!("{n} is out of range for OFFSET / LIMIT")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_ident_doubles_quotes_and_refuses_bad_names() {
        assert_eq!(quote_ident("users").unwrap(), r#""users""#);
        assert_eq!(
            quote_ident(r#"x"; DROP TABLE y; --"#).unwrap(),
            r#""x""; DROP TABLE y; --""#
        );
        assert_eq!(quote_ident(r#""""#).unwrap(), r#""""""""#);
        for bad in ["", "a\0b", &"x".repeat(64)] {
            assert!(matches!(quote_ident(bad), Err(Error::Usage(_))), "{bad:?}");
        }
        assert!(quote_ident(&"é".repeat(31)).is_ok()); // 62 bytes
        assert!(quote_ident(&"é".repeat(32)).is_err()); // 64 bytes
    }

    #[test]
    fn table_names_split_on_one_dot() {
        assert_eq!(Table::new("users").sql_name().unwrap(), r#""users""#);
        assert_eq!(
            Table::new("app.Users").sql_name().unwrap(),
            r#""app"."Users""#
        );
        assert_eq!(
            Table::with_schema("app", "odd.name").sql_name().unwrap(),
            r#""app"."odd.name""#
        );
        for bad in ["a.b.c", ".users", "app.", ""] {
            assert!(
                matches!(Table::new(bad).sql_name(), Err(Error::Usage(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn escape_like_escapes_wildcards_and_the_escape() {
        assert_eq!(escape_like("plain"), "plain");
        assert_eq!(escape_like("100%"), r"100\%");
        assert_eq!(escape_like("a_b"), r"a\_b");
        assert_eq!(escape_like(r"c:\d"), r"c:\\d");
    }
}
