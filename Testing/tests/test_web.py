"""The web app (trame-slicer): the upstream Paint defect and its workaround on the real
segment editor, then the whole workflow end to end in headless Chromium.

The browser test needs the system Chromium (Debian package ``chromium``); it is skipped
where that is missing unless ``PFT_REQUIRE_BROWSER=1`` (CI sets it), which turns the skip
into a failure. Screenshots go to ``$PFT_ARTIFACTS`` (default ``Testing/artifacts/web``).
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("trame_slicer", reason="the web extra is not installed")
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("PFT_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts" / "web"))


@pytest.fixture
def editor_with_views_created_after_paint():
    """A trame-slicer scene whose Paint parameters exist before its slice view: the order
    that leaves the pipeline without a view in trame-slicer 2.0.0. Yields (app, Paint's
    effect type).

    These are the suite's only OpenGL contexts in its own process (Mesa's EGL). At the end
    the view's context is released and trame's registry forgets the server: left for the
    interpreter's teardown, a context is destroyed in no set order after the libraries it
    needs, which can crash the process after every test passed.
    """
    from trame.app import get_server
    from trame.app.core import AVAILABLE_SERVERS
    from trame.ui.vuetify3 import SinglePageLayout
    from trame_slicer.core import LayoutManager, SlicerApp
    from trame_slicer.rca_view import register_rca_factories
    from trame_slicer.segmentation import SegmentationEffectPaint
    from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

    from PatientFineTuneLib.mrml import add_lesion_segmentation, image_to_volume

    server_name = f"defect-{time.monotonic_ns()}"
    server = get_server(server_name, client_type="vue3")
    app = SlicerApp()
    register_rca_factories(app.view_manager, server)
    volume = image_to_volume(
        sitk.GetImageFromArray(np.random.default_rng(0).random((8, 32, 32), dtype=np.float32)), app.scene, "volume"
    )
    segmentation = add_lesion_segmentation(app.scene, np.zeros((8, 32, 32), bool), volume, "lesions")
    editor = app.segmentation_editor
    editor.set_active_segmentation(segmentation, volume)
    editor.set_active_effect_type(SegmentationEffectPaint)  # Paint's parameters enter the scene
    editor.set_active_effect(None)
    layouts = LayoutManager(app.scene, app.view_manager, server)
    layouts.register_layout("axial", Layout(LayoutDirection.Horizontal, [ViewLayoutDefinition.axial_view()]))
    layouts.set_layout("axial")
    with SinglePageLayout(server) as ui, ui.content:
        layouts.initialize_layout_grid(ui)  # the view, and Paint's pipeline for it, appear now
    yield app, SegmentationEffectPaint
    app.view_manager.get_view(ViewLayoutDefinition.axial_view().singleton_tag).finalize()
    AVAILABLE_SERVERS.pop(server_name)


def test_upstream_paint_defect_is_still_there(editor_with_views_created_after_paint):
    """When this fails, trame-slicer has fixed the defect: drop reattach_effect_pipelines."""
    app, paint = editor_with_views_created_after_paint
    with pytest.raises(AttributeError, match="paint_interaction_stopped"):
        app.segmentation_editor.set_active_effect_type(paint)


def test_reattaching_the_pipelines_makes_paint_work(editor_with_views_created_after_paint):
    from PatientFineTuneLib.web import reattach_effect_pipelines

    app, paint = editor_with_views_created_after_paint
    assert reattach_effect_pipelines(app) == 1
    effect = app.segmentation_editor.set_active_effect_type(paint)
    pipelines = [p() for p in effect.pipelines if p() is not None]
    assert pipelines and all(p.widget is not None and p._view is not None for p in pipelines)
    assert reattach_effect_pipelines(app) == 0


def test_the_lesion_table_rows_are_in_ras():
    from PatientFineTuneLib.web import lesion_table_rows

    rows = lesion_table_rows(
        [
            {
                "id": 1,
                "volume_mm3": 12.34,
                "centroid_x_mm": 10.0,
                "centroid_y_mm": -20.0,
                "centroid_z_mm": 5.0,
                "mean_probability": 0.8,
                "mean_sd": float("nan"),
            }
        ]
    )
    assert rows == [{"id": 1, "volume": "12.3", "ras": "-10.0, 20.0, 5.0", "probability": "0.80", "sd": ""}]


# ---------------------------------------------------------------------------------------
# End to end in the browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _printed_url(log: Path, port: int) -> str | None:
    """The address the app printed to open, with its secret (None until it has)."""
    import re

    found = re.search(rf"http://127\.0\.0\.1:{port}/\?secret=[A-Za-z0-9_-]+", log.read_text())
    return found.group(0) if found else None


@pytest.fixture(scope="module")
def web_server(tmp_path_factory, small_pair_dir):
    if not Path(CHROMIUM).is_file():
        if os.environ.get("PFT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"no Chromium at {CHROMIUM}: install the Debian package chromium")
        pytest.skip("no system Chromium (apt-get install chromium); CI runs this test")
    pytest.importorskip("playwright")
    work = tmp_path_factory.mktemp("web")
    # "Load sample patient" loads the sample it finds in the work folder: here the small
    # pair of the same seed, so that every step runs on about a sixth of the pixels
    # (generating the full-size sample is tested on its own:
    # test_the_sample_patient_is_generated_once)
    shutil.copytree(small_pair_dir, work / "sample-wmh-0")
    port = _free_port()
    log = open(work / "server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "PatientFineTuneLib.cli",
            "web",
            "--port",
            str(port),
            "--work",
            str(work),
            "--device",
            "cpu",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while not (url := _printed_url(work / "server.log", port)):  # the address with this start's secret
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail("the web app did not start:\n" + (work / "server.log").read_text()[-3000:])
        time.sleep(0.5)
    urllib.request.urlopen(url, timeout=10)
    yield url
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a worker thread still busy: do not leave it running
        server.kill()
        server.wait()
    log.close()


@pytest.mark.slow
def test_whole_workflow_in_headless_chromium(web_server):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    timings, outside = {}, []

    def only_localhost(route):
        host = route.request.url.split("/")[2].split(":")[0]
        if host == "127.0.0.1":
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        page.route("**/*", only_localhost)

        def step(name, action, done, timeout_s):
            """Do ``action``, wait until ``done`` (a selector, or a JS predicate), time it."""
            start = time.perf_counter()
            action()
            if done.startswith("() =>"):
                page.wait_for_function(done, timeout=timeout_s * 1000)
            else:
                page.wait_for_selector(done, timeout=timeout_s * 1000)
            timings[name] = round(time.perf_counter() - start, 1)
            page.wait_for_timeout(500)  # let the views' next frame arrive before the screenshot
            page.screenshot(path=str(ARTIFACTS / f"{len(timings)}-{name}.png"))

        step("open", lambda: page.goto(web_server), "#load-sample", 60)
        step(
            "load-sample",
            lambda: page.click("#load-sample"),
            "() => document.querySelector('#status').innerText.startsWith('Loaded')",
            120,
        )
        step("analyse-baseline", lambda: page.click("#analyse"), ".suggestion", 300)
        suggestion = page.locator(".suggestion").nth(0).inner_text().lower()
        step(
            "jump-to-suggestion",
            lambda: page.locator(".suggestion").nth(0).click(),
            "() => document.querySelector('#current-slice').innerText.includes('suggested slice')",
            30,
        )
        assert suggestion.split()[1] in page.inner_text("#current-slice")

        before = int(page.inner_text("#annotation-voxels"))
        page.click("#tool-paint")
        box = page.locator(".layout-grid-item").nth(0).bounding_box()
        x, y = box["x"] + 0.45 * box["width"], box["y"] + 0.45 * box["height"]

        def stroke():
            page.mouse.move(x, y)
            page.mouse.down()
            for k in range(1, 9):
                page.mouse.move(x + 5 * k, y + 2 * k)
                page.wait_for_timeout(40)
            page.mouse.up()

        step(
            "paint-stroke",
            stroke,
            f"() => parseInt(document.querySelector('#annotation-voxels').innerText) > {before}",
            30,
        )
        after = int(page.inner_text("#annotation-voxels"))
        assert after > before

        page.fill("#iterations", "5000")
        step(
            "cancel",
            lambda: (
                page.click("#finetune"),
                page.wait_for_selector("#progress", state="visible"),
                page.click("#cancel"),
            ),
            "() => document.querySelector('#status').innerText.includes('cancelled')",
            60,
        )
        assert page.locator("#lesion-table").count() == 0  # nothing kept

        page.fill("#iterations", "10")
        page.fill("#mc-samples", "3")
        step("finetune-and-segment", lambda: page.click("#finetune"), "#lesion-table", 600)
        assert page.is_checked("#uncertainty-switch")
        assert "Uncertainty SD" in page.inner_text("#overlay")  # what the server's follow-up view shows
        result = page.inner_text("#result-text")
        assert "lesions" in result and "max SD" in result
        assert "Follow-up (fine-tuned)" in result and "Follow-up (base)" in result
        assert "held-out" in page.inner_text("#status")  # the never-worse check's outcome, said plainly
        rows = page.locator("#lesion-table tbody tr").count()
        assert rows >= 1
        # the uncertainty overlay's colour legend, with the map's maximum
        assert page.is_visible("#uncertainty-legend") and float(page.inner_text("#legend-max")) > 0
        page.locator("#lesion-table").scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / f"{len(timings)}-lesion-table.png"))
        # the base model's result, on the same switch
        page.click("#show-base")
        page.wait_for_function("() => document.querySelector('#overlay').innerText.includes('(base)')", timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / f"{len(timings)}-base-result.png"))
        page.click("#uncertainty-switch")
        page.wait_for_selector("#uncertainty-legend", state="detached", timeout=60_000)
        # the patient's report, served by the app
        href = page.get_attribute("#report-link", "href")
        report = browser.new_page()
        report.route("**/*", only_localhost)
        report.goto(web_server.split("?")[0] + href.lstrip("/"))
        assert "Never-worse check" in report.inner_text("body") and report.locator("img").count() >= 1
        report.screenshot(path=str(ARTIFACTS / f"{len(timings)}-report.png"), full_page=True)
        browser.close()
    print(
        f"\nweb workflow step times (s): {timings}; annotation {before} -> {after} voxels; {rows} table rows; {result}"
    )
    assert not outside, f"the page asked for outside hosts: {outside}"


def test_the_sample_patient_is_generated_once(tmp_path):
    """The sample behind "Load sample patient": a brain-wmh pair, FLAIR and T1 per visit,
    generated into the work folder the first time and read from there after."""
    from PatientFineTuneLib.images import read_image
    from PatientFineTuneLib.web import sample_patient

    files = sample_patient(tmp_path)
    assert [[f.name for f in files[v]] for v in ("baseline", "followup")] == [["FLAIR.nii.gz", "T1.nii.gz"]] * 2
    written = {f: f.stat().st_mtime_ns for visit in files.values() for f in visit}
    assert read_image(files["baseline"][0]).GetSize() == read_image(files["followup"][1]).GetSize()
    assert sample_patient(tmp_path) == files
    assert {f: f.stat().st_mtime_ns for f in written} == written


def test_loading_a_study_checks_the_files_and_fills_both_views(small_pair_dir, tmp_path):
    from PatientFineTuneLib.web import BASELINE_VIEW, FOLLOWUP_VIEW, PatientFineTuneWeb

    app = PatientFineTuneWeb(server=f"load-{time.monotonic_ns()}", work_dir=tmp_path, device="cpu")
    flair, t1 = (small_pair_dir / "baseline" / f"{s}.nii.gz" for s in ("FLAIR", "T1"))
    app.load_study([flair, t1, t1], [flair, t1])
    assert "give 1 to 2 file(s) for each visit" in app.state.error and not app.state.loaded
    app.load_study(
        [small_pair_dir / "baseline" / "FLAIR.nii.gz", tmp_path / "missing.nii.gz"],
        [small_pair_dir / "followup" / s for s in ("FLAIR.nii.gz", "T1.nii.gz")],
    )
    assert "missing.nii.gz" in app.state.error and not app.state.loaded
    # the shipped brain-wmh model's T1 is optional: a FLAIR-only study loads
    assert "FLAIR, T1 (T1 optional)" in app.state.model_info
    app.load_study([small_pair_dir / "baseline" / "FLAIR.nii.gz"], [small_pair_dir / "followup" / "FLAIR.nii.gz"])
    assert app.state.loaded and not app.state.error and [len(v) for v in app.volumes.values()] == [1, 1]
    app.load_study(
        *[[small_pair_dir / visit / f"{s}.nii.gz" for s in ("FLAIR", "T1")] for visit in ("baseline", "followup")]
    )
    assert app.state.loaded and not app.state.error
    assert app.view(BASELINE_VIEW).get_background_volume_id() == app.volumes["baseline"][0].GetID()
    assert app.view(FOLLOWUP_VIEW).get_background_volume_id() == app.volumes["followup"][0].GetID()


# ---------------------------------------------------------------------------------------
# A stranger cannot drive the app: a real client from a foreign origin against the real app


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory):
    """The web app as started from the command line, on 127.0.0.1; yields (port, what it
    printed so far: the function reads its log again)."""
    work = tmp_path_factory.mktemp("guarded")
    port = _free_port()
    log_path = work / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "PatientFineTuneLib.cli",
                "web",
                "--port",
                str(port),
                "--work",
                str(work),
                "--device",
                "cpu",
                "--allow-host",
                "reading-room.example",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while "secret=" not in log_path.read_text() and not _answers(port):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail("the web app did not start:\n" + log_path.read_text()[-3000:])
        time.sleep(0.5)
    yield port, log_path.read_text
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _answers(port) -> bool:
    try:
        _http(port, "/")
        return True
    except OSError:
        return False


def _http(port, path, host=None, origin=None):
    """One real HTTP request with the given Host and Origin headers; (status, body)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Host": host or f"127.0.0.1:{port}", **({"Origin": origin} if origin else {})}
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


