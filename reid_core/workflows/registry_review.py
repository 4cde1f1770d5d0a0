"""The model registry's review: each version's record (metrics, λ, dataset, pictures), tables, the gated promotion to
alias ``champion`` and the Markdown/HTML report.

``jobs/review_models.py`` (list, compare, promote, report) calls the ``command_*`` functions with a tracking URI and
an MLflow client; every refusal is a ``ReviewError`` or a ``tracking.TrackingError`` whose message says what to do.
Only ``MlflowClient`` and aliases (stages are deprecated). A version's metrics are its run's latest values, plus the
results ``jobs/evaluate.py`` tagged it with (``eval.<dataset>.mAP``, ...); the gate's rules are ``promotion_gate``'s.
"""

from __future__ import annotations

import base64
import datetime as dt
import getpass
import html
import logging
import math
import mimetypes
import os
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from reid_core import tracking

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
REVIEW_EXPERIMENT = "registry-review"
# Metric columns shown first, in this order, when versions have them; other metrics follow alphabetically.
PREFERRED_METRICS = ("rank1", "rank5", "mAP", "mINP", "face_rate", "loss_g", "loss_d")
# Metrics where a smaller value is the better model (the promotion gate's direction); everything else: larger.
LOWER_IS_BETTER_PREFIXES = ("loss",)
# Metrics of the model version's tags eval.<dataset>[.rerank].<metric> (jobs/evaluate.py), read as metrics.
EVAL_TAG_METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".gif")
MAX_PICTURES = 50  # per version: a run with thousands of images would flood the page
MAX_ARTIFACT_DEPTH = 3


class ReviewError(RuntimeError):
    """A review request cannot be served (gate refused, unknown metric, ...); the message says what to do."""


@dataclass(frozen=True)
class VersionRecord:
    """What a reviewer needs to know about one registered model version."""

    name: str
    version: str
    run_id: str | None
    aliases: tuple[str, ...]
    created: str  # UTC, ISO 8601 to the minute
    metrics: dict[str, float]  # the run's latest value of each metric
    params: dict[str, str]  # the run's params
    tags: dict[str, str]  # the model version's tags
    dataset: str  # data.uri of the version (tag) or its run (param); "?" when neither says
    lambda1: str
    lambda2: str
    mode: str  # guidance mode
    artifact_uri: str  # the run's artifact root ("" without a run)
    pictures: tuple[str, ...] = field(default=())  # artifact paths of the run's pictures


# ------------------------------------------------------------------------------------------------ registry reading
def model_version_record(client, mv, aliases: dict[str, str], *, with_pictures: bool = False) -> VersionRecord:
    """Collect ``mv`` (an MLflow ``ModelVersion``) with its run's metrics and params; ``aliases``: alias -> version of
    its registered model."""
    tags = dict(mv.tags or {})
    metrics: dict[str, float] = {}
    params: dict[str, str] = {}
    artifact_uri = ""
    run_id = mv.run_id or None
    if run_id:
        run, problem = tracking.run_or_problem(client, run_id)
        if run is None:
            log.warning("%s v%s: its run %s cannot be read (%s)", mv.name, mv.version, run_id, problem)
        else:
            metrics = dict(run.data.metrics)
            params = dict(run.data.params)
            artifact_uri = run.info.artifact_uri
    # Versions registered without a run may still carry their headline metrics as tags (train_reid.py adds them).
    for key in PREFERRED_METRICS:
        if key not in metrics and key in tags:
            try:
                metrics[key] = float(tags[key])
            except ValueError:
                pass
    # jobs/evaluate.py tags an evaluated version eval.<dataset>.<metric> (eval.msmt17.mAP): gate with --metric on them.
    for key, value in tags.items():
        if key.startswith("eval.") and key.rsplit(".", 1)[-1] in EVAL_TAG_METRICS and key not in metrics:
            try:
                metrics[key] = float(value)
            except ValueError:
                pass

    def described(*keys: str) -> str:
        for key in keys:
            if tags.get(key):
                return tags[key]
            if params.get(key):
                return params[key]
        return "?"

    created = dt.datetime.fromtimestamp((mv.creation_timestamp or 0) / 1000, tz=dt.UTC)
    return VersionRecord(
        name=mv.name,
        version=str(mv.version),
        run_id=run_id,
        aliases=tuple(sorted(a for a, v in aliases.items() if str(v) == str(mv.version))),
        created=created.strftime("%Y-%m-%d %H:%M"),
        metrics=metrics,
        params=params,
        tags=tags,
        dataset=described("data.uri"),
        lambda1=described("lambda1", "guidance.lambda1"),
        lambda2=described("lambda2", "guidance.lambda2"),
        mode=described("guidance.mode"),
        artifact_uri=artifact_uri,
        pictures=run_pictures(client, run_id) if with_pictures and run_id else (),
    )


