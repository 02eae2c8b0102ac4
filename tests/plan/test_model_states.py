"""Model-state bytes are exact: parameter counts of the released nets times bytes per element."""

import math

import pytest

from cosmos_train.plan.model_states import TensorInfo, inventory, model_states
from cosmos_train.plan.planner import meta_model
from cosmos_train.spec_loading import load_spec_text

COUNTS = {"2b": (1_956_413_440, 567), "14b": (14_265_285_632, 727)}


@pytest.mark.parametrize("preset", ["2b", "14b"])
def test_full_model_states_match_released_parameter_counts(preset):
    spec = load_spec_text(f'[model]\npreset = "{preset}"\ntokenizer = {{kind = "wan2.1", path = "vae"}}\n')
    inv = inventory(meta_model(spec))
    count, tensors = COUNTS[preset]
    assert inv.num_params == count and len(inv.params) == tensors and inv.num_trainable == count
    st = model_states(inv, shard_size=1, ema=True)
    assert st.params == count * 4
    assert st.grads == count * 4
    assert st.ema == count * 4
    assert st.optimizer == 2 * count * 4 + 4 * tensors  # exp_avg, exp_avg_sq and one fp32 step per tensor


def test_lora_trainable_bytes_follow_the_injected_adapters():
    spec = load_spec_text('[model]\npreset = "2b"\ntrain_architecture = "lora"\ntokenizer = {kind = "wan2.1", path = "vae"}\n'
                          '[model.lora]\nrank = 16\nalpha = 16\n')
    inv = inventory(meta_model(spec))
    D, r, ctx, blocks = 2048, 16, 1024, 28
    # per block: self-attn q,k,v,out (D->D), cross-attn q,out (D->D), k,v (1024->D), mlp D->4D and 4D->D
    per_block = 6 * r * (D + D) + 2 * r * (ctx + D) + 2 * r * (D + 4 * D)
    assert inv.num_trainable == blocks * per_block
    assert inv.num_params == COUNTS["2b"][0] + blocks * per_block
    st = model_states(inv, shard_size=8, ema=True)
    trainable = [p for p in inv.params if p.trainable]
    assert st.grads == sum(math.ceil(p.shape[0] / 8) * math.prod(p.shape[1:]) * 4 for p in trainable)
    assert st.ema == st.grads


def test_sharding_pads_dim0_to_the_shard_count():
    t = TensorInfo("w", (5, 3), 4, True, None)
    assert t.shard_numel(4) == 2 * 3  # ceil(5 / 4) rows on rank 0
    assert t.shard_numel(1) == 15
    assert TensorInfo("s", (), 4, True, None).shard_numel(8) == 1
