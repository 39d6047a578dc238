"""The verbs around the workflow: ``info`` (a model file's metadata or card), ``demo`` (the
whole workflow on a generated patient) and ``web`` (the browser front end)."""

from __future__ import annotations

import json

from ..files import check_output_folder
from ..modelcard import resolve_model_path
from .common import add_verb, count_at_least, mc_sample_count, report_result


def register(sub) -> None:
    p = add_verb(sub, "info", cmd_info, "Show a model file's metadata (after verifying it).")
    p.add_argument("model", help="model file, or a shipped preset name (brain-wmh, brain-tumor, liver-metastases)")
    p.add_argument("--card", action="store_true", help="print the model card (Markdown) instead of the metadata")

    p = add_verb(
        sub,
        "demo",
        cmd_demo,
        "The whole workflow on a synthetic patient: suggest, fine-tune, segment the follow-up with uncertainty.",
    )
    p.add_argument("--out", default="demo-output")
    p.add_argument("--model", default="brain-wmh", help="base model file (default: the shipped brain-wmh model)")
    p.add_argument("--iterations", type=count_at_least(1), default=100, help="fine-tuning iterations")
    p.add_argument("--mc-samples", type=mc_sample_count, default=25)
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the generated patient, the fine-tuning and the MC masks"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")

    p = add_verb(sub, "web", cmd_web, "Serve the workflow as a web app (trame-slicer; needs the web extra).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model", default="brain-wmh", help="base model file or shipped preset name")
    p.add_argument("--work", default=".", help="folder for the generated sample patient")
    p.add_argument(
        "--data", help="the folder whose image files the page may load (default: --work); nothing outside it is read"
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another name the app answers to, e.g. the one a reverse proxy forwards (repeat for each); "
        "requests for any other Host or from any other Origin are refused",
    )
    p.add_argument("--device", default="auto")


def cmd_info(args) -> None:
    from ..model import count_parameters
    from ..modelfile import load_model

    bundle = load_model(resolve_model_path(args.model))
    if args.card:
        from ..modelcard import render_card

        card = render_card(bundle.metadata, count_parameters(bundle.model))
        print(card)
        report_result(args, "info", {}, card=card)
        return
    print(json.dumps(bundle.metadata | {"parameters": count_parameters(bundle.model)}, indent=2))
    report_result(args, "info", {}, metadata=bundle.metadata, parameters=count_parameters(bundle.model))


def cmd_demo(args) -> None:
    from ..demo import run_demo

    out = check_output_folder(args.out)
    summary = run_demo(
        out,
        overwrite=args.overwrite,
        model=resolve_model_path(args.model),
        device=args.device,
        finetune_iterations=args.iterations,
        mc_samples=args.mc_samples,
        seed=args.seed,
    )
    report_result(args, "demo", {"folder": out, "summary": out / "demo-summary.json"}, summary=summary)


def cmd_web(args) -> None:
    import importlib.util

    if importlib.util.find_spec("trame_slicer") is None:
        raise RuntimeError('the web app needs trame-slicer: pip install -e ".[web]"')
    from ..web import main as serve

    serve(
        host=args.host,
        port=args.port,
        model=args.model,
        work_dir=args.work,
        device=args.device,
        data_dir=args.data,
        allowed_hosts=args.allow_host,
    )