def run_pictures(client, run_id: str) -> tuple[str, ...]:
    """Artifact paths of the pictures logged to ``run_id`` (PNG/JPEG/SVG/GIF), at most ``MAX_PICTURES``, sorted."""
    found: list[str] = []
    folders = [(None, 0)]
    while folders and len(found) < MAX_PICTURES:
        folder, depth = folders.pop()
        for entry in client.list_artifacts(run_id, folder):
            if entry.is_dir:
                if depth + 1 < MAX_ARTIFACT_DEPTH:
                    folders.append((entry.path, depth + 1))
            elif entry.path.lower().endswith(PICTURE_SUFFIXES):
                found.append(entry.path)
    return tuple(sorted(found)[:MAX_PICTURES])


def model_versions(uri: str, client, name: str, *, with_pictures: bool = False) -> list[VersionRecord]:
    """Every version of registered model ``name``, newest first."""
    model = tracking.registered_model(uri, client, name)
    aliases = {a: str(v) for a, v in (model.aliases or {}).items()}
    versions = []
    token = None
    while True:
        page = client.search_model_versions(f"name = '{name}'", max_results=200, page_token=token)
        versions += list(page)
        token = page.token
        if not token:
            break
    versions.sort(key=lambda mv: int(mv.version), reverse=True)
    return [model_version_record(client, mv, aliases, with_pictures=with_pictures) for mv in versions]


def version_spec_uri(name: str, spec: str) -> str:
    """``3`` -> ``models:/NAME/3``; ``champion`` or ``@champion`` -> ``models:/NAME@champion``."""
    spec = spec.strip()
    return f"models:/{name}/{spec}" if spec.isdigit() else f"models:/{name}@{spec.lstrip('@')}"


def one_version(uri: str, client, name: str, spec: str, *, with_pictures: bool = False) -> VersionRecord:
    """Version ``spec`` (number or alias) of ``name``; ``RegistryError`` naming what exists when it does not."""
    ref = tracking.resolve_model_version(uri, version_spec_uri(name, spec))
    model = client.get_registered_model(ref.name)
    aliases = {a: str(v) for a, v in (model.aliases or {}).items()}
    return model_version_record(client, client.get_model_version(ref.name, ref.version), aliases,
                                with_pictures=with_pictures)  # fmt: skip


