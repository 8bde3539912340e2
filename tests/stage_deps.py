"""Compare what each pipeline stage used (SEGLAB_TRACE, seglab.stage_trace) with what dvc.yaml declares.

A stage's code deps must cover exactly the seglab modules its run loaded (a file, or a folder whose
modules it all loaded), and its params exactly the keys it read (to the section: see
`_unread_sections`). Keys a stage reads that dvc.yaml interpolates into the stage itself
(`${shard.out}` in its deps, `${train.out}` in its outs) are covered without a params entry:
changing them changes the stage, so DVC reruns it anyway.
Modules that are only a docstring need not be declared (no code, no behaviour). The stages of a
`foreach` share one deps list: a module some of them import may be listed for all.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import yaml


def _is_docstring_only(path: Path) -> bool:
    if not path.is_file():  # a module added to the checkout after the scratch copy was made
        return False
    body = ast.parse(path.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def _leaves(tree: object, prefix: str) -> list[str]:
    if isinstance(tree, dict) and tree:
        return [leaf for key, value in tree.items() for leaf in _leaves(value, f"{prefix}.{key}")]
    return [prefix]


_MISSING = object()


def _lookup(tree: object, key: str) -> object:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def _interpolated(raw_stages: dict, stage: str) -> set[str]:
    """The params keys dvc.yaml writes into `stage` outside its `params` (paths, foreach lists)."""
    base, _, item = stage.partition("@")
    definition = raw_stages[base]
    keys: set[str] = set()
    source = None
    if "foreach" in definition:
        source = definition["foreach"].strip("${}")
        keys.add(source)
        definition = definition["do"]
    text = json.dumps({k: v for k, v in definition.items() if k != "params"})
    for expression in re.findall(r"\$\{([^}]+)\}", text):
        if expression in ("item", "key"):
            continue
        if expression.startswith("item.") and source == "models":
            keys.add(f"models.{item}.{expression.removeprefix('item.')}")
        else:
            keys.add(expression)
    return keys


def _unread_sections(tree: object, key: str, used: set[str]) -> list[str]:
    """The topmost keys under (and including) `key` of which the stage reads nothing. A section it
    reads may hold values read only on some paths (`train.weight_decay` with adamw only), so values
    count as unread only as a whole section (`profiles.gpu`) or when listed on their own."""
    if not any(_related(read, leaf) for leaf in _leaves(tree, key) for read in used):
        return [key]
    if not isinstance(tree, dict):
        return []
    return [unread for name, value in tree.items() if isinstance(value, dict)
            for unread in _unread_sections(value, f"{key}.{name}", used)]


def _related(read: str, leaf: str) -> bool:
    """`read` reads `leaf`: the same key, a key inside it, or a mapping holding it (`data.splits`)."""
    return read == leaf or read.startswith(leaf + ".") or leaf.startswith(read + ".")


def stage_dependency_problems(repo: Path, traces: Path, stages: set[str] | None = None) -> dict[str, list[str]]:
    """Per stage that has a trace (or each of `stages`): what its deps/params lack or list in vain."""
    from dvc.dependency import ParamsDependency
    from dvc.repo import Repo

    raw_stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    runs = {}
    for path in traces.glob("*.json"):
        trace = json.loads(path.read_text())
        runs[" ".join(["seglab", *trace["argv"]])] = trace
    with Repo(str(repo)) as dvc_repo:
        declared = {stage.name: stage for stage in dvc_repo.index.stages}
    # The stages of one `foreach` share their deps list, so a dep is in vain only if no item imports it.
    loaded_by_group: dict[str, set[str]] = {}
    for name, stage in declared.items():
        if stage.cmd in runs:
            loaded_by_group.setdefault(name.partition("@")[0], set()).update(runs[stage.cmd]["modules"])
    problems: dict[str, list[str]] = {}
    for name, stage in sorted(declared.items()):
        trace = runs.get(stage.cmd)
        if trace is None:
            if stages is not None and name in stages:
                problems[name] = [f"no trace of `{stage.cmd}` (did it run with SEGLAB_TRACE set?)"]
            continue
        if stages is not None and name not in stages:
            continue
        found: list[str] = []
        code = [d.def_path for d in stage.deps if not isinstance(d, ParamsDependency) and d.def_path.startswith("src/")]
        loaded = set(trace["modules"])
        for module in sorted(loaded):
            if not any(module == dep or module.startswith(dep.rstrip("/") + "/") for dep in code):
                if not _is_docstring_only(repo / module):
                    found.append(f"imports {module}, not in its deps")
        for dep in code:
            files = [dep] if dep.endswith(".py") else sorted(
                p.relative_to(repo).as_posix() for p in (repo / dep).rglob("*.py"))
            group = loaded_by_group[name.partition("@")[0]]
            unused = [f for f in files if f not in group and not _is_docstring_only(repo / f)]
            if unused:
                found.append(f"lists {dep} but never imports {', '.join(unused)}")
        keys = {k for d in stage.deps if isinstance(d, ParamsDependency) for k in d.params}
        reads = set(trace["params"])
        interpolated = _interpolated(raw_stages, name)
        for key in sorted(reads):
            if key in interpolated or any(key == k or key.startswith(k + ".") for k in keys):
                continue
            where = "" if _lookup(params, key) is not _MISSING else " (params.yaml does not set it)"
            found.append(f"reads params {key}{where}, not in its params")
        used = reads | interpolated
        for key in sorted(keys):
            unread = _unread_sections(_lookup(params, key), key, used)
            if unread:
                found.append(f"lists params {key} but never reads {', '.join(unread)}")
        if found:
            problems[name] = found
    return problems
