"""Requests as the HTTP servers receive them: bodies, checked fields, histories, generation arguments, errors."""

from __future__ import annotations

import argparse
import hmac
import json
import math
import socket
import sys
import time

DEFAULT_MAX_BODY = 1 << 20  # bytes of a request body
MAX_TEMPERATURE = 100.0
MIN_TEMPERATURE = 1e-5  # a temperature below this samples as greedy decoding (dividing by 1e-300 overflows)
MAX_DEPTH = 32  # nesting of JSON values the model reads: tool definitions, tool-call arguments
MAX_TOOLS_CHARS = 256 * 1024  # the tool definitions as ChatGLM3's prompt renders them (json, indent 4)
V3_ROLES = ("system", "user", "assistant", "observation")


class RequestError(Exception):
    """A request the server refuses: HTTP status, a message for the client, and the offending field if any."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


# --- request bodies and fields ------------------------------------------------------------------------------


class _NotJSON(ValueError):
    """A constant json.loads reads but JSON has not: NaN, Infinity, -Infinity."""


def _no_constants(name):
    raise _NotJSON(f"{name} is not valid JSON")


def _check_text(data):
    # json.loads accepts lone surrogates ("\ud800"), which no tokenizer can encode; walked without recursion
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(400, "request body contains a lone UTF-16 surrogate, not valid Unicode") from None
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def parse_json_body(raw: bytes, limit: int | None = DEFAULT_MAX_BODY) -> dict:
    """The JSON object of a request body, or RequestError 413 (more than `limit` bytes; None: no limit) / 400 (not
    a JSON object of text). The messages speak to the client: where the JSON is broken, never Python's advice."""
    if limit is not None and len(raw) > limit:
        raise RequestError(413, f"request body is larger than {limit} bytes")
    if not raw.strip():
        raise RequestError(400, "request body is empty: send a JSON object")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise RequestError(400, "request body is not UTF-8") from None
    except (json.JSONDecodeError, _NotJSON) as e:  # "Expecting value: line 1 column 9 (char 8)", "NaN is not ..."
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    except ValueError:  # int() past sys.get_int_max_str_digits(), its message advising to raise that limit
        raise RequestError(400, "request body is not valid JSON: a number has too many digits (more than "
                                f"{sys.get_int_max_str_digits()})") from None  # fmt: skip
    except RecursionError:  # "maximum recursion depth exceeded while decoding a JSON array ..."
        raise RequestError(400, "request body is not valid JSON: lists/objects nest too deeply") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"request body must be a JSON object, got {type(data).__name__}")
    _check_text(data)
    return data


async def read_body(request, limit: int | None = DEFAULT_MAX_BODY) -> bytes:
    """A Starlette request's body, refused (413) as soon as it passes `limit` bytes (None: no limit), chunked or
    not. A client that leaves before the whole body came raises Starlette's ClientDisconnect (answered by
    fastapi_app.base_app's apps without a word: nobody is left to read it)."""
    declared = request.headers.get("content-length")
    if limit is not None and declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if limit is not None and size > limit:
            raise RequestError(413, f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def field(data: dict, name: str, kind, required: bool = False, default=None):
    """data[name] checked against `kind` ("str", "int", "number", "bool", "list"); None/missing -> default."""
    value = data.get(name)
    if value is None:
        if required:
            raise RequestError(400, f"'{name}' is required", name)
        return default
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list": isinstance(value, list),
    }[kind]
    if not ok:
        names = {
            "str": "a string",
            "int": "an integer",
            "number": "a number",
            "bool": "true or false",
            "list": "a list",
        }
        raise RequestError(400, f"'{name}' must be {names[kind]}, got {type(value).__name__}", name)
    return value


