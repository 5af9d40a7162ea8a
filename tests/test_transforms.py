"""FasterSeg's augmentation (fasterseg-spec.md §9.4): the label follows the image exactly.

The image encodes each pixel's source coordinates (R = x / W, G = y / H, linear ramps that bilinear
resampling reproduces), the label encodes them too (256 + y * W + x, never 255). After a transform
both are decoded and compared pixel by pixel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fasterkd.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform, denormalize, normalize

H, W = 40, 60


def coord_pair(h: int = H, w: int = W) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    image = torch.stack([xs / w, ys / h, torch.full_like(xs, 0.5)]).float()
    label = (256 + ys * w + xs).long()
    return image, label


def decode_image(img: torch.Tensor, h: int = H, w: int = W) -> tuple[torch.Tensor, torch.Tensor]:
    den = denormalize(img).double()
    return den[0] * w, den[1] * h


def decode_label(lab: torch.Tensor, w: int = W) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    valid = lab != 255
    v = (lab - 256).clamp(min=0)
    return (v % w).double(), (v // w).double(), valid


def test_scale_one_crop_and_flip_keep_label_and_image_aligned_exactly():
    image, label = coord_pair()
    tf = TrainTransform(crop=(24, 32), scales=(1.0,), flip=True)
    offsets, flips = set(), 0
    for seed in range(60):
        img, lab = tf(image, label, seed)
        assert img.shape == (3, 24, 32) and img.dtype == torch.float32 and lab.shape == (24, 32) and lab.dtype == torch.int64
        xi, yi = decode_image(img)
        xl, yl, valid = decode_label(lab)
        assert valid.all()  # the crop lies inside the image: no padding
        assert torch.allclose(xi, xl, atol=1e-3) and torch.allclose(yi, yl, atol=1e-3)
        # a window of the original, mirrored or not
        flipped = bool(xl[0, 0] > xl[0, -1])
        flips += flipped
        step = -1 if flipped else 1
        assert torch.equal(xl[0], xl[0, 0] + step * torch.arange(32, dtype=torch.float64))
        assert torch.equal(yl[:, 0], yl[0, 0] + torch.arange(24, dtype=torch.float64))
        offsets.add((int(yl[0, 0]), int(xl[0, -1] if flipped else xl[0, 0])))
    assert 18 <= flips <= 42  # p = 0.5
    ys, xs = zip(*offsets)
    assert min(ys) >= 0 and max(ys) <= H - 24 and min(xs) >= 0 and max(xs) <= W - 32
    assert len(set(ys)) > 5 and len(set(xs)) > 5  # the crop position is random


@pytest.mark.parametrize("scales", [(0.75,), (1.25,), (0.75, 1.0, 1.25)])
def test_rescaled_label_follows_the_image_within_a_pixel(scales):
    image, label = coord_pair()
    tf = TrainTransform(crop=(32, 48), scales=scales, flip=True)
    for seed in range(20):
        img, lab = tf(image, label, seed)
        xi, yi = decode_image(img)
        xl, yl, valid = decode_label(lab)
        # bilinear (image) and nearest (label) resampling agree to within one source pixel
        assert (xi - xl)[valid].abs().max() < 1.2 and (yi - yl)[valid].abs().max() < 1.2
        # padded pixels (label 255) are the mean colour: 0 after normalisation
        assert torch.all(img[:, ~valid] == 0)


def test_padding_is_centred_label_255_and_image_mean_or_black():
    image, label = coord_pair(10, 20)
    for pad_image, pad_rgb in (("mean", torch.tensor(IMAGENET_MEAN)), ("black", torch.zeros(3))):
        img, lab = TrainTransform(crop=(16, 30), scales=(1.0,), flip=False, pad_image=pad_image)(image, label, 0)
        # 6 rows and 10 columns of padding, split evenly
        inner = torch.zeros(16, 30, dtype=torch.bool)
        inner[3:13, 5:25] = True
        assert torch.all(lab[~inner] == 255) and torch.equal(lab[inner].view(10, 20), label)
        den = denormalize(img)
        assert torch.allclose(den[:, ~inner], pad_rgb[:, None].expand(3, int((~inner).sum())), atol=1e-6)
        assert torch.allclose(den[:, inner].view(3, 10, 20), image, atol=1e-6)


def test_scales_are_drawn_from_the_set_or_the_range():
    image, label = coord_pair()

    def region(tf, seed):
        _, lab = tf(image, label, seed)
        valid = lab != 255
        return int(valid.any(1).sum()), int(valid.any(0).sum())

    tf = TrainTransform(crop=(64, 96), scales=(0.75, 1.0, 1.25), flip=False)  # the crop holds every rescaled image
    seen = {region(tf, s) for s in range(40)}
    assert seen == {(30, 45), (40, 60), (50, 75)}
    tf = TrainTransform(crop=(80, 120), scale_range=(0.5, 2.0), flip=False)
    heights = [region(tf, s)[0] for s in range(40)]
    assert min(heights) >= 20 and max(heights) <= 80 and len(set(heights)) > 10


def test_same_generator_same_sample_and_label_downsampling():
    image, label = coord_pair()
    tf = TrainTransform(crop=(32, 48), flip=True)
    a, b = tf(image, label, 123), tf(image, label, torch.Generator().manual_seed(123))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = tf(image, label, 124)
    assert not torch.equal(a[0], c[0])
    down = TrainTransform(crop=(32, 48), flip=True, label_downsample=8)
    img8, lab8 = down(image, label, 123)
    assert torch.equal(img8, a[0]) and lab8.shape == (4, 6)
    assert torch.equal(lab8, a[1][::8, ::8])  # nearest: the top-left pixel of each 8x8 cell


def test_uint8_input_and_imagenet_normalisation():
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    x = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = (x.float() / 255 - mean) / std
    assert torch.allclose(normalize(x), expected, atol=1e-6)
    assert torch.allclose(normalize(x.float() / 255), expected, atol=1e-6)
    assert torch.allclose(normalize(x[None])[0], expected, atol=1e-6)
    assert torch.allclose(denormalize(normalize(x.float() / 255)), x.float() / 255, atol=1e-6)
    assert torch.allclose(normalize(mean.expand(3, 2, 2)), torch.zeros(3, 2, 2), atol=1e-6)
    label = torch.randint(0, 19, (5, 7))
    img, lab = EvalTransform()(x, label)
    assert torch.allclose(img, expected, atol=1e-6) and torch.equal(lab, label)
    img, lab = TrainTransform(crop=(5, 7), scales=(1.0,), flip=False)(x, label, 0)
    assert torch.allclose(img, expected, atol=1e-6) and torch.equal(lab, label)


def test_bad_arguments_are_named():
    image, label = coord_pair()
    with pytest.raises(ValueError, match="crop must be a positive"):
        TrainTransform(crop=(0, 32))
    with pytest.raises(ValueError, match="scales must be a non-empty set"):
        TrainTransform(scales=())
    with pytest.raises(ValueError, match="scale_range must be"):
        TrainTransform(scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="label_downsample must be a positive integer dividing the crop"):
        TrainTransform(crop=(30, 40), label_downsample=8)
    with pytest.raises(ValueError, match="pad_image must be"):
        TrainTransform(pad_image="zero")
    with pytest.raises(ValueError, match=r"label is \(40, 59\) but the image is \(40, 60\)"):
        TrainTransform(crop=(16, 16))(image, label[:, :59], 0)
    with pytest.raises(ValueError, match=r"image must be a \(3, H, W\) RGB tensor"):
        EvalTransform()(image[:2], label)
