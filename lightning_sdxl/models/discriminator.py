"""The SDXL-Lightning discriminator: a trainable copy of the teacher UNet's encoder and mid block,
with a small convolutional head (METHOD.md section 3).

Conditional (phase a):    D(x_t, x_{t'}, t, t', c) = head(concat_channels(d(x_{t'}, t', c), d(x_t, t, c)))
Unconditional (b, c):     D'(x_{t'}, t', c)        = head(d(x_{t'}, t', c))

d(x_t, t, c) is shared by the real and the fake branch and computed once per step (`judge`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_sdxl.activation_checkpointing import enable_activation_checkpointing
from lightning_sdxl.models.conditioning import SDXLCondition

_SUPPORTED_ADDITION_EMBED_TYPES = (None, "text_time")
_SUPPORTED_ENCODER_HID_DIM_TYPES = (None, "text_proj")


def _batch_timesteps(
    timestep: torch.Tensor | float, batch: int, device: torch.device
) -> torch.Tensor:
    """A scalar, (1,) or (B,) timestep as a (B,) tensor on `device`.

    As `UNet2DConditionModel.get_time_embed` (diffusers 0.42), but a per-sample (B,) tensor of
    the wrong length is a clear error instead of a failed `expand`.
    """
    t = torch.as_tensor(timestep, device=device).reshape(-1)
    if t.numel() not in (1, batch):
        raise ValueError(
            f"timestep must be a scalar or have one value per sample ({batch}), got shape "
            f"{tuple(torch.as_tensor(timestep).shape)}"
        )
    return t.expand(batch)


class UNetEncoder(nn.Module):
    """The discriminator backbone d(x, t, c): the encoder half and mid block of an SDXL UNet.

    Built from diffusers' public submodules (conv_in, time and added-condition embeddings, down
    blocks, mid block); its output equals the mid-block output of the full UNet forward
    (METHOD.md section 3, "Backbone d").

    The few lines of `UNet2DConditionModel.get_time_embed`, `get_aug_embed` (text_time branch)
    and `process_encoder_hidden_states` (text_proj branch) are reproduced below rather than
    called: they are methods of the full UNet, and calling them unbound on this module, or
    keeping a reference to the teacher, would tie the backbone to a model it must not share
    weights or device placement with. Only the SDXL branches are supported; others raise at
    construction.
    """

    def __init__(
        self,
        conv_in: nn.Module,
        time_proj: nn.Module,
        time_embedding: nn.Module,
        down_blocks: nn.ModuleList,
        mid_block: nn.Module,
        out_channels: int,
        add_time_proj: nn.Module | None = None,
        add_embedding: nn.Module | None = None,
        time_embed_act: nn.Module | None = None,
        encoder_hid_proj: nn.Module | None = None,
        addition_embed_type: str | None = "text_time",
        center_input_sample: bool = False,
    ) -> None:
        """Prefer `UNetEncoder.from_unet`; this takes the (already copied) submodules.

        Args:
            conv_in: the UNet's input convolution.
            time_proj: sinusoidal timestep projection (`Timesteps`, no weights).
            time_embedding: timestep MLP (`TimestepEmbedding`).
            down_blocks: the UNet's down blocks.
            mid_block: the UNet's mid block.
            out_channels: channels of the mid-block output (the UNet's last block_out_channels).
            add_time_proj: sinusoidal projection of the 6 SDXL micro-conditions (text_time).
            add_embedding: MLP on concat(pooled text, projected micro-conditions) (text_time).
            time_embed_act: optional activation on the summed embedding.
            encoder_hid_proj: optional linear projection of the text embeddings (text_proj).
            addition_embed_type: one of None, "text_time".
            center_input_sample: map the input from [0, 1] to [-1, 1] first, as the UNet does.
        """
        super().__init__()
        if addition_embed_type not in _SUPPORTED_ADDITION_EMBED_TYPES:
            raise ValueError(
                f"addition_embed_type must be one of {_SUPPORTED_ADDITION_EMBED_TYPES}, "
                f"got {addition_embed_type!r}"
            )
        if addition_embed_type == "text_time" and (add_time_proj is None or add_embedding is None):
            raise ValueError(
                "addition_embed_type 'text_time' needs add_time_proj and add_embedding"
            )
        self.conv_in = conv_in
        self.time_proj = time_proj
        self.time_embedding = time_embedding
        self.add_time_proj = add_time_proj
        self.add_embedding = add_embedding
        self.time_embed_act = time_embed_act
        self.encoder_hid_proj = encoder_hid_proj
        self.down_blocks = down_blocks
        self.mid_block = mid_block
        self.out_channels = out_channels
        self.addition_embed_type = addition_embed_type
        self.center_input_sample = center_input_sample

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, dtype: torch.dtype | None = None) -> UNetEncoder:
        """A trainable deep copy of the teacher's encoder and mid block (the teacher is untouched).

        Args:
            unet: the teacher UNet (SDXL: `addition_embed_type="text_time"`).
            dtype: cast the copy to this dtype (e.g. float32 when the teacher is held in
                float16); None keeps the teacher's dtype.
        """
        config = unet.config
        if config.addition_embed_type not in _SUPPORTED_ADDITION_EMBED_TYPES:
            raise ValueError(
                f"UNetEncoder supports addition_embed_type in {_SUPPORTED_ADDITION_EMBED_TYPES}, "
                f"got {config.addition_embed_type!r}"
            )
        if unet.encoder_hid_proj is not None and (
            config.encoder_hid_dim_type not in _SUPPORTED_ENCODER_HID_DIM_TYPES
        ):
            raise ValueError(
                f"UNetEncoder supports encoder_hid_dim_type in {_SUPPORTED_ENCODER_HID_DIM_TYPES}, "
                f"got {config.encoder_hid_dim_type!r}"
            )
        if unet.class_embedding is not None:
            raise ValueError("UNetEncoder does not support class embeddings (SDXL has none)")
        if unet.mid_block is None:
            raise ValueError("UNetEncoder needs a UNet with a mid block (mid_block_type is None)")

        def clone(module: nn.Module | None) -> nn.Module | None:
            return None if module is None else copy.deepcopy(module)

        text_time = config.addition_embed_type == "text_time"
        encoder = cls(
            conv_in=clone(unet.conv_in),
            time_proj=clone(unet.time_proj),
            time_embedding=clone(unet.time_embedding),
            down_blocks=clone(unet.down_blocks),
            mid_block=clone(unet.mid_block),
            out_channels=config.block_out_channels[-1],
            add_time_proj=clone(unet.add_time_proj) if text_time else None,
            add_embedding=clone(unet.add_embedding) if text_time else None,
            time_embed_act=clone(unet.time_embed_act),
            encoder_hid_proj=clone(unet.encoder_hid_proj),
            addition_embed_type=config.addition_embed_type,
            center_input_sample=config.center_input_sample,
        )
        if dtype is not None:
            encoder.to(dtype=dtype)
        # Trained, not frozen (METHOD.md section 3), whatever state the teacher was in.
        return encoder.requires_grad_(True).train()

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction from input to output: 2 per down block with a downsampler."""
        n = sum(getattr(block, "downsamplers", None) is not None for block in self.down_blocks)
        return 2**n

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        condition: SDXLCondition,
    ) -> torch.Tensor:
        """d(x, t, c): the mid-block output of the teacher-initialised UNet.

        Args:
            sample: (B, 4, H, W) noisy latents x_t.
            timestep: a scalar or a (B,) tensor of per-sample timesteps.
            condition: the text and micro-conditioning, batch B.

        Returns:
            (B, C_mid, H / f, W / f) features, f = `downsample_factor` (SDXL: 1280 x H/4 x W/4).
        """
        batch = sample.shape[0]
        if self.center_input_sample:
            sample = 2 * sample - 1.0

        # Timestep embedding (UNet2DConditionModel.get_time_embed + time_embedding).
        t = _batch_timesteps(timestep, batch, sample.device)  # (B,)
        # `Timesteps` has no weights and returns float32; cast as the UNet does.
        t_emb = self.time_proj(t).to(dtype=sample.dtype)  # (B, C0)
        emb = self.time_embedding(t_emb)  # (B, 4 * C0)

        # SDXL added conditions (UNet2DConditionModel.get_aug_embed, "text_time" branch):
        # pooled text embeds concatenated with the sinusoidal projection of the 6 add_time_ids.
        if self.addition_embed_type == "text_time":
            text_embeds = condition.pooled_prompt_embeds  # (B, P)
            time_embeds = self.add_time_proj(condition.add_time_ids.flatten())  # (6B, A)
            time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)  # (B, 6A)
            add_embeds = torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype)  # (B, P + 6A)
            emb = emb + self.add_embedding(add_embeds)  # (B, 4 * C0)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)

        # UNet2DConditionModel.process_encoder_hidden_states, "text_proj" branch.
        encoder_hidden_states = condition.prompt_embeds  # (B, 77, D)
        if self.encoder_hid_proj is not None:
            encoder_hidden_states = self.encoder_hid_proj(encoder_hidden_states)

        h = self.conv_in(sample)  # (B, C0, H, W)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        # (B, C_mid, H / f, W / f)
        if getattr(self.mid_block, "has_cross_attention", False):
            return self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
        return self.mid_block(h, emb)