def check_history(version: str, history) -> list:
    """v1/v2: a list of [query, response] string pairs; v3: a list of {"role", "content"} messages."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise RequestError(400, f"'history' must be a list, got {type(history).__name__}", "history")
    out = []
    for i, item in enumerate(history):
        if version != "v3":
            if not (isinstance(item, list) and len(item) == 2 and all(isinstance(s, str) for s in item)):
                raise RequestError(400, f"history[{i}] must be a [query, response] pair of strings", "history")
            out.append((item[0], item[1]))
            continue
        if not isinstance(item, dict):
            raise RequestError(400, f"history[{i}] must be an object with 'role' and 'content' (ChatGLM3)", "history")
        role, content = item.get("role"), item.get("content")
        if role not in V3_ROLES:
            raise RequestError(400, f"history[{i}].role must be one of {', '.join(V3_ROLES)}, got {role!r}", "history")
        if not isinstance(content, str):
            raise RequestError(400, f"history[{i}].content must be a string", "history")
        msg = {"role": role, "content": content}
        if item.get("metadata") is not None:
            if not isinstance(item["metadata"], str):
                raise RequestError(400, f"history[{i}].metadata must be a string", "history")
            msg["metadata"] = item["metadata"]
        if item.get("tools") is not None:
            if role != "system" or not isinstance(item["tools"], list):
                raise RequestError(400, f"history[{i}].tools must be a list on a system message", "history")
            msg["tools"] = check_tools(item["tools"], "history")
        out.append(msg)
    return out


def check_depth(value, param: str, limit: int = MAX_DEPTH) -> None:
    """RequestError 400 when lists/objects in `value` nest deeper than `limit` (walked without recursion)."""
    stack = [(value, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth >= limit:
                raise RequestError(400, f"'{param}' nests lists/objects deeper than {limit} levels", param)
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))


def check_tools(tools: list, param: str = "tools") -> list:
    """ChatGLM3 tool definitions, bounded: nesting depth, and their size as the prompt renders them."""
    check_depth(tools, param)
    size = len(json.dumps(tools, indent=4, ensure_ascii=False))
    if size > MAX_TOOLS_CHARS:
        raise RequestError(400, f"'{param}': the tool definitions render to {size} characters in the prompt, more "
                                f"than {MAX_TOOLS_CHARS}", param)  # fmt: skip
    return tools


def check_prompt(model, tokenizer, query: str, history: list, role: str = "user", gen: dict | None = None,
                 requested_new: int | None = None) -> int:  # fmt: skip
    """The prompt's length in tokens (as model.stream_chat builds it, tools block included), refused with 400 when
    it leaves no room for a reply in the model's context or in max_length, or when prompt + `requested_new`
    (tokens the client asked for) passes the context. A default max_new_tokens in `gen` is cut to fit."""
    version = model.config.chatglm_version
    n = int(model._chat_inputs(tokenizer, version, query, history, role, None)["input_ids"].shape[-1])
    return check_prompt_length(model, n, gen, requested_new, "the prompt (query and history)", "messages")


def check_prompt_length(model, n: int, gen: dict | None, requested_new: int | None, what: str = "the prompt",
                        field: str = "prompt") -> int:  # fmt: skip
    """check_prompt for a prompt of n tokens."""
    limit = context_length(model)
    if n >= limit:
        raise RequestError(400, f"{what} is {n} tokens; this model's context is {limit} tokens: shorten it", field)
    gen = gen if gen is not None else {}
    if gen.get("max_length") is not None and n >= gen["max_length"]:
        raise RequestError(400, f"{what} is {n} tokens, 'max_length' {gen['max_length']} leaves no room for a reply",
                           "max_length")  # fmt: skip
    if requested_new is not None and n + requested_new > limit:
        raise RequestError(400, f"this model's context is {limit} tokens; the prompt is {n} and 'max_tokens' asks "
                                f"for {requested_new} more", "max_tokens")  # fmt: skip
    if gen.get("max_new_tokens") and n + gen["max_new_tokens"] > limit:
        gen["max_new_tokens"] = limit - n
    return n


def context_length(model) -> int:
    config = model.config
    n = config.max_sequence_length if config.chatglm_version == "v1" else config.seq_length
    return int(n or 2048)


def generation_kwargs(model, max_length=None, top_p=None, temperature=None, max_temperature=MAX_TEMPERATURE) -> dict:
    """Checked chat() arguments; None keeps the model's default (for the built-in tiny model, the
    `default_max_new_tokens` its loader set). temperature 0 (or under MIN_TEMPERATURE, 1e-5) means greedy decoding."""
    gen = {}
    if max_length is None and getattr(model, "default_max_new_tokens", None):
        gen["max_new_tokens"] = model.default_max_new_tokens
    if max_length is not None:
        limit = context_length(model)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= limit:
            raise RequestError(400, f"'max_length' must be an integer from 1 to {limit}", "max_length")
        gen["max_length"] = max_length
    if top_p is not None:
        if not _finite(top_p) or not 0 <= top_p <= 1:  # 0: the most likely token only, as the originals take it
            raise RequestError(400, "'top_p' must be a number from 0 to 1", "top_p")
        gen["top_p"] = float(top_p)
    if temperature is not None:
        if not _finite(temperature) or not 0 <= temperature <= max_temperature:
            raise RequestError(400, f"'temperature' must be a number from 0 to {max_temperature:g}", "temperature")
        if temperature < MIN_TEMPERATURE:
            gen["do_sample"] = False  # greedy: what a temperature going to 0 tends to
        else:
            gen["temperature"] = float(temperature)
    return gen


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_body_limit(limit: int) -> int:
    """An app's max_body_bytes: a whole number of bytes, at least 1 (below that every body would be refused)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"max_body_bytes must be an integer >= 1, not {limit!r}")
    return limit


