"""Every `python jobs/...` command quoted in README.md, docs/*.md and the jobs' own help texts must work.

For each quoted command: the job file exists and `--help` runs (one subprocess per job); every flag is one
the job knows (a common flag, a short flag of the job, or a config key); and a command with no placeholders
(CHECKPOINT, PATH..., [optional]) resolves its whole config as `--print-config` would (files named by
--config must exist, values must type-check) — without the job's data checks, since docs name data the
reader has yet to create. `ray job submit` examples must upload the checkout (`--working-dir .`).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from neobert.config_io import describe
from pipelines import cli

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
JOBS = sorted(p.stem for p in (REPO / "jobs").glob("*.py"))
COMMON = {"--config", "--address", "--print-config", "--help", "-h"}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_/]*$|\.\.\.|…|^\[|\]$|<|>|^[A-Z]+=")


def job_texts() -> list[tuple[str, str]]:
    out = [(str(p.relative_to(REPO)), p.read_text()) for p in DOCS]
    for name in JOBS:
        out.append((f"jobs/{name}.py --help", importlib.import_module(f"jobs.{name}").__doc__ or ""))
    return out


def extract_commands(text: str) -> list[str]:
    """`python jobs/x.py ...` up to the end of the line, a backtick or a table bar; `\\` continues a line."""
    lines = text.splitlines()
    cmds = []
    for i, line in enumerate(lines):
        for m in re.finditer(r"python jobs/", line):
            cmd = line[m.start() :]
            j = i
            while cmd.rstrip().endswith("\\") and j + 1 < len(lines):
                j += 1
                cmd = cmd.rstrip()[:-1] + " " + lines[j].strip()
            cmd = re.split(r"`|\s\|\s|\|$", cmd)[0]
            cmds.append(cmd.strip())
    return cmds


COMMANDS = [(src, cmd) for src, text in job_texts() for cmd in extract_commands(text)]


def test_the_docs_quote_commands():
    assert len(COMMANDS) > 20 and {c.split()[1] for _, c in COMMANDS} >= {f"jobs/{j}.py" for j in JOBS}


def test_every_job_answers_help():
    procs = {
        j: subprocess.Popen([sys.executable, f"jobs/{j}.py", "--help"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for j in JOBS
    }  # fmt: skip
    for j, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, (j, err[-2000:])
        assert out.startswith(f"usage: python jobs/{j}.py") and "config keys" in out, (j, out[:500])


def known_flags(spec: cli.JobSpec) -> tuple[set[str], set[str], set[str]]:
    """(exact flags, config keys, dict-valued keys whose sub-keys are free) of one job."""
    flags = COMMON | set(spec.config_flags) | {n for f in spec.flags for n in f.names}
    keys = describe(spec.config_cls())
    return flags, {k.key for k in keys}, {k.key for k in keys if k.type.startswith("dict")}


@pytest.mark.parametrize("src, cmd", COMMANDS, ids=[f"{s}: {c[:60]}" for s, c in COMMANDS])
def test_quoted_command(src, cmd, monkeypatch):
    monkeypatch.chdir(REPO)
    tokens = shlex.split(cmd, comments=True)
    for op in ("&&", "||", ";", "|", ">"):  # the command ends at a shell operator
        tokens = tokens[: tokens.index(op)] if op in tokens else tokens
    script = tokens[1]
    if PLACEHOLDER.search(Path(script).stem):
        return  # `python jobs/....py`: a pattern, not a command
    assert (REPO / script).is_file(), f"{src}: {script} does not exist"
    job = importlib.import_module(f"jobs.{Path(script).stem}")
    args = tokens[2:]
    spec = job.spec_for(args) if hasattr(job, "spec_for") else job.SPEC  # jobs/pretrain.py: recipe or run
    try:
        flags, keys, dict_keys = known_flags(spec)
    except (TypeError, ValueError):  # a config without defaults (a recipe): cli.load below checks every key
        flags, keys, dict_keys = None, set(), set()
    for tok in args if flags is not None else []:
        flag = tok.strip("[]").split("=", 1)[0]
        if not flag.startswith("--") or PLACEHOLDER.search(flag[2:]):
            continue
        key = flag[2:].replace("-", "_")
        ok = flag in flags or key in keys or any(key.startswith(d + ".") for d in dict_keys)
        assert ok, f"{src}: `{cmd}` uses {flag}, which jobs/{Path(script).stem}.py does not know"
    if any(PLACEHOLDER.search(t) for t in args):
        return  # a synopsis with placeholders: flags checked, values cannot be
    if any(t.startswith("/shared") for t in args):
        return  # a cluster example: its files live on the cluster's shared storage
    quiet = dataclasses.replace(spec, prepare=None)  # the docs' data need not exist here
    monkeypatch.delenv(cli.RAY_JOB_ENV, raising=False)
    cli.load(
        quiet, args
    )  # raises ValueError (a missing --config file, a bad key or value) like the job would


def test_ray_job_submit_examples_upload_the_checkout():
    bad = []
    for src, text in job_texts():
        for m in re.finditer(r"--working-dir[ =]([^\s`]+)", text):
            if m.group(1) != ".":
                bad.append(f"{src}: --working-dir {m.group(1)}")
    assert not bad, f"the jobs import the repo's packages: submit with --working-dir . ({bad})"
