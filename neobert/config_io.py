"""Typed configs: nested dataclasses <-> dicts / YAML, plus dotted CLI overrides (`--model.num_layers 2`).

Every job config is a tree of dataclasses. `load_config(Cls, yaml_path, overrides)` builds it from a YAML file
(optionally `base:`-inheriting another YAML) and CLI overrides, converting and type-checking each leaf, and
raising `ValueError` naming the dotted key, the bad value and the accepted keys. Dataclass `__post_init__`
does the semantic validation. Configs pickle (they cross the Ray boundary) and round-trip through YAML.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"config key {key!r}: {value!r} does not match {tp}: {'; '.join(errors)}")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"config key {key!r}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # `--length_views 1024`: one item of a list key
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"config key {key!r}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"config key {key!r}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                    if f.is_integer():
                        return int(f)
                except ValueError:
                    pass
        raise ValueError(f"config key {key!r}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"config key {key!r}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key {key!r}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"config key {key!r}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict, converting leaves to the annotated types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {[prefix + k for k in unknown]} for {cls.__name__}; "
            f"valid keys: {[prefix + k for k in fields]}"
        )
    kwargs = {name: _convert(value, hints[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`['--a.b', '3', '--c=x', '--flag']` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ValueError(f"expected an override like --train.max_steps=10, got {tok!r}")
        tok = tok[2:]
        if "=" in tok:
            key, raw = tok.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, raw = tok, argv[i + 1]
            i += 1
        else:
            key, raw = tok, "true"
        i += 1
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.replace("-", "_").split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override --{key} conflicts with an earlier scalar override")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml_dict(path: str | Path, *, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load a YAML config; a top-level `base: other.yaml` (relative to this file) is merged underneath.

    Every failure is a `ValueError` naming the file: missing, a directory, broken YAML (with its 1-based line
    and column), not a mapping at top level, or a `base:` chain that comes back to a file already in it.
    """
    path = Path(path)
    data = read_yaml_file(path)
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {path} must hold a mapping of config keys at top level, got {type(data).__name__}"
        )
    base = data.pop("base", None)
    if base:
        here = path.resolve()
        chain = (*_chain, here)
        target = (path.parent / str(base)).resolve()
        if target in chain:
            cycle = " -> ".join(str(p) for p in (*chain[chain.index(target) :], target))
            raise ValueError(
                f"config file {path}: `base: {base}` makes a cycle ({cycle}); remove one `base:`"
            )
        data = deep_merge(load_yaml_dict(path.parent / str(base), _chain=chain), data)
    return data


def read_yaml_file(path: str | Path) -> Any:
    """The parsed YAML of `path` (None for an empty file); `ValueError` naming the file, and for broken YAML
    the 1-based line and column of the problem."""
    path = Path(path)
    if path.is_dir():
        yamls = sorted(p.name for p in path.glob("*.yaml"))
        hint = f" (it holds {', '.join(yamls[:5])})" if yamls else ""
        raise ValueError(f"config file {path} is a directory{hint}; pass a YAML file, e.g. {path / 'x.yaml'}")
    if not path.exists():
        raise ValueError(f"config file {path} does not exist; pick one from configs/ or pass a valid path")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
        raise ValueError(f"config file {path}: invalid YAML{where}: {problem or e}") from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    data = load_yaml_dict(path) if path else {}
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


# ------------------------------------------------------------------------------------------ introspection
@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One leaf of a config tree, for `--help`: dotted key, type as written, value, the field's comment."""

    key: str
    type: str
    default: Any
    comment: str


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the `# comment` written on (or inside) the field's definition in the class body.

    Config classes document each field with one trailing comment; reading it from the source keeps `--help`
    and the code from drifting apart. Classes without source (built at runtime) give {}.
    """
    import inspect
    import io
    import textwrap
    import tokenize

    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    current: str | None = None
    depth = 0  # bracket depth: a field's default may span lines (ruff wraps long `field(...)` calls)
    prev: tokenize.TokenInfo | None = None
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(src).readline))
    except (tokenize.TokenError, SyntaxError):
        return {}
    for tok in tokens:
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif tok.type == tokenize.NAME and depth == 0 and tok.start[1] > 0:
            first_on_line = prev is None or prev.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
            if first_on_line:
                current = tok.string if tok.string in names else None
        elif tok.type == tokenize.COMMENT and current and current not in out:
            out[current] = tok.string.lstrip("#").strip()
        elif (
            tok.type == tokenize.OP
            and tok.string == "@"
            or (tok.type == tokenize.NAME and tok.string == "def")
        ):
            current = None
        if tok.type not in (tokenize.NL, tokenize.COMMENT):
            prev = tok
    return out


def type_name(tp: Any) -> str:
    """A short readable type: `int`, `str | None`, `one of: cosine, linear`, `list[str]`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of: " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def describe(cfg: Any, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of a config instance (nested dataclasses flattened to dotted keys) with its type, its
    value in `cfg` (pass a default instance to list defaults) and its source comment."""
    cls = type(cfg)
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    out: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.extend(describe(value, prefix + f.name + "."))
        else:
            out.append(
                KeyDoc(prefix + f.name, type_name(hints[f.name]), to_dict(value), comments.get(f.name, ""))
            )
    return out
