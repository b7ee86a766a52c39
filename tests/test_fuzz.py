"""Fuzzing what a user hands us, with hypothesis: at least 500 examples per target, derandomized (a fixed seed, no
example database), all four targets together about 30 CPU-seconds.

- random job YAMLs and ``--set`` overrides into ``launcher submit --dry-run``: exit 0 or 2, never a traceback,
  and a script that is printed is a safe one (``bash -n``, every ``#SBATCH`` line before the first command);
- random mutations of a manifest into ``shards verify`` and the training reader, and of a
  ``COMPLETE`` marker into ``lenstrain export``: exit 0, 1 or 2 with one ``error:`` line naming the file,
  never a traceback;
- random pickle opcode streams into the restricted unpickler (DeepLense ``.npy``) and the checkpoint loaders
  (``weights_only`` state files, DeepSpeed's files, the opcode scan): loaded or refused, never code run (a
  canary file must not appear).

Each target counts its examples and asserts the count; ``pytest -s tests/test_fuzz.py`` prints them.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.factories import launcher_job_dict, make_ring_shards
from tests.hardening_helpers import (
    launcher_cli,
    lenstrain_cli,
    make_run,
    sbatch_part,
    script_structure_problems,
    shards_cli,
)

EXAMPLES = 500
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))


pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


def check_count(name: str, count: int, outcomes: Counter | None = None) -> None:
    seen = f" ({', '.join(f'{k}: {v}' for k, v in sorted(outcomes.items()))})" if outcomes else ""
    print(f"fuzz target {name}: {count} examples{seen}")
    assert count >= EXAMPLES, f"{name} ran {count} examples"


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    import launcher.slurm

    def refuse(*args, **kwargs):
        raise AssertionError("a job was submitted")

    monkeypatch.setattr(launcher.slurm, "submit", refuse)
    monkeypatch.setenv("SLURM_CONF", "/nonexistent/slurm.conf")


@pytest.fixture
def models_built_once(monkeypatch):
    """The checks build the job's model on the meta device (twice per job); the same model is built once here,
    and the same failure raised again, so that the fuzz spends its time on the input rather than on models."""
    import lenstrain.models
    import lenstrain.run.preflight

    real = lenstrain.models.create_model
    made: dict = {}

    def create_model(name, **kwargs):
        key = (name, repr(sorted(kwargs.items(), key=lambda item: str(item[0]))))
        if key not in made:
            try:
                made[key] = (real(name, **kwargs), None)
            except Exception as exc:  # noqa: BLE001 - kept to be raised again
                made[key] = (None, exc)
        model, error = made[key]
        if error is not None:
            raise error
        return model

    monkeypatch.setattr(lenstrain.models, "create_model", create_model)
    monkeypatch.setattr(lenstrain.run.preflight, "create_model", create_model)


# ------------------------------------------------------------------------------------ values of every kind

TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
NASTY = st.sampled_from(["acct\ntouch CANARY #", "a;b", "$(touch CANARY)", "`id`", "x\r", "\x00", "../x", "",
                         " ", "debug", "01:00:00", "1:00:00\n", "16G", "16 G\n", "a100&nvlink", "-1", "1e400",
                         "\u2028", "é", "\t", "'", '"', "#SBATCH --x", "!!python/object:os.system", "[", "{"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    TEXT, NASTY)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(TEXT | NASTY, inner, max_size=3)),
                      max_leaves=6)

JOB_KEYS = ["name", "seed", "resources.cluster", "resources.nodes", "resources.gpus_per_node",
            "resources.tasks_per_node", "resources.cpus_per_task", "resources.mem", "resources.time",
            "resources.partition", "resources.account", "resources.qos", "resources.constraint",
            "resources.signal_delay_s", "resources.max_requeues", "resources.setup", "resources",
            "data.shards", "data.batch_size", "data.workers", "data.target", "data.normalize", "data.augment",
            "model.name", "model.kwargs", "optim.name", "optim.lr", "optim.betas", "schedule.name",
            "schedule.warmup_steps", "train.max_steps", "train.epochs", "train.precision", "train.loss",
            "train.early_stopping", "parallel.strategy", "parallel.zero_stage", "parallel.backend",
            "checkpoint.every_steps", "checkpoint.best_metric", "checkpoint.best_mode", "log.every_steps",
            "unknown.key", "optim", "train"]
KEYS = st.one_of(st.sampled_from(JOB_KEYS), TEXT)
SNIPPETS = st.sampled_from(["\n", ": ", "- ", "&a [1, *a]", "*a", "!!python/object/apply:os.system ['touch CANARY']",
                            "\t", "{", "}", "[", "]", "'", '"', "#", "---\n", "...\n", "? ", "%YAML 1.1\n",
                            "!!binary AAA", "<<: *a", "\x00", "\xff", "\ud7ff"])


def set_dotted(data: dict, key: str, value) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


@st.composite
def job_texts(draw, base: dict) -> str:
    data = json.loads(json.dumps(base))
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        key = draw(KEYS)
        if draw(st.booleans()):
            set_dotted(data, key, draw(VALUES))
        else:
            section, _, leaf = key.rpartition(".")
            node = data.get(section) if section else data
            if isinstance(node, dict):
                node.pop(leaf, None)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # raw damage: a snippet inserted anywhere
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(SNIPPETS) + text[at:]
    return text


SET_ITEMS = st.builds(lambda k, v: f"{k}={v}", KEYS, st.one_of(NASTY, TEXT, SNIPPETS, st.builds(
    lambda v: yaml.safe_dump(v, default_flow_style=True).strip(), VALUES)))


# ------------------------------------------------------------------------------------ job YAMLs and --set


def test_fuzz_job_yamls_and_set_overrides_exit_0_or_2(tmp_path, ring_shards, models_built_once):
    base = launcher_job_dict(ring_shards)
    job, runs_dir = tmp_path / "job.yaml", tmp_path / "runs"
    count, outcomes = 0, Counter()

    @FUZZ
    @given(text=job_texts(base), sets=st.just([]) | st.lists(SET_ITEMS, max_size=2), local=st.booleans())
    def run(text, sets, local):
        nonlocal count
        count += 1
        job.write_bytes(text.encode("utf-8", "surrogatepass"))
        argv = ["submit", job, "--dry-run", "--runs-dir", runs_dir, *(["--local"] if local else [])]
        result = launcher_cli(*argv, *[x for item in sets for x in ("--set", item)])
        assert result.code in (0, 2), result.text
        assert "Traceback" not in result.text
        outcomes[f"exit {result.code}" + (" with a script" if "#!/bin/bash" in result.out else "")] += 1
        if result.code == 2:
            assert len(result.error_lines()) == 1, result.err
        elif "#!/bin/bash" in result.out:
            script = sbatch_part(result.out)
            assert script_structure_problems(script) == [], script
        assert not runs_dir.exists()
        assert not (tmp_path / "CANARY").exists() and not Path("CANARY").exists()

    run()
    check_count("job YAMLs and --set overrides", count, outcomes)


# ------------------------------------------------------------------------------------ mutations of JSON files

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.sampled_from([10**13, -5, -1, 0, 2**31]),
              st.floats(allow_nan=True, allow_infinity=True), TEXT,
              st.sampled_from(["../other/test-000000.tar", "/etc/passwd", "..", "train-000000.tar", "model.pt",
                               "../../config.yaml", "0" * 64, "float64", "int8", "classification"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=5)


def paths_of(node, prefix=()) -> list[tuple]:
    """Every path (a tuple of keys and indices) into a JSON document."""
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += paths_of(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node[:4]):  # the first few items of a long list are enough
            out += paths_of(value, (*prefix, i))
    return out


@st.composite
def json_mutations(draw, document) -> bytes:
    """``document`` with a few random edits (a value replaced, a key dropped or added), or its bytes damaged."""
    data = json.loads(json.dumps(document))
    for _ in range(draw(st.integers(1, 3))):
        paths = paths_of(data)
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        if not path:
            if action == "replace":
                data = draw(JSON_VALUES)
            continue
        parent = data
        try:
            for part in path[:-1]:
                parent = parent[part]
        except (KeyError, IndexError, TypeError):
            continue
        last = path[-1]
        if action == "replace":
            parent[last] = draw(JSON_VALUES)
        elif action == "drop":
            del parent[last]
        elif isinstance(parent, dict):
            parent[draw(TEXT)] = draw(JSON_VALUES)
        else:
            parent.append(draw(JSON_VALUES))
    raw = json.dumps(data).encode()
    if draw(st.integers(0, 4)) == 0:  # byte damage: truncated, or a byte changed
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        raw = raw[:at] if draw(st.booleans()) else raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
    return raw


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """12 rings of 8x8 in shards of 4: a set that is verified in a few milliseconds."""
    return make_ring_shards(tmp_path_factory.mktemp("tiny") / "set", n=12, shard_size=4, size=8)


def read_like_training(directory: Path) -> None:
    """What training and eval read: the manifest, every split's images from the maps, and their labels."""
    from lenstrain.data.loader import TargetTransform
    from shards.manifest import load_manifest
    from shards.mapped import MappedImages
    from shards.reader import ShardReader

    manifest = load_manifest(directory)
    for split in manifest.splits:
        reader = ShardReader(directory, split, manifest)
        if not len(reader):
            continue
        images = MappedImages(reader)
        out = np.empty((len(reader), *images.shape), np.float32)
        images.gather(np.arange(len(reader)), out)
        target = TargetTransform.from_manifest(manifest, None, "standard")
        column = reader.label_column(target.name)
        if column is not None:
            target.encode_values(column, reader.where)
        reader.labels(len(reader) - 1)


