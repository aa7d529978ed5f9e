"""Tools the model may call: `@register_tool` turns a typed Python function into a v3 tool description.

    @register_tool
    def random_number_generator(
        seed: Annotated[int, "The random seed used by the generator", True],
        range: Annotated[tuple[int, int], "The range of the generated numbers", True],
    ) -> int:
        \"\"\"Generates a random number x, s.t. range[0] <= x < range[1]\"\"\"

The description is the docstring; each parameter is `Annotated[type, description, required]` (required defaults to
"has no default value"). The schema is the JSON-schema shape ChatGLM3 was trained on
(`{"name", "description", "parameters": {"type": "object", "properties", "required"}}`).

A call from the model arrives as the parameters `chatglm.generation.parse_tool_call` read with `ast` (literals
only, nothing evaluated). `ToolRegistry.dispatch` checks them against the schema (required present, no unknown
names, JSON types) before the function runs, and turns whatever happens into the text sent back as the observation.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin

__all__ = ["Tool", "ToolCallError", "ToolRegistry", "register_tool", "REGISTRY", "json_schema"]


class ToolCallError(ValueError):
    """A call the registry refuses: unknown tool, missing / unknown / mistyped parameters."""


_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


def json_schema(annotation) -> tuple[dict, bool]:
    """(JSON schema of a Python type annotation, whether None is allowed)."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return {}, False
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return json_schema(args[0])
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return json_schema(rest[0])[0], len(rest) < len(args)
        return {"anyOf": [json_schema(a)[0] for a in rest]}, len(rest) < len(args)
    if origin is Literal:
        return {"enum": list(args)}, False
    if origin in (list, tuple, set, frozenset) or annotation in (tuple, set, frozenset):
        schema: dict = {"type": "array"}
        if origin is tuple and args and args[-1] is not Ellipsis:
            items = [json_schema(a)[0] for a in args]
            if all(item == items[0] for item in items):
                schema["items"] = items[0]
            else:
                schema["prefixItems"] = items
            schema["minItems"] = schema["maxItems"] = len(args)
        elif args:
            schema["items"] = json_schema(args[0])[0]
        return schema, False
    if origin is dict:
        return {"type": "object"}, False
    if annotation in _SIMPLE:
        return {"type": _SIMPLE[annotation]}, False
    raise TypeError(f"cannot describe {annotation!r} as a JSON type")


def _check(value, schema: dict, where: str) -> None:
    """Raise ToolCallError when `value` does not have the JSON type `schema` describes."""
    if "enum" in schema and value not in schema["enum"]:
        raise ToolCallError(f"{where} must be one of {schema['enum']}, got {value!r}")
    if "anyOf" in schema:
        for option in schema["anyOf"]:
            try:
                return _check(value, option, where)
            except ToolCallError:
                continue
        raise ToolCallError(f"{where} has the wrong type ({type(value).__name__})")
    kind = schema.get("type")
    ok = {
        None: True,
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "object": isinstance(value, dict),
        "array": isinstance(value, (list, tuple)),
    }[kind]
    if not ok:
        raise ToolCallError(f"{where} must be of type {kind}, got {type(value).__name__} {value!r:.60}")
    if kind == "array":
        if "minItems" in schema and not schema["minItems"] <= len(value) <= schema["maxItems"]:
            raise ToolCallError(f"{where} must have {schema['minItems']} items, got {len(value)}")
        for i, item in enumerate(value):
            sub = schema["prefixItems"][i] if "prefixItems" in schema else schema.get("items", {})
            _check(item, sub, f"{where}[{i}]")
    if kind == "object" and not all(isinstance(k, str) for k in value):
        raise ToolCallError(f"{where} must have string keys")


@dataclass
class Tool:
    name: str
    description: str
    func: Callable
    properties: dict[str, dict] = field(default_factory=dict)
    required: list[str] = field(default_factory=list)
    tuples: set[str] = field(default_factory=set)  # parameters passed to the function as tuples
    opt_in: bool = False  # only offered when the user enables it (the shell)

    def schema(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "parameters": {"type": "object", "properties": self.properties, "required": list(self.required)},
        }

    def validate(self, params) -> dict:
        """The keyword arguments for the function, or ToolCallError saying what is wrong with `params`."""
        if not isinstance(params, dict):
            raise ToolCallError(f"the parameters of {self.name} must be keyword arguments")
        unknown = sorted(set(params) - set(self.properties))
        if unknown:
            raise ToolCallError(f"{self.name} has no parameter(s) {', '.join(unknown)}")
        missing = [p for p in self.required if p not in params]
        if missing:
            raise ToolCallError(f"{self.name} is missing the required parameter(s) {', '.join(missing)}")
        kwargs = {}
        for name, value in params.items():
            schema = self.properties[name]
            if value is not None or name in self.required:
                _check(value, schema, f"parameter {name!r}")
            kwargs[name] = tuple(value) if name in self.tuples and isinstance(value, list) else value
        return kwargs


