"""``lenstrain train --profile`` traces steps 6-10 with torch.profiler: a Chrome/Perfetto trace per rank in
RUN/profile/ that names the model's operators, and the top operators by self time, printed and in TensorBoard."""

from __future__ import annotations

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lenstrain.checkpointing.rundir import RunDir
from lenstrain.cli import main
from tests.factories import write_config


def test_profile_writes_a_trace_naming_the_models_operators(tmp_path, ring_shards, capsys):
    config = write_config(tmp_path / "c.yaml", ring_shards, train={"max_steps": 12},
                          checkpoint={"every_steps": 0, "every_minutes": None})
    run = RunDir(tmp_path / "run")
    assert main(["train", str(config), "--run-dir", str(run.root), "--profile"]) == 0
    traces = sorted(run.profile.glob("*.trace.json"))
    assert [t.name for t in traces] == ["rank0.steps6-10.trace.json"]
    names = {event.get("name") for event in json.loads(traces[0].read_text())["traceEvents"]}
    assert "aten::conv2d" in names  # alternet_tiny's stem and convolution stages
    out = capsys.readouterr().out
    assert "top operators by self time" in out and "Self CPU" in out
    events = EventAccumulator(str(run.tb), size_guidance={"tensors": 0})
    events.Reload()
    assert "profile/top_operators/text_summary" in events.Tags()["tensors"]
