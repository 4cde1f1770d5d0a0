"""Run a job script in this process the way ``python jobs/<job>.py ARGS`` runs it (``here``); ``job_env`` is the
environment every job run of the tests starts from, in a subprocess or here.

A job's refusals (bad sizes, a missing alias, a search that exists) are decided before it starts anything, by the code
that ``runpy`` runs as ``__main__`` here just as Python does in a new process: the same argparse, checks and one
line on stderr, without the ~4 s (more on a busy machine) a new interpreter spends importing torch, MLflow and Ray.
What only a real process shows stays with the subprocess: each job keeps at least one refusal run that way, which
checks that nothing else (a library's warning, a log line) reaches stderr before the error line. So would a refusal
that came after the job connected to Ray: Ray's client settings, token authentication included, are fixed once per
process, and a test process is not a job's driver. (The λ search and the ablation check their own state before
anything else, so their "already exists" runs here.)
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
ENV_PREFIXES = ("AWS_", "MLFLOW_", "RAY_")  # the test process's own service settings never reach a job


def job_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without its service settings, plus ``env``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIXES)}, **(env or {})}


def here(
    job: str, args: list[str], *, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """``python jobs/<job> ARGS`` run in this process (``runpy`` as ``__main__``): its exit status, stdout and stderr.

    The environment, working folder, ``sys.argv``, ``sys.path`` and the root logger (jobs call
    ``logging.basicConfig(force=True)``) are the job's while it runs and this process's again afterwards, whatever the
    job changed. An exception the job does not handle propagates (a real process would print its traceback and exit
    1): the test fails with it.
    """
    script = ROOT / "jobs" / job
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_path, saved_cwd = sys.argv, list(sys.path), os.getcwd()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    code: int = 0
    with mock.patch.dict(os.environ, job_env(env), clear=True):
        try:
            os.chdir(cwd)
            sys.argv = [str(script), *args]
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    runpy.run_path(str(script), run_name="__main__")
                except SystemExit as exc:  # what the interpreter does with sys.exit's argument
                    if exc.code is None or isinstance(exc.code, int):
                        code = exc.code or 0
                    else:
                        print(exc.code, file=sys.stderr)
                        code = 1
        finally:
            sys.argv, sys.path[:] = saved_argv, saved_path
            os.chdir(saved_cwd)
            root.handlers[:] = saved_handlers
            root.setLevel(saved_level)
    return subprocess.CompletedProcess([sys.executable, str(script), *args], code, out.getvalue(), err.getvalue())