def describe(func: Callable, name: str | None = None, opt_in: bool = False) -> Tool:
    """A Tool from a function's name, docstring and `Annotated[type, description, required]` parameters."""
    hints = typing.get_type_hints(func, include_extras=True)
    tool = Tool(name or func.__name__, " ".join(inspect.cleandoc(func.__doc__ or "").split()), func, opt_in=opt_in)
    if not tool.description:
        raise TypeError(f"tool {tool.name} needs a docstring: it is the description the model reads")
    for pname, param in inspect.signature(func).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise TypeError(f"tool {tool.name}: parameter {pname} must be an ordinary keyword parameter")
        annotation = hints.get(pname, inspect.Parameter.empty)
        description, required = "", param.default is inspect.Parameter.empty
        if get_origin(annotation) is Annotated:
            meta = get_args(annotation)[1:]
            if len(meta) > 0:
                description = str(meta[0])
            if len(meta) > 1:
                required = bool(meta[1])
        schema, _nullable = json_schema(annotation)
        if description:
            schema = {**schema, "description": description}
        tool.properties[pname] = schema
        if required:
            tool.required.append(pname)
        base = get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation
        if get_origin(base) is tuple or base is tuple:
            tool.tuples.add(pname)
    return tool


class ToolRegistry:
    """Named tools; `active()` gives the view offered to (and callable by) the model."""

    def __init__(self, tools=()):
        self._tools: dict[str, Tool] = {t.name: t for t in tools}

    def register(self, func: Callable | None = None, *, name: str | None = None, opt_in: bool = False):
        """Decorator (bare or with arguments) that adds a function as a tool and returns it unchanged."""

        def add(f: Callable) -> Callable:
            tool = describe(f, name, opt_in)
            self._tools[tool.name] = tool
            return f

        return add(func) if func is not None else add

    def __contains__(self, name) -> bool:
        return name in self._tools

    def __iter__(self):
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def get(self, name: str) -> Tool:
        if name not in self._tools:
            known = ", ".join(self._tools) or "none"
            raise ToolCallError(f"there is no tool named {name!r} (available: {known})")
        return self._tools[name]

    def active(self, enabled_opt_in=()) -> ToolRegistry:
        """The tools a session offers: every ordinary tool, plus the opt-in ones it names (e.g. {"shell"})."""
        return ToolRegistry(t for t in self._tools.values() if not t.opt_in or t.name in set(enabled_opt_in))

    def schemas(self) -> list[dict]:
        return [t.schema() for t in self._tools.values()]

    def dispatch(self, name: str, params) -> str:
        """Validate and run one call; the result (or what went wrong) as the text of the observation."""
        try:
            tool = self.get(name)
            kwargs = tool.validate(params)
        except ToolCallError as e:
            return f"Error: {e}"
        try:
            result = tool.func(**kwargs)
        except Exception as e:  # a tool's failure is reported to the model, not raised into the page
            return f"Error: {name} failed: {type(e).__name__}: {e}"
        if isinstance(result, str):
            return result
        try:
            return json.dumps(result, ensure_ascii=False)
        except (TypeError, ValueError):
            return repr(result)


REGISTRY = ToolRegistry()


def register_tool(func: Callable | None = None, *, name: str | None = None, opt_in: bool = False):
    """Add a function to the demo's tool registry (see the module docstring)."""
    return REGISTRY.register(func, name=name, opt_in=opt_in)


def load_tool_list(text: str) -> list[dict]:
    """A tool list typed by the user (YAML or JSON) for manual mode: a list of mappings, each with a "name"."""
    import yaml

    try:
        tools = yaml.safe_load(text) if text.strip() else []
    except yaml.YAMLError as e:
        raise ValueError(f"the tool list is not valid YAML/JSON: {e}") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
        raise ValueError("the tool list must be a list of mappings, each with a string 'name'")
    return json.loads(json.dumps(tools, default=str))  # YAML dates and the like become strings for the prompt


def dump_tool_list(tools: list[dict]) -> str:
    import yaml

    return yaml.safe_dump(tools, allow_unicode=True, sort_keys=False)
