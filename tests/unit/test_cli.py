"""pipelines/cli.py: the command line every job shares (parsing, --help, --print-config, exit codes, paths).

No Ray cluster: jobs are driven through `cli.main` / `cli.load` in-process with a `run` that records what it
got; one subprocess checks that `--print-config` exits 0 without importing Ray.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines import cli

REPO = Path(__file__).resolve().parents[2]


def job(name: str):
    import importlib

    return importlib.import_module(f"jobs.{name}")


def test_overrides_short_flags_and_switches():
    pre = job("preprocess").SPEC
    cfg, ctx = cli.load(pre, ["--input", "a.jsonl", "dir/", "--pack-tokens", "2048", "--chunk-docs=64"])
    assert cfg.input == ["a.jsonl", "dir/"] and cfg.pack_tokens == 2048 and cfg.chunk_docs == 64
    assert Path(cfg.output).is_absolute() and cfg.output.endswith("outputs/preprocessed")
    assert {"input", "pack_tokens", "chunk_docs"} <= ctx.invocation.user_keys

    pre_cfg, _ = cli.load(
        job("pretrain").SPEC, ["--train.num_steps", "10", "--train.lr=3e-4", "--model.num_layers", "1"]
    )
    assert (pre_cfg.train.num_steps, pre_cfg.train.lr, pre_cfg.model.num_layers) == (10, 3e-4, 1)

    exp, ctx = cli.load(job("export_hf").SPEC, ["ckpt", "out", "--overwrite", "--parity", "false"])
    assert (exp.checkpoint, exp.overwrite, exp.parity) == ("ckpt", True, False)
    assert exp.output == str(Path("out").resolve()) and ctx.user_set("output")
    con, _ = cli.load(job("contrastive").SPEC, ["--init", "random:tiny", "--train.num_steps", "30"])
    assert con.model.init == "random:tiny" and con.train.num_steps == 30


def test_source_flag_appends_to_the_yaml_sources(tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text("- {name: a, path: a.jsonl}\n")
    spec = job("validate_contrastive").SPEC
    cfg, _ = cli.load(spec, ["--sources-yaml", str(y), "--source", "b=b.parquet", "--source", "c=c_dir"])
    assert [(s.name, s.path) for s in cfg.sources] == [("a", "a.jsonl"), ("b", "b.parquet"), ("c", "c_dir")]


def test_print_config_is_yaml_and_does_not_start_ray():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, runpy; sys.argv = ['jobs/pretrain.py', '--print-config', "
         "'--train.num_steps=7']; runpy.run_path('jobs/pretrain.py', run_name='__main__')"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["train"]["num_steps"] == 7 and cfg["model"]["hidden_size"] == 64
    assert Path(cfg["checkpoint"]["storage_path"]).is_absolute()


def test_print_config_in_process_never_calls_run(capsys):
    called = []
    spec = job("preprocess").SPEC
    assert cli.main(spec, lambda cfg, ctx: called.append(cfg), ["--print-config", "--seed", "3"]) == 0
    assert not called and yaml.safe_load(capsys.readouterr().out)["seed"] == 3


def test_help_lists_sections_keys_defaults_and_flags(capsys):
    assert cli.main(job("pretrain").SPEC, lambda c, x: 1, ["--help"]) == 0
    out = capsys.readouterr().out
    for section in ("[model]", "[data]", "[train]", "[checkpoint]", "[scaling]", "[failure]", "[logging]"):
        assert section in out, section
    assert "--train.num_steps (int)" in out and "= 60" in out  # configs/pretrain.yaml's default
    assert "max tokens of one packed row" in out  # the field's source comment
    assert "--print-config" in out and "--address" in out
    assert cli.main(job("preprocess").SPEC, lambda c, x: 1, ["-h"]) == 0
    out = capsys.readouterr().out
    assert "--input PATH [...]" in out and "--pack-tokens N" in out and "--pack_tokens (int)" in out
    assert cli.main(job("export_hf").SPEC, lambda c, x: 1, ["-h"]) == 0
    out = capsys.readouterr().out
    assert "CHECKPOINT" in out and "OUTDIR" in out and "3 the parity check failed" in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--train.num_steps", "abc"], "config key 'train.num_steps': expected an integer, got 'abc'"),
        (["--bogus", "1"], "unknown config key(s) ['bogus']"),
        (["--train.num_steps"], "--train.num_steps needs a value"),
        (["stray"], "unexpected argument 'stray'"),
        (["--config", "configs"], "is a directory"),
        (["--config", "nope.yaml"], "config file nope.yaml does not exist"),
        (["--train.warmup_steps", "99"], "train.warmup_steps=99 must lie in [0, train.num_steps=60]"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(argv, fragment, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    called = []
    assert cli.main(job("pretrain").SPEC, lambda c, x: called.append(c), argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pretrain: error: ") and fragment in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and not called


def test_failed_run_exits_1_with_traceback_and_summary(capsys):
    def run(cfg, ctx):
        raise RuntimeError("worker exploded")

    assert cli.main(job("preprocess").SPEC, run, []) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == (
        "preprocess: error: the run failed: RuntimeError: worker exploded"
    )


def test_input_errors_inside_run_exit_2(capsys, tmp_path):
    def run(cfg, ctx):
        (tmp_path / "missing.txt").read_text()  # an OSError with a filename

    assert cli.main(job("preprocess").SPEC, run, []) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"preprocess: error: No such file or directory: {tmp_path / 'missing.txt'}"
    )


def test_ray_wrappers_unwrap_to_the_user_error(capsys):
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    cause = ValueError("cu_seqlens must end at 12 in row 3 of x.parquet; re-run jobs/preprocess.py")
    task = RayTaskError("map_batches", "Traceback (most recent call last):\n  ...\nValueError: ...", cause)
    dual = task.as_instanceof_cause()  # what ray.get raises: both a RayTaskError and a ValueError
    assert isinstance(dual, ValueError) and cli.root_cause(dual) is cause
    group = WorkerGroupError("rank 1 failed", {1: task, 0: cause})
    assert cli.root_cause(group) is cause  # lowest rank first
    assert cli.root_cause(ControllerError(group)) is cause
    outer = RuntimeError("Ray Data execution failed")  # a caller's `raise ... from <the Ray error>`
    outer.__cause__ = dual
    assert cli.root_cause(outer) is cause
    assert cli.root_cause(RuntimeError("plain")).args == ("plain",)  # a non-Ray chain stays as it is
    spec = job("pretrain").SPEC
    assert cli.report_error(spec, ControllerError(group)) == 2
    assert capsys.readouterr().err.strip() == f"pretrain: error: {cause}"
    assert cli.report_error(spec, WorkerGroupError("oom", {0: MemoryError("oom")})) == 1
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == "pretrain: error: the run failed: MemoryError: oom"
    )


def test_job_specific_exit_code_for_parity():
    from neobert.hf.export import ParityError

    spec = job("export_hf").SPEC
    assert cli.report_error(spec, ParityError("logits differ by 3e-2 > 1e-4")) == 3


# ------------------------------------------------------------------------------------------- paths
def test_output_paths_outside_a_ray_job(tmp_path, monkeypatch):
    monkeypatch.delenv(cli.RAY_JOB_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.resolve_output_path("runs/x") == str(tmp_path / "runs" / "x")
    assert cli.resolve_output_path("s3://b/runs") == "s3://b/runs"
    assert cli.resolve_output_path("/abs/runs") == "/abs/runs"
    assert cli.resolve_output_path("") == ""


def test_output_paths_in_ray_package_cache(tmp_path, monkeypatch):
    pkg = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    pkg.mkdir(parents=True)
    monkeypatch.chdir(pkg)
    monkeypatch.delenv(cli.RAY_JOB_ENV, raising=False)
    monkeypatch.delenv(cli.SUBMIT_DIR_ENV, raising=False)
    with pytest.raises(ValueError, match=r"runs in Ray's working-dir package cache .*NEOBERT_SUBMIT_DIR"):
        cli.resolve_output_path("outputs/pretrain", key="checkpoint.storage_path")
    assert cli.resolve_output_path("/shared/runs") == "/shared/runs"
    submit = tmp_path / "home"
    submit.mkdir()
    monkeypatch.setenv(cli.SUBMIT_DIR_ENV, str(submit))  # a cluster on the submitting machine
    assert cli.resolve_output_path("outputs/pretrain") == str(submit / "outputs" / "pretrain")
    monkeypatch.setenv(cli.SUBMIT_DIR_ENV, "/no/such/laptop/dir")  # a remote cluster
    with pytest.raises(ValueError, match=r"runs on a remote cluster .* absolute path .* or a URI"):
        cli.resolve_output_path("outputs/pretrain", key="checkpoint.storage_path")
    # inputs: the submit dir when the file is there, else unchanged (it may ship with the working dir)
    monkeypatch.setenv(cli.SUBMIT_DIR_ENV, str(submit))
    (submit / "data").mkdir()
    assert cli.resolve_input_path("data") == str(submit / "data")
    assert cli.resolve_input_path("data/*.jsonl") == str(submit / "data" / "*.jsonl")
    assert cli.resolve_input_path("configs/x.yaml") == "configs/x.yaml"


def test_job_refuses_relative_output_under_ray_job(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(cli.RAY_JOB_ENV, "{}")
    monkeypatch.delenv(cli.SUBMIT_DIR_ENV, raising=False)
    monkeypatch.chdir(REPO)
    assert cli.main(job("pretrain").SPEC, lambda c, x: 0, []) == 2
    err = capsys.readouterr().err
    assert "checkpoint.storage_path='outputs/pretrain' is relative" in err and "--runtime-env-json" in err
    monkeypatch.setenv(cli.SUBMIT_DIR_ENV, str(tmp_path))
    cfg, _ = cli.load(job("pretrain").SPEC, [])
    assert cfg.checkpoint.storage_path == str(tmp_path / "outputs" / "pretrain")


# ------------------------------------------------------------------------------------------- contracts
def packed_dir(root: Path, pack_tokens: int) -> Path:
    (root / "train").mkdir(parents=True)
    (root / "train" / "part-00000.parquet").write_bytes(b"PAR1")  # listed, not read, by the driver check
    (root / "report.json").write_text(json.dumps({"pack_tokens": pack_tokens}))
    return root


def test_pretrain_takes_pack_tokens_from_the_data(tmp_path):
    d = packed_dir(tmp_path / "packed", 128)
    cfg, _ = cli.load(job("pretrain").SPEC, ["--data.packed_dir", str(d)])
    assert cfg.data.pack_tokens == 128 and cfg.train.tokens_per_micro_batch == 2048
    d2 = packed_dir(tmp_path / "packed1k", 1024)
    cfg, _ = cli.load(
        job("pretrain").SPEC, ["--data.packed_dir", str(d2), "--train.tokens_per_micro_batch", "4096"]
    )
    assert cfg.data.pack_tokens == 1024 and cfg.train.tokens_per_micro_batch == 4096


def test_pretrain_pack_tokens_override_that_disagrees_fails_on_the_driver(tmp_path, capsys):
    d = packed_dir(tmp_path / "packed", 8192)
    called = []
    argv = ["--data.packed_dir", str(d), "--data.pack_tokens", "512"]
    assert cli.main(job("pretrain").SPEC, lambda c, x: called.append(c), argv) == 2
    err = capsys.readouterr().err
    assert "data.pack_tokens=512 but" in err and "packed with pack_tokens=8192" in err
    assert "--data.pack_tokens 8192" in err and "--pack-tokens 512" in err and not called


def test_pretrain_missing_or_empty_packed_dir(tmp_path, capsys):
    spec = job("pretrain").SPEC
    assert cli.main(spec, lambda c, x: 0, ["--data.packed_dir", str(tmp_path / "nope")]) == 2
    assert "does not exist; run `python jobs/preprocess.py --output" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(spec, lambda c, x: 0, ["--data.packed_dir", str(tmp_path / "empty")]) == 2
    assert "has no train/*.parquet shards" in capsys.readouterr().err


def test_contrastive_refuses_an_unvalidated_dir_before_ray(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    spec = job("contrastive").SPEC
    assert (
        cli.main(spec, lambda c, x: 0, ["--data.input_dir", str(tmp_path / "raw"), "--init", "random:tiny"])
        == 2
    )
    assert "is not a validated contrastive dataset" in capsys.readouterr().err


def test_keys_of_the_users_own_config_file_count_as_set(tmp_path):
    d = packed_dir(tmp_path / "packed", 128)
    own = tmp_path / "mine.yaml"
    own.write_text(
        f"base: {REPO / 'configs' / 'pretrain.yaml'}\ndata: {{pack_tokens: 256, packed_dir: {d}}}\n"
    )
    with pytest.raises(ValueError, match="data.pack_tokens=256 but"):
        cli.load(job("pretrain").SPEC, ["--config", str(own)])
    # the default config named explicitly is still the default: the data decides
    cfg, ctx = cli.load(
        job("pretrain").SPEC, ["--config", "configs/pretrain.yaml", "--data.packed_dir", str(d)]
    )
    assert cfg.data.pack_tokens == 128 and not ctx.user_set("data.pack_tokens")


def test_pack_size_beyond_the_models_positions_names_both_fixes(tmp_path, capsys):
    d = packed_dir(
        tmp_path / "packed", 8192
    )  # jobs/preprocess.py's default; the tiny model has 1024 positions
    assert cli.main(job("pretrain").SPEC, lambda c, x: 0, ["--data.packed_dir", str(d)]) == 2
    err = capsys.readouterr().err
    assert "packed with pack_tokens=8192" in err and "model.max_position_embeddings=1024" in err
    assert "--pack-tokens 1024" in err and "--model.max_position_embeddings 8192" in err


def test_ray_data_console_tracebacks_of_user_errors_are_dropped():
    import logging

    from ray.exceptions import RayTaskError

    f = cli.UserErrorConsoleFilter(job("preprocess").SPEC)
    user = RayTaskError("map", "tb", ValueError("row 2, field 'text': invalid_json")).as_instanceof_cause()
    internal = RayTaskError("map", "tb", KeyError("bug")).as_instanceof_cause()

    def rec(msg, args=(), exc=None, level=logging.ERROR):
        return logging.LogRecord(
            "ray.data.x", level, "f.py", 1, msg, args, (type(exc), exc, None) if exc else None
        )

    assert not f.filter(rec("An exception was raised from a task", exc=user))
    assert not f.filter(rec("Full stack trace:\n%s", (user,)))
    assert not f.filter(rec("Exception occurred in Ray Data or Ray Core internal code. If you continue"))
    assert f.filter(rec("An exception was raised from a task", exc=internal))
    assert f.filter(rec("Full stack trace:\n%s", (internal,)))
    assert f.filter(rec("Progress bars disabled", level=logging.WARNING))


def test_missing_preprocess_input_fails_before_ray_starts(tmp_path, capsys, monkeypatch):
    pre = job("preprocess")
    started = []
    monkeypatch.setattr(cli.Context, "init_ray", lambda self, **kw: started.append(kw))
    rc = cli.main(
        pre.SPEC, pre.run, ["--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and not started, err
    assert (
        err.startswith("preprocess: error: ") and "nope.jsonl" in err and len(err.strip().splitlines()) == 1
    )


def test_unreadable_contrastive_source_fails_before_ray_starts(tmp_path, capsys, monkeypatch):
    val = job("validate_contrastive")
    started = []
    monkeypatch.setattr(cli.Context, "init_ray", lambda self, **kw: started.append(kw))
    rc = cli.main(
        val.SPEC, val.run, ["--source", f"a={tmp_path / 'gone.jsonl'}", "--output", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and not started and "source 'a': path" in err and "does not exist" in err, err
