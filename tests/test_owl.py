"""nmkern.owl_scheme: an outlier-weighted per-block N:M scheme at a uniform scheme's budget (issue #13)."""

from __future__ import annotations

import pytest
import torch

import nmkern


def _calib():
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 64, (2, 12), generator=gen)} for _ in range(3)]


def test_outlier_rich_blocks_keep_more_and_the_budget_holds(tiny_llama):
    model = tiny_llama(layers=6, heads=2)
    with torch.no_grad():  # block 4: a few weights 50x the rest in every layer -> the largest outlier share
        for lin in model.model.layers[4].modules():
            if isinstance(lin, torch.nn.Linear):
                lin.weight[:, :3] *= 50
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = nmkern.owl_scheme(model, _calib(), {"model.layers.*": "4:8"})
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # only run, never changed
    patterns = [b["pattern"] for b in result.blocks]
    assert len(patterns) == 6 and sorted(patterns) == ["3:8", "3:8", "4:8", "4:8", "5:8", "5:8"]
    assert patterns[4] == "5:8" and result.blocks[4]["outlier_share"] == max(b["outlier_share"] for b in result.blocks)
    assert result.density == 0.5
    assert result.scheme["model.layers.4.mlp.down_proj"] == "5:8" and "lm_head" not in result.scheme
    report = nmkern.prune_oneshot(model, _calib(), result.scheme, method="sparsegpt", progress=False)
    by_name = {r["name"]: r for r in report.layers}
    assert by_name["model.layers.4.self_attn.q_proj"]["pattern"] == "5:8"
    kept = sum(r["density"] * torch.Size(r["shape"]).numel() for r in report.layers)
    assert kept / sum(torch.Size(r["shape"]).numel() for r in report.layers) == pytest.approx(0.5)


def test_spread_zero_is_the_uniform_scheme(tiny_llama):
    result = nmkern.owl_scheme(tiny_llama(layers=3), _calib(), {"model.layers.*": "2:4"}, spread=0)
    assert set(result.scheme.values()) == {"2:4"} and result.density == 0.5


def test_bad_arguments_are_refused(tiny_llama):
    model = tiny_llama(layers=3)
    with pytest.raises(ValueError, match=r"owl_scheme: spread=2 must keep n-spread >= 1 and n\+spread <= m-1 for 2:4"):
        nmkern.owl_scheme(model, _calib(), {"model.layers.*": "2:4"}, spread=2)
    with pytest.raises(ValueError, match="one N:M pattern"):
        nmkern.owl_scheme(model, _calib(), {"model.layers.0.*": "2:4", "model.layers.1.*": "4:8"})
    with pytest.raises(ValueError, match="ratio must be a positive number"):
        nmkern.owl_scheme(model, _calib(), {"model.layers.*": "4:8"}, ratio=0)
    with pytest.raises(ValueError, match="owl_scheme: the model rejects calibration batch 0"):
        nmkern.owl_scheme(model, [torch.randn(2, 3)], {"model.layers.*": "4:8"})
    with pytest.raises(ValueError, match="calib is empty"):
        nmkern.owl_scheme(model, [], {"model.layers.*": "4:8"})
