"""`expertmesh serve`: bring the model up (in-process or on expert workers) and serve gRPC."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
import threading
import time
from pathlib import Path

from cluster.chat import load_chat_template
from cluster.checkpoint import Checkpoint
from cluster.tokenizer import load_tokenizer
from protos.expertmesh.v1 import generation_pb2 as pb

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000 ** 2,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    """'512MiB', '2GiB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 512MiB or 2GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def progress(message: str) -> None:
    print(f"[expertmesh] {message}", file=sys.stderr, flush=True)


def build_engine(args, model_dir: Path, dtype):
    """The model engine, its KV cache sized from --kv-cache-memory; returns (engine, cluster or None)."""
    from router.engine import Engine
    from router.kv_cache import KVCache

    config = Checkpoint(model_dir).config
    budget = parse_bytes(args.kv_cache_memory)
    blocks = budget // KVCache.bytes_per_block(config, args.block_size, dtype)
    if blocks < 1:
        raise ValueError(f"--kv-cache-memory {args.kv_cache_memory} holds no KV block of this model")
    start = time.monotonic()
    if args.workers == 0:
        progress(f"loading {model_dir} in this process")
        from cluster.cli import local_device

        engine = Engine.local(model_dir, dtype, kv_blocks=int(blocks), block_size=args.block_size,
                              device=local_device(args.device))
        cluster = None
    else:
        from cluster.bringup import ExpertCluster
        from cluster.placement import PlacementPlan

        progress(f"starting {args.workers} expert workers on Ray "
                 f"({'joining ' + args.address if args.address else 'embedded local cluster'})")
        plan = PlacementPlan.from_file(args.placement) if args.placement else None
        cluster = ExpertCluster(model_dir, args.workers, plan=plan, replicas=args.replicas,
                                address=args.address, dtype=dtype, pingpong=args.pingpong,
                                pingpong_min_tokens=args.pingpong_min_tokens,
                                collective_timeout_s=args.collective_timeout, kv_blocks=int(blocks),
                                block_size=args.block_size, device=args.device,
                                placement_timeout_s=args.placement_timeout)
        engine = cluster.engine
        for worker, nbytes in enumerate(cluster.worker_bytes):
            progress(f"worker {worker}: {len(cluster.plan.worker_pairs(worker))} experts, "
                     f"{nbytes / 2**20:.1f} MiB")
    progress(f"model ready in {time.monotonic() - start:.1f}s: {config.num_layers} layers, "
             f"{config.num_experts} experts, KV cache {int(blocks)} blocks of {args.block_size} tokens")
    return engine, cluster


def model_info(name: str, config, cluster) -> pb.ModelInfo:
    info = pb.ModelInfo(model_name=name, vocab_size=config.vocab_size, max_context=config.max_position_embeddings,
                        num_layers=config.num_layers, num_experts=config.num_experts,
                        experts_per_token=config.experts_per_token, hidden_size=config.hidden_size)
    if cluster is not None:
        plan = cluster.plan
        for worker in range(plan.num_workers):
            info.workers.append(pb.WorkerPlacement(worker=worker, experts=[
                pb.ExpertRef(layer=layer, expert=e, copies=len(plan.holders[(layer, e)]))
                for layer, e in plan.worker_pairs(worker)]))
    return info


class GatewayThread:
    """The gRPC gateway on an asyncio loop of its own thread, so that the engine loop can run on
    the main thread (the one that loaded the model; see ServingEngine)."""

    def __init__(self, service, serving, args, token: str | None, tls):
        self.serving = serving
        self.args = args
        self.warmed = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
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
        from router.gateway import set_health, start_gateway

        self._stop = asyncio.Event()
        try:
            server, self.port, self._health = await start_gateway(
                service, self.args.host, self.args.port, auth_token=token, tls=tls,
                max_message_bytes=self.args.max_message_bytes)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():  # health follows the engine: NOT_SERVING while it cannot step
                await set_health(self._health, self.warmed and self.serving.healthy)
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
            progress(f"stopping: finishing in-flight streams for up to {self.args.grace:.0f}s")
        finally:
            await set_health(self._health, False)
            await server.stop(self.args.grace)
            self.serving.stop()  # ends the engine loop on the main thread

    def mark_warmed(self) -> None:
        """The engine has run a real step: health says SERVING from now on (and before we return)."""
        from router.gateway import set_health

        self.warmed = True
        asyncio.run_coroutine_threadsafe(set_health(self._health, self.serving.healthy), self._loop).result(10)

    def begin_shutdown(self, *_signal_args) -> None:
        """Graceful stop; safe from a signal handler."""
        self._loop.call_soon_threadsafe(self._stop.set)


def cmd_serve(args) -> int:
    from cluster.tiny_checkpoint import default_model_dir
    from router.engine import DTYPES
    from router.gateway import GenerationService
    from router.sampling import SamplingParams
    from router.serving import ServingEngine

    logging.basicConfig(level=logging.WARNING)
    if args.model:
        model_dir = Path(args.model)
    else:
        progress("no --model given: using the tiny Mixtral (created once, cached)")
        model_dir = default_model_dir()
    token = args.auth_token
    if args.auth_token_file:
        token = Path(args.auth_token_file).read_text().strip()
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        tls = (Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes())
    engine, cluster = build_engine(args, model_dir, DTYPES[args.dtype])
    try:
        config = engine.config
        tokenizer = load_tokenizer(model_dir, config.bos_token_id, config.eos_token_id)
        serving = ServingEngine(engine, tokenizer, max_batch_tokens=args.max_batch_tokens,
                                max_seqs=args.max_seqs, max_queue=args.max_queue, own_thread=False)
        service = GenerationService(serving, tokenizer, load_chat_template(model_dir),
                                    model_info(model_dir.name, config, cluster))
        gateway = GatewayThread(service, serving, args, token, tls)
        # One real step before saying SERVING: the whole path (and every worker) works.
        serving.generate([[config.bos_token_id]], SamplingParams(max_new_tokens=1))
        gateway.mark_warmed()
        target = f"{args.host}:{gateway.port}"
        print(f"expertmesh serving {model_dir} on {target} (gRPC{', TLS' if tls else ''}"
              f"{', bearer token' if token else ''})", flush=True)
        print(f"try: expertmesh generate --target {target} \"The capital of France is\"", flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, gateway.begin_shutdown)
        serving.run()  # the engine loop, on this thread, until the gateway has stopped
        gateway.thread.join(timeout=args.grace + 30)
    finally:
        if cluster is not None:
            cluster.shutdown()
    return 0
