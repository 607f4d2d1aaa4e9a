"""Render the full manifest set of an overlay, or (re)write the checked-in kustomize tree.

    python -m k8s.render dev --out out/k8s/dev     # what `kubectl apply -k k8s/overlays/dev` applies
    python -m k8s.render --write-tree              # regenerate k8s/base and k8s/overlays
    python -m k8s.render --check                   # exit 1 when the checked-in tree is stale

Output layout: ``DIR/<kind>-<name>.yaml`` for the long-lived objects (ConfigMaps, RayCluster,
RayService) and ``DIR/jobs/rayjob-<name>.yaml`` for the RayJobs, submitted one at a time
(``python -m k8s.submit DIR/jobs/rayjob-unirank-generate.yaml --follow``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from k8s.kustomize import build_overlay, dump, file_name, stale_files, write_tree
from k8s.manifests import Layer
from k8s.settings import BASE, overlays
from model.config import ConfigError


def write_layer(layer: Layer, out: Path) -> list[Path]:
    """Write one file per object; any previous content of ``out`` is replaced."""
    if out.exists():
        shutil.rmtree(out)
    written = []
    for sub, docs in (("", layer.cluster), ("jobs", layer.jobs)):
        d = out / sub
        d.mkdir(parents=True, exist_ok=True)
        for doc in docs:
            path = d / file_name(doc)
            path.write_text(dump(doc))
            written.append(path)
    return written


def render(overlay: str, out: Path) -> tuple[list[Path], list[str]]:
    layer, _ = build_overlay(overlay)
    return write_layer(layer, out), layer.notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m k8s.render",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overlay", nargs="?", help=f"one of {overlays()} (or {BASE})")
    p.add_argument("--out", type=Path, help="output directory (default out/k8s/OVERLAY)")
    p.add_argument("--write-tree", action="store_true", help="regenerate k8s/base + k8s/overlays")
    p.add_argument("--check", action="store_true", help="fail when the kustomize tree is stale")
    a = p.parse_args(argv)
    try:
        if a.write_tree:
            for rel in write_tree():
                print(f"wrote k8s/{rel}")
        if a.check:
            problems = stale_files()
            for line in problems:
                print(line, file=sys.stderr)
            if problems:
                print("run: python -m k8s.render --write-tree", file=sys.stderr)
                return 1
            print("kustomize tree is up to date")
        if a.overlay:
            out = a.out or Path("out/k8s") / a.overlay
            written, notes = render(a.overlay, out)
            for path in written:
                print(f"wrote {path}")
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
        elif not (a.write_tree or a.check):
            p.error("give an OVERLAY, --write-tree or --check")
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
