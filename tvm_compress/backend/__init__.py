"""Backend: target presets, build, default CPU schedules, meta-schedule databases."""
