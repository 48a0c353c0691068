"""`expertmesh gateway --cluster ADDRESS`: one more front door over a running cluster's routers.

It joins the Ray cluster that `serve --routers N` runs on, reads the model's tokenizer, chat template
and limits from a router (router_actor.Router.describe: no checkpoint on this machine), and serves
gRPC and the OpenAI HTTP API through a fleet of its own over the router actors (api/router_fleet.py,
without a router 0). It holds no model state: a load balancer spreads clients over as many as it
likes, and losing one loses only its own connections (UNAVAILABLE, retryable), whose streams the
routers end once it stops polling them. Routers that start later (or under a lost one's name, after
a restart of serve) are found by name every DISCOVER_EVERY_S; one that is drained or lost is left
as its process ends, its streams continued on the others. Admin calls (scale, placement) belong to
the serve process's gateway and are refused here with FAILED_PRECONDITION.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

DISCOVER_EVERY_S = 1.0
RAY_SHUTDOWN_S = 3.0


def ray_auth_env() -> None:
    """Join a cluster with token auth (Ray's default) when this machine has its token: Ray's own
    processes know the mode, a joining driver must say it, before Ray is imported (it reads it then)."""
    if "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").exists():
        os.environ["RAY_AUTH_MODE"] = "token"


def cmd_gateway(args) -> int:
    import ray

    from expertmesh.api.admin_service import AdminService
    from expertmesh.api.gateway import GenerationService
    from expertmesh.api.metrics import Metrics
    from expertmesh.api.router_fleet import POLL_WAIT_S, RouterFleet
    from expertmesh.cluster.bringup import UsageError, progress
    from expertmesh.cluster.router_directory import find_routers
    from expertmesh.router.requests import RequestLimits
    from expertmesh.router.structured import Grammars
    from expertmesh.server import announce, door_security, model_info, open_doors

    logging.basicConfig(level=logging.WARNING)
    token, tls = door_security(args)
    try:
        ray.init(address=args.cluster, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UsageError(f"cannot join the Ray cluster at {args.cluster}: {exc}") from None
    stop = threading.Event()
    fleet = None
    try:
        model = _wait_for_model(args.wait, progress)
        config, tokenizer, settings = model["config"], model["tokenizer"], model["settings"]
        doors_model = SimpleNamespace(
            tokenizer=tokenizer, grammars=Grammars(tokenizer, config.vocab_size, config.eos_token_id),
            limits=RequestLimits(config.vocab_size, config.max_position_embeddings, model["kv_tokens"]))
        # a poll that has nothing returns after POLL_WAIT_S: one unanswered past the heartbeat timeout is a stall
        fleet = RouterFleet(None, find_routers(set()), router_deadline_s=settings.heartbeat_timeout_s + POLL_WAIT_S,
                            block_size=settings.block_size, model=doors_model)
        names = args.served_model_name or [Path(model["model_dir"]).name]
        generation = GenerationService(fleet, tokenizer, model["chat_template"],
                                       lambda: model_info(names[0], config, None, fleet),
                                       tool_format=model["tool_format"])
        admin = AdminService(None, None, None, without_cluster=(
            "this is a gateway of its own (expertmesh gateway): scale and placement are the serve process's "
            "gateway's to answer"))
        metrics = metrics_port = None
        if args.metrics_port is not None:
            metrics = Metrics(model_name=names[0])
            metrics.watch_fleet(fleet)
            metrics_port = metrics.serve(args.host, args.metrics_port)
        gateway = open_doors(args, generation, admin, fleet, names, token, tls, metrics)
        threading.Thread(target=_discover, args=(fleet, stop), name="expertmesh-discover", daemon=True).start()
        _warm_up(fleet, config.bos_token_id, settings.heartbeat_timeout_s + 60)
        gateway.mark_warmed()
        announce(args, gateway, f"gateway over {len(fleet.serving_ids())} router(s) of the cluster at {args.cluster}",
                 tls, token, metrics_port)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, gateway.begin_shutdown)
        while gateway.thread.is_alive():  # the main thread only waits here, so that signals reach it
            gateway.thread.join(timeout=0.5)
    finally:
        stop.set()
        if fleet is not None:
            fleet.stop()
        ended = threading.Thread(target=ray.shutdown, daemon=True)
        ended.start()
        ended.join(RAY_SHUTDOWN_S)
        if ended.is_alive():  # the cluster is gone (its GCS with it): Ray's calls would wait a minute
            progress(f"Ray did not answer within {RAY_SHUTDOWN_S:g}s: exiting without its teardown")
            logging.shutdown()
            os._exit(0)
    return 0


def _wait_for_model(wait_s: float, progress) -> dict:
    """What the first serving router says of the model, waiting up to `wait_s` for one."""
    from expertmesh.cluster.bringup import UsageError
    from expertmesh.cluster.router_directory import describe_model

    deadline = time.monotonic() + wait_s
    said = 0.0
    while True:
        try:
            return describe_model(timeout_s=30)
        except LookupError:
            if time.monotonic() > deadline:
                raise UsageError(f"no router of this cluster served within {wait_s:g}s: gateways serve over the "
                                 "router actors of `expertmesh serve --routers N` (N >= 2)") from None
            if time.monotonic() - said > 10:
                progress("waiting for a router of the cluster to serve (serve --routers N starts N-1 actors)")
                said = time.monotonic()
            time.sleep(1)


def _discover(fleet, stop: threading.Event) -> None:
    """Routers started after us (`scale --routers`) take requests once connected."""
    from expertmesh.cluster.router_directory import find_routers

    while not stop.wait(DISCOVER_EVERY_S):
        try:
            fresh = find_routers(fleet.serving_ids())
        except Exception:  # noqa: BLE001 - Ray busy or going: look again
            logging.getLogger("expertmesh.gateway").exception("looking for routers failed")
            continue
        if fresh:
            fleet.add(fresh)
            for h in fresh:
                print(f"expertmesh gateway: router {h.router} (pid {h.pid}) takes requests", flush=True)


def _warm_up(fleet, bos: int, timeout_s: float) -> None:
    """One real token through a router before saying SERVING."""
    from expertmesh.cluster.bringup import UsageError
    from expertmesh.router.requests import validate_request
    from expertmesh.router.sampling import SamplingParams

    done = threading.Event()
    ends: list = []

    def sink(out) -> None:
        if out.finish_reason is not None:
            ends.append(out)
            done.set()

    fleet.submit(validate_request([bos], SamplingParams(max_new_tokens=1), fleet.limits), sink)
    if not done.wait(timeout_s) or ends[0].error:
        raise UsageError(f"the routers did not answer a first request: {ends[0].error if ends else 'no answer'}")