def _hello(port, secret, origin):
    """A real WebSocket client: the upgrade (with ``origin``) and wslink's hello with
    ``secret``; returns the upgrade's status and, when it was accepted, the reply."""
    import asyncio

    import aiohttp
    import msgpack
    from wslink.chunking import UnChunker, generate_chunks

    async def run():
        async with aiohttp.ClientSession() as session:
            try:
                ws = await session.ws_connect(f"http://127.0.0.1:{port}/ws", headers={"Origin": origin})
            except aiohttp.WSServerHandshakeError as refused:
                return refused.status, None
            async with ws:
                message = msgpack.packb(
                    {
                        "wslink": "1.0",
                        "id": "system:c0:0",
                        "method": "wslink.hello",
                        "args": [{"secret": secret}],
                        "kwargs": {},
                    }
                )
                for chunk in generate_chunks(message, 0):
                    await ws.send_bytes(chunk)
                reply = await ws.receive(timeout=30)
                return 101, UnChunker().process_chunk(reply.data)

    return asyncio.run(run())


def test_a_foreign_origin_or_host_is_refused(guarded_server):
    """A web page from another site (its Origin) or a DNS-rebound name (its Host) gets
    neither the page nor the WebSocket; the app's own address gets both."""
    port, _ = guarded_server
    own = f"http://127.0.0.1:{port}"
    assert _http(port, "/index.html")[0] == 200
    assert _http(port, "/index.html", host="evil.example")[0] == 403
    assert _http(port, "/index.html", host=f"evil.example:{port}", origin="http://evil.example")[0] == 403
    assert _http(port, "/index.html", origin="http://evil.example")[0] == 403
    assert _hello(port, "wslink-secret", "http://evil.example")[0] == 403
    assert _hello(port, "wslink-secret", own)[0] == 101  # the upgrade itself is for the app's own page
    # a name the user allowed (--allow-host: the address a reverse proxy forwards) is the app's own too
    assert _http(port, "/index.html", host="reading-room.example", origin="https://reading-room.example")[0] == 200


