"""Which jumps a stage trains: student start timesteps and the teacher's path (METHOD.md 2)."""

from __future__ import annotations

import torch

from lightning_sdxl.diffusion.schedule import jump_path, trailing_positions


class StageGrid:
    """The jumps of an "A to B" stage: the student crosses n = A / B teacher steps in one. A `stage=`
    choice of SDXL-Lightning's (conf/stage/) is one, with its name and the teacher's guidance.

    Args:
        teacher_steps: A, the teacher's step count.
        student_steps: B, the student's step count (A must be a multiple of B).
        start_timesteps: multi-timestep training starts (e.g. [249, 499, 749, 999] for the 1- and
            2-step stages); "all" for every timestep (the x0 conversion, METHOD.md 4); None trains
            from the student's own trailing grid.
        pure_noise_weight: how much more often the jump from pure noise (t = 999) is drawn than
            each other start; 1 draws every start equally often, as the paper (METHOD.md 2). At
            toy scale only that jump leaves a gap the discriminator can see (docs/MEASUREMENTS.md).
        num_train_timesteps: 1000 for SDXL.
        name: the stage's name ("8to4"; run folders, exports).
        guidance_scale: the teacher's classifier-free guidance (METHOD.md 2: 6 in stage 128 to 32,
            else 1 = off).
    """

    def __init__(
        self,
        teacher_steps: int,
        student_steps: int,
        start_timesteps: list[int] | str | None = None,
        pure_noise_weight: float = 1.0,
        num_train_timesteps: int = 1000,
        name: str | None = None,
        guidance_scale: float = 1.0,
    ):
        if student_steps < 1 or teacher_steps % student_steps:
            raise ValueError(
                f"stage: teacher_steps={teacher_steps} must be a positive multiple of "
                f"student_steps={student_steps}."
            )
        self.teacher_steps, self.student_steps = teacher_steps, student_steps
        self.name, self.guidance_scale = name or f"{teacher_steps}to{student_steps}", guidance_scale
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
        self.start_probabilities = None  # uniform: drawn with randint, as before the weight existed
        if pure_noise_weight != 1.0:
            pure_noise = self.start_positions == num_train_timesteps  # position T = t + 1
            if pure_noise_weight <= 0 or not pure_noise.any():
                raise ValueError(
                    f"stage.pure_noise_weight={pure_noise_weight} must be positive and the starts "
                    f"{(self.start_positions - 1).tolist()} must include t = {num_train_timesteps - 1}."
                )
            weights = torch.where(pure_noise, float(pure_noise_weight), 1.0)
            self.start_probabilities = weights / weights.sum()

    def draw(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n + 1, B) teacher paths for drawn starts; row 0 is t, the last row t'."""
        if self.start_probabilities is None:
            index = torch.randint(len(self.start_positions), (batch,), generator=generator)
        else:
            index = torch.multinomial(self.start_probabilities, batch, replacement=True, generator=generator)
        return jump_path(self.start_positions[index], self.jump, self.substeps)
