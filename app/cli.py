"""The `expertmesh` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

from expertmesh.core.heap import use_huge_pages

use_huge_pages()  # before torch allocates: the weights' blocks in huge pages (core/heap.py)

from expertmesh.core.settings import DEFAULTS, DTYPES, QUANTIZE, ServingConfig  # noqa: E402
from expertmesh.core.tiny_checkpoint import TINY_DEFAULTS  # noqa: E402
from expertmesh.flags import add_engine_flags, serving_config  # noqa: E402

DEFAULT_PORT = 50051  # gRPC's customary port
DEFAULT_HTTP_PORT = 8000  # the OpenAI-compatible API's, as vLLM's and llama.cpp's servers default to


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be comma-separated integers, got {text!r}")
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids is empty")
    return ids


def add_door_flags(parser: argparse.ArgumentParser) -> None:
    """The front door's flags, which `serve` and `gateway` share: addresses, names, auth, TLS,
    limits, health and shutdown."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"gRPC port (default {DEFAULT_PORT}; 0 picks one)")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT,
                        help=f"the OpenAI-compatible HTTP API's port (default {DEFAULT_HTTP_PORT}; 0 picks one)")
    parser.add_argument("--no-http", dest="http", action="store_false",
                        help="serve gRPC only, no OpenAI-compatible HTTP API")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="the model's name(s) in the API: requests may name any, responses echo it "
                        "(default: the checkpoint folder's name)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus metrics on http://HOST:PORT/metrics (default off; 0 picks one)")
    parser.add_argument("--auth-token", help="require 'authorization: Bearer TOKEN' on every call")
    parser.add_argument("--auth-token-file", help="read the bearer token from this file")
    parser.add_argument("--tls-cert", help="TLS certificate chain (PEM); with --tls-key")
    parser.add_argument("--tls-key", help="TLS private key (PEM)")
    parser.add_argument("--max-message-bytes", type=int, default=4 << 20,
                        help="largest gRPC message accepted (default 4 MiB)")
    parser.add_argument("--stall-timeout", type=float, default=DEFAULTS.stall_timeout_s,
                        help="health says NOT_SERVING while a step runs longer than this many seconds (default "
                        f"{DEFAULTS.stall_timeout_s:g})")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds in-flight streams get to finish on shutdown (default 10)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertmesh", description=(
        "Expert-parallel serving of Mixtral-style mixture-of-experts models on Ray."))
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the model over gRPC (the main job)",
                           description="Bring up the model (experts on Ray workers with --workers) and serve "
                           "expertmesh.v1.Generation, health and reflection over gRPC.")
    add_door_flags(serve)
    serve.add_argument("--routers", type=int, default=1,
                       help="routers (attention, KV cache, scheduler) over the one expert pool: the serve "
                       "process's own, and N-1 more as Ray actors; the gateway continues a lost router's "
                       "streams on the others, token for token (needs --workers; default 1)")
    serve.add_argument("--router-resource", default=None, metavar="NAME",
                       help="a Ray custom resource each router actor asks for one of, so routers land on the "
                       "nodes (pods) that declare it, e.g. a KubeRay worker group of their own (default: none)")
    serve.add_argument("--metrics-per-expert", action="store_true",
                       help="also export rows and copies per (layer, expert): 256 series each for Mixtral "
                       "8x7B (default: rows per worker and layer)")
    scale = serve.add_argument_group("autoscaling (off by default)")
    scale.add_argument("--autoscale", action="store_true",
                       help="let the controller add and remove expert replicas and workers as the load moves")
    scale.add_argument("--min-workers", type=int, default=1, help="never fewer workers (default 1)")
    scale.add_argument("--max-workers", type=int, default=None,
                       help="never more workers; each is a placement-group request Ray's autoscaler (KubeRay) "
                       "answers with a node (default: twice --workers)")
    scale.add_argument("--scale-window", type=float, default=30.0,
                       help="seconds of load the controller reads before each decision (default 30)")
    scale.add_argument("--scale-up-busy", type=float, default=0.8,
                       help="add a worker when the busiest spends more than this fraction of the window "
                       "computing experts, two windows in a row (default 0.8: a GPU that is the bottleneck)")
    scale.add_argument("--scale-down-busy", type=float, default=0.2,
                       help="retire a worker when all spend less than this fraction computing (default 0.2)")
    scale.add_argument("--scale-down-delay", type=float, default=300.0,
                       help="...for this many seconds in a row (default 300: GPUs are slow to get back)")
    scale.add_argument("--autoscale-routers", action="store_true",
                       help="let the router controller add a router when requests queue up or KV caches fill, "
                       "and drain one when they stay empty (needs --workers; windows as --scale-window, "
                       "--scale-down-delay)")
    scale.add_argument("--min-routers", type=int, default=1, help="never fewer routers (default 1)")
    scale.add_argument("--max-routers", type=int, default=None,
                       help="never more routers; each is a Ray actor of one CPU or GPU (default: twice --routers)")
    scale.add_argument("--router-scale-up-waiting", type=float, default=4.0,
                       help="add a router when this many requests wait per router on average, two windows "
                       "in a row (default 4)")
    scale.add_argument("--router-scale-up-kv", type=float, default=0.8,
                       help="...or when this share of the routers' KV blocks is in use (default 0.8)")
    scale.add_argument("--router-scale-down-kv", type=float, default=0.2,
                       help="drain a router when none waits and every router's KV use stays below this "
                       "(default 0.2)")
    serve.add_argument("--max-queue", type=int, default=DEFAULTS.max_queue,
                       help=f"waiting requests at most; past it RESOURCE_EXHAUSTED (default {DEFAULTS.max_queue})")
    add_engine_flags(serve, default_workers=2)

    gateway = sub.add_parser(
        "gateway", help="one more front door (gRPC and HTTP) over a running cluster's routers",
        description="Serve expertmesh.v1.Generation and the OpenAI API over the routers of a cluster that "
        "`expertmesh serve --routers N` runs (its router actors, not the serve process's own router 0). "
        "It holds no model state: start as many as a load balancer (a Kubernetes Service) should spread "
        "clients over. Each continues a lost router's streams on the others, as serve's own gateway does.")
    gateway.add_argument("--cluster", required=True, metavar="ADDRESS",
                         help="the Ray cluster serve runs on: the GCS address serve prints (HOST:PORT), or auto")
    gateway.add_argument("--wait", type=float, default=600.0,
                         help="seconds to wait for a router of the cluster to serve (default 600)")
    add_door_flags(gateway)

    for name, helptext in (("generate", "stream a generation from a server"), ("info", "model and placement"),
                           ("scale", "change a running server's replicas, workers or routers")):
        client = sub.add_parser(name, help=helptext, description=helptext)
        client.add_argument("--target", default=f"127.0.0.1:{DEFAULT_PORT}", help="server HOST:PORT")
        client.add_argument("--auth-token", help="bearer token, if the server wants one")
        client.add_argument("--tls-ca", help="CA certificate (PEM) to reach a TLS server")
        client.add_argument("--timeout", type=float, default=600, help="deadline in seconds (default 600)")
        if name == "info":
            client.add_argument("--json", action="store_true",
                                help="print the model and the live placement as JSON (for scripts)")
        if name == "scale":
            target = client.add_mutually_exclusive_group(required=True)
            target.add_argument("--replicas", help="extra expert copies, as for serve (LAYER:EXPERT[xCOPIES],...); "
                                "'' removes them all")
            target.add_argument("--workers", type=int, help="grow or shrink to this many expert workers")
            target.add_argument("--routers", type=int,
                                help="grow or shrink to this many routers (drained ones hand their streams over)")
            target.add_argument("--auto", action="store_true",
                                help="hand the placement back to the controller (after a manual scale)")
            client.add_argument("--json", action="store_true", help="print the new placement as JSON")
        if name == "generate":
            client.add_argument("prompt", help="prompt text")
            client.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
            client.add_argument("--json", action="store_true", help="print each response message as a JSON line")
            client.add_argument("--max-new-tokens", type=int, default=64,
                                help="tokens to generate at most (default 64)")
            client.add_argument("--temperature", type=float, help="0 is greedy (server default 1.0)")
            client.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1] (default 1)")
            client.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
            client.add_argument("--min-p", type=float, default=0.0,
                                help="drop tokens below min_p x the best one's probability")
            client.add_argument("--repetition-penalty", type=float,
                                help="> 1 discourages tokens of the prompt and output (default 1)")
            client.add_argument("--presence-penalty", type=float, default=0.0,
                                help="subtracted from tokens already generated, in [-2, 2]")
            client.add_argument("--frequency-penalty", type=float, default=0.0,
                                help="subtracted per earlier occurrence, in [-2, 2]")
            client.add_argument("--seed", type=int, help="sampling seed (same seed, same tokens)")
            client.add_argument("--stop", action="append", help="stop string (repeatable)")
            client.add_argument("--ignore-eos", action="store_true",
                                help="keep going past the end-of-sequence token")
            client.add_argument("--logprobs", type=int, help="also return this many top log-probabilities")

    plan = sub.add_parser("plan", help="print a placement plan (to edit and pass to --placement)",
                          description="Print the placement of a model's experts on N workers: readable, or "
                          "as JSON for --placement.")
    plan.add_argument("--model", help="checkpoint folder (default: the cached tiny Mixtral)")
    plan.add_argument("--workers", type=int, required=True, help="expert workers")
    plan.add_argument("--replicas", default=None, help="extra expert copies, as for serve")
    plan.add_argument("--redundancy", type=int, default=DEFAULTS.redundancy,
                      help="copies of every expert, as for serve (where --worker-memory leaves room)")
    plan.add_argument("--dtype", choices=DTYPES, default=DEFAULTS.dtype, help="compute dtype, as for serve")
    plan.add_argument("--quantize", choices=QUANTIZE, default=DEFAULTS.quantize, help="as for serve")
    plan.add_argument("--worker-memory", metavar="SIZE", default=None,
                      help="expert weights one worker may hold, as for serve: the plan is checked against it")
    plan.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                      help="where the workers hold their experts (the layouts differ a little; default cpu)")
    plan.add_argument("--json", action="store_true", help="print JSON (a plan file) instead of text")

    tiny = sub.add_parser("tiny-checkpoint", help="write a random tiny Mixtral in hub layout",
                          description="Write a random-initialised Mixtral (hub layout: sharded "
                          "safetensors, index, config.json, Mixtral tokenizer files).")
    tiny.add_argument("dir", help="output folder (created)")
    tiny.add_argument("--layers", type=int, default=TINY_DEFAULTS["num_layers"], help="decoder layers")
    tiny.add_argument("--experts", type=int, default=TINY_DEFAULTS["num_experts"], help="experts per layer")
    tiny.add_argument("--experts-per-token", type=int, default=TINY_DEFAULTS["experts_per_token"],
                      help="experts the router picks per token (top-k)")
    tiny.add_argument("--hidden", type=int, default=TINY_DEFAULTS["hidden_size"], help="hidden size")
    tiny.add_argument("--intermediate", type=int, default=TINY_DEFAULTS["intermediate_size"],
                      help="expert intermediate size")
    tiny.add_argument("--heads", type=int, default=TINY_DEFAULTS["num_heads"], help="attention heads")
    tiny.add_argument("--kv-heads", type=int, default=TINY_DEFAULTS["num_kv_heads"], help="key/value heads")
    tiny.add_argument("--sliding-window", type=int, default=None, help="attention window (default: none)")
    tiny.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    tiny.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weight dtype")
    tiny.add_argument("--tokenizer", choices=["v1", "v3"], default="v1",
                      help="v1: Mixtral 8x7B's (default); v3: Mixtral 8x22B Instruct's, with tool calls")
    tiny.add_argument("--layout", choices=["hub", "consolidated"], default="hub",
                      help="hub: Hugging Face layout; consolidated: Mistral's params.json layout")

    run = sub.add_parser("run", help="generate in-process from a prompt",
                         description="Generate from one prompt and print the text (or JSON).")
    prompt = run.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (BOS is added)")
    prompt.add_argument("--prompt-ids", type=_token_ids, help="prompt token ids, e.g. 1,415,2936")
    run.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    run.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    run.add_argument("--seed", type=int, default=None, help="sampling seed")
    run.add_argument("--json", action="store_true", help='print {"token_ids": [...], "text": "..."}')
    add_engine_flags(run, default_workers=0)
    return parser


