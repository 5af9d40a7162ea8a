"""Cost counting on a tiny network counted by hand, and the latency protocol (with a scripted clock)."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fasterkd import cost
from fasterkd.cost import (count_flops, count_macs, count_parameters, head_cost_sweep, inference_parameters,
                           measure_latency, model_cost)

H, W = 16, 24


class Tiny(nn.Module):
    """conv 3x3 (3->8, bias) + BN + depthwise 3x3 stride 2 + global pool + linear 8->5.

    ``aux`` runs only in training (like FasterSeg's auxiliary heads), ``unused`` never runs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)  # 216 weights + 8 biases
        self.bn = nn.BatchNorm2d(8)  # 16 (running stats are buffers)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)  # 72
        self.fc = nn.Linear(8, 5)  # 40 + 5
        self.aux = nn.Conv2d(8, 5, 1)  # 40 + 5
        self.unused = nn.Linear(100, 100)  # 10,100

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        out = self.fc(self.dw(y).mean((2, 3)))
        if self.training:
            out = out + self.aux(y).mean((2, 3))
        return out


# by hand: weight elements x output positions
CONV_MACS = 3 * 8 * 9 * H * W  # 82,944
DW_MACS = 8 * 9 * (H // 2) * (W // 2)  # 6,912 (a depthwise conv counts 9 weights per channel)
FC_MACS = 8 * 5  # 40
ALL_PARAMS = 224 + 16 + 72 + 45 + 45 + 10_100  # 10,502
INFERENCE_PARAMS = 224 + 16 + 72 + 45  # 357: aux and unused are not run in eval


def test_parameters_all_and_at_inference():
    model = Tiny().train()
    assert count_parameters(model) == ALL_PARAMS
    assert inference_parameters(model, (H, W)) == INFERENCE_PARAMS
    assert model.training  # the eval forward restores the flag
    model.unused.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == ALL_PARAMS - 10_000


def test_shared_modules_are_counted_once():
    conv = nn.Conv2d(3, 3, 1, bias=False)
    model = nn.Sequential(conv, nn.ReLU(), conv)  # one module twice: 9 weights, run twice
    assert count_parameters(model) == 9 and inference_parameters(model, (4, 4)) == 9
    assert count_macs(model, (4, 4)) == 2 * 9 * 16


def test_macs_by_hand_and_flops_twice_the_macs():
    model = Tiny()
    assert count_macs(model, (H, W)) == CONV_MACS + DW_MACS + FC_MACS == 89_896
    assert count_macs(model, f"{2 * H}x{2 * W}") == 4 * (CONV_MACS + DW_MACS) + FC_MACS
    pure_conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False),
                              nn.Conv2d(4, 4, 3, padding=1, groups=2))
    macs = count_macs(pure_conv, (H, W))
    assert macs == (216 + 32 + 72) * H * W
    assert count_flops(pure_conv, (H, W)) == 2 * macs
    assert count_flops(model, (H, W)) == 2 * (CONV_MACS + DW_MACS + FC_MACS)
    assert model_cost(model, (H, W)) == {"params": ALL_PARAMS, "params_inference": INFERENCE_PARAMS,
                                         "macs": 89_896, "flops": 2 * 89_896}


def test_counting_works_on_the_meta_device():
    with torch.device("meta"):
        model = Tiny()
    assert model_cost(model, (H, W)) == model_cost(Tiny(), (H, W))


def test_bad_size_is_named():
    with pytest.raises(ValueError, match="size must look like HxW"):
        count_macs(Tiny(), "16")


class FakeClock:
    """A ``time`` module whose clock advances only inside the model: by the scripted duration of each call."""

    def __init__(self, durations: list[float]) -> None:
        self.now, self.durations, self.runs = 100.0, list(durations), 0

    def perf_counter(self) -> float:
        return self.now

    def model_ran(self, module, inputs, output) -> None:
        self.now += self.durations[self.runs]
        self.runs += 1


def test_latency_is_the_median_of_the_timed_runs_after_warmup(monkeypatch):
    warm = [9.0, 7.0]  # slow first runs must not count
    timed = [0.003, 0.001, 0.004, 0.001, 0.005]
    clock = FakeClock(warm + timed)
    monkeypatch.setattr(cost, "time", clock)
    model = Tiny().train()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append((m.training, tuple(i[0].shape))))
    model.register_forward_hook(clock.model_ran)
    res = measure_latency(model, (H, W), device="cpu", warmup=2, repeats=5)
    assert len(calls) == 7 and all(not training and shape == (1, 3, H, W) for training, shape in calls)
    assert res["median_ms"] == pytest.approx(3.0) and res["min_ms"] == pytest.approx(1.0)
    assert res["max_ms"] == pytest.approx(5.0) and res["mean_ms"] == pytest.approx(statistics.fmean(timed) * 1e3)
    assert (res["repeats"], res["warmup"], res["device"], res["input"]) == (5, 2, "cpu", [1, 3, H, W])


def test_latency_arguments_are_checked():
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        measure_latency(Tiny(), (H, W), device="cpu", repeats=0)
    with pytest.raises(ValueError, match="warmup must be >= 0"):
        measure_latency(Tiny(), (H, W), device="cpu", warmup=-1)


# §5: the prediction modules, formula vs counted (moved here with head_cost_sweep)


@pytest.mark.parametrize("C,N", [(128, 19), (64, 19), (256, 150)])
def test_head_cost_matches_section5_formulas(C, N):
    H, W = 16, 32
    rows = {r["head"]: r for r in head_cost_sweep([C], [N], H, W)}
    for head, r in rows.items():
        # §5 counts convolution weights and their MACs: our modules match them exactly
        assert r["conv_params"] == r["params_formula"], head
        assert r["macs"] == r["macs_formula"], head
    # what the formula leaves out: the classifier bias and the BatchNorms (2 per channel)
    assert rows["bilinear"]["params_inference"] - rows["bilinear"]["conv_params"] == N + 2 * C + 2 * C
    assert rows["pixel_shuffle"]["params_inference"] - rows["pixel_shuffle"]["conv_params"] == N + 2 * (C // 2) + 2 * (2 * C) + 2 * (C // 2)


def test_pixel_shuffle_saves_macs_only_above_the_crossover():
    from fasterkd.paper import ps_crossover_channels

    N = 19
    cross = ps_crossover_channels(N)  # 138
    rows = head_cost_sweep([128, 160], [N], 8, 8)
    macs = {(r["head"], r["C"]): r["macs"] for r in rows}
    assert 128 < cross < 160
    assert macs[("pixel_shuffle", 128)] > macs[("bilinear", 128)]
    assert macs[("pixel_shuffle", 160)] < macs[("bilinear", 160)]


def test_head_cost_counts_every_parameter_of_the_module():
    # the official student's prediction modules (C = 128, N = 19): every parameter, including
    # FFM's attention that never runs, as chapter 1's table counts them
    rows = {r["head"]: r for r in head_cost_sweep([128], [19], 16, 32)}
    assert rows["bilinear"]["params"] == 199_571 and rows["pixel_shuffle"]["params"] == 61_651
    for r in rows.values():
        assert r["params"] > r["params_inference"] > r["conv_params"]
