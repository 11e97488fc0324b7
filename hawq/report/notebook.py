"""What notebooks call: the CLI's config, and stages run (or loaded) in a run directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def compose_config(overrides: Sequence[str] = (), run_dir: str | Path | None = None):
    """The config the CLI would build from ``overrides`` (``paths.run_dir`` set when given)."""
    from hydra import compose, initialize_config_dir

    from hawq.run import CONF_DIR

    extra = [f"paths.run_dir={Path(run_dir).expanduser().resolve()}"] if run_dir else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*overrides, *extra])


def run_stages(
    overrides: Sequence[str], stages: Sequence[str], run_dir: str | Path | None = None
) -> tuple[dict, Path]:
    """Run ``stages`` like ``python -m hawq.run OVERRIDES stages=[...]`` (for notebooks).

    Stages whose outputs exist are skipped, so pointing ``run_dir`` at a finished
    run only loads it. Returns ``(results.json contents, run directory)``.
    """
    from hawq.pipeline import run_pipeline

    cfg = compose_config([*overrides, f"stages=[{','.join(stages)}]"], run_dir)
    results = run_pipeline(cfg)
    return results, Path(cfg.paths.run_dir).expanduser().resolve()