def test_the_websocket_needs_the_secret_printed_at_start(guarded_server):
    """The framework's public default secret is refused; the random one in the printed
    URL is accepted."""
    import re

    port, printed = guarded_server
    found = re.search(rf"http://127\.0\.0\.1:{port}/\?secret=([A-Za-z0-9_-]{{20,}})", printed())
    assert found, printed()  # 32 random URL-safe characters
    own = f"http://127.0.0.1:{port}"
    status, reply = _hello(port, "wslink-secret", own)
    assert status == 101 and "error" in reply and "clientID" not in reply.get("result", {}), reply
    status, reply = _hello(port, found.group(1), own)
    assert status == 101 and "clientID" in reply["result"], reply


def test_only_files_in_the_data_folder_load_and_the_error_does_not_say_what_exists(small_pair_dir, tmp_path):
    """A path outside the folder the app may read is refused with the same words whether
    or not it exists (the text must not tell a stranger which files are there)."""
    from PatientFineTuneLib.web import PatientFineTuneWeb

    app = PatientFineTuneWeb(server=f"scope-{time.monotonic_ns()}", work_dir=tmp_path, device="cpu")
    inside = [
        ",".join(str(small_pair_dir / visit / f"{s}.nii.gz") for s in ("FLAIR", "T1"))
        for visit in ("baseline", "followup")
    ]
    errors = []
    for outside in (small_pair_dir / "baseline" / "FLAIR.nii.gz", Path("/etc/hostname"), Path("/no/such/file.nii.gz")):
        app.state.update(
            {"baseline_paths": f"{outside},{small_pair_dir / 'baseline' / 'T1.nii.gz'}", "followup_paths": inside[1]}
        )
        app.load_files()
        assert not app.state.loaded
        errors.append(app.state.error.replace(str(outside), "PATH"))
    assert len(set(errors)) == 1 and "only files inside" in errors[0], errors
    (tmp_path / "link.nii.gz").symlink_to(
        small_pair_dir / "baseline" / "FLAIR.nii.gz"
    )  # a link inside that leads outside
    app.state.update({"baseline_paths": f"link.nii.gz,{small_pair_dir / 'baseline' / 'T1.nii.gz'}"})
    app.load_files()
    assert not app.state.loaded and "only files inside" in app.state.error
    app = PatientFineTuneWeb(
        server=f"scope-{time.monotonic_ns()}", work_dir=tmp_path, data_dir=small_pair_dir, device="cpu"
    )
    app.state.update({"baseline_paths": inside[0], "followup_paths": inside[1]})
    app.load_files()
    assert app.state.loaded and not app.state.error