def cmd_tiny_checkpoint(args) -> int:
    from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint

    out = write_tiny_checkpoint(
        args.dir, seed=args.seed, dtype=args.dtype, layout=args.layout, tokenizer=args.tokenizer,
        num_layers=args.layers,
        num_experts=args.experts, experts_per_token=args.experts_per_token,
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_heads=args.heads,
        num_kv_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        sliding_window=args.sliding_window)
    print(f"wrote a tiny Mixtral to {out}")
    return 0


def cmd_plan(args) -> int:
    from expertmesh.cluster.memory_budget import expert_bytes, memory_budget, redundancy_shortfall
    from expertmesh.cluster.placement import PlacementPlan
    from expertmesh.core.config import load_config
    from expertmesh.core.tiny_checkpoint import default_model_dir

    config = load_config(args.model or default_model_dir())  # config.json alone: no weights are read
    settings = ServingConfig(dtype=args.dtype, quantize=args.quantize, worker_memory=args.worker_memory,
                             redundancy=args.redundancy)
    one = expert_bytes(config, settings, gpus=args.device == "cuda")
    budget = memory_budget(settings, one)
    plan = PlacementPlan.spread(args.workers, config.num_layers, config.num_experts)
    if args.replicas:
        plan = plan.with_replicas(args.replicas)
    plan = plan.with_min_copies(settings.redundancy, budget)
    plan.validate(budget)
    if args.json:
        print(plan.to_json())
        return 0
    print(plan.describe(one))
    shortfall = redundancy_shortfall(plan, settings.redundancy)
    if shortfall:
        print(shortfall)
    return 0


