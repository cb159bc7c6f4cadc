"""The paper's printed timings and the `bench --paper` command."""
import json

import pytest

from deeproots.cli import main
from deeproots.reproduction.tables import paper_timings, table_of


def test_paper_timings_are_the_printed_speedups():
    rows = {r["model"]: r for r in paper_timings("nin")}
    assert len(rows) == 13 and rows["nin"]["paper_cpu_speedup"] == 1.0
    # Table 2: root-8 at 24.4 ms against 39.0 (CPU), 0.482 against 0.623 ms (GPU)
    assert rows["nin-root-8"]["paper_cpu_speedup"] == pytest.approx(39.0 / 24.4)
    assert rows["nin-root-8"]["paper_gpu_speedup"] == pytest.approx(0.623 / 0.482)
    resnet = {r["model"]: r for r in paper_timings("resnet50")}
    # the abstract: "31% ... faster on a CPU"
    assert 1 - 1 / resnet["resnet50-root-64"]["paper_cpu_speedup"] == pytest.approx(0.31, abs=0.01)
    with pytest.raises(ValueError, match=r"Table 5 \(resnet200\) prints no timings; tables "
                                         r"with timings: nin, resnet50, googlenet"):
        paper_timings("resnet200")


def test_each_model_names_the_table_that_reports_it():
    assert table_of("nin-tree-4") == "Table 8"
    assert table_of("resnet50-root-16") == "Table 4"
    assert table_of("resnet200-root-8") == "Table 5"
    assert table_of("resnet200-root-4") == ""  # a variant the paper does not report
    assert table_of("googlenet") == "Table 6"


def test_bench_paper_cli(capsys):
    assert main(["bench", "--paper", "nin", "--batch-size", "2", "--input-size", "16",
                 "--repeats", "1", "--warmup", "0", "--json", "--allocator", "system"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows][:5] == ["nin", "nin-root-2", "nin-root-4", "nin-root-8",
                                              "nin-root-16"]
    assert len(rows) == 13
    root8 = rows[3]
    assert root8["paper_cpu_ms"] == 24.4 and root8["paper_gpu_ms"] == 0.482
    assert main(["bench", "nin", "--paper", "nin", "--allocator", "system"]) == 2
    assert "--paper nin times that table's models; name no models" in capsys.readouterr().err
    assert main(["bench", "--paper", "nin", "--layers", "--allocator", "system"]) == 2
    assert "--paper times whole forward passes; --layers and --plot take model names" in \
        capsys.readouterr().err
    assert main(["bench", "--allocator", "system"]) == 2
    assert "name at least one model to time" in capsys.readouterr().err
