"""Regenerate the benchmark tables and plots in the docs from the committed result files.

For every benchmark the docs show, the latest result under benchmarks/results/<name>/ that is
not a smoke run (-quick in its name or quick in its arguments; or the file given with --result
NAME=PATH) is rendered into the blocks between `<!-- generated:BLOCK -->` and
`<!-- /generated:BLOCK -->` in README.md, docs/benchmarks.md and docs/peer_llamacpp.md, and
plots into docs/img/. The prose around the blocks is written by hand;
the numbers live only inside them.

    python benchmarks/report.py                     # what `make docs` runs
    python benchmarks/report.py --check             # exit 1 if a block is out of date
    python benchmarks/report.py --result passkey=benchmarks/results/passkey/2026-12-03-abc1234.json

Only the standard library and matplotlib: no torch, no vLLM.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import result_files
from reports import BLOCKS, DOCUMENTS, PARTS
from reports.base import Doc, Result

REPO = result_files.REPO
IMG_DIR = os.path.join(REPO, "docs", "img")
LINKS = {"README.md": Doc(base="", img="docs/img/"),
         "docs/benchmarks.md": Doc(base="../", img="img/"),
         "docs/peer_llamacpp.md": Doc(base="../", img="img/"),
         "docs/pinned_prompt.md": Doc(base="../", img="img/"),
         "docs/weights.md": Doc(base="../", img="img/"),
         "docs/token_time.md": Doc(base="../", img="img/"),
         "docs/soak.md": Doc(base="../", img="img/")}
BLOCK = re.compile(r"<!-- generated:(?P<name>[\w-]+) -->(?P<body>.*?)"
                   r"<!-- /generated:(?P=name) -->", re.S)


def needed_names() -> list[str]:
    return sorted({n for module in BLOCKS.values() for n in module.NAMES})


def load_results(overrides: dict[str, str] | None = None,
                 root: str | None = None) -> dict[str, Result]:
    """The result each benchmark's block is rendered from: the override, else the latest that
    is not a smoke run (--quick). A name `<benchmark>:<part>` (reports.PARTS) takes the latest
    run of that benchmark that holds the part: a run may record only some parts of a long
    benchmark, and each block shows the newest run of its own part."""
    overrides = overrides or {}
    out = {}
    for name in needed_names():
        benchmark = name.partition(":")[0]
        path = overrides.get(name) or result_files.latest(benchmark, root, skip_quick=True,
                                                          where=PARTS.get(name))
        if path:
            out[name] = Result.from_file(name, path)
    return out


def render_blocks(results: dict[str, Result]) -> dict[str, dict[str, str]]:
    """{document: {block: markdown}}: a pure function of the result files."""
    return {doc: {block: BLOCKS[block].markdown(
        {n: results[n] for n in BLOCKS[block].NAMES if n in results}, LINKS[doc]).strip()
        for block in blocks} for doc, blocks in DOCUMENTS.items()}


def blocks_in(text: str) -> dict[str, str]:
    """{block: its content} of a document (without the newlines next to the markers)."""
    return {m.group("name"): m.group("body").strip("\n") for m in BLOCK.finditer(text)}


def apply_blocks(text: str, blocks: dict[str, str], doc: str) -> str:
    present = blocks_in(text)
    missing = sorted(set(blocks) - set(present))
    unknown = sorted(set(present) - set(blocks))
    if missing or unknown:
        raise SystemExit(f"{doc}: generated blocks missing {missing}, unknown {unknown}")
    return BLOCK.sub(lambda m: f"<!-- generated:{m.group('name')} -->\n{blocks[m.group('name')]}\n"
                               f"<!-- /generated:{m.group('name')} -->", text)


def render_images(results: dict[str, Result], img_dir: str = IMG_DIR) -> list[str]:
    os.makedirs(img_dir, exist_ok=True)
    written = []
    for module in BLOCKS.values():
        if hasattr(module, "images"):
            written += module.images({n: results[n] for n in module.NAMES if n in results},
                                     img_dir)
    return written


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or name not in needed_names():
            raise SystemExit(f"--result wants NAME=PATH with NAME one of {needed_names()}")
        out[name] = path
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--result", action="append", default=[], metavar="NAME=PATH",
                        help="render NAME from this file instead of its latest result")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 when a generated block is out of date")
    parser.add_argument("--no-images", action="store_true", help="markdown only")
    args = parser.parse_args()
    results = load_results(parse_overrides(args.result))
    stale = []
    for doc, blocks in render_blocks(results).items():
        path = os.path.join(REPO, doc)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = apply_blocks(text, blocks, doc)
        if new != text:
            stale.append(doc)
            if not args.check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
    if args.check:
        for doc in stale:
            print(f"{doc}: generated blocks out of date (run `make docs`)", file=sys.stderr)
        return 1 if stale else 0
    if not args.no_images:
        for file in render_images(results):
            print("wrote", os.path.relpath(os.path.join(IMG_DIR, file), REPO))
    for doc in stale:
        print("updated", doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
