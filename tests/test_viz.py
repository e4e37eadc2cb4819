"""deformconv.viz: sampling locations through stacked layers, offset magnitudes, plots."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deformconv
from deformconv import viz


def stack(layers: int = 3) -> nn.Module:
    return nn.Sequential(*(deformconv.DeformableConv2d(1, 1, 3, padding=1)
                           for _ in range(layers)))  # fmt: skip


def test_zero_offsets_give_the_regular_grid():
    levels = viz.sampling_locations(stack(), torch.rand(1, 11, 11), unit=(5, 5))
    assert [level.shape for level in levels] == [(9, 2), (81, 2), (729, 2)]
    for depth, level in enumerate(levels, start=1):
        # Each level widens the 3×3 grid by one pixel on every side.
        assert set(level[:, 0].tolist()) == set(range(5 - depth, 6 + depth))
        assert set(level[:, 1].tolist()) == set(range(5 - depth, 6 + depth))


def test_learned_offsets_move_the_points():
    net = stack(2)
    with torch.no_grad():
        net[1].conv_offset.bias[0::2] = 1.5  # Δy of every tap of the last layer
    first, second = viz.sampling_locations(net, torch.rand(1, 9, 9), unit=(4, 4))
    assert set(first[:, 0].tolist()) == {4.5, 5.5, 6.5}
    assert set(first[:, 1].tolist()) == {3.0, 4.0, 5.0}
    assert second[:, 0].min() == pytest.approx(3.5)


def test_strided_layers_are_mapped_to_image_pixels():
    from deformconv.demo.models import deformable_digit_net

    levels = viz.sampling_locations(deformable_digit_net(), torch.rand(1, 28, 28))
    assert [level.shape[0] for level in levels] == [9, 81, 729]
    # conv4's centre unit (3, 3) of 7×7 lies at pixel 12 of the image; zero offsets keep the
    # points symmetric about it.
    for level in levels:
        assert level.mean(0).tolist() == pytest.approx([12.0, 12.0])


def test_offset_magnitudes_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    net = stack()
    with torch.no_grad():
        net[2].conv_offset.bias.fill_(0.5)
    maps = viz.offset_magnitudes(net, torch.rand(1, 8, 8))
    assert [name for name, _ in maps] == ["0", "1", "2"]
    assert maps[0][1].shape == (8, 8) and maps[0][1].abs().max() == 0
    torch.testing.assert_close(maps[2][1], torch.full((8, 8), 0.5 * 2**0.5))
    image = torch.rand(1, 8, 8)
    viz.plot_sampling_locations(net, [image, image], titles=["a", "b"], path=tmp_path / "s.png")
    viz.plot_offset_magnitudes(net, image, path=tmp_path / "m.png")
    assert (tmp_path / "s.png").stat().st_size > 1000 and (tmp_path / "m.png").stat().st_size > 1000


def test_models_without_deformable_layers_are_refused():
    with pytest.raises(ValueError, match="no DeformableConv2d"):
        viz.sampling_locations(nn.Conv2d(1, 1, 3), torch.rand(1, 5, 5))
