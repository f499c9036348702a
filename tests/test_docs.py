"""The docs' numbers come from the committed results: regenerating every generated block from
benchmarks/results/ gives exactly what README.md and docs/benchmarks.md hold (so a number edited
by hand, or a result committed without `make docs`, fails here), every image a doc shows exists,
and every relative link points at a file in the repository. No engine, no torch: seconds."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

BENCH = os.path.join(ROOT, "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import report  # noqa: E402
import result_files  # noqa: E402

DOCS = ["README.md"] + sorted(os.path.join("docs", f)
                              for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
# [text](target) and ![alt](target); a target ends at whitespace or ")"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)")


def read(doc: str) -> str:
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return f.read()


def relative_targets(doc: str, pattern: re.Pattern) -> list[str]:
    text = re.sub(r"```.*?```", "", read(doc), flags=re.S)  # code blocks are not links
    out = []
    for target in pattern.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, https:, mailto: and anchors within the page
        out.append(target.split("#", 1)[0])
    return out


def resolve(doc: str, target: str) -> str:
    return os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target))


@pytest.fixture(scope="module")
def committed_results():
    return report.load_results()


def test_generated_blocks_match_the_committed_results(committed_results):
    rendered = report.render_blocks(committed_results)
    assert set(rendered) == set(report.DOCUMENTS)
    for doc, blocks in rendered.items():
        present = report.blocks_in(read(doc))
        assert set(present) == set(blocks), doc
        for name, markdown in blocks.items():
            assert present[name] == markdown, (
                f"{doc}: generated block '{name}' differs from what the committed results give; "
                "run `make docs` (numbers are never edited by hand)")


def test_every_shown_benchmark_has_a_committed_result(committed_results):
    for name in report.needed_names():
        assert name in committed_results, f"no result under benchmarks/results/{name}/"


def test_rendering_is_deterministic(committed_results):
    assert report.render_blocks(committed_results) == report.render_blocks(report.load_results())


def test_a_hand_edited_number_is_caught(committed_results):
    blocks = report.render_blocks(committed_results)["docs/benchmarks.md"]
    text = read("docs/benchmarks.md")
    digit = re.search(r"\d", blocks["decode_latency"])
    edited = blocks["decode_latency"][:digit.start()] + str((int(digit.group()) + 1) % 10) + \
        blocks["decode_latency"][digit.end():]
    text = report.apply_blocks(text, {**blocks, "decode_latency": edited}, "docs/benchmarks.md")
    assert report.blocks_in(text)["decode_latency"] != blocks["decode_latency"]


def test_a_newer_result_changes_the_docs(tmp_path):
    """latest() goes by recorded time, so a result added without `make docs` shows up as a
    difference in its block."""
    src = result_files.latest("ppl_speed")
    data = result_files.load(src)
    folder = tmp_path / "ppl_speed"
    folder.mkdir()
    shutil.copy(src, folder / os.path.basename(src))
    newer = dict(data, machine=dict(data.get("machine") or {}, date="2099-01-01T00:00:00+00:00"))
    newer.pop("provenance", None)
    newer["speedup"] = data["speedup"] * 2
    (folder / "2099-01-01-0000000.json").write_text(json.dumps(newer))
    assert os.path.basename(result_files.latest("ppl_speed", str(tmp_path))) == \
        "2099-01-01-0000000.json"
    old = report.render_blocks(report.load_results())["docs/benchmarks.md"]["ppl_speed"]
    new = report.render_blocks(report.load_results(
        {"ppl_speed": str(folder / "2099-01-01-0000000.json")}))["docs/benchmarks.md"]["ppl_speed"]
    assert new != old and "2099-01-01" in new


@pytest.mark.parametrize("doc", DOCS)
def test_every_image_a_doc_shows_exists(doc):
    for target in relative_targets(doc, IMAGE):
        assert os.path.isfile(resolve(doc, target)), f"{doc}: image {target} does not exist"


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_points_into_the_repository(doc):
    for target in relative_targets(doc, LINK):
        path = resolve(doc, target)
        assert path == ROOT or path.startswith(ROOT + os.sep), f"{doc}: {target} leaves the repo"
        assert os.path.exists(path), f"{doc}: link {target} points at nothing"


def test_rendering_needs_neither_torch_nor_vllm(tmp_path):
    """The generator (tables and plots) runs where no engine is installed."""
    code = ("import sys, report\n"
            "results = report.load_results()\n"
            "report.render_blocks(results)\n"
            f"report.render_images(results, {str(tmp_path)!r})\n"
            "heavy = sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=BENCH, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    images = {f for doc in DOCS for f in relative_targets(doc, IMAGE) if "img/" in f}
    assert {os.path.basename(f) for f in images} <= set(os.listdir(tmp_path))
