import itertools
import random

import pytest
import torch
import torch.nn as nn

import labkit
from labkit import capstone, check, early_exit, evaluation, prune, quant
from labkit.model import LabGPT, get_config
from labkit.solutions import capstone as solution

TOKENIZER = labkit.CharTokenizer()
TEXT = labkit.data.corpus(2 * 128 + 1, seed=5)  # two nano-sized windows


@pytest.fixture
def nano_pair():
    """A nano teacher (3 layers) and a nano student (2 layers), seeded; with untrained exit heads."""
    torch.manual_seed(0)
    teacher = LabGPT(get_config("nano", n_layer=3)).eval()
    student = LabGPT(get_config("nano")).eval()
    return teacher, student, early_exit.ExitHeads(student).eval()


def nano_stack(nano_pair, steps=capstone.STEPS, **kwargs):
    teacher, student, heads = nano_pair
    options = dict(teacher=teacher, student=student, exit_heads=heads, recover_steps=0, progress=False)
    return capstone.build_stack(steps, **{**options, **kwargs})


# -- arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"steps": ("prune", "distill")}, "steps"),  # out of order
        ({"steps": ("distill", "distill")}, "steps"),
        ({"steps": ("distil",)}, "steps"),
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"structure": "rows"}, "structure"),
        ({"structure": "2:4", "sparsity": 0.25}, "sparsity"),
        ({"scheme": "int2"}, "scheme"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"k": 0}, "k"),
        ({"recover_steps": -1}, "recover_steps"),
        ({"teacher": "huge"}, "model"),
    ],
)
def test_bad_stack_arguments_name_the_argument_and_its_range(kwargs, name):
    with pytest.raises(ValueError, match=name):
        capstone.build_stack(**{"progress": False, **kwargs})


def test_early_exit_without_heads_says_how_to_get_them(nano_pair):
    teacher, student, _ = nano_pair
    with pytest.raises(ValueError, match="exit heads"):
        capstone.build_stack(("early_exit",), teacher=teacher, progress=False)


# -- building the stack -------------------------------------------------------------------


def test_each_step_applies_to_the_previous_one_and_leaves_the_inputs_alone(nano_pair):
    teacher, student, heads = nano_pair
    before = {k: v.clone() for k, v in student.state_dict().items()}
    stacks = nano_stack(nano_pair, sparsity=0.5, structure="neurons", scheme="int8_weight_only", threshold=0.5, k=3)
    assert [s.name for s in stacks] == ["teacher (teacher)", "+ distill", "+ prune", "+ quantize", "+ early exit",
                                        "+ speculate"]  # fmt: skip
    assert stacks[-1].steps == capstone.STEPS and stacks[2].steps == ("distill", "prune")
    assert stacks[0].model is teacher and stacks[1].model is student
    assert all(b.mlp.c_fc.out_features == 64 for b in stacks[2].model.transformer.h)  # 128 hidden neurons, half kept
    assert isinstance(stacks[3].model.transformer.h[0].mlp.c_fc, quant.Int8WeightOnlyLinear)
    assert isinstance(stacks[2].model.transformer.h[0].mlp.c_fc, nn.Linear)  # quantizing made a copy
    assert stacks[4].heads is heads and stacks[4].threshold == 0.5 and stacks[4].target is None
    assert stacks[5].target is teacher and stacks[5].k == 3 and stacks[5].model is stacks[3].model
    assert stacks[5].record == {"base": None, "sparsity": 0.5, "structure": "neurons", "recover_steps": 0,
                                "scheme": "int8_weight_only", "threshold": 0.5, "k": 3}  # fmt: skip
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    # the speculating stack holds the draft, its exit heads and the teacher
    parts = [stacks[3].model, heads, teacher]
    assert stacks[5].weight_bytes() == sum(quant.weight_bytes(m) for m in parts)
    assert stacks[3].weight_bytes() < stacks[2].weight_bytes() < stacks[1].weight_bytes()