def _body_bytes(text: str) -> int:
    """--max-body-bytes as argparse reads it: refused at startup (one line, status 2) unless a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of bytes, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def add_server_args(parser, port: int):
    """--host, --port and the limits every server takes."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
    g.add_argument("--port", type=int, default=port, help=f"port (default {port})")
    g.add_argument("--max-body-bytes", type=_body_bytes, default=DEFAULT_MAX_BODY,
                   help=f"largest request body accepted, in bytes (default {DEFAULT_MAX_BODY}); a larger one is "
                        "refused with 413")  # fmt: skip
    g.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a Host header to accept besides localhost and the bound address (repeatable; '*': any). "
                        "Other Hosts are refused, against DNS rebinding; a server bound to 0.0.0.0 or :: accepts "
                        "any")  # fmt: skip
    return g


def exit_unless_listenable(host: str, port: int, every_address: bool = True) -> None:
    """Exit with one line (status 2) when (host, port) cannot be listened on (the port taken, an address this
    machine does not have): checked before the model loads, not minutes later. Each address is tried as the
    server will bind it: every_address, as uvicorn (asyncio's create_server: each address the name resolves to,
    IPv6 ones v6-only); else one socket of the family the host string names, as werkzeug."""
    try:
        if not 0 <= port <= 65535:
            raise OSError("the port must be from 0 to 65535")
        if every_address:
            infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)  # fmt: skip
            addresses = list(dict.fromkeys((info[0], info[4]) for info in infos))
        else:
            addresses = [(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))]
        for family, address in addresses:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers: TIME_WAIT is no obstacle
                if family == socket.AF_INET6 and every_address:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(address)
    except OSError as e:  # socket.gaierror included
        print(f"error: cannot listen on {host}:{port}: {e.strerror or e} (--host / --port)", file=sys.stderr)
        sys.exit(2)


LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})


def allowed_hosts(bind: str, extra=()) -> frozenset | None:
    """Host header names a server bound to `bind` accepts (None: any): localhost, the bound address, `extra`."""
    extra = {h.lower().strip("[]") for h in extra}
    if bind in WILDCARD_BINDS or "*" in extra:
        return None
    return LOCAL_HOSTS | {bind.lower().strip("[]")} | extra


def check_host(header: str | None, allowed: frozenset | None) -> None:
    """RequestError 400 unless the Host header (name, optional port) is one of `allowed` (None: any)."""
    if allowed is None:
        return
    host = (header or "").strip().lower()
    name = (
        host[1 : host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    )
    if name not in allowed:
        raise RequestError(400, f"Host {header!r} is not served here (DNS rebinding guard); start the server with "
                                f"--allow-host {name or 'NAME'} to accept it")  # fmt: skip


def now_string() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())


class HostGuard:
    """ASGI middleware refusing requests whose Host header is not `allowed` (check_host) with `refuse(request,
    error)`, an async app's RequestError handler. Plain ASGI: an endpoint still sees its client disconnect."""

    def __init__(self, app, allowed: frozenset | None, refuse):
        self.app, self.allowed, self.refuse = app, allowed, refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.allowed is not None:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            try:
                check_host(host, self.allowed)
            except RequestError as e:
                from starlette.requests import Request

                response = await self.refuse(Request(scope, receive), e)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BearerAuth:
    """ASGI middleware: every HTTP request but `open_paths` must carry `Authorization: Bearer <key>` (compared in
    constant time), else `refuse(request, RequestError(401))`. Plain ASGI, as HostGuard."""

    def __init__(self, app, key: str, refuse, open_paths=("/health",)):
        self.app, self.key, self.refuse, self.open = app, key.encode(), refuse, frozenset(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.open:
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
                from starlette.requests import Request

                e = RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")
                response = await self.refuse(Request(scope, receive), e)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
