"""Held-out metrics: perplexity vs a per-sample loop, exact match by greedy generation, KV errors per
layer."""

from __future__ import annotations

import math

import pytest
import torch

from kvdistill.config import DataConfig, parse_config
from kvdistill.data import load_records
from kvdistill.data.template import make_record
from kvdistill.eval.decode import exact_match
from kvdistill.eval.heldout import perplexity
from kvdistill.eval.metrics import TeacherRowsCache, probe_kv_error

MAX_LENGTH = 32
TEMPLATE = "Question: {question}\nAnswer: {answer}"


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    from kvdistill.models.load import load_tokenizer

    return load_tokenizer("gpt2-tokenizer")


@pytest.fixture(scope="module")
def gsm():
    """(probe-fit records, 4 held-out records) of generated GSM-Symbolic problems."""
    cfg = DataConfig(size=20, eval_size=4, max_length=MAX_LENGTH)
    return load_records(cfg, split="train"), load_records(cfg, split="eval")


def brute_force_ppl(model, tokenizer, texts: list[str], max_length: int) -> tuple[float, int]:
    """exp(mean NLL) over every predicted token, one sample and one position at a time."""
    nll, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # (T, V)
        for t in range(len(ids) - 1):
            nll -= float(torch.log_softmax(logits[t], -1)[ids[t + 1]])
            count += 1
    return math.exp(nll / count), count


# ------------------------------------------------------------------------------------------------ perplexity
def test_perplexity_equals_per_sample_loop_for_any_batch_size(smollm2, gsm):
    model, tok = smollm2
    _, held = gsm
    records = held + [{"id": "short", "text": "Hi."}, {"id": "mid", "text": "Two plus two is four."}]
    ref_ppl, ref_count = brute_force_ppl(model, tok, [r["text"] for r in records], MAX_LENGTH)
    assert ref_count < len(records) * (MAX_LENGTH - 1)  # the short texts give right padding in a batch
    tok.padding_side = "left"  # the metric pads on the right whatever the tokenizer says
    try:
        results = [perplexity(model, tok, records, max_length=MAX_LENGTH, batch_size=b) for b in (1, 4, 6)]
    finally:
        tok.padding_side = "right"
    for r in results:
        assert r["tokens"] == ref_count
        assert r["ppl"] == pytest.approx(ref_ppl, rel=1e-4)
        assert r["ce"] == pytest.approx(math.log(ref_ppl), abs=1e-4)
    assert 1.5 < ref_ppl < 100  # a real model on GSM text: far below its 49k vocabulary


