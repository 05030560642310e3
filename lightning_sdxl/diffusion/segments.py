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
