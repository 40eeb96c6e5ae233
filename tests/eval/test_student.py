"""The one evaluation path: `kvdistill eval` and the experiment runner give a saved latent student the same
latent-mode figures, to the last digit, because both call `kvdistill.eval.student.evaluate_saved`."""

from __future__ import annotations

import json

import pytest

from kvdistill.config import load_config
from kvdistill.data import load_records

LATENT_RUN = {
    "name": "latent",
    "student": {
        "from_config": {
            "base": "smollm2-135m",
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "max_position_embeddings": 256,
        },
        "tokenizer": "gpt2-tokenizer",
        "latent": {"tokens": 3, "iterations": 1},
    },
    "data": {"source": "arithmetic", "size": 40, "eval_size": 5, "max_length": 96},
    "losses": {"ce": 1.0},
    "train": {"steps": 2, "batch_size": 4, "lr": 3.0e-3, "tensorboard": False},
}


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    from kvdistill.train.trainer import train

    run = tmp_path_factory.mktemp("latent") / "run"
    cfg = load_config(raw=LATENT_RUN)
    train(cfg, run, progress=False)
    return run, cfg


def test_kvdistill_eval_of_a_latent_run_equals_the_runners_record(latent_run):
    from typer.testing import CliRunner

    from kvdistill.cli import app
    from kvdistill.experiments.score import evaluate_run
    from kvdistill.experiments.spec import ExperimentSpec
    from kvdistill.rundir import student_dir

    run, cfg = latent_run
    spec = ExperimentSpec.model_validate(
        {
            "name": "t",
            "base": LATENT_RUN,
            "conditions": {"a": {}},
            "baseline": "a",
            "eval": {"max_new_tokens": 3, "batch_size": 2},
        }
    )
    record = evaluate_run(student_dir(run / "final"), load_records(cfg.data, split="eval"), cfg, spec)
    got = CliRunner().invoke(app, ["eval", str(run), "--json", "--max-new-tokens", "3", "--batch-size", "2"])
    assert got.exit_code == 0, got.output
    cli = json.loads(got.output[got.output.index("{") :])
    assert cli["mode"] == "latent" and cli["samples"] == 5 and cli["probe_kv_error"] == {}
    em = cli["exact_match"]
    assert em["n"] == len(record["per_item"]) == 5
    for key in ("exact_match", "per_item", "gen_tokens", "latent_passes", "latent_tokens"):
        assert em[key] == record[key], key
    assert [s["generated"] for s in em["samples"]] == [s["generated"] for s in record["samples"]]
    assert (em["latent_tokens"], em["latent_passes"]) == (3, 2)
    swap = cli["latent_swap"]  # the swap probe: each question answered from another one's latents
    assert (swap["per_item"], swap["follows"]) == (record["swap_per_item"], record["swap_follows"])
    assert swap["n"] == 5 and all(s["donor"] != s["id"] for s in swap["samples"])
    table = CliRunner().invoke(app, ["eval", str(run), "--max-new-tokens", "3", "--batch-size", "2"])
    assert "swap probe" in table.output
    # the answer CE after the latents, computed (not read from training's summary) and equal to the last digit
    assert cli["perplexity"]["ce"] == record["ce"] and cli["perplexity"]["ppl"] == record["ppl"]
    assert cli["perplexity"]["tokens"] == record["tokens"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert record["ce"] == pytest.approx(
        summary["eval/ce"], rel=1e-4
    )  # training's own held-out CE, same loop
