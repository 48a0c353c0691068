"""`expertmesh serve`: bring the model up (in-process or on expert workers) and serve gRPC."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from pathlib import Path

from expertmesh.api.admin_service import AdminService, placement_to_proto
from expertmesh.api.metrics import Metrics
from expertmesh.cluster.bringup import UsageError, progress, start_engine
from expertmesh.cluster.controller import AutoscaleSettings, Controller
from expertmesh.core.chat import load_chat_template
from expertmesh.core.checkpoint import Checkpoint
from expertmesh.core.tokenizer import load_tokenizer
from expertmesh.core.tool_format import ToolFormat
from expertmesh.flags import serving_config
from expertmesh.v1 import generation_pb2 as pb


def model_info(name: str, config, cluster, fleet=None) -> pb.ModelInfo:
    info = pb.ModelInfo(model_name=name, vocab_size=config.vocab_size, max_context=config.max_position_embeddings,
                        num_layers=config.num_layers, num_experts=config.num_experts,
                        experts_per_token=config.experts_per_token, hidden_size=config.hidden_size)
    if cluster is not None:
        for w in placement_to_proto(cluster.placement()).workers:
            info.workers.append(pb.WorkerPlacement(worker=w.worker, experts=w.experts))
    if fleet is not None:
        for r in fleet.routers():
            info.routers.append(pb.RouterInfo(**r))
    return info


class GatewayThread:
    """The gRPC gateway on an asyncio loop of its own thread, so that the engine loop can run on
    the main thread (the one that loaded the model; see ServingEngine)."""

    def __init__(self, service, serving, args, token: str | None, tls, count=None):
        self.serving = serving
        self.args = args
        self.warmed = False
        self.http_port: int | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._count = count  # count(method, code) as each gRPC call ends, with --metrics-port
        self.thread = threading.Thread(target=self._main, args=(service, token, tls), name="expertmesh-gateway",
                                       daemon=True)
        self.thread.start()
        self._ready.wait()
        if self._error:
            raise self._error

    def _main(self, service, token, tls) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve(service, token, tls))

    async def _serve(self, service, token, tls) -> None:
        from expertmesh.api.gateway import set_health, start_gateway

        self._stop = asyncio.Event()
        http_server = http_task = None
        try:
            generation, admin, http_app = service
            server, self.port, self._health = await start_gateway(
                generation, self.args.host, self.args.port, admin=admin, auth_token=token, tls=tls,
                max_message_bytes=self.args.max_message_bytes, count=self._count)
            if http_app is not None:
                http_server, sock = self._http_server(http_app)
                self.http_port = sock.getsockname()[1]
                http_task = asyncio.ensure_future(http_server.serve(sockets=[sock]))
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():  # health follows the engine: NOT_SERVING while it cannot step
                await set_health(self._health, self.serving_now())
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
            progress(f"stopping: finishing in-flight streams for up to {self.args.grace:.0f}s")
        finally:
            await set_health(self._health, False)
            await self._drain(service[0], self.args.grace)  # both ports open: new calls are refused, retryable
            if http_server is not None:  # stops accepting; what is left gets uvicorn's grace
                http_server.should_exit = True
            await server.stop(0)
            if http_task is not None:
                await asyncio.wait([http_task], timeout=self.args.grace)
            self.serving.stop()  # ends the engine loop on the main thread

    @staticmethod
    async def _drain(generation, grace: float) -> None:
        """Streams in flight on either door finish (for up to `grace` seconds) while the ports stay
        open and every new call gets UNAVAILABLE or 503 (a stopping gRPC server would answer some
        CANCELLED, which clients do not retry)."""
        drain = generation.drain
        drain.draining = True
        deadline = time.monotonic() + grace
        while drain.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _http_server(self, app):
        """uvicorn for the HTTP API on its own listening socket (so port 0 picks a free one)."""
        import socket

        import uvicorn

        sock = socket.socket(socket.AF_INET6 if ":" in self.args.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.args.host, self.args.http_port))
        sock.listen(128)
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=self.args.grace,
                                ssl_certfile=self.args.tls_cert, ssl_keyfile=self.args.tls_key)
        return uvicorn.Server(config), sock

    def serving_now(self) -> bool:
        """SERVING: warmed up, the expert path intact, and no step stuck past --stall-timeout."""
        return self.warmed and self.serving.healthy and not self.serving.stalled(self.args.stall_timeout)

    def mark_warmed(self) -> None:
        """The engine has run a real step: health says SERVING from now on (and before we return)."""
        from expertmesh.api.gateway import set_health

        self.warmed = True
        asyncio.run_coroutine_threadsafe(set_health(self._health, self.serving_now()), self._loop).result(10)

    def begin_shutdown(self, *_signal_args) -> None:
        """Graceful stop; safe from a signal handler."""
        self._loop.call_soon_threadsafe(self._stop.set)


def cmd_serve(args) -> int:
    from expertmesh.api.gateway import GenerationService
    from expertmesh.core.tiny_checkpoint import default_model_dir
    from expertmesh.router.sampling import SamplingParams
    from expertmesh.router.serving import ServingEngine

    logging.basicConfig(level=logging.WARNING)
    if args.model:
        model_dir = Path(args.model)
    else:
        progress("no --model given: using the tiny Mixtral (created once, cached)")
        model_dir = default_model_dir()
    token, tls = door_security(args)
    settings = serving_config(args)
    autoscale = autoscale_settings(args)
    if args.routers < 1:
        raise UsageError("--routers must be >= 1")
    if (args.routers > 1 or args.autoscale_routers) and args.workers < 1:
        raise UsageError("--routers N > 1 and --autoscale-routers need expert workers (--workers N, N >= 1): "
                         "routers share their pool")
    router_scaling = router_scaling_settings(args)
    names = args.served_model_name or [model_dir.name]
    # the tokenizer first: a missing or broken one fails before minutes of weight loading
    config = Checkpoint(model_dir).config
    tokenizer = load_tokenizer(model_dir, config.bos_token_id, config.eos_token_id)
    engine, cluster = start_engine(model_dir, settings, args.workers, args.replicas, args.placement, args.address)
    controller = fleet = router_controller = None
    try:
        serving = ServingEngine(engine, tokenizer, settings, own_thread=False, control=cluster)
        front = serving  # what both doors submit to: router 0 alone (--workers 0), or the fleet
        if cluster is not None:
            fleet = front = start_fleet(serving, cluster, settings, args.routers, args.router_resource)
        generation = GenerationService(front, tokenizer, load_chat_template(model_dir),
                                       lambda: model_info(names[0], config, cluster, fleet),
                                       tool_format=ToolFormat.load(model_dir))
        if autoscale is not None:
            controller = Controller(cluster, autoscale)
        if cluster is None:
            admin = AdminService(None, None, None)
        else:
            admin = AdminService(cluster.placement, cluster.scale_replicas, cluster.scale_workers,
                                 pin=None if controller is None else lambda on: setattr(controller, "pinned", on),
                                 scale_routers=fleet.scale)
        metrics = metrics_port = None
        if args.metrics_port is not None:
            metrics = Metrics(model_name=names[0], per_expert=args.metrics_per_expert)
            serving.metrics = metrics
            metrics.watch_serving(serving)
            if cluster is not None:
                cluster.metrics = metrics
                metrics.watch_cluster(cluster)
                metrics.watch_fleet(fleet)
            metrics_port = metrics.serve(args.host, args.metrics_port)
        gateway = open_doors(args, generation, admin, front, names, token, tls, metrics)
        # One real step before saying SERVING: the whole path (and every worker) works.
        serving.generate([[config.bos_token_id]], SamplingParams(max_new_tokens=1))
        gateway.mark_warmed()
        target = announce(args, gateway, f"serving {model_dir}", tls, token, metrics_port)
        if fleet is not None:
            import ray

            address = ray.get_runtime_context().gcs_address
            print(f"expertmesh Ray cluster at {address} (more front doors: expertmesh gateway --cluster {address})",
                  flush=True)
        if controller is not None:
            controller.start()
            progress(f"autoscaling between {autoscale.min_workers} and {autoscale.max_workers} workers, "
                     f"window {autoscale.window_s:g}s")
        if router_scaling is not None:
            from expertmesh.api.router_controller import RouterController

            router_controller = RouterController(fleet, router_scaling).start()
            progress(f"autoscaling between {router_scaling.min_routers} and {router_scaling.max_routers} routers, "
                     f"window {router_scaling.window_s:g}s")
        print(f"try: expertmesh generate --target {target} \"The capital of France is\"", flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, gateway.begin_shutdown)
        serving.run()  # the engine loop, on this thread, until the gateway has stopped
        gateway.thread.join(timeout=args.grace + 30)
    finally:
        if router_controller is not None:
            router_controller.stop()
        if controller is not None:
            controller.stop()
        if fleet is not None:
            fleet.stop()
        if cluster is not None and not _shutdown_within(cluster, CLUSTER_SHUTDOWN_S):
            # Ray's own processes are going too (a SIGTERM to the whole process group): its calls
            # would wait a minute for a GCS that is gone. Nothing is left to hand back.
            progress(f"Ray did not answer within {CLUSTER_SHUTDOWN_S:g}s (its processes are stopping too): "
                     "exiting without its teardown")
            logging.shutdown()
            os._exit(0)
    return 0


def open_doors(args, generation, admin, front, names, token, tls, metrics) -> GatewayThread:
    """The gRPC door (generation, admin) and, unless --no-http, the OpenAI HTTP door over `front`
    (router 0 alone, or a fleet), sharing auth, limits, drain and the metrics' request counts."""
    http_app = None
    if args.http:
        from expertmesh.api.http_api import OpenAIApi

        http_app = OpenAIApi(front, generation.prompts, names, lambda: gateway.serving_now(), generation.prepare,
                             auth_token=token, max_body_bytes=args.max_message_bytes,
                             count=metrics and metrics.counter_of("http"), drain=generation.drain).app()
    gateway = GatewayThread((generation, admin, http_app), front, args, token, tls,
                            count=metrics and metrics.counter_of("grpc"))
    return gateway


