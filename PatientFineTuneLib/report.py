"""One self-contained HTML report per patient, built from what the verbs wrote (``segment``
folders, a ``compare`` folder, the patient model file), for the radiologist's record:
inputs and model provenance, the suggested slices, lesions at each visit, the change
table with the lesion load over time, the uncertainty summary with the most uncertain
lesions first, and the figures (PNG embedded: the file stands alone).
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import __version__
from .files import atomic_write
from .outputs import read_segment_outputs

#: How many follow-up slices the figures show, and how many uncertain lesions are listed.
FIGURE_SLICES = 4
UNCERTAIN_LESIONS = 10


@dataclass
class ReportInputs:
    """What a report is made from (every path as the verbs wrote it).

    followup_image : the follow-up image the results are on (first sequence), for figures.
    results : label -> ``segment`` output folder ("base", "fine-tuned", ...), in order.
    truth : a reference lesion mask on the follow-up grid (synthetic or expert), optional.
    patient_model : the patient model file (provenance, never-worse outcome), optional.
    changes : a ``compare`` output folder, optional.
    suggestions : a ``suggestions.json`` (the baseline slices annotated), optional.
    paths_shown : whether the report names the input files with their folders (False:
        their names only, for inputs in a folder that is deleted after the report, as the
        web app's session folder).
    """

    followup_image: Path
    results: dict[str, Path]
    title: str = "Patient report"
    truth: Path | None = None
    patient_model: Path | None = None
    changes: Path | None = None
    suggestions: Path | None = None
    notes: list[str] = field(default_factory=list)
    paths_shown: bool = True

    def where(self, path: Path) -> str:
        """How the report names an input file."""
        return str(path) if self.paths_shown else Path(path).name


def write_report(inputs: ReportInputs, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Build the report and write it atomically to ``out`` (an ``.html`` file)."""
    page = build_report(inputs)
    out = Path(out)
    atomic_write(out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"), overwrite=overwrite)
    return out


def build_report(inputs: ReportInputs) -> str:
    """The report as one HTML page."""
    if not inputs.results:
        raise ValueError("a report needs at least one segment result (label=FOLDER)")
    results = {label: read_segment_outputs(folder) for label, folder in inputs.results.items()}
    sections = [
        _section("Inputs and models", _provenance(inputs)),
        _suggestions_section(inputs.suggestions),
        _section("Lesions at each visit", _visits_table(results, inputs.changes)),
        _changes_section(inputs.changes),
        _section("Uncertainty", _uncertainty_section(results)),
        _section("Figures", _figures(inputs, results)),
    ]
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in inputs.notes)
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(inputs.title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.15em; border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }}
table {{ border-collapse: collapse; margin: .5em 0; }} th, td {{ border: 1px solid #ccc; padding: .25em .6em; text-align: right; }}
th {{ background: #f3f3f3; }} td.text, th.text {{ text-align: left; }}
.kept {{ background: #fff3cd; padding: .4em .6em; border-left: 4px solid #e0a800; }}
.note {{ color: #555; }} img {{ max-width: 100%; }} figcaption {{ color: #444; font-size: .9em; }}
</style></head><body>
<h1>{html.escape(inputs.title)}</h1>
<p class="note">PatientFineTune {__version__}, {created}. Research software: check every result against the images.
All coordinates are RAS (right, anterior, superior; as 3D Slicer shows them), in mm.</p>
{notes}
{"".join(sections)}
</body></html>
"""


# ---------------------------------------------------------------------------------------
# Sections


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def _table(header: list[str], rows: list[list], text_columns: int = 1) -> str:
    def cell(tag, k, value):
        cls = " class='text'" if k < text_columns else ""
        return f"<{tag}{cls}>{html.escape(_format(value))}</{tag}>"

    head = "".join(cell("th", k, h) for k, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", k, v) for k, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _format(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _provenance(inputs: ReportInputs) -> str:
    rows = [["Follow-up image", inputs.where(inputs.followup_image)]]
    rows += [[f"Result '{label}'", inputs.where(folder)] for label, folder in inputs.results.items()]
    if inputs.truth:
        rows.append(["Reference lesion mask", inputs.where(inputs.truth)])
    body = _table(["What", "Where"], rows, text_columns=2)
    if inputs.patient_model:
        from .modelcard import describe_held_out, describe_patient_model, read_model_metadata

        metadata = read_model_metadata(inputs.patient_model)
        finetune = metadata.get("finetune") or {}
        config = finetune.get("config", {})
        case = finetune.get("case") or {}
        rows = [
            ["Patient model", inputs.where(inputs.patient_model)],
            ["Base model sha256", finetune.get("base_model_sha256", "-")],
            ["Preset", metadata.get("preset") or "-"],
            ["Slices annotated", ", ".join(map(str, finetune.get("slices", []))) or "-"],
            ["Baseline organ mask", case.get("organ") or "-"],
            ["Bias-field correction (N4)", "yes" if case.get("bias_corrected") else "no"],
            ["Iterations", config.get("iterations", "-")],
            ["Weighting", config.get("weighting") or "none"],
            ["Seed", config.get("seed", "-")],
            ["Fine-tuned on", finetune.get("date", "-")],
        ]
        body += _table(["Patient model", ""], rows, text_columns=2)
        check = finetune.get("holdout_check")
        if check and not check.get("skipped"):
            verdict = (
                "kept the fine-tuned model"
                if check["kept"]
                else "KEPT THE BASE MODEL: fine-tuning did not help on the held-out part"
            )
            body += (
                f"<p class='{'' if check['kept'] else 'kept'}'>Never-worse check: {html.escape(verdict)} of the annotation "
                f"(held out: {html.escape(describe_held_out(check))}).</p>"
            )
        else:
            body += f"<p>{html.escape(describe_patient_model(finetune))}; no never-worse check was run.</p>"
    return body


def read_suggestions(path: str | os.PathLike) -> list[dict]:
    """The slices of a ``suggestions.json`` (``segment --suggest``), checked: a JSON list
    of objects with ``slice``, ``mean_probability`` and a 3-number ``centre_ras_mm``.

    Raises ValueError naming the file for anything else (another JSON file, a hand-edited
    one)."""

    def wrong(detail: str) -> ValueError:
        return ValueError(
            f"{path} is not a suggestions file of segment --suggest ({detail}); give the suggestions.json it wrote"
        )

    try:
        suggestions = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise wrong(f"not JSON: {exc}") from None
    if not isinstance(suggestions, list):
        raise wrong("not a list of slices")
    for s in suggestions:
        fields_ok = (
            isinstance(s, dict)
            and isinstance(s.get("slice"), int)
            and isinstance(s.get("mean_probability"), (int, float))
        )
        centre = s.get("centre_ras_mm") if isinstance(s, dict) else None
        if not (
            fields_ok
            and isinstance(centre, list)
            and len(centre) == 3
            and all(isinstance(c, (int, float)) for c in centre)
        ):
            raise wrong(f"an entry without slice, mean_probability and centre_ras_mm: {json.dumps(s)[:80]}")
    return suggestions


def _suggestions_section(path: Path | None) -> str:
    if not path:
        return ""
    rows = [
        [s["slice"], s["mean_probability"], " ".join(f"{c:.1f}" for c in s["centre_ras_mm"])]
        for s in read_suggestions(path)
    ]
    return _section(
        "Suggested baseline slices",
        _table(["Slice", "Mean lesion probability", "Centre (RAS mm)"], rows, text_columns=0),
    )


def _visits_table(results: dict, changes: Path | None) -> str:
    rows = []
    if changes:
        summary = json.loads((Path(changes) / "changes.json").read_text())["summary"]
        rows.append(["Baseline (annotation)", summary["baseline_lesions"], summary["baseline_load_mm3"] / 1000])
    for label, result in results.items():
        rows.append(
            [
                f"Follow-up ({label})",
                len(result["lesions"]),
                sum(float(r["volume_mm3"]) for r in result["lesions"]) / 1000,
            ]
        )
    return _table(["Visit (source)", "Lesions", "Volume (ml)"], rows)


def _changes_section(changes: Path | None) -> str:
    if not changes:
        return ""
    from .change import CATEGORIES
    from .plots import load_figure, png_bytes

    record = json.loads((Path(changes) / "changes.json").read_text())
    summary, lesions = record["summary"], record["lesions"]
    counts = _table([c for c in CATEGORIES], [[summary[c] for c in CATEGORIES]], text_columns=0)
    rows = [
        [r["change"], r["baseline_mm3"], r["followup_mm3"], r["change_mm3"], _ras_text(r["centroid_lps_mm"].split())]
        for r in lesions
    ]
    table = _table(["Change", "Baseline (mm3)", "Follow-up (mm3)", "Change (mm3)", "Centroid (RAS mm)"], rows)
    figure = load_figure(
        ["baseline", "follow-up"],
        {"lesion load": [summary["baseline_load_mm3"] / 1000, summary["followup_load_mm3"] / 1000]},
    )
    plot = _image(png_bytes(figure), "Lesion load at each visit")
    return _section("What changed", counts + plot + table)


def _ras_text(lps) -> str:
    """A position the files store in LPS (ITK's convention) as the report shows every
    position: RAS mm, as 3D Slicer does."""
    x, y, z = (float(c) for c in lps)
    return f"{-x:.1f} {-y:.1f} {z:.1f}"


def _uncertainty_section(results: dict) -> str:
    rows, parts = [], []
    for label, result in results.items():
        summary = result["summary"]
        if summary is None:
            rows.append([label, None, None, None])
            continue
        rows.append([label, summary.get("mc_samples"), summary.get("max_sd"), summary.get("mean_sd_in_lesions")])
        uncertain = sorted(
            (r for r in result["lesions"] if math.isfinite(r.get("mean_sd", math.nan))), key=lambda r: -r["mean_sd"]
        )
        if uncertain:
            lines = [
                [
                    r["id"],
                    r["volume_mm3"],
                    r["mean_sd"],
                    r.get("mean_probability"),
                    _ras_text((r["centroid_x_mm"], r["centroid_y_mm"], r["centroid_z_mm"])),
                ]
                for r in uncertain[:UNCERTAIN_LESIONS]
            ]
            parts.append(
                f"<h3>Most uncertain lesions ({html.escape(label)})</h3>"
                + _table(
                    ["Lesion", "Volume (mm3)", "Mean SD", "Mean probability", "Centroid (RAS mm)"],
                    lines,
                    text_columns=0,
                )
            )
    header = ["Result", "MC samples", "Max SD", "Mean SD in lesions"]
    return (
        _table(header, rows)
        + "".join(parts)
        + ("" if any(r[1] for r in rows) else "<p>No uncertainty map was computed (segment --mc-samples).</p>")
    )


# ---------------------------------------------------------------------------------------
# Figures


def _image(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'><figcaption>{html.escape(caption)}</figcaption></figure>"


def _figures(inputs: ReportInputs, results: dict) -> str:
    from .plots import png_bytes

    figures = report_figures(inputs, results)
    if not figures:
        return "<p>No lesion to show.</p>"
    return "".join(_image(png_bytes(figure), caption) for _name, caption, figure in figures)


def save_report_figures(inputs: ReportInputs, folder: str | os.PathLike) -> list[Path]:
    """The report's figures as PNG files in ``folder`` (``outlines.png``, ``uncertainty.png``)."""
    from .plots import _save

    results = {label: read_segment_outputs(f) for label, f in inputs.results.items()}
    return [_save(figure, Path(folder) / f"{name}.png") for name, _caption, figure in report_figures(inputs, results)]


def report_figures(inputs: ReportInputs, results: dict) -> list[tuple[str, str, object]]:
    """(name, caption, matplotlib figure) of the follow-up slices with the most lesion:
    the outlines of every result (and the reference) in distinct colours, and the
    uncertainty maps of the results that have one."""
    from .images import read_image, slice_layout
    from .metrics import label_mask
    from .montage import to_uint8
    from .plots import outline_figure, uncertainty_figure

    image = read_image(inputs.followup_image)
    layout = slice_layout(image)
    anatomy = layout.to_slices(sitk.GetArrayFromImage(image).astype(np.float32))
    if anatomy.ndim != 3:
        raise ValueError(f"the follow-up image {inputs.followup_image} must be one 3D volume (give its first sequence)")
    outlines = {}
    if inputs.truth:
        outlines["reference"] = layout.to_slices(
            label_mask(read_image(inputs.truth), f"the reference lesion mask {inputs.truth}")
        )
    for label, result in results.items():
        outlines[label] = layout.to_slices(sitk.GetArrayFromImage(result["segmentation"]) > 0)
    if any(m.shape != anatomy.shape for m in outlines.values()):
        raise ValueError(f"the follow-up image {inputs.followup_image} is not on the results' grid")
    per_slice = np.logical_or.reduce(list(outlines.values())).sum(axis=(1, 2))
    if not per_slice.any():
        return []
    # the slices with the most lesion, in slice order
    picks = sorted(int(i) for i in np.argsort(-per_slice, kind="stable")[:FIGURE_SLICES] if per_slice[i])
    window = to_uint8(anatomy)
    tiles = [window[s] for s in picks]
    titles = [f"slice {s}" for s in picks]
    normal = int(np.argmax(np.abs(np.array(image.GetDirection()).reshape(3, 3)[:, layout.axis])))
    sides = ("A", "P") if normal == 0 else ("R", "L")  # sagittal slices run anterior to posterior
    figures = [
        (
            "outlines",
            "Lesion outlines on the follow-up: "
            + ", ".join(outlines)
            + f" (radiological orientation: {sides[0]} on the left)",
            outline_figure(tiles, {n: [m[s] for s in picks] for n, m in outlines.items()}, titles, "follow-up", sides),
        )
    ]
    sd = {
        label: layout.to_slices(sitk.GetArrayFromImage(r["uncertainty"]))
        for label, r in results.items()
        if r["uncertainty"] is not None
    }
    if sd:
        figures.append(
            (
                "uncertainty",
                "Uncertainty (SD over the Monte-Carlo-dropout samples) over the follow-up, one row per model",
                uncertainty_figure(tiles, {n: [m[s] for s in picks] for n, m in sd.items()}, titles, sides),
            )
        )
    return figures