# ------------------------------------------------------------------------------------------------ exact match
class ScriptedLM(torch.nn.Module):
    """Greedy 'generation' that appends a scripted continuation to each prompt (left-padded batches)."""

    def __init__(self, tokenizer, script: dict[str, str]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.script = tokenizer, script
        self.prompts: list[str] = []
        self.masks: list[torch.Tensor] = []

    def generate(
        self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id, stopping_criteria=None
    ):
        assert not do_sample  # the whole script whatever the criteria say: stopping early only saves tokens
        self.masks.append(attention_mask)
        new = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            self.prompts.append(prompt)
            new.append(self.tokenizer(self.script[prompt])["input_ids"][:max_new_tokens])
        width = max(len(n) for n in new)
        tail = torch.tensor([n + [pad_token_id] * (width - len(n)) for n in new])  # (B, new) right-padded
        return torch.cat([input_ids, tail], dim=1)


def test_exact_match_reads_the_first_generated_line(gpt2_tokenizer):
    questions = [
        "How many apples?",
        "What is 6 times 7, given that the farmer sold 3 of them?",
        "Cost?",
        "Age?",
        "Free text?",
    ]
    golds = ["12", "42", "1000", "7", None]
    records = [
        make_record(f"r{i}", q, None, a, TEMPLATE)
        for i, (q, a) in enumerate(zip(questions, golds, strict=True))
    ]
    script = {
        "Question: How many apples?\nAnswer:": " 12\nQuestion: 13",  # right; the next line is not read
        "Question: What is 6 times 7, given that the farmer sold 3 of them?\nAnswer:": " 41",  # wrong
        "Question: Cost?\nAnswer:": " $1,000.00 in total",  # right: numbers compare as numbers
        "Question: Age?\nAnswer:": "",  # wrong: nothing generated (end of text at once)
    }
    model = ScriptedLM(gpt2_tokenizer, script)
    out = exact_match(model, gpt2_tokenizer, records, batch_size=2)
    assert (out["n"], out["correct"], out["exact_match"]) == (4, 2, 0.5)  # the answer-less record is skipped
    assert [s["pred"] for s in out["samples"]] == ["12", "41", "1000", None]
    assert [s["correct"] for s in out["samples"]] == [True, False, True, False]
    # prompts end at "Answer:" (no trailing space), never contain the answer; batches are left-padded
    assert sorted(model.prompts) == sorted(script)
    assert model.masks[0][0, 0] == 0 and model.masks[0][1].all()
    assert gpt2_tokenizer.padding_side == "right"  # restored
    assert exact_match(model, gpt2_tokenizer, records[-1:])["exact_match"] is None


def test_greedy_batch_with_left_padding_equals_one_by_one(smollm2, gsm):
    model, tok = smollm2
    _, held = gsm
    batched = exact_match(model, tok, held, batch_size=4, max_new_tokens=10)
    alone = exact_match(model, tok, held, batch_size=1, max_new_tokens=10)
    lengths = {len(tok(r["text"][: r["answer_start"]].rstrip())["input_ids"]) for r in held}
    assert len(lengths) > 1  # prompts of different lengths: the batch really is padded
    assert [s["generated"] for s in batched["samples"]] == [s["generated"] for s in alone["samples"]]
    # SmolLM2-Instruct reads the answer off the reasoning in the prompt: golden 4/4 on these problems
    assert (batched["correct"], batched["n"]) == (4, 4)


# ------------------------------------------------------------------------------------------------ KV errors
def test_probe_error_is_zero_against_itself_and_positive_against_another_model(smollm2, gemma3, gsm):
    fit, held = gsm
    (s_model, s_tok), (t_model, t_tok) = smollm2, gemma3
    self_err = probe_kv_error(s_model, s_tok, s_model, s_tok, fit, held, max_length=MAX_LENGTH)
    other_err = probe_kv_error(s_model, s_tok, t_model, t_tok, fit, held, max_length=MAX_LENGTH)
    assert len(self_err) == len(other_err) == 30  # one per student layer
    assert max(self_err) < 0.01
    assert min(other_err) > 0.2


def reference_probe(student, s_tok, teacher, t_tok, fit, held, *, max_length, batch_size=8, ridge=1e-2):
    """The probe as it was before teacher rows were shared: both models run on every batch of every call."""
    from kvdistill.align.layers import layer_map
    from kvdistill.align.tokens import teacher_alignment
    from kvdistill.models.capture import capture_kv
    from kvdistill.models.geometry import geometry_of

    L_s, L_t = geometry_of(student).num_layers, geometry_of(teacher).num_layers
    matrix = layer_map(L_s, L_t, strategy="ratio", interpolate=False)
    rows = {}
    for split, records in (("fit", fit), ("eval", held)):
        xs = {(i, kind): [] for i in range(L_s) for kind in "kv"}
        ys = {(i, kind): [] for i in range(L_s) for kind in "kv"}
        for start in range(0, len(records), batch_size):
            texts = [r["text"] for r in records[start : start + batch_size]]
            s = capture_kv(student, s_tok, texts, max_length=max_length, padding_side="right")
            t = capture_kv(teacher, t_tok, texts, max_length=max_length, padding_side="right")
            A = teacher_alignment(t.spans, t.attention_mask, s.spans, s.attention_mask)  # (B, T_t, T_s)
            covered = (A.sum(-1) > 0) & t.attention_mask.bool()  # (B, T_t)
            for i in range(L_s):
                j = int(matrix[i].argmax())
                for kind, src, dst in (("k", s.keys[i], t.keys[j]), ("v", s.values[i], t.values[j])):
                    xs[i, kind].append(torch.einsum("bmt,bhtd->bmhd", A, src.float()).flatten(2)[covered])
                    ys[i, kind].append(dst.float().transpose(1, 2).flatten(2)[covered])
        rows[split] = {key: (torch.cat(xs[key]), torch.cat(ys[key])) for key in xs}
    out = []
    for i in range(L_s):
        errs = []
        for kind in "kv":
            (X, Y), (Xe, Ye) = rows["fit"][i, kind], rows["eval"][i, kind]
            x_mu, y_mu = X.mean(0), Y.mean(0)
            Xc, Yc = X - x_mu, Y - y_mu
            scale = Xc.square().mean().clamp(min=1e-12)
            gram = Xc.T @ Xc + ridge * scale * len(X) * torch.eye(X.shape[1], dtype=X.dtype)
            W = torch.linalg.solve(gram, Xc.T @ Yc)
            resid = ((Xe - x_mu) @ W + y_mu - Ye).square().sum()
            errs.append(float(resid / (Ye - Ye.mean(0)).square().sum().clamp(min=1e-12)))
        out.append(sum(errs) / 2)
    return out


@pytest.fixture(scope="module")
def tiny_llamas(gpt2_tokenizer):
    """Random llamas of 2 and 4 layers with the GPT-2 tokenizer: students of another tokenizer and depth."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = gpt2_tokenizer
    out = {}
    for layers in (2, 4):
        config = AutoConfig.for_model(
            "llama",
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(layers)
        out[layers] = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval(), tok
    return out


def test_shared_teacher_rows_give_the_same_figures_and_run_the_teacher_once(gemma3, tiny_llamas, gsm):
    fit, held = gsm
    t_model, t_tok = gemma3  # 18 layers: the 4-layer student reads layers 0, 6, 11, 17, the 2-layer one 0, 17
    batches = math.ceil(len(fit) / 8) + math.ceil(len(held) / 8)
    ref = {
        n: reference_probe(*tiny_llamas[n], t_model, t_tok, fit, held, max_length=MAX_LENGTH) for n in (2, 4)
    }

    def probe(n, cache=None):
        return probe_kv_error(*tiny_llamas[n], t_model, t_tok, fit, held, max_length=MAX_LENGTH, cache=cache)

    calls = []
    hook = t_model.get_input_embeddings().register_forward_hook(lambda *_: calls.append(1))  # once a forward
    try:
        assert probe(2) == ref[2]
        assert len(calls) == batches  # without a cache: the teacher runs on every batch of every call
        calls.clear()
        cache = TeacherRowsCache()
        for n in (4, 2, 4):
            assert probe(n, cache) == ref[n]  # bit-identical to the per-call path
        assert len(calls) == batches  # the teacher ran once for three students
        # a shallower student first keeps only its teacher layers; a deeper one recaptures their union once
        calls.clear()
        cache = TeacherRowsCache()
        assert probe(2, cache) == ref[2]
        rows = cache.rows(t_model, t_tok, held, max_length=MAX_LENGTH, batch_size=8, layers=[0])
        assert rows.layers == [0, 17] and len(calls) == batches
        assert probe(4, cache) == ref[4] and probe(2, cache) == ref[2]
        rows = cache.rows(t_model, t_tok, held, max_length=MAX_LENGTH, batch_size=8, layers=[0])
        assert rows.layers == [0, 6, 11, 17]
        assert len(calls) == 2 * batches
    finally:
        hook.remove()


@pytest.fixture()
def objective(smollm2):
    """SmolLM2 as its own student and as three teachers: the same layers, shifted by one, and a 50/50 mix."""
    from kvdistill.objectives import TextObjective
    from kvdistill.teachers import OnlineTeacher

    model, tok = smollm2
    L = 30
    maps = {
        "same": [i if i % 3 else -1 for i in range(L)],  # every third layer unsupervised
        "shifted": [i + 1 for i in range(L - 1)] + [-1],
        "mixed": [[i, i + 1] for i in range(L - 1)] + [-1],
    }
    cfg = parse_config(
        {
            "student": {"model": "smollm2-135m"},
            "teachers": [
                {
                    "name": n,
                    "model": "smollm2-135m",
                    "projector": "identity",
                    "layer_map": {"strategy": "explicit", "explicit": m},
                }
                for n, m in maps.items()
            ],
            "data": {"max_length": MAX_LENGTH},
        }
    )
    grad = [p.requires_grad for p in model.parameters()]
    teachers = [OnlineTeacher(n, model, tok) for n in maps]
    yield TextObjective(cfg, model, tok, teachers, "cpu")
    model.eval()
    for p, g in zip(model.parameters(), grad, strict=True):
        p.requires_grad_(g)


def test_trained_map_error_per_mapped_layer(objective, smollm2, gsm):
    _, held = gsm
    out = objective.evaluate(held, batch_size=2)
    same, shifted, mixed = (out[f"eval/kv_error_layers/{n}"] for n in ("same", "shifted", "mixed"))
    assert len(same) == len(shifted) == len(mixed) == 30  # one entry per student layer
    assert [i for i, v in enumerate(same) if v is None] == list(range(0, 30, 3))
    assert shifted[-1] is None and mixed[-1] is None
    assert max(v for v in same if v is not None) < 1e-6  # the teacher itself through identity maps
    assert out["eval/kv_error/same"] < 1e-6
    assert min(shifted[:-1]) > 0.01
    # layer weights as in training: 0.5 · err(layer i, itself) + 0.5 · err(layer i, layer i+1)
    assert mixed[:-1] == pytest.approx([0.5 * v for v in shifted[:-1]], rel=1e-4)
    assert out["eval/kv_error/shifted"] == pytest.approx(sum(shifted[:-1]) / 29)
    # the CE the objective reports is the perplexity metric's
    ref = perplexity(*smollm2, held, max_length=MAX_LENGTH)
    assert out["eval/ce"] == pytest.approx(ref["ce"], rel=1e-5)


def test_target_space_reports_ce_only(objective, gsm):
    from kvdistill.objectives import TextObjective

    cfg = objective.cfg.model_copy(deep=True)
    cfg.fusion.space = "target"
    target = TextObjective(cfg, objective.student, objective.tokenizer, objective.teachers, "cpu")
    out = target.evaluate(gsm[1][:2], batch_size=2)
    assert set(out) == {"eval/ce", "eval/ppl"}
    assert out["eval/ppl"] == pytest.approx(math.exp(out["eval/ce"]))


@pytest.mark.parametrize("name", ["llama2-tokenizer", "smollm2-135m", "gpt2-tokenizer", "gemma3-270m"])
def test_continuation_is_the_gold_answer_text_for_every_tokenizer(name):
    """Split a tokenized training text at the answer: the continuation of the prompt's ids decodes to exactly
    the text after the prompt (the answer, with its leading space), whatever the tokenizer."""
    from kvdistill.config.schema import DataConfig
    from kvdistill.models.load import load_tokenizer
    from kvdistill.models.tokenization import continuation

    tok = load_tokenizer(name)
    for r in load_records(DataConfig(source="arithmetic", size=30, eval_size=10), "eval"):
        prompt_text = r["text"][: r["answer_start"]].rstrip()
        prompt = tok(prompt_text).input_ids
        whole = tok(r["text"]).input_ids
        assert whole[: len(prompt)] == prompt, "the prompt's ids are a prefix of the text's"
        got = continuation(tok, prompt, whole[len(prompt) :])
        assert got.strip() == r["text"][len(prompt_text) :].strip() == r["answer"]
