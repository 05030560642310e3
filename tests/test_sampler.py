"""The module's N-step sampler equals a stock diffusers SDXL pipeline on the same UNet and noise."""

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from lightning_sdxl.diffusion.prediction import get_prediction
from lightning_sdxl.diffusion.sampler import sample
from lightning_sdxl.diffusion.schedule import NoiseSchedule
from lightning_sdxl.diffusion.solver import unet_fn
from lightning_sdxl.models.loading import load_sdxl
from lightning_sdxl.models.text_encoding import SDXLTextEncoder, build_condition, unconditional_like

PROMPTS = ["a large red circle at the top left on a white background", "a small blue square"]


@pytest.fixture(scope="module")
def pipeline(tiny_sdxl_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def components(tiny_sdxl_path):
    return load_sdxl(tiny_sdxl_path)


@pytest.mark.parametrize("num_steps,guidance_scale", [(1, 0.0), (2, 0.0), (4, 0.0), (8, 0.0), (4, 6.0)])
def test_sampler_equals_diffusers_pipeline(pipeline, components, num_steps, guidance_scale):
    text_encoder = SDXLTextEncoder(
        components.text_encoder, components.text_encoder_2, components.tokenizer, components.tokenizer_2,
        zero_empty_prompt=components.force_zeros_for_empty_prompt,
    )
    size = 128
    noise = torch.randn(len(PROMPTS), 4, size // 8, size // 8, generator=torch.Generator().manual_seed(num_steps))
    expected = pipeline(
        PROMPTS, num_inference_steps=num_steps, guidance_scale=guidance_scale, latents=noise.clone(),
        height=size, width=size, output_type="latent",
    ).images

    batch = len(PROMPTS)
    condition = build_condition(
        text_encoder, PROMPTS, (size, size), torch.tensor([[size, size]] * batch), torch.zeros(batch, 2, dtype=torch.long)
    )
    uncondition = unconditional_like(text_encoder, condition) if guidance_scale > 1 else None
    latents = sample(
        unet_fn(components.unet), NoiseSchedule.from_scheduler_config(components.scheduler_config),
        get_prediction("epsilon"), noise, num_steps, condition, uncondition, guidance_scale,
    )
    assert latents.shape == expected.shape
    # Float noise scales with the latents (CFG 6 multiplies it; 1e-4 apart at 1 thread, values ~35):
    # a tolerance relative to their size; a wrong timestep or sigma differs by O(1).
    scale = expected.abs().max()
    assert torch.allclose(latents, expected, atol=1e-5 * scale, rtol=1e-4), (latents - expected).abs().max()
