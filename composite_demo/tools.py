"""The demo's built-in tools, registered with `@register_tool` on import.

Offline: `random_number_generator`, `calculator` (arithmetic read with an `ast` walker, never `eval`) and
`get_current_time`. Online: `get_weather` asks wttr.in with a short timeout and says plainly when the network is not
there. Opt-in: `shell` runs one command (split with `shlex`, no shell, with a timeout); it is offered to the model only
when the user switches it on in the sidebar (or starts the demo with COMPOSITE_DEMO_ENABLE_SHELL=1).
"""

from __future__ import annotations

import ast
import datetime as _dt
import json
import math
import operator
import os
import random
import shlex
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from typing import Annotated

from .tool_registry import register_tool

WEATHER_URL = os.environ.get("COMPOSITE_DEMO_WEATHER_URL", "https://wttr.in/{city}?format=j1")
NETWORK_TIMEOUT = float(os.environ.get("COMPOSITE_DEMO_NETWORK_TIMEOUT", "5"))
SHELL_TIMEOUT = float(os.environ.get("COMPOSITE_DEMO_SHELL_TIMEOUT", "10"))
SHELL_OUTPUT_LIMIT = 20_000


def shell_enabled_by_env() -> bool:
    return os.environ.get("COMPOSITE_DEMO_ENABLE_SHELL", "").strip().lower() in ("1", "true", "yes", "on")


@register_tool
def random_number_generator(
    seed: Annotated[int, "The random seed used by the generator", True],
    range: Annotated[tuple[int, int], "The range of the generated numbers", True],
) -> int:
    """Generates a random number x, s.t. range[0] <= x < range[1]"""
    low, high = range
    if low >= high:
        raise ValueError(f"the range must satisfy range[0] < range[1], got {list(range)}")
    return random.Random(seed).randrange(low, high)


# --- calculator -----------------------------------------------------------------------------------------------


class CalculatorError(ValueError):
    pass


MAX_EXPRESSION = 500
MAX_INT_BITS = 4096
MAX_FACTORIAL = 500


def _factorial(n):
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if not isinstance(n, int) or n < 0:
        raise CalculatorError("factorial needs a non-negative integer")
    if n > MAX_FACTORIAL:
        raise CalculatorError(f"factorial is limited to n <= {MAX_FACTORIAL}")
    return math.factorial(n)


