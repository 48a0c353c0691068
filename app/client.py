"""`expertmesh generate` and `expertmesh info`: a gRPC client of a running server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format

from expertmesh.v1 import generation_pb2 as pb
from expertmesh.v1 import generation_pb2_grpc as pb_grpc


def _channel(args) -> grpc.Channel:
    if args.tls_ca:
        credentials = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes())
        return grpc.secure_channel(args.target, credentials)
    return grpc.insecure_channel(args.target)


def _metadata(args) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {args.auth_token}")] if args.auth_token else []


def sampling_from_args(args) -> pb.SamplingParams:
    s = pb.SamplingParams(top_k=args.top_k, min_p=args.min_p, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, stop=args.stop or [],
                          ignore_eos=args.ignore_eos, max_new_tokens=args.max_new_tokens)
    for name in ("temperature", "top_p", "repetition_penalty", "seed", "logprobs"):
        value = getattr(args, name)
        if value is not None:
            setattr(s, name, value)
    return s


def cmd_generate(args) -> int:
    request = pb.GenerateRequest(sampling=sampling_from_args(args))
    if args.chat:
        request.messages.append(pb.ChatMessage(role="user", content=args.prompt))
    else:
        request.prompt = args.prompt
    with _channel(args) as channel:
        stub = pb_grpc.GenerationStub(channel)
        try:
            for response in stub.Generate(request, metadata=_metadata(args), timeout=args.timeout):
                if args.json:
                    print(json.dumps(json_format.MessageToDict(response)), flush=True)
                else:
                    sys.stdout.write(response.text)
                    sys.stdout.flush()
        except grpc.RpcError as exc:
            print(f"\nexpertmesh generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if not args.json:
        print()
    return 0


def _placement_dict(placement: pb.Placement) -> dict:
    return {"epoch": placement.epoch, "version": placement.version, "recoveries": placement.recoveries,
            "worker_memory_bytes": placement.worker_memory_bytes or None, "expert_bytes": placement.expert_bytes,
            "workers": [{"worker": w.worker, "node": w.node, "pid": w.pid,
                         "experts": [f"{e.layer}:{e.expert}" for e in w.experts],
                         "rows": {f"{e.layer}:{e.expert}": e.rows for e in w.experts},
                         "busy_seconds": w.busy_seconds, "weight_bytes": w.weight_bytes, "messages": w.messages}
                        for w in placement.workers]}


def _table(headers: list[str], rows: list[list]) -> str:
    """Columns aligned on the widest cell, headers in capitals, as `kubectl get` prints them."""
    cells = [[str(h).upper() for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _print_placement(placement: pb.Placement, num_layers: int = 0, num_experts: int = 0) -> None:
    budget = f", a worker may hold {_mib(placement.worker_memory_bytes)}" if placement.worker_memory_bytes else ""
    print(f"placement: epoch {placement.epoch} (record version {placement.version}), {len(placement.workers)} workers, "
          f"{placement.recoveries} recoveries, "
          f"{_mib(placement.expert_bytes)} an expert{budget}")
    print()
    print(_table(["worker", "pid", "node", "experts", "replicated", "weights", "busy", "messages"],
                 [[w.worker, w.pid, w.node[:12], len(w.experts), sum(e.copies > 1 for e in w.experts),
                   _mib(w.weight_bytes), f"{w.busy_seconds:.1f}s", w.messages] for w in placement.workers]))
    # which workers hold each (layer, expert): a row per layer, a column per expert
    holders: dict[tuple[int, int], list[int]] = {}
    for w in placement.workers:
        for e in w.experts:
            holders.setdefault((e.layer, e.expert), []).append(w.worker)
    num_layers = num_layers or 1 + max((layer for layer, _ in holders), default=-1)
    num_experts = num_experts or 1 + max((expert for _, expert in holders), default=-1)
    print()
    def held_by(layer: int, expert: int) -> str:
        return ",".join(str(w) for w in sorted(holders.get((layer, expert), []))) or "-"

    print(_table(["layer"] + [f"e{e}" for e in range(num_experts)],
                 [[layer] + [held_by(layer, e) for e in range(num_experts)] for layer in range(num_layers)]))


def cmd_info(args) -> int:
    with _channel(args) as channel:
        try:
            info = pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), metadata=_metadata(args),
                                                                timeout=args.timeout)
            placement = None
            if info.workers:
                placement = pb_grpc.AdminStub(channel).GetPlacement(pb.GetPlacementRequest(),
                                                                   metadata=_metadata(args), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"expertmesh info: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if args.json:
        model = json_format.MessageToDict(info, preserving_proto_field_name=True)
        model.pop("workers", None)
        model.pop("routers", None)
        routers = [{"router": r.router, "pid": r.pid, "node": r.node, "state": r.state, "streams": r.streams,
                    "kv_blocks_free": r.kv_blocks_free, "kv_blocks_total": r.kv_blocks_total, "epoch": r.epoch}
                   for r in info.routers]
        live = _placement_dict(placement) if placement else {"epoch": 0, "version": 0, "recoveries": 0, "workers": []}
        print(json.dumps({"model": model, "routers": routers, **live}))
        return 0
    print(f"model {info.model_name}: {info.num_layers} layers x {info.num_experts} experts "
          f"(top-{info.experts_per_token}), hidden {info.hidden_size}, vocab {info.vocab_size}, "
          f"context {info.max_context}")
    print()
    if info.routers:  # a fleet (expert workers); with every expert in process, the server is the router
        print(_table(["router", "pid", "state", "streams", "kv blocks in use", "epoch"],
                     [[r.router, r.pid, r.state, r.streams,
                       f"{r.kv_blocks_total - r.kv_blocks_free}/{r.kv_blocks_total}", r.epoch] for r in info.routers]))
        print()
    if placement is None and info.routers:  # a gateway of its own: the placement is the serve process's
        print("experts: on the cluster's expert workers (`info` at the serve process's gateway shows where)")
    elif placement is None:
        print("experts: all in the router process (no expert workers)")
    else:
        _print_placement(placement, info.num_layers, info.num_experts)
    return 0


def cmd_scale(args) -> int:
    if args.auto:
        request = pb.ScaleRequest(auto=True)
    elif args.replicas is not None:
        request = pb.ScaleRequest(replicas=args.replicas)
    elif args.routers is not None:
        request = pb.ScaleRequest(routers=args.routers)
    else:
        request = pb.ScaleRequest(workers=args.workers)
    with _channel(args) as channel:
        try:
            placement = pb_grpc.AdminStub(channel).Scale(request, metadata=_metadata(args), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"expertmesh scale: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(_placement_dict(placement)))
    else:
        _print_placement(placement)
    return 0