def test_steps_can_be_skipped(nano_pair):
    stacks = nano_stack(nano_pair, steps=("quantize", "speculate"), scheme="w8a8")
    assert [s.steps for s in stacks] == [(), ("quantize",), ("quantize", "speculate")]
    assert stacks[1].model.config.n_layer == 3  # no distillation: the teacher itself was quantized
    assert isinstance(stacks[1].model.transformer.h[0].attn.c_attn, quant.W8A8Linear)


def test_unstructured_pruning_becomes_plain_linears_with_the_same_output(nano_pair):
    _, student, _ = nano_pair
    masked = prune.prune_model(student, 0.5, "unstructured")
    plain = capstone.plain_linears(prune.prune_model(student, 0.5, "unstructured"))
    assert not any(isinstance(m, prune.MaskedLinear) for m in plain.modules())
    assert prune.weight_sparsity(plain) == pytest.approx(0.5, abs=1e-3)
    idx = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(plain(idx), masked(idx))
    stacks = nano_stack(nano_pair, steps=("distill", "prune", "quantize"), structure="unstructured")
    assert isinstance(stacks[-1].model.transformer.h[1].mlp.c_proj, quant.Int8WeightOnlyLinear)


# -- early exit as a model ----------------------------------------------------------------


def test_early_exit_lm_with_threshold_one_is_the_model(nano_pair):
    _, student, heads = nano_pair
    idx = torch.randint(0, 128, (2, 20))
    lm = capstone.EarlyExitLM(student, heads, 1.0)
    with torch.no_grad():
        # one position at a time with a cache vs all at once: equal up to float summation order
        torch.testing.assert_close(lm(idx), student(idx), rtol=1e-4, atol=1e-5)
    assert lm.layers_used == [2] * 40
    assert evaluation.perplexity(lm, TOKENIZER, TEXT) == pytest.approx(evaluation.perplexity(student, TOKENIZER, TEXT))


@pytest.mark.parametrize("structure", ["neurons", "heads"])
def test_early_exit_lm_makes_the_choices_early_exit_generation_makes(structure):
    """Oracle: early_exit.generate from a one-token prompt exits on every token, as EarlyExitLM does."""
    model, _ = labkit.load_model("student-distilled")
    model = prune.prune_model(model, 0.5, structure)  # head pruning exercises the cache fill of fewer heads
    heads = capstone.shipped_exit_heads(model, "student-distilled")
    idx = TOKENIZER.tensor("O")
    tokens, layers = early_exit.generate(model, heads, idx, 60, threshold=0.9)
    assert len(set(layers)) > 1  # some tokens exit early, some do not
    lm = capstone.EarlyExitLM(model, heads, 0.9)
    logits = lm(tokens[:, :-1])
    assert torch.equal(logits.argmax(-1), tokens[:, 1:])
    assert lm.layers_used == layers


def test_bad_early_exit_lm_arguments(nano_pair):
    _, student, heads = nano_pair
    with pytest.raises(ValueError, match="threshold"):
        capstone.EarlyExitLM(student, heads, 0)
    lm = capstone.EarlyExitLM(student, heads, 0.5)
    with pytest.raises(ValueError, match="one sequence"):
        lm(torch.zeros(2, 3, dtype=torch.long), cache=lm.new_cache(2))


# -- serving, quality and measurement -----------------------------------------------------


def test_the_speculating_stack_writes_the_teachers_greedy_tokens():
    stacks = capstone.build_stack(recover_steps=0, progress=False)
    teacher = stacks[0].model
    for prompt in ("Once upon a time", "Compute each sum.\n12 + 30 =>"):
        idx = TOKENIZER.tensor(prompt)
        assert torch.equal(stacks[-1].generate(idx, 40), teacher.generate(idx, 40, temperature=0))
        stop = int(teacher.generate(idx, 40, temperature=0)[0, idx.size(1) + 5])  # the 6th token it writes
        expected = teacher.generate(idx, 40, temperature=0, stop_token=stop)
        assert expected.size(1) < idx.size(1) + 40 and torch.equal(stacks[-1].generate(idx, 40, stop), expected)