class DiscriminatorHead(nn.Module):
    """Blocks of [4x4 conv stride 2, GroupNorm(32), SiLU], a 1x1 projection to one channel, and
    a spatial mean: one logit per sample (METHOD.md section 3, "Head"; depth and widths are ours,
    the paper gives none).
    """

    def __init__(self, in_channels: int, hidden_channels: int, num_blocks: int) -> None:
        """
        Args:
            in_channels: input channels (SDXL: 1280 unconditional, 2 x 1280 conditional).
            hidden_channels: channels of every block; a multiple of 32 (GroupNorm's 32 groups).
            num_blocks: number of stride-2 blocks, >= 0 (0: only the 1x1 projection).
        """
        super().__init__()
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if hidden_channels < 32 or hidden_channels % 32 != 0:
            raise ValueError(
                f"hidden_channels must be a positive multiple of 32 (GroupNorm with 32 groups), "
                f"got {hidden_channels}"
            )
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.num_blocks = num_blocks
        blocks = []
        channels = in_channels
        for _ in range(num_blocks):
            blocks += [
                nn.Conv2d(channels, hidden_channels, kernel_size=4, stride=2, padding=1),
                nn.GroupNorm(32, hidden_channels),
                nn.SiLU(),
            ]
            channels = hidden_channels
        self.blocks = nn.Sequential(*blocks)
        self.proj = nn.Conv2d(channels, 1, kernel_size=1)

    @staticmethod
    def min_input_size(num_blocks: int) -> int:
        """Smallest input height/width for `num_blocks` blocks: 1 without blocks, else 2**(num_blocks + 1).

        A 4x4 conv with stride 2 and padding 1 maps size s >= 2 to floor(s / 2). The last block's
        output must keep at least 2 x 2 pixels: at 1 x 1, GroupNorm(32) normalises C / 32 numbers
        per group (3 on the toy UNet), which erases what the features say. Measured on the tiny
        UNet at 64 px (tests/test_module.py, blurred vs sharp latents): a head ending at 1 x 1
        stayed at chance (held-out accuracy 0.35-0.58 after 100 steps), 2 x 2 or no block reached 1.0.
        """
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        return 1 if num_blocks == 0 else 2 ** (num_blocks + 1)

    @staticmethod
    def blocks_for(feature_size: int, min_output: int = 4) -> int:
        """The default depth: as many blocks as leave at least `min_output` x `min_output` pixels
        (SDXL at 1024 px: 32 -> 4 pixels, 3 blocks; the toy UNet's 4 x 4 features: no block)."""
        blocks = 0
        while feature_size // 2 ** (blocks + 1) >= min_output:
            blocks += 1
        return blocks

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            features: (B, C_in, h, w) backbone features (SDXL at 1024 px: h = w = 32).

        Returns:
            (B,) logits.
        """
        size = self.min_input_size(self.num_blocks)
        if min(features.shape[-2:]) < size:
            raise ValueError(
                f"DiscriminatorHead with {self.num_blocks} blocks needs features of at least "
                f"{size} x {size} (its last GroupNorm must see 2 x 2 pixels), got {tuple(features.shape[-2:])}"
            )
        # Block i: (B, C_in, h, w) -> (B, hidden, h / 2^(i+1), w / 2^(i+1)); SDXL 32 -> 16 -> 8.
        h = self.blocks(features)  # (B, hidden, h / 2^n, w / 2^n)
        return self.proj(h).mean(dim=(1, 2, 3))  # (B, 1, h / 2^n, w / 2^n) -> (B,)


@dataclass(frozen=True)
class DiscriminatorSpec:
    """The `discriminator=` choice (conf/discriminator/): the UNet-encoder discriminator's shape, its
    optimizer's rate and how it trains (METHOD.md 3); `build` makes it from the stage's teacher.

    Attributes:
        lr: its optimizer's learning rate (the paper: the student's).
        head_blocks: head depth (4x4 stride-2 conv blocks); None: as many as leave 4 x 4 pixels
            (`DiscriminatorHead.blocks_for`).
        head_channels: head width; None derives it from the mid block.
        init: a `discriminator.safetensors` an earlier phase of the same stage wrote (the
            discriminator is initialised from the teacher once per stage, METHOD.md 3).
        warmup: batches that train the discriminator alone before the generator starts (the paper: 0).
        conditioning_fakes: add the real x_{t'} paired with another sample's caption (and, for the
            conditional discriminator, another sample's x_t) as extra fakes (not in the paper).
        shared_forward: one D forward shared by the generator and discriminator phases (the same
            maths, fewer FLOPs: docs/benchmark_step.md); False: D judges in each phase.
        gradient_checkpointing: the backbone's blocks: "none", "selective" or "full".
    """

    lr: float
    head_blocks: int | None = None
    head_channels: int | None = None
    init: str | None = None
    warmup: int = 0
    conditioning_fakes: bool = False
    shared_forward: bool = True
    gradient_checkpointing: str | bool = "none"

    def __post_init__(self):
        if self.warmup < 0:
            raise ValueError(f"discriminator.warmup={self.warmup} must be >= 0 batches.")

    def build(self, unet: UNet2DConditionModel, conditional: bool, latent_size: int) -> Discriminator:
        """A float32 discriminator on a trainable copy of `unet`'s encoder (continued from `init`)."""
        discriminator = Discriminator.from_unet(
            unet, conditional=conditional, head_channels=self.head_channels, head_blocks=self.head_blocks,
            dtype=torch.float32, latent_size=latent_size,
        )
        if self.init:
            discriminator.continue_from(self.init)
        enable_activation_checkpointing(discriminator.backbone, self.gradient_checkpointing)
        return discriminator


class Discriminator(nn.Module):
    """Backbone d (teacher-initialised, trained) plus head, conditional or unconditional
    (METHOD.md section 3).

    Attributes:
        backbone: d(x, t, c), a `UNetEncoder`.
        head: `DiscriminatorHead` on d(x_{t'}) [concatenated with d(x_t) when conditional].
        conditional: whether the head also sees d(x_t, t, c), where the jump started.
    """

    def __init__(
        self,
        backbone: UNetEncoder,
        conditional: bool,
        head_channels: int | None = None,
        head_blocks: int | None = 2,
        feature_size: int | None = None,
    ) -> None:
        """
        Args:
            backbone: the discriminator backbone d.
            conditional: True for D(x_t, x_{t'}, t, t', c) (phase a), False for D'(x_{t'}, t', c).
            head_channels: hidden channels of the head; None: the head's input channels
                (backbone channels x 2 if conditional else x 1), rounded up to a multiple of 32.
            head_blocks: number of stride-2 head blocks; None: `DiscriminatorHead.blocks_for(feature_size)`.
            feature_size: the backbone's output side at the training resolution (needed when
                head_blocks is None).
        """
        super().__init__()
        if head_blocks is None:
            if feature_size is None:
                raise ValueError("head_blocks=None (automatic depth) needs the backbone's feature_size")
            head_blocks = DiscriminatorHead.blocks_for(feature_size)
        self.backbone = backbone
        self.conditional = conditional
        in_channels = backbone.out_channels * (2 if conditional else 1)
        if head_channels is None:
            head_channels = -(-in_channels // 32) * 32
        self.head = DiscriminatorHead(in_channels, head_channels, head_blocks)
        # Same device and dtype as the backbone (which follows the teacher's unless cast).
        param = next(backbone.parameters())
        self.head.to(device=param.device, dtype=param.dtype)

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        conditional: bool,
        head_channels: int | None = None,
        head_blocks: int | None = 2,
        dtype: torch.dtype | None = None,
        latent_size: int | None = None,
    ) -> Discriminator:
        """A discriminator whose backbone is a trainable copy of the teacher's encoder + mid block.

        Args:
            unet: the teacher UNet.
            conditional: see `Discriminator.__init__`.
            head_channels: see `Discriminator.__init__`.
            head_blocks: see `Discriminator.__init__`.
            dtype: cast backbone and head to this dtype; None keeps the teacher's.
            latent_size: the training latents' side (needed when head_blocks is None).
        """
        backbone = UNetEncoder.from_unet(unet, dtype=dtype)
        feature_size = None if latent_size is None else latent_size // backbone.downsample_factor
        return cls(backbone, conditional, head_channels, head_blocks, feature_size)

    def save(self, path: str | Path) -> None:
        """The discriminator's weights as safetensors, for the next phase of the stage (`continue_from`)."""
        state = {key: value.detach().to("cpu").contiguous() for key, value in self.state_dict().items()}
        save_file(state, str(path), metadata={"conditional": str(self.conditional)})

    def continue_from(self, path: str | Path) -> bool:
        """Continue the discriminator an earlier phase of the same stage trained (`save`).

        d is initialised from the teacher once per stage and trained through the stage's phases
        (METHOD.md 3). The backbone always continues; the head only when its shape matches: phase
        a's conditional head sees twice the channels of the unconditional one of phases b and c,
        so phase b starts a fresh head on the continued backbone.

        Returns:
            Whether the head continued too.
        """
        state = load_file(str(path))
        parts = {
            name: {key.removeprefix(f"{name}."): value for key, value in state.items() if key.startswith(f"{name}.")}
            for name in ("backbone", "head")
        }
        try:
            self.backbone.load_state_dict(parts["backbone"])
        except RuntimeError as error:
            raise ValueError(
                f"discriminator.init={path} is not a discriminator of this teacher's architecture "
                f"({str(error).splitlines()[0]}); set discriminator.init=null to build one from the teacher."
            ) from error
        own = self.head.state_dict()
        if parts["head"].keys() != own.keys() or any(parts["head"][k].shape != own[k].shape for k in own):
            return False
        self.head.load_state_dict(parts["head"])
        return True

    def features(
        self, sample: torch.Tensor, timestep: torch.Tensor | float, condition: SDXLCondition
    ) -> torch.Tensor:
        """d(x, t, c), (B, C_mid, h, w)."""
        return self.backbone(sample, timestep, condition)

    def logits(
        self, next_features: torch.Tensor, start_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The head on d(x_{t'}, t', c) [concatenated with d(x_t, t, c) when conditional].

        Args:
            next_features: (B, C_mid, h, w) d(x_{t'}, t', c).
            start_features: (B, C_mid, h, w) d(x_t, t, c); required when conditional, ignored
                otherwise (D' drops x_t).

        Returns:
            (B,) logits.
        """
        if not self.conditional:
            return self.head(next_features)  # D'(x_{t'}, t', c)
        if start_features is None:
            raise ValueError(
                "a conditional discriminator needs start_features = d(x_t, t, c), where the "
                "jump started (METHOD.md section 3)"
            )
        # D(x_t, x_{t'}, t, t', c) = head(concat_channels(d(x_{t'}, t', c), d(x_t, t, c))).
        return self.head(torch.cat([next_features, start_features], dim=1))  # (B, 2 C_mid, h, w)

    def judge(
        self,
        x_start: torch.Tensor,
        t_start: torch.Tensor | int,
        candidates: list[torch.Tensor],
        t_next: torch.Tensor | int,
        condition: SDXLCondition,
        start_gradient: bool = True,
    ) -> list[torch.Tensor]:
        """Logits for each candidate x_{t'} (e.g. [real, fake]) in one backbone forward.

        The batch is concat([x_t (conditional only), *candidates]); d(x_t, t, c) is computed once
        and shared by every candidate (METHOD.md section 3). Generator step: candidates=[fake];
        discriminator step: candidates=[real, fake] (fake detached by the caller).

        Args:
            x_start: (B, 4, H, W) x_t, where the jump started; not run when unconditional.
            t_start: scalar or (B,) timesteps t of x_t.
            candidates: k tensors (B, 4, H, W), each an x_{t'} to judge.
            t_next: scalar or (B,) timesteps t' of the candidates.
            condition: the conditioning, batch B.
            start_gradient: False when nothing needs a gradient through d(x_t, t, c) (the generator
                step: x_t does not depend on the student and D's weights are frozen). d(x_t) then runs
                apart, without a graph, instead of in the batch whose backward would carry input
                gradients for its rows (3.2 TFLOPs per sample at 1024 px, `benchmarks/step.py`).

        Returns:
            k tensors of (B,) logits, in the order of `candidates`.
        """
        if not candidates:
            raise ValueError("judge needs at least one candidate")
        batch, device = candidates[0].shape[0], candidates[0].device
        k = len(candidates)
        x_t, t = x_start, t_start
        t_next = _batch_timesteps(t_next, batch, device)  # (B,)
        samples = list(candidates)  # k x (B, 4, H, W), each an x_{t'}
        timesteps = [t_next] * k
        start_in_batch = self.conditional and start_gradient  # x_t's rows join the candidates' batch
        if start_in_batch:
            samples.insert(0, x_t)
            timesteps.insert(0, _batch_timesteps(t, batch, device))
        features = self.backbone(
            torch.cat(samples),  # (n B, 4, H, W)
            torch.cat(timesteps),  # (n B,)
            condition.repeat(len(samples)),
        )  # (n B, C_mid, h, w)
        start_features, next_features = None, features  # d(x_{t'}, t', c): (k B, C_mid, h, w)
        if start_in_batch:
            start_features, next_features = features[:batch], features[batch:]  # d(x_t, t, c): (B, C_mid, h, w)
        elif self.conditional:
            with torch.no_grad():
                start_features = self.backbone(x_t, _batch_timesteps(t, batch, device), condition)
        if start_features is not None:
            # One head call over all candidates, each paired with the shared d(x_t, t, c).
            start_features = start_features.repeat(k, 1, 1, 1)  # (k B, C_mid, h, w)
        # Copies, not views of one tensor: FSDP2 hooks a module's outputs for backward (trainer=fsdp).
        return [logits.clone() for logits in self.logits(next_features, start_features).split(batch)]  # k x (B,)

    def judge_fake(
        self, x_start: torch.Tensor, t_start: torch.Tensor | int, fake: torch.Tensor, t_next: torch.Tensor | int,
        condition: SDXLCondition,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The lean step's first half (`DistillationModule.judge_once`): logits of the student's x_{t'}
        alone, with d(x_t, t, c) (conditional; None otherwise) from its own backbone call, both with
        their graphs for D's loss, which `judge_real` completes after the student's backward. The
        same numbers as `judge`, row by row.

        Returns:
            (B,) logits of `fake` and the (B, C_mid, h, w) start features to pass to `judge_real`.
        """
        batch, device = fake.shape[0], fake.device
        start_features = None
        if self.conditional:
            start_features = self.backbone(x_start, _batch_timesteps(t_start, batch, device), condition)
        next_features = self.backbone(fake, _batch_timesteps(t_next, batch, device), condition)
        return self.logits(next_features, start_features).clone(), start_features

    def judge_real(
        self, start_features: torch.Tensor | None, real: torch.Tensor, t_next: torch.Tensor | int, condition: SDXLCondition
    ) -> torch.Tensor:
        """The lean step's second half: (B,) logits of the teacher's x_{t'} against the start features
        `judge_fake` returned."""
        next_features = self.backbone(real, _batch_timesteps(t_next, real.shape[0], real.device), condition)
        return self.logits(next_features, start_features).clone()

    # Calling the module is judging (wrappers that hook `forward` see the whole discriminator).
    forward = judge
