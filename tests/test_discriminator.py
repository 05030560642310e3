"""The discriminator (METHOD.md section 3) on diffusers' tiny SDXL test UNet, on the CPU."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from torch.nn import functional as F

from lightning_sdxl.models.conditioning import SDXLCondition
from lightning_sdxl.models.discriminator import Discriminator, DiscriminatorHead, UNetEncoder
from lightning_sdxl.models.tiny import TOY_TEXT_WIDTHS, build_tiny_sdxl

B, H, W = 2, 16, 16
POOLED_DIM, TEXT_DIM = TOY_TEXT_WIDTHS[1], sum(TOY_TEXT_WIDTHS)  # text_encoder_2's pooled width; both encoders


def tiny_unet() -> UNet2DConditionModel:
    """The project's tiny SDXL UNet (96 = 48 pooled + 6 x 8 time ids), SDXL's architecture at toy size."""
    return build_tiny_sdxl(seed=0).unet


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions run faster on one thread than contended across a few CPU cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return tiny_unet().eval().requires_grad_(False)


def make_condition(batch: int = B, seed: int = 1) -> SDXLCondition:
    g = torch.Generator().manual_seed(seed)
    return SDXLCondition(
        prompt_embeds=torch.randn(batch, 77, TEXT_DIM, generator=g),
        pooled_prompt_embeds=torch.randn(batch, POOLED_DIM, generator=g),
        add_time_ids=torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).repeat(batch, 1),
    )


def sliced(condition: SDXLCondition, index: slice) -> SDXLCondition:
    return SDXLCondition(
        condition.prompt_embeds[index],
        condition.pooled_prompt_embeds[index],
        condition.add_time_ids[index],
    )


def latents(seed: int, batch: int = B) -> torch.Tensor:
    return torch.randn(batch, 4, H, W, generator=torch.Generator().manual_seed(seed))


def mid_block_output_of_full_unet(unet, sample, timestep, condition) -> torch.Tensor:
    """The input of the first up block in a full forward (= the mid-block output)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handle = unet.up_blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            unet(sample, timestep, **condition.unet_kwargs)
    finally:
        handle.remove()
    return seen["h"]