def door_security(args) -> tuple[str | None, tuple[bytes, bytes] | None]:
    """The bearer token and the TLS (certificate, key) the door flags name."""
    token = args.auth_token
    if args.auth_token_file:
        token = Path(args.auth_token_file).read_text().strip()
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise UsageError("--tls-cert and --tls-key go together")
        tls = (Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes())
    return token, tls


def announce(args, gateway, what: str, tls, token, metrics_port: int | None) -> str:
    """Say where the doors listen; -> the gRPC target."""
    target = f"{args.host}:{gateway.port}"
    print(f"expertmesh {what} on {target} (gRPC{', TLS' if tls else ''}{', bearer token' if token else ''})",
          flush=True)
    if gateway.http_port is not None:
        print(f"expertmesh HTTP (OpenAI API) on {'https' if tls else 'http'}://{args.host}:{gateway.http_port}/v1",
              flush=True)
    if metrics_port is not None:
        print(f"expertmesh metrics on http://{args.host}:{metrics_port}/metrics", flush=True)
    return target


CLUSTER_SHUTDOWN_S = 3.0  # a live Ray lets workers go in well under a second


def start_fleet(serving, cluster, settings, routers: int, resource: str | None = None):
    """The gateway's fleet over router 0 (`serving`), the routers a lost serve process left (adopted
    by the cluster: cluster/rebuild.py), and new router actors up to `routers` in all, over the
    cluster's workers; `scale --routers` adds and drains more."""
    from expertmesh.api.router_fleet import POLL_WAIT_S, RouterFleet
    from expertmesh.cluster.router_actor import start_routers

    kv_blocks = serving.engine.cache.num_blocks  # every router as big as router 0

    def start(ids: list[int]) -> list:
        progress(f"starting {len(ids)} more router(s) as Ray actors")
        return start_routers(cluster, ids, kv_blocks, resource)

    adopted = list(cluster.adopted_routers)
    first = max((h.router for h in adopted), default=0) + 1
    more = list(range(first, first + routers - 1 - len(adopted)))
    # a poll that has nothing returns after POLL_WAIT_S: one unanswered past the heartbeat timeout is a stall
    return RouterFleet(serving, adopted + (start(more) if more else []),
                       router_deadline_s=settings.heartbeat_timeout_s + POLL_WAIT_S, block_size=settings.block_size,
                       local_epoch=lambda: cluster.epoch, on_lost=cluster.forget_router, start=start)