@pytest.mark.parametrize(
    "iterations, samples, words",
    [
        (0, 25, "Iterations must be at least 1"),
        (100, 1, "MC samples must be 0"),
        ("ten", 25, "whole number"),
        (100, 2.5, "whole number"),
    ],
)
def test_the_pages_numbers_are_checked_before_any_work(iterations, samples, words):
    """Iterations 0 gave an internal message, MC samples 1 was refused only after the
    whole fine-tune."""
    from PatientFineTuneLib.web import run_settings

    with pytest.raises(ValueError, match=words):
        run_settings(iterations, samples)
    assert run_settings(100.0, 0) == (100, 0)


def test_the_status_line_says_when_a_long_step_failed(tmp_path):
    """It stayed at "Fine-tuning..." after a failure, beside the error."""
    import asyncio

    from PatientFineTuneLib.web import PatientFineTuneWeb

    app = PatientFineTuneWeb(server=f"status-{time.monotonic_ns()}", work_dir=tmp_path, device="cpu")

    def work(progress, cancelled):
        from PatientFineTuneLib.images import read_image

        return read_image(tmp_path / "gone.nii.gz")  # a real failure of the step: the file is not there

    assert asyncio.run(app._run("Fine-tuning", work)) is None
    assert app.state.error.startswith("Fine-tuning failed") and "failed" in app.state.status and not app.state.busy, (
        app.state.status
    )