def test_fuzz_manifest_mutations_exit_0_1_or_2_naming_the_file(tmp_path, tiny_shards):
    from shards.manifest import ManifestError
    from shards.reader import CorruptSampleError

    shard_set = tmp_path / "set"
    shutil.copytree(tiny_shards, shard_set)
    manifest = shard_set / "manifest.json"
    document = json.loads(manifest.read_text())
    names = [str(manifest), ".tar"]
    count, outcomes = 0, Counter()

    @FUZZ
    @given(raw=json_mutations(document))
    def run(raw):
        nonlocal count
        count += 1
        manifest.write_bytes(raw)
        result = shards_cli("verify", shard_set)
        outcomes[f"verify exit {result.code}"] += 1
        assert result.code in (0, 1, 2), result.text
        assert "Traceback" not in result.text
        if result.code != 0:
            assert any(name in result.text for name in names), result.text
        if result.error_lines():
            assert len(result.error_lines()) == 1, result.err
        try:
            read_like_training(shard_set)
        except (ManifestError, CorruptSampleError) as exc:
            assert any(name in str(exc) for name in names) or "not a shard set" in str(exc), exc
        except ValueError as exc:  # a label the target cannot code: named by its sample (shard:key)
            assert ".tar:" in str(exc), exc

    run()
    check_count("manifest mutations", count, outcomes)


