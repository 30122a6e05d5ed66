"""neobert.config_io: YAML loading errors name the file (and line), `base:` cycles, field comments for --help."""

from __future__ import annotations

import dataclasses

import pytest

from neobert.config_io import describe, field_comments, load_config, load_yaml_dict


@dataclasses.dataclass
class Inner:
    size: int = 3  # how many
    mode: str = "a"


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    names: list[str] = dataclasses.field(default_factory=list)  # a comment after a wrapped default
    rate: float = 0.5  # learning rate


def test_base_pointing_at_itself_is_a_clear_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: a.yaml\nx: 1\n")
    with pytest.raises(ValueError, match=r"a.yaml: `base: a.yaml` makes a cycle .*a.yaml -> .*a.yaml"):
        load_yaml_dict(tmp_path / "a.yaml")


def test_base_cycle_through_two_files(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: ./a.yaml\n")
    with pytest.raises(ValueError, match="makes a cycle"):
        load_yaml_dict(tmp_path / "a.yaml")


def test_base_chain_without_cycle_merges(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\ninner: {size: 5}\n")
    (tmp_path / "b.yaml").write_text("base: c.yaml\ninner: {mode: b}\n")
    (tmp_path / "c.yaml").write_text("rate: 0.1\n")
    cfg = load_config(Outer, tmp_path / "a.yaml")
    assert (cfg.inner.size, cfg.inner.mode, cfg.rate) == (5, "b", 0.1)


def test_broken_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("inner:\n  size: 3\n  mode: [a, b\nrate: 1\n")
    with pytest.raises(ValueError) as e:
        load_yaml_dict(p)
    msg = str(e.value)
    assert str(p) in msg and "line 4" in msg and "<unicode string>" not in msg, msg


def test_config_dir_is_a_clear_error(tmp_path):
    (tmp_path / "x.yaml").write_text("rate: 1\n")
    with pytest.raises(ValueError, match=r"is a directory \(it holds x.yaml\); pass a YAML file"):
        load_config(Outer, tmp_path)


def test_missing_and_non_mapping(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_yaml_dict(tmp_path / "nope.yaml")
    (tmp_path / "l.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_yaml_dict(tmp_path / "l.yaml")


def test_field_comments_and_describe():
    assert field_comments(Inner) == {"size": "how many"}
    assert field_comments(Outer) == {"names": "a comment after a wrapped default", "rate": "learning rate"}
    keys = {k.key: k for k in describe(Outer())}
    assert list(keys) == ["inner.size", "inner.mode", "names", "rate"]
    assert (keys["inner.size"].type, keys["inner.size"].default, keys["inner.size"].comment) == (
        "int",
        3,
        "how many",
    )
    assert keys["names"].type == "list[str]" and keys["rate"].comment == "learning rate"
