"""The distillation LightningModule: one stage of progressive adversarial distillation.

Per batch (METHOD.md 2-3): latents x0 and condition c; a jump t -> t' of the stage; x_t; the frozen
teacher's n-step target x_{t'}; the student's one-step x_{t'}; then a generator step and, for the
adversarial losses, a discriminator step. The maths lives in `diffusion/`, `models/`, `losses.py`.

Step convention (lightning_sdxl/steps.py): everything the user configures counts batches;
Lightning's `trainer.global_step` counts optimizer steps (2 per adversarial batch).
"""

from __future__ import annotations

import warnings
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
import torch
from torch.nn.parallel import DistributedDataParallel

from lightning_sdxl.batch_randomness import BatchRandomness
from lightning_sdxl.checkpoint_hparams import read_hparams
from lightning_sdxl.data.latent_cache import read_cache_info
from lightning_sdxl.data.stored_conditions import StoredConditions
from lightning_sdxl.diffusion.prediction import get_prediction
from lightning_sdxl.diffusion.sampler import generate, seeded_noise
from lightning_sdxl.diffusion.schedule import CLEAN, NoiseSchedule
from lightning_sdxl.diffusion.segments import SegmentedStage
from lightning_sdxl.diffusion.solver import move, solve
from lightning_sdxl.diffusion.stage_grid import StageGrid
from lightning_sdxl.finite_guard import NonFiniteGuard, all_finite
from lightning_sdxl.gradient_reduction import GradientReduction, reduce_owned_buckets
from lightning_sdxl.losses import DistillationLoss
from lightning_sdxl.models.conditioning import SDXLCondition
from lightning_sdxl.models.discriminator import DiscriminatorSpec
from lightning_sdxl.models.ema import EMAWeights
from lightning_sdxl.models.loading import (
    check_same_noise_schedule,
    frozen_encoders,
    load_sdxl,
    load_unet,
)
from lightning_sdxl.models.student import StudentSpec
from lightning_sdxl.models.text_encoding import build_condition, unconditional_like
from lightning_sdxl.models.vae import (
    decode_latents,
    encode_images,
    encode_posterior,
    sample_latents,
    vae_scale_factor,
)
from lightning_sdxl.plain_config import plain_config
from lightning_sdxl.sharding import FullyShardedStrategy
from lightning_sdxl.steps import to_batches

# A phase whose discriminator accuracy over its last fifth stays within CHANCE_BAND of 0.5 carried
# no adversarial signal: the generator followed noise (issue 10's measurement on the toy).
CHANCE_BAND = 0.05


@dataclass
class Judgement:
    """The discriminator's one forward over the student's rows [and x_t's], shared by the generator
    and discriminator phases (the lean step, `DistillationModule.judge_once`).

    Attributes:
        logits_fake: (B,) D's logits of the student's x_{t'}, with D's graph.
        fake_input: the student's x_{t'} as D saw it: a detached leaf, so D's graph stays apart from
            the student's; the generator's gradient reaches the student through d loss / d fake_input.
        start_features: d(x_t, t, c) with its graph (conditional D; else None), for the real rows'
            logits that the discriminator phase adds (`Discriminator.judge_real`).
    """

    logits_fake: torch.Tensor
    fake_input: torch.Tensor
    start_features: torch.Tensor | None


@dataclass
class Jump:
    """One batch's jump t -> t' (METHOD.md 2): where it starts, both ends, the condition.

    Attributes:
        x_t: (B, 4, h, w) the noisy latents the jump starts from.
        t, t_next: (B,) t and t' (CLEAN = -1 past the last step).
        condition: the text and micro-conditioning.
        x_next_real: (B, 4, h, w) the frozen teacher's x_{t'} after n steps.
        x_next_fake: (B, 4, h, w) the student's x_{t'} after one step (with gradients).
    """

    x_t: torch.Tensor
    t: torch.Tensor
    t_next: torch.Tensor
    condition: SDXLCondition
    x_next_real: torch.Tensor
    x_next_fake: torch.Tensor


