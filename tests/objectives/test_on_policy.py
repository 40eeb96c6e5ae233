"""On-policy distillation (train.on_policy): λ = 0 is the off-policy step bit for bit, with λ = 1 every
teacher is given exactly the text the student sampled (and CE stays on the data text), a resumed run samples
what the uninterrupted one sampled (tests/train/test_on_policy.py), and what cannot work is refused by
validate."""

from __future__ import annotations

import pytest
import torch

from kvdistill.data import load_records
from kvdistill.errors import ConfigError, KvdistillError
from kvdistill.models.tokenization import continuation
from kvdistill.objectives import build_objective
from kvdistill.objectives.on_policy import OnPolicy
from kvdistill.teachers import OnlineTeacher

ON = ["train.on_policy.max_new_tokens=6"]


def loss_and_grads(objective, records):
    objective.zero_grad(set_to_none=True)
    loss, metrics = objective(records)
    loss.backward()
    return (
        loss.detach(),
        metrics,
        {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None},
    )


def test_lambda_0_is_the_off_policy_step_bit_for_bit(tiny_config):
    off = build_objective(tiny_config())
    zero = build_objective(tiny_config(*ON, "train.on_policy.lambda=0"))
    records = load_records(off.cfg.data)[:4]
    for step in range(3):  # three steps: the same draws never sample
        off.train_step = zero.train_step = step
        a, b = loss_and_grads(off, records), loss_and_grads(zero, records)
        assert torch.equal(a[0], b[0])
        assert {k: v for k, v in b[1].items() if not k.startswith("on_policy/")} == a[1]
        assert b[1]["on_policy/sampled"] == 0.0 and b[1]["on_policy/new_tokens"] == 0.0
        assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][n], b[2][n]) for n in a[2])


def test_lambda_1_teachers_see_exactly_the_sampled_text(tiny_config, monkeypatch):
    cfg = tiny_config(*ON, "train.on_policy.lambda=1", "train.on_policy.temperature=1.5")
    objective = build_objective(cfg)
    records = load_records(cfg.data)[:3]
    seen: list[tuple[str, list[str]]] = []  # (teacher, texts) of every teacher call
    kv = OnlineTeacher.kv

    def spy(self, recs, **kw):
        seen.append((self.name, [r["text"] for r in recs]))
        return kv(self, recs, **kw)

    monkeypatch.setattr(OnlineTeacher, "kv", spy)
    generated = []  # what generate returned, and the prompts it was given
    model = objective.student
    generate = model.generate

    def spy_generate(**kw):
        out = generate(**kw)
        generated.append((kw["input_ids"], kw["attention_mask"], out))
        return out

    monkeypatch.setattr(model, "generate", spy_generate)
    objective.train_step = 5
    _, metrics = objective(records)
    ((ids, mask, out),) = generated
    tok = objective.tokenizer
    sampled = []
    for b, r in enumerate(records):
        new = out[b, ids.shape[1] :].tolist()
        new = new[: new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new
        prompt = r["text"][: r["text"].index("\n") + 1]  # 'Question: ...\n'
        sampled.append(prompt + continuation(tok, ids[b][mask[b].bool()].tolist(), new))
        assert sampled[-1] != r["text"]
    assert seen == [
        ("qwen2", sampled),
        ("gemma3", sampled),
    ]  # each teacher once, on exactly the student's text
    assert metrics["on_policy/sampled"] == 1.0 and 0 < metrics["on_policy/new_tokens"] <= 3 * 6
    assert metrics["on_policy/generate_s"] > 0
    # CE is the data text's: the same as an off-policy objective's with the same weights
    off = build_objective(tiny_config())
    assert off(records)[1]["loss/ce"] == pytest.approx(metrics["loss/ce"], rel=1e-6)
    # sampling is a pure function of (seed, step, ids) and leaves the global generator alone
    state = torch.get_rng_state()
    again = OnPolicy(cfg.train.on_policy, seed=0, template=cfg.data.template, tokenizer=tok)
    assert [r["text"] for r in again.sample(model, records, 5)[0]] == sampled
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (
            ["teachers.0.source=cache", "teachers.0.cache_dir=x"],
            "cannot hold those of text the student generates",
        ),
        (["data.source=text", "data.path=x.txt", "data.size=null"], "data.source text has no question"),
        (
            ["train.on_policy.lambda=1", "train.teachers_ahead=true"],
            "every step scores the student's own text",
        ),
        (["train.on_policy.lambda=1.5"], "less than or equal to 1"),
    ],
)
def test_what_cannot_work_is_refused(tiny_config, overrides, problem):
    with pytest.raises(ConfigError, match=problem):
        tiny_config(*ON, *overrides)