def test_fuzz_complete_marker_mutations_exit_0_1_or_2_naming_the_file(tmp_path, tiny_shards):
    from lenstrain.checkpointing.checkpoint import verify_checkpoint

    run_dir = make_run(tmp_path / "run", tiny_shards, steps=(4,), data={"augment": {"device": "cpu"}})
    step_dir = run_dir / "checkpoints" / "step-00000004"
    marker = step_dir / "COMPLETE"
    document = json.loads(marker.read_text())
    out = tmp_path / "m.safetensors"
    count, outcomes = 0, Counter()

    @FUZZ
    @given(raw=json_mutations(document))
    def run(raw):
        nonlocal count
        count += 1
        marker.write_bytes(raw)
        result = lenstrain_cli("export", run_dir, "--out", out, "--force")
        outcomes[f"exit {result.code}"] += 1
        assert result.code in (0, 1, 2), result.text
        assert "Traceback" not in result.text
        if result.code == 0:
            assert verify_checkpoint(step_dir) is None
        else:
            [line] = result.error_lines()
            assert str(step_dir) in line, line

    run()
    check_count("COMPLETE marker mutations", count, outcomes)


# ------------------------------------------------------------------------------------ pickle opcode streams


def fragments(canary: Path) -> list[bytes]:
    """Pieces of pickles: harmless values, and every way we know to name and call a function."""
    cmd = f"touch {canary}".encode()
    short = bytes([len(cmd)])
    return [
        b"\x80\x02", b"\x80\x04", b"(", b")", b"t", b"\x85", b"\x86", b"]", b"a", b"e", b"}", b"s", b"u", b"N",
        b"\x88", b"\x89", b"K\x05", b"M\x00\x01", b"J\x00\x00\x01\x00", b"G?\xf0\x00\x00\x00\x00\x00\x00", b"0",
        b"2", b"1", b"\x94", b"q\x00", b"h\x00", b"R", b"b", b"\x81", b"o", b".", b"\x8c\x01a", b"X\x01\x00\x00\x00b",
        b"C\x03abc", b"U\x03abc",
        b"cos\nsystem\n", b"cposix\nsystem\n", b"cbuiltins\neval\n", b"cbuiltins\nexec\n", b"cbuiltins\ngetattr\n",
        b"cbuiltins\n__import__\n", b"csubprocess\ncall\n", b"cnumpy.core.multiarray\n_reconstruct\n",
        b"cnumpy\nndarray\n", b"cnumpy\ndtype\n", b"cnumpy.core.multiarray\nscalar\n", b"ccollections\nOrderedDict\n",
        b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch\nFloatStorage\n", b"cbuiltins\nbytearray\n",
        b"cdeepspeed.runtime.zero.config\nZeroStageEnum\n", b"cdeepspeed.runtime.fp16.loss_scaler\nLossScaler\n",
        b"\x8c\x02os\x94\x8c\x06system\x94\x93", b"\x8c\x05posix\x94\x8c\x06system\x94\x93",
        b"\x8c\x08builtins\x8c\x04eval\x93", b"\x82\x01", b"\x83\x01\x00", b"Q",
        b"\x8c" + short + cmd, b"X" + struct.pack("<I", len(cmd)) + cmd, b"S'" + cmd + b"'\n",
        b"(S'" + cmd + b"'\nios\nsystem\n", b"(cos\nsystem\nS'" + cmd + b"'\no",
        b"cos\nsystem\n(S'" + cmd + b"'\ntR.",  # the classic payload, whole
        b"\x8c\x02os\x8c\x06system\x93\x8c" + short + cmd + b"\x85R.",  # protocol 4, whole
        b"c__builtin__\neval\n(V__import__('os').system('" + cmd + b"')\ntR.",
        *WHOLE,  # whole pickles of plain data, which load
    ]


