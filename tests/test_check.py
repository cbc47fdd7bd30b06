import torch

from labkit import check
from labkit.solutions import welcome


def test_checkers_accept_the_reference_solutions(capsys):
    assert check.count_parameters(welcome.count_parameters)
    assert check.kv_cache_bytes(welcome.kv_cache_bytes)
    assert check.greedy_decode(welcome.greedy_decode)
    assert capsys.readouterr().out.count("PASS") == 3


def test_checkers_reject_wrong_answers_with_feedback(capsys):
    assert not check.count_parameters(lambda cfg: welcome.count_parameters(cfg) - cfg.n_embd)
    assert not check.kv_cache_bytes(lambda cfg, b, t, nb: cfg.n_layer * b * t * cfg.n_embd * nb)  # forgot values
    assert not check.greedy_decode(lambda model, idx, n: torch.cat([idx, idx[:, -1:].repeat(1, n)], dim=1))
    out = capsys.readouterr().out
    assert out.count("NOT YET") == 3 and "hint" in out


def test_a_crashing_answer_is_reported_not_raised(capsys):
    assert not check.count_parameters(lambda cfg: 1 / 0)
    assert "ZeroDivisionError" in capsys.readouterr().out


def test_a_result_that_cannot_be_compared_is_reported_not_raised(capsys):
    # what learners return by mistake: nothing (a forgotten return), a string, a tensor where a bool was asked
    assert not check.accept_draft(lambda guesses, target: None)
    assert not check.count_parameters(lambda cfg: "12,345")
    assert not check.percentile(lambda values, p: "fast")
    assert not check.exit_rule(lambda probs, threshold: probs >= threshold)
    assert not check.pick_scale(lambda x, bits: {"scale": 1.0, "zero_point": 0})
    out = capsys.readouterr().out
    assert out.count("NOT YET") == 5 and out.count("could not be checked") == 5
    assert check.accept_draft.__name__ == "accept_draft" and "speculative" in check.accept_draft.__doc__


def test_hardware_checkers(capsys):
    from labkit.solutions import hardware

    assert check.attention_flops(hardware.attention_flops)
    assert check.memory_bound(hardware.memory_bound)
    assert not check.attention_flops(lambda b, h, t, d: 2 * b * h * t * t * d)  # forgot P V
    assert not check.memory_bound(lambda *args: True)  # "everything is memory-bound"
    assert capsys.readouterr().out.count("NOT YET") == 2


def test_memory_checkers(capsys):
    from labkit.solutions import memory

    assert check.read_safetensors_header(memory.read_safetensors_header)
    assert check.accumulate(memory.accumulate)

    def divides_by_count(model, loss_fn, x, y, k):  # the classic mistake with unequal pieces
        for xb, yb in zip(x.tensor_split(k), y.tensor_split(k)):
            (loss_fn(model(xb), yb) / k).backward()

    assert not check.accumulate(divides_by_count)

    def whole_batch(model, loss_fn, x, y, k):  # the right gradient, but no micro-batches at all
        loss_fn(model(x), y).backward()

    assert not check.accumulate(whole_batch)
    assert not check.read_safetensors_header(lambda path: ({}, 0))
    out = capsys.readouterr().out
    assert out.count("NOT YET") == 3 and "no micro-batch should exceed" in out


def test_lowrank_checker(capsys):
    from labkit.solutions import lowrank

    assert check.rank_for_compression(lowrank.rank_for_compression)
    assert not check.rank_for_compression(
        lambda d_out, d_in, keep: int(keep * min(d_out, d_in))
    )  # keeps rank, not params
    assert "NOT YET" in capsys.readouterr().out


def test_prompt_checker(capsys):
    from labkit.solutions import prompting

    assert check.reversal_prompt(prompting.reversal_prompt)
    assert not check.reversal_prompt(lambda word, op: f"{word} ->")  # the vague prompt is ambiguous
    assert not check.reversal_prompt(lambda word, op: "")
    assert not check.reversal_prompt(lambda word, op: f"dog => god\n{word} =>")  # a demonstration: not zero-shot
    assert "no demonstrations" in capsys.readouterr().out


def test_verbalizer_checker(capsys):
    from labkit.solutions import prompting

    assert check.verbalizer(prompting.VERBALIZER)
    assert not check.verbalizer({"pos": "yes", "neg": "no"})
    assert not check.verbalizer({"positive": "good"})


def test_distillation_and_exit_checkers(capsys):
    import torch.nn.functional as F

    from labkit.solutions import distill

    assert check.soft_target_loss(distill.soft_target_loss)
    assert check.exit_rule(distill.exit_rule)
    no_t_squared = lambda s, t, T: F.kl_div(F.log_softmax(s.reshape(-1, s.size(-1)) / T, -1),
                                             F.softmax(t.reshape(-1, t.size(-1)) / T, -1), reduction="batchmean")  # fmt: skip
    assert not check.soft_target_loss(no_t_squared)
    assert not check.exit_rule(lambda probs, threshold: probs.max().item() >= threshold)  # exits at tau=1
    assert not check.exit_rule(lambda probs, threshold: 1 > probs.max().item() >= threshold)  # never exits when sure
    assert capsys.readouterr().out.count("NOT YET") == 3


def test_parallel_checkers(capsys):
    from labkit.solutions import parallel

    assert check.reduce_scatter_step(parallel.reduce_scatter_step)
    assert check.qkv_rows(parallel.qkv_rows)
    assert check.min_micro_batches(parallel.min_micro_batches)
    assert check.layout_that_fits(parallel.layout_that_fits)
    assert not check.reduce_scatter_step(lambda buffers, step: buffers)
    assert "10 of 10 cases wrong" in capsys.readouterr().out  # every step is checked, not only the first wrong one
    assert not check.qkv_rows(lambda C, h, tp, r: torch.arange(r * 3 * C // tp, (r + 1) * 3 * C // tp))
    assert not check.min_micro_batches(lambda p, b: p)
    assert not check.layout_that_fits(lambda model, gpu, n, batch, limit: (n, 1, 1))
    out = capsys.readouterr().out
    assert out.count("PASS") == 0 and out.count("NOT YET") == 3 and "starting [" in out


def test_serving_checkers(capsys):
    from labkit.solutions import serving

    assert check.accept_draft(serving.accept_draft)
    assert check.percentile(serving.percentile)
    assert not check.accept_draft(lambda g, t: [x for x, y in zip(g, t) if x == y])
    assert not check.percentile(lambda v, q: sorted(v)[int(len(v) * q / 100) - 1])
    out = capsys.readouterr().out
    assert out.count("PASS") == 2 and out.count("NOT YET") == 2
