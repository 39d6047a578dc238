"""The patient-specific workflow in a web browser, on Kitware's trame-slicer.

The same three steps as the Slicer module, on the same MRML bridge
(:mod:`.slicerworkflow`): analyse the baseline (base-model segmentation, suggested slices
with jump-to), correct the baseline annotation with trame-slicer's segment editor (paint /
erase in the baseline view), fine-tune with a progress bar and Cancel, and segment the
follow-up with the base and the patient model (a switch shows either), the uncertainty
overlay with its colour legend, the follow-up's lesions in the 3D view, the lesion table
and a link to the patient's HTML report (:mod:`.report`). Fine-tuning runs the
never-worse check (:func:`.finetune.never_worse_check`) and says when the base model was kept.

Needs the ``web`` extra (``pip install -e ".[web]"``); started by
``patient-finetune web --host 127.0.0.1 --port N``. Any web page the user has open could
otherwise drive it, so each start has a random secret (in the address it prints, which
the browser's WebSocket must present), every request whose ``Origin`` or ``Host`` is not
the app's own address is refused (another site's page, a DNS-rebound name), and only
image files inside the data folder are loaded (see the README's security section). Rendering happens on the server; on a
machine without a display VTK renders through EGL (``VTK_DEFAULT_OPENGL_WINDOW=
vtkEGLRenderWindow``, which :func:`main` sets unless the variable is already set).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import numpy as np

#: The three views: the baseline (view group 0, where the annotation is edited), the
#: follow-up (group 1, where results go) and a 3D view of the baseline's segments.
BASELINE_VIEW, FOLLOWUP_VIEW, THREED_VIEW = "Baseline", "Followup", "ThreeD"  # state names: no hyphens
#: URL prefix under which the reports in ``<work>/reports`` are served.
REPORTS_URL = "reports"

LESION_HEADERS = [
    {"title": "Lesion", "key": "id"},
    {"title": "Volume (mm³)", "key": "volume"},
    {"title": "R, A, S (mm)", "key": "ras"},
    {"title": "Mean p", "key": "probability"},
    {"title": "Mean SD", "key": "sd"},
]


def reattach_effect_pipelines(slicer_app) -> int:
    """Work around trame-slicer 2.0.0: segment-editor effect pipelines created for a view
    before the view manager knows that view are left without it, and activating Paint
    then fails with ``'NoneType' object has no attribute 'paint_interaction_stopped'``.
    Give every such pipeline its view; returns how many needed it (0 once upstream is
    fixed, which ``test_web.py`` watches)."""
    editor, views = slicer_app.segmentation_editor, slicer_app.view_manager
    fixed = 0
    for effect in editor._effects.values():
        for weak in effect.pipelines:
            pipeline = weak()
            if pipeline is not None and pipeline._view is None and pipeline.GetViewNode() is not None:
                pipeline.SetView(views.get_view(pipeline.GetViewNode()))
                fixed += 1
    return fixed


def sample_patient(folder: str | os.PathLike, seed: int = 0) -> dict[str, list[Path]]:
    """The synthetic sample patient (brain-wmh, as the demo's), generated once into
    ``folder``; returns the sequence files per visit."""
    from .synth import generate_pair, write_pair

    folder = Path(folder) / f"sample-wmh-{seed}"
    if not (folder / "followup" / "lesions.nii.gz").is_file():
        write_pair(generate_pair("brain-wmh", seed), folder, overwrite=True, preview=False)
    return {visit: [folder / visit / f"{s}.nii.gz" for s in ("FLAIR", "T1")] for visit in ("baseline", "followup")}


def lesion_table_rows(lesions: Sequence[dict]) -> list[dict]:
    """Rows for the browser's lesion table (RAS centroids, as Slicer shows them)."""
    from .mrml import lesion_rows_in_ras

    def fmt(value, digits):
        return "" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"

    return [
        {
            "id": r["id"],
            "volume": fmt(r["volume_mm3"], 1),
            "ras": ", ".join(f"{r[k]:.1f}" for k in ("centroid_r_mm", "centroid_a_mm", "centroid_s_mm")),
            "probability": fmt(r.get("mean_probability"), 2),
            "sd": fmt(r.get("mean_sd"), 3),
        }
        for r in lesion_rows_in_ras(lesions)
    ]


class PatientFineTuneWeb:
    """The web application: one trame server, one MRML scene, one patient at a time.

    Parameters
    ----------
    model : base model file or shipped preset name.
    work_dir : where the sample patient is generated.
    data_dir : the folder whose image files the page may load (default: ``work_dir``).
    device : torch device for the model ("auto": CUDA when available).
    """

    def __init__(
        self,
        server=None,
        model: str = "brain-wmh",
        work_dir: str | os.PathLike = ".",
        device: str = "auto",
        data_dir: str | os.PathLike | None = None,
    ):
        from trame.app import get_server
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        from .slicerworkflow import PatientSession

        self.server = get_server(server, client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.work_dir, self.device = Path(work_dir), device
        self.data_dir = Path(data_dir if data_dir is not None else work_dir).resolve()
        self.reports_dir = self.work_dir / "reports"
        self.reports_dir.mkdir(parents=True, exist_ok=True)
        self.server.enable_module({"serve": {REPORTS_URL: str(self.reports_dir.resolve())}})
        self.state, self.ctrl = self.server.state, self.server.controller
        self.slicer = SlicerApp()
        register_rca_factories(self.slicer.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer.scene, self.slicer.view_manager, self.server)
        # the steps run as the Slicer module's jobs, on this app's scene (Clear starts a new patient)
        self.session = PatientSession(self.slicer.scene)
        self.session.choose_base_model(model)
        self.sequences = self.session.base_metadata["sequences"]
        self.volumes: dict[str, list] = {}
        self.organs: dict[str, object] = {}
        self.baseline_segmentation = None
        self.followup_results: dict = {}  # label -> FollowupNodes: "fine-tuned", "base"
        self._cancel = threading.Event()
        self._set_initial_state()
        self._build_layout()
        self._build_ui()
        self.slicer.segmentation_editor.segmentation_modified.connect(self._count_annotation)

    # -- state and layout ----------------------------------------------------------------

    def _set_initial_state(self):
        from .modelcard import describe_sequences

        names = describe_sequences(self.sequences)  # "FLAIR, T1 (T1 optional)"
        self.state.update(
            {
                "trame__title": "PatientFineTune",
                "trame__favicon": None,  # the stock favicon points at an outside host
                "model_info": f"{self.session.base_metadata.get('preset') or 'model'}: reads {names}",
                "baseline_paths": "",
                "followup_paths": "",
                "sequence_names": names,
                "status": "Load the sample patient or a study.",
                "error": "",
                "loaded": False,
                "analysed": False,
                "finetuned": False,
                "busy": False,
                "progress": 0,
                "progress_text": "",
                "suggestions": [],
                "current_slice": "",
                "annotation_voxels": 0,
                "tool": "none",
                "brush_mm": 5.0,
                "overlay": "",
                "slice_selection": "suggested",
                "iterations": 100,
                "mc_samples": 25,
                "lesion_headers": LESION_HEADERS,
                "lesion_rows": [],
                "result_text": "",
                "uncertainty_shown": False,
                "shown_result": "fine-tuned",
                "sd_max": "",
                "legend_gradient": _legend_gradient(),
                "report_url": "",
            }
        )

    def _build_layout(self):
        from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition, ViewProps, ViewType

        def axial(tag, group, colour):
            return ViewLayoutDefinition(
                tag, ViewType.SLICE_VIEW, ViewProps(orientation="Axial", label=tag, color=colour, group=group)
            )

        threed = ViewLayoutDefinition(
            THREED_VIEW, ViewType.THREE_D_VIEW, ViewProps(label="3D", group=0, background_color=("#1f2020", "#3c3c3c"))
        )
        layout = Layout(
            LayoutDirection.Horizontal,
            [
                axial(BASELINE_VIEW, 0, "#F34A33"),
                axial(FOLLOWUP_VIEW, 1, "#6DAD4A"),
                Layout(LayoutDirection.Vertical, [threed]),
            ],
        )
        self.layout_manager.register_layout("baseline-followup", layout)
        self.layout_manager.set_layout("baseline-followup")

    def _build_ui(self):
        from trame.ui.vuetify3 import SinglePageWithDrawerLayout
        from trame.widgets import html
        from trame.widgets import vuetify3 as v

        with SinglePageWithDrawerLayout(self.server, theme="dark") as self.ui:
            self.ui.title.set_text("PatientFineTune")
            with self.ui.toolbar:
                v.VSpacer()
                html.Span("{{ model_info }}", classes="text-caption mr-4", id="model-info")
            with self.ui.drawer as drawer:
                drawer.width = 460
                with html.Div(classes="pa-3 d-flex flex-column ga-2"):
                    html.Div("1. Patient", classes="text-subtitle-1")
                    v.VBtn(
                        "Load sample patient", id="load-sample", click=self.load_sample, disabled=("busy",), block=True
                    )
                    v.VTextField(
                        v_model=("baseline_paths",),
                        label=("`Baseline files (${sequence_names}), comma-separated`",),
                        density="compact",
                        hide_details=True,
                    )
                    v.VTextField(
                        v_model=("followup_paths",),
                        label="Follow-up files, same order",
                        density="compact",
                        hide_details=True,
                    )
                    v.VBtn(
                        "Load study from files",
                        id="load-files",
                        click=self.load_files,
                        disabled=("busy",),
                        block=True,
                        variant="tonal",
                    )

                    html.Div("2. Baseline", classes="text-subtitle-1 mt-2")
                    v.VBtn(
                        "Analyse baseline", id="analyse", click=self.analyse, disabled=("busy || !loaded",), block=True
                    )
                    with html.Div(v_if=("suggestions.length",), classes="d-flex flex-wrap ga-1", id="suggestions"):
                        v.VBtn(
                            "{{ s.label }}",
                            v_for=("s in suggestions",),
                            key="s.index",
                            size="small",
                            variant="outlined",
                            classes="suggestion",
                            click=(self.jump_to, "[s.index]"),
                        )
                    html.Div("{{ current_slice }}", classes="text-caption", id="current-slice")
                    with v.VBtnToggle(
                        v_model=("tool",),
                        mandatory=True,
                        density="compact",
                        divided=True,
                        disabled=("!analysed || busy",),
                    ):
                        v.VBtn("View", value="none", id="tool-none")
                        v.VBtn("Paint", value="paint", id="tool-paint")
                        v.VBtn("Erase", value="erase", id="tool-erase")
                    v.VSlider(
                        v_model=("brush_mm",),
                        min=1,
                        max=20,
                        step=0.5,
                        label="Brush (mm)",
                        density="compact",
                        hide_details=True,
                        thumb_label=True,
                        disabled=("!analysed || busy",),
                    )
                    html.Div(
                        "Annotation: <span id='annotation-voxels'>{{ annotation_voxels }}</span> voxels",
                        classes="text-caption",
                    )

                    html.Div("3. Fine-tune and segment the follow-up", classes="text-subtitle-1 mt-2")
                    v.VSelect(
                        v_model=("slice_selection",),
                        items=(
                            "[{title: 'suggested slices', value: 'suggested'}, {title: 'all lesion slices', value: 'all-lesion'}]",
                        ),
                        label="Train on",
                        density="compact",
                        hide_details=True,
                    )
                    with html.Div(classes="d-flex ga-2"):
                        v.VTextField(
                            v_model_number=("iterations",),
                            type="number",
                            label="Iterations",
                            density="compact",
                            hide_details=True,
                            id="iterations",
                        )
                        v.VTextField(
                            v_model_number=("mc_samples",),
                            type="number",
                            label="MC samples",
                            density="compact",
                            hide_details=True,
                            id="mc-samples",
                        )
                    with html.Div(classes="d-flex ga-2"):
                        v.VBtn(
                            "Fine-tune",
                            id="finetune",
                            click=self.finetune,
                            disabled=("busy || !analysed",),
                            color="primary",
                        )
                        v.VBtn("Cancel", id="cancel", click=self.cancel, disabled=("!busy",), variant="outlined")
                    v.VProgressLinear(model_value=("progress",), v_show=("busy",), height=8, id="progress")
                    html.Div("{{ progress_text }}", v_show=("busy",), classes="text-caption")
                    html.Div("{{ status }}", classes="text-body-2", id="status")
                    v.VAlert(text=("error",), v_if=("error",), type="error", density="compact", id="error")
                    html.Div(
                        "{{ result_text }}",
                        v_if=("result_text",),
                        classes="text-body-2",
                        id="result-text",
                        style="white-space: pre-line",
                    )
                    with v.VBtnToggle(
                        v_model=("shown_result",),
                        v_if=("finetuned",),
                        mandatory=True,
                        density="compact",
                        divided=True,
                        id="result-switch",
                    ):
                        v.VBtn("Fine-tuned", value="fine-tuned", id="show-finetuned")
                        v.VBtn("Base", value="base", id="show-base")
                    v.VSwitch(
                        v_model=("uncertainty_shown",),
                        label="Uncertainty overlay (follow-up view)",
                        v_if=("finetuned",),
                        density="compact",
                        hide_details=True,
                        id="uncertainty-switch",
                    )
                    html.Div(
                        "Follow-up view overlay: {{ overlay }}", v_if=("overlay",), classes="text-caption", id="overlay"
                    )
                    with html.Div(
                        v_if=("uncertainty_shown && sd_max",), id="uncertainty-legend", classes="text-caption"
                    ):
                        html.Div("Uncertainty (SD of the lesion probability)")
                        html.Div(style=("`height: 12px; border-radius: 2px; background: ${legend_gradient}`",))
                        with html.Div(classes="d-flex justify-space-between"):
                            html.Span("0")
                            html.Span("{{ sd_max }}", id="legend-max")
                    html.A(
                        "Open the patient's report",
                        v_if=("report_url",),
                        href=("report_url",),
                        target="_blank",
                        id="report-link",
                        classes="text-body-2",
                    )
                    v.VDataTable(
                        v_if=("lesion_rows.length",),
                        headers=("lesion_headers",),
                        items=("lesion_rows",),
                        density="compact",
                        items_per_page=8,
                        id="lesion-table",
                    )
            with self.ui.content:
                self.layout_manager.initialize_layout_grid(self.ui)
        reattach_effect_pipelines(self.slicer)
        self.state.change("tool", "brush_mm")(self._on_tool)
        self.state.change("uncertainty_shown", "shown_result")(self._on_result_shown)

    # -- views ---------------------------------------------------------------------------

    def view(self, tag: str):
        return next(v for v in self.slicer.view_manager.get_views() if v.get_singleton_tag() == tag)

    def _show(self, tag: str, background, foreground=None, opacity: float = 0.0):
        view = self.view(tag)
        view.set_background_volume_id(background.GetID() if background else None)
        view.set_foreground_volume_id(foreground.GetID() if foreground else None)
        view.set_foreground_opacity(opacity)

    def _show_only_in(self, node, tags: Sequence[str]):
        ids = [self.view(t).get_view_node_id() for t in tags]
        for i in range(node.GetNumberOfDisplayNodes()):
            node.GetNthDisplayNode(i).SetViewNodeIDs(ids)

    # -- loading -------------------------------------------------------------------------

    def load_sample(self):
        files = sample_patient(self.work_dir, seed=0)
        self.load_study(files["baseline"], files["followup"], name="sample patient (synthetic brain-wmh, seed 0)")

    def load_files(self):
        """Button handler: the files typed in the page, if all are inside the data folder."""
        split = [
            [p.strip() for p in str(self.state[k]).split(",") if p.strip()]
            for k in ("baseline_paths", "followup_paths")
        ]
        outside = [p for paths in split for p in paths if not self.may_read(p)]
        if outside:  # the same words whether it exists or not: the page must not learn which files the server has
            self.state.error = (
                f"{outside[0]}: only files inside the data folder {self.data_dir} can be loaded "
                "(start the app with --data FOLDER to allow another folder)"
            )
            return
        self.load_study(*split, name="study from files")

    def may_read(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` (symbolic links followed) lies inside the data folder."""
        return Path(os.path.realpath(self.data_dir / path)).is_relative_to(self.data_dir)

    def load_study(self, baseline: Sequence, followup: Sequence, name: str = ""):
        """Read both visits into the scene (a new scene each time)."""
        from .images import read_image
        from .modelcard import required_sequences
        from .mrml import image_to_volume

        self.state.error = ""
        n, required = len(self.sequences), required_sequences(self.sequences)
        try:
            # a model's trailing optional sequences may be left out (a FLAIR-only visit)
            if not (required <= len(baseline) <= n and required <= len(followup) <= n):
                count = f"{n}" if required == n else f"{required} to {n}"
                raise ValueError(
                    f"the model reads {n} sequence(s) ({self.state.sequence_names}); give {count} file(s) for each visit, in that order"
                )
            images = {
                visit: [read_image(p) for p in paths]
                for visit, paths in (("baseline", baseline), ("followup", followup))
            }
        except Exception as error:  # shown to the user, who can fix the paths
            self.state.error = str(error)
            return
        self.slicer.scene.Clear(0)
        self.volumes = {
            visit: [
                image_to_volume(image, self.slicer.scene, f"{visit} {s['name']}")
                for image, s in zip(imgs, self.sequences)
            ]
            for visit, imgs in images.items()
        }
        self.baseline_segmentation, self.followup_results = None, {}
        self._show(BASELINE_VIEW, self.volumes["baseline"][0])
        self._show(FOLLOWUP_VIEW, self.volumes["followup"][0])
        for tag in (BASELINE_VIEW, FOLLOWUP_VIEW):
            self.view(tag).fit_view_to_content()
        self.state.update(
            {
                "loaded": True,
                "analysed": False,
                "finetuned": False,
                "suggestions": [],
                "lesion_rows": [],
                "result_text": "",
                "annotation_voxels": 0,
                "tool": "none",
                "uncertainty_shown": False,
                "shown_result": "fine-tuned",
                "sd_max": "",
                "report_url": "",
                "status": f"Loaded {name}. Next: analyse the baseline.",
            }
        )

    # -- long work -------------------------------------------------------------------------

    async def _run(self, label: str, work: Callable) -> object:
        """Run ``work(progress, cancelled)`` in a worker thread while the page shows its
        progress (``progress(fraction, phase)``); returns its result, or None when it failed
        (message shown) or was cancelled (nothing kept)."""
        from .progress import Cancelled

        self._cancel.clear()
        done = {"fraction": 0.0, "phase": ""}

        def progress(fraction: float, phase: str = "") -> None:
            done.update(fraction=fraction, phase=phase)

        with self.state:
            self.state.update(
                {"busy": True, "error": "", "progress": 0, "progress_text": label, "status": f"{label}..."}
            )
        future = asyncio.get_running_loop().run_in_executor(None, work, progress, self._cancel.is_set)
        while not future.done():
            await asyncio.sleep(0.25)
            with self.state:
                self.state.progress = 100.0 * done["fraction"]
                self.state.progress_text = (
                    f"{label}{', ' + done['phase'] if done['phase'] else ''}: {100 * done['fraction']:.0f} %"
                )
        result = None
        try:
            result = future.result()
        except Cancelled:
            self.state.status = f"{label} cancelled; nothing was changed."
        except Exception as error:  # shown in the page: bad input is the user's to fix
            self.state.error = f"{label} failed: {error}"
            self.state.status = f"{label} failed; see the message below."
        with self.state:
            self.state.busy = False
        return result

    async def _run_step(self, label: str, step) -> object:
        """Run a session's step (its job) with the page's progress bar and Cancel, then load
        its results into the scene; None when it failed or was cancelled. The caller removes
        the step's folder (:meth:`PatientSession.discard_step`) when it is done with it."""
        from .workflow import run_job

        if await self._run(label, lambda progress, cancelled: run_job(step.job, progress, cancelled)) is None:
            return None
        try:
            return self.session.finish_step(step)
        except Exception as error:  # e.g. the scene was cleared meanwhile
            self.state.error = f"{label} failed: {error}"
            return None

    def cancel(self):
        self._cancel.set()

    # -- step 1: the baseline --------------------------------------------------------------

    def analyse(self):
        """Button handler: the work runs as its own task, so that the page's next request
        (Cancel) is served meanwhile (trame handles one client's requests in order)."""
        from trame_server.utils.asynchronous import create_task

        create_task(self.analyse_baseline())

    async def analyse_baseline(self):
        from .workflow import SUGGESTED_SLICES

        try:
            step = self.session.start_analyse(self.volumes["baseline"], k=SUGGESTED_SLICES, device=self.device)
        except Exception as error:  # e.g. a constant volume: the user's to fix
            with self.state:  # a task outside any request: flush to the page
                self.state.error = str(error)
            return
        analysis = await self._run_step("Segmenting the baseline", step)
        self.session.discard_step(step)
        if analysis is None:
            return
        node = analysis.segmentation_node
        self._show_only_in(node, [BASELINE_VIEW, THREED_VIEW])
        self.baseline_segmentation = node
        editor = self.slicer.segmentation_editor
        editor.set_active_segmentation(node, self.volumes["baseline"][0])
        editor.set_active_segment_id(analysis.segment_id)
        editor.show_3d(True)
        self._count_annotation()
        with self.state:
            self.state.suggestions = [
                {"index": i, "label": f"slice {s.index} (mean p {s.mean_probability:.2f})"}
                for i, s in enumerate(self.session.suggestions)
            ]
            self.state.analysed = True
            self.state.status = (
                "The base model's lesions are on the baseline. Check and correct them on the suggested slices "
                "(Paint / Erase), then fine-tune."
            )
        if self.session.suggestions:
            self.jump_to(0)

    def jump_to(self, index: int):
        """Both slice views to a suggested baseline slice (the follow-up view to the same
        physical position, which is the same anatomy once the visits are aligned)."""
        from .mrml import jump_to_suggestion

        suggestion = self.session.suggestions[int(index)]
        for tag in (BASELINE_VIEW, FOLLOWUP_VIEW):
            view = self.view(tag)
            jump_to_suggestion(view.get_view_node(), suggestion)
            view.schedule_render()
        self.state.current_slice = f"Baseline view at suggested slice {suggestion.index}"

    def _on_tool(self, tool, brush_mm, **_):
        from trame_slicer.segmentation import (
            BrushDiameterMode,
            SegmentationEffectErase,
            SegmentationEffectNoTool,
            SegmentationEffectPaint,
        )

        if self.baseline_segmentation is None:
            return
        effect_type = {"paint": SegmentationEffectPaint, "erase": SegmentationEffectErase}.get(
            tool, SegmentationEffectNoTool
        )
        reattach_effect_pipelines(self.slicer)
        effect = self.slicer.segmentation_editor.set_active_effect_type(effect_type)
        if effect_type is not SegmentationEffectNoTool:
            effect.set_brush_diameter(float(brush_mm), BrushDiameterMode.Absolute)

    def annotation_mask(self) -> np.ndarray:
        """The baseline's "Lesion" segment on the baseline grid (z, y, x)."""
        from .mrml import segment_to_array

        node = self.baseline_segmentation
        return segment_to_array(
            node, node.GetSegmentation().GetSegmentIdBySegmentName("Lesion"), self.volumes["baseline"][0]
        )

    def _count_annotation(self, *_):
        if self.baseline_segmentation is not None:
            with self.state:
                self.state.annotation_voxels = int(self.annotation_mask().sum())

    # -- steps 2 and 3: fine-tune, segment the follow-up -------------------------------------

    def finetune(self):
        """Button handler (see :meth:`analyse`)."""
        from trame_server.utils.asynchronous import create_task

        create_task(self.finetune_and_segment())

    async def finetune_and_segment(self):
        from .slicerworkflow import MaskSource, describe_followup

        self.state.tool = "none"
        try:
            segment_id = self.baseline_segmentation.GetSegmentation().GetSegmentIdBySegmentName("Lesion")
            iterations, mc_samples = run_settings(self.state.iterations, self.state.mc_samples)
            finetune = self.session.start_finetune(
                self.volumes["baseline"],
                None,
                MaskSource(self.baseline_segmentation, segment_id),
                "suggested" if self.state.slice_selection == "suggested" else "all-lesion",
                iterations,
                device=self.device,
            )
        except Exception as error:  # e.g. no suggestions, a non-number: the user's to fix
            with self.state:
                self.state.error = str(error)
            return
        description = await self._run_step("Fine-tuning", finetune)
        self.session.discard_step(finetune)
        if description is None:
            return
        try:
            followup = self.session.start_followup(self.volumes["followup"], mc_samples=mc_samples, device=self.device)
        except Exception as error:  # e.g. the follow-up's volume cannot be written: say so on the page
            with self.state:
                self.state.error = str(error)
            return
        try:
            runs = await self._run_step("Segmenting the follow-up with both models", followup)
            if runs is None:
                return
            self.followup_results = {
                label: nodes
                for label in ("fine-tuned", "base")
                for step_label, nodes in zip(followup.labels, runs)
                if step_label == label
            }
            try:
                report_url = f"{REPORTS_URL}/{self._write_report(followup).name}"
            except Exception as error:  # the results stand without their report; say why there is none
                report_url = ""
                self.state.error = f"the report could not be written: {error}"
        finally:
            self.session.discard_step(followup)
        for nodes in self.followup_results.values():
            nodes.segmentation.CreateClosedSurfaceRepresentation()  # the follow-up's lesions in the 3D view
        self._show_only_in(self.baseline_segmentation, [BASELINE_VIEW])
        lines = [describe_followup(nodes) for nodes in self.followup_results.values()]
        with self.state:
            self.state.update(
                {
                    "finetuned": True,
                    "result_text": "\n".join(lines),
                    "shown_result": "fine-tuned",
                    "status": description + ".",
                    "uncertainty_shown": self.followup_results["fine-tuned"].uncertainty is not None,
                    "report_url": report_url,
                }
            )
        self._on_result_shown(self.state.uncertainty_shown, self.state.shown_result)

    def _write_report(self, followup) -> Path:
        """The patient's report from the follow-up step's files (its inputs and one results
        folder per model), in ``<work>/reports`` under a name nobody can guess."""
        import json

        from .report import ReportInputs, write_report

        suggestions = followup.folder / "suggestions.json"
        suggestions.write_text(json.dumps([s.as_dict() for s in self.session.suggestions], indent=2))
        inputs = ReportInputs(
            followup.images[0],
            {label: followup.folder / "results" / label for label in ("fine-tuned", "base")},
            title="PatientFineTune report",
            paths_shown=False,
            patient_model=self.session.models.patient_model,
            suggestions=suggestions,
        )
        return write_report(inputs, self.reports_dir / f"report-{secrets.token_urlsafe(12)}.html")

    def _on_result_shown(self, uncertainty_shown, shown_result, **_):
        """Show the chosen result (fine-tuned or base) in the follow-up and 3D views with its
        table, and its uncertainty overlay if asked; hide the other."""
        if not self.followup_results:
            return
        nodes = self.followup_results.get(shown_result) or self.followup_results["fine-tuned"]
        for other in self.followup_results.values():
            self._show_only_in(other.segmentation, [FOLLOWUP_VIEW, THREED_VIEW] if other is nodes else [])
            for i in range(other.segmentation.GetNumberOfDisplayNodes()):
                other.segmentation.GetNthDisplayNode(i).SetVisibility(other is nodes)
        overlay = nodes.uncertainty if uncertainty_shown and nodes.uncertainty is not None else None
        self._show(FOLLOWUP_VIEW, self.volumes["followup"][0], overlay, 0.5 if overlay else 0.0)
        shown = self.slicer.scene.GetNodeByID(self.view(FOLLOWUP_VIEW).get_foreground_volume_id() or "")
        with self.state:
            self.state.overlay = shown.GetName() if shown is not None else ""
            self.state.lesion_rows = lesion_table_rows(nodes.lesions)
            self.state.sd_max = f"{nodes.summary['max_sd']:.3f}" if overlay is not None and nodes.summary else ""


def run_settings(iterations, mc_samples) -> tuple[int, int]:
    """The page's fine-tuning iterations and MC-dropout samples as whole numbers, checked
    before any work (as the command line's options are): at least 1 iteration; 0 samples
    (no uncertainty) or at least 2 (an SD needs two)."""

    def whole(value, name):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a whole number, not {value!r}") from None
        if number != int(number):
            raise ValueError(f"{name} must be a whole number, not {value!r}")
        return int(number)

    iterations, mc_samples = whole(iterations, "Iterations"), whole(mc_samples, "MC samples")
    if iterations < 1:
        raise ValueError(f"Iterations must be at least 1 (the paper: 100), not {iterations}")
    if mc_samples < 0 or mc_samples == 1:
        raise ValueError(f"MC samples must be 0 (no uncertainty map) or at least 2 (the paper: 25), not {mc_samples}")
    return iterations, mc_samples


def _legend_gradient() -> str:
    """CSS gradient of the uncertainty colour map (the one its volume is shown with)."""
    from .mrml import COLOUR_RAMPS, UNCERTAINTY_COLOURS

    stops = [
        f"rgb({int(r * 255)}, {int(g * 255)}, {int(b * 255)}) {int(v * 100)}%"
        for v, r, g, b in COLOUR_RAMPS[UNCERTAINTY_COLOURS]
    ]
    return f"linear-gradient(to right, {', '.join(stops)})"


def own_address_only(host: str, allowed: Sequence[str] = ()):
    """aiohttp middleware refusing (403) every request whose ``Host`` is not an address of
    the app (``host``, this machine's loopback names, or a name in ``allowed``, such as the
    one a reverse proxy forwards) or whose ``Origin`` is another site: a page from
    elsewhere reaches 127.0.0.1 through the user's browser, directly (its Origin gives it
    away) or by a DNS name it rebinds to 127.0.0.1 (its Host does)."""
    from aiohttp import web

    names = {"127.0.0.1", "localhost", "::1", host.strip("[]").lower(), *(name.strip("[]").lower() for name in allowed)}

    def ours(address: str | None) -> bool:
        return address is not None and address.lower() in names

    @web.middleware
    async def guard(request, handler):
        origin = request.headers.get("Origin")
        if not ours(urlsplit("//" + request.host).hostname) or (
            origin is not None and not ours(urlsplit(origin).hostname)
        ):
            raise web.HTTPForbidden(text="PatientFineTune answers its own page only (Host or Origin is another site's)")
        return await handler(request)

    return guard


def main(
    host: str = "127.0.0.1",
    port: int = 8080,
    model: str = "brain-wmh",
    work_dir: str = ".",
    device: str = "auto",
    data_dir: str | None = None,
    allowed_hosts: Sequence[str] = (),
    open_browser: bool = False,
) -> None:
    """Serve the app until interrupted; prints the address to open, with this start's
    secret in it. ``allowed_hosts``: more names the app answers to (see
    :func:`own_address_only`)."""
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    app = PatientFineTuneWeb(model=model, work_dir=work_dir, device=device, data_dir=data_dir)
    secret = secrets.token_urlsafe(24)
    app.server.cli.set_defaults(authKey=secret)  # wslink's default ("wslink-secret") is public
    app.server.controller.on_server_bind.add(
        lambda wslink_server: wslink_server.app.middlewares.append(own_address_only(host, allowed_hosts))
    )
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    app.server.controller.on_server_ready.add(
        lambda **_: print(
            f"PatientFineTune web app: open http://{shown}:{app.server.port}/?secret={secret} "
            f"(the secret admits this browser; the app reads images in {app.data_dir} only)",
            flush=True,
        )
    )
    app.server.start(host=host, port=port, open_browser=open_browser, show_connection_info=False)
