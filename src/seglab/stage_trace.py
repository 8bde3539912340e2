"""What one `seglab <stage>` run used: the seglab modules it loaded and the params keys it read.

Active only when SEGLAB_TRACE names a folder: `seglab` then writes one JSON file per run there, which
tests compare with the stage's `deps` and `params` in dvc.yaml (tests/stage_deps.py). Without the
variable this module is never imported, so tracing costs nothing.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import seglab
from seglab.atomic import write_text_atomic
from seglab.config import Config, _Section

ENV = "SEGLAB_TRACE"

_PACKAGE = Path(seglab.__file__).resolve().parent
_PROJECT = _PACKAGE.parents[1]  # the checkout: src/seglab/...


def _is_container(value: Any) -> bool:
    """A section, or a mapping of sections (`profiles`, `models`): reading it reads no value yet."""
    if isinstance(value, _Section):
        return True
    return isinstance(value, dict) and bool(value) and all(isinstance(v, _Section) for v in value.values())


def _key(path: str, section: _Section, name: str) -> str:
    field = type(section).model_fields[name]
    return f"{path}.{field.alias or name}" if path else (field.alias or name)


class ParamsReads:
    """Records the params keys read from one config, by hooking attribute access on its sections."""

    def __init__(self, cfg: Config) -> None:
        self.keys: set[str] = set()
        # id -> (section, its params key, the section holding it); kept so that an id is never reused.
        self._paths: dict[int, tuple[_Section, str, _Section | None]] = {}
        self._register(cfg, "", None)
        self._dump = _Section.model_dump
        reads = self

        def getattribute(section: _Section, name: str) -> Any:
            value = object.__getattribute__(section, name)
            if name[0] != "_":
                reads._read(section, name, value)
            return value

        def model_dump(section: _Section, *args: Any, **kwargs: Any) -> Any:
            include, exclude = kwargs.get("include"), kwargs.get("exclude") or ()
            for name in type(section).model_fields:
                if (include is None or name in include) and name not in exclude:
                    reads._read_all(section, name)
            return reads._dump(section, *args, **kwargs)

        _Section.__getattribute__ = getattribute  # type: ignore[method-assign]
        _Section.model_dump = model_dump  # type: ignore[method-assign]

    def stop(self) -> None:
        # Both were inherited (object's attribute lookup, pydantic's model_dump): drop the overrides.
        del _Section.__getattribute__
        del _Section.model_dump

    def _register(self, section: _Section, path: str, parent: _Section | None) -> None:
        self._paths[id(section)] = (section, path, parent)
        for name in type(section).model_fields:
            value = object.__getattribute__(section, name)
            key = _key(path, section, name)
            if isinstance(value, _Section):
                self._register(value, key, section)
            elif _is_container(value):
                for item, entry in value.items():
                    self._register(entry, f"{key}.{item}", None)

    def _add(self, section: _Section, name: str) -> None:
        known = self._paths.get(id(section))
        if known is None or known[0] is not section:
            return
        _, path, parent = known
        self.keys.add(_key(path, section, name))
        # A section that shadows a key its parent sets (`gan.dcgan.image_size` under `gan.image_size`)
        # was resolved from it at validation: reading one reads the other too. A parent's section of
        # that name (the top-level `data` above `evaluate.data`) is no such value.
        if (parent is not None and name in object.__getattribute__(parent, "__pydantic_fields_set__")
                and not isinstance(object.__getattribute__(parent, name), _Section)):
            self._add(parent, name)

    def _read(self, section: _Section, name: str, value: Any) -> None:
        if name in type(section).model_fields and not _is_container(value):
            self._add(section, name)
        elif name in type(section).derived_fields:
            self._add(section, type(section).derived_fields[name])

    def _read_all(self, section: _Section, name: str) -> None:
        value = object.__getattribute__(section, name)
        if isinstance(value, _Section):
            for inner in type(value).model_fields:
                self._read_all(value, inner)
        elif _is_container(value):
            for entry in value.values():
                for inner in type(entry).model_fields:
                    self._read_all(entry, inner)
        else:
            self._add(section, name)


def loaded_modules() -> list[str]:
    """The files of the seglab modules loaded in this process, relative to the checkout."""
    files = set()
    for name, module in list(sys.modules.items()):
        if (name == "seglab" or name.startswith("seglab.")) and name != __name__:
            file = getattr(module, "__file__", None)
            if file and Path(file).resolve().is_relative_to(_PACKAGE):
                files.add(Path(file).resolve().relative_to(_PROJECT).as_posix())
    return sorted(files)


def write_trace(folder: str | Path, argv: list[str], reads: ParamsReads | None) -> Path:
    """One JSON file per run: the command's arguments, the modules it loaded, the keys it read."""
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", "_".join(argv)) or "seglab"
    path = Path(folder) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    trace = {"argv": argv, "modules": loaded_modules(), "params": sorted(reads.keys) if reads else []}
    write_text_atomic(path, json.dumps(trace, indent=2) + "\n")
    return path
