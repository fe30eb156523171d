"""diffusion.sample_t_min: the samplers' lowest timestep (schedules.timestep_grid's floor)."""
from __future__ import annotations

import pytest
import torch

from dgan.config import ConfigError, load_config
from dgan.diffusion import Diffusion


@pytest.mark.parametrize("spacing", ["quadratic", "uniform"])
def test_sample_t_min_is_the_grids_floor(spacing):
    """diffusion.sample_t_min=9: no grid evaluates G below it; points the quadratic grid puts lower are
    lifted to 9, 10, ... (still `steps` distinct ones), a grid with no room (steps > T - 9) goes as low
    as it must, and the default 0 is the grid without a floor."""
    d = Diffusion.from_config(load_config(None, [f"diffusion.timestep_spacing={spacing}",
                                                 "diffusion.sample_t_min=9"]).diffusion)
    free = Diffusion.from_config(load_config(None, [f"diffusion.timestep_spacing={spacing}"]).diffusion)
    for steps in (1, 10, 20, 50, 200, 991):
        ts = d.timesteps_for(steps)
        assert len(ts) == steps and ts[0].item() == 999 and (ts[:-1] > ts[1:]).all()
        assert ts[-1].item() == (9 if steps > 1 else 999)
    assert d.timesteps_for(1000).tolist() == list(range(999, -1, -1))  # no room: every timestep
    assert d.timesteps_for(995)[-1].item() == 5
    if spacing == "quadratic":
        assert d.timesteps_for(10).tolist() == free.timesteps_for(10).tolist()  # it already ends at 9
        assert d.timesteps_for(50).tolist()[-8:] == [25, 19, 14, 13, 12, 11, 10, 9]
        assert free.timesteps_for(50).tolist()[-6:] == [13, 9, 5, 3, 1, 0]
    seen = []
    d.ddim_sample(lambda x, t: seen.append(int(t[0])) or torch.zeros_like(x), (1, 1, 4, 4), steps=50)
    assert min(seen) == 9 and len(seen) == 50
    with pytest.raises(ConfigError, match="diffusion.sample_t_min"):
        load_config(None, ["diffusion.sample_t_min=1000"])


def test_a_floor_outside_the_schedule_is_refused():
    for bad in (-1, 1000):
        with pytest.raises(ValueError, match="t_min"):
            Diffusion(1000, spacing="quadratic", t_min=bad)