FUNCTIONS = {
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log10": math.log10, "log2": math.log2,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos, "atan": math.atan,
    "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil, "factorial": _factorial,
    "min": min, "max": max,
}  # fmt: skip
CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}  # fmt: skip
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _number(value):
    if isinstance(value, complex):
        raise CalculatorError("the result is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"the result is too large (over {MAX_INT_BITS} bits)")
    if isinstance(value, float) and math.isnan(value):
        raise CalculatorError("the result is not a number")
    return value


def _power(base, exponent):
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS:
            raise CalculatorError(f"the result is too large (over {MAX_INT_BITS} bits)")
    if isinstance(exponent, float) and abs(exponent) > 1e6 and abs(base) > 1:
        raise CalculatorError("the exponent is too large")
    if isinstance(exponent, int) and abs(exponent) > 10**6 and isinstance(base, float):
        raise CalculatorError("the exponent is too large")
    return base**exponent


def _walk(node):
    if isinstance(node, ast.Expression):
        return _walk(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CalculatorError(f"only numbers are allowed, not {node.value!r:.40}")
        return _number(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow):
            return _number(_power(left, right))
        return _number(BINARY[type(node.op)](left, right))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise CalculatorError("^ is not a power here: write ** (e.g. 2**10)")
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return _number(UNARY[type(node.op)](_walk(node.operand)))
    if isinstance(node, ast.Name) and node.id in CONSTANTS:
        return CONSTANTS[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
        if node.keywords:
            raise CalculatorError(f"{node.func.id}() takes positional arguments only")
        args = [_walk(a) for a in node.args]
        try:
            return _number(FUNCTIONS[node.func.id](*args))
        except TypeError as e:
            raise CalculatorError(f"{node.func.id}(): {e}") from None
    what = node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else type(node).__name__
    raise CalculatorError(f"{what!r} is not allowed: use numbers, + - * / // % **, parentheses, {', '.join(FUNCTIONS)}")


def calculate(expression: str):
    """The value of an arithmetic expression (an `ast` walk over an allow-list; nothing is evaluated by Python)."""
    if not isinstance(expression, str):
        raise CalculatorError("the expression must be a string")
    expression = expression.strip().replace("×", "*").replace("÷", "/")
    if not expression:
        raise CalculatorError("the expression is empty")
    if len(expression) > MAX_EXPRESSION:
        raise CalculatorError(f"the expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CalculatorError(f"not an arithmetic expression: {getattr(e, 'msg', e)}") from None
    try:
        return _walk(tree)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("the result is too large") from None
    except RecursionError:
        raise CalculatorError("the expression is nested too deeply") from None
    except ValueError as e:  # math domain errors (sqrt(-1), log(0)) and CalculatorError itself
        if isinstance(e, CalculatorError):
            raise
        raise CalculatorError(f"math error: {e}") from None


@register_tool
def calculator(
    expression: Annotated[str, "An arithmetic expression, e.g. (3 + 4) * 2 ** 10 / sqrt(2)", True],
) -> str:
    """Computes an arithmetic expression: numbers, + - * / // % **, parentheses, and the functions sqrt, exp, log,
    log10, log2, sin, cos, tan, asin, acos, atan, abs, round, floor, ceil, factorial, min, max; constants pi, e."""
    try:
        return str(calculate(expression))
    except CalculatorError as e:
        return f"Error: {e}"


@register_tool
def get_current_time(
    timezone: Annotated[str, "An IANA time zone such as Asia/Shanghai; empty for the local time", False] = "",
) -> str:
    """Returns the current date and time (local time of the machine running the demo, or in the given time zone)."""
    now = _dt.datetime.now().astimezone()
    if timezone:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            now = now.astimezone(ZoneInfo(timezone))
        except (ZoneInfoNotFoundError, ValueError):
            return f"Error: unknown time zone {timezone!r}"
    return now.strftime("%Y-%m-%d %H:%M:%S %Z (UTC%z), %A")


# --- network --------------------------------------------------------------------------------------------------


def http_get(url: str, timeout: float) -> bytes:
    """The one place the tools touch the network (tests replace it)."""
    request = urllib.request.Request(url, headers={"User-Agent": "chatglm-composite-demo"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read(1_000_000)


@register_tool
def get_weather(city_name: Annotated[str, "The name of the city to be queried", True]) -> str:
    """Get the current weather for `city_name` (needs internet access: it asks wttr.in)"""
    if not city_name.strip():
        return "Error: city_name is empty"
    url = WEATHER_URL.format(city=urllib.parse.quote(city_name.strip()))
    try:
        data = json.loads(http_get(url, NETWORK_TIMEOUT))
        now = data["current_condition"][0]
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        return (
            f"Network not available: get_weather needs internet access and could not reach "
            f"{urllib.parse.urlsplit(url).netloc} ({reason}). No weather data was retrieved."
        )
    except (ValueError, KeyError, IndexError, TypeError):
        return "Error: the weather service sent an answer that could not be read"
    wanted = {
        "temperature_C": "temp_C",
        "feels_like_C": "FeelsLikeC",
        "humidity_percent": "humidity",
        "wind_kmph": "windspeedKmph",
        "observation_time": "observation_time",
    }
    out = {k: now[v] for k, v in wanted.items() if v in now}
    if now.get("weatherDesc"):
        out["description"] = now["weatherDesc"][0].get("value", "")
    return json.dumps(out, ensure_ascii=False)


# --- opt-in ---------------------------------------------------------------------------------------------------


@register_tool(opt_in=True)
def shell(command: Annotated[str, "One command with its arguments, e.g. `ls -l` (no pipes or redirection)", True]):
    """Runs one command on the computer running the demo and returns its output and exit code."""
    try:
        argv = shlex.split(command)
    except ValueError as e:
        return f"Error: cannot split the command: {e}"
    if not argv:
        return "Error: the command is empty"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=SHELL_TIMEOUT, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return f"Error: command not found: {argv[0]}"
    except subprocess.TimeoutExpired:
        return f"Error: the command did not finish within {SHELL_TIMEOUT:g} s and was stopped"
    except OSError as e:
        return f"Error: {e}"
    out = (done.stdout + done.stderr)[:SHELL_OUTPUT_LIMIT]
    return f"{out}\n[exit code {done.returncode}]".lstrip("\n")