def test_quality_of_each_kind_of_stack_against_its_oracle():
    stacks = capstone.build_stack(("distill", "prune", "early_exit", "speculate"), recover_steps=0, threshold=0.8,
                                  progress=False)  # fmt: skip
    teacher, pruned, exiting, speculating = stacks[0], stacks[2], stacks[3], stacks[4]
    text = labkit.train.validation_text(513)
    assert pruned.perplexity(TOKENIZER, text) == evaluation.perplexity(pruned.model, TOKENIZER, text)
    assert speculating.perplexity(TOKENIZER, text) == teacher.perplexity(TOKENIZER, text)
    expected = early_exit.evaluate_threshold(exiting.model, exiting.heads, TOKENIZER, 0.8, n=4)["accuracy"]
    assert exiting.accuracy(TOKENIZER, n=4) == expected
    assert speculating.accuracy(TOKENIZER, n=4) == teacher.accuracy(TOKENIZER, n=4)


def test_measure_stack_rows(nano_pair):
    stacks = nano_stack(nano_pair, threshold=0.5)
    rows = capstone.measure_stack(stacks, TOKENIZER, text=TEXT, n_per_task=2, new_tokens=4, batch_size=2, repeat=1,
                                  progress=False)  # fmt: skip
    assert [r["name"] for r in rows] == [s.name for s in stacks]
    assert rows[0]["speedup"] == 1.0 and rows[0]["step_speedup"] == 1.0
    for i, r in enumerate(rows):
        assert r["latency_ms"] > 0 and r["tokens_per_s"] > 0 and 0 <= r["accuracy"] <= 1 and r["perplexity"] > 1
        assert r["weight_mb"] == stacks[i].weight_bytes() / 1e6
        assert r["batch"] == (2 if stacks[i].batched else 1)
        assert r["speedup"] == pytest.approx(rows[0]["latency_ms"] / r["latency_ms"])
        if i:  # step speedups multiply to the total
            assert rows[i - 1]["speedup"] * r["step_speedup"] == pytest.approx(r["speedup"])
    assert rows[-1]["perplexity"] == rows[0]["perplexity"]  # speculation serves the teacher
    only_quality = capstone.measure_stack(stacks[:2], TOKENIZER, text=TEXT, n_per_task=1, timing=False, progress=False)
    assert "latency_ms" not in only_quality[0] and "perplexity" in only_quality[0]
    capstone.print_table(rows)
    capstone.print_table(only_quality)
    with pytest.raises(ValueError, match="stacks"):
        capstone.measure_stack([], TOKENIZER)
    with pytest.raises(ValueError, match="new_tokens"):
        capstone.measure_stack(stacks, TOKENIZER, new_tokens=0)


# -- the Pareto front ---------------------------------------------------------------------


def brute_force_front(rows, objectives):
    sign = {"min": 1, "max": -1}

    def better_or_equal(q, r):
        return all(sign[s] * q[k] <= sign[s] * r[k] for k, s in objectives.items())

    def differs(q, r):
        return any(q[k] != r[k] for k in objectives)

    return [r for r in rows if not any(better_or_equal(q, r) and differs(q, r) for q in rows)]


@pytest.mark.parametrize("seed", range(5))
def test_pareto_front_equals_brute_force_dominance(seed):
    rng = random.Random(seed)
    objectives = {"latency_ms": "min", "weight_mb": "min", "accuracy": "max"}
    rows = [{"name": i, **{k: rng.randint(0, 4) for k in objectives}} for i in range(40)]  # many ties
    front = capstone.pareto_front(rows, objectives)
    assert front == brute_force_front(rows, objectives)
    for a, b in itertools.product(front, repeat=2):
        assert not capstone.dominates(a, b, objectives)


