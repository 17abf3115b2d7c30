"""What DEEPaaS 2.6's request handling gets wrong or cannot do, put right in the server process.

DEEPaaS reads arguments with webargs 5 and builds its answers around seeds_tf's code, so none of this
can be fixed in predict or train:
- every client error has one shape, `{"message": "<field>: <problem>", "field": "<field>"}`
  (`error_text`): webargs' per-field dicts of invalid arguments, its invalid-JSON answer and the
  plain-text 4xx of aiohttp and DEEPaaS (an unknown training, a body over the size limit) are put in
  it, as are seeds_tf's own refusals;
- a field declared in the form (`"location": "form"`, so that the OpenAPI spec puts it in the body and
  the Swagger UI sends it there: a data URI in the query string made a URL over aiohttp's 8 KB limit)
  is still read from the query string or a JSON body when the form lacks it, as every other argument;
- DEEPaaS takes `accept` as one of a list of exact values, so a browser's `Accept` header (a list
  with q-values, `application/json, text/plain, */*`) was refused: the header is negotiated
  (`negotiate`) among the field's choices, and one that allows none of them gets a 406;
- marshmallow's Int truncates a JSON number (`"epochs": 1.5` trained 1 epoch): a number with a
  fraction is refused for an integer argument, with the 422 "1.5" gets in a form;
- an empty body is an empty form: the Swagger UI's predict with no file chosen sends multipart with no
  boundary, and gets the model's "no image" answer instead of a 400 about the boundary;
- an empty value in the query string or a form, for an argument it cannot be a value of (a number,
  a boolean, one of a list of choices), is the argument left out, so it takes its default: the
  Swagger UI's "Send empty value" sends `top_k=`, which got a 422 "Not a valid integer" (an empty
  free text, such as `weights=`, stays a value, checked as any other);
- a malformed multipart body (no boundary, a truncated part, a control character in a name) makes
  aiohttp raise inside webargs' form parsing, and the client got a 500: it gets a 400 instead;
- webargs 5 reads only the declared arguments and silently drops the others, so a misspelt option
  (`top-k=3`, `epoch=5`) would be ignored: the client gets a 422 naming it instead; and it reads one
  value of an argument sent twice (two files under `image`, `top_k` in the query and the form),
  silently dropping the other: the client gets a 422 naming it instead; and it ignores a header
  argument (`accept`) sent in the query string or body: a 422 naming it too; and it reads nothing
  from a JSON body that is not an object (`[{"epochs": 1}]` started a default training): a 400, nor
  from a body neither a form nor JSON (JSON sent as text/plain): a 415;
- DEEPaaS queues every training for a worker, which checks nothing before it starts: each POST train
  is admitted (or refused with a 409) in the request, by a reservation taken just before DEEPaaS
  queues the training, with no await in between, and released when the training ends;
- a training's status lists `status` (and its `result` or `message`) first, not after the echo of
  every argument;
- a cancelled training's status is "cancelled": DEEPaaS ends it by killing its worker, which leaves
  the task with no result, and its status builder then failed (a 500 answered the DELETE); and it
  stays listed, and answers its GET, after the DELETE (DEEPaaS forgot it: a 404).
`install()` wraps webargs' parser and two functions of DEEPaaS 2.6 (setup.cfg keeps it below 2.7)
once per process; valid requests are untouched.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import types
from collections.abc import Callable, Sequence

from aiohttp import http_exceptions, web
from deepaas.api import v2
from deepaas.api.v2 import train as v2_train
from marshmallow import fields, validate
from webargs import aiohttpparser, core

from seeds_tf.core.errors import InputError
from seeds_tf.service.schemas import UPLOAD_FIELDS

_FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")

_LEADING = ("status", "result", "message", "uuid", "date")
"""The keys a training's status answer starts with; the echoed `args` follow."""

_FIELD_OF_STATUS = {404: "path", 405: "method", 413: "body"}
"""The field a plain-text client error of aiohttp or DEEPaaS names, by status ("request" otherwise)."""


def error_text(field: str, problem: str) -> str:
    """The body of every client error: `{"message": "<field>: <problem>", "field": "<field>"}`."""
    return json.dumps({"message": f"{field}: {problem}", "field": field})


