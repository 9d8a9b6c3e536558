"""A PostgREST stand-in: the subset of `/rest/v1` that supabase-js uses in our frontend.

PostgREST (Haskell) cannot be installed here, so the devstack serves the few calls the
frontend helper and the demo page make, faithfully enough that supabase-js works
against it unchanged and the project's RLS policies decide, exactly as on Supabase:

- `GET /rest/v1/<table>?select=a,b&col=eq.v&order=c.desc&limit=n&offset=m`
- `POST /rest/v1/<table>` (one object or an array; `columns=`; `Prefer: return=
  representation|minimal`, `missing=default`)
- `PATCH /rest/v1/<table>?<filters>` (same `Prefer`)
- `POST /rest/v1/rpc/<function>` with named arguments (scalar -> JSON, set -> array)
- `Accept: application/vnd.pgrst.object+json` (supabase-js `.single()`), 406 PGRST116
  otherwise; `Accept-Profile` / `Content-Profile` limited to the exposed schemas.

Each request runs in one transaction on the real Postgres, as PostgREST does it:
`SET LOCAL ROLE <jwt role>` (anon without a token), `request.jwt.claims`,
`request.method`, `request.path` and `request.headers` set transaction-locally, then
one statement whose result Postgres itself serialises to JSON (so timestamps, uuids
and jsonb look exactly as PostgREST returns them). Errors keep PostgREST's body
`{"code","details","hint","message"}` and its SQLSTATE → HTTP status table; JWT
failures are 401 with `PGRST301` / `PGRST303` and a `WWW-Authenticate` header.

The API gateway in front of PostgREST on Supabase requires an `apikey` (the anon or
service_role key): requests without a valid one get the gateway's 401 bodies.

Left out: embedding (`select=rel(*)`), `or=`/`and=` trees, full-text operators,
DELETE, upsert (`on_conflict`), GET on RPC, counts (`Prefer: count=`), CSV, OpenAPI.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt as pyjwt
import psycopg
from aiohttp import web
from loguru import logger
from psycopg import sql

from devstack.jwt import DEFAULT_JWT_SECRET

JSON_CT = "application/json; charset=utf-8"
SINGULAR_CT = "application/vnd.pgrst.object+json"
ANON_ROLE = "anon"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CAST = re.compile(r"^[A-Za-z_][A-Za-z0-9_ ]*(\[\])?$")
_RESERVED_PARAMS = frozenset({"select", "order", "limit", "offset", "columns", "on_conflict"})
_COMPARISONS = {
    "eq": "=",
    "neq": "<>",
    "gt": ">",
    "gte": ">=",
    "lt": "<",
    "lte": "<=",
    "like": "LIKE",
    "ilike": "ILIKE",
}
_CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, PATCH, OPTIONS",
    "Access-Control-Allow-Headers": (
        "apikey, authorization, content-type, prefer, accept, accept-profile, "
        "content-profile, range, x-client-info"
    ),
    "Access-Control-Expose-Headers": "Content-Range, Preference-Applied",
    "Access-Control-Max-Age": "86400",
}

# PostgREST's SQLSTATE -> HTTP status table (docs "Errors", "HTTP Status Codes").
_EXACT_STATUS = {
    "23503": 409,
    "23505": 409,
    "25006": 405,
    "53400": 500,
    "P0001": 400,
    "42883": 404,
    "42P01": 404,
    "42P17": 500,
}
_PREFIX_STATUS = {
    "08": 503,
    "09": 500,
    "0L": 403,
    "0P": 403,
    "25": 500,
    "28": 403,
    "2D": 500,
    "38": 500,
    "39": 500,
    "3B": 500,
    "40": 500,
    "53": 503,
    "54": 500,
    "55": 500,
    "57": 500,
    "58": 500,
    "F0": 500,
    "HV": 500,
    "P0": 500,
    "XX": 500,
}


class ApiError(Exception):
    """An error answered the way PostgREST answers it."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: str | None = None,
        hint: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.hint = hint
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "details": self.details,
            "hint": self.hint,
            "message": self.message,
        }


class GatewayError(Exception):
    """The API gateway's refusals (Kong on Supabase): bare `{"message"...}` bodies."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def status_for_sqlstate(sqlstate: str, *, authenticated: bool) -> int:
    """PostgREST's mapping; 42501 is 403 with a token, 401 without."""
    if sqlstate == "42501":
        return 403 if authenticated else 401
    if sqlstate in _EXACT_STATUS:
        return _EXACT_STATUS[sqlstate]
    return _PREFIX_STATUS.get(sqlstate[:2], 400)


