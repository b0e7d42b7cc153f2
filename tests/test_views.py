"""Views: the policy registry (names, plug-ins, policy objects), one-line errors, multi-crop sizes."""
import sys

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T

from ssl_bench.data import views
from ssl_bench.data.pipeline import PretrainDataset
from ssl_bench.data.transforms import build_policy
from ssl_bench.data.views import View, resolve_policy
from ssl_bench.errors import UserError


def test_builtin_policies_by_name():
    assert {"mim", "simsiam", "byol", "multicrop"} <= set(views.available_policies())
    (mim,) = resolve_policy("mim")
    assert mim.jitter is None and mim.crop_scale == (0.2, 1.0) and mim.flip_p == 0.5
    a, b = resolve_policy("simsiam")
    assert a == b and a.jitter == (0.4, 0.4, 0.4, 0.1) and a.jitter_p == 0.8  # MoCo v2's saturation is 0.4
    assert (a.grayscale_p, a.blur_p, a.solarize_p) == (0.2, 0.5, 0.0)
    first, second = resolve_policy("byol")
    assert (first.blur_p, first.solarize_p, second.blur_p, second.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert first.crop_scale == (0.08, 1.0) and first.jitter == (0.4, 0.4, 0.2, 0.1)


def test_policy_constructors_take_keyword_options():
    (v,) = views.mim(crop_scale=(0.5, 1.0), jitter=(0.1, 0.1, 0.1, 0.0), jitter_p=0.3)
    assert v.crop_scale == (0.5, 1.0) and v.jitter_p == 0.3
    crops = views.multicrop(n_local=3, local_size=12, global_scale=(0.5, 1.0), local_scale=(0.1, 0.5))
    assert len(crops) == 5 and [c.size for c in crops] == [None, None, 12, 12, 12]
    assert crops[0].crop_scale == (0.5, 1.0) and crops[2].crop_scale == (0.1, 0.5)


def test_unknown_name_is_one_line_listing_the_known():
    with pytest.raises(UserError, match=r"unknown augmentation policy 'dino'; known: .*byol.*mim.*multicrop.*simsiam") as info:
        resolve_policy("dino")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [42, (), ("mim",), object()])
def test_a_non_policy_is_a_user_error(bad):
    with pytest.raises(UserError, match="is not a policy"):
        resolve_policy(bad)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(flip_p=1.5), "flip_p=1.5: must be a probability"),
    (dict(crop_scale=(0.5, 0.2)), "crop_scale"),
    (dict(jitter=(0.4, 0.4)), "jitter"),
    (dict(size=0), "size=0"),
])
def test_bad_view_values_are_user_errors(kwargs, fragment):
    with pytest.raises(UserError, match=fragment):
        View(**kwargs)


def test_policy_objects_functions_and_registration():
    one = View(size=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0)
    assert resolve_policy(one) == (one,)
    assert resolve_policy([one, one]) == (one, one)
    assert resolve_policy(views.byol) == views.byol()  # a function returning a policy

    @views.register_policy("test-two-sizes")
    def two_sizes(small=8):
        return (View(), View(size=small))

    try:
        assert resolve_policy("test-two-sizes")[1].size == 8
        with pytest.raises(TypeError, match="taken"):
            views.register_policy("test-two-sizes")(lambda: (View(),))
    finally:
        views._POLICIES.pop("test-two-sizes")


def test_entry_point_policy_from_another_package(tmp_path, monkeypatch):
    (tmp_path / "toy_views.py").write_text(
        "from ssl_bench.data.views import View\n"
        "def tiny(size=10):\n    return (View(size=size), View(size=size, blur_p=1.0))\n"
    )
    dist = tmp_path / "toy_views-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-views\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ssl_bench.views]\ntoy-tiny = toy_views:tiny\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(views, "_discovered", False)
    monkeypatch.setattr(views, "_POLICIES", dict(views._POLICIES))
    try:
        assert [v.size for v in resolve_policy("toy-tiny")] == [10, 10]
    finally:
        sys.modules.pop("toy_views", None)


def test_cpu_path_builds_torchvision_ops_from_views():
    fancy = View(size=20, crop_scale=(0.3, 0.9), crop_ratio=(0.5, 2.0), flip_p=0.25, jitter=(0.4, 0.3, 0.2, 0.1),
                 jitter_p=0.6, grayscale_p=0.1, blur_p=0.7, blur_sigma=(0.5, 1.5), solarize_p=0.3)
    (compose,) = build_policy((fancy,), 28, 3, (0.5,) * 3, (0.25,) * 3).transforms
    ops = {type(t).__name__: t for t in compose.transforms}
    crop = ops["RandomResizedCrop"]
    assert tuple(crop.size) == (20, 20) and crop.scale == (0.3, 0.9) and crop.ratio == (0.5, 2.0)
    applied_jitter, blur = [t for t in compose.transforms if isinstance(t, T.RandomApply)]
    jitter = applied_jitter.transforms[0]
    assert isinstance(jitter, T.ColorJitter) and jitter.saturation == (0.8, 1.2) and jitter.hue == (-0.1, 0.1)
    assert applied_jitter.p == 0.6 and ops["RandomGrayscale"].p == 0.1
    assert ops["RandomSolarize"].p == 0.3 and ops["RandomHorizontalFlip"].p == 0.25
    assert blur.p == 0.7 and list(blur.transforms[0].sigma) == [0.5, 1.5]
    # 1-channel data: no saturation, hue or grayscale
    (grey,) = build_policy((fancy,), 28, 1, (0.5,), (0.25,)).transforms
    names = [type(t).__name__ for t in grey.transforms]
    assert "RandomGrayscale" not in names
    assert grey.transforms[1].transforms[0].saturation is None and grey.transforms[1].transforms[0].hue is None


def test_views_of_different_sizes_batch_as_one_tensor_per_view(fashion_info):
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    base = torch.utils.data.TensorDataset(images, torch.zeros(40, dtype=torch.long))
    policy = build_policy(views.multicrop(n_local=2, local_size=12), 28, 1, fashion_info.mean, fashion_info.std)
    batch = next(iter(DataLoader(PretrainDataset(base, policy, seed=1), batch_size=8)))
    assert [tuple(v.shape) for v in batch["views"]] == [(8, 1, 28, 28)] * 2 + [(8, 1, 12, 12)] * 2
