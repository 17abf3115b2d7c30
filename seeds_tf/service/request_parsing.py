"""What DEEPaaS 2.6's argument parsing gets wrong or cannot do, put right in the server process.

DEEPaaS reads arguments with webargs 5 before any of seeds_tf's code runs, so neither can be fixed in
predict or train:
- a malformed multipart body (no boundary, a truncated part, a control character in a name) makes
  aiohttp raise inside webargs' form parsing, and the client gets a 500: it gets a 400 instead;
- webargs 5 reads only the declared arguments and silently drops the others, so a misspelt option
  (`top-k=3`, `epoch=5`) would be ignored: the client gets a 422 naming it instead;
- DEEPaaS queues every training for a worker: a guard can refuse a POST train at once (409).
`install()` wraps webargs' parser once; valid requests are untouched.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import http_exceptions, web
from webargs import aiohttpparser

from seeds_tf.core.errors import InputError

_FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")


def install(before_training: Callable[[], None] | None = None) -> None:
    """Wraps webargs' aiohttp parser, once per process.

    Args:
        before_training: called before the arguments of a POST train are parsed; an InputError it
            raises answers the request with a 409 naming its field. Defaults to None (no guard).
    """
    parser_class = aiohttpparser.AIOHTTPParser
    if getattr(parser_class.parse, "seeds_tf_strict", False):
        return
    parse, parse_form = parser_class.parse, parser_class.parse_form

    async def checked_parse_form(parser, request, name, field):
        try:
            return await parse_form(parser, request, name, field)
        except (ValueError, LookupError, http_exceptions.HttpProcessingError) as error:
            raise _error(web.HTTPBadRequest, f"malformed form body: {error}", "body") from None

    async def strict_parse(parser, argmap, req=None, *args, **kwargs):
        if before_training is not None and req.method == "POST" and req.path.rstrip("/").endswith("/train"):
            try:
                before_training()
            except InputError as error:
                raise _error(web.HTTPConflict, error.problem, error.field) from None
        parsed = await parse(parser, argmap, req, *args, **kwargs)
        schema = parser._get_schema(argmap, req)
        known = {field.data_key or name for name, field in schema.fields.items()}
        unknown = sorted(await _sent_names(req) - known)
        if unknown:
            problem = f"unknown argument {', '.join(map(repr, unknown))}; the arguments are {sorted(known)}"
            raise _error(web.HTTPUnprocessableEntity, problem, unknown[0])
        return parsed

    strict_parse.seeds_tf_strict = True
    parser_class.parse = strict_parse
    parser_class.parse_form = checked_parse_form


async def _sent_names(request: web.Request) -> set[str]:
    """The argument names a request sends in its query string and form or JSON body."""
    names = set(request.query)
    if request.content_type in _FORMS:
        names |= set(await request.post())  # aiohttp parses the body once and keeps it
    elif request.content_type == "application/json" and request.body_exists:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            names |= set(body)
    return names


def _error(kind: type[web.HTTPException], problem: str, field: str) -> web.HTTPException:
    body = json.dumps({"message": f"{field}: {problem}", "field": field})
    return kind(text=body, content_type="application/json")
