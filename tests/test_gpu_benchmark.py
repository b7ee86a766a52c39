"""``benchmarks/gpu.py`` end to end on CPU (``--cpu-smoke``): its processes, both backends, compile, the FLOP
count and the RESULTS.md block; and its clear refusal where torch sees no GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.train_helpers import ROOT, env

SCRIPT = ROOT / "benchmarks" / "gpu.py"


def gpu_py(*args, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        env={**env(), **(extra_env or {})},
        cwd=ROOT,
        timeout=300,
    )


def test_without_a_gpu_it_stops_with_a_clear_error():
    proc = gpu_py(extra_env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "torch sees none here" in proc.stderr and "--cpu-smoke" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.multiprocess
def test_cpu_smoke_runs_both_backends_compiled_and_appends_a_results_block(tmp_path):
    pytest.importorskip("deepspeed")
    results = tmp_path / "RESULTS.md"
    results.write_text(
        "# Benchmark results\n\n## GPU throughput\n\n<!-- benchmarks/gpu.py appends its runs above "
        "this line -->\n\n## Later section\n"
    )
    proc = gpu_py(
        "--cpu-smoke",
        "--modes",
        "bf16-compiled",
        "--results",
        results,
        extra_env={"TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = results.read_text()
    block = text[text.index("### ") : text.index("<!-- benchmarks/gpu.py")]
    assert "CPU (" in block and "python benchmarks/gpu.py --cpu-smoke" in block
    rows = [line for line in block.splitlines() if line.startswith("| `alternet_tiny`")]
    assert [row.split(" | ")[1:3] for row in rows] == [
        ["DDP", "bf16-compiled"],
        ["ZeRO-2", "bf16-compiled"],
        ["DDP", "fp32-eager"],
    ]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[5]) > 0 and float(cells[6]) > 0, row  # images/s and TFLOP/s
        assert cells[7] == "n/a" and cells[8] == "n/a (CPU)", row  # no MFU nor GPU memory on a CPU
    assert rows[-1].rstrip(" |").endswith("1.00")  # the fp32 eager baseline against itself
    assert text.rstrip().endswith("## Later section")
