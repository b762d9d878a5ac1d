"""SparsityController: λ moves the right way, counters reset, and ranks agree on λ from the global ratio."""
import contextlib
import json
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deco_kernels import DecoConfig, DecoForCausalLM, DecoMoE, SparsityController

TINY = DecoConfig.preset("tiny", backend="torch")
M, LAM0 = 2.0, 1e-2


def model_and_ids(seed=0):
    torch.manual_seed(seed)
    return DecoForCausalLM(TINY).train(), torch.randint(0, TINY.vocab_size, (2, 6))


def test_defaults_come_from_the_config():
    model, _ = model_and_ids()
    c = SparsityController(model)
    assert (c.target, c.multiplier, c.lam0, c.lam) == (TINY.target_active_ratio, TINY.lambda_multiplier,
                                                       TINY.lambda0, TINY.lambda0)
    assert c.last_active_ratio is None and len(c.layers) == TINY.num_layers - 1


def test_lambda_grows_above_target_and_shrinks_to_lam0_below():
    model, ids = model_and_ids()
    c = SparsityController(model, target=0.2, multiplier=M, lam0=LAM0)
    model.set_elastic(bias=100.0)  # every gate active: A = 1 > target
    for k in range(1, 4):
        model(ids)
        assert c.step() == 1.0
        assert c.lam == pytest.approx(LAM0 * M ** k)
    model.set_elastic(bias=-100.0)  # none active: A = 0 <= target
    lams = []
    for _ in range(5):
        model(ids)
        assert c.step() == 0.0
        lams.append(c.lam)
    assert lams == pytest.approx([LAM0 * 4, LAM0 * 2, LAM0, LAM0, LAM0])  # never below lam0
    assert c.last_active_ratio == 0.0
    for layer in model.deco_layers():
        assert layer.sparsity_lambda.item() == pytest.approx(c.lam)


def test_counters_are_summed_over_layers_and_reset():
    model, ids = model_and_ids()
    c = SparsityController(model, target=0.2, multiplier=M, lam0=LAM0)
    model(ids)
    model(ids[:, :3])
    gates = 2 * 9 * TINY.num_experts  # per layer: 2 forwards of 2 x 6 and 2 x 3 tokens
    assert all(layer.gate_count.item() == gates for layer in model.deco_layers())
    active = sum(layer.active_count.item() for layer in model.deco_layers())
    assert c.step() == pytest.approx(active / (len(c.layers) * gates))
    assert all(layer.active_count.item() == layer.gate_count.item() == 0 for layer in model.deco_layers())
    lam = c.lam
    assert c.step() is None and c.lam == lam  # nothing counted: λ unchanged
    model.eval()
    model(ids)  # eval forwards do not count
    assert c.step() is None


def test_state_dict_round_trip_writes_lambda():
    model, _ = model_and_ids()
    c = SparsityController(model, lam0=LAM0)
    c.load_state_dict({"lam": 0.37, "last_active_ratio": 0.25})
    assert c.lam == 0.37 and c.state_dict() == {"lam": 0.37, "last_active_ratio": 0.25}
    assert all(layer.sparsity_lambda.item() == pytest.approx(0.37) for layer in model.deco_layers())


def test_bad_arguments():
    with pytest.raises(ValueError, match="model"):
        SparsityController(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="multiplier"):
        SparsityController(DecoMoE(TINY), multiplier=0.5)
    with pytest.raises(ValueError, match="target"):
        SparsityController(DecoMoE(TINY), target=1.5)


OFFSET = DecoConfig.preset("tiny", backend="torch", offset_step=0.1)


def test_router_offset_moves_toward_the_target_from_both_sides():
    torch.manual_seed(0)
    model, ids = DecoForCausalLM(OFFSET).train(), torch.randint(0, OFFSET.vocab_size, (2, 6))
    c = SparsityController(model, target=0.2, multiplier=M, lam0=LAM0)
    model.set_elastic(bias=100.0)  # A = 1: each offset falls by 0.1 * (0.2 - 1) / 0.2
    model(ids)
    c.step()
    model.set_elastic(bias=-100.0)  # A = 0: each rises by 0.1
    model(ids)
    c.step()
    for layer in model.deco_layers():
        assert layer.router_offset_value == pytest.approx(-0.4 + 0.1)
        assert layer.router_offset.item() == pytest.approx(layer.router_offset_value)


def test_router_offset_shifts_the_logits_and_survives_a_round_trip():
    torch.manual_seed(0)
    model, ids = DecoForCausalLM(OFFSET).eval(), torch.randint(0, OFFSET.vocab_size, (2, 6))
    for layer in model.deco_layers():
        layer.set_router_offset(100.0)
    out = model(ids)
    assert out.active_ratio.item() == 1.0  # every logit + 100 > 0
    state = model.state_dict()
    assert all(state[f"layers.{layer.layer_idx}.mlp.router_offset"].item() == 100.0 for layer in model.deco_layers())
    again = DecoForCausalLM(OFFSET)
    again.load_state_dict(state)
    assert all(layer.router_offset_value == 100.0 for layer in again.deco_layers())
    again.to(torch.bfloat16)
    assert all(layer.router_offset.dtype == torch.float32 for layer in again.deco_layers())


