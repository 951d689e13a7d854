"""The analytics store (ClickHouse): an embedded chDB path locally, a server in production.

Only the ``billing_clickhouse`` connection decides which: ``extra.interface = "chdb"`` with
``extra.path`` selects the in-process engine; anything else is a ClickHouse server over
HTTP(S). chDB allows one process per data path, so callers keep ClickHouse work in one
process at a time (the ``billing_clickhouse`` pool in Airflow).

Analysts' SQL (:func:`read_only_query`, ``billing sql``) is read-only by construction, on
both setups (docs/ANALYSTS.md):

1. it runs on a session with ``readonly=1``, checked before every query: the engine then
   refuses writes, DDL, settings changes and every table function that needs CREATE
   TEMPORARY TABLE (``file``, ``url``, ``postgresql``, ``s3``, ``remote``, ...);
2. ClickHouse's own parser reads the text (``formatQuerySingleLine``, the query passed as a
   bound parameter): more than one statement, or none, is its syntax error, and what runs
   is the canonical statement it printed, so what was checked is what runs;
3. that statement must be a read (SELECT/WITH/SHOW/DESCRIBE/EXPLAIN/EXISTS) without
   ``INTO OUTFILE`` and without the functions that embedded chDB runs outside the readonly
   check: an outfile is written in-process, the scalar ``file(path)`` reads any file the
   user can (a server confines it to ``user_files_path``), ``python()`` reads objects of
   the calling Python process. A ClickHouse server never accepts INTO OUTFILE over HTTP.
"""

from __future__ import annotations

import re

from billing.platform import connections as conns
from billing.platform.errors import ConfigError, ServiceError

READ_STATEMENTS = ("SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS")
# Functions chDB runs without the readonly check (see above); matched case-insensitively.
HOST_FUNCTIONS = frozenset({"file", "python"})
_READONLY = 164  # ClickHouse error code READONLY


def is_embedded(conn: conns.Conn | None = None) -> bool:
    c = conn or conns.get(conns.CLICKHOUSE)
    return c.extra.get("interface") == "chdb"


def client(conn: conns.Conn | None = None, **settings):
    import clickhouse_connect

    c = conn or conns.get(conns.CLICKHOUSE)
    if is_embedded(c):
        path = c.extra.get("path")
        if not path:
            raise ConfigError("connection billing_clickhouse: interface chdb needs extra.path")
        return clickhouse_connect.get_client(interface="chdb", path=path, settings=settings or None)
    secure, port = conns.clickhouse_http(c)
    return clickhouse_connect.get_client(
        host=c.host or "localhost",
        port=port,
        username=c.login or "default",
        password=c.password or "",
        database=c.schema or "default",
        secure=secure,
        settings=settings or None,
    )


def read_only_query(sql: str):
    """Run an analyst's query on a read-only session; refuse anything that is not one read.

    Every refusal and every ClickHouse error (unknown table, syntax) is a one-line
    :class:`~billing.platform.errors.ConfigError`; an unreachable store is a ServiceError.
    """
    from clickhouse_connect.driver.exceptions import Error as ClickHouseError

    try:
        c = client(readonly=1)
    except ClickHouseError as exc:
        raise ServiceError(f"cannot open the analytics store: {clickhouse_message(exc)}") from None
    try:
        try:
            canonical, readonly = c.query(
                "SELECT formatQuerySingleLine({q:String}), getSetting('readonly')",
                parameters={"q": sql},
            ).result_rows[0]
        except ClickHouseError as exc:
            raise ConfigError(f"not one ClickHouse statement: {clickhouse_message(exc)}") from None
        if str(readonly) != "1":  # e.g. a server profile or a client that dropped the setting
            raise ServiceError(
                f"the analytics session is not read-only (readonly={readonly}); refusing to run"
            )
        check_read_statement(canonical)
        try:
            return c.query(canonical)
        except ClickHouseError as exc:
            if getattr(exc, "code", None) == _READONLY or "(READONLY)" in str(exc):
                raise ConfigError(
                    "billing sql is read-only: ClickHouse refused it "
                    f"({clickhouse_message(exc)}); no writes, settings or table functions "
                    "such as file(), url() or postgresql()"
                ) from None
            raise ConfigError(f"ClickHouse: {clickhouse_message(exc)}") from None
    finally:
        c.close()


