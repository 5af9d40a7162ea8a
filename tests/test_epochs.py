"""What an epoch is (one pass, or a fixed number of steps cycling reshuffled passes), the global batch
over ranks, and FasterSeg's search downsampling of the frames."""

from __future__ import annotations

import pytest
import torch

from fasterkd.config import preset
from fasterkd.data.loaders import SeededTrainSet, epoch_batches, rank_batch, steps_per_epoch
from fasterkd.data.transforms import EvalTransform, TrainTransform, shrink
from fasterkd.distributed import DistInfo


class Indices(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"i": torch.tensor(i)}


def _order(cfg, ds, epoch: int, steps: int) -> list[list[int]]:
    return [b["i"].tolist() for b in epoch_batches(ds, cfg, epoch, DistInfo(), steps)]


def test_fixed_length_epochs_cycle_reshuffled_passes_deterministically():
    cfg = preset("baseline", "smoke", batch_size=2)
    ds = Indices(6)  # a pass: 3 batches of 2
    one_pass = _order(cfg, ds, 0, steps_per_epoch(cfg, ds, DistInfo()))
    assert len(one_pass) == 3 and sorted(sum(one_pass, [])) == list(range(6))
    cfg.iters_per_epoch = 7
    assert steps_per_epoch(cfg, ds, DistInfo()) == 7
    long = _order(cfg, ds, 0, 7)
    assert len(long) == 7 and long[:3] == one_pass  # the first pass is the one-pass epoch
    assert sorted(sum(long[3:6], [])) == list(range(6)) and long[3:6] != one_pass  # a reshuffled second pass
    assert long == _order(cfg, ds, 0, 7)  # from (seed, epoch, pass) only
    assert long != _order(cfg, ds, 1, 7)
    cfg.max_steps_per_epoch = 4  # a cap for short runs: the smaller of the two
    assert steps_per_epoch(cfg, ds, DistInfo()) == 4


def test_later_passes_draw_fresh_augmentation():
    base = [{"image": torch.rand(3, 32, 32), "label": torch.zeros(32, 32, dtype=torch.long), "name": "a"}]
    ds = SeededTrainSet(base, TrainTransform(crop=(16, 16), scales=(1.0,), flip=True), seed=3)
    ds.set_epoch(2, 0)
    first = ds[0]["image"]
    ds.set_epoch(2, 1)
    second = ds[0]["image"]
    ds.set_epoch(2, 0)
    assert torch.equal(ds[0]["image"], first) and not torch.equal(first, second)


def test_fasterseg_search_epoch_length():
    cfg = preset("search", "paper")
    half = Indices(1487)
    # spec §6.1: max(2975 // 2 // batch, 400): 495 at batch 3, 743 at batch 2; the paper's batch 6: 400
    assert steps_per_epoch(cfg, half, DistInfo(), split_images=2975) == 400
    assert steps_per_epoch(cfg, half, DistInfo(), split_images=2975, batch_size=3) == 495
    assert steps_per_epoch(cfg, half, DistInfo(), split_images=2975, batch_size=2) == 743
    with pytest.raises(ValueError, match="search stage only"):
        preset("baseline", "paper", iters_per_epoch="fasterseg").validate()
    with pytest.raises(ValueError, match="iters_per_epoch must be None, a positive int"):
        preset("baseline", "smoke", iters_per_epoch=0).validate()


def test_paper_training_stages_count_fasterseg_epochs():
    for stage in ("baseline", "tutor", "student", "head"):
        assert preset(stage, "paper").iters_per_epoch == 1000
    assert preset("teacher", "paper").iters_per_epoch is None  # HRNet's recipe counts passes
    for profile in ("smoke", "quick"):
        assert all(preset(st, profile).iters_per_epoch is None for st in ("search", "baseline", "student"))


def test_batch_size_is_global_and_must_divide_over_the_ranks():
    assert rank_batch(10, DistInfo()) == 10
    assert rank_batch(10, DistInfo(rank=1, world=2)) == 5
    assert rank_batch(6, DistInfo(world=2)) == 3  # the paper's search batch on 2 GPUs
    with pytest.raises(ValueError, match=r"batch_size=6 .*world size 4"):
        rank_batch(6, DistInfo(world=4))
    with pytest.raises(ValueError, match=r"batch_size=10 .*world size 4"):
        steps_per_epoch(preset("baseline", "paper"), Indices(100), DistInfo(world=4))


def test_downsampling_shrinks_image_and_label_before_the_crop():
    torch.manual_seed(0)
    image = torch.rand(3, 40, 60)
    label = torch.randint(0, 19, (40, 60))
    label[:4] = 255
    img, lab = shrink(image, label, 2)
    assert img.shape == (3, 20, 30) and lab.shape == (20, 30)
    # the image is the 2x2 mean (the same as a bilinear half-size resize), the label a pixel of the original
    assert torch.allclose(img, image.view(3, 20, 2, 30, 2).mean((2, 4)))
    assert torch.equal(lab, label[::2, ::2])
    assert set(lab.unique().tolist()) <= set(label.unique().tolist())
    # in the augmentation: shrink first, then scale 1 and a crop bigger than the frame (centred pad)
    tf = TrainTransform(crop=(24, 32), scales=(1.0,), flip=False, downsample=2)
    out_img, out_lab = tf(image, label, 0)
    assert out_img.shape == (3, 24, 32) and out_lab.shape == (24, 32)
    assert (out_lab == 255).sum() >= 24 * 32 - 20 * 30  # the padding is ignore
    assert torch.equal(out_lab[2:22, 1:31], lab)
    ev_img, ev_lab = EvalTransform(downsample=2)(image, label)
    assert ev_img.shape == (3, 20, 30) and torch.equal(ev_lab, lab)
    with pytest.raises(ValueError, match="downsample must be an int >= 1"):
        TrainTransform(crop=(8, 8), downsample=0)
    # a typed override refuses 1.5 as it is set; validate() refuses a value out of range
    with pytest.raises(ValueError, match="data.downsample: expected an integer, got 1.5"):
        preset("search", "smoke", downsample=1.5)
    with pytest.raises(ValueError, match="data.downsample must be an int >= 1"):
        preset("search", "smoke", downsample=0).validate()
