"""The synthetic-data audit's metrics on sets with known answers (issue 12): chunked neighbours equal
brute force; copies of training images are flagged and new real images are not; a mode-collapsed set
has low recall and coverage; real held-out images score near the real floor; MS-SSIM ranks a
collapsed set above a diverse one; a classifier trained on images whose labels say nothing is at chance.

Images are the built-in phantoms (32 px, two classes): real parts, no model needed."""
from __future__ import annotations

import pytest
import torch

import dgan.data.build as build
from dgan.config import load_config
from dgan.data.synthetic import make_phantoms
from dgan.errors import MetricError
from dgan.metrics import (build_tiny_extractor, closest_pairs, density_coverage, extract_features,
                          memorization_audit, ms_ssim_diversity, precision_recall, train_synthetic_test_real)
from dgan.metrics.neighbours import kth_neighbour_radius, nearest
from dgan.pixels import to_uint8
from dgan.reference import load_reference, load_reference_u8


def phantoms(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = make_phantoms(n, 32, seed)
    return torch.from_numpy(images)[:, None], torch.from_numpy(labels)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Training, held-out and 'generated' phantoms, and their features from a tiny extractor."""
    extractor = build_tiny_extractor(tmp_path_factory.mktemp("x") / "tiny.pt")
    train, train_y = phantoms(600, seed=1)
    holdout, holdout_y = phantoms(300, seed=2)
    new, new_y = phantoms(300, seed=3)  # real images from the same source, in no other set

    def feats(x):
        return extract_features(x, extractor_path=extractor)
    return {"train": train, "train_y": train_y, "holdout": holdout, "holdout_y": holdout_y, "new": new,
            "new_y": new_y, "feats": feats, "f_train": feats(train), "f_holdout": feats(holdout), "f_new": feats(new)}


def test_chunked_neighbours_equal_brute_force():
    gen = torch.Generator().manual_seed(0)
    query, bank = torch.randn(37, 5, generator=gen), torch.randn(53, 5, generator=gen)
    d, i = nearest(query, bank, k=3, chunk=7)
    full = torch.cdist(query, bank)
    want_d, want_i = full.topk(3, dim=1, largest=False)
    assert torch.allclose(d, want_d, atol=1e-5) and torch.equal(i, want_i)
    self_full = torch.cdist(bank, bank) + torch.diag(torch.full((53,), float("inf")))
    assert torch.allclose(kth_neighbour_radius(bank, 2, chunk=6), self_full.topk(2, dim=1, largest=False)[0][:, 1],
                          atol=1e-5)


def test_copies_of_training_images_are_flagged_and_new_real_images_are_not(sets):
    train = sets["train"]
    # a "generator" that returns training images, jittered: 3% brighter and +-3 grey levels of noise
    gen = torch.Generator().manual_seed(0)
    copies = (train[:200].float() * 1.03).round() + torch.randint(-3, 4, (200, 1, 32, 32), generator=gen)
    copies = copies.clamp(0, 255).to(torch.uint8)
    copied = memorization_audit(sets["f_train"], sets["f_holdout"], sets["feats"](copies), train, sets["holdout"],
                                copies).metrics()
    fresh_audit = memorization_audit(sets["f_train"], sets["f_holdout"], sets["f_new"], train, sets["holdout"],
                                     sets["new"])
    fresh = fresh_audit.metrics()
    # the real floor: held-out images judged by the rule as if generated flag about 1%, by construction
    assert fresh_audit.floor_rate() < 0.06
    small = memorization_audit(sets["f_train"], sets["f_holdout"][:150], sets["f_new"], train, sets["holdout"][:150],
                               sets["new"])
    with pytest.raises(MetricError, match="hold out more images"):
        small.floor_rate()  # 75 per half: too few for a 1% quantile
    # a held-out split that leaks 5 training images: they are counted, and kept out of the baseline
    leaky = torch.cat([sets["holdout"], train[:5]])
    leak = memorization_audit(sets["f_train"], torch.cat([sets["f_holdout"], sets["f_train"][:5]]), sets["f_new"],
                              train, leaky, sets["new"]).metrics()
    assert leak["holdout_train_duplicates"] == 5 and leak["memorization_rate"] == fresh["memorization_rate"]
    print(f"copies: {copied}\nnew real images: {fresh}")
    assert copied["memorization_rate"] > 0.9 and copied["memorization_nn_ratio"] < 0.75
    assert fresh["memorization_rate"] < 0.06 and 0.8 < fresh["memorization_nn_ratio"] < 1.25


def test_closest_pairs_show_each_sample_beside_its_nearest_training_image(sets):
    train = sets["train"]
    result = memorization_audit(sets["f_train"], sets["f_holdout"], sets["f_train"][:20], train, sets["holdout"],
                                train[:20])
    pairs = closest_pairs(result, train[:20], train, n=4)
    assert pairs.shape == (8, 1, 32, 32) and pairs.dtype == torch.uint8
    assert torch.equal(pairs[0], pairs[1])  # an exact copy sits beside itself


def test_collapsed_set_has_low_recall_and_coverage_and_real_images_score_near_the_floor(sets):
    real, f = sets["f_holdout"], sets["feats"]
    collapsed = f(sets["new"][:1].expand(300, -1, -1, -1).contiguous())  # one image, 300 times
    good = {**precision_recall(real, sets["f_new"]), **density_coverage(real, sets["f_new"])}
    bad = {**precision_recall(real, collapsed), **density_coverage(real, collapsed)}
    print(f"real held-out: {good}\ncollapsed: {bad}")
    assert good["recall"] > 0.6 and good["coverage"] > 0.6 and good["precision"] > 0.6
    assert 0.6 < good["density"] < 1.6
    assert bad["recall"] < 0.05 and bad["coverage"] < 0.05


def test_ms_ssim_ranks_a_collapsed_set_above_a_diverse_one(sets):
    new = sets["new"]
    same = new[:1].expand(50, -1, -1, -1).contiguous()
    assert ms_ssim_diversity(same, pairs=20) == pytest.approx(1.0, abs=1e-4)
    gen = torch.Generator().manual_seed(0)
    near_same = (same.to(torch.int16) + torch.randint(-2, 3, same.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
    diverse = ms_ssim_diversity(new, pairs=200)
    assert ms_ssim_diversity(near_same, pairs=200) > diverse + 0.2


def two_class(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark (class 0) and bright (class 1) versions of the phantoms: classes a small CNN learns at once."""
    x, y = images.float() / 255.0, torch.arange(images.shape[0]) % 2
    x = torch.where(y[:, None, None, None] == 0, 0.45 * x, 0.55 + 0.45 * x)
    return (x * 255).round().to(torch.uint8), y


def test_utility_is_high_for_class_true_samples_and_at_chance_when_the_class_is_ignored(sets):
    train, train_y = two_class(sets["train"])
    test, test_y = two_class(sets["holdout"])
    synthetic, synthetic_y = two_class(sets["new"])  # "samples" as good as real ones
    # a conditional model that ignores its class: right-looking images, labels that say nothing
    ignored_y = torch.randint(0, 2, (synthetic.shape[0],), generator=torch.Generator().manual_seed(0))
    args = dict(num_classes=2, per_class_n=100, epochs=4)
    good = train_synthetic_test_real(synthetic, synthetic_y, train, train_y, test, test_y, **args)
    bad = train_synthetic_test_real(synthetic, ignored_y, train, train_y, test, test_y, **args)
    print(f"class-true synthetic: {good}\nclass-ignoring synthetic: {bad}")
    assert good["utility_synthetic_balanced_accuracy"] > 0.9 and good["utility_real_balanced_accuracy"] > 0.9
    assert good["utility_synthetic_auroc"] > 0.95
    # Its AUROC is not asserted: these two classes are perfectly separable by brightness, so any score
    # that happens to follow brightness ranks them at 0 or 1. Its accuracy shows it learned nothing.
    assert abs(bad["utility_synthetic_balanced_accuracy"] - 0.5) < 0.2
    assert bad["utility_real_balanced_accuracy"] == pytest.approx(good["utility_real_balanced_accuracy"])


def test_training_images_for_the_audit_read_in_chunks_equal_the_whole_read(monkeypatch):
    cfg = load_config(None, ["data.num_images=40"])
    whole, labels = load_reference(cfg, "train")
    monkeypatch.setattr(build, "EVAL_CHUNK", 16)  # three chunks: 16, 16, 8
    u8, u8_labels = load_reference_u8(cfg, "train")
    assert u8.dtype == torch.uint8 and torch.equal(u8, to_uint8(whole)) and torch.equal(u8_labels, labels)
