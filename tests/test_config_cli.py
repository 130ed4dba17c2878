"""`echoflow config show`: the composed config, every key of configs/ documented by a comment; thread settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from echoflow.cli import app
from echoflow.config import load_config, threads_of, threads_while
from echoflow.config_docs import all_keys, composed_keys, file_keys, group_choices, reference_markdown
from echoflow.errors import EchoFlowError
from echoflow.progress import QUIET_ENV, is_quiet


def test_every_config_key_has_a_comment() -> None:
    docs = all_keys()
    undocumented = [f"{d.source} {d.key}" for d in docs if not d.comment]
    assert len(docs) > 150 and not undocumented, "add a comment to:\n" + "\n".join(undocumented)


def test_comment_rules_catch_undocumented_keys(tmp_path: Path) -> None:
    (tmp_path / "group").mkdir()
    (tmp_path / "group" / "x.yaml").write_text(
        "# file header, not a key's comment\n"
        "first: 1\n"
        "defaults: [y]\n"
        "url: 'http://a#b'  # the # inside quotes is a value\n"
        "# above the mapping\n"
        "opt: {a: 1, b: 2}\n"
        "\n"
        "nested:            # documents the parent only\n"
        "  leaf: 3\n"
        "  other: 4  # inline\n"
    )
    docs = {d.key: d.comment for d in file_keys(tmp_path / "group" / "x.yaml", root=tmp_path)}
    assert docs == {"group.first": "", "group.url": "the # inside quotes is a value",
                    "group.opt.a": "above the mapping", "group.opt.b": "above the mapping",
                    "group.nested.leaf": "", "group.nested.other": "inline"}


def test_show_prints_the_composed_config_with_overrides() -> None:
    result = CliRunner().invoke(app, ["config", "show", "model=paper", "data.size=112"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["model"]["vae"]["base_channels"] == 128 and shown["data"]["size"] == 112
    assert shown["federation"]["checkpoint_dir"] == "runs/default/federation"  # interpolations resolved


def test_show_keys_lists_every_composed_leaf_with_its_comment() -> None:
    overrides = ["strategy=fedyogi", "dp=eps8"]
    rows = composed_keys(load_config(overrides), group_choices(overrides))
    comments = {doc.key: doc.comment for doc, _ in rows}
    assert all(comments.values()) and len(rows) > 100
    assert comments["strategy.fraction_train"].startswith("share of connected sites")  # from the fedavg parent
    assert next(d.source for d, _ in rows if d.key == "dp.epsilon").startswith("dp/eps8.yaml:")
    result = CliRunner().invoke(app, ["config", "show", "--keys", *overrides])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == len(rows) and "(undocumented)" not in result.output
    assert any(line.startswith("dp.epsilon = 8.0 ") and "# target ε" in line for line in lines)


def test_unknown_key_is_one_line_error() -> None:
    result = CliRunner().invoke(app, ["config", "show", "nope=1"])
    assert isinstance(result.exception, EchoFlowError) and "nope" in str(result.exception)
    with pytest.raises(EchoFlowError):
        load_config(["model=missing"])


def test_global_quiet_turns_every_progress_bar_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(QUIET_ENV, "0")  # and restored (unset) after the test
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert not is_quiet()
    result = CliRunner().invoke(app, ["--quiet", "config", "show", "data.sites=2"])
    assert result.exit_code == 0, result.output
    assert is_quiet()


def test_configuration_reference_in_docs_is_current() -> None:
    documented = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert documented == reference_markdown(), "run `echoflow config reference > docs/configuration.md`"
    assert "| `federation.min_sites` |" in documented and "| `strategy.server_momentum` |" in documented


def test_generation_threads_apply_inside_the_block_only() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), threads_while(before + 1):
        assert torch.get_num_threads() == before + 1
        raise RuntimeError("generation failed")
    assert torch.get_num_threads() == before
    cfg = load_config(["generation_threads=0", "threads=1"])
    assert (threads_of(cfg, "generation_threads"), threads_of(cfg)) == (os.cpu_count(), 1)