def _parse_error(message: str, details: str | None = None) -> ApiError:
    return ApiError(400, "PGRST100", message, details=details)


def _ident(name: str, what: str) -> sql.Identifier:
    if not _IDENT.match(name):
        raise _parse_error(f'"failed to parse {what}"', details=f"unexpected {name!r}")
    return sql.Identifier(name)


# --- query-string parsing (pure) ------------------------------------------------------


def parse_select(value: str | None) -> sql.Composable:
    """`*`, `col`, `alias:col`, `col::type`, comma separated. No embedding."""
    if value is None or value.strip() in ("", "*"):
        return sql.SQL("*")
    items: list[sql.Composable] = []
    for raw in value.split(","):
        item = raw.strip()
        if item == "*":
            items.append(sql.SQL("*"))
            continue
        if "(" in item:
            raise _parse_error(
                '"failed to parse select parameter"', details="embedding is not supported here"
            )
        alias, rest = _split_alias(item)
        column, _, cast = rest.partition("::")
        expr: sql.Composable = _ident(column.strip(), "select parameter")
        if cast:
            if not _CAST.match(cast):
                raise _parse_error('"failed to parse select parameter"', details=cast)
            expr = sql.SQL("{}::{}").format(expr, sql.SQL(cast))
        name = alias.strip() or column.strip()
        items.append(sql.SQL("{} AS {}").format(expr, sql.Identifier(name)))
    return sql.SQL(", ").join(items)


def _split_alias(item: str) -> tuple[str, str]:
    """`alias:col` -> (alias, col); PostgREST's alias separator, not a cast."""
    head, sep, tail = item.partition(":")
    if sep and not tail.startswith(":"):
        return head, tail
    return "", item


def _in_values(operand: str) -> list[str]:
    if not (operand.startswith("(") and operand.endswith(")")):
        raise _parse_error('"failed to parse filter"', details=f"in.{operand}")
    inner = operand[1:-1]
    if not inner:
        return []
    values: list[str] = []
    for part in re.findall(r'"((?:[^"\\]|\\.)*)"|([^,]+)', inner):
        quoted, bare = part
        values.append(bytes(quoted, "utf-8").decode("unicode_escape") if quoted else bare)
    return values


_IS_VALUES = {"null": "NULL", "true": "TRUE", "false": "FALSE", "unknown": "UNKNOWN"}


def parse_filter(column: str, value: str) -> tuple[sql.Composable, list[Any]]:
    """One horizontal filter `column=[not.]op.operand` -> SQL condition and params."""
    col = _ident(column, "filter")
    negate = value.startswith("not.")
    if negate:
        value = value[4:]
    op, dot, operand = value.partition(".")
    if not dot:
        raise _parse_error('"failed to parse filter"', details=f"{column}={value}")
    cond: sql.Composable
    params: list[Any] = []
    if op in _COMPARISONS:
        if op in ("like", "ilike"):
            operand = operand.replace("*", "%")
        cond = sql.SQL("{} {} %s").format(col, sql.SQL(_COMPARISONS[op]))
        params = [operand]
    elif op == "in":
        values = _in_values(operand)
        # untyped literals: Postgres casts each to the column's type, as PostgREST's do
        cond = sql.SQL("FALSE")
        if values:
            marks = sql.SQL(", ").join([sql.SQL("%s")] * len(values))
            cond = sql.SQL("{} IN ({})").format(col, marks)
            params = list(values)
    elif op == "is" and operand.lower() in _IS_VALUES:
        cond = sql.SQL("{} IS {}").format(col, sql.SQL(_IS_VALUES[operand.lower()]))
    else:
        raise _parse_error('"failed to parse filter"', details=f"unknown operator {op!r}")
    if negate:
        cond = sql.SQL("NOT ({})").format(cond)
    return cond, params


def parse_order(value: str | None) -> sql.Composable:
    if not value:
        return sql.SQL("")
    terms: list[sql.Composable] = []
    for raw in value.split(","):
        parts = raw.strip().split(".")
        term: list[sql.Composable] = [_ident(parts[0], "order")]
        for modifier in parts[1:]:
            keyword = {
                "asc": "ASC",
                "desc": "DESC",
                "nullsfirst": "NULLS FIRST",
                "nullslast": "NULLS LAST",
            }.get(modifier)
            if keyword is None:
                raise _parse_error('"failed to parse order"', details=raw)
            term.append(sql.SQL(keyword))
        terms.append(sql.SQL(" ").join(term))
    return sql.SQL(" ORDER BY ") + sql.SQL(", ").join(terms)


