"""Hyper-SD's trajectory segments (METHOD.md 7): which consistency jumps a TSCD stage trains.

[0, 999] is cut into k segments at the k-step trailing grid (positions T = 1000 - j * 1000 / k). A
sample starts at a point t of the teacher's N-step trailing grid (N a multiple of k, so every
teacher point lies inside one segment); the teacher takes one ODE step t -> t_mid along its grid,
never past the segment's end; the student maps x_t straight to the segment's end t_end, and its
target is the target network's map of x_{t_mid} to the same end (x_{t_mid} itself when t_mid is the
end). With k = 1 this is consistency distillation over the whole trajectory.
"""

from __future__ import annotations

import torch

from lightning_sdxl.diffusion.schedule import positions_to_timesteps, trailing_positions


class TrajectorySegments:
    """The consistency jumps of k segments over an N-step teacher grid.

    Args:
        segments: k, also the student's sampling steps (one step per segment).
        teacher_steps: N, the teacher's grid (a multiple of k); one teacher step per sample.
        num_train_timesteps: 1000 for SDXL.
    """

    def __init__(self, segments: int, teacher_steps: int, num_train_timesteps: int = 1000):
        if segments < 1 or teacher_steps % segments:
            raise ValueError(
                f"stage.segments={segments} must be positive and divide stage.teacher_steps={teacher_steps}."
            )
        self.segments, self.teacher_steps = segments, teacher_steps
        self.teacher_positions = trailing_positions(teacher_steps, num_train_timesteps)  # (N,)
        self.teacher_step = num_train_timesteps / teacher_steps
        self.segment_length = num_train_timesteps / segments

    def segment_end(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions of the ends of the segments holding `positions` (0 = clean for the last)."""
        index = torch.ceil(positions / self.segment_length - 1e-9) - 1  # segment (lower end) index
        return index * self.segment_length

    def draw(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(3, B) timesteps: t, t_mid (one teacher step on) and t_end (the segment's end; CLEAN = -1)."""
        start = self.teacher_positions[torch.randint(self.teacher_steps, (batch,), generator=generator)]
        end = self.segment_end(start)
        middle = torch.maximum(start - self.teacher_step, end)
        return positions_to_timesteps(torch.stack([start, middle, end]))


class SegmentedStage(TrajectorySegments):
    """`stage=tscd` (conf/stage/tscd.yaml): Hyper-SD's TSCD stage of k segments (METHOD.md 7).

    Args:
        name: the stage's name ("tscd4").
        segments: k.
        teacher_steps: N, the teacher's grid.
        student_steps: the student's sampling steps: k (one step per segment).
        guidance_scale: the teacher's CFG on its step.
        consistency_target: the target network, "ema" (an EMA of the student's trainable weights,
            `models/ema.py`) or "online" (the student itself, without gradients).
        ema_decay: the EMA target's decay per generator step.
        pure_noise_weight: SDXL-Lightning stages' weight of the t = 999 start (`StageGrid`); TSCD
            draws its starts uniformly over the teacher's grid, so only 1 is accepted, or a preset's
            value for every stage (experiment=toy's 5), which leaves TSCD's draws unchanged.
    """

    def __init__(
        self,
        name: str,
        segments: int,
        teacher_steps: int,
        student_steps: int,
        guidance_scale: float = 1.0,
        consistency_target: str = "ema",
        ema_decay: float = 0.95,
        pure_noise_weight: float = 1.0,
    ):
        super().__init__(segments, teacher_steps)
        if student_steps != segments:
            raise ValueError(f"stage.student_steps={student_steps}: a TSCD student samples one step per segment ({segments}).")
        if consistency_target not in ("ema", "online"):
            raise ValueError(f"stage.consistency_target={consistency_target}: choose 'ema' or 'online'.")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"stage.ema_decay={ema_decay} must lie in [0, 1).")  # before weights load (EMAWeights: the same rule)
        self.name, self.student_steps, self.guidance_scale = name, student_steps, guidance_scale
        self.consistency_target, self.ema_decay = consistency_target, ema_decay
        # The starts D's accuracy is reported by (`DistillationModule.measure_discriminator_signal`).
        self.start_positions = trailing_positions(student_steps)