def cmd_run(args) -> int:
    """One generation through the same serving loop as `serve`, in this process."""
    from expertmesh.cluster.bringup import start_engine
    from expertmesh.core.tiny_checkpoint import default_model_dir
    from expertmesh.core.tokenizer import load_tokenizer
    from expertmesh.router.sampling import SamplingParams
    from expertmesh.router.serving import ServingEngine

    settings = serving_config(args)
    model_dir = args.model or default_model_dir()
    engine, cluster = start_engine(model_dir, settings, args.workers, args.replicas, args.placement, args.address)
    try:
        config = engine.config
        tokenizer = load_tokenizer(model_dir, config.bos_token_id, config.eos_token_id)
        prompt = args.prompt_ids if args.prompt_ids is not None else tokenizer.encode(args.prompt)
        params = SamplingParams(temperature=args.temperature, seed=args.seed, max_new_tokens=args.max_new_tokens)
        # The loop runs on this thread, the one that loaded the model (see ServingEngine).
        chunks = ServingEngine(engine, tokenizer, settings, own_thread=False).generate([prompt], params)[0]
    finally:
        if cluster is not None:
            cluster.shutdown()
    if chunks[-1].error:
        print(f"expertmesh run: generation failed: {chunks[-1].error}", file=sys.stderr)
        return 1
    new_ids = [t for c in chunks for t in c.token_ids]
    text = "".join(c.text for c in chunks)
    if args.json:
        print(json.dumps({"token_ids": new_ids, "text": text}))
    else:
        print(text)
    return 0


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors the user can fix (bad flags, checkpoint, plan, prompt; a lost worker): reported in one
    line with exit status 2. Anything else is a bug and keeps its traceback. Imported only when an
    error is being matched, so the client commands never load torch or Ray."""
    from expertmesh.cluster.bringup import UsageError
    from expertmesh.cluster.placement import PlacementError
    from expertmesh.cluster.rebuild import OwnedElsewhere
    from expertmesh.cluster.worker_pool import PlacementTimeout
    from expertmesh.core.checkpoint import CheckpointError
    from expertmesh.core.config import ConfigError
    from expertmesh.core.settings import SettingsError
    from expertmesh.router.dispatcher import ExpertPathError
    from expertmesh.router.requests import InvalidRequest

    return (CheckpointError, ConfigError, SettingsError, PlacementError, UsageError, PlacementTimeout,
            InvalidRequest, ExpertPathError, FileNotFoundError, OwnedElsewhere)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "gateway":
        from expertmesh.extra_gateway import ray_auth_env

        ray_auth_env()  # before anything imports Ray
    from expertmesh.client import cmd_generate, cmd_info, cmd_scale
    from expertmesh.extra_gateway import cmd_gateway
    from expertmesh.server import cmd_serve

    handlers = {"tiny-checkpoint": cmd_tiny_checkpoint, "run": cmd_run, "serve": cmd_serve, "gateway": cmd_gateway,
                "plan": cmd_plan,
                "generate": cmd_generate, "info": cmd_info, "scale": cmd_scale}
    try:
        return handlers[args.command](args)
    except BrokenPipeError:  # `expertmesh info | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except _user_errors() as exc:  # what the user can fix: one line, no traceback
        print(f"expertmesh {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