# ------------------------------------------------------------------------------------------------ formatting
def format_value(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"


def metric_columns(records: list[VersionRecord], wanted: list[str] | None = None) -> list[str]:
    """``wanted`` if given, else the preferred metrics any record has, then (up to 6 of) the others alphabetically."""
    if wanted:
        return wanted
    present = set().union(*(r.metrics for r in records)) if records else set()
    preferred = [m for m in PREFERRED_METRICS if m in present]
    return preferred + sorted(present - set(preferred))[: max(0, 8 - len(preferred))]


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-aligned plain-text columns separated by two spaces, with a dashed rule under the header."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def version_rows(records: list[VersionRecord], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    headers = ["version", "aliases", "created", "dataset", "λ1", "λ2", "mode", *metrics]
    rows = [
        [r.version, ",".join("@" + a for a in r.aliases) or "-", r.created, r.dataset, r.lambda1, r.lambda2, r.mode,
         *(format_value(r.metrics.get(m)) for m in metrics)]
        for r in records
    ]  # fmt: skip
    return headers, rows


def comparison_rows(a: VersionRecord, b: VersionRecord) -> tuple[list[list[str]], list[list[str]]]:
    """(metric rows: name, a, b, b − a), (param/tag rows that differ or matter: name, a, b)."""
    metric_rows = []
    for m in metric_columns([a, b]) + sorted((set(a.metrics) | set(b.metrics)) - set(metric_columns([a, b]))):
        va, vb = a.metrics.get(m), b.metrics.get(m)
        delta = format_value(vb - va) if va is not None and vb is not None else "-"
        metric_rows.append([m, format_value(va), format_value(vb), delta])
    described = [("dataset", a.dataset, b.dataset), ("λ1", a.lambda1, b.lambda1), ("λ2", a.lambda2, b.lambda2),
                 ("guidance mode", a.mode, b.mode), ("aliases", ",".join(a.aliases) or "-", ",".join(b.aliases) or "-"),
                 ("run", a.run_id or "-", b.run_id or "-")]  # fmt: skip
    keys = sorted(set(a.params) | set(b.params))
    described += [(f"param {k}", a.params.get(k, "-"), b.params.get(k, "-")) for k in keys
                  if a.params.get(k) != b.params.get(k)]  # fmt: skip
    return metric_rows, [list(row) for row in described]


def ui_base(uri: str) -> str | None:
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def version_url(uri: str, record: VersionRecord) -> str | None:
    base = ui_base(uri)
    return f"{base}/#/models/{urllib.parse.quote(record.name)}/versions/{record.version}" if base else None


def picture_links(uri: str, record: VersionRecord) -> list[tuple[str, str, str | None]]:
    """(artifact path, artifact URI, direct HTTP URL from the tracking server or None) for each picture."""
    base = ui_base(uri)
    out = []
    for path in record.pictures:
        http = None
        if base:
            query = urllib.parse.urlencode({"path": path, "run_uuid": record.run_id})
            http = f"{base}/get-artifact?{query}"
        out.append((path, f"{record.artifact_uri.rstrip('/')}/{path}", http))
    return out


# ------------------------------------------------------------------------------------------------ commands
def command_list(uri: str, client, *, name: str | None = None, metrics: list[str] | None = None) -> str:
    names = [name] if name else tracking.registered_model_names(client)
    if not names:
        return f"no registered models in the MLflow registry at {uri}"
    blocks = []
    for model_name in names:
        records = model_versions(uri, client, model_name)
        headers, rows = version_rows(records, metric_columns(records, metrics))
        blocks.append(
            f"== {model_name} ({len(records)} versions)\n" + (text_table(headers, rows) if rows else "(none)")
        )
    return "\n\n".join(blocks)


def command_compare(uri: str, client, *, name: str, first: str, second: str) -> str:
    a = one_version(uri, client, name, first, with_pictures=True)
    b = one_version(uri, client, name, second, with_pictures=True)
    metric_rows, described = comparison_rows(a, b)
    va, vb = f"v{a.version}", f"v{b.version}"
    parts = [f"== {name}: v{a.version} vs v{b.version}", text_table(["metric", va, vb, f"{vb} - {va}"], metric_rows),
             "", text_table(["", va, vb], described)]  # fmt: skip
    for record in (a, b):
        parts += ["", f"pictures of v{record.version}" + (f" ({version_url(uri, record)})" if ui_base(uri) else "")]
        links = picture_links(uri, record)
        parts += [f"  {path}: {http or art}" for path, art, http in links] or ["  (none logged)"]
    return "\n".join(parts)


def metric_direction(metric: str, direction: str) -> str:
    if direction != "auto":
        return direction
    return "lower" if metric.startswith(LOWER_IS_BETTER_PREFIXES) else "higher"


def metric_source(record: VersionRecord, metric: str) -> tuple[str, str]:
    """(dataset, how) that ``metric`` of ``record`` was measured on: an ``eval.<dataset>.<metric>`` tag of
    ``jobs/evaluate.py`` was evaluated on that tag group's ``eval.<dataset>.data.uri``; any other metric is its
    training run's, on the run's ``data.uri`` (a re-ID run evaluates on that dataset's query/gallery, a GAN run's
    losses are on its training images)."""
    if metric.startswith("eval."):
        # <dataset> may contain dots (eval.msmt17.rerank.mAP): the longest eval.<x>. prefix with a data.uri tag wins
        groups = [k[: -len("data.uri")] for k in record.tags if k.startswith("eval.") and k.endswith(".data.uri")]
        matching = sorted((g for g in groups if metric.startswith(g)), key=len, reverse=True)
        if matching:
            return record.tags[f"{matching[0]}data.uri"], "evaluated on"
        return "?", "evaluated on"
    return record.dataset, "from its training run on"


def gate_number(value: float) -> float:
    """``value`` as the gate sees it: MLflow stores an infinite metric as ±``sys.float_info.max``, which is read back
    as infinity here so that it is refused like one."""
    return math.copysign(math.inf, value) if math.isfinite(value) and abs(value) >= sys.float_info.max else value


def promotion_gate(
    candidate: VersionRecord, champion: VersionRecord | None, *, metric: str, direction: str
) -> tuple[bool, str]:
    """(passes, one-line explanation). Fails when the candidate lacks ``metric`` or its value is not finite, the
    champion lacks it, holds a non-finite value or measured it on another dataset (``metric_source``), or the
    candidate is worse than the champion in ``direction``. Every comparison is made on finite numbers only: any
    comparison with NaN is false, so a NaN candidate would pass a plain ``worse`` test."""
    if metric not in candidate.metrics:
        have = ", ".join(sorted(candidate.metrics)) or "none"
        return False, (f"{candidate.name} v{candidate.version} has no metric {metric!r} to compare (its metrics: "
                       f"{have}): choose one with --metric, or pass --force")  # fmt: skip
    value = gate_number(candidate.metrics[metric])
    if not math.isfinite(value):
        return False, (f"{candidate.name} v{candidate.version} has {metric} = {value}, not a finite number: its "
                       f"training or evaluation diverged; pass --force to promote anyway")  # fmt: skip
    if champion is None:
        return True, f"no current @{CHAMPION_ALIAS}: {metric} {format_value(value)} becomes the bar"
    if champion.version == candidate.version:
        return True, f"v{candidate.version} already is @{CHAMPION_ALIAS}"
    if metric not in champion.metrics:
        return False, (f"the current @{CHAMPION_ALIAS} v{champion.version} has no metric {metric!r}: the gate cannot "
                       f"compare; choose another --metric, or pass --force")  # fmt: skip
    bar = gate_number(champion.metrics[metric])
    if not math.isfinite(bar):
        return False, (f"the current @{CHAMPION_ALIAS} v{champion.version} has {metric} = {bar}, not a finite "
                       f"number: the gate cannot compare; pass --force to replace it")  # fmt: skip
    (dataset, how), (champion_dataset, champion_how) = metric_source(candidate, metric), metric_source(champion, metric)
    if dataset == "?" or dataset != champion_dataset:
        return False, (f"v{candidate.version}'s {metric} is {how} {dataset} but @{CHAMPION_ALIAS} "
                       f"v{champion.version}'s {champion_how} {champion_dataset}: {metric} is not comparable; pass "
                       f"--force to promote anyway")  # fmt: skip
    worse = value > bar if direction == "lower" else value < bar
    relation = "<" if value < bar else ">" if value > bar else "="
    comparison = (f"{metric} {format_value(value)} {relation} {format_value(bar)} of @{CHAMPION_ALIAS} "
                  f"v{champion.version}, both {how} {dataset} ({direction} is better)")  # fmt: skip
    if worse:
        return False, f"{candidate.name} v{candidate.version} is worse: {comparison}; pass --force to promote anyway"
    return True, comparison


def reviewer() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return os.environ.get("USER") or "unknown"


def command_promote(uri: str, client, *, name: str, version: str, metric: str = "mAP", direction: str = "auto",
                    force: bool = False, reason: str | None = None) -> str:  # fmt: skip
    candidate = one_version(uri, client, name, version)
    model = client.get_registered_model(name)
    champion_version = (model.aliases or {}).get(CHAMPION_ALIAS)
    champion = one_version(uri, client, name, str(champion_version)) if champion_version else None
    direction = metric_direction(metric, direction)
    passes, explanation = promotion_gate(candidate, champion, metric=metric, direction=direction)
    if not passes and not force:
        raise ReviewError(f"promotion refused: {explanation}")
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    tags = {
        "champion.promoted_by": reviewer(),
        "champion.promoted_at": now,
        "champion.reason": reason or "(none given)",
        "champion.previous": f"v{champion.version}" if champion else "none",
        "champion.forced": str(bool(force and not passes)).lower(),
        "champion.gate": explanation,
    }
    client.set_registered_model_alias(name, CHAMPION_ALIAS, candidate.version)
    tracking.set_model_version_tags(uri, name, candidate.version, tags)
    if champion is not None and champion.version != candidate.version:
        tracking.set_model_version_tags(uri, name, champion.version, {"champion.replaced_by": f"v{candidate.version}",
                                                                      "champion.replaced_at": now})  # fmt: skip
    forced = " (FORCED past the gate)" if force and not passes else ""
    return (f"{name} v{candidate.version} is now @{CHAMPION_ALIAS}{forced}: {explanation}; recorded by "
            f"{tags['champion.promoted_by']} at {now}")  # fmt: skip


# ------------------------------------------------------------------------------------------------ report
def report_markdown(uri: str, models: dict[str, list[VersionRecord]], metrics: list[str] | None) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = ["# Model registry review", "", f"Registry: `{uri}` · generated {now} by {reviewer()}", ""]
    for name, records in models.items():
        headers, rows = version_rows(records, metric_columns(records, metrics))
        out += [f"## {name}", "", markdown_table(headers, rows) if rows else "(no versions)", ""]
        for record in records:
            link = version_url(uri, record)
            title = f"[v{record.version}]({link})" if link else f"v{record.version}"
            out.append(f"### {name} {title}" + (" · " + ", ".join("@" + a for a in record.aliases) if record.aliases
                                                  else ""))  # fmt: skip
            promoted = {k: v for k, v in record.tags.items() if k.startswith("champion.")}
            if promoted:
                out.append("")
                out += [f"- {k}: {v}" for k, v in sorted(promoted.items())]
            out.append("")
            links = picture_links(uri, record)
            out += [f"- [{path}]({http or art})" for path, art, http in links] or ["- no pictures logged"]
            out.append("")
    return "\n".join(out)


def report_html(uri: str, client, models: dict[str, list[VersionRecord]], metrics: list[str] | None,
                embed: int) -> str:  # fmt: skip
    """A single HTML file: tables, links and the last ``embed`` pictures of each version inlined as data URIs."""
    esc = html.escape
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>Model registry review</title><style>",
           "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
           "padding:2px 8px;text-align:left}img{max-width:480px;margin:4px;border:1px solid #ddd}</style></head><body>",
           f"<h1>Model registry review</h1><p>Registry: <code>{esc(uri)}</code> · generated {esc(now)} by "
           f"{esc(reviewer())}</p>"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name, records in models.items():
            headers, rows = version_rows(records, metric_columns(records, metrics))
            out.append(f"<h2>{esc(name)}</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
            out.append("</table>")
            for record in records:
                link = version_url(uri, record)
                title = f"<a href='{esc(link)}'>v{record.version}</a>" if link else f"v{record.version}"
                aliases = " · " + ", ".join("@" + a for a in record.aliases) if record.aliases else ""
                out.append(f"<h3>{esc(name)} {title}{esc(aliases)}</h3><ul>")
                out += [f"<li>{esc(k)}: {esc(v)}</li>" for k, v in sorted(record.tags.items())
                        if k.startswith("champion.")]  # fmt: skip
                links = picture_links(uri, record)
                out += [f"<li><a href='{esc(http or art)}'>{esc(path)}</a></li>" for path, art, http in links]
                out.append("</ul>" if links else "<li>no pictures logged</li></ul>")
                for path, _, _ in links[-embed:] if embed > 0 else []:
                    local = client.download_artifacts(record.run_id, path, tmp)
                    kind = mimetypes.guess_type(path)[0] or "image/png"
                    data = base64.b64encode(Path(local).read_bytes()).decode("ascii")
                    out.append(f"<figure><img alt='{esc(path)}' src='data:{kind};base64,{data}'>"
                               f"<figcaption>{esc(path)}</figcaption></figure>")  # fmt: skip
    out.append("</body></html>")
    return "\n".join(out)


def command_report(uri: str, client, *, name: str | None = None, out: str | None = None,
                   metrics: list[str] | None = None, embed: int = 2,
                   experiment: str = REVIEW_EXPERIMENT) -> tuple[str, str]:  # fmt: skip
    """Write the page (``out``; its suffix .html/.htm selects HTML, else Markdown) and log it to a new run
    ``registry-review`` of ``experiment``. Returns (path written, run id)."""
    names = [name] if name else tracking.registered_model_names(client)
    models = {n: model_versions(uri, client, n, with_pictures=True) for n in names}
    path = Path(out or "registry-review.md")
    as_html = path.suffix.lower() in (".html", ".htm")
    page = report_html(uri, client, models, metrics, embed) if as_html else report_markdown(uri, models, metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    run_id = tracking.start_run(uri, experiment, "registry-review", {"models": ",".join(names) or "none",
                                                                     "format": "html" if as_html else "markdown"},
                                tags={"job": "review_models", "reviewer": reviewer()})  # fmt: skip
    tracking.log_artifact_file(uri, run_id, path)
    tracking.set_terminated(uri, run_id, "FINISHED")
    return str(path), run_id
