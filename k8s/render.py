"""Embed each Serve config file, byte for byte, where KubeRay reads it (a string field).

KubeRay takes the Serve config as the string ``spec.serveConfigV2`` of the RayService, and
kustomize cannot inline a file into a string field. This script rewrites those literal blocks
from their source files, keeping everything else in the manifests (comments included):

    k8s/base/serve-config.yaml          -> k8s/base/rayservice.yaml  (spec.serveConfigV2)
    k8s/overlays/dev/serve-config.yaml  -> k8s/overlays/dev/serve-config-patch.yaml
                                           (the JSON patch that replaces spec.serveConfigV2)

    python k8s/render.py           rewrite the targets
    python k8s/render.py --check   exit 1 if a target differs from its source (CI)

Only the standard library and PyYAML; after writing, the target is parsed back and the string
compared with the source, so a rendered block is exact or the script fails.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["K8S", "TARGETS", "RenderError", "Target", "check", "render", "render_text"]

K8S = Path(__file__).resolve().parent


class RenderError(Exception):
    """A source that cannot be embedded exactly, or a target without its block."""


def _rayservice_value(doc: Any) -> Any:
    return doc["spec"]["serveConfigV2"]


def _patch_value(doc: Any) -> Any:
    ops = [op for op in doc if op.get("path") == "/spec/serveConfigV2"]
    if len(ops) != 1:
        raise RenderError("expected exactly one JSON patch op on /spec/serveConfigV2")
    return ops[0]["value"]


@dataclass(frozen=True)
class Target:
    source: Path  # the Serve config file
    target: Path  # the manifest holding its text
    key: str  # the YAML key whose literal block holds the text
    value: Callable[[Any], Any]  # where that string is in the parsed target


TARGETS = (
    Target(K8S / "base/serve-config.yaml", K8S / "base/rayservice.yaml", "serveConfigV2",
           _rayservice_value),
    Target(K8S / "overlays/dev/serve-config.yaml", K8S / "overlays/dev/serve-config-patch.yaml",
           "value", _patch_value),
)  # fmt: skip


def _check_embeddable(text: str, source: Path) -> None:
    if not text.endswith("\n") or text.endswith("\n\n"):
        raise RenderError(f"{source}: must end with exactly one newline (YAML clip chomping)")
    if text[0] in " \t\n":
        raise RenderError(f"{source}: must not start with whitespace or a blank line")
    if "\t" in text or "\r" in text:
        raise RenderError(f"{source}: tabs and carriage returns cannot be embedded as is")


def render_text(manifest: str, key: str, content: str, where: str = "manifest") -> str:
    """``manifest`` with the literal block of ``key`` replaced by ``content``."""
    lines = manifest.splitlines(keepends=True)
    pattern = re.compile(rf"^(?P<indent> *)(?:- )?{re.escape(key)}: \|[-+]?\s*$")
    starts = [i for i, line in enumerate(lines) if pattern.match(line)]
    if len(starts) != 1:
        raise RenderError(f"{where}: expected one `{key}: |` block, found {len(starts)}")
    start = starts[0]
    head = lines[start]
    key_col = head.index(key)
    end = start + 1
    while end < len(lines):
        line = lines[end]
        stripped = line.strip()
        if stripped and len(line) - len(line.lstrip(" ")) <= key_col:
            break
        end += 1
    # keep blank lines that separate the block from what follows
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    pad = " " * (key_col + 2)
    block = [pad + line if line.strip() else "\n" for line in content.splitlines(keepends=True)]
    new_head = head[: key_col + len(key)] + ": |\n"
    return "".join([*lines[:start], new_head, *block, *lines[end:]])


def _rendered(t: Target) -> str:
    content = t.source.read_text(encoding="utf-8")
    _check_embeddable(content, t.source)
    text = render_text(t.target.read_text(encoding="utf-8"), t.key, content, str(t.target))
    if t.value(yaml.safe_load(text)) != content:
        raise RenderError(f"{t.target}: rendered value does not read back as {t.source}")
    return text


def check(targets: tuple[Target, ...] = TARGETS) -> list[str]:
    """The targets whose embedded text differs from their source (empty: all in sync)."""
    drifted = []
    for t in targets:
        if t.value(yaml.safe_load(t.target.read_text(encoding="utf-8"))) != t.source.read_text(
            encoding="utf-8"
        ):
            drifted.append(f"{t.target} differs from {t.source}")
    return drifted


def render(targets: tuple[Target, ...] = TARGETS) -> list[Path]:
    """Rewrite the targets that differ; returns the files written."""
    written = []
    for t in targets:
        text = _rendered(t)
        if text != t.target.read_text(encoding="utf-8"):
            t.target.write_text(text, encoding="utf-8")
            written.append(t.target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report drift (exit 1)")
    args = parser.parse_args(argv)
    try:
        if args.check:
            drifted = check()
            for line in drifted:
                print(f"drift: {line} (run: python k8s/render.py)", file=sys.stderr)
            return 1 if drifted else 0
        for path in render():
            print(f"rendered {path.relative_to(K8S.parent)}")
    except RenderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
