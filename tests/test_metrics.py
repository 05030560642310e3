"""Metrics: FID-Whole / FID-Patch against scipy, the patch crop, CLIP score against open_clip,
the reference-statistics cache, and the missing-weights errors. Tiny networks, CPU, seconds."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket

import numpy as np
import open_clip
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import torchmetrics.image.fid
from safetensors.torch import save_file
from torch import nn
from torchvision.transforms.functional import to_pil_image

from lightning_sdxl.metrics import (
    CLIPScore,
    FIDPatch,
    FIDWhole,
    InceptionFeatures,
    LocalFeatures,
    MissingMetricWeights,
    OpenCLIPScorer,
    ReferenceStats,
    ReferenceStatsCache,
    prepare_reference,
)
from lightning_sdxl.metrics import fid as fid_module
from lightning_sdxl.metrics.features import INCEPTION_FILENAMES, INCEPTION_URL

TINY_CLIP = "lightning-sdxl-test-clip"


class TinyFeatureNet(nn.Module):
    """A conv net on [0, 1] images: (B, 3, S, S) -> (B, 6)."""

    num_features = 6

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, kernel_size=3, stride=2)

    def forward(self, images):
        return torch.tanh(self.conv(images * 2 - 1)).mean(dim=(2, 3)) * 10  # (B, 6)


def save_tiny_net(path, seed: int) -> str:
    torch.manual_seed(seed)
    save_file(TinyFeatureNet().state_dict(), str(path))
    return str(path)


@pytest.fixture
def weights(tmp_path):
    return save_tiny_net(tmp_path / "tiny_net.safetensors", seed=0)


def tiny_extractor(weights_path, input_size=8) -> LocalFeatures:
    return LocalFeatures(TinyFeatureNet(), weights_path, input_size=input_size)


def random_images(n, size, seed, shift=0.0):
    """Images with per-image colour offsets, so the features vary along every direction."""
    generator = torch.Generator().manual_seed(seed)
    colour = torch.rand(n, 3, 1, 1, generator=generator)
    noise = torch.rand(n, 3, size, size, generator=generator)
    return (0.5 * colour + 0.5 * noise + shift).clamp(0, 1)


def scipy_fid(real, fake) -> float:
    """FID from features with numpy statistics and scipy's matrix square root."""
    real, fake = real.double().numpy(), fake.double().numpy()
    mu1, mu2 = real.mean(0), fake.mean(0)
    sigma1, sigma2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean))


def test_fid_whole_matches_scipy(weights):
    extractor = tiny_extractor(weights, input_size=8)
    metric = FIDWhole(extractor)
    assert not extractor.training and not metric.train().extractor.training
    real, fake = random_images(40, 12, seed=1), random_images(40, 12, seed=2, shift=0.1)
    metric.update(real[:20], real=True)
    metric.update(real[20:], real=True)
    metric.update(fake, real=False)

    def features(images):  # the whole view: bilinear, antialias resize to the input size
        return extractor(F.interpolate(images, size=(8, 8), mode="bilinear", antialias=True))

    expected = scipy_fid(features(real), features(fake))
    assert expected > 1e-2
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-3)


def test_fid_of_a_set_against_itself_is_zero(weights):
    metric = FIDWhole(tiny_extractor(weights))
    images = random_images(32, 8, seed=3)
    metric.update(images, real=True)
    metric.update(images, real=False)
    stats = metric.reference_stats()
    assert abs(float(metric.compute())) < 1e-6 * float(stats.cov.trace())


def test_fid_rejects_images_outside_unit_range(weights):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        FIDWhole(tiny_extractor(weights)).update(random_images(2, 8, seed=0) * 2 - 1, real=True)


def test_patch_view_is_the_native_centre_crop(weights):
    metric = FIDPatch(tiny_extractor(weights, input_size=8))
    # 20 x 21 images: the crop starts at ((20 - 8) // 2, (21 - 8) // 2) = (6, 6).
    images = torch.zeros(2, 3, 20, 21)
    images[..., 6:14, 6:14] = torch.randint(1, 9, (2, 3, 8, 8)) / 8  # sums exactly
    seen = []
    metric.extractor.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    metric.update(images, real=True)
    assert torch.equal(seen[0], images[..., 6:14, 6:14])
    assert seen[0].sum() == images.sum()  # every non-zero pixel, no resampling
    with pytest.raises(ValueError, match="smaller input size"):
        metric.update(torch.rand(1, 3, 7, 20), real=True)