@pytest.mark.parametrize("timestep", [torch.tensor(500), 500, torch.tensor([10, 900])])
def test_backbone_equals_full_unet_mid_block(unet, timestep):
    backbone = UNetEncoder.from_unet(unet).eval()
    x_t, c = latents(0), make_condition()
    expected = mid_block_output_of_full_unet(unet, x_t, timestep, c)
    with torch.no_grad():
        features = backbone(x_t, timestep, c)
    assert features.shape == (B, 64, H // 2, W // 2)
    assert backbone.downsample_factor == 2 and backbone.out_channels == 64
    torch.testing.assert_close(features, expected)


def test_backbone_is_a_trainable_copy(unet):
    backbone = UNetEncoder.from_unet(unet)
    assert backbone.training
    assert all(p.requires_grad for p in backbone.parameters())
    assert not any(p.requires_grad for p in unet.parameters())  # teacher untouched
    before = unet.conv_in.weight.clone()
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(1.0)
    torch.testing.assert_close(unet.conv_in.weight, before)
    teacher_ptrs = {p.data_ptr() for p in unet.parameters()}
    assert not teacher_ptrs & {p.data_ptr() for p in backbone.parameters()}
    # Only the encoder half and the mid block are copied.
    assert not hasattr(backbone, "up_blocks") and not hasattr(backbone, "conv_out")


def test_backbone_per_sample_timesteps(unet):
    backbone = UNetEncoder.from_unet(unet).eval()
    x_t, c = latents(0), make_condition()
    with torch.no_grad():
        together = backbone(x_t, torch.tensor([10, 900]), c)
        first = backbone(x_t[:1], 10, sliced(c, slice(0, 1)))
        second = backbone(x_t[1:], torch.tensor([900]), sliced(c, slice(1, 2)))
    torch.testing.assert_close(together, torch.cat([first, second]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one value per sample"):
        backbone(x_t, torch.tensor([1, 2, 3]), c)


@pytest.mark.parametrize("conditional", [True, False])
def test_judge_equals_separate_features_and_logits(unet, conditional):
    disc = Discriminator.from_unet(unet, conditional=conditional).eval()
    x_t, real, fake, c = latents(0), latents(1), latents(2), make_condition()
    t, t_next = torch.tensor([999, 700]), torch.tensor([750, 500])  # per-sample timesteps
    with torch.no_grad():
        l_real, l_fake = disc.judge(x_t, t, [real, fake], t_next, c)
        start = disc.features(x_t, t, c) if conditional else None
        expected_real = disc.logits(disc.features(real, t_next, c), start)
        expected_fake = disc.logits(disc.features(fake, t_next, c), start)
        (l_fake_only,) = disc.judge(x_t, t, [fake], t_next, c)
    assert l_real.shape == l_fake.shape == (B,)
    torch.testing.assert_close(l_real, expected_real, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(l_fake, expected_fake, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(l_fake_only, expected_fake, atol=1e-5, rtol=1e-4)
    # The conditional discriminator sees where the jump started; the unconditional one does not.
    with torch.no_grad():
        (l_other_start,) = disc.judge(latents(3), t, [fake], t_next, c)
    assert conditional != torch.allclose(l_other_start, l_fake_only)


@pytest.mark.parametrize("conditional", [True, False])
def test_generator_judgement_without_start_gradient_is_the_same_maths(unet, conditional):
    """The generator step's lean judge (d(x_t) apart, no graph) gives the same logits and the same
    gradient into the fake as the batched one, and no gradient path into x_t."""
    disc = Discriminator.from_unet(unet, conditional=conditional).eval().requires_grad_(False)
    x_t, c = latents(0), make_condition()
    t, t_next = torch.tensor([999, 700]), torch.tensor([750, 500])
    results = []
    for start_gradient in (True, False):
        fake = latents(2).requires_grad_(True)
        (logits,) = disc.judge(x_t, t, [fake], t_next, c, start_gradient=start_gradient)
        logits.square().sum().backward()
        results.append((logits.detach(), fake.grad))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-4)
    assert results[1][1].abs().sum() > 0


def test_head_input_channels(unet):
    conditional = Discriminator.from_unet(unet, conditional=True)
    unconditional = Discriminator.from_unet(unet, conditional=False)
    assert conditional.head.in_channels == 128 and conditional.head.hidden_channels == 128
    assert unconditional.head.in_channels == 64 and unconditional.head.hidden_channels == 64
    assert conditional.head.blocks[0].in_channels == 128
    assert unconditional.head.blocks[0].in_channels == 64
    custom = Discriminator.from_unet(unet, conditional=True, head_channels=32, head_blocks=3)
    assert custom.head.proj.in_channels == 32 and len(custom.head.blocks) == 9
    assert Discriminator(UNetEncoder.from_unet(unet), conditional=False, head_channels=None)


@pytest.mark.parametrize("conditional", [True, False])
def test_gradients_reach_backbone_and_head(unet, conditional):
    disc = Discriminator.from_unet(unet, conditional=conditional)
    x_t, real, fake, c = latents(0), latents(1), latents(2), make_condition()
    fake.requires_grad_(True)  # stands in for the student's output (generator step)
    l_real, l_fake = disc.judge(x_t, torch.tensor([999, 500]), [real, fake], 250, c)
    # Non-saturating discriminator loss (METHOD.md section 3).
    loss = F.softplus(-l_real).mean() + F.softplus(l_fake).mean()
    loss.backward()
    no_grad = [n for n, p in disc.named_parameters() if p.grad is None or not p.grad.any()]
    assert not no_grad, no_grad
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())


def test_logits_need_start_features_when_conditional(unet):
    disc = Discriminator.from_unet(unet, conditional=True)
    with pytest.raises(ValueError, match="start_features"):
        disc.logits(torch.randn(B, 64, 8, 8))
    with pytest.raises(ValueError, match="at least one candidate"):
        disc.judge(latents(0), 10, [], 5, make_condition())


def test_head_shapes_and_errors():
    head = DiscriminatorHead(in_channels=40, hidden_channels=64, num_blocks=2)
    assert head(torch.randn(3, 40, 8, 8)).shape == (3,)
    assert DiscriminatorHead.min_input_size(0) == 1
    assert DiscriminatorHead.min_input_size(3) == 16  # its last GroupNorm sees 2 x 2 pixels
    size = DiscriminatorHead.min_input_size(2)
    assert head(torch.randn(3, 40, size, size)).shape == (3,)
    with pytest.raises(ValueError, match="at least 8 x 8"):
        head(torch.randn(3, 40, size - 1, size))
    assert DiscriminatorHead(40, 32, 0)(torch.randn(3, 40, 1, 1)).shape == (3,)
    with pytest.raises(ValueError, match="multiple of 32"):
        DiscriminatorHead(64, 48, 2)
    with pytest.raises(ValueError, match="num_blocks must be >= 0"):
        DiscriminatorHead(64, 64, -1)
    with pytest.raises(ValueError, match="num_blocks must be >= 0"):
        DiscriminatorHead.min_input_size(-1)
    # The automatic depth leaves 4 x 4 pixels: SDXL at 1024 px 3 blocks, the toy UNet's 4 x 4 none.
    assert [DiscriminatorHead.blocks_for(size) for size in (32, 16, 8, 4, 2)] == [3, 2, 1, 0, 0]


def test_from_unet_dtype(unet):
    disc = Discriminator.from_unet(unet, conditional=True, dtype=torch.float64)
    assert {p.dtype for p in disc.parameters()} == {torch.float64}
    assert next(unet.parameters()).dtype == torch.float32


def test_continue_from_carries_the_backbone_and_a_head_of_the_same_shape(unet, tmp_path):
    """The recipe's phases b and c continue the stage's discriminator (METHOD.md 3)."""
    trained = Discriminator.from_unet(unet, conditional=True, dtype=torch.float32)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(torch.randn_like(parameter))  # "trained": away from the teacher's copy
    trained.save(tmp_path / "cond.safetensors")

    unconditional = Discriminator.from_unet(unet, conditional=False, dtype=torch.float32)
    fresh_head = {k: v.clone() for k, v in unconditional.head.state_dict().items()}
    assert not unconditional.continue_from(tmp_path / "cond.safetensors")  # 2 C -> C input channels
    for key, value in unconditional.backbone.state_dict().items():
        assert torch.equal(value, trained.backbone.state_dict()[key]), key
    assert all(torch.equal(v, fresh_head[k]) for k, v in unconditional.head.state_dict().items())

    unconditional.save(tmp_path / "uncond.safetensors")
    phase_c = Discriminator.from_unet(unet, conditional=False, dtype=torch.float32)
    assert phase_c.continue_from(tmp_path / "uncond.safetensors")
    for key, value in phase_c.state_dict().items():
        assert torch.equal(value, unconditional.state_dict()[key]), key


def test_continue_from_refuses_a_file_that_does_not_fit(unet, tmp_path):
    state = dict(Discriminator.from_unet(unet, conditional=False).state_dict())
    state.pop("backbone.conv_in.weight")
    save_file({key: value.contiguous() for key, value in state.items()}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="discriminator.init=.*discriminator.init=null"):
        Discriminator.from_unet(unet, conditional=False).continue_from(tmp_path / "partial.safetensors")
