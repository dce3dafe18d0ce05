"""Recipes: plain YAML read into nested dataclasses, with dotted `key=value` overrides.

The dataclass schema is the single description of what a recipe may say, so an unknown or
misspelt key is an error that names the key and the file instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from core.errors import ArgumentParser, UserError

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true and false. YAML 1.1 also reads no/off/yes/on as booleans, which turned
    `resume=no` into False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _parse(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def load_recipe(path: str | Path, overrides: list[str], schema: type[T], *,
                example: str = "recipes/pretrain/mae-tiny-synth.yaml") -> T:
    """Read `path`, apply `overrides` (`a.b=value`, value parsed as YAML) and build `schema`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe not found; pass a YAML file such as {example}")
    try:
        raw = _parse(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} is not valid YAML; fix the syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping of keys to values; got {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override, source=path)
    return build(schema, raw, source=path)


def apply_override(raw: dict, override: str, *, source: Path | str) -> None:
    """Set `a.b.c=value` inside the nested mapping `raw`."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise UserError(f"{source}: override {override!r} is not of the form key=value (e.g. train.steps=100)")
    value = _parse(text) if text else None
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{source}: override {override!r}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def build(schema: type[T], data: dict, *, source: Path | str, prefix: str = "") -> T:
    """Instantiate the dataclass `schema` from `data`, checking keys and coercing scalar types."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    values: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(f"{prefix}{name}" for name in fields)
            raise UserError(f"{source}: unknown key {dotted!r}; known keys here: {known}")
        values[key] = _coerce(hints[key], value, source=source, dotted=dotted)
    try:
        return schema(**values)
    except (TypeError, ValueError) as error:
        raise UserError(f"{source}: {prefix.rstrip('.') or 'recipe'}: {error}") from None


def to_dict(recipe: Any) -> dict:
    """The recipe as plain data, for logging and for saving next to the results."""
    return dataclasses.asdict(recipe)


def recipe_from_argv(argv: list[str], schema: type[T], *, prog: str, description: str, example: str
                     ) -> tuple[str, T] | None:
    """`RECIPE.yaml [key=value ...] [--print-recipe]` -> (path, recipe); None once `--print-recipe` has printed the
    effective recipe (the file with its overrides and every default filled in) as YAML."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("recipe", help=f"YAML recipe, e.g. {example}")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    parser.add_argument("--print-recipe", action="store_true",
                        help="print the effective recipe (after overrides, defaults filled in) as YAML and exit")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides, schema, example=example)
    if args.print_recipe:
        print(yaml.safe_dump(to_dict(recipe), sort_keys=False), end="")
        return None
    return args.recipe, recipe


def _coerce(hint: Any, value: Any, *, source: Path | str, dotted: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, source=source, dotted=dotted)
            except UserError as error:
                errors.append(error)
        raise errors[0]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise UserError(f"{source}: {dotted!r} is a section; give it keys, e.g. {dotted}.<key>=...")
        return build(hint, value, source=source, prefix=f"{dotted}.")
    if origin in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [value]
        item_hint = args[0] if args else Any
        coerced = [_coerce(item_hint, item, source=source, dotted=dotted) for item in items]
        return coerced if origin is list else tuple(coerced)
    if origin is dict or hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typing.get_origin(hint) is typing.Literal:
        if value in args:
            return value
        raise UserError(f"{source}: {dotted!r} must be one of {', '.join(map(str, args))}; got {value!r}")
    else:
        return value
    raise UserError(f"{source}: {dotted!r} must be {getattr(hint, '__name__', hint)}; got {value!r}")