def install(admit_training: Callable[[dict], Callable[[], None]] | None = None) -> None:
    """Wraps webargs' aiohttp parser and DEEPaaS' v2 app and training handler, once per process.

    Args:
        admit_training: called with the arguments of a POST train whose arguments are each valid,
            just before DEEPaaS queues it; it returns the release, called once the training has
            ended (done, failed or cancelled). An InputError it raises answers the request naming
            its field: a 409 for `training`, a 507 for `models_dir`, a 422 for an argument.
            Defaults to None (every training is queued).
    """
    parser_class = aiohttpparser.AIOHTTPParser
    if getattr(parser_class.parse, "seeds_tf_strict", False):
        return
    parse, parse_form, parse_headers = parser_class.parse, parser_class.parse_form, parser_class.parse_headers
    parse_json = parser_class.parse_json

    async def whole_parse_json(parser, request, name, field):
        value = await parse_json(parser, request, name, field)
        if isinstance(field, fields.Integer) and isinstance(value, float) and not value.is_integer():
            return str(value)  # refused by Int, as "1.5" is in a form, instead of truncated to 1
        return value

    def negotiated_parse_headers(parser, request, name, field):
        value = parse_headers(parser, request, name, field)
        return _negotiated(value, field) if name == "accept" and value is not core.missing else value

    async def checked_parse_form(parser, request, name, field):
        if request.body_exists:
            try:
                value = await parse_form(parser, request, name, field)
            # aiohttp raises RuntimeError for a part in an unknown transfer encoding ("x-gzip").
            except (ValueError, LookupError, RuntimeError, http_exceptions.HttpProcessingError) as error:
                raise _error(web.HTTPBadRequest, "body", f"malformed form body: {error}") from None
            if value is not core.missing and not _left_out(value, field):
                return value
        value = parser.parse_querystring(request, name, field)
        return await parser.parse_json(request, name, field) if value is core.missing else value

    async def strict_parse(parser, argmap, req=None, *args, **kwargs):
        parsed = await parse(parser, argmap, req, *args, **kwargs)
        schema = parser._get_schema(argmap, req)
        known = {field.data_key or name for name, field in schema.fields.items()}
        sent = await _sent_names(req)
        unknown = sorted(sent.keys() - known)
        if unknown:
            problem = f"unknown argument {', '.join(map(repr, unknown))}; the arguments are {sorted(known)}"
            raise _error(web.HTTPUnprocessableEntity, unknown[0], problem)
        headers = sorted(
            name for name, field in schema.fields.items() if field.metadata.get("location") == "headers"
        )
        misplaced = [name for name in headers if name in sent]
        if misplaced:
            name = misplaced[0]
            problem = f"an HTTP header: send it as '{name.title()}: <value>', not in the query string or body"
            raise _error(web.HTTPUnprocessableEntity, name, problem)
        repeated = sorted(name for name, times in sent.items() if times > 1)
        if repeated:
            name = repeated[0]
            hint = f": one photo in each of {', '.join(UPLOAD_FIELDS)}" if name in UPLOAD_FIELDS else ""
            raise _error(web.HTTPUnprocessableEntity, name, f"sent {sent[name]} times; give it once{hint}")
        return parsed

    strict_parse.seeds_tf_strict = True
    parser_class.parse = strict_parse
    parser_class.parse_form = checked_parse_form
    parser_class.parse_querystring = _without_empty_values(parser_class.parse_querystring)
    parser_class.parse_headers = negotiated_parse_headers
    parser_class.parse_json = whole_parse_json
    parser_class.handle_invalid_json_error = _invalid_json
    aiohttpparser.parser.error_callback = _invalid_arguments
    v2.get_app = _with_one_error_shape(v2.get_app)
    v2_train._get_handler = _with_status_first(v2_train._get_handler)
    if admit_training is not None:
        v2_train._get_handler = _with_admission(v2_train._get_handler, admit_training)


def _without_empty_values(parse_querystring: Callable) -> Callable:
    def present_parse_querystring(parser, request, name, field):
        value = parse_querystring(parser, request, name, field)
        return core.missing if _left_out(value, field) else value

    return present_parse_querystring


def _left_out(value, field: fields.Field) -> bool:
    """An empty value where it cannot be one: a number, a boolean, one of a list of choices."""
    if value != "":
        return False
    choices = [v.choices for v in field.validators if isinstance(v, validate.OneOf)]
    return isinstance(field, fields.Number | fields.Boolean) or any("" not in c for c in choices)


def _negotiated(accept: str, field) -> str:
    """The answer type an `Accept` header asks for, among the choices of the `accept` field but the
    `*/*` DEEPaaS adds to them (no type to answer with); an empty header asks for none (the default).

    Raises:
        HTTPNotAcceptable: naming `accept`, for a header that allows none of them.
    """
    if not accept.strip():
        return core.missing
    offers = [str(choice) for choice in field.validate.choices if choice != "*/*"]
    chosen = negotiate(accept, offers)
    if chosen is None:
        raise _error(web.HTTPNotAcceptable, "accept", f"{accept!r} allows none of the answer types {offers}")
    return chosen


