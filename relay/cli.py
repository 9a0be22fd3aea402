"""`relay serve [--config FILE] [--host H] [--port P] [--public-url URL] [--data-dir DIR] [--demo]` and
`relay --version`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import secrets
import signal
import sys

from aiohttp import web

from . import __version__
from .api.app import Runner, create_app
from .cluster.node import JoinError
from .config import ConfigError, Settings, load_config
from .demo import DemoHost
from .web import SESSIONS

try:  # optional: a faster event loop where it is installed
    import uvloop
except ImportError:
    uvloop = None


class StartupError(Exception):
    """serve cannot start (the port is taken, ...): one line for the operator, no traceback."""


LOG_FIELDS = ("connection_id", "stream_id", "broadcast_id", "spectator_id", "reason", "path")


class KeyValueFormatter(logging.Formatter):
    """One line per event, with the ids it concerns as key=value, so logs grep by id."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{k}={getattr(record, k)}" for k in LOG_FIELDS if hasattr(record, k)]
        return f"{line} {' '.join(extras)}" if extras else line


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # aioice/aiortc log every ICE check at INFO; keep the relay's own events readable.
    for noisy in ("aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relay", description=__doc__)
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the relay server")
    serve.add_argument("--config", help="TOML config file (see config.example.toml)")
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")
    # What differs between the nodes of a cluster that share one config file (README: "Run a cluster").
    serve.add_argument("--public-url", help="base URL clients and other nodes reach (overrides server.public_url)")
    serve.add_argument("--data-dir", help="recordings and jobs (overrides server.data_dir)")
    serve.add_argument("--demo", action="store_true",
                       help="open a demo broadcast that streams continuously, and print its watch URL")
    args = parser.parse_args(argv)

    try:
        settings = load_config(args.config, overrides={"server": {
            "host": args.host, "port": args.port, "public_url": args.public_url, "data_dir": args.data_dir}})
    except ConfigError as err:
        print(f"relay: bad config: {err}", file=sys.stderr)
        return 2

    generated = None
    if not settings.auth.api_keys:
        generated = "rk_" + secrets.token_urlsafe(24)
        settings = dataclasses.replace(settings, auth=dataclasses.replace(settings.auth, api_keys=(generated,)))
    setup_logging(settings.server.log_level)
    run = _uvloop_run()
    try:
        run(serve_forever(settings, generated, args.demo))
    except StartupError as err:
        print(f"relay: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _uvloop_run():
    return asyncio.run if uvloop is None else uvloop.run


async def serve_forever(settings: Settings, generated_key: str | None, demo: bool) -> None:
    app = create_app(settings)
    # The app's shutdown hook closes every socket first; what aiohttp then still waits on (a request
    # in flight) gets a fifth of the budget.
    runner = Runner(app, access_log=None, shutdown_timeout=settings.server.shutdown_seconds / 5)
    try:
        await runner.setup()
    except JoinError as exc:
        await runner.cleanup()
        raise StartupError(str(exc)) from exc
    site = web.TCPSite(runner, settings.server.host, settings.server.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(
            f"cannot listen on {settings.server.host}:{settings.server.port}: {exc.strerror or exc}"
        ) from exc
    port = runner.addresses[0][1] if runner.addresses else settings.server.port
    base = settings.server.public_url or f"http://{_display_host(settings.server.host)}:{port}"
    print(f"relay {__version__} listening on {base}", flush=True)
    print(f"  host console: {base}/host", flush=True)
    if generated_key:
        print(f"  API key (generated; set RELAY_API_KEY or [auth] api_keys to keep one): {generated_key}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:
            pass
    demo_task = None
    if demo:
        demo_host = DemoHost(app[SESSIONS], settings.auth.api_keys[0])
        watch_path = await demo_host.open()
        print(f"  demo watch URL: {base}{watch_path}", flush=True)
        if demo_host.hls_path is not None:
            print(f"  demo HLS URL:   {base}{demo_host.hls_path}", flush=True)
        demo_task = asyncio.create_task(demo_host.run(), name="relay-demo")
    try:
        await stop.wait()
    finally:
        if demo_task is not None:
            demo_task.cancel()
            await asyncio.gather(demo_task, return_exceptions=True)
        await _stop(runner, settings.server.shutdown_seconds)


async def _stop(runner: web.AppRunner, seconds: float) -> None:
    """Stop listening, tell every socket, end streams, finalize recordings (the app's shutdown and
    cleanup), and exit within `seconds` regardless: what is cut short then (a recording that could
    not finish) is recovered as partial at the next start."""
    try:
        await asyncio.wait_for(runner.cleanup(), seconds)
    except asyncio.TimeoutError:
        logging.getLogger("relay").warning("shutdown took over %g s; exiting anyway", seconds)


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


if __name__ == "__main__":
    sys.exit(main())