def test_load_reference_stats_is_exact_and_rank_aware(weights, monkeypatch):
    metric = FIDWhole(tiny_extractor(weights))
    metric.update(random_images(10, 8, seed=4), real=True)
    stats = metric.reference_stats()
    other = FIDWhole(tiny_extractor(weights))
    other.load_reference_stats(stats)
    assert torch.equal(other.real_features_cov_sum, metric.real_features_cov_sum)
    assert int(other.real_features_num_samples) == 10
    other.reset()  # the reference survives a reset
    assert torch.equal(other.real_features_sum, metric.real_features_sum)
    # Under DDP only rank 0 holds them, so torchmetrics' sum over ranks gives them back exactly.
    monkeypatch.setattr(fid_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(fid_module.dist, "get_rank", lambda group=None: 1)
    other.load_reference_stats(stats)
    assert int(other.real_features_num_samples) == 0 and not other.real_features_cov_sum.any()


def test_reference_cache_reads_from_disk_and_keys_on_what_defines_it(weights, tmp_path):
    cache = ReferenceStatsCache(tmp_path / "stats")
    reference = "test:seed=5:n=24:res=16"
    fake = random_images(12, 16, seed=6, shift=0.1)

    def reference_images():
        images = random_images(24, 16, seed=5)
        return iter((images[:16], images[16:]))

    def run(metric):
        calls = []
        metric.extractor.register_forward_hook(lambda *args: calls.append(1))
        from_cache = prepare_reference(metric, reference, reference_images, cache)
        metric.update(fake, real=False)
        return from_cache, len(calls), metric.compute()

    first = FIDPatch(tiny_extractor(weights))
    assert run(first)[:2] == (False, 3)  # two reference batches and the fake one
    assert cache.path(first, reference).is_file()
    from_cache, calls, cached_fid = run(FIDPatch(tiny_extractor(weights)))
    assert (from_cache, calls) == (True, 1)  # only the fake batch
    uncached = FIDPatch(tiny_extractor(weights))
    for images in reference_images():
        uncached.update(images, real=True)
    uncached.update(fake, real=False)
    assert torch.equal(cached_fid, uncached.compute())

    copy = shutil.copy(weights, tmp_path / "copy.safetensors")
    other_weights = save_tiny_net(tmp_path / "other.safetensors", seed=1)
    paths = {
        "same": cache.path(FIDPatch(tiny_extractor(weights)), reference),
        "copied": cache.path(FIDPatch(tiny_extractor(copy)), reference),
        "weights": cache.path(FIDPatch(tiny_extractor(other_weights)), reference),
        "crop": cache.path(FIDPatch(tiny_extractor(weights, input_size=12)), reference),
        "whole": cache.path(FIDWhole(tiny_extractor(weights)), reference),
        "reference": cache.path(FIDPatch(tiny_extractor(weights)), reference + "x"),
    }
    assert paths["same"] == paths["copied"] == cache.path(first, reference)  # keyed on content
    assert len({paths[name] for name in ("same", "weights", "crop", "whole", "reference")}) == 5


@pytest.fixture
def tiny_clip(tmp_path):
    """A tiny random open_clip model registered from a JSON config and saved to safetensors."""
    config = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    config_path = tmp_path / f"{TINY_CLIP}.json"
    config_path.write_text(json.dumps(config))
    open_clip.add_model_config(config_path)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, pretrained=None).eval()
    weights_path = tmp_path / "tiny_clip.safetensors"
    save_file(model.state_dict(), str(weights_path))
    return model, str(config_path), str(weights_path)


def test_clip_score_follows_torchmetrics_convention(tiny_clip):
    model, config_path, weights_path = tiny_clip
    scorer = OpenCLIPScorer(TINY_CLIP, weights_path, model_config=config_path)
    images = torch.randint(0, 256, (4, 3, 32, 32)) / 255
    prompts = ["a red square", "two blue circles", "a green triangle on grey", "nothing"]

    # Directly with open_clip: its own PIL preprocessing, tokenizer and encoders.
    preprocess = open_clip.image_transform(32, is_train=False)
    with torch.no_grad():
        image_features = model.encode_image(
            torch.stack([preprocess(to_pil_image(image)) for image in images])
        )
        text_features = model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(prompts))
    expected = 100 * F.cosine_similarity(image_features, text_features, dim=-1)

    with torch.no_grad():
        assert torch.allclose(scorer(images, prompts), expected, atol=1e-4)
    metric = CLIPScore(scorer)
    metric.update(images[:2], prompts[:2])
    metric.update(images[2:], prompts[2:])
    assert float(metric.compute()) == pytest.approx(max(float(expected.mean()), 0.0), abs=1e-4)
    metric.reset()
    metric.update(images[:1], ["x"])
    metric.score_sum.fill_(-5.0)  # a negative mean clamps to 0, as torchmetrics' CLIPScore
    assert float(metric.compute()) == 0.0


