"""The second hostile-input round (issue 26), as a careless user and as an attacker: names that become paths,
`--out` pointing at the user's own files, planted symlinks, damaged checkpoints and data records, Rich markup
in paths, resource limits, a full disk, a stopped run, and what `validate` must refuse like `train`.

Every case asserts the exit code, that the message names the problem and the fix, and (`tree.only_inside`)
that nothing outside --out was written and nothing that existed before was changed or removed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct

import pytest
import yaml

from kvdistill.train import checkpoint as checkpoint_mod
from kvdistill.train import divergence, trainer
from kvdistill.train.trainer import train


@pytest.fixture(scope="module")
def finished(tiny_config, tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2 (never modified: tests copy it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config("train.save_every=1"), out, progress=False)
    return out


@pytest.fixture
def home(tmp_path):
    """tmp/work: the user's folder (a commented config, notes), tmp/outside: what no run may touch."""
    work = tmp_path / "work"
    (work / "notes").mkdir(parents=True)
    (work / "my.yaml").write_text("# my carefully commented config\nname: mine\n")
    (work / "notes" / "thesis.md").write_text("# my thesis\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_text("precious\n")
    return tmp_path


def copy_run(finished, root, name="run"):
    dest = root / name
    shutil.copytree(finished, dest, symlinks=True)
    return dest


def yaml_with(tiny_yaml, path, change) -> str:
    raw = yaml.safe_load(tiny_yaml.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


# ----------------------------------------------------------------------------------------- names become paths
@pytest.mark.parametrize("name", ["../escaped", "/tmp/abs-run", "..", "a/b", "x" * 101, "tab\there"])
def test_a_run_name_that_is_not_one_path_segment_is_refused(tiny_yaml, home, cli, tree, name):
    """The run `name` becomes DIR/<name> in a curriculum: `../` or an absolute name wrote whole runs
    outside."""
    before = tree.snap(home)
    for command in ("validate", "train"):
        args = [command, tiny_yaml, f"name={name}"] + (
            ["--out", home / "work" / "run"] if command == "train" else []
        )
        code, err = cli(*args)
        assert code == 2, err
        assert "name" in err and (
            "one path segment" in err or "at most 100" in err or "directory itself" in err
        )
        assert ("e.g." in err or "at most 100" in err) and "Traceback" not in err  # the fix, with the problem
    assert tree.snap(home) == before


def test_a_curriculum_stage_named_out_of_its_directory_is_refused(tiny_yaml, home, cli, tree):
    work = home / "work"
    stage = yaml_with(tiny_yaml, work / "stage.yaml", lambda r: r.update(name="../../outside/stage"))
    (work / "cur.yaml").write_text(yaml.safe_dump({"curriculum": [stage]}))
    before = tree.snap(home)
    code, err = cli("train", work / "cur.yaml", "--out", work / "cur")
    assert code == 2 and "name '../../outside/stage'" in err and "one path segment" in err, err
    tree.only_inside(before, tree.snap(home), "work/cur")
    assert not (work / "cur").exists()


def test_a_curriculum_stage_named_after_a_folder_of_the_users_is_refused(tiny_yaml, home, cli, tree):
    """A stage named after an existing folder overwrote its config.yaml and plan.json."""
    work = home / "work"
    (work / "cur" / "notes").mkdir(parents=True)
    (work / "cur" / "notes" / "config.yaml").write_text("# the user's own\n")
    (work / "cur" / "notes" / "plan.txt").write_text("the user's plan\n")
    stage = yaml_with(tiny_yaml, work / "stage.yaml", lambda r: r.update(name="notes"))
    (work / "cur.yaml").write_text(yaml.safe_dump({"curriculum": [stage]}))
    before = tree.snap(home)
    code, err = cli("train", work / "cur.yaml", "--out", work / "cur")
    assert code == 2, err
    assert "holds files that kvdistill did not write" in err and "fix:" in err
    assert tree.snap(home) == before


@pytest.mark.parametrize("entry", ["metrics.jsonl", "checkpoints"])
def test_a_planted_symlink_in_a_run_directory_is_refused(finished, home, cli, tree, entry, tiny_yaml):
    """A dangling metrics.jsonl symlink made training append outside the run directory."""
    run = copy_run(finished, home / "work")
    target = home / "outside" / "appended.jsonl"
    moved = home / "work" / "moved"
    (run / entry).rename(moved)
    (run / entry).symlink_to(target if entry == "metrics.jsonl" else home / "outside")
    before = tree.snap(home)
    code, err = cli("train", tiny_yaml, "--out", run, "--resume", "train.steps=3")
    assert code == 2, err
    assert (
        f"holds symlinks leading out of it ({entry} -> "
        f"{target if entry == 'metrics.jsonl' else home / 'outside'})" in err
    )
    assert "remove those symlinks" in err
    assert tree.snap(home) == before and not target.exists()


def test_metrics_are_never_appended_through_a_symlink(tmp_path):
    """The last line of defence, below the directory check: metrics.jsonl is opened with O_NOFOLLOW."""
    from kvdistill.errors import KvdistillError

    log = trainer.MetricsLog(tmp_path, enabled=True)
    (tmp_path / "metrics.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    with pytest.raises(KvdistillError, match="is a symlink"):
        log.write({"step": 1, "loss": 1.0})
    assert not (tmp_path / "elsewhere.jsonl").exists()


# --------------------------------------------------------------------------------------- the user's own files
def test_out_pointing_at_the_users_folder_is_refused(tiny_yaml, home, cli, tree, monkeypatch):
    """`train my.yaml --out .` replaced the user's commented config with the resolved dump."""
    work = home / "work"
    shutil.copy(tiny_yaml, work / "tiny.yaml")
    monkeypatch.chdir(work)
    before = tree.snap(home)
    code, err = cli("train", "tiny.yaml", "--out", ".")
    assert code == 2, err
    assert "--out . holds files that kvdistill did not write (my.yaml, notes, tiny.yaml)" in err
    assert "give --out a new or empty directory" in err
    assert tree.snap(home) == before


@pytest.mark.parametrize("kind", ["file", "dangling symlink", "under a file"])
def test_out_that_is_not_a_directory_is_refused(tiny_yaml, home, cli, tree, kind):
    work = home / "work"
    out = {
        "file": work / "my.yaml",
        "dangling symlink": work / "link",
        "under a file": work / "my.yaml" / "run",
    }[kind]
    if kind == "dangling symlink":
        out.symlink_to(home / "outside" / "nothing")
    before = tree.snap(home)
    code, err = cli("train", tiny_yaml, "--out", out)
    assert code == 2, err
    expected = {
        "file": "is a file, not a directory",
        "dangling symlink": "which does not exist",
        "under a file": "which is a file, not a directory",
    }[kind]
    assert expected in err and "fix:" in err
    assert tree.snap(home) == before


# ------------------------------------------------------------------------------------------ damaged state
def _flip(path, offset_from_end: int = 64, mask: int = 0x01) -> None:
    """Flip one bit near the end of `path` (inside the last tensor's data): same size, valid format."""
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= mask
    path.write_bytes(bytes(data))


def _nan_fill(path) -> None:
    """Overwrite the data of every tensor of a safetensors file with 0xFF bytes (NaN): same size."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n :] = b"\xff" * (len(data) - 8 - n)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["model bit", "optimizer bit", "model NaN"])
def test_a_damaged_checkpoint_is_named_as_damage_and_the_intact_one_resumes(
    finished, home, cli, tree, tiny_yaml, damage, caplog
):
    """A same-size bit flip resumed with exit 0 to a different model; a larger one was reported as divergence,
    the good checkpoint renamed .diverged, and the user told to lower the lr."""
    run = copy_run(finished, home / "work")
    state = run / "checkpoints" / "step-2" / "state"
    if damage == "model bit":
        name, path = "state/model.safetensors", state / "model.safetensors"
        _flip(path)
    elif damage == "optimizer bit":
        name, path = "state/optimizer.bin", state / "optimizer.bin"
        _flip(path, offset_from_end=200)
    else:
        name, path = "state/model.safetensors", state / "model.safetensors"
        _nan_fill(path)
    before = tree.snap(home)
    code, err = cli("train", tiny_yaml, "--out", run, "--resume", "train.steps=3")
    assert code == 0, err
    warned = caplog.text
    assert (
        f"checkpoint {run / 'checkpoints' / 'step-2'} is damaged ({name} is damaged: its sha256 is" in warned
    )
    assert "when saved): not resumed from" in warned
    assert f"resuming {run} from {run / 'checkpoints' / 'step-1'}, the newest intact checkpoint" in warned
    assert "diverge" not in err + warned and "lower" not in err
    after = tree.snap(home)
    assert not any(".diverged" in p for p in after)
    outside = {k: v for k, v in before.items() if not k.startswith("work/run")}
    assert {k: v for k, v in after.items() if not k.startswith("work/run")} == outside


def test_a_damaged_data_record_refuses_the_resume(finished, home, cli, tree, tiny_yaml):
    """A damaged data.json let --resume train on changed data."""
    run = copy_run(finished, home / "work")
    intact = (run / "data.json").read_text()
    for content, found in (("{not json", "cannot be read"), (None, "its content hash is")):
        if content is None:
            data = json.loads(intact)
            data["train"]["records"] += 1
            content = json.dumps(data)
        (run / "data.json").write_text(content)
        before = tree.snap(home)
        code, err = cli("train", tiny_yaml, "--out", run, "--resume", "train.steps=3")
        assert code == 2, err
        assert f"{run / 'data.json'}, the record of the data the run in {run} started with, is damaged" in err
        assert found in err and f"restore {run / 'data.json'}" in err
        assert tree.snap(home) == before


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("losses.kv.weight=.inf", "losses.kv.weight"),
        ("train.weight_decay=.inf", "train.weight_decay"),
        ("teachers.0.weight=.nan", "teachers[0].weight"),
    ],
)
def test_a_non_finite_weight_or_decay_is_refused_not_blamed_on_the_lr(
    tiny_yaml, home, cli, tree, override, key
):
    before = tree.snap(home)
    for command in ("validate", "train"):
        extra = ["--out", home / "work" / "run"] if command == "train" else []
        code, err = cli(command, tiny_yaml, override, *extra)
        assert code == 2, err
        assert f"'{key}' = " in err and "finite number" in err and "lr" not in err.replace("lr=", "")
    assert tree.snap(home) == before


def test_divergence_advice_names_non_finite_weights(tiny_yaml, home, cli, monkeypatch):
    """Weights made non-finite before step 2: the message says so instead of only 'lower the lr'."""
    import torch

    step = trainer.optimizer_step

    def poisoned(run, i):
        if i == 1:
            with torch.no_grad():
                next(run.inner.parameters()).fill_(float("nan"))
        return step(run, i)

    monkeypatch.setattr(trainer, "optimizer_step", poisoned)
    code, err = cli("train", tiny_yaml, "--out", home / "work" / "run")
    assert code == 2, err
    assert "cause: non-finite weights before the step (student." in err


def test_divergence_advice_names_non_finite_cached_inputs(tmp_path):
    """Teacher K/V from a cache holding inf: the advice names the cache, not the lr."""
    from types import SimpleNamespace

    import torch

    from kvdistill.cache import CacheReader, CacheWriter, make_meta
    from kvdistill.compress import Compression

    meta = make_meta(
        "org/t",
        {"num_layers": 1, "num_kv_heads": 1, "head_dim": 2},
        "tok",
        Compression(kind="full", dtype="float32").to_dict(),
        "data",
    )
    with CacheWriter(tmp_path / "c", meta, shard_size=2) as w:
        for i, value in enumerate((1.0, float("inf"))):
            w.add(
                f"s{i}",
                {
                    "token_ids": torch.arange(2),
                    "positions": torch.arange(2),
                    "spans": torch.tensor([[0, 1], [1, 2]]),
                    "keys_l0": torch.full((1, 2, 2), value),
                    "values_l0": torch.ones(1, 2, 2),
                },
            )
    run = SimpleNamespace(
        inner=SimpleNamespace(
            teachers=[SimpleNamespace(name="t", kind="cache", reader=CacheReader(tmp_path / "c"))]
        )
    )
    assert divergence.nonfinite_inputs(run, ["s0"]) == []
    assert divergence.nonfinite_inputs(run, ["s0", "s1"]) == [
        f"teacher 't' (cache {tmp_path / 'c'}), sample 's1': keys_l0"
    ]


# -------------------------------------------------------------------------------------- markup, limits, stops
def test_square_brackets_in_paths_and_values_are_printed_verbatim(finished, tiny_yaml, home, cli):
    """A path containing `[/x]` crashed the CLI after a run had completed; `[red]` or `[inf, 1.0]`
    vanished."""
    out = home / "work" / "runs[/x]" / "[red]run"
    code, err = cli("train", tiny_yaml, "--out", out, "train.steps=1")
    assert code == 0, err
    assert f"done {out}:" in err and (out / "final" / "config.json").is_file()
    code, err = cli("validate", tiny_yaml, "train.lr=[inf, 1.0]", "teachers.0.model=/tmp/[red]x[/x]")
    assert code == 2, err
    assert "'train.lr' = ['inf', 1.0]" in err and "model path '/tmp/[red]x[/x]' does not exist" in err
    from kvdistill.config import apply_overrides

    # an override value that is not YAML (a yaml.ParserError traceback) is the text itself
    assert apply_overrides({}, ["data.path=[red]x.jsonl"]) == {"data": {"path": "[red]x.jsonl"}}


def test_a_compression_budget_above_the_text_length_is_refused(tiny_yaml, home, cli, tree):
    """budget 100000 on 48-token texts padded every kept K/V to the budget (20 GB of RAM); validate said
    ok."""
    before = tree.snap(home)
    args = ("teachers.0.compression.kind=rkv", "teachers.0.compression.budget=100000", "data.max_length=48")
    for command in ("validate", "train"):
        code, err = cli(
            command, tiny_yaml, *args, *(["--out", home / "work" / "run"] if command == "train" else [])
        )
        assert code == 2, err
        assert "teachers.0.compression.budget (100000) is more than data.max_length (48)" in err
        assert "set a budget of at most 48" in err
    assert tree.snap(home) == before


def test_a_full_disk_during_training_is_named_with_the_fix(tiny_yaml, home, cli, tree, monkeypatch):
    """ENOSPC in a checkpoint write gave a raw traceback that never said 'disk'."""
    real = checkpoint_mod.torch.save

    def full(obj, path, *a, **kw):
        if "step-2" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(obj, path, *a, **kw)

    monkeypatch.setattr(checkpoint_mod.torch, "save", full)
    run = home / "work" / "run"
    before = tree.snap(home)
    code, err = cli("train", tiny_yaml, "--out", run, "train.save_every=1")
    assert code == 2, err
    assert f"the disk holding {run} is full: no space left on the device" in err
    assert f"the newest intact checkpoint is {run / 'checkpoints' / 'step-1'}" in err
    assert "then rerun the same command with --resume" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]  # no half-written step-2
    tree.only_inside(before, tree.snap(home), "work/run")
    monkeypatch.setattr(checkpoint_mod.torch, "save", real)
    code, err = cli("train", tiny_yaml, "--out", run, "train.save_every=1", "--resume")
    assert code == 0, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_run_says_how_to_resume(tiny_yaml, home, cli, tree, monkeypatch, signum):
    step = trainer.optimizer_step

    def stopped(run, i):
        if i == 1:
            os.kill(os.getpid(), signum)
        return step(run, i)

    monkeypatch.setattr(trainer, "optimizer_step", stopped)
    run = home / "work" / "run"
    before = tree.snap(home)
    code, err = cli("train", tiny_yaml, "--out", run)
    assert code == 128 + signum, err
    assert (
        f"stopped by {signal.Signals(signum).name}; to continue from the last checkpoint, run: kvdistill "
        "train" in err
    )
    assert f"--out {run} --resume" in err
    assert not (run / ".train.holder.json").exists()  # the lock was given back
    tree.only_inside(before, tree.snap(home), "work/run")


# ------------------------------------------------------------------------------------------ validate == train
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.seed=-1", "'train.seed' = -1: Input should be greater than or equal to 0"),
        (
            "data.max_length=300",
            "data.max_length = 300 is longer than the maximum positions of teacher 'qwen2' "
            "(256), teacher 'gemma3' (256); set data.max_length to at most 256",
        ),
        ("teachers.0.name=" + "t" * 120, "teacher name is 120 bytes long"),
    ],
)
def test_validate_refuses_what_train_refuses(tiny_yaml, home, cli, tree, override, expected):
    before = tree.snap(home)
    for command in ("validate", "train"):
        code, err = cli(
            command, tiny_yaml, override, *(["--out", home / "work" / "run"] if command == "train" else [])
        )
        assert code == 2, (command, err)
        assert expected in err and "Traceback" not in err
    assert tree.snap(home) == before


def test_invalid_utf8_prompt_and_text_are_clear_errors(finished, cli):
    bad = b"caf\xff".decode("utf-8", "surrogateescape")  # what Python makes of a non-UTF-8 argv
    code, err = cli("generate", finished, "--prompt", bad)
    assert code == 2 and "--prompt is not valid UTF-8 text (byte(s) ff at character 3)" in err, err
    code, err = cli("inspect", "gpt2-tokenizer", "--text", bad)
    assert code == 2 and "--text is not valid UTF-8 text" in err and "fix:" in err, err


def test_eval_max_length_and_generate_length_are_bounded(finished, cli):
    code, err = cli("eval", finished, "--max-length", "1")
    assert (
        code == 2
        and "--max-length 1: a text of fewer than 2 tokens" in err
        and "--max-length 2 or more" in err
    )
    code, err = cli("generate", finished, "--prompt", "Question: 1+1?", "--max-new-tokens", "100000000")
    assert code == 2, err
    assert "--max-new-tokens 100000000 after a" in err and "runs past the model's" in err
    assert "pass --max-new-tokens" in err