def test_pareto_front_keeps_equal_points_and_checks_its_arguments():
    rows = [{"x": 1, "y": 1}, {"x": 1, "y": 1}, {"x": 2, "y": 2}]
    assert capstone.pareto_front(rows, {"x": "min", "y": "min"}) == rows[:2]
    assert capstone.pareto_front(rows, {"x": "max"}) == rows[2:]
    with pytest.raises(ValueError, match="objectives"):
        capstone.pareto_front(rows, {"x": "least"})
    with pytest.raises(ValueError, match="objectives"):
        capstone.pareto_front(rows, {})
    with pytest.raises(ValueError, match="lacks"):
        capstone.pareto_front(rows, {"z": "min"})


def test_dominates_checker(capsys):
    assert check.dominates(solution.dominates)
    assert not check.dominates(lambda a, b: all(x <= y for x, y in zip(a, b)))  # equal points dominate
    assert not check.dominates(lambda a, b: all(x < y for x, y in zip(a, b)))  # too strict
    out = capsys.readouterr().out
    assert out.count("PASS") == 1 and out.count("NOT YET") == 2


# -- profile ------------------------------------------------------------------------------


def test_profile_accounts_for_all_the_time(nano_pair):
    _, student, _ = nano_pair
    idx = torch.randint(0, 128, (1, 8))
    result = capstone.profile(lambda: student.generate(idx, 8, temperature=0), top=5)
    groups = {g["group"]: g for g in result["groups"]}
    assert sum(g["self_ms"] for g in result["groups"]) == pytest.approx(result["wall_ms"])
    assert sum(g["share"] for g in result["groups"]) == pytest.approx(1.0)
    inside = sum(g["self_ms"] for name, g in groups.items() if name != capstone.OUTSIDE)
    assert inside == pytest.approx(result["op_ms"]) and result["op_ms"] <= result["wall_ms"]
    assert groups["matmul"]["self_ms"] > 0 and groups[capstone.OUTSIDE]["self_ms"] >= 0
    assert len(result["ops"]) == 5
    assert [r["self_ms"] for r in result["ops"]] == sorted((r["self_ms"] for r in result["ops"]), reverse=True)
    assert capstone.op_group("aten::addmm") == "matmul" and capstone.op_group("aten::copy_") == "memory & other"
    with pytest.raises(ValueError, match="top"):
        capstone.profile(lambda: None, top=0)
    with pytest.raises(ValueError, match="callable"):
        capstone.profile(None)


# -- architecture search ------------------------------------------------------------------


def fake_latency(config):
    return 1e-3 * config.n_layer * (1 + config.n_embd / 1000)


def fake_score(config):  # deeper and wider is better, with a penalty for many heads
    return 100.0 / (config.n_layer * config.n_embd) + 0.01 * config.n_head


def test_random_search_that_sees_every_shape_finds_the_best_within_budget():
    trained = []
    budget = 2.5e-3  # 1-2 layers fit, 3-4 do not

    def score(config):
        trained.append(config)
        return fake_score(config)

    result = capstone.search(budget, method="random", population=12, generations=4, latency_fn=fake_latency,
                             score_fn=score, progress=False)  # fmt: skip
    assert len(result["history"]) == 4 * 3 * 4  # every valid shape, once
    assert all(c.n_layer <= 2 for c in trained)  # over budget: rejected without training
    assert all((r["perplexity"] is None) == (not r["accepted"]) for r in result["history"])
    feasible = [dict(n_layer=a, n_head=b, n_embd=c) for a, b, c in itertools.product((1, 2, 3, 4), (2, 4, 6),
                (48, 96, 144, 192)) if fake_latency(capstone.candidate_config(dict(n_layer=a, n_head=b, n_embd=c)))
                <= budget]  # fmt: skip
    best = min(feasible, key=lambda c: fake_score(capstone.candidate_config(c)))
    assert {k: result["best"][k] for k in best} == best == {"n_layer": 2, "n_head": 2, "n_embd": 192}