def test_no_teachers_or_a_prompt_that_holds_the_answer_is_refused(tiny_config):
    from kvdistill.data.template import question_prompt

    with pytest.raises(ConfigError, match="no teachers to score the student's samples"):
        tiny_config(*ON, "teachers=[]")
    record = {"id": "r", "text": "Q: 2+2? A: 4", "question": "2+2?"}
    with pytest.raises(KvdistillError, match=r"puts \['answer'\] on or before the \{question\} line"):
        question_prompt(record, "Q: {question} A: {answer}")
    with pytest.raises(KvdistillError, match="record 'r' has no question"):
        question_prompt({"id": "r", "text": "x"}, "Question: {question}\n")
    from kvdistill.train.preflight import preflight

    checked = preflight(tiny_config(*ON, "data.template='Q: {question} A: {answer}'"))  # training's checks
    assert any("puts ['answer'] on or before the {question} line" in p for p in checked.problems)
    assert (
        question_prompt(
            {"id": "r", "text": "Question: 2+2?\nAnswer: 4\n", "question": "2+2?"},
            "Question: {question}\nAnswer: {answer}\n",
        )
        == "Question: 2+2?\n"
    )


def test_a_sample_ends_at_its_answer_line(tiny_config, monkeypatch):
    """The student's text ends where its answer line does (what greedy decoding reads as the answer): generate
    is given the stop that ends a row there, and whatever came after is cut; a row without an answer line
    keeps every token it sampled."""
    cfg = tiny_config(*ON, "train.on_policy.lambda=1", "train.on_policy.max_new_tokens=24")
    objective = build_objective(cfg)
    tok = objective.tokenizer
    records = load_records(cfg.data)[:2]
    tails = [  # the second the longest: no padding after it
        " 3 + 4 = 7.\nAnswer: 7\nQuestion: and more",
        " no answer here at all, only words and more words, and then words again",
    ]
    calls = []

    def scripted(input_ids, attention_mask, generation_config, stopping_criteria):
        """generate of the scripted tokens: the criteria asked after every token, a row they end then
        padded, the batch ended when all have ended or the script has run out."""
        calls.append(stopping_criteria)
        news = [tok(t, add_special_tokens=False)["input_ids"] for t in tails]
        pad = generation_config.pad_token_id
        ids, finished = input_ids, torch.zeros(len(news), dtype=torch.bool)
        for n in range(max(map(len, news))):
            col = [new[n] if n < len(new) and not finished[b] else pad for b, new in enumerate(news)]
            ids = torch.cat([ids, torch.tensor(col)[:, None]], dim=1)
            finished |= stopping_criteria(ids, None)
            if finished.all():
                break
        return ids

    model = objective.student
    monkeypatch.setattr(model, "generate", scripted)
    sampler = OnPolicy(cfg.train.on_policy, seed=0, template=cfg.data.template, tokenizer=tok)
    sampled, metrics = sampler.sample(model, records, 0)
    prompts = [r["text"][: r["text"].index("\n") + 1] for r in records]
    assert sampled[0]["text"] == prompts[0] + " 3 + 4 = 7.\nAnswer: 7\n"
    assert sampled[1]["text"] == prompts[1] + tails[1]
    answered = len(tok(" 3 + 4 = 7.\nAnswer: 7\n", add_special_tokens=False)["input_ids"])
    assert metrics["on_policy/new_tokens"] == answered + len(
        tok(tails[1], add_special_tokens=False)["input_ids"]
    )
    # the stop generate was given ends the first row after the same tokens, never the second
    ((stop,),) = calls
    ids = tok(prompts, return_tensors="pt", padding=True, padding_side="left")["input_ids"]
    news = [tok(t, add_special_tokens=False)["input_ids"] for t in tails]
    done_at = [None, None]
    for n in range(1, len(news[1]) + 1):
        col = torch.tensor([[new[n - 1] if n <= len(new) else tok.pad_token_id] for new in news])
        ids = torch.cat([ids, col], dim=1)
        done = stop(ids, None)
        done_at = [d if d is not None else (n if done[b] else None) for b, d in enumerate(done_at)]
    assert done_at == [answered, None]