def _non_negative_int(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    if not value.isdigit():
        raise _parse_error(f'"failed to parse {name} parameter"', details=value)
    return int(value)


@dataclass
class ReadQuery:
    """The parsed query string of a request on one table."""

    select: sql.Composable
    where: sql.Composable
    params: list[Any]
    order: sql.Composable
    limit: int | None
    offset: int | None
    columns: list[str] | None = None

    @classmethod
    def parse(cls, query: Mapping[str, str], multi: list[tuple[str, str]]) -> ReadQuery:
        conditions: list[sql.Composable] = []
        params: list[Any] = []
        for key, value in multi:
            if key in _RESERVED_PARAMS:
                continue
            cond, cond_params = parse_filter(key, value)
            conditions.append(cond)
            params.extend(cond_params)
        where = (
            sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")
        )
        columns = None
        if "columns" in query:
            columns = [c.strip().strip('"') for c in query["columns"].split(",") if c.strip()]
        return cls(
            select=parse_select(query.get("select")),
            where=where,
            params=params,
            order=parse_order(query.get("order")),
            limit=_non_negative_int(query.get("limit"), "limit"),
            offset=_non_negative_int(query.get("offset"), "offset"),
            columns=columns,
        )

    def tail(self) -> sql.Composable:
        out: list[sql.Composable] = [self.order]
        if self.limit is not None:
            out.append(sql.SQL(" LIMIT {}").format(sql.Literal(self.limit)))
        if self.offset is not None:
            out.append(sql.SQL(" OFFSET {}").format(sql.Literal(self.offset)))
        return sql.Composed(out)


def parse_prefer(values: list[str]) -> dict[str, str]:
    prefs: dict[str, str] = {}
    for header in values:
        for item in header.split(","):
            key, _, val = item.strip().partition("=")
            if key:
                prefs[key.strip()] = val.strip()
    return prefs


# --- the server -----------------------------------------------------------------------


@dataclass
class Caller:
    role: str
    claims: dict[str, Any]
    authenticated: bool


@dataclass
class PostgrestServer:
    """Serves `/rest/v1/<table>` on an aiohttp app, against `database_url`."""

    database_url: str
    jwt_secret: str = DEFAULT_JWT_SECRET
    schemas: tuple[str, ...] = ("public",)
    require_apikey: bool = True
    _log: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._log = logger.bind(event="postgrest")

    def add_routes(self, app: web.Application, prefix: str = "/rest/v1") -> None:
        """Mount the routes under `prefix` (`/rest/v1`, as Supabase's gateway does)."""
        app.router.add_route("OPTIONS", prefix + "/{table}", self._preflight)
        app.router.add_get(prefix + "/{table}", self._get, allow_head=False)
        app.router.add_post(prefix + "/{table}", self._post)
        app.router.add_patch(prefix + "/{table}", self._patch)
        app.router.add_route("OPTIONS", prefix + "/rpc/{function}", self._preflight)
        app.router.add_post(prefix + "/rpc/{function}", self._rpc)

    # --- handlers

    async def _preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=200, headers=_CORS)

    async def _get(self, request: web.Request) -> web.Response:
        return await self._handle(request, self._select)

    async def _post(self, request: web.Request) -> web.Response:
        return await self._handle(request, self._insert)

    async def _patch(self, request: web.Request) -> web.Response:
        return await self._handle(request, self._update)

    async def _handle(self, request: web.Request, action: Any) -> web.Response:
        try:
            caller = self._authenticate(request)
            schema = self._schema(request)
            table = request.match_info["table"]
            query = ReadQuery.parse(request.query, list(request.query.items()))
            response: web.Response = await action(request, caller, schema, table, query)
        except GatewayError as exc:
            body = {"message": exc.message} | ({"hint": exc.hint} if exc.hint else {})
            return _json_response(401, body)
        except ApiError as exc:
            return _json_response(exc.status, exc.body(), exc.headers)
        return response

    # --- authentication

    def _authenticate(self, request: web.Request) -> Caller:
        apikey = request.headers.get("apikey") or request.query.get("apikey")
        if self.require_apikey:
            if not apikey:
                raise GatewayError(
                    "No API key found in request",
                    "No `apikey` request header or url param was found.",
                )
            try:
                pyjwt.decode(apikey, self.jwt_secret, algorithms=["HS256"])
            except pyjwt.InvalidTokenError:
                raise GatewayError(
                    "Invalid API key",
                    "Double check your Supabase `anon` or `service_role` API key.",
                ) from None
        auth = request.headers.get("Authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not token:
            return Caller(ANON_ROLE, {"role": ANON_ROLE}, authenticated=False)
        claims = self._verify(token)
        role = claims.get("role") or ANON_ROLE
        return Caller(str(role), claims, authenticated=True)

    def _verify(self, token: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = pyjwt.decode(
                token, self.jwt_secret, algorithms=["HS256"], options={"verify_aud": False}
            )
        except pyjwt.ExpiredSignatureError:
            raise _jwt_error("PGRST303", "JWT expired") from None
        except pyjwt.InvalidSignatureError:
            raise _jwt_error("PGRST301", "JWSError JWSInvalidSignature") from None
        except pyjwt.DecodeError:
            raise _jwt_error(
                "PGRST301", "JWSError (CompactDecodeError Invalid number of parts)"
            ) from None
        except pyjwt.InvalidTokenError as exc:
            raise _jwt_error("PGRST301", str(exc)) from None
        return claims

    def _schema(self, request: web.Request) -> str:
        profile = request.headers.get("Accept-Profile") or request.headers.get("Content-Profile")
        schema = profile or self.schemas[0]
        if schema not in self.schemas:
            raise ApiError(
                406,
                "PGRST106",
                "Invalid schema: " + schema,
                hint="Only the following schemas are exposed: " + ", ".join(self.schemas),
            )
        return schema

    # --- actions

    async def _select(
        self, request: web.Request, caller: Caller, schema: str, table: str, q: ReadQuery
    ) -> web.Response:
        stmt = sql.SQL(
            "SELECT coalesce(json_agg(_pgrst_t), '[]')::text, count(*) FROM "
            "(SELECT {select} FROM {table}{where}{tail}) _pgrst_t"
        ).format(select=q.select, table=sql.Identifier(schema, table), where=q.where, tail=q.tail())
        text, count = await self._run(request, caller, schema, table, stmt, q.params)
        first = q.offset or 0
        content_range = f"{first}-{first + count - 1}/*" if count else "*/*"
        return self._rows_response(request, 200, text, count, {"Content-Range": content_range})

    async def _insert(
        self, request: web.Request, caller: Caller, schema: str, table: str, q: ReadQuery
    ) -> web.Response:
        rows = await _json_rows(request)
        prefs = parse_prefer(request.headers.getall("Prefer", []))
        columns = q.columns or sorted({k for row in rows for k in row})
        target = sql.Identifier(schema, table)
        params: list[Any] = []
        values: list[sql.Composable] = []
        default = sql.SQL("DEFAULT" if prefs.get("missing") == "default" else "NULL")
        for row in rows:
            params.extend([json.dumps(row)] * sum(1 for c in columns if c in row))
            record = sql.SQL("(json_populate_record(NULL::{}, %s::json))").format(target)
            cells = [
                sql.SQL("{}.{}").format(record, sql.Identifier(c)) if c in row else default
                for c in columns
            ]
            values.append(sql.SQL("({})").format(sql.SQL(", ").join(cells)))
        for c in columns:
            _ident(c, "columns parameter")
        insert = sql.SQL("INSERT INTO {t} ({cols}) VALUES {values} RETURNING {returning}").format(
            t=target,
            returning=_returning(target, prefs),
            cols=sql.SQL(", ").join(sql.Identifier(c) for c in columns),
            values=sql.SQL(", ").join(values),
        )
        return await self._write(request, caller, schema, table, insert, params, q, prefs, 201)

    async def _update(
        self, request: web.Request, caller: Caller, schema: str, table: str, q: ReadQuery
    ) -> web.Response:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "PGRST102", "All object keys must match")
        prefs = parse_prefer(request.headers.getall("Prefer", []))
        target = sql.Identifier(schema, table)
        if not body:
            return _json_response(204 if prefs.get("return") != "representation" else 200, None)
        record = sql.SQL("(json_populate_record(NULL::{}, %s::json))").format(target)
        sets = sql.SQL(", ").join(
            sql.SQL("{} = {}.{}").format(_ident(c, "body"), record, sql.Identifier(c)) for c in body
        )
        update = sql.SQL("UPDATE {t} SET {sets}{where} RETURNING {returning}").format(
            t=target, sets=sets, where=q.where, returning=_returning(target, prefs)
        )
        params = [json.dumps(body)] * len(body) + q.params
        return await self._write(request, caller, schema, table, update, params, q, prefs, 200)

    async def _write(
        self,
        request: web.Request,
        caller: Caller,
        schema: str,
        table: str,
        write: sql.Composed,
        params: list[Any],
        q: ReadQuery,
        prefs: dict[str, str],
        ok_status: int,
    ) -> web.Response:
        representation = prefs.get("return") == "representation"
        select = q.select if representation else sql.SQL("1")
        stmt = sql.SQL(
            "WITH _pgrst_source AS ({write}) "
            "SELECT coalesce(json_agg(_pgrst_t), '[]')::text, count(*) FROM "
            "(SELECT {select} FROM _pgrst_source{tail}) _pgrst_t"
        ).format(write=write, select=select, tail=q.tail() if representation else sql.SQL(""))
        text, count = await self._run(request, caller, schema, table, stmt, params)
        headers = {"Content-Range": "*/*"}
        if representation:
            headers["Preference-Applied"] = "return=representation"
            return self._rows_response(request, ok_status, text, count, headers)
        if ok_status == 200:
            ok_status = 204
        return web.Response(status=ok_status, headers=headers | _CORS)

    def _rows_response(
        self, request: web.Request, status: int, text: str, count: int, headers: dict[str, str]
    ) -> web.Response:
        accept = request.headers.get("Accept", "")
        if SINGULAR_CT.split("+")[0] in accept:
            if count != 1:
                raise ApiError(
                    406,
                    "PGRST116",
                    "JSON object requested, multiple (or no) rows returned",
                    details=f"The result contains {count} rows",
                    headers={"Content-Type": SINGULAR_CT + "; charset=utf-8"},
                )
            obj = json.loads(text)[0]
            return web.Response(
                status=status,
                text=json.dumps(obj, ensure_ascii=False),
                headers=headers | _CORS | {"Content-Type": SINGULAR_CT + "; charset=utf-8"},
            )
        return web.Response(
            status=status, text=text, headers=headers | _CORS | {"Content-Type": JSON_CT}
        )

    async def _run(
        self,
        request: web.Request,
        caller: Caller,
        schema: str,
        table: str,
        stmt: sql.Composed,
        params: list[Any],
    ) -> tuple[str, int]:
        """One transaction as the caller's role; Postgres errors become ApiErrors."""
        headers = {k.lower(): v for k, v in request.headers.items() if k.lower() != "authorization"}
        try:
            async with (
                await psycopg.AsyncConnection.connect(self.database_url) as conn,
                conn.transaction(),
            ):
                if table.startswith("rpc/"):
                    await self._check_function(conn, schema, table[4:])
                else:
                    await self._check_table(conn, schema, table)
                await conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(caller.role)))
                await conn.execute(
                    "SELECT set_config('request.jwt.claims', %s, true),"
                    " set_config('request.method', %s, true),"
                    " set_config('request.path', %s, true),"
                    " set_config('request.headers', %s, true),"
                    " set_config('search_path', %s, true)",
                    (
                        json.dumps(caller.claims),
                        request.method,
                        request.path,
                        json.dumps(headers),
                        schema,
                    ),
                )
                cur = await conn.execute(stmt, params)
                row = await cur.fetchone()
        except psycopg.Error as exc:
            raise _from_postgres(exc, authenticated=caller.authenticated) from exc
        if row is None:
            return "[]", 0
        # SQL NULL (a scalar function's) is JSON null, as PostgREST answers; never "None".
        return ("null" if row[0] is None else str(row[0])), int(row[1])

    async def _rpc(self, request: web.Request) -> web.Response:
        """`POST /rpc/<fn>` with named arguments: a scalar as JSON, a set as an array."""
        try:
            caller = self._authenticate(request)
            schema = self._schema(request)
            name = request.match_info["function"]
            _ident(name, "function")
            fn = sql.Identifier(schema, name)
            body = await _json_body(request)
            args = body if isinstance(body, dict) else {}
            params = [_rpc_param(v) for v in args.values()]
            call = sql.SQL("{}({})").format(
                fn,
                sql.SQL(", ").join(
                    sql.SQL("{} => %s").format(_ident(k, "arguments")) for k in args
                ),
            )
            returns_set = await self._returns_set(schema, name)
            if returns_set:
                stmt = sql.SQL(
                    "SELECT coalesce(json_agg(_r), '[]')::text, count(*) FROM {} _r"
                ).format(call)
            else:
                stmt = sql.SQL("SELECT to_json({})::text, 1").format(call)
            text, _ = await self._run(request, caller, schema, "rpc/" + name, stmt, params)
        except GatewayError as exc:
            body = {"message": exc.message} | ({"hint": exc.hint} if exc.hint else {})
            return _json_response(401, body)
        except ApiError as exc:
            return _json_response(exc.status, exc.body(), exc.headers)
        return web.Response(
            status=200, text=text or "null", headers=_CORS | {"Content-Type": JSON_CT}
        )

    async def _returns_set(self, schema: str, name: str) -> bool:
        async with await psycopg.AsyncConnection.connect(self.database_url) as conn:
            cur = await conn.execute(
                "SELECT bool_or(p.proretset) FROM pg_catalog.pg_proc p JOIN"
                " pg_catalog.pg_namespace n ON n.oid = p.pronamespace"
                " WHERE n.nspname = %s AND p.proname = %s",
                (schema, name),
            )
            row = await cur.fetchone()
        return bool(row and row[0])

    async def _check_function(
        self, conn: psycopg.AsyncConnection[Any], schema: str, name: str
    ) -> None:
        cur = await conn.execute(
            "SELECT 1 FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n"
            " ON n.oid = p.pronamespace WHERE n.nspname = %s AND p.proname = %s",
            (schema, name),
        )
        if await cur.fetchone() is None:
            raise ApiError(
                404,
                "PGRST202",
                f"Could not find the function {schema}.{name} in the schema cache",
                hint="If a new function was created in the database with this name and"
                " parameters, try reloading the schema cache.",
            )

    async def _check_table(
        self, conn: psycopg.AsyncConnection[Any], schema: str, table: str
    ) -> None:
        # PostgREST answers from its schema cache before touching the table.
        cur = await conn.execute(
            "SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n"
            " ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s"
            " AND c.relkind IN ('r', 'v', 'm', 'f', 'p')",
            (schema, table),
        )
        if await cur.fetchone() is None:
            raise ApiError(
                404,
                "PGRST205",
                f"Could not find the table '{schema}.{table}' in the schema cache",
            )