def test_evolution_mutates_the_best_and_never_repeats_a_shape():
    result = capstone.search(2.1e-3, population=4, generations=3, latency_fn=fake_latency, score_fn=fake_score,
                             seed=1, progress=False)  # fmt: skip
    history = result["history"]
    shapes = [(r["n_layer"], r["n_head"], r["n_embd"]) for r in history]
    assert len(shapes) == len(set(shapes)) and len(shapes) <= 12
    assert sorted({r["generation"] for r in history}) == [0, 1, 2]
    accepted = [r for r in history if r["accepted"]]
    assert result["best"] == min(accepted, key=lambda r: r["perplexity"])
    fields = ("n_layer", "n_head", "n_embd")
    for generation in (1, 2):  # every child is one field away from a parent: the better half so far
        earlier = sorted((r for r in accepted if r["generation"] < generation), key=lambda r: r["perplexity"])
        parents = [tuple(r[f] for f in fields) for r in earlier[:2]]  # population // 2
        assert parents
        for child in (r for r in history if r["generation"] == generation):
            shape = tuple(child[f] for f in fields)
            assert any(sum(a != b for a, b in zip(shape, parent)) == 1 for parent in parents), (shape, parents)


def test_search_with_nothing_in_budget_returns_no_best():
    result = capstone.search(1e-9, population=2, generations=2, latency_fn=fake_latency, score_fn=fake_score,
                             progress=False)  # fmt: skip
    assert result["best"] is None and not any(r["accepted"] for r in result["history"])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"budget_s": 0}, "budget_s"),
        ({"budget_s": -1.0}, "budget_s"),
        ({"population": 0}, "population"),
        ({"generations": 0}, "generations"),
        ({"method": "grid"}, "method"),
        ({"space": {"n_layers": (1,)}}, "space"),
        ({"space": {"n_layer": ()}}, "space"),
        ({"space": {"n_head": (5,), "n_embd": (48,)}}, "space"),  # no valid shape
        ({"block_size": 1}, "block_size"),
    ],
)
def test_bad_search_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        capstone.search(**{"budget_s": 1.0, "latency_fn": fake_latency, "score_fn": fake_score, **kwargs})


def test_the_real_latency_and_score_functions_run():
    config = capstone.candidate_config({"n_layer": 1, "n_head": 2, "n_embd": 32}, block_size=32)
    assert config.block_size == 32 and config.vocab_size == 128
    assert capstone.decode_latency(config, new_tokens=4, repeat=1) > 0
    for bad, match in ((0, "new_tokens must be an int"), (17, "block_size 32")):  # 16 prompt tokens + 17 > 32
        with pytest.raises(ValueError, match=match):
            capstone.decode_latency(config, new_tokens=bad, repeat=1)
    assert capstone.train_and_score(config, steps=2, batch_size=2, text=labkit.data.corpus(600)) > 1


# -- export -------------------------------------------------------------------------------


def test_exported_compressed_model_computes_the_eager_logits(nano_pair, tmp_path):
    stacks = nano_stack(nano_pair, steps=("distill", "prune", "quantize"), structure="heads")
    model = stacks[-1].model
    program = capstone.export_decoder(model, example_len=8)
    for length in (1, 5, 37):  # one program, any length
        idx = torch.randint(0, 128, (1, length))
        with torch.no_grad():
            # the same ops on the same weights; a graph may fuse or reorder a few, hence a small tolerance
            torch.testing.assert_close(program.module()(idx), model(idx), rtol=1e-5, atol=1e-5)
    path = tmp_path / "decoder.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    idx = torch.randint(0, 128, (1, 6))
    assert torch.equal(capstone.generate_exported(loaded, idx, 10), model.generate(idx, 10, temperature=0))
    block = model.config.block_size  # to the end of the context, and not a token past it
    assert capstone.generate_exported(loaded, idx, block - 6 + 1).shape == (1, block + 1)
    with pytest.raises(ValueError, match="program's context"):
        capstone.generate_exported(loaded, idx, block - 6 + 2)
    with pytest.raises(ValueError, match="example_len"):
        capstone.export_decoder(model, example_len=1)
    with pytest.raises(ValueError, match="LabGPT"):
        capstone.export_decoder(nn.Linear(2, 2))