@pytest.mark.parametrize("bias", [0.0, "vector"])
def test_router_offset_is_read_from_its_buffer_at_call_time(bias):
    """A CUDA graph replays a forward with the arguments of its capture: the offset must reach the router as the
    buffer (read on the device), not as its float mirror, or a captured training step would keep the offset of
    its capture while the controller moves it. Changing only the buffer, as a replay sees it, changes y."""
    torch.manual_seed(0)
    model, ids = DecoForCausalLM(OFFSET).eval(), torch.randint(0, OFFSET.vocab_size, (2, 6))
    layer = next(model.deco_layers())
    if bias == "vector":
        layer.set_elastic(bias=torch.linspace(-0.2, 0.2, OFFSET.num_experts))
    x = torch.randn(2, 6, OFFSET.d_model)
    layer.set_router_offset(0.3)
    before = layer(x)
    with torch.no_grad():
        layer.router_offset.fill_(-0.3)          # the mirror router_offset_value still says 0.3
    moved = layer(x)
    layer.set_router_offset(-0.3)
    assert torch.equal(moved, layer(x)) and not torch.allclose(before, moved)
    assert isinstance(layer.knobs()["bias"], torch.Tensor)


def test_router_offset_is_off_by_default():
    model = DecoForCausalLM(TINY)
    assert not any("router_offset" in k for k in model.state_dict())  # checkpoints without it still load
    with pytest.raises(ValueError, match="offset_step"):
        next(model.deco_layers()).set_router_offset(1.0)
    with pytest.raises(ValueError, match="offset_step"):
        DecoConfig.preset("tiny", offset_step=-1.0)


# ---------------------------------------------------------------------------------------------------------
# Two gloo ranks on the CPU
# ---------------------------------------------------------------------------------------------------------
# Rank 0 sees 90 tokens with no active gate, rank 1 sees 10 tokens with all gates active. Global A = 0.1 is
# below the target 0.2, so λ shrinks on both ranks, although rank 1 alone (A = 1) would have grown it and the
# mean of the per-rank ratios (0.5) is above the target too.
TOKENS, BIAS = (90, 10), (-100.0, 100.0)


def _run_two_ranks(worker, tmp_path) -> None:
    """worker(rank, 2, store, out_dir) in two spawned processes; fails the test after 120 s."""
    ctx = mp.start_processes(worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("gloo workers did not finish in 120 s")


@contextlib.contextmanager
def _gloo_group(rank: int, world_size: int, store: str):
    """A gloo process group for the body. On success the ranks meet at a barrier before tearing it down, so
    neither closes its connections while the other still talks, and the worker then leaves with os._exit(0):
    gloo's threads torn down during interpreter finalisation can abort an otherwise finished worker (seen once
    in CI as SIGABRT, "terminate called without an active exception"). On failure the exception propagates
    to the spawner, which reports it. Nothing after the with block of a worker runs."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    with _gloo_group(rank, world_size, store):
        torch.manual_seed(0)
        layer = DecoMoE(OFFSET).train()
        layer.set_elastic(bias=BIAS[rank])
        controller = SparsityController(layer, target=0.2, multiplier=M, lam0=LAM0)
        controller.load_state_dict({"lam": 1.0})
        layer(torch.randn(TOKENS[rank], TINY.d_model))
        ratio = controller.step()
        result = {"ratio": ratio, "lam": controller.lam, "buffer": layer.sparsity_lambda.item(),
                  "local": layer.active_ratio.item(), "offset": layer.router_offset.item()}
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)


def test_two_ranks_agree_on_lambda_from_the_global_ratio(tmp_path):
    _run_two_ranks(_worker, tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["local"] for r in results] == [0.0, 1.0]
    for r in results:
        assert r["ratio"] == pytest.approx(0.1)
        assert r["lam"] == pytest.approx(1.0 / M) and r["buffer"] == pytest.approx(1.0 / M)
        assert r["offset"] == pytest.approx(0.1 * (0.2 - 0.1) / 0.2)  # from the global ratio, on both ranks


def _ddp_worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    with _gloo_group(rank, world_size, store):
        torch.manual_seed(0)
        model = DecoForCausalLM(TINY).train()
        model.set_elastic(bias=BIAS[rank])  # rank 0: no gate active, rank 1: every gate active
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # broadcast_buffers=True, the default
        ids = torch.randint(0, TINY.vocab_size, (1, 5))
        counts = []
        for _ in range(2):  # two micro-batches without no_sync(): DDP broadcasts buffers before each forward
            ddp(ids, labels=ids).loss.backward()
            counts.append(sum(int(m.active_count) for m in model.deco_layers()))
        with open(f"{out_dir}/ddp{rank}.json", "w") as f:
            json.dump(counts, f)
        del ddp  # the reducer holds the group: free it before the group is destroyed


def test_ddp_leaves_each_rank_its_own_gate_counters(tmp_path):
    _run_two_ranks(_ddp_worker, tmp_path)
    zero, full = (json.loads((tmp_path / f"ddp{r}.json").read_text()) for r in range(2))
    per_call = 5 * TINY.num_experts * (TINY.num_layers - 1)
    assert zero == [0, 0]
    assert full == [per_call, 2 * per_call]  # rank 0's zeros did not overwrite rank 1's first count
