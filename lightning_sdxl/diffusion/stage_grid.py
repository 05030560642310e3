"""Which jumps a stage trains: student start timesteps and the teacher's path (METHOD.md 2)."""

from __future__ import annotations

import torch

from lightning_sdxl.diffusion.schedule import jump_path, trailing_positions


class StageGrid:
    """The jumps of an "A to B" stage: the student crosses n = A / B teacher steps in one.

    Args:
        teacher_steps: A, the teacher's step count.
        student_steps: B, the student's step count (A must be a multiple of B).
        start_timesteps: multi-timestep training starts (e.g. [249, 499, 749, 999] for the 1- and
            2-step stages); "all" for every timestep (the x0 conversion, METHOD.md 4); None trains
            from the student's own trailing grid.
        num_train_timesteps: 1000 for SDXL.
    """

    def __init__(
        self,
        teacher_steps: int,
        student_steps: int,
        start_timesteps: list[int] | str | None = None,
        num_train_timesteps: int = 1000,
    ):
        if student_steps < 1 or teacher_steps % student_steps:
            raise ValueError(
                f"stage: teacher_steps={teacher_steps} must be a positive multiple of "
                f"student_steps={student_steps}."
            )
        self.teacher_steps, self.student_steps = teacher_steps, student_steps
        self.substeps = teacher_steps // student_steps
        self.jump = num_train_timesteps / student_steps
        if start_timesteps == "all":
            start_timesteps = list(range(num_train_timesteps))
        if start_timesteps:
            if not all(0 <= t < num_train_timesteps for t in start_timesteps):
                raise ValueError(f"stage.start_timesteps {start_timesteps} must lie in [0, {num_train_timesteps}).")
            self.start_positions = torch.tensor(start_timesteps, dtype=torch.float64) + 1
        else:
            self.start_positions = trailing_positions(student_steps, num_train_timesteps)

    def draw(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n + 1, B) teacher paths for uniformly drawn starts; row 0 is t, the last row t'."""
        index = torch.randint(len(self.start_positions), (batch,), generator=generator)
        return jump_path(self.start_positions[index], self.jump, self.substeps)
