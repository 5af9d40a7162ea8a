"""The FasterSeg supernet (spec §4): official sizes (§14) and forward behaviour on a tiny space."""

import pytest
import torch

from fasterkd.models.supernet import OUTPUT_NAMES, Supernet, SupernetConfig, cell_grid


@pytest.fixture(scope="module")
def official() -> Supernet:
    with torch.device("meta"):  # 252 M parameters without allocating them
        return Supernet()


@pytest.fixture(scope="module")
def tiny() -> Supernet:
    torch.manual_seed(0)
    return Supernet(SupernetConfig(layers=5, fch=4))


def test_official_counts(official: Supernet) -> None:
    assert sum(p.numel() for p in official.parameters()) == 252_057_316
    assert sum(p.numel() for p in official.arch_parameters()) == 822
    assert len(official.cells) == 45
    assert sum(c.downsample is not None for c in official.cells) == 29
    assert [sum(p.numel() for p in s.parameters()) for s in official.stem] == [292_464, 130_464]


def test_official_arch_parameter_names_and_shapes(official: Supernet) -> None:
    shapes = {n: tuple(p.shape) for n, p in official.named_parameters() if n.startswith(("alpha", "beta", "ratio"))}
    for k, w in ((0, 1), (1, 5)):
        assert shapes[f"alpha_{k}_0"] == (16, 5) and shapes[f"alpha_{k}_1"] == (15, 5)
        assert shapes[f"alpha_{k}_2"] == (14, 5)
        assert shapes[f"beta_{k}_1"] == (14, 2) and shapes[f"beta_{k}_2"] == (13, 2)
        assert shapes[f"ratio_{k}_0"] == (15, w) and shapes[f"ratio_{k}_1"] == (15, w)
        assert shapes[f"ratio_{k}_2"] == (14, w)
    assert len(shapes) == 16


def test_parameter_groups_partition(official: Supernet) -> None:
    weights, arch = official.weight_parameters(), official.arch_parameters()
    assert len(weights) + len(arch) == len(list(official.parameters()))
    assert {id(p) for p in weights}.isdisjoint(id(p) for p in arch)
    assert [p.shape for p in official.arch_parameters(1)][-1] == (14, 5)


def test_cell_grid_layout() -> None:
    grid = cell_grid(16)
    assert [j for i, j, _ in grid if i == 0] == [0] and [j for i, j, _ in grid if i == 1] == [0, 1]
    assert all(not down for i, j, down in grid if i == 15 or j == 2)


def test_cell_widths_feed_consistently(official: Supernet) -> None:
    # both edges into a node produce the same width: check the ratio row bookkeeping (spec §4.3)
    widths = official.sample_widths(1, "random")
    made: dict[tuple[int, int], float] = {}
    for i, j, down in official.grid:
        w_in, w_out, w_down = official.cell_widths(1, widths, i, j)
        for key, w in (((i, j), w_out), ((i, j + 1), w_down)):
            if w is None:
                continue
            assert made.setdefault(key, w.ratio) == w.ratio
    # last layer outputs the student's head width at every rate
    assert all(official.cell_widths(1, widths, 15, j)[1].ratio == pytest.approx(8 / 12) for j in range(3))


@pytest.mark.parametrize("arch,mode", [(0, None), (1, None), (1, "max"), (1, "min"), (0, "random")])
def test_train_and_eval_output_shapes(tiny: Supernet, arch: int, mode: str | None) -> None:
    x = torch.randn(2, 3, 64, 96)
    tiny.train()
    out = tiny(x, arch=arch, mode=mode)
    assert tuple(out) == OUTPUT_NAMES
    assert all(v.shape == (2, 19, 8, 12) for v in out.values())
    tiny.eval()
    with torch.no_grad():
        out = tiny(x, arch=arch, mode=mode)
    assert all(v.shape == (2, 19, 64, 96) for v in out.values())
    tiny.train()


def test_gradients_reach_the_searched_parameters_only(tiny: Supernet) -> None:
    tiny.zero_grad(set_to_none=True)
    out = tiny(torch.randn(2, 3, 64, 64), arch=1)
    sum(v.square().mean() for v in out.values()).backward()
    for p in tiny.arch_parameters(1):  # alpha, beta and (straight-through) gamma of the student
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.arch_parameters(0))
    assert all(p.grad is None for p in tiny.stem[0].parameters())  # the teacher's stem is not used
    tiny.zero_grad(set_to_none=True)


def test_uniform_beta_mixes_both_inputs(tiny: Supernet) -> None:
    # making "from keep" dominate a cell's beta row must change the outputs (both inputs matter)
    x = torch.randn(1, 3, 64, 64)
    tiny.eval()
    with torch.no_grad():
        ref = tiny(x, arch=0)["32s"]
        saved = tiny.beta_0_1.clone()
        tiny.beta_0_1[:, 1] = 20.0
        changed = tiny(x, arch=0)["32s"]
        tiny.beta_0_1.copy_(saved)
    tiny.train()
    assert not torch.allclose(ref, changed)


def test_bad_input(tiny: Supernet) -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        tiny(torch.randn(1, 3, 40, 64))
    with pytest.raises(ValueError, match="arch"):
        tiny(torch.randn(1, 3, 64, 64), arch=2)
    with pytest.raises(ValueError, match="mode"):
        tiny(torch.randn(1, 3, 64, 64), mode="widest")
    with pytest.raises(ValueError, match="layers"):
        Supernet(SupernetConfig(layers=3))
    with pytest.raises(ValueError, match="head width"):
        Supernet(SupernetConfig(stem_head_widths=((1.0, 0.7), (1.0, 1.0))))