def _rpc_param(value: Any) -> Any:
    """A JSON argument as an untyped literal; Postgres casts it to the parameter's type."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _returning(target: sql.Identifier, prefs: dict[str, str]) -> sql.Composable:
    # Without return=representation PostgREST reads no column back, so a write needs
    # neither SELECT privileges nor a SELECT policy that admits the new row.
    if prefs.get("return") == "representation":
        return sql.SQL("{}.*").format(target)
    return sql.SQL("1")


def _jwt_error(code: str, message: str) -> ApiError:
    return ApiError(
        401,
        code,
        message,
        headers={
            "WWW-Authenticate": f'Bearer error="invalid_token", error_description="{message}"'
        },
    )


def _from_postgres(exc: psycopg.Error, *, authenticated: bool) -> ApiError:
    sqlstate = exc.sqlstate or "XX000"
    diag = exc.diag
    return ApiError(
        status_for_sqlstate(sqlstate, authenticated=authenticated),
        sqlstate,
        diag.message_primary or str(exc),
        details=diag.message_detail,
        hint=diag.message_hint,
    )


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw) if raw else None
    except ValueError as exc:
        raise ApiError(400, "PGRST102", "Empty or invalid json", details=str(exc)) from None


async def _json_rows(request: web.Request) -> list[dict[str, Any]]:
    body = await _json_body(request)
    rows = body if isinstance(body, list) else [body]
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise ApiError(400, "PGRST102", "Empty or invalid json")
    return rows


def _json_response(
    status: int, body: Any, headers: Mapping[str, str] | None = None
) -> web.Response:
    all_headers = {"Content-Type": JSON_CT} | _CORS | dict(headers or {})
    text = "" if body is None else json.dumps(body, ensure_ascii=False)
    return web.Response(status=status, text=text, headers=all_headers)


# The name the gateway (devstack/stack.py) mounts.
PostgrestStandIn = PostgrestServer
