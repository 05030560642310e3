"""Training a diffusion teacher from scratch with the standard denoising loss (`experiment=toy_teacher`).

This is how the committed toy teacher (lightning_sdxl/assets) is made: SDXL's classes at toy size,
SDXL's noise schedule with the t = 999 pure-noise fix (METHOD.md 1), epsilon prediction over all
1000 timesteps, and caption dropout to the empty (zero) condition so the teacher supports
classifier-free guidance, as stage 128 to 32 needs. The UNet and both text encoders train; the
VAE (trained before, `lightning_sdxl.toy.autoencoder`) is frozen.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import lightning as L
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from lightning_sdxl.diffusion.prediction import get_prediction
from lightning_sdxl.diffusion.sampler import generate
from lightning_sdxl.diffusion.schedule import NoiseSchedule
from lightning_sdxl.diffusion.solver import unet_fn
from lightning_sdxl.export import SINGLE_FILE
from lightning_sdxl.io import atomic_dir
from lightning_sdxl.models.conditioning import SDXLCondition
from lightning_sdxl.models.loading import load_sdxl
from lightning_sdxl.models.text_encoding import SDXLTextEncoder, build_condition, unconditional_like
from lightning_sdxl.models.vae import decode_latents, encode_images, vae_scale_factor
from lightning_sdxl.plain_config import plain_config
from lightning_sdxl.single_file import save_components
from lightning_sdxl.steps import to_batches

LOSS_WEIGHTINGS = ("v", "uniform")


def loss_weight(prediction: str, a_t: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-sample weights of the squared error of the model output.

    "v" weighs any parameterisation's error as the v-prediction loss would (Salimans & Ho 2022):
    ||v - v_hat||^2 = ||eps - eps_hat||^2 / a_t = ||x0 - x0_hat||^2 / (1 - a_t). For epsilon
    prediction this lifts the high-noise steps, whose eps errors the sampler multiplies by
    sqrt((1 - a_t) / a_t) (up to 15x on SDXL's schedule); measured (docs/MEASUREMENTS.md), uniform eps
    weighting left 32-step samples as noise after 13 minutes, v weighting learned colours.
    "uniform" is plain MSE on the output (SDXL's own eps loss).
    """
    if weighting == "uniform":
        return torch.ones_like(a_t)
    return {"epsilon": 1 / a_t, "sample": 1 / (1 - a_t), "v_prediction": torch.ones_like(a_t)}[prediction]


