"""Bad input gets a ValueError that names the argument (found by an audit: each of these used to crash
deep inside PyTorch, hang, or return a wrong answer)."""

import math
import random

import pytest
import torch

from labkit import data, distill, evaluation, prune, quant, serving, sparse
from labkit.early_exit import ExitHeads, generate, generate_recomputed
from labkit.kernels import flash_attention_blockwise
from labkit.model import LabGPT, get_config
from labkit.tokenizer import CharTokenizer
from labkit.train import TrainConfig


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    return LabGPT(get_config("nano")).eval()


def test_model_rejects_foreign_token_ids_empty_input_and_mismatched_caches(nano):
    V = nano.config.vocab_size
    with pytest.raises(ValueError, match=rf"idx must be token ids in 0\.\.{V - 1}"):
        nano(torch.tensor([[V]]))
    with pytest.raises(ValueError, match="token ids"):
        nano(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="empty"):
        nano(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="batch 2"):
        nano(torch.zeros(2, 3, dtype=torch.long), cache=nano.new_cache(1))
    with pytest.raises(ValueError, match="inputs_embeds"):
        nano(inputs_embeds=torch.zeros(1, 3, nano.config.n_embd + 1))
    with pytest.raises(ValueError, match="targets"):
        nano.loss(torch.zeros(1, 3, dtype=torch.long), torch.full((1, 3), V))
    with pytest.raises(ValueError, match="batch_size"):
        nano.new_cache(0)
    with pytest.raises(ValueError, match="config must be a GPTConfig"):
        LabGPT("nano")
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        get_config("nano", layers=3)
    idx = torch.zeros(1, 2, dtype=torch.long)
    for kwargs, name in ((dict(max_new_tokens=2.5), "max_new_tokens"), (dict(max_new_tokens=2, temperature=math.nan),
                         "temperature"), (dict(max_new_tokens=2, top_k=True), "top_k")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            nano.generate(idx, **kwargs)


def test_training_and_evaluation_settings_are_checked(nano):
    for kwargs, name in ((dict(min_lr=-1.0), "min_lr"), (dict(grad_clip=-1.0), "grad_clip"), (dict(warmup=-5), "warmup"),
                         (dict(steps=1.5), "steps"), (dict(weight_decay=-0.1), "weight_decay")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            TrainConfig(**kwargs)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="batch_size"):
            evaluation.perplexity(nano, CharTokenizer(), "some text " * 40, batch_size=bad)
    with pytest.raises(ValueError, match="op 'add' does not belong to task 'translate'"):
        data.make_example("translate", op="add", rng=random.Random(0))
    with pytest.raises(ValueError, match="label_scheme"):
        data.make_example("sentiment", label_scheme="x", rng=random.Random(0))


def test_pruning_indices_must_be_unique_ints_in_range_one_list_per_layer(nano):
    mlp = LabGPT(get_config("nano")).transformer.h[0].mlp
    hidden = mlp.c_fc.out_features
    for keep, match in ((torch.ones(hidden, dtype=torch.bool), "int"), ([0, 0, 1], "repeat"), ([hidden], "indices in"),
                        ([-1], "indices in"), ([0.5], "int")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            prune.remove_neurons(mlp, keep)
    with pytest.raises(ValueError, match="one index list per layer"):
        prune.mask_neurons(nano, [torch.arange(4)])
    with pytest.raises(ValueError, match="n_head"):
        prune.head_output_norms(torch.randn(4, 32), torch.randn(32, 32), 3)


def test_quantization_inputs():
    with pytest.raises(ValueError, match="NaN or inf"):
        quant.quantize(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match=r"zero_point must be in 0\.\.255"):
        quant.quantize(torch.randn(8), scale=0.1, zero_point=300)
    with pytest.raises(ValueError, match="zero_point must be 0 when symmetric"):
        quant.quantize(torch.randn(8), scale=0.1, zero_point=5, symmetric=True)
    with pytest.raises(ValueError, match="2-D"):
        quant.quantize_per_token(torch.randn(2, 3, 8))
    layer = quant.W8A8Linear.from_linear(torch.nn.Linear(64, 8))
    for x in (torch.ones(2, 64, dtype=torch.long), torch.randn(2, 63)):
        with pytest.raises(ValueError, match="in_features=64"):
            layer(x)
    with pytest.raises(ValueError, match="out_features"):
        quant.Int8WeightOnlyLinear(8, -1)


def test_serving_sparse_distill_and_early_exit_inputs(nano):
    with pytest.raises(ValueError, match="arrival"):
        serving.serve(nano, [serving.Request(0, math.nan, [1], 2)], "continuous")
    with pytest.raises(ValueError, match="max_new_tokens"):
        serving.serve(nano, [serving.Request(0, 0.0, [1], 0)], "continuous")
    with pytest.raises(ValueError, match="requests is empty"):
        serving.serve(nano, [], "static")
    cache = serving.SlotCache(nano, 2)
    with pytest.raises(ValueError, match="one token per slot"):
        serving.decode_step(nano, cache, torch.tensor([0, 1]), torch.tensor([4]))
    q = k = v = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="bool"):
        sparse.masked_attention(q, k, v, torch.ones(4, 4))
    with pytest.raises(ValueError, match="block_m"):
        flash_attention_blockwise(q, k, v, block_m=0)
    with pytest.raises(ValueError, match="batch_size"):
        distill.target_continuations(nano, "text " * 100, 2, (4,), 2, batch_size=0, progress=False)
    heads, idx = ExitHeads(nano), torch.zeros(1, 3, dtype=torch.long)
    for fn in (generate, generate_recomputed):
        with pytest.raises(ValueError, match="max_new_tokens"):
            fn(nano, heads, idx, -3, 0.5)
    with pytest.raises(ValueError, match="exit heads were made for 4 layers"):
        generate(nano, ExitHeads(LabGPT(get_config("nano", n_layer=4))), idx, 2, 0.5)


def test_early_exit_generation_records_no_autograd_graph(nano, monkeypatch):
    """A misplaced decorator once left generate with gradients on: a graph kept per token, 500 MB a sweep."""
    heads, seen = ExitHeads(nano), []
    original = heads.logits
    monkeypatch.setattr(heads, "logits", lambda *a: seen.append(torch.is_grad_enabled()) or original(*a))
    for fn in (generate, generate_recomputed):
        fn(nano, heads, torch.zeros(1, 3, dtype=torch.long), 3, 0.5, **({"folded": False} if fn is generate else {}))
    assert seen and not any(seen)


def test_scoring_answers_records_no_autograd_graph(nano, monkeypatch):
    """Same slip as above, in evaluation.answer_correct: it must run without gradients."""
    seen = []
    forward = type(nano).forward
    monkeypatch.setattr(type(nano), "forward", lambda self, *a, **k: seen.append(torch.is_grad_enabled()) or forward(self, *a, **k))
    evaluation.answer_correct(nano, CharTokenizer(), data.examples("capital", "specific", 0, n=2))
    assert seen and not any(seen)


def test_int_arguments_reject_bools_and_name_the_argument():
    # one shared check (labkit._args.check_int): True is an int to Python, never a count here
    from labkit import bench
    from labkit._args import check_int

    assert check_int("n", 3) == 3 and check_int("warmup", 0, 0) == 0
    for bad in (True, 0, 1.0, "2", None):
        with pytest.raises(ValueError, match=r"n must be an int >= 1, got "):
            check_int("n", bad)
    with pytest.raises(ValueError, match="repeat must be an int >= 1, got True"):
        bench.measure(lambda: None, repeat=True)
    with pytest.raises(ValueError, match="n_chars must be an int >= 1"):
        data.corpus(0)
    with pytest.raises(ValueError, match="max_batch must be an int >= 1"):
        serving.serve(LabGPT(get_config("nano")), [], "static", max_batch=False)


def test_counting_functions_reject_impossible_sizes():
    from labkit import hardware

    cfg = get_config("nano")
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        hardware.matmul_bytes(4, 4, -1)
    with pytest.raises(ValueError, match="bytes_per_element must be a number > 0"):
        hardware.matmul_bytes(4, 4, 4, bytes_per_element=0)
    assert hardware.matmul_bytes(4, 4, 4, bytes_per_element=0.5) == 24  # int4: two elements a byte
    with pytest.raises(ValueError, match="head_dim must be an int >= 1"):
        hardware.attention_flops(1, 2, 3, 4, -8)
    with pytest.raises(ValueError, match="q_len"):
        hardware.causal_pairs(5, 4)
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        hardware.forward_flops(cfg, 1, 0)
    with pytest.raises(ValueError, match="context_len must be an int >= 0"):
        hardware.decode_step_bytes(cfg, 1, -1)
    assert hardware.decode_step_bytes(cfg, 1, 0) > hardware.weight_bytes(cfg)  # an empty cache is allowed
    assert hardware.causal_pairs(3, 5) == 3 + 4 + 5


def test_parallel_layouts_reject_impossible_ranks_and_batches():
    from labkit.parallel import data as dp
    from labkit.parallel.mesh import check_mesh

    x = torch.arange(8)
    assert dp.shard(x, 1, 2).tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        dp.shard(x, 0, 0)
    with pytest.raises(ValueError, match=r"rank must be an int in 0..1"):
        dp.shard(x, 2, 2)
    with pytest.raises(ValueError, match="micro_batches must be an int >= 1"):
        check_mesh(get_config("nano"), 1, 1, 1, 8, 0)


def _takes_rank(rank, world_size):  # a module-level function: launch can send it
    return rank


def test_launch_rejects_what_it_cannot_send_before_starting_anything():
    import threading

    from labkit.parallel.launch import _check_picklable

    _check_picklable(_takes_rank)
    with pytest.raises(ValueError, match="fn must be a function"):
        _check_picklable(42)

    class Holding:  # a callable whose state cannot be pickled
        def __init__(self):
            self.lock = threading.Lock()

        def __call__(self, rank, world_size):
            return rank

    with pytest.raises(ValueError, match="cannot be sent to the child processes"):
        _check_picklable(Holding())


def test_decompositions_reject_nan_weights():
    from labkit import lowrank

    linear = torch.nn.Linear(8, 6)
    with torch.no_grad():
        linear.weight[2, 3] = float("nan")
    with pytest.raises(ValueError, match="1 NaN or inf values"):
        lowrank.svd_linear(linear, rank=2)
    tensor = torch.randn(3, 4, 5)
    tensor[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        lowrank.tucker(tensor, [2, 2, 2])
    with pytest.raises(ValueError, match="NaN or inf"):
        lowrank.cp_als(tensor, 2)
    assert math.isnan(lowrank.relative_error(torch.full((2,), float("nan")), torch.ones(2)))  # a report, not a check


def test_safetensors_metadata_must_be_strings(tmp_path):
    import json
    import struct

    from labkit import memory

    path = tmp_path / "m.safetensors"
    memory.save_safetensors({"w": torch.ones(2)}, path, metadata={"note": "ok"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = {"steps": 5}  # a number: not a string map
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    with pytest.raises(ValueError, match="__metadata__ must be a JSON object of strings"):
        memory.load_safetensors(path)


def test_finetune_defaults_to_a_sequence_the_model_can_hold():
    from labkit.train import finetune

    model = LabGPT(get_config("nano", block_size=32))
    losses = finetune(model, steps=1, batch_size=2, corpus_chars=5_000, progress=False)  # 256 would not fit
    assert len(losses) == 1
    with pytest.raises(ValueError, match=r"seq_len must be an int in 1..32"):
        finetune(model, steps=1, seq_len=64, progress=False)


def test_compression_and_prompting_inputs_found_by_a_second_audit(tmp_path):
    from labkit import memory, prompting

    w = torch.randn(4, 8)
    for kwargs, match in (({"m": 0}, "m \\(group size\\)"), ({"n": 2.5}, "n must be an int"), ({"n": 0}, "n must")):
        with pytest.raises(ValueError, match=match):
            prune.semi_structured_mask(w, **kwargs)
    with pytest.raises(ValueError, match="__metadata__"):
        memory.save_safetensors({"__metadata__": torch.zeros(1)}, tmp_path / "x.safetensors")
    logits = torch.randn(2, 5, 16)
    for targets in (torch.full((2, 5), -1), torch.full((2, 5), -100), torch.full((2, 5), 16), torch.zeros(2, 4)):
        with pytest.raises(ValueError, match="targets must be token ids in 0..15"):
            distill.distillation_loss(logits, logits, targets.long())
    model, tok = LabGPT(get_config("nano")), CharTokenizer()
    verbalizer = {"pos": "good", "neg": "bad"}
    with pytest.raises(ValueError, match=r"gold labels \['positive'\] are not among"):
        prompting.pet_finetune(model, tok, ["nice"], ["positive"], lambda t: t + " It was", verbalizer, steps=1)
    prompting.SoftPrompt(model, 4)  # freezes the model it wraps, in place
    with pytest.raises(ValueError, match="every weight of model is frozen"):
        prompting.pet_finetune(model, tok, ["nice"], ["pos"], lambda t: t + " It was", verbalizer, steps=1)
    model.requires_grad_(True)
    assert len(prompting.pet_finetune(model, tok, ["nice"], ["pos"], lambda t: t + " It was", verbalizer, steps=1)) == 1
