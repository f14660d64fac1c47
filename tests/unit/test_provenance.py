"""bench/provenance.py: the fields every bench result carries (commit, command, date, CPU, GPU, versions), the
dirty flag against the commit, the command-line form for shell scripts, and that every bench script that writes a
JSON file puts them in it."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from bench import provenance as prov
from helpers import REPO

WRITES_JSON = re.compile(r"write_text\(json\.dumps|json\.dump\(|write_result\(")


def git(cwd, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_the_fields_name_this_commit_command_machine_and_versions():
    p = prov.provenance("bench/memory.py", ["--cases", "naive,zero2-1rank", "--out", "a b.json"])
    assert tuple(p) == prov.FIELDS
    assert p["git_commit"] == git(REPO, "rev-parse", "HEAD") and re.fullmatch(r"[0-9a-f]{40}", p["git_commit"])
    assert isinstance(p["git_dirty"], bool)
    assert p["script"] == "bench/memory.py"
    python = os.path.basename(sys.executable)
    assert p["command"] == f"{python} bench/memory.py --cases naive,zero2-1rank --out 'a b.json'"
    assert abs(time.mktime(time.strptime(p["date"], "%Y-%m-%dT%H:%M:%SZ")) - time.mktime(time.gmtime())) < 60
    assert p["cpu"] == prov.cpu_name() and p["cpu"] and p["cores"] == os.cpu_count()
    if torch.cuda.is_available():
        assert p["gpu"] == torch.cuda.get_device_name(0) and p["gpu_count"] == torch.cuda.device_count() >= 1
    else:
        assert p["gpu"] is None and p["gpu_count"] == 0
    assert set(p["versions"]) == {"python", "cuda", *prov.PACKAGES}
    assert p["versions"]["torch"] == torch.__version__ and p["versions"]["cuda"] == torch.version.cuda
    for name in ("deepspeed", "diffusers", "transformers", "bitsandbytes"):  # the project's requirements
        assert re.match(r"\d+\.\d+", p["versions"][name]), (name, p["versions"][name])
    assert json.loads(json.dumps(p)) == p  # plain JSON


def test_a_shell_script_runs_under_bash_and_a_given_command_wins():
    assert prov.provenance("bench/default_run.sh", ["out.json"])["command"] == "bash bench/default_run.sh out.json"
    p = prov.provenance("bench/default_run.sh", [], command="R=/tmp/r LIMIT_S=0 bash bench/default_run.sh")
    assert p["command"] == "R=/tmp/r LIMIT_S=0 bash bench/default_run.sh"


def test_dirty_means_code_changed_against_the_commit_not_a_result(tmp_path, monkeypatch):
    git(tmp_path, "init", "-q")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "train.py").write_text("a = 1\n")
    (tmp_path / "bench" / "results" / "memory-cpu.json").write_text("{}\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    monkeypatch.setattr(prov, "REPO", tmp_path)
    clean = prov.provenance("bench/memory.py", [])
    assert clean["git_commit"] == git(tmp_path, "rev-parse", "HEAD") and clean["git_dirty"] is False
    (tmp_path / "bench" / "results" / "memory-cpu.json").write_text('{"rewritten": 1}\n')
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert prov.provenance("bench/memory.py", [])["git_dirty"] is False
    (tmp_path / "train.py").write_text("a = 2\n")
    assert prov.provenance("bench/memory.py", [])["git_dirty"] is True


def test_outside_a_repository_the_commit_is_null_not_a_guess(tmp_path, monkeypatch):
    monkeypatch.setattr(prov, "REPO", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    p = prov.provenance("bench/memory.py", [])
    assert p["git_commit"] is None and p["git_dirty"] is None


def test_the_command_line_form_prints_the_same_fields():
    out = subprocess.run([sys.executable, "bench/provenance.py", "bench/default_run.sh", "x.json"], cwd=REPO,
                         capture_output=True, text=True, check=True, timeout=120).stdout
    p = json.loads(out)
    assert tuple(p) == prov.FIELDS and p["command"] == "bash bench/default_run.sh x.json" and p["git_commit"]


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "bench").iterdir()
                                          if p.suffix in (".py", ".sh") and p.name != "provenance.py"))
def test_every_bench_script_that_writes_json_records_its_provenance(script):
    text = (REPO / "bench" / script).read_text()
    if not WRITES_JSON.search(text):
        pytest.skip(f"bench/{script} writes no JSON file")
    assert "provenance(" in text and "from bench.provenance import" in text, f"bench/{script}"
    assert f'"bench/{script}"' in text, f"bench/{script} does not name itself as the provenance's script"


def test_the_writers_are_found():
    """The check above is not vacuous: the known result writers match it."""
    writers = {p.name for p in (REPO / "bench").iterdir() if p.suffix in (".py", ".sh")
               and p.name != "provenance.py" and WRITES_JSON.search(p.read_text())}
    assert {"memory.py", "throughput.py", "faults.py", "cache_speed.py", "default_run.sh", "consumer_grid.py",
            "host_optimizer.py", "prepare_speed.py", "lr_range.py", "consistency_ablation.py", "gpu_busy.py",
            "quality_summary.py"} <= writers
    assert "gpu_all.sh" not in writers  # it prints a summary; its files come from throughput.py and gpu_busy.py


def test_write_result_makes_the_folder_and_writes_what_reads_back(tmp_path, capsys):
    path = prov.write_result(tmp_path / "new" / "r.json", {"rows": [1.5, None]}, indent=1)
    assert json.loads(path.read_text()) == {"rows": [1.5, None]} and path.read_text().endswith("}\n")
    assert f"wrote {path}" in capsys.readouterr().out
