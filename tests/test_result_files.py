"""Benchmark results on disk (benchmarks/result_files.py): one new file per run, never an
overwrite, the newest by recorded time, provenance that names no machine path, and older files
read with what they lack marked "not recorded". No engine."""
import json
import os
import sys

from conftest import ROOT

BENCH = os.path.join(ROOT, "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import result_files  # noqa: E402


def test_each_run_adds_a_file_and_never_overwrites(tmp_path):
    first = result_files.write("demo", {"value": 1}, {"quick": True}, ["demo.py"],
                               root=str(tmp_path))
    second = result_files.write("demo", {"value": 2}, None, ["demo.py"], root=str(tmp_path))
    third = result_files.write("demo", {"value": 3}, None, ["demo.py"], root=str(tmp_path))
    assert os.path.dirname(first) == str(tmp_path / "demo")
    stem = os.path.basename(first)[:-len(".json")]
    assert os.path.basename(second) == stem + "-2.json"
    assert os.path.basename(third) == stem + "-3.json"
    assert result_files.load(first)["value"] == 1
    prov = result_files.load(first)["provenance"]
    assert stem.startswith(prov["time_utc"][:10])
    assert prov["options"] == {"quick": True} and prov["argv"] == ["demo.py"]
    assert set(prov["versions"]) == {"python", "torch", "vllm", "transformers", "ray"}
    assert prov["commit"] is None or stem.endswith(prov["commit"])


def test_results_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMSINK_BENCH_RESULTS", str(tmp_path))
    path = result_files.write("redirected", {"value": 1}, None, ["x.py"])
    assert path.startswith(str(tmp_path))
    assert result_files.latest("redirected") == path


def test_latest_goes_by_recorded_time_not_by_name(tmp_path):
    folder = tmp_path / "bench"
    folder.mkdir()
    (folder / "2026-12-09-aaaaaaa.json").write_text(json.dumps(
        {"machine": {"date": "2026-12-01T10:00:00+00:00"}}))
    (folder / "2026-01-01-bbbbbbb.json").write_text(json.dumps(
        {"provenance": {"time_utc": "2026-12-02T10:00:00+00:00"}}))
    assert os.path.basename(result_files.latest("bench", str(tmp_path))) == \
        "2026-01-01-bbbbbbb.json"
    assert result_files.latest("absent", str(tmp_path)) is None


def test_older_files_say_what_they_did_not_record(tmp_path):
    path = tmp_path / "2026-11-30-d7676e4.json"
    path.write_text(json.dumps({"machine": {"date": "2026-11-30T01:40:27+00:00", "cpus": 2,
                                            "vllm": "0.32.0", "cpu_capability": "AVX512"}}))
    prov = result_files.provenance(result_files.load(str(path)), str(path))
    assert prov["cpu_model"] == result_files.NOT_RECORDED
    assert prov["cpu_capability"] == "AVX512"
    assert prov["commit"] == "d7676e4" and prov["cores"] == 2
    assert prov["versions"] == {"vllm": "0.32.0"}


def test_results_name_no_machine_paths(tmp_path):
    outside = tmp_path / "checkpoints" / "SmolLM2-135M-Instruct"
    outside.mkdir(parents=True)
    inside = os.path.join(ROOT, "benchmarks", "common.py")
    got = result_files.portable({"model": str(outside), "argv": [f"--text={inside}"],
                                  "endpoint": "/v1/completions", "n": 3})
    assert got == {"model": "SmolLM2-135M-Instruct", "argv": ["--text=benchmarks/common.py"],
                   "endpoint": "/v1/completions", "n": 3}