class DenoisingLoss:
    """`loss=denoising` (conf/loss/denoising.yaml): the standard diffusion loss a teacher trains with.

    Args:
        name: "denoising".
        weighting: "v" or "uniform" (`loss_weight`).
        adam_betas: the optimizer's betas.
    """

    adversarial = False
    optimizers_per_batch = 1  # one optimizer, no accumulation: a batch is an optimizer step (steps.py)

    def __init__(self, name: str = "denoising", weighting: str = "v", adam_betas: tuple[float, float] = (0.9, 0.999)):
        if weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss.weighting={weighting}: choose one of {LOSS_WEIGHTINGS}.")
        self.name, self.weighting, self.adam_betas = name, weighting, tuple(adam_betas)

    def __call__(self, prediction: str, u: torch.Tensor, target: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
        """The weighted squared error of the model output u against its target."""
        return (loss_weight(prediction, a_t, self.weighting) * (u - target) ** 2).mean()


def set_config_dtype(config_file: Path, dtype: torch.dtype) -> None:
    """Record `dtype` as the dtype a transformers model loads in (its config's "dtype")."""
    config = json.loads(config_file.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class TeacherModule(L.LightningModule):
    """Denoising training of an SDXL pipeline folder's UNet (and text encoders).

    Args:
        model_path: the diffusers SDXL folder to start from (a trained VAE, any UNet).
        resolution: image size in pixels.
        caption_dropout: probability of training a sample on the empty condition (CFG).
        loss: a Hydra config of `DenoisingLoss` (conf/loss/denoising.yaml).
        train_text_encoders: train both text encoders with the UNet (a toy world's captions are
            nearly indistinguishable to random encoders, docs/MEASUREMENTS.md).
        optimizer: a Hydra config of a partial optimizer.
        lr_scheduler: a Hydra config of a partial LR scheduler (stepped per batch), or None.
        validation_steps: sampling steps of the validation grid (trailing Euler).
        validation_guidance_scale: CFG scale of the grid's guided row.
    """

    def __init__(
        self,
        model_path: str,
        resolution: int = 32,
        caption_dropout: float = 0.1,
        loss: dict | None = None,
        train_text_encoders: bool = True,
        optimizer: dict | None = None,
        lr_scheduler: dict | None = None,
        validation_steps: int = 32,
        validation_guidance_scale: float = 5.0,
    ):
        super().__init__()
        # Plain containers in hparams, so checkpoints load with torch.load(weights_only=True).
        optimizer, lr_scheduler, loss = plain_config(optimizer), plain_config(lr_scheduler), plain_config(loss)
        self.save_hyperparameters()
        self.loss = hydra.utils.instantiate(loss) if loss else DenoisingLoss()
        components = load_sdxl(model_path)
        self.scheduler_config = components.scheduler_config
        self.schedule = NoiseSchedule.from_scheduler_config(self.scheduler_config)
        self.prediction = get_prediction(self.scheduler_config.get("prediction_type", "epsilon"))
        self.unet = components.unet.train()
        self.vae = components.vae.requires_grad_(False).eval()
        self.latent_size = resolution // vae_scale_factor(self.vae.config)
        self.text_encoder = SDXLTextEncoder(
            components.text_encoder, components.text_encoder_2, components.tokenizer,
            components.tokenizer_2, zero_empty_prompt=components.force_zeros_for_empty_prompt,
            trainable=train_text_encoders,
        )
        self.validation_outputs: list[dict[str, torch.Tensor]] = []

    def condition(self, prompts: list[str], original_size=None, crop_top_left=None) -> SDXLCondition:
        size = (self.hparams.resolution,) * 2
        return build_condition(self.text_encoder, prompts, size, original_size, crop_top_left)

    def drop_captions(self, condition: SDXLCondition) -> SDXLCondition:
        """Replace each sample's text by the empty prompt's with probability `caption_dropout`."""
        empty = unconditional_like(self.text_encoder, condition)
        keep = torch.rand(len(condition.add_time_ids), device=self.device) >= self.hparams.caption_dropout
        return SDXLCondition(
            torch.where(keep.view(-1, 1, 1), condition.prompt_embeds, empty.prompt_embeds),
            torch.where(keep.view(-1, 1), condition.pooled_prompt_embeds, empty.pooled_prompt_embeds),
            condition.add_time_ids,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0 = encode_images(self.vae, batch["pixel_values"])  # (B, 4, R/f, R/f)
        condition = self.drop_captions(
            self.condition(batch["prompt"], batch["original_size"], batch["crop_top_left"])
        )
        t = torch.randint(0, self.schedule.num_train_timesteps, (len(x0),), device=self.device)
        eps = torch.randn_like(x0)
        x_t = self.schedule.forward_process(x0, eps, t)  # pure noise at t = 999 (METHOD.md 1)
        a_t = self.schedule.alpha(t)
        u = unet_fn(self.unet)(x_t, t, condition)
        target = self.prediction.target(x_t, x0, eps, a_t)
        loss = self.loss(self.prediction.name, u, target, a_t)
        self.log("loss/denoising", loss, prog_bar=True, sync_dist=True)
        self.log("lr/unet", self.optimizers().param_groups[0]["lr"])
        return loss

    def configure_optimizers(self):
        parameters = [p for p in self.parameters() if p.requires_grad]
        optimizer = hydra.utils.instantiate(self.hparams.optimizer)(parameters)
        if not self.hparams.lr_scheduler:
            return optimizer
        scheduler = hydra.utils.instantiate(self.hparams.lr_scheduler)(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Always clip the global norm at 1 (v weighting makes high-noise batches large)."""
        self.clip_gradients(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")

    accumulate_grad_batches = 1  # a batch is an optimizer step (DenoisingLoss, lightning_sdxl/steps.py)

    @property
    def optimizers_per_batch(self) -> int:
        return self.loss.optimizers_per_batch

    @property
    def batches_trained(self) -> int:
        return to_batches(self.trainer.global_step, self.optimizers_per_batch, self.accumulate_grad_batches)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: torch.Tensor, num_steps: int, guidance_scale: float) -> torch.Tensor:
        """Latents x0 of `num_steps` trailing Euler steps, with CFG when guidance_scale > 1."""
        condition = self.condition(prompts)
        uncondition = unconditional_like(self.text_encoder, condition) if guidance_scale > 1 else None
        return generate(
            unet_fn(self.unet), self.schedule, self.prediction, seeds.tolist(), self.latent_size, num_steps,
            condition, uncondition, guidance_scale,
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        steps, scale = self.hparams.validation_steps, self.hparams.validation_guidance_scale
        self.validation_outputs.append({
            "guided": decode_latents(self.vae, self.generate(batch["prompt"], batch["seed"], steps, scale)),
            "unguided": decode_latents(self.vae, self.generate(batch["prompt"], batch["seed"], steps, 1.0)),
            "seed": batch["seed"],
        })

    def on_validation_epoch_start(self) -> None:
        self.validation_outputs.clear()

    def pipeline(self) -> StableDiffusionXLPipeline:
        """The trained model as a stock diffusers SDXL pipeline (Euler, SDXL's scheduler config)."""
        return StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoder.text_encoder,
            text_encoder_2=self.text_encoder.text_encoder_2, tokenizer=self.text_encoder.tokenizers[0],
            tokenizer_2=self.text_encoder.tokenizers[1], unet=self.unet,
            scheduler=EulerDiscreteScheduler.from_config(self.scheduler_config),
            force_zeros_for_empty_prompt=self.text_encoder.zero_empty_prompt,
        )

    def export(self, out_dir, dtype: torch.dtype = torch.float32, single_file: bool = True) -> None:
        """Write the trained teacher as a diffusers SDXL folder (weights in `dtype`), atomically,
        with the all-in-one `sdxl_single_file.safetensors` beside it when `single_file`."""
        pipeline, training_dtype = self.pipeline(), self.unet.dtype
        with atomic_dir(out_dir) as folder:
            pipeline.to(dtype=dtype)  # the training modules themselves: cast back below
            try:
                pipeline.save_pretrained(folder, safe_serialization=True)
                # Stored in `dtype`, loaded in the training dtype: transformers 5 loads a text encoder
                # in its config's dtype, diffusers the UNet in float32; float16 text encoders beside a
                # float32 UNet fail at the first matmul of a stock pipeline call.
                for name in ("text_encoder", "text_encoder_2"):
                    set_config_dtype(folder / name / "config.json", training_dtype)
                if single_file:
                    save_components(
                        pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2,
                        folder / SINGLE_FILE, dtype,
                    )
            finally:
                pipeline.to(dtype=training_dtype)