def test_clip_preprocess_resizes_the_shorter_side_and_centre_crops(tiny_clip):
    _, config_path, weights_path = tiny_clip
    scorer = OpenCLIPScorer(TINY_CLIP, weights_path, model_config=config_path)
    images = torch.rand(2, 3, 48, 80)
    resized = F.interpolate(images, size=(32, 53), mode="bicubic", antialias=True).clamp(0, 1)
    expected = (resized[..., 10:42] - scorer.mean) / scorer.std
    assert torch.allclose(scorer.preprocess(images), expected)
    assert not scorer.training and not scorer.train().training


def test_missing_inception_weights_fail_before_building(tmp_path, monkeypatch):
    def build(*args, **kwargs):
        raise AssertionError("the network must not be built")

    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", build)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILENAMES[0]
    with pytest.raises(MissingMetricWeights, match=r"metrics\.fid_whole\.extractor\.weights_path") as error:
        InceptionFeatures()
    assert str(expected) in str(error.value) and INCEPTION_URL in str(error.value)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        InceptionFeatures.check_available(tmp_path / "nope.pth")
    if importlib.util.find_spec("torch_fidelity") is None:  # weights there, package absent
        (tmp_path / "present.pth").write_bytes(b"")
        with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
            InceptionFeatures.check_available(tmp_path / "present.pth")


def test_missing_openclip_and_local_weights_fail_before_building(tmp_path, monkeypatch):
    def build(*args, **kwargs):
        raise AssertionError("the network must not be built")

    monkeypatch.setattr(open_clip, "create_model", build)
    with pytest.raises(MissingMetricWeights, match="laion/CLIP-ViT-g-14-laion2B-s34B-b88K"):
        OpenCLIPScorer("ViT-g-14", "laion2b_s34b_b88k", cache_dir=tmp_path / "hf")
    with pytest.raises(MissingMetricWeights, match="missing.safetensors"):
        OpenCLIPScorer.check_available("ViT-B-32", str(tmp_path / "missing.safetensors"))
    with pytest.raises(MissingMetricWeights, match="missing.safetensors"):
        LocalFeatures(TinyFeatureNet(), tmp_path / "missing.safetensors", input_size=8)


def test_reference_stats_properties_match_numpy():
    features = torch.randn(9, 4, dtype=torch.float64)
    stats = ReferenceStats(features.sum(0), features.T @ features, 9)
    assert np.allclose(stats.mean.numpy(), features.numpy().mean(0))
    assert np.allclose(stats.cov.numpy(), np.cov(features.numpy(), rowvar=False))


def _ddp_worker(rank, weights_path, cache_dir, port, results):
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    reference, fake = random_images(24, 16, seed=5), random_images(12, 16, seed=6, shift=0.1)
    shard = reference[rank::2]
    scores = []
    for _ in range(2):  # a cache miss (sharded reference), then a hit (rank 0 holds it)
        metric = FIDPatch(tiny_extractor(weights_path))
        prepare_reference(metric, "ddp", lambda: iter([shard]), ReferenceStatsCache(cache_dir))
        metric.update(fake[rank::2], real=False)
        scores.append(float(metric.compute()))
    results[rank] = scores
    dist.destroy_process_group()


@pytest.mark.slow
def test_fid_under_ddp_equals_single_process(weights, tmp_path):
    import torch.multiprocessing as mp

    metric = FIDPatch(tiny_extractor(weights))
    metric.update(random_images(24, 16, seed=5), real=True)
    metric.update(random_images(12, 16, seed=6, shift=0.1), real=False)
    expected = float(metric.compute())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(weights, str(tmp_path / "cache"), port, results), nprocs=2)
    assert results[0] == results[1] == [pytest.approx(expected, rel=1e-9)] * 2


def test_inception_weights_load_without_pickle(tmp_path):
    """Issue 15: torch-fidelity reads the Inception file with pickle; the project reads it only as
    safetensors or with weights_only=True and hands torch-fidelity its own copy."""
    import pickle

    from safetensors.torch import save_file

    from lightning_sdxl.metrics.features import load_inception_state

    state = {"conv.weight": torch.randn(2, 3), "fc.bias": torch.zeros(4)}
    torch.save(state, tmp_path / "weights.pth")
    save_file(state, tmp_path / "weights.safetensors")
    for name in ("weights.pth", "weights.safetensors"):
        loaded = load_inception_state(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)

    class Payload:
        def __reduce__(self):
            return (print, ("this would have run",))

    with open(tmp_path / "evil.pth", "wb") as handle:
        pickle.dump({"conv.weight": Payload()}, handle)
    with pytest.raises(ValueError, match="not loaded .it would run arbitrary code"):
        load_inception_state(tmp_path / "evil.pth")