def check_read_statement(canonical: str) -> None:
    """``canonical``: one statement as ClickHouse's formatter prints it (no comments, one
    quoting style). Lexed with sqlglot's ClickHouse tokenizer, every clause as tokens."""
    from sqlglot.dialects.clickhouse import ClickHouse
    from sqlglot.errors import TokenError
    from sqlglot.tokens import TokenType

    class _Tokenizer(ClickHouse.Tokenizer):
        COMMANDS: set = set()  # EXPLAIN/SHOW bodies as tokens too, not one opaque string

    try:
        tokens = _Tokenizer().tokenize(canonical)
    except TokenError as exc:
        raise ConfigError(f"cannot read the statement: {exc}") from None
    first = tokens[0].text.upper() if tokens else ""
    if first not in READ_STATEMENTS:
        raise ConfigError(
            "only a single read-only statement (SELECT/WITH/SHOW/DESCRIBE/EXPLAIN/EXISTS) "
            f"is allowed, got {first or 'nothing'}"
        )
    for prev, a, b in zip([None, *tokens], tokens, tokens[1:], strict=False):
        if a.token_type == TokenType.INTO and b.token_type == TokenType.VAR:
            if b.text.upper() == "OUTFILE":
                raise ConfigError("billing sql is read-only: INTO OUTFILE is not allowed")
        table_function_file = (
            a.text.lower() == "file"
            and prev is not None
            and prev.token_type in (TokenType.FROM, TokenType.JOIN)
        )  # FROM file(...): the engine refuses that one itself (readonly=1)
        if (
            b.token_type == TokenType.L_PAREN
            and a.token_type not in (TokenType.STRING, TokenType.NATIONAL_STRING)
            and a.text.lower() in HOST_FUNCTIONS
            and not table_function_file
        ):
            raise ConfigError(
                f"billing sql is read-only: {a.text}() reads the local machine, not allowed"
            )


def clickhouse_message(exc: Exception) -> str:
    """ClickHouse's own message in one line, without the version trailer or our wrapper."""
    text = " ".join(str(exc).split())
    text = re.split(r"DB::(?:Net)?Exception: ", text)[-1]  # the innermost of nested ones
    text = re.sub(r"\s*\(version [^)]*\)", "", text)
    text = re.sub(r"(\([A-Z_]+\))(?:\.? \1)+", r"\1", text)  # "(READONLY). (READONLY)"
    text = re.sub(r"\s*:?\s*In scope SELECT formatQuerySingleLine\(.*?\)\.?(?=\s*\(|$)", "", text)
    return text.strip()


# ---------------------------------------------------------------- ClickHouse -> Postgres
POSTGRES_COLLECTION = "billing_postgres"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def postgres_collection_name(conn: conns.Conn | None = None) -> str:
    """The named collection ClickHouse reads Postgres through (dbt's rollup staging model):
    ``extra.postgres_collection`` of the clickhouse connection, default ``billing_postgres``.
    """
    c = conn or conns.get(conns.CLICKHOUSE)
    return _collection(str(c.extra.get("postgres_collection") or POSTGRES_COLLECTION))


def _collection(name: str) -> str:
    if not _IDENTIFIER.match(name):
        raise ConfigError(f"connection billing_clickhouse: bad postgres_collection {name!r}")
    return name


def create_postgres_collection(ch, name: str, pg: conns.Conn, host: str | None = None) -> None:
    """(Re)create the named collection ``name`` with ``pg``'s credentials on ``ch``.

    Embedded chDB only (the dbt child calls it before dbt, :func:`drop_collection` after):
    dbt's compiled SQL then names the collection instead of holding the password. On a
    ClickHouse server an admin provisions the collection (docs/ANALYSTS.md).
    """
    from clickhouse_connect.driver.binding import format_str

    keys = {
        "host": host or pg.host or "127.0.0.1",
        "port": str(pg.port or 5432),
        "database": pg.schema or "billing",
        "user": pg.login or "",
        "password": pg.password or "",
    }
    body = ", ".join(f"{k} = {format_str(v)}" for k, v in keys.items())  # DDL takes no binds
    drop_collection(ch, name)
    ch.command(f"CREATE NAMED COLLECTION {_collection(name)} AS {body}")


def drop_collection(ch, name: str) -> None:
    ch.command(f"DROP NAMED COLLECTION IF EXISTS {_collection(name)}")
