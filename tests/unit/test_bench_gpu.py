"""bench/gpu.py keeps working: its CPU dry run (tiny model) prints the table with every row and the
quality guard's figures. No timing is asserted: a shared CPU says nothing about a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_cpu_dry_run_prints_the_table_and_the_quality_guard(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--model", "tiny", "--device", "cpu", "--repeats", "1",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    assert "| row | path | batch | img/s | steps/s | persons/GPU-h" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for row in ("baseline_b1", "baseline_batched", "baseline_train", "baseline_person", "pipeline_generate",
                "pipeline_train", "pipeline_person"):
        assert row in rows, f"row {row} missing from:\n{out}"
    assert "merged LoRA, fused QKV, channels-last" in rows["pipeline_generate"]

    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["model"] == "tiny" and result["device"] == "cpu"
    assert result["optimizations"] == {"channels_last": True, "fuse_qkv": True, "compile_mode": None}
    for name in ("optimised_vs_plain", "plain_batched_vs_plain_b1"):
        quality = result["quality"][name]
        assert quality["images"] == 4
        assert isinstance(quality["max_abs_diff"], int) and 0 <= quality["max_abs_diff"] <= 255
        assert quality["psnr_db"] > 0
        assert f"| {quality['max_abs_diff']} | {quality['psnr_db']} |" in out
    # On float32 the optimised path is the plain one up to rounding (the guard a GPU run reports).
    assert result["quality"]["optimised_vs_plain"]["max_abs_diff"] <= 2
    persons = result["persons_per_gpu_hour"]
    assert persons["pipeline"] > persons["pipeline_with_cpu"] > 0
    assert result["recompiles_after_warmup"] == 0
