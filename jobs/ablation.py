"""What the distractors add: conditions × recipes × seeds of the re-ID stage as one Ray Tune grid, and the table.

    python jobs/ablation.py --config configs/ablation_demo.yaml          # local Ray, or RAY_ADDRESS
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/ablation.py --config configs/ablation.yaml
    python jobs/ablation.py --config configs/ablation_demo.yaml --resume  # after an interrupted run

Every trial trains and evaluates one re-ID model (``pipeline.run_reid``): condition ``none`` (no distractors),
``distractor_class`` (N+1 classes) or ``lsro``; recipe ``weak`` (the ``reid`` section) or ``strong`` (with the
``strong`` overrides); one seed (``run.seed``). All trials read the one distractor set ``reid.distractors.uri``.

Output (``reid_core/workflows/ablation.py``), printed and in MLflow (experiment ``tracking.experiment``, one parent run named
``grid.name``, a child run per trial with the re-ID run nested under it): Rank-1, mAP and mINP as mean ± sd over the
seeds per recipe and condition, and every distractor condition's paired difference against ``none`` on the same seeds,
mean ± sd; the parent run gets ``results/ablation.md``, ``results/trials.csv`` and ``results/ablation.png``.

The grid's state lives in ``grid.storage``/``grid.name``; ``--resume`` restores it (finished trials are kept, the
others start again and a training cut short resumes from its last checkpoint). Every input problem fails in one line
``error: ...`` with exit code 2 before Ray starts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reid_core import storage, tracking  # noqa: E402
from reid_core.config import ConfigError, load_config  # noqa: E402
from reid_core.runtime import load_env_defaults  # noqa: E402
from reid_core.workflows import ablation  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/ablation_demo.yaml", help="YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override, e.g. grid.seeds=[0,1,2,3] or reid.optim.epochs=20")  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="continue the interrupted grid grid.name")
    parser.add_argument("--resume-errored", action="store_true", help="with --resume: also retry trials that failed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_env_defaults()
    try:
        cfg = ablation.absolute_locations(load_config(ablation.AblationJobConfig, args.config, args.set))
        pre = ablation.preflight(cfg, resume=args.resume, resume_errored=args.resume_errored)
    except (ConfigError, storage.StorageError, tracking.TrackingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # one line that says what to fix; nothing has started yet
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    out = ablation.run_grid(cfg, pre, resume=args.resume, resume_errored=args.resume_errored)
    mlflow_uri, parent_id, rows, complete = pre.mlflow_uri, out["parent_id"], out["rows"], out["complete"]
    g, experiment, concurrent, table = cfg.grid, cfg.tracking.experiment, out["concurrent"], out["table"]
    print("\n=== ablation summary ===")
    print(f"grid:              {g.name!r}: {len(rows)} trials, {complete} complete; {concurrent} at a time")
    print(f"MLflow run:        {parent_id} ({mlflow_uri}, experiment {experiment!r}); a child run per trial")
    print(f"results:           {tracking.artifact_uri(mlflow_uri, parent_id)}/results/ (ablation.md, trials.csv, "
          "ablation.png)")  # fmt: skip
    print(f"distractor set:    {cfg.reid.distractors.uri} (every distractor condition)")
    print(table)
    print(f"grid state:        {storage.join(g.storage, g.name)} (--resume continues it)")
    return 0 if complete == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
