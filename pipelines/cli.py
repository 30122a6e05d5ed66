"""The one command line of every job in `jobs/`: config file, dotted overrides, Ray address, exit codes.

    python jobs/<job>.py [--config YAML] [--a.b VALUE | --a.b=VALUE ...] [--address ADDR] [--print-config] [-h]

A job declares a `JobSpec` (its config dataclass, default YAML, short flags, positionals, which keys are
output / input paths) and a `run(cfg, ctx)` function; `main(spec, run)` does the rest the same way for all:

* config = the YAML (`base:` inheritance, `neobert.config_io`) + short flags + dotted overrides, typed and
  validated by the dataclasses; `--print-config` prints it as YAML and exits 0 without starting Ray;
  `--help` lists the job's flags and every config key with its type, default and the field's source comment.
* output paths resolve to a place that outlives the job (`resolve_output_path`), input paths to the
  directory the job was submitted from when that is known (`resolve_input_path`); each output path is
  printed absolute before the job starts.
* exit codes: 0 success; 2 bad input or config, as ONE line `<job>: error: <message>` on stderr (no traceback),
  also when the error was raised inside a Ray task or a Ray Train worker (the root cause is unwrapped);
  1 a run that failed for any other reason (traceback, then the same one-line summary); a job may add its
  own codes (`JobSpec.error_codes`: export's parity failure is 3).

Paths under `ray job submit`: with `--working-dir .` the job runs inside Ray's package cache
(`<ray tmp>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>/`), which is deleted with the
session and changes with every code edit, so a relative output path there loses the run. A relative output
path is therefore resolved against `$NEOBERT_SUBMIT_DIR` (the directory the job was submitted from, passed by
the submit command) when it exists on the node, and refused with an error naming the fix otherwise:

    ray job submit --working-dir . --runtime-env-json "{\\"env_vars\\": {\\"NEOBERT_SUBMIT_DIR\\": \\"$PWD\\"}}" \\
        -- python jobs/pretrain.py
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from neobert.config_io import (
    deep_merge,
    describe,
    from_dict,
    parse_overrides,
    read_yaml_file,
    to_yaml,
)
from neobert.config_io import (
    load_yaml_dict as _load_yaml_dict,
)

REPO = Path(__file__).resolve().parents[1]
SUBMIT_DIR_ENV = "NEOBERT_SUBMIT_DIR"
# Set by Ray's job supervisor for the entrypoint of every `ray job submit` job.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
RAY_PACKAGE_CACHE = "working_dir_files"
SUBMIT_HINT = (
    "ray job submit --working-dir . --runtime-env-json "
    '"{\\"env_vars\\": {\\"NEOBERT_SUBMIT_DIR\\": \\"$PWD\\"}}" -- python jobs/...'
)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# --------------------------------------------------------------------------------------------------- paths
def submitted_job() -> bool:
    """True when this process is a `ray job submit` entrypoint (or runs inside Ray's working-dir cache)."""
    return bool(os.environ.get(RAY_JOB_ENV)) or RAY_PACKAGE_CACHE in Path.cwd().parts


def _is_uri(path: str) -> bool:
    head = path.split("/", 1)[0]
    return "://" in path or (":" in head and not head.startswith("~"))  # s3://, file://, random:tiny


def resolve_output_path(path: str, *, key: str = "output") -> str:
    """Where a job writes `path`, as an absolute local path or an unchanged URI.

    Relative paths resolve against the current directory, except for a `ray job submit` job: there the
    current directory is Ray's per-job package cache (lost with the session), so they resolve against
    `$NEOBERT_SUBMIT_DIR` when that directory exists on this node (a cluster on the submitting machine), and
    are refused otherwise (a remote cluster cannot write into the submitter's directory: pass an absolute
    path on storage every node shares, or a URI). "" stays "" (the job's "none").
    """
    if not path or _is_uri(path):
        return path
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    if not submitted_job():
        return str(p.resolve())
    submit_dir = os.environ.get(SUBMIT_DIR_ENV, "")
    if submit_dir and Path(submit_dir).is_dir():
        return str((Path(submit_dir) / p).resolve())
    if submit_dir:
        raise ValueError(
            f"{key}={path!r} is relative and the job runs on a remote cluster ({SUBMIT_DIR_ENV}={submit_dir} "
            f"does not exist on this node); pass an absolute path on storage every node can reach, or a URI "
            f"(e.g. --{key} s3://bucket/runs)"
        )
    raise ValueError(
        f"{key}={path!r} is relative and this `ray job submit` job runs in Ray's working-dir package cache "
        f"({Path.cwd()}), which is deleted with the Ray session; pass an absolute path or a URI "
        f"(--{key} /shared/runs or s3://bucket/runs), or, on a Ray cluster on this machine, submit with "
        f"the submit directory: {SUBMIT_HINT}"
    )


def resolve_input_path(path: str) -> str:
    """A relative input path of a `ray job submit` job, resolved against `$NEOBERT_SUBMIT_DIR` when the file
    is there (globs: when their folder is there); otherwise unchanged (it may ship with the working dir)."""
    if not path or _is_uri(path) or Path(path).expanduser().is_absolute() or not submitted_job():
        return path
    submit_dir = os.environ.get(SUBMIT_DIR_ENV, "")
    if not submit_dir:
        return path
    candidate = Path(submit_dir) / path
    probe = candidate if not any(c in path for c in "*?[") else candidate.parent
    return str(candidate) if probe.exists() else path


# ---------------------------------------------------------------------------------------------- job spec
@dataclasses.dataclass(frozen=True)
class Flag:
    """A short flag of one job, setting one config key (`--input a b` -> `input: [a, b]`).

    nargs: "one" value; "many" values (a list, up to the next `--flag`); "append" (repeatable, each value
    `convert`ed and appended to the list the config file gives); "none" (a switch: true).
    """

    names: tuple[str, ...]
    key: str
    help: str
    nargs: Literal["one", "many", "append", "none"] = "one"
    metavar: str = "VALUE"
    convert: Callable[[str], Any] | None = None


@dataclasses.dataclass(frozen=True)
class JobSpec:
    name: str  # prefix of the error line, e.g. "pretrain"
    doc: str  # the job's module docstring: the top of --help
    config_cls: type  # the job's config dataclass (listed by --help)
    default_config: str | Path | None = None  # YAML used without --config
    load: Callable[[str | None, list[str]], Any] | None = None  # (yaml, overrides) -> cfg; default: generic
    # (cfg, ctx) -> more overrides, checked on the driver before anything runs (e.g. settings the data fixes)
    prepare: Callable[[Any, Context], list[str]] | None = None
    flags: tuple[Flag, ...] = ()
    positionals: tuple[tuple[str, str], ...] = ()  # (METAVAR, config key), all optional, in order
    config_flags: tuple[str, ...] = ("--config",)  # flags naming the YAML file
    list_key: str = ""  # a YAML holding a bare list means {list_key: [...]}
    output_keys: tuple[str, ...] = ()  # resolved by resolve_output_path and printed
    input_keys: tuple[str, ...] = ()  # resolved by resolve_input_path; "a[].b" = field b of each list item
    user_errors: tuple[type[BaseException], ...] = ()  # exit 2 besides ValueError / missing files
    error_codes: tuple[tuple[type[BaseException], int], ...] = ()  # job-specific exit codes
    exit_codes_doc: str = ""  # one line for --help when the job has extra codes
    uses_ray: bool = True


@dataclasses.dataclass
class Invocation:
    """The parsed command line of one job run."""

    config: str | None = None
    address: str | None = None
    print_config: bool = False
    help: bool = False
    overrides: list[str] = dataclasses.field(default_factory=list)
    user_keys: set[str] = dataclasses.field(default_factory=set)  # dotted keys set on the command line
    appends: dict[str, list[Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Context:
    """What a job's `run(cfg, ctx)` gets besides its config."""

    spec: JobSpec
    invocation: Invocation
    raw: dict[str, Any]  # the merged YAML + overrides before typing (what the user wrote)

    @property
    def address(self) -> str | None:
        return self.invocation.address

    def user_set(self, key: str) -> bool:
        """Whether the user chose `key` (command line or their own --config file, not its `base:`)."""
        return key in self.invocation.user_keys

    def init_ray(self, **kwargs: Any) -> str:
        from pipelines.ray_session import init_ray

        mode = init_ray(self.address, REPO, **kwargs)
        install_console_filter(self.spec)
        return mode


# --------------------------------------------------------------------------------------------- parsing
def _bool_keys(cls: type) -> set[str]:
    try:
        return {k.key for k in describe(cls()) if k.type == "bool"}
    except Exception:  # a config class without defaults: no switch detection
        return set()


BOOL_WORDS = {"true", "false", "1", "0", "yes", "no", "on", "off"}


def parse_argv(spec: JobSpec, argv: Sequence[str]) -> Invocation:
    """Split argv into the common flags, the job's short flags, positionals and dotted overrides.

    Values are passed on as JSON scalars/lists (`--key=<json>`), so a path like `yes` or `1e3` stays a string.
    A dotted override takes the next token as its value unless that starts with `--`; a boolean key given
    alone is a switch (`--overwrite` = `--overwrite true`).
    """
    inv = Invocation()
    flags = {n: f for f in spec.flags for n in f.names}
    bools = _bool_keys(spec.config_cls)
    positionals = list(spec.positionals)
    args = list(argv)
    i = 0

    def value_of(tok: str, name: str) -> str:
        nonlocal i
        if "=" in tok:
            return tok.split("=", 1)[1]
        if i + 1 >= len(args) or args[i + 1].startswith("--"):
            raise ValueError(f"{name} needs a value")
        i += 1
        return args[i]

    while i < len(args):
        tok = args[i]
        name = tok.split("=", 1)[0]
        if tok in ("-h", "--help"):
            inv.help = True
        elif name == "--print-config":
            inv.print_config = True
        elif name in spec.config_flags:
            inv.config = value_of(tok, name)
        elif name == "--address":
            inv.address = value_of(tok, name)
        elif name in flags:
            f = flags[name]
            if f.nargs == "none":
                value: Any = True if "=" not in tok else tok.split("=", 1)[1]
            elif f.nargs == "many":
                value = [tok.split("=", 1)[1]] if "=" in tok else []
                while i + 1 < len(args) and not args[i + 1].startswith("--"):
                    i += 1
                    value.append(args[i])
                if not value:
                    raise ValueError(f"{name} needs at least one value")
            else:
                value = value_of(tok, name)
            if f.nargs == "append":
                inv.appends.setdefault(f.key, []).append(f.convert(value) if f.convert else value)
            else:
                inv.overrides.append(f"--{f.key}={json.dumps(value)}")
            inv.user_keys.add(f.key)
        elif tok.startswith("--"):
            key = name[2:].replace("-", "_")
            if "=" in tok:
                raw = tok.split("=", 1)[1]
            elif key in bools and (i + 1 >= len(args) or args[i + 1].lower() not in BOOL_WORDS):
                raw = "true"
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                i += 1
                raw = args[i]
            else:
                raise ValueError(f"{name} needs a value (--{key} VALUE or --{key}=VALUE); see --help")
            inv.overrides.append(f"--{key}={raw}")
            inv.user_keys.add(key)
        elif tok.startswith("-") and not tok[1:2].isdigit():
            raise ValueError(f"unknown flag {tok!r}; config keys take two dashes (--key VALUE), see --help")
        else:
            if not positionals:
                expected = " ".join(m for m, _ in spec.positionals) or "no positional arguments"
                raise ValueError(f"unexpected argument {tok!r} (this job takes {expected}; see --help)")
            _, key = positionals.pop(0)
            inv.overrides.append(f"--{key}={json.dumps(tok)}")
            inv.user_keys.add(key)
        i += 1
    return inv


def read_config_dict(spec: JobSpec, path: str | Path | None) -> dict[str, Any]:
    """The YAML as a dict (`base:` merged); a bare list is `{spec.list_key: [...]}` when the job allows it."""
    if not path:
        return {}
    if spec.list_key:
        data = read_yaml_file(path)
        if isinstance(data, list):
            return {spec.list_key: data}
    return _load_yaml_dict(path)


def _flat_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in data.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _flat_keys(v, prefix + k + ".")
    return out


def _get(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _default(cls: type, key: str) -> Any:
    node: Any = cls()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _generic_load(spec: JobSpec) -> Callable[[str | None, list[str]], Any]:
    def load(path: str | None, overrides: list[str]) -> Any:
        data = read_config_dict(spec, path)
        return from_dict(spec.config_cls, deep_merge(data, parse_overrides(overrides)))

    return load


def _config_path(spec: JobSpec, inv: Invocation) -> str | None:
    if inv.config is not None:
        return inv.config
    return str(spec.default_config) if spec.default_config else None


def resolve(spec: JobSpec, inv: Invocation) -> tuple[Any, Context]:
    """(typed config, context): YAML + flags + overrides, with path keys resolved and `spec.prepare` applied."""
    path = _config_path(spec, inv)
    default = Path(spec.default_config).resolve() if spec.default_config else None
    if inv.config is not None and Path(inv.config).resolve() != default:
        # the user's own file: the keys it sets (not those of its `base:`) count as chosen by the user
        own = read_yaml_file(inv.config)
        if isinstance(own, dict):
            inv.user_keys |= _flat_keys({k: v for k, v in own.items() if k != "base"})
        elif isinstance(own, list) and spec.list_key:
            inv.user_keys.add(spec.list_key)
    raw = deep_merge(read_config_dict(spec, path), parse_overrides(inv.overrides))
    extra: list[str] = []
    for key, items in inv.appends.items():
        current = _get(raw, key)
        merged = [*(current or []), *items]
        extra.append(f"--{key}={json.dumps(merged)}")
    raw = deep_merge(raw, parse_overrides(extra))
    for key in spec.output_keys:
        value = _get(raw, key)
        value = _default(spec.config_cls, key) if value is None else value
        resolved = resolve_output_path(str(value), key=key)
        if resolved != value:
            extra.append(f"--{key}={json.dumps(resolved)}")
    for key in spec.input_keys:
        if "[]." in key:  # a field of every item of a list, e.g. sources[].path
            list_key, field = key.split("[].", 1)
            items = _get(raw, list_key) or []
            if any(isinstance(it, dict) and it.get(field) for it in items):
                fixed = [
                    {**it, field: resolve_input_path(str(it[field]))}
                    if isinstance(it, dict) and it.get(field)
                    else it
                    for it in items
                ]
                extra.append(f"--{list_key}={json.dumps(fixed)}")
            continue
        value = _get(raw, key)
        if isinstance(value, list):
            fixed_list = [resolve_input_path(str(v)) for v in value]
            if fixed_list != value:
                extra.append(f"--{key}={json.dumps(fixed_list)}")
        elif isinstance(value, str) and resolve_input_path(value) != value:
            extra.append(f"--{key}={json.dumps(resolve_input_path(value))}")
    raw = deep_merge(raw, parse_overrides(extra))
    load = spec.load or _generic_load(spec)
    cfg = load(path, inv.overrides + extra)
    ctx = Context(spec, inv, raw)
    more = spec.prepare(cfg, ctx) if spec.prepare else []
    if more:
        cfg = load(path, inv.overrides + extra + more)
        ctx.raw = deep_merge(raw, parse_overrides(more))
    return cfg, ctx


# ------------------------------------------------------------------------------------------------ help
def _fmt_value(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v) if v == "" or v.strip() != v else v
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def help_text(spec: JobSpec, defaults: Any | None = None) -> str:
    """The job's docstring, its flags, and every config key with type, default and comment."""
    if defaults is None:
        try:
            defaults = (spec.load or _generic_load(spec))(
                str(spec.default_config) if spec.default_config else None, []
            )
        except Exception:  # defaults that need the environment (missing files): the dataclass defaults
            defaults = spec.config_cls()
    pos = " ".join(f"[{m}]" for m, _ in spec.positionals)
    usage = f"usage: python jobs/{spec.name}.py {pos + ' ' if pos else ''}[--config YAML] [--KEY VALUE ...]"
    usage += " [--address ADDR] [--print-config] [-h]"
    lines = [usage, "", spec.doc.strip(), "", "options:"]

    def opt(left: str, text: str) -> None:
        lines.append(f"  {left:<30} {text}" if len(left) < 30 else f"  {left}\n  {'':<30} {text}")

    default_cfg = f"default: {Path(spec.default_config).relative_to(REPO)}" if spec.default_config else ""
    opt(
        ", ".join(f"{n} YAML" for n in spec.config_flags),
        f"config file ({default_cfg or 'default: none'}); `base: other.yaml` inherits",
    )
    for m, key in spec.positionals:
        opt(m, f"= --{key}")
    for f in spec.flags:
        arg = {"one": f" {f.metavar}", "many": f" {f.metavar} [...]", "append": f" {f.metavar}", "none": ""}
        same = all(n[2:].replace("-", "_") == f.key for n in f.names)
        alias = f" (appends to {f.key})" if f.nargs == "append" else "" if same else f" (= --{f.key})"
        opt(", ".join(f"{n}{arg[f.nargs]}" for n in f.names), f.help + alias)
    if spec.uses_ray:
        opt(
            "--address ADDR",
            "Ray to join (host:port, ray://host:10001, auto); default: $RAY_ADDRESS, else local",
        )
    opt("--print-config", "print the resolved config as YAML and exit (Ray is not started)")
    opt("-h, --help", "this text")
    lines += [
        "",
        "exit codes: 0 ok; 2 bad input or config (one `error:` line); 1 the run failed"
        + (f"; {spec.exit_codes_doc}" if spec.exit_codes_doc else ""),
        "",
        "config keys (--KEY VALUE or --KEY=VALUE; default, then the field's comment):",
    ]
    section = None
    for k in describe(defaults):
        head = k.key.split(".")[0] if "." in k.key else None
        if head != section and head is not None:
            lines.append(f"  [{head}]")
        section = head
        left = f"--{k.key} ({k.type})"
        lines.append(f"    {left:<44} = {_fmt_value(k.default)}" + (f"  # {k.comment}" if k.comment else ""))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- errors
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
    PermissionError,
)


def _from_ray(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("ray.") or type(exc).__name__.startswith("RayTaskError")


def root_cause(exc: BaseException) -> BaseException:
    """The exception the user's problem started as, through Ray's wrappers: a Ray task error's `cause`,
    a Train run's first worker failure (lowest rank) or controller failure, and the `__cause__` of any
    other Ray exception (Ray Data's UserCodeException)."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)
        nxt: BaseException | None = None
        if isinstance(failures, dict) and failures:
            nxt = failures[min(failures)]
        elif isinstance(getattr(exc, "controller_failure", None), BaseException):
            nxt = exc.controller_failure  # type: ignore[attr-defined]
        elif type(exc).__name__.startswith("RayTaskError") and isinstance(
            getattr(exc, "cause", None), BaseException
        ):
            nxt = exc.cause  # type: ignore[attr-defined]
        elif exc.__cause__ is not None and (_from_ray(exc) or _from_ray(exc.__cause__)):
            nxt = exc.__cause__  # Ray Data's UserCodeException, or a caller's `raise ... from <Ray error>`
        if nxt is None:
            break
        exc = nxt
    return exc


def error_message(exc: BaseException) -> str:
    """One line: the exception's own message (a missing file: its path), never a traceback."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        msg = f"{exc.strerror}: {exc.filename}"
    else:
        msg = str(exc.args[0]) if len(exc.args) == 1 else str(exc)
    if type(exc).__name__.startswith("RayTaskError"):  # a dual instance: its str is a traceback
        msg = msg.strip().splitlines()[-1]
    return " ".join(msg.split()) or type(exc).__name__


def _exit_code(spec: JobSpec, exc: BaseException) -> int | None:
    for tp, code in spec.error_codes:
        if isinstance(exc, tp):
            return code
    if isinstance(exc, (*USER_ERRORS, *spec.user_errors)):
        return EXIT_USAGE
    return None


class UserErrorConsoleFilter(logging.Filter):
    """Keeps Ray Data's driver-side tracebacks of a user-input error off the console.

    When a task raises (a bad input row, a missing file), Ray Data logs the exception with its full
    traceback, twice, before the driver sees it, and calls it "internal code, please open an issue" when the
    error surfaces outside a UDF. The job then prints the one `error:` line with the root cause; those
    records are redundant there and still go to Ray Data's log file (this filter sits on its console
    handler only). Errors that are not the user's keep their tracebacks.
    """

    def __init__(self, spec: JobSpec) -> None:
        super().__init__()
        self.spec = spec

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if str(record.msg).startswith("Exception occurred in Ray Data or Ray Core internal code"):
            return False  # a preamble; the "Full stack trace" record after it carries the exception
        excs = [record.exc_info[1]] if record.exc_info and record.exc_info[1] else []
        args = record.args if isinstance(record.args, tuple) else ()
        excs += [a for a in args if isinstance(a, BaseException)]
        return not any(_exit_code(self.spec, root_cause(e)) == EXIT_USAGE for e in excs)


def install_console_filter(spec: JobSpec) -> None:
    """Attach `UserErrorConsoleFilter` to the console handler of the `ray.data` logger (once)."""
    for h in logging.getLogger("ray.data").handlers:
        if h.name == "console" and not any(isinstance(f, UserErrorConsoleFilter) for f in h.filters):
            h.addFilter(UserErrorConsoleFilter(spec))


def report_error(spec: JobSpec, exc: BaseException) -> int:
    """Print the error the way the exit-code contract says; return the exit code."""
    root = root_cause(exc)
    code = _exit_code(spec, root)
    if code is None:
        code = _exit_code(spec, exc)
    if code is None:
        traceback.print_exception(exc, file=sys.stderr)
        print(
            f"{spec.name}: error: the run failed: {type(root).__name__}: {error_message(root)}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(f"{spec.name}: error: {error_message(root)}", file=sys.stderr)
    return code


# ------------------------------------------------------------------------------------------------ main
def load(spec: JobSpec, argv: Sequence[str]) -> tuple[Any, Context]:
    """Parse and resolve without running: (config, context). Raises ValueError on bad input."""
    return resolve(spec, parse_argv(spec, argv))


def main(spec: JobSpec, run: Callable[[Any, Context], int | None], argv: Sequence[str] | None = None) -> int:
    """Run one job under the common contract; returns its exit code (`sys.exit(main(...))`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        inv = parse_argv(spec, argv)
        if inv.help:
            sys.stdout.write(help_text(spec))
            return EXIT_OK
        cfg, ctx = resolve(spec, inv)
        if inv.print_config:
            sys.stdout.write(to_yaml(cfg))
            return EXIT_OK
        for key in spec.output_keys:
            print(f"{spec.name}: {key} = {_get(ctx.raw, key) or _default(spec.config_cls, key)}", flush=True)
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        rc = run(cfg, ctx)
        return EXIT_OK if rc is None else rc
    except KeyboardInterrupt:
        print(f"{spec.name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        return report_error(spec, e)