class DistillationModule(L.LightningModule):
    """One stage "A to B" (METHOD.md 2) or one TSCD stage (METHOD.md 7), built from its components.

    The stage, loss, student and discriminator arguments are the Hydra configs of conf/stage/,
    conf/loss/, conf/student/ and conf/discriminator/ (each with its `_target_`): the module
    instantiates them, so checkpoints hold plain containers and `load_from_checkpoint` rebuilds them.

    Args:
        model_path: diffusers SDXL folder or hub id of the teacher (and initial student).
        stage: a `StageGrid` (SDXL-Lightning's stages) or `SegmentedStage` (TSCD): the jumps the
            student learns, the teacher's steps and guidance.
        loss: a `DistillationLoss`: MSE and/or adversarial terms, the re-noiser, optimizers per batch.
        student: a `StudentSpec` (LoRA or full, its learning rate and checkpointing).
        discriminator: a `DiscriminatorSpec`; built only when the loss is adversarial.
        optim: conf/optim/: `optimizer` (a partial optimizer, given each part's lr), `lr_scheduler`
            (a partial LR scheduler or None), `gradient_clip_val`, `accumulate_grad_batches` and
            `max_nonfinite_steps` (optimizer steps in a row with a non-finite loss or gradient,
            skipped, before NonFiniteTrainingError, `finite_guard.py`).
        model_variant: weight variant to load ("fp16") or None.
        frozen_dtype: "float32", "bfloat16" or "float16" for the frozen teacher, VAE and text encoders.
        prediction_type: the student's prediction type; None keeps the teacher's.
        resolution: image size in pixels (target size of the micro-conditioning).
        validation_teacher_steps: the teacher's steps in validation grids (None: the stage's).
        student_init: a LoRA file or UNet folder the student starts from (None: the teacher).
        teacher_path: a diffusers SDXL folder whose UNet and scheduler are the teacher instead of
            model_path's (the recipe's skip-level teacher, METHOD.md 4); the student, VAE, text
            encoders and discriminator still come from model_path. None: model_path is the teacher.
        latent_cache: the latent cache the run trains from (`data=cached`, data/latent_cache.py): the
            text encoders and the VAE's encoder are not loaded; the validation prompts' conditions
            and the empty prompt come from the cache (data/stored_conditions.py). None: images.
        seed: the run's seed; with the batch number and the sample's global row it seeds each
            sample's draws (`batch_randomness.py`).
    """

    def __init__(
        self,
        model_path: str,
        stage: dict,
        loss: dict,
        student: dict,
        discriminator: dict,
        optim: dict,
        model_variant: str | None = None,
        frozen_dtype: str = "float32",
        prediction_type: str | None = None,
        resolution: int = 1024,
        validation_teacher_steps: int | None = None,
        student_init: str | None = None,
        teacher_path: str | None = None,
        latent_cache: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        # Plain containers in hparams, so checkpoints load with torch.load(weights_only=True).
        stage, loss, student, discriminator, optim = map(plain_config, (stage, loss, student, discriminator, optim))
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.stage: StageGrid | SegmentedStage = hydra.utils.instantiate(stage)
        self.loss: DistillationLoss = hydra.utils.instantiate(loss)
        self.student_spec: StudentSpec = hydra.utils.instantiate(student)
        self.discriminator_spec: DiscriminatorSpec = hydra.utils.instantiate(discriminator)
        self.adversarial = self.loss.adversarial
        self.segmented = isinstance(self.stage, SegmentedStage)

        components = load_sdxl(model_path, model_variant, text_encoders=not latent_cache)
        dtype = getattr(torch, frozen_dtype)
        self.schedule = NoiseSchedule.from_scheduler_config(components.scheduler_config)
        base_prediction = components.scheduler_config.get("prediction_type", "epsilon")
        separate_teacher, teacher_scheduler = None, components.scheduler_config
        if teacher_path:
            separate_teacher, teacher_scheduler = load_unet(teacher_path, model_variant)
            check_same_noise_schedule(components.scheduler_config, teacher_scheduler, model_path, teacher_path)
        self.teacher_prediction = get_prediction(teacher_scheduler.get("prediction_type", "epsilon"))
        self.student_prediction = get_prediction(prediction_type or base_prediction)
        self.vae, self.text_encoder = frozen_encoders(components, dtype, encode=not latent_cache)
        self.stored_conditions = None
        if latent_cache:  # no text encoder: the conditions generation needs were stored with the cache
            self.stored_conditions = StoredConditions(latent_cache, read_cache_info(latent_cache)["validation"]["prompts"])
        self.latent_size = resolution // vae_scale_factor(self.vae.config)
        # Built from the stage's teacher before the student gets adapters; the recipe carries it
        # through the stage's phases (discriminator.init) and builds a new one every stage.
        self.discriminator = None
        if self.adversarial:
            self.discriminator = self.discriminator_spec.build(components.unet, self.loss.conditional, self.latent_size)
        self.pair = self.student_spec.build(components.unet, dtype, student_init, teacher=separate_teacher)
        # TSCD's target network: the EMA of the student's trainable weights (after adapters exist).
        self.ema = None
        if self.segmented and self.stage.consistency_target == "ema":
            self.ema = EMAWeights(self.pair.unet, self.stage.ema_decay)
        self.finite_guard = NonFiniteGuard(optim["max_nonfinite_steps"])
        # Per batch: (t, accuracy) per sample; on_train_start bounds it to the run's last fifth.
        self.discriminator_accuracies: deque[tuple[torch.Tensor, torch.Tensor]] = deque()
        self.batches_recorded = 0  # batches appended in this process (the deque keeps the newest)
        self.discriminator_signal: dict | None = None  # set when training ends (`on_train_end`)
        self.validation_outputs: list[dict[str, torch.Tensor]] = []
        self.teacher_samples: dict[tuple, torch.Tensor] = {}  # validation batch -> teacher latents
        self.strict_loading = False  # checkpoints hold trainable weights only (on_save_checkpoint)
        self.sharded = False  # set by configure_model under trainer=fsdp
        self.gradient_reduction = GradientReduction()  # DDP: which buckets a backward all-reduces
        self.batches_drawn = 0  # training batches whose randomness was drawn (batch_randomness.py)

    @classmethod
    def for_inference(cls, checkpoint_path: str | Path, **overrides) -> DistillationModule:
        """A checkpoint's module on the CPU with every frozen part (also the text encoders and the
        VAE's encoder of a run from a latent cache), for sampling, export and inspection.
        `overrides` replace recorded arguments (e.g. model_path=<the base folder here>). The
        discriminator's trained weights come from the checkpoint (its `init` file is not read);
        checkpoints of the flat argument form load too (`checkpoint_hparams.upgrade`)."""
        hparams = read_hparams(checkpoint_path)
        hparams["discriminator"] = {**hparams["discriminator"], "init": None}
        with warnings.catch_warnings():  # the frozen parts are absent by design: they reload from model_path
            warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
            return cls.load_from_checkpoint(
                str(checkpoint_path), map_location="cpu", weights_only=True, **{**hparams, "latent_cache": None, **overrides}
            )

    # ---- data ----------------------------------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [-1, 1] -> scaled VAE latents x0 (B, 4, R/f, R/f), f the VAE's factor."""
        return encode_images(self.vae, pixel_values)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (B, 3, R, R) in [0, 1]."""
        return decode_latents(self.vae, latents)

    def condition(self, prompts: list[str], original_size=None, crop_top_left=None) -> SDXLCondition:
        if self.stored_conditions is not None:  # a run from a latent cache: its validation prompts
            return self.stored_conditions.condition(prompts, self.device)
        size = (self.hparams.resolution,) * 2
        return build_condition(self.text_encoder, prompts, size, original_size, crop_top_left).to(torch.float32)

    def uncondition(self, condition: SDXLCondition) -> SDXLCondition | None:
        """The empty-prompt condition when the teacher uses CFG (stage 128 to 32), else None."""
        if self.stage.guidance_scale <= 1.0:
            return None
        encoder = self.text_encoder if self.stored_conditions is None else self.stored_conditions
        return unconditional_like(encoder, condition).to(condition.add_time_ids.device, torch.float32)

    # ---- training ------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Under `trainer=fsdp`, shard the student and discriminator (sharding.py); else nothing."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FullyShardedStrategy) and not self.sharded:
            strategy.shard(self)
            self.sharded = True

    def trains_only(self, optimizer):
        """Only `optimizer`'s weights take gradients from the block: Lightning's `toggled_optimizer`
        (the others' requires_grad off, their gradients never computed); under FSDP2, where a weight
        toggled off stays off for good (docs/MEASUREMENTS.md "Sharding"), the others' gradients are
        computed and then thrown away, their accumulated ones restored (`_keeping_gradients`)."""
        if not self.sharded:
            return self.toggled_optimizer(optimizer)
        others = [p for o in self._as_list(self.optimizers()) if o is not optimizer for g in o.param_groups for p in g["params"]]
        return _keeping_gradients(others)

    @property
    def optimizers_per_batch(self) -> int:
        return self.loss.optimizers_per_batch

    @property
    def accumulate_grad_batches(self) -> int:
        return self.hparams.optim["accumulate_grad_batches"]

    @property
    def batches_trained(self) -> int:
        """Batches trained so far (the project's step convention, lightning_sdxl/steps.py)."""
        return to_batches(self.trainer.global_step, self.optimizers_per_batch, self.accumulate_grad_batches)

    def jump(self, x0: torch.Tensor, condition: SDXLCondition, randomness: BatchRandomness | None = None) -> Jump:
        """One jump of the stage for latents x0 (METHOD.md 2, steps 1-4): t and t', x_t, the frozen
        teacher's n-step target and the student's one-step x_{t'} (with gradients to the student).
        A TSCD stage's jump instead: `consistency_jump`. `randomness`: the batch's per-sample draws
        (`batch_randomness.py`; None: torch's global generator)."""
        randomness = randomness or BatchRandomness(len(x0))
        if self.segmented:
            return self.consistency_jump(x0, condition, randomness)
        path = randomness.per_sample(self.stage.draw).to(self.device)  # (n + 1, B): t, teacher substeps, t'
        t, t_next = path[0], path[-1]
        x_t = self.schedule.forward_process(x0, randomness.normal(x0), t)  # (B, 4, R/f, R/f)
        # Teacher target: n frozen steps from t to t' (step 3), adapters toggled once for all n.
        with self.pair.teacher_mode():
            x_next_real = solve(
                self.pair.teacher, self.schedule, self.teacher_prediction, x_t, path, condition,
                self.uncondition(condition), self.stage.guidance_scale,
            )
        # Student: one jump from t to t' (step 4).
        u = self.pair.student(x_t, t, condition)
        x_next_fake = move(self.schedule, self.student_prediction, x_t, u, t, t_next)
        return Jump(x_t, t, t_next, condition, x_next_real, x_next_fake)

    def consistency_jump(self, x0: torch.Tensor, condition: SDXLCondition, randomness: BatchRandomness | None = None) -> Jump:
        """Hyper-SD's TSCD jump (METHOD.md 7, `diffusion/segments.py`): t on the teacher's grid inside
        a segment, one frozen teacher step to t_mid, the target network's map of x_{t_mid} to the
        segment's end t_end (x_{t_mid} itself when t_mid is the end) as x_{t'}'s real, and the
        student's map of x_t to t_end (with gradients) as its fake."""
        randomness = randomness or BatchRandomness(len(x0))
        t, t_mid, t_end = randomness.per_sample(self.stage.draw).to(self.device)
        x_t = self.schedule.forward_process(x0, randomness.normal(x0), t)
        with self.pair.teacher_mode():
            x_mid = solve(
                self.pair.teacher, self.schedule, self.teacher_prediction, x_t, torch.stack([t, t_mid]),
                condition, self.uncondition(condition), self.stage.guidance_scale,
            )
        with torch.no_grad():
            # The target network runs only on rows whose teacher step stopped short of the end (under
            # FSDP on every row: each rank must join every sharded forward).
            short = t_mid != t_end
            rows = torch.arange(len(x0), device=self.device) if self.sharded else short.nonzero().squeeze(1)
            x_target = x_mid.clone()
            if len(rows):
                x, t_from, part = x_mid[rows], t_mid[rows], condition.index(rows)
                if self.ema is not None:
                    u_mid = self.ema.call(self.pair.unet, x, t_from, **part.unet_kwargs, return_dict=False)[0]
                else:
                    u_mid = self.pair.student(x, t_from, part)
                mapped = move(self.schedule, self.student_prediction, x, u_mid, t_from, t_end[rows])
                x_target[rows] = torch.where(short[rows].view(-1, 1, 1, 1), mapped, x)
        u = self.pair.student(x_t, t, condition)
        x_next_fake = move(self.schedule, self.student_prediction, x_t, u, t, t_end)
        return Jump(x_t, t, t_end, condition, x_target, x_next_fake)

    def judged(self, jump: Jump, randomness: BatchRandomness | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(real, fake, t_judge): the jump's x_{t'} as the discriminator sees them, re-noised to t*
        where t' is clean (multi-timestep discrimination, METHOD.md 3)."""
        clean = jump.t_next == CLEAN
        return self.loss.renoiser(self.schedule, jump.x_next_real, jump.x_next_fake, jump.t_next, clean, randomness)

    def latents_and_condition(self, batch: dict, randomness: BatchRandomness | None = None) -> tuple[torch.Tensor, SDXLCondition]:
        """x0 (B, 4, R/f, R/f), a posterior sample, and the condition of a batch of images, or of a
        latent cache's items (`data=cached`: the stored posterior, the stored encoder outputs)."""
        if "latent_mean" in batch:
            mean, logvar = batch["latent_mean"], batch["latent_logvar"]
            condition = SDXLCondition(batch["prompt_embeds"], batch["pooled_prompt_embeds"], batch["add_time_ids"])
        else:
            mean, logvar = encode_posterior(self.vae, batch["pixel_values"])
            condition = self.condition(batch["prompt"], batch["original_size"], batch["crop_top_left"])
        noise = (randomness or BatchRandomness(len(mean))).normal(mean)
        return sample_latents(mean, logvar, self.vae.config, noise), condition.to(torch.float32)

    def batch_randomness(self, batch: int) -> BatchRandomness:
        """This rank's per-sample draws for the next batch (`batch_randomness.py`), counted in
        `batches_drawn` (kept in checkpoints)."""
        randomness = BatchRandomness.for_rank(
            self.hparams.get("seed", 0), self.batches_drawn, batch, self.trainer.global_rank, self.trainer.world_size
        )
        self.batches_drawn += 1
        return randomness

    def training_step(self, batch: dict, batch_idx: int) -> None:
        randomness = self.batch_randomness(batch_length(batch))
        x0, condition = self.latents_and_condition(batch, randomness)
        jump = self.jump(x0, condition, randomness)
        if not self.adversarial:
            self.generator_phase(jump, None, None, batch_idx)
            return
        x_real, x_fake, t_judge = self.judged(jump, randomness)
        judgement = self.judge_once(jump, x_fake, t_judge) if self.discriminator_spec.shared_forward else None
        self.generator_phase(jump, x_fake, t_judge, batch_idx, judgement)
        self.discriminator_phase(jump, x_real, x_fake.detach(), t_judge, batch_idx, judgement)

    @property
    def generator_is_judged(self) -> bool:
        """The generator takes D's gradient (not during the discriminator warm-up)."""
        return self.adversarial and self.batches_trained >= self.discriminator_spec.warmup

    def judge_once(self, jump: Jump, x_fake, t_judge) -> Judgement:
        """The lean step's one discriminator forward over x_t and the fake (METHOD.md 3), shared by
        both phases: same numbers as judging in each phase, without D's second forward over x_t and
        the fake rows (docs/benchmark_step.md). The fake runs through the backbone on its own, so the
        generator's gradient into it traverses only its rows. The real rows join in the
        discriminator phase, after the student's backward has freed its graph: the peak holds the
        student's graph and D's over the fake [and x_t] rows, never all three."""
        fake_input = x_fake.detach().requires_grad_(self.generator_is_judged)
        # D sees a view of the leaf: torch's module tracker (FlopCounterMode, the profiler) hooks a
        # module's inputs and fails on a leaf that autograd.grad targets.
        logits_fake, start_features = self.discriminator.judge_fake(
            jump.x_t, jump.t, fake_input.view_as(fake_input), t_judge, jump.condition
        )
        return Judgement(logits_fake, fake_input, start_features)

    def generator_phase(self, jump: Jump, x_fake, t_judge, batch_idx: int, judgement: Judgement | None = None) -> None:
        """Generator step: MSE to the teacher's x_{t'} and/or fooling the discriminator (not during
        the discriminator warm-up). With the shared `judgement` D's gradient comes as
        d loss / d fake_input, carried into the student by a backward of <fake, that gradient>
        (the chain rule through the detached leaf), so D's weight gradients are never computed;
        without it (`discriminator.shared_forward=false`) D judges the fake here, its weights
        toggled off (under FSDP2 their gradients are computed and dropped: `trains_only`)."""
        generator = self._as_list(self.optimizers())[0]
        adversarial, through_fake = None, None
        if self.generator_is_judged and judgement is not None:
            # Before D's weights are toggled off: a checkpointed D backbone recomputes its forward in
            # this backward and must save what the original forward saved. D's graph is kept for the
            # discriminator phase.
            adversarial = self.weighted_adversarial(judgement.logits_fake)
            (gradient,) = torch.autograd.grad(adversarial, judgement.fake_input, retain_graph=True)
            through_fake = (x_fake * gradient).sum()
        with self.trains_only(generator):
            if self.generator_is_judged and judgement is None:
                (logits_fake,) = self.discriminator.judge(
                    jump.x_t, jump.t, [x_fake], t_judge, jump.condition, start_gradient=False
                )
                adversarial = through_fake = self.weighted_adversarial(logits_fake)
            loss = self.loss.regression_term(jump.x_next_fake, jump.x_next_real)
            backward_loss = loss
            if adversarial is not None:
                loss = adversarial if loss is None else loss + adversarial
                backward_loss = through_fake if backward_loss is None else backward_loss + through_fake
            self._optimizer_step(0, loss, "generator", batch_idx, backward_loss)
        if self.ema is not None and (batch_idx + 1) % self.accumulate_grad_batches == 0:
            self.ema.update(self.pair.unet)  # after the student's step (TSCD's target network)

    def weighted_adversarial(self, logits_fake: torch.Tensor) -> torch.Tensor:
        """The generator's adversarial loss (METHOD.md 3), x lambda beside the MSE (METHOD.md 7)."""
        weighted, plain = self.loss.adversarial_term(logits_fake)
        if self.loss.regression:  # mse_adv: MSE + lambda x adversarial; the plain term logged apart
            self.log("loss/generator_adversarial", plain.detach())
        return weighted

    def discriminator_phase(
        self, jump: Jump, x_real, x_fake, t_judge, batch_idx: int, judgement: Judgement | None = None
    ) -> None:
        """Discriminator step: real and fake in one batch, d(x_t) computed once (METHOD.md 3); the
        shared `judgement`'s logits when given."""
        discriminator = self._as_list(self.optimizers())[1]
        with self.trains_only(discriminator):
            if judgement is None:
                logits_real, logits_fake = self.discriminator.judge(
                    jump.x_t, jump.t, [x_real, x_fake], t_judge, jump.condition
                )
            else:
                logits_fake = judgement.logits_fake
                logits_real = self.discriminator.judge_real(judgement.start_features, x_real, t_judge, jump.condition)
            extra_fakes = self._conditioning_fakes(jump.x_t, jump.t, x_real, t_judge, jump.condition)
            loss = self.loss.discriminator_loss(logits_real, torch.cat([logits_fake, *extra_fakes]))
            self._optimizer_step(1, loss, "discriminator", batch_idx)
        correct_real, correct_fake = (logits_real > 0).float().detach(), (logits_fake < 0).float().detach()
        self.discriminator_accuracies.append((jump.t.detach(), (correct_real + correct_fake) / 2))
        self.batches_recorded += 1
        self.log_dict(
            {
                "discriminator/logits_real": logits_real.mean(),
                "discriminator/logits_fake": logits_fake.mean(),
                "discriminator/accuracy_real": correct_real.mean(),
                "discriminator/accuracy_fake": correct_fake.mean(),
                **{f"discriminator/accuracy_{name}": (logits < 0).float().mean()
                   for name, logits in zip(("wrong_caption", "wrong_x_t"), extra_fakes)},
            },
            sync_dist=True,
        )
        self.log_accuracy_by_start(jump.t, (correct_real + correct_fake) / 2)

    def log_accuracy_by_start(self, t: torch.Tensor, correct: torch.Tensor) -> None:
        """Per start timestep t (rank-local, logged where the batch has one): with multi-timestep
        training only some starts leave a gap D can see (docs/MEASUREMENTS.md, "D's signal by start")."""
        for start in t.unique().tolist():
            self.log(f"discriminator/accuracy_from_t{start}", correct[t == start].mean())

    def _conditioning_fakes(self, x_t, t, x_real, t_judge, condition) -> list[torch.Tensor]:
        """Logits of the real x_{t'} judged with another sample's caption [and x_t, conditional D]:
        fakes that differ from the reals only in the pairing (`conditioning_fakes`). The batch is
        rolled by one, so a neighbour that happens to share the caption is a mislabelled fake."""
        if not self.discriminator_spec.conditioning_fakes or len(x_real) < 2:
            return []
        roll = torch.roll(torch.arange(len(x_real), device=x_real.device), 1)
        (wrong_caption,) = self.discriminator.judge(x_t, t, [x_real], t_judge, condition.index(roll))
        if not self.discriminator.conditional:
            return [wrong_caption]
        (wrong_start,) = self.discriminator.judge(x_t[roll], t[roll], [x_real], t_judge, condition)
        return [wrong_caption, wrong_start]

    def on_train_start(self) -> None:
        model = self.trainer.strategy.model
        if isinstance(model, DistributedDataParallel) and self.optimizers_per_batch > 1:
            # One all-reduce per optimizer: each backward reduces its own optimizer's buckets only.
            model.register_comm_hook(self.gradient_reduction, reduce_owned_buckets)
        # Only the last fifth of the planned batches is ever measured: keep no more (long runs).
        planned = to_batches(self.trainer.max_steps, self.optimizers_per_batch, self.accumulate_grad_batches)
        self.discriminator_accuracies = deque(maxlen=max(1, planned // 5) if planned > 0 else None)
        self.batches_recorded = 0

    def on_train_end(self) -> None:
        """Flag a run whose discriminator stayed at chance over its last fifth (CHANCE_BAND)."""
        signal = self.measure_discriminator_signal()
        if signal and signal["no_signal"] and self.trainer.is_global_zero:
            warnings.warn(
                f"The discriminator's accuracy over the last fifth of training was {signal['accuracy_last_fifth']:.3f}, "
                f"within {CHANCE_BAND} of chance (by start timestep t: {signal['accuracy_by_start']}): this run "
                "carried little adversarial signal. Try discriminator.warmup, discriminator.lr, "
                "discriminator.conditioning_fakes or more steps.",
                stacklevel=1,
            )

    def measure_discriminator_signal(self, gather: bool = True) -> dict | None:
        """D's mean accuracy over the last fifth of the batches trained so far, over all samples and
        per start timestep t (over all ranks when `gather`; a caller on one rank only, such as the
        export, passes False); `no_signal` when the overall accuracy stayed within CHANCE_BAND of 0.5.
        None without a discriminator or batches."""
        if not self.discriminator_accuracies:
            return None
        last = list(self.discriminator_accuracies)[-max(1, self.batches_recorded // 5):]
        starts = torch.cat([t for t, _ in last])  # (N,)
        correct = torch.cat([c for _, c in last])  # (N,) per-sample accuracy in {0, 0.5, 1}
        keys = (self.stage.start_positions - 1).round().long().to(starts.device)  # every start the grid draws
        # Sums and counts per start, plus the overall pair, so ranks combine by summing.
        totals = torch.stack([
            torch.stack([correct[starts == key].sum(), (starts == key).sum().float()]) for key in keys
        ] + [torch.stack([correct.sum(), torch.tensor(float(len(correct)), device=correct.device)])])
        if gather:
            totals = self.all_gather(totals).reshape(-1, *totals.shape).sum(0)
        sums, counts = totals[:, 0], totals[:, 1]
        accuracy = (sums[-1] / counts[-1]).item()
        by_start = {str(int(key)): round((sums[i] / counts[i]).item(), 4) for i, key in enumerate(keys) if counts[i] > 0}
        self.discriminator_signal = {"accuracy_last_fifth": round(accuracy, 4), "accuracy_by_start": by_start,
                                     "no_signal": abs(accuracy - 0.5) <= CHANCE_BAND}
        return self.discriminator_signal

    def _optimizer_step(
        self, index: int, loss: torch.Tensor | None, name: str, batch_idx: int, backward_loss: torch.Tensor | None = None
    ) -> None:
        """Backward for optimizer `index`; every `accumulate_grad_batches` batches clip, step and
        advance its LR schedule. Called inside `trains_only` of that optimizer. `backward_loss`
        (default: `loss`) is what the backward runs from when it has the same gradient but another
        value (the generator's, through the shared judgement); `loss` is logged and checked.

        loss=None (the discriminator warm-up) steps without gradients: Adam leaves the weights as
        they are, and `global_step` still advances, so the step convention holds. A non-finite loss
        or gradient (over all ranks) is skipped, counted and logged (`finite_guard.py`): no backward
        or no update, gradients cleared; the step still counts."""
        optimizer = self._as_list(self.optimizers())[index]
        accumulate = self.accumulate_grad_batches
        finite = lambda tensors: self.trainer.strategy.reduce_boolean_decision(all_finite(tensors), all=True)
        finite_loss = loss is None or finite([loss.detach()])  # the same answer on every rank
        if loss is not None and finite_loss:
            with self.gradient_reduction.only(p for g in optimizer.param_groups for p in g["params"]):
                self.manual_backward((loss if backward_loss is None else backward_loss) / accumulate)
        stepping = (batch_idx + 1) % accumulate == 0
        finite_step = finite_loss and (not stepping or finite([p.grad for g in optimizer.param_groups for p in g["params"]]))
        self.finite_guard.check(finite_step, name, "loss" if not finite_loss else "gradient", self.batches_trained)
        if stepping:
            if not finite_step:
                optimizer.zero_grad(set_to_none=True)  # no gradients: the weights stay, the step counts
            elif self.hparams.optim["gradient_clip_val"]:
                self.clip_gradients(optimizer, self.hparams.optim["gradient_clip_val"], "norm")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedulers = self._as_list(self.lr_schedulers())
            if schedulers:
                schedulers[index].step()
        if loss is not None:
            self.log(f"loss/{name}", loss.detach(), prog_bar=True, sync_dist=True)
        self.log(f"nonfinite_skipped/{name}", float(self.finite_guard.skipped.get(name, 0)))
        self.log(f"lr/{name}", optimizer.param_groups[0]["lr"])

    @staticmethod
    def _as_list(value) -> list:
        if value is None:
            return []
        return value if isinstance(value, list) else [value]

    def configure_optimizers(self):
        """conf/optim's optimizer for the student at student.lr [and the discriminator at discriminator.lr]."""
        make_optimizer = hydra.utils.instantiate(self.hparams.optim["optimizer"])
        optimizers = [make_optimizer(self.pair.trainable_parameters(), lr=self.student_spec.lr)]
        if self.adversarial:
            optimizers.append(make_optimizer(self.discriminator.parameters(), lr=self.discriminator_spec.lr))
        if not self.hparams.optim.get("lr_scheduler"):
            return optimizers
        make_scheduler = hydra.utils.instantiate(self.hparams.optim["lr_scheduler"])
        return optimizers, [make_scheduler(optimizer) for optimizer in optimizers]

    # ---- validation: fixed prompts and seeds, teacher beside student ---------------------------

    def initial_noise(self, seeds: torch.Tensor) -> torch.Tensor:
        """Per-seed noise (B, 4, R/f, R/f), identical on any device and batch composition."""
        return seeded_noise(seeds.tolist(), self.latent_size, self.device)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: torch.Tensor, model: str, num_steps: int) -> torch.Tensor:
        """Latents x0 of the teacher (with the stage's guidance) or the student ("teacher" /
        "student") at num_steps (`diffusion.sampler.generate`)."""
        condition = self.condition(prompts)
        if model == "teacher":
            with self.pair.teacher_mode():
                return generate(
                    self.pair.teacher, self.schedule, self.teacher_prediction, seeds.tolist(), self.latent_size,
                    num_steps, condition, self.uncondition(condition), self.stage.guidance_scale,
                )
        return generate(self.pair.student, self.schedule, self.student_prediction, seeds.tolist(), self.latent_size, num_steps, condition)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # The frozen teacher's samples of the fixed prompts and seeds never change: generate once.
        key = (tuple(batch["prompt"]), tuple(batch["seed"].tolist()))
        if key not in self.teacher_samples:
            teacher_steps = self.hparams.validation_teacher_steps or self.stage.teacher_steps
            self.teacher_samples[key] = self.generate(batch["prompt"], batch["seed"], "teacher", teacher_steps).cpu()
        teacher = self.teacher_samples[key].to(self.device)
        student = self.generate(batch["prompt"], batch["seed"], "student", self.stage.student_steps)
        self.log("val/latent_mse_to_teacher", torch.mean((student - teacher) ** 2), sync_dist=True)
        self.validation_outputs.append(
            {"teacher": self.decode_latents(teacher), "student": self.decode_latents(student), "seed": batch["seed"]}
        )

    def on_validation_epoch_start(self) -> None:
        self.validation_outputs.clear()

    # ---- checkpoints: trainable weights only ---------------------------------------------------

    def trainable_state_keys(self) -> set[str]:
        """Keys of the weights a checkpoint must hold: the student's trainable ones and the discriminator."""
        keys = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
        if self.ema is not None:
            keys |= {f"ema.{name}" for name in self.ema.state_dict()}
        if self.discriminator is not None:
            keys |= {f"discriminator.{name}" for name in self.discriminator.state_dict()}
        return keys

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Drop the frozen teacher, VAE and text encoders: they reload from `model_path`."""
        keys = self.trainable_state_keys()
        checkpoint["state_dict"] = {key: value for key, value in checkpoint["state_dict"].items() if key in keys}
        checkpoint["batches_drawn"] = self.batches_drawn

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Checkpoints from before batches_drawn: the batches trained (every batch draws once).
        trained = to_batches(checkpoint.get("global_step", 0), self.optimizers_per_batch, self.accumulate_grad_batches)
        self.batches_drawn = int(checkpoint.get("batches_drawn", trained))
        missing = self.trainable_state_keys() - set(checkpoint["state_dict"])
        if missing:
            raise KeyError(
                f"The checkpoint lacks {len(missing)} trainable weights (e.g. {sorted(missing)[:3]}): "
                "it was written for another student or loss; resume with the same stage, loss and student."
            )


def batch_length(batch: dict) -> int:
    """Samples in a training batch of images or of a latent cache's items."""
    return len(batch["latent_mean"] if "latent_mean" in batch else batch["pixel_values"])


@contextmanager
def _keeping_gradients(parameters: list[torch.Tensor]):
    """The parameters' gradients after the block are those before it (what the block computes into
    them is dropped); gradients accumulated over earlier batches survive."""
    saved = [parameter.grad for parameter in parameters]
    for parameter in parameters:
        parameter.grad = None
    try:
        yield
    finally:
        for parameter, grad in zip(parameters, saved):
            parameter.grad = grad
