"""Every config key with the comment that documents it, read from the YAML files in ``configs/``.

A leaf key is documented by an inline comment on its line (one comment covers every key of a one-line flow
mapping such as ``optim: {steps: 2000, lr: 3.0e-4}``) or by the comment lines directly above it. A file's
leading comment block describes the file, not its first key. Keys of a group file live under the group's
name (``configs/model/demo.yaml``'s ``vae.base_channels`` is ``model.vae.base_channels``); Hydra's
``defaults`` lists are directives, not keys.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from echoflow.config import config_dir
from echoflow.errors import EchoFlowError


@dataclass(frozen=True)
class KeyDoc:
    """One leaf config key.

    Attributes:
        key: dotted path in the composed config, e.g. ``model.vae.base_channels``.
        comment: its documentation ("" when it has none).
        source: ``<file relative to configs/>:<line, 1-based>`` where it is set.
    """

    key: str
    comment: str
    source: str


def file_keys(path: Path, *, root: Path) -> list[KeyDoc]:
    """Every leaf key of one YAML file under ``root`` (the configs folder) with its comment, in file order."""
    text = path.read_text()
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as err:
        raise EchoFlowError(f"{path}: not valid YAML ({type(err).__name__})") from err
    relative = path.relative_to(root)
    prefix = ".".join(relative.parent.parts)
    lines = text.splitlines()
    directive = f"{prefix}.defaults" if prefix else "defaults"
    docs = []
    for key, line in _leaves(node, prefix):
        if key == directive:
            continue
        comment = _inline_comment(lines[line]) or _comment_above(lines, line)
        docs.append(KeyDoc(key, comment, f"{relative.as_posix()}:{line + 1}"))
    return docs


def all_keys(root: Path | None = None) -> list[KeyDoc]:
    """``file_keys`` of every ``*.yaml`` under ``root`` (default: the project's ``configs/``), sorted by file."""
    root = root or config_dir()
    return [doc for path in sorted(root.rglob("*.yaml")) for doc in file_keys(path, root=root)]


def composed_keys(cfg: DictConfig, choices: Mapping[str, str | None]) -> list[tuple[KeyDoc, Any]]:
    """Each leaf of a composed config with its resolved value and its comment.

    The comment comes from the file the group's ``choices`` picked (``{"model": "paper"}``), else from
    another file of the same group that sets the key (a ``defaults`` parent such as ``strategy/fedavg``).
    Keys that no file sets (``+new=1`` overrides) get an empty comment and source.
    """
    chosen = {f"{group}/{option}.yaml" for group, option in choices.items() if option}
    docs: dict[str, KeyDoc] = {}
    for doc in sorted(all_keys(), key=lambda d: d.source.split(":")[0] not in chosen):
        if doc.key not in docs or (doc.comment and not docs[doc.key].comment):
            docs[doc.key] = doc
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # OmegaConf's interpolation errors are several lines long
        raise EchoFlowError(f"config: {str(err).strip().splitlines()[0]}") from err
    return [(docs.get(key, KeyDoc(key, "", "")), value) for key, value in _values(values, "")]


def group_choices(overrides: list[str]) -> dict[str, str | None]:
    """Which option each config group took, e.g. ``{"model": "demo", "dp": "eps8"}`` (Hydra's own groups left out).

    Compose with ``echoflow.config.load_config`` first: it turns bad overrides into one-line errors.
    """
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    return {g: o for g, o in cfg.hydra.runtime.choices.items() if not g.startswith("hydra")}


def format_keys(rows: list[tuple[KeyDoc, Any]]) -> list[str]:
    """``key = value  # comment`` lines, aligned; undocumented keys say so."""
    shown = [(doc.key, value if isinstance(value, str) else json.dumps(value), doc.comment or "(undocumented)")
             for doc, value in rows]
    width = max((len(f"{k} = {v}") for k, v, _ in shown), default=0)
    return [f"{f'{k} = {v}':<{width}}  # {c}" for k, v, c in shown]


def _leaves(node: yaml.Node, prefix: str) -> Iterator[tuple[str, int]]:
    """(dotted key, 0-based line of the key) of every non-mapping value under ``node``."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
        if isinstance(value_node, yaml.MappingNode) and value_node.value:
            yield from _leaves(value_node, key)
        else:
            yield key, key_node.start_mark.line


def _values(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for key, child in value.items():
            yield from _values(child, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def _inline_comment(line: str) -> str:
    """The text after a ``#`` that starts a comment (preceded by whitespace, outside quotes)."""
    quote = ""
    for index, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and index > 0 and line[index - 1] in " \t" and line[:index].strip():
            return line[index + 1:].strip()
    return ""


def _comment_above(lines: list[str], line: int) -> str:
    """The comment lines directly above ``line`` (no blank line between), unless they are the file header."""
    start = line
    while start > 0 and lines[start - 1].lstrip().startswith("#"):
        start -= 1
    if start in (line, 0):
        return ""
    return " ".join(text.lstrip().lstrip("#").strip() for text in lines[start:line])