def negotiate(accept: str, offers: Sequence[str]) -> str | None:
    """The offer an HTTP Accept header prefers (RFC 9110, 12.5.1), or None when it accepts none.

    Each offer takes the weight (`q`, 1 when not given) of the most specific media range that
    matches it: `image/png` before `image/*` before `*/*`. The heaviest offer wins, ties go to the
    first offer, and a weight of 0 refuses. Media type parameters other than `q` are ignored; a range
    that cannot be read (`q=high`, no `/`) matches nothing. A lone `*` is `*/*`, as Java sends it.
    (werkzeug's MIMEAccept, the library at hand, matches neither `application/json;charset=utf-8`
    nor a lone `*`.)

    Args:
        accept: the header's value, e.g. "application/json, text/plain, */*".
        offers: the media types the answer can have, in the server's order of preference.
    """
    ranges = [media_range for part in accept.split(",") if (media_range := _media_range(part))]

    def weight(offer: str) -> float:
        kind, _, subtype = offer.partition("/")
        matches = [
            (specificity, q)
            for range_kind, range_subtype, q in ranges
            if (specificity := _specificity(range_kind, range_subtype, kind, subtype)) is not None
        ]
        return max(matches)[1] if matches else 0.0

    best = max(offers, key=weight)
    return best if weight(best) > 0 else None


def _media_range(text: str) -> tuple[str, str, float] | None:
    """(type, subtype, q) of one media range of an Accept header, or None if it cannot be read."""
    media, *parameters = text.split(";")
    media = media.strip().lower()
    kind, slash, subtype = ("*/*" if media == "*" else media).partition("/")
    if not (kind and slash and subtype) or (kind == "*" and subtype != "*"):
        return None
    q = 1.0
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                q = float(value)
            except ValueError:
                return None
    return (kind, subtype, q) if 0 <= q <= 1 else None


def _specificity(range_kind: str, range_subtype: str, kind: str, subtype: str) -> int | None:
    """How closely a media range names a media type: 2 exactly, 1 by its type, 0 as `*/*`; None if
    it does not match it."""
    if range_kind == "*":
        return 0
    if range_kind != kind:
        return None
    if range_subtype == "*":
        return 1
    return 2 if range_subtype == subtype else None


async def _sent_names(request: web.Request) -> collections.Counter[str]:
    """The argument names a request sends in its query string and form or JSON body, each with the
    number of times it is sent (a multidict's items, not its keys, repeat a name sent twice).

    Raises:
        HTTPBadRequest: naming `body`, for a JSON body that is not an object.
        HTTPUnsupportedMediaType: naming `body`, for a body neither a form nor JSON.
    """
    names = collections.Counter(name for name, _ in request.query.items())
    if request.content_type in _FORMS and request.body_exists:
        form = await request.post()  # aiohttp parses the body once and keeps it
        names.update(name for name, _ in form.items())
    elif request.content_type == "application/json" and request.body_exists:
        try:
            body = await request.json()
        except ValueError:
            return names  # webargs has answered 400 already
        if not isinstance(body, dict):
            # webargs reads no argument from it: `[{"epochs": 1}]` started a default training.
            problem = f"expected a JSON object of arguments, not {_shown(body)}"
            raise _error(web.HTTPBadRequest, "body", problem)
        names.update(body.keys())
    elif request.body_exists:
        # webargs reads no argument from it: a JSON body sent as text/plain, or with no type
        # (`requests.post(url, data=json.dumps(...))`), started a default training.
        problem = (
            f"a body of type {request.content_type!r} is not read: send the arguments as a form, "
            "as a JSON object with 'Content-Type: application/json', or in the query string"
        )
        raise _error(web.HTTPUnsupportedMediaType, "body", problem)
    return names


def _shown(value) -> str:
    """The start of a JSON value, for a message: `an array [1, 2]`."""
    kinds = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    kind = kinds.get(type(value), "a number")
    text = json.dumps(value)
    return kind if value is None else f"{kind} {text if len(text) <= 40 else text[:37] + '...'}"


def _invalid_arguments(error, request, schema, error_status_code=None, error_headers=None):
    """webargs' error callback: a 422 naming the first invalid argument (in the schema's order),
    with the problems of every invalid argument in the message."""
    order = list(schema.fields)
    names = sorted(error.messages, key=lambda name: order.index(name) if name in order else len(order))
    problems = [_joined(error.messages[name]) for name in names]
    others = [f"{name}: {problem}" for name, problem in zip(names[1:], problems[1:], strict=True)]
    raise _error(web.HTTPUnprocessableEntity, names[0], "; ".join([problems[0], *others]))


