"""The student UNet (peft LoRA or full) and its frozen teacher (METHOD.md 2, LoRA settings)."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from lightning_sdxl.activation_checkpointing import enable_activation_checkpointing
from lightning_sdxl.models.conditioning import SDXLCondition
from lightning_sdxl.models.loading import cast

# LCM-LoRA's target modules: every linear and conv layer of the UNet's blocks, but not conv_in,
# conv_out or the shared time embedding (METHOD.md 2).
LCM_LORA_TARGET_MODULES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)


@dataclass(frozen=True)
class StudentSpec:
    """A `student=` choice (conf/student/): which weights train, how, and at what rate; `build`
    makes the student/teacher pair from the loaded teacher.

    Attributes:
        type: "lora" (adapters on the frozen teacher, LCM-LoRA's) or "full" (the whole UNet).
        lr: the generator optimizer's learning rate (METHOD.md 2: 1e-6 LoRA, 5e-7 full).
        gradient_checkpointing: the student UNet's blocks: "none", "selective" or "full"
            (`activation_checkpointing.py`; true / false: full / none).
        lora_rank: LoRA rank r. student/full.yaml has no lora_* settings; a preset that sets them
            for every student (experiment=toy) leaves a full student unchanged.
        lora_alpha: LoRA alpha (LoRA only; None: the rank, scale 1).
        lora_target_modules: module name suffixes that get adapters (LoRA only; None: LCM-LoRA's).
    """

    type: str
    lr: float
    gradient_checkpointing: str | bool = "none"
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_target_modules: list[str] | None = None

    def __post_init__(self):
        if self.type not in ("lora", "full"):
            raise ValueError(f"student.type={self.type}: choose 'lora' or 'full'.")
        if self.type == "lora" and (self.lora_rank is None or self.lora_rank < 1):
            raise ValueError(f"student.lora_rank={self.lora_rank}: a LoRA student needs a rank >= 1.")

    def build(self, unet, teacher_dtype: torch.dtype, student_init: str | None = None, teacher=None) -> StudentTeacher:
        """The pair on `unet` (see `StudentTeacher`), its student's blocks checkpointed as configured."""
        pair = StudentTeacher(
            unet, self.type, self.lora_rank or 0, self.lora_alpha,
            tuple(self.lora_target_modules or LCM_LORA_TARGET_MODULES), teacher_dtype, student_init, teacher=teacher,
        )
        enable_activation_checkpointing(pair.unet, self.gradient_checkpointing)
        return pair


class StudentTeacher(nn.Module):
    """A trainable student UNet and the frozen teacher it starts from.

    With `student_type="lora"` both share one UNet: the frozen base weights are the teacher, the
    peft adapters the student, so SDXL's 2.6 B weights are held once. With `"full"` the teacher is a
    frozen copy and the whole student UNet trains.

    Args:
        unet: the teacher UNet (also the student's initialisation).
        student_type: "lora" or "full".
        lora_rank: LoRA rank r (>= 1), used when student_type is "lora".
        lora_alpha: LoRA alpha; None means alpha = rank (scale 1).
        lora_target_modules: module name suffixes that get adapters.
        teacher_dtype: dtype of the frozen teacher weights (the student trains in float32).
        student_init: start the student elsewhere than at the teacher (the recipe's phases b and
            c, METHOD.md 2): a LoRA file (diffusers/peft format, as `export.py` writes) for a LoRA
            student, or a diffusers UNet folder for a full student. None: the teacher itself.
        teacher: a separate teacher UNet (the skip-level teacher, METHOD.md 4); `unet` is then only
            the student's initialisation, and a LoRA student no longer shares its UNet with the teacher.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        student_type: str = "lora",
        lora_rank: int = 64,
        lora_alpha: float | None = None,
        lora_target_modules: tuple[str, ...] = LCM_LORA_TARGET_MODULES,
        teacher_dtype: torch.dtype = torch.float32,
        student_init: str | None = None,
        teacher: UNet2DConditionModel | None = None,
    ):
        super().__init__()
        if student_type not in ("lora", "full"):
            raise ValueError(f"student_type={student_type!r}: choose 'lora' or 'full'.")
        self.student_type = student_type
        if student_type == "lora":
            cast(unet.requires_grad_(False), teacher_dtype)
            config = LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha or lora_rank,
                init_lora_weights="gaussian",  # B = 0: the student starts exactly at the teacher
                target_modules=list(lora_target_modules),
            )
            unet.add_adapter(config)
            if student_init:
                load_lora_into(unet, student_init)
            for parameter in unet.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()  # adapters train in float32
            self.teacher_unet = teacher  # None: the base UNet with its adapters disabled
        else:
            self.teacher_unet = teacher if teacher is not None else copy.deepcopy(unet)
            if student_init:
                unet = UNet2DConditionModel.from_pretrained(student_init, use_safetensors=True)
            unet.requires_grad_(True).float()
        if self.teacher_unet is not None:
            cast(self.teacher_unet.requires_grad_(False), teacher_dtype).eval()
        self.unet = unet
        self._teacher_depth = 0  # nesting of teacher_mode

    def train(self, mode: bool = True) -> StudentTeacher:
        super().train(mode)
        if self.teacher_unet is not None:
            self.teacher_unet.eval()
        return self

    def student(self, x_t: torch.Tensor, t: torch.Tensor, condition: SDXLCondition) -> torch.Tensor:
        """The student's raw output u at x_t."""
        return self.unet(x_t, t, **condition.unet_kwargs, return_dict=False)[0]

    @torch.no_grad()
    def teacher(self, x_t: torch.Tensor, t: torch.Tensor, condition: SDXLCondition) -> torch.Tensor:
        """The frozen teacher's raw output u at x_t (never builds a graph)."""
        with self.teacher_mode():
            unet = self.teacher_unet or self.unet
            dtype = next(unet.parameters()).dtype
            kwargs = condition.to(dtype).unet_kwargs
            return unet(x_t.to(dtype), t, **kwargs, return_dict=False)[0].to(x_t.dtype)

    @contextmanager
    def teacher_mode(self):
        """Disable the LoRA adapters (the base UNet is the teacher) for the duration. Nested uses
        toggle once: a teacher solve of n calls inside one `teacher_mode` walks the UNet's modules
        twice, not 2n times (peft visits every module per toggle: 9,810 on SDXL)."""
        if self.teacher_unet is not None or self._teacher_depth:
            self._teacher_depth += 1
            try:
                yield
            finally:
                self._teacher_depth -= 1
            return
        self.unet.disable_adapters()
        self._teacher_depth = 1
        try:
            yield
        finally:
            self._teacher_depth = 0
            self.unet.enable_adapters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [parameter for parameter in self.unet.parameters() if parameter.requires_grad]


def load_lora_into(unet: UNet2DConditionModel, path: str) -> None:
    """Load a LoRA file written by `export.py` (peft names under `unet.`) into the UNet's adapter."""
    state = load_file(path)
    state = {key.removeprefix("unet."): value for key, value in state.items()}
    result = set_peft_model_state_dict(unet, state, adapter_name="default")
    unexpected = [key for key in result.unexpected_keys if "lora_" in key]
    loaded = sum(1 for key in state if "lora_" in key)
    if unexpected or not loaded:
        raise ValueError(
            f"student_init={path} does not fit this LoRA student ({len(unexpected)} unexpected keys, "
            f"{loaded} loaded): use the same lora_rank and target modules as the run that wrote it."
        )
