"""``tpo serve``: run TPO behind an OpenAI-compatible endpoint (the server itself is ``tpo.serve``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ._common import build_models, method_options, model_options, with_errors
from .run import demo_config


@click.command("serve")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Beyond loopback the server needs --auth-keys-env (or --no-auth).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option(
    "--auth-keys-env",
    default=None,
    metavar="NAME",
    help="Environment variable holding the API keys clients must send (comma-separated). Never printed.",
)
@click.option("--no-auth", is_flag=True, help="Serve without API keys even beyond loopback (a private network only).")
@click.option(
    "--served-model-name",
    default="tpo",
    show_default=True,
    help="The model name clients ask for; NAME-MODE is served too for each other mode (only NAME-bon at --depth 0).",
)
@click.option(
    "--max-width",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Most answers per step a request may ask for (tpo.width).",
)
@click.option(
    "--max-depth",
    type=click.IntRange(min=0),
    default=8,
    show_default=True,
    help="Most improvement steps a request may ask for (tpo.depth).",
)
@click.option(
    "--max-n", type=click.IntRange(min=1), default=16, show_default=True, help="Most choices (n) per request."
)
@click.option(
    "--max-request-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Most new tokens per answer a request may ask for (max_tokens) [default: --max-tokens].",
)
@click.option(
    "--max-concurrent",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Prompts optimised at once; all share one engine, so their model calls are batched together.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=0),
    default=256,
    show_default=True,
    help="Requests that may wait for a free slot; beyond them requests get 429.",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=64),
    default=1_048_576,
    show_default=True,
    help="Largest request body; larger ones get 413.",
)
@click.option(
    "--request-timeout-s",
    type=click.FloatRange(min=0, min_open=True),
    default=600.0,
    show_default=True,
    help="Longest a request may take, queue included; then 504 with the best answer so far.",
)
@click.option(
    "--grace-s",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="On SIGTERM: how long requests in flight may still run before the server exits.",
)
@click.option(
    "--trace-log",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append every result to this JSONL file (what tpo eval and tpo report read).",
)
@click.option(
    "--max-traces",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Finished results kept in memory for GET /v1/tpo/traces/ID.",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
)
@model_options
@method_options
@with_errors
def serve_command(
    host: str,
    port: int,
    auth_keys_env: str | None,
    no_auth: bool,
    served_model_name: str,
    grace_s: float,
    trace_log: Path | None,
    log_level: str,
    **params: Any,
) -> None:
    """Serve TPO to any OpenAI client: POST /v1/chat/completions optimises the conversation's answer.

    Takes the model, reward and method options of `tpo run`; a request may change the method
    per call with an extension object, e.g. extra_body={"tpo": {"width": 3, "depth": 1}}.
    Stops on SIGTERM or Ctrl-C after the requests in flight finish. See docs/serve.md.
    """
    from ..serve import ServeLimits, check_bind, create_app, keys_from_env, run
    from ..serve._traces import check_trace_log

    keys = keys_from_env(auth_keys_env) if auth_keys_env else ()
    check_bind(host, keys, no_auth=no_auth)
    limits = ServeLimits(
        max_width=params.pop("max_width"),
        max_depth=params.pop("max_depth"),
        max_n=params.pop("max_n"),
        max_request_tokens=params.pop("max_request_tokens"),
        max_concurrent=params.pop("max_concurrent"),
        max_queue=params.pop("max_queue"),
        max_body_bytes=params.pop("max_body_bytes"),
        request_timeout_s=params.pop("request_timeout_s"),
        max_traces=params.pop("max_traces"),
    )
    config = demo_config(params)  # the demo model's replies capped, as in tpo run
    limits.check_config(config)
    if trace_log is not None:
        check_trace_log(trace_log)  # before the models load, which can take minutes
    click.echo("Loading models…", err=True)
    models = build_models(params)
    try:
        app = create_app(
            models, config, limits, api_keys=keys, trace_log=trace_log, model_name=served_model_name, close_models=True
        )
    except BaseException:
        models.close()
        raise
    server = app.state.tpo
    names = ", ".join(server.presets)
    click.echo(
        f"tpo serve: models {names} ({config.mode} width {config.width} depth {config.depth}) on "
        f"http://{_url_host(host)}:{port}/v1 · policy {server.engine.policy.name} · "
        f"reward {getattr(server.engine.reward, 'name', '?')} · "
        f"{'API keys required' if keys else 'no API keys'}",
        err=True,
    )
    run(app, host=host, port=port, grace_s=grace_s, log_level=log_level)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
