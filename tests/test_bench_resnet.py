"""benchmarks/bench_resnet.py without timing anything (its run takes minutes): the plan split and the table."""

import sys

from torch import nn

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_resnet  # noqa: E402


def test_split_separates_pointwise_from_other_entries():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 1), nn.Flatten(), nn.Linear(16, 2))
    plan = {"0": {"method": "tucker", "ranks": [4, 2]}, "1": {"method": "svd", "rank": 4},
            "3": {"method": "none", "reason": "head"}}
    pointwise = bench_resnet._split(plan, model, pointwise=True)
    other = bench_resnet._split(plan, model, pointwise=False)
    assert pointwise["1"] == plan["1"] and pointwise["0"]["method"] == "none"
    assert other["0"] == plan["0"] and other["1"]["method"] == "none" and other["3"] == plan["3"]


def test_table_reports_each_variant_against_the_original():
    rows = [{"variant": "original", "params": 2e6, "macs": 4e9, "mac_ratio": 1.0, "median_ms": 100.0,
             "speedup": 1.0, "fraction_of_mac_ratio": 1.0, "decomposed_layers": {}},
            {"variant": "2x", "params": 1e6, "macs": 2e9, "mac_ratio": 2.0, "median_ms": 60.0,
             "speedup": 100 / 60, "fraction_of_mac_ratio": 100 / 60 / 2, "decomposed_layers": {"kxk": 3, "1x1": 2}}]
    table = bench_resnet.format_table({"arch": "resnet50", "image_size": 224, "batch_size": 8, "rows": rows})
    assert "| 2x | 1.00 M | 2.00 G | 2.00x | 60.0 | 1.67x | 83% | 2 1x1, 3 kxk |" in table