def _shutdown_within(cluster, seconds: float) -> bool:
    """cluster.shutdown(), given `seconds`; False when it did not end in time."""
    thread = threading.Thread(target=cluster.shutdown, name="expertmesh-shutdown", daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


def router_scaling_settings(args):
    """The router controller's settings from serve's flags; None without --autoscale-routers."""
    if not args.autoscale_routers:
        return None
    from expertmesh.api.router_controller import RouterScaling

    try:
        return RouterScaling(min_routers=args.min_routers, max_routers=args.max_routers or 2 * args.routers,
                             window_s=args.scale_window, scale_up_waiting=args.router_scale_up_waiting,
                             scale_up_kv=args.router_scale_up_kv, scale_down_kv=args.router_scale_down_kv,
                             scale_down_delay_s=args.scale_down_delay)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def autoscale_settings(args) -> AutoscaleSettings | None:
    """The controller's settings from serve's flags; None without --autoscale."""
    if not args.autoscale:
        return None
    if args.workers < 1:
        raise UsageError("--autoscale needs expert workers (--workers N, N >= 1)")
    try:
        return AutoscaleSettings(min_workers=args.min_workers, max_workers=args.max_workers or 2 * args.workers,
                                 window_s=args.scale_window, scale_up_busy=args.scale_up_busy,
                                 scale_down_busy=args.scale_down_busy, scale_down_delay_s=args.scale_down_delay)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
