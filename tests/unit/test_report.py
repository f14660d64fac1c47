"""bench/report.py: the generated tables in README.md and docs/ equal what bench/results/*.json give, every number
with a unit (or with two decimals) in a paragraph that names a result file is in that file or printed by a generated
table, and the checker fails where it should."""

import json

import pytest

from bench import report
from helpers import REPO


def test_the_generated_tables_equal_what_the_results_give():
    diffs = report.differences()
    assert not diffs, "run python bench/report.py:\n" + "".join(diffs.values())


def test_every_table_is_used_once_in_the_docs():
    names = [m.group(2) for path in report.DOCS for m in report.BLOCK.finditer(path.read_text())]
    assert sorted(names) == sorted(report.TABLES)


def test_every_number_a_paragraph_cites_is_in_its_result_file():
    assert report.uncited_numbers() == []


def test_every_result_file_the_docs_name_exists(tmp_path):
    assert report.missing_files() == []
    doc = tmp_path / "doc.md"
    doc.write_text("See `bench/results/memory-cpu.json` and\n![x](../bench/results/nope-cpu.png)\n")
    assert report.missing_files([doc]) == [f"{doc}:2: nope-cpu.png"]


def test_a_stale_table_is_rewritten_and_an_unknown_one_refused():
    stale = "before\n<!-- report: host-optimizer -->\n| optimizer | old |\n<!-- /report -->\nafter\n"
    new = report.render(stale)
    assert new.startswith("before\n<!-- report: host-optimizer -->\n") and new.endswith("<!-- /report -->\nafter\n")
    rows = new.splitlines()[2:-2]
    assert rows == report.host_optimizer() and rows[0] == "| optimizer | ns per parameter | vs bitsandbytes |"
    measured = json.loads((report.RESULTS / "host-optimizer-x86_64-2cores.json").read_text())["results"]
    assert f"| {measured[0]['ns_per_param']:.2f} |" in rows[2]
    with pytest.raises(SystemExit, match="unknown report table 'nope'"):
        report.render("<!-- report: nope -->\n<!-- /report -->\n")


def test_check_exits_1_on_a_stale_table_or_a_wrong_number(tmp_path, monkeypatch, capsys):
    doc = tmp_path / "doc.md"
    monkeypatch.setattr(report, "DOCS", (doc,))
    doc.write_text("<!-- report: prepare-speed -->\n<!-- /report -->\n")
    assert report.main(["--check"]) == 1 and "+| measurement | photos/s |" in capsys.readouterr().out
    assert report.main([]) == 0 and report.main(["--check"]) == 0
    doc.write_text(doc.read_text() + "\nDecoding (`prepare-speed-cpu.json`) runs at 368 photos/s, 0.131 s.\n")
    assert report.main(["--check"]) == 0  # photos/s is no unit of the checker; 0.131 s is in the file
    doc.write_text(doc.read_text() + "\nIn `bench/results/prepare-speed-cpu.json` the decode took 0.135 s.\n")
    assert report.main(["--check"]) == 1 and "doc.md:11: 0.135 s (prepare-speed-cpu.json)" in capsys.readouterr().out


@pytest.mark.parametrize("text, missing", [
    ("`memory-cpu.json`: 5.09 GiB per rank, 0.345x the naive step.", []),
    ("`memory-cpu.json`: 5.10 GiB per rank.", ["5.10 GiB"]),  # 5.094: printed 5.09
    ("`memory-cpu.json`: 5.09 GiB per rank,\nthe naive step 14.8 GiB and 99.9x.", ["99.9x"]),  # a paragraph's lines
    ("`cache-speed-cpu.json`: a read takes 0.44 ms, a sample 142 KiB.", []),  # seconds as ms, bytes as KiB
    ("`cache-speed-cpu.json`: a read takes 0.44 s, a sample 142 GiB.", ["0.44 s", "142 GiB"]),  # only per unit
    ("`cache-speed-cpu.json`: 7.777-142 KiB; 3-5.555 s.", ["7.777-142 KiB", "3-5.555 s"]),  # both ends of a range
    ("Scored (`default-run-h200.json`): +6.38 dB over copy.", []),  # psnr - baseline_psnr
    ("Scored (`default-run-h200.json`): +6.40 dB over copy.", ["+6.40 dB"]),
    ("Through the 8x VAE (`default-run-h200.json`) and the 4x one.", []),  # a VAE's name
    ("No result file named here: 99.9 GiB.", []),
    ("`memory-cpu.json` times:\n\n| case | GiB |\n|---|---|\n| a | 99.9 GiB |", ["99.9 GiB"]),  # a table's intro
    ("`memory-cpu.json` times.\n\n| case | GiB |\n|---|---|\n| a | 99.9 GiB |", []),  # no colon: not its intro
    ("`memory-cpu.json`:\n\n```\n99.9 GiB\n```", []),  # code
    ("`memory-cpu.json`:\n<!-- report: memory-cpu -->\n| 99.9 GiB |\n<!-- /report -->", []),  # a generated table
    ("`prepare-speed-cpu.json`: a ratio of 0.131 and 0.777.", ["0.777"]),  # no unit, two decimals: checked
    ("`prepare-speed-cpu.json`: deepspeed 0.19.8, 1.5 and 3e-3.", []),  # a version, one decimal, an LR: not
    ("`prepare-speed-cpu.json`: the mean, 9.876.\n\n<!-- report: x -->\n| 9.876 |\n<!-- /report -->", []),  # printed
    ("`prepare-speed-cpu.json`: the mean, 9.876.\n\n<!-- report: x -->\n| 9.875 |\n<!-- /report -->", ["9.876"]),
])
def test_the_checker_reads_paragraphs_tables_and_units(tmp_path, text, missing):
    doc = tmp_path / "doc.md"
    doc.write_text(text + "\n")
    assert [m.split(": ", 1)[1].split(" (")[0] for m in report.uncited_numbers([doc])] == missing


def test_the_allow_list_names_only_numbers_that_occur_with_a_reason():
    for rel, numbers in report.NOT_MEASURED.items():
        text = " ".join((REPO / rel).read_text().split())  # a number and its unit may be a line apart
        for number, reason in numbers.items():
            assert number in text and len(reason) > 10, (rel, number)


@pytest.mark.parametrize("value, printed", [(22.04, "22.0"), (0.19799, "0.198"), (367.0, "367"), (1.0278, "1.03"),
                                            (49.97, "50.0"), (0.87121, "0.871")])
def test_three_significant_digits(value, printed):
    assert report.sig(value) == printed