WHOLE = [pickle.dumps(value, protocol=protocol) for protocol in (2, 4) for value in (
    [np.zeros((2, 2), np.float32), 1.5], {"a": [1, 2.0, None, True]}, np.arange(3), (1, "x"), np.float64(2.0))]


def npy_with_pickle(stream: bytes) -> bytes:
    """An .npy file of an object array whose payload is ``stream``."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False, "shape": (2,)})
    return header.getvalue() + stream


def torch_zip_with(stream: bytes, template: bytes) -> bytes:
    """A torch checkpoint (zip) whose data.pkl is ``stream``."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(template)) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            target.writestr(info, stream if info.filename.endswith("data.pkl") else source.read(info))
    return out.getvalue()


def test_fuzz_pickle_streams_load_or_are_refused_and_never_run_code(tmp_path):
    from lenstrain.checkpointing.safepickle import CheckpointReadError, check_pickle_file, pickle_globals
    from lenstrain.checkpointing.stateio import load_listed_pickle, load_state_file
    from shards.pack import BadSample
    from shards.sources.npyfile import read_npy
    from tests.hardening_helpers import seal

    canary = tmp_path / "canary"
    pieces = fragments(canary)
    template = io.BytesIO()
    torch.save({"w": torch.ones(2)}, template)
    npy, raw, zipped = tmp_path / "x.npy", tmp_path / "raw.pt", tmp_path / "zipped.pt"
    step_dir = tmp_path / "step-00000001"
    (step_dir / "deepspeed").mkdir(parents=True)
    listed = step_dir / "deepspeed" / "mp_rank_00_model_states.pt"
    count, outcomes = 0, Counter()

    def attempt(load, path, refusal) -> str:
        """``loaded`` or ``refused`` (the one exception ``load`` may raise); anything else fails the test."""
        try:
            load(path)
        except refusal:
            return "refused"
        return "loaded"

    @FUZZ
    @given(stream=st.lists(st.sampled_from(pieces), min_size=1, max_size=12).map(b"".join),
           tail=st.binary(max_size=8))
    def run(stream, tail):
        nonlocal count
        count += 1
        stream = stream + tail
        npy.write_bytes(npy_with_pickle(stream))
        outcomes["npy " + attempt(read_npy, npy, BadSample)] += 1
        raw.write_bytes(stream)
        zipped.write_bytes(torch_zip_with(stream, template.getvalue()))
        for path in (raw, zipped):
            outcomes["state file " + attempt(load_state_file, path, CheckpointReadError)] += 1
            attempt(check_pickle_file, path, CheckpointReadError)
        attempt(pickle_globals, stream, pickle.UnpicklingError)
        listed.write_bytes(zipped.read_bytes())
        seal(step_dir)  # listed with its true checksum: only the allowlist stands in the way
        outcomes["deepspeed file " + attempt(lambda p: load_listed_pickle(p, step_dir), listed, CheckpointReadError)] += 1
        assert not canary.exists(), stream

    run()
    check_count("pickle opcode streams", count, outcomes)