def _joined(messages) -> str:
    """marshmallow's messages of one field (a list, or a dict for a nested value) as one line."""
    if isinstance(messages, dict):
        return " ".join(_joined(value) for value in messages.values())
    if isinstance(messages, list):
        return " ".join(_joined(value) for value in messages)
    return str(messages)


def _invalid_json(parser, error, request, *args, **kwargs):
    raise _error(web.HTTPBadRequest, "body", f"invalid JSON: {error}")


def _with_one_error_shape(get_app: Callable[..., web.Application]) -> Callable[..., web.Application]:
    """DEEPaaS' v2 app factory, its app given `_one_error_shape` as a middleware."""

    def get_app_with_one_error_shape(*args, **kwargs) -> web.Application:
        app = get_app(*args, **kwargs)
        app.middlewares.append(_one_error_shape)
        return app

    return get_app_with_one_error_shape


@web.middleware
async def _one_error_shape(request: web.Request, handler):
    """Puts the plain-text client errors of aiohttp and DEEPaaS in the one shape, keeping their
    status and headers (an unknown training id names `uuid`)."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if not 400 <= error.status < 500 or error.content_type == "application/json":
            raise
        field = "uuid" if "uuid" in request.match_info else _FIELD_OF_STATUS.get(error.status, "request")
        problem = (error.text or error.reason).removeprefix(f"{error.status}: ")
        error.text = error_text(field, problem)
        error.content_type = "application/json"
        raise


def _with_status_first(get_handler: Callable) -> Callable:
    """DEEPaaS' training handler factory, its handler answering with `_LEADING` keys first."""

    def get_handler_with_status_first(model_name, model_obj):
        handler = get_handler(model_name, model_obj)
        build = handler.build_train_response

        def build_train_response(uuid, training):
            answer = build(uuid, _as_cancelled(training) if _killed(training) else training)
            if not answer:
                return answer
            return {**{key: answer[key] for key in _LEADING if key in answer}, **answer}

        handler.build_train_response = build_train_response  # its methods call it through self
        handler.delete = _keeping_the_cancelled(handler)
        return handler

    return get_handler_with_status_first


_REFUSALS = {"training": web.HTTPConflict, "models_dir": web.HTTPInsufficientStorage}
"""The status of a training the admission refuses, by the field it names (422 for an argument)."""


def _keeping_the_cancelled(handler) -> Callable:
    """DEEPaaS' DELETE of a training, which then stays listed with its final status: DEEPaaS 2.6
    dropped it, so its GET answered 404 right after a DELETE had answered "cancelled", and the
    list of trainings forgot it."""
    delete = handler.delete

    @functools.wraps(delete)  # with the OpenAPI description aiohttp-apispec attached to it
    async def delete_and_keep(request: web.Request) -> web.StreamResponse:
        uuid = request.match_info["uuid"]
        training = handler._trainings.get(uuid)
        try:
            return await delete(request)
        finally:
            if training is not None:
                handler._trainings[uuid] = training

    return delete_and_keep


def _with_admission(get_handler: Callable, admit: Callable[[dict], Callable[[], None]]) -> Callable:
    """DEEPaaS' training handler factory, its handler admitting each training with `admit`."""

    def get_admitting_handler(model_name, model_obj):
        handler = get_handler(model_name, model_obj)

        def admitted_train(**args) -> asyncio.Task:
            # Synchronous from the admission to the queued task: no other request runs in between.
            try:
                release = admit(args)
            except InputError as error:
                refusal = _REFUSALS.get(error.field, web.HTTPUnprocessableEntity)
                raise _error(refusal, error.field, error.problem) from None
            try:
                task = model_obj.train(**args)
            except BaseException:
                release()
                raise
            task.add_done_callback(lambda _: release())
            return task

        # DEEPaaS 2.6's training handler uses its model only to queue a training.
        handler.model_obj = types.SimpleNamespace(train=admitted_train)
        return handler

    return get_admitting_handler


def _killed(training: dict | None) -> bool:
    """Whether DEEPaaS cancelled `training` by killing its worker: its task then ends with neither
    a result nor an exception (a finished training's result is never None)."""
    task = training["task"] if training else None
    return bool(
        task and task.done() and not task.cancelled() and task.exception() is None and task.result() is None
    )


def _as_cancelled(training: dict) -> dict:
    """`training` with a cancelled task in place of its own, for DEEPaaS' status builder."""
    cancelled: asyncio.Future = training["task"].get_loop().create_future()
    cancelled.cancel()
    return {**training, "task": cancelled}


def _error(kind: type[web.HTTPException], field: str, problem: str) -> web.HTTPException:
    return kind(text=error_text(field, problem), content_type="application/json")
