"""The engines' own gRPC load contracts, answered by the aggregator for the whole cluster.

`sglang.grpc.scheduler.SglangScheduler/GetLoads` and `vllm.grpc.engine.VllmEngine/GetLoads` (stubs from
PyPI smg-grpc-proto, never copied) are served on the aggregator's gRPC port: a client written against
`SglangSchedulerStub` reads every rank's load with one call. Calls are coalesced through the same
watching communicator as loadagg's own GetLoads; `dp_rank` and `include` are honoured; `dp_rank_count`
is the cluster's dp_size. Every other RPC of those services answers UNIMPLEMENTED, naming loadagg.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as sg
from smg_grpc_proto import vllm_engine_pb2 as vl

from loadagg.server.answers import shared_view_stepped
from loadagg.server.errors import LoadAggError, NotServed, abort_with
from loadagg.server.render_steps import RENDER_STEP_RANKS, RenderSteps
from loadagg.server.rounds import RoundResult
from loadagg.server.service import LoadAggregatorService, wait_budget
from loadagg.server.sglang_shape import CORE_FIELDS, INT32_MAX, SECTION_KEYS, aggregate_steps, iso_timestamp, total_reqs
from loadagg.v1 import loadagg_pb2 as pb

SGLANG_SERVICE = sg.DESCRIPTOR.services_by_name["SglangScheduler"].full_name
VLLM_SERVICE = vl.DESCRIPTOR.services_by_name["VllmEngine"].full_name


def _copy_scalars(target, source, names) -> None:
    """Copy the figures `source` has into `target`, clamping to int32 where the peer's field is int32."""
    for name in names:
        if name not in target.DESCRIPTOR.fields_by_name or not source.HasField(name):
            continue
        value = getattr(source, name)
        if target.DESCRIPTOR.fields_by_name[name].cpp_type == target.DESCRIPTOR.fields_by_name[name].CPPTYPE_INT32:
            value = min(int(value), INT32_MAX)
        setattr(target, name, value)


def _fill_scheduler_load(out, load: pb.RankLoad) -> None:
    """`out`, the peer's SchedulerLoad, filled from a loadagg RankLoad (sections only where the peer has them)."""
    out.dp_rank = load.dp_rank
    _copy_scalars(out, load, CORE_FIELDS)
    out.num_total_reqs = min(total_reqs(load) or 0, INT32_MAX)  # (the peer's contract has no field presence)
    fields = out.DESCRIPTOR.fields_by_name
    for section, key in SECTION_KEYS.items():
        if key in fields and load.HasField(section):
            source = getattr(load, section)
            target = getattr(out, key)
            target.SetInParent()
            _copy_scalars(target, source, [f.name for f, _ in source.ListFields()])


def compat_steps(module, version: str, result: RoundResult, loads: list[pb.RankLoad]) -> RenderSteps:
    """The peer's GetLoadsResponse (sglang's or vLLM's module) of a view, serialized, built in steps;
    `aggregate` where the peer's message has one (a figure no rank has is 0 there: no field presence)."""
    response = module.GetLoadsResponse(timestamp=iso_timestamp(result.timestamp_ms), version=version,
                                       dp_rank_count=result.dp_size)
    for i, load in enumerate(loads, 1):
        _fill_scheduler_load(response.loads.add(), load)
        if i % RENDER_STEP_RANKS == 0:
            yield
    if "aggregate" in response.DESCRIPTOR.fields_by_name:
        agg = yield from aggregate_steps(loads)
        response.aggregate.CopyFrom(module.AggregateMetrics(
            total_running_reqs=min(agg.get("total_running_reqs", 0), INT32_MAX),
            total_waiting_reqs=min(agg.get("total_waiting_reqs", 0), INT32_MAX),
            total_reqs=min(agg.get("total_reqs", 0), INT32_MAX),
            avg_token_usage=agg.get("avg_token_usage", 0.0),
            avg_throughput=agg.get("avg_throughput", 0.0),
            avg_utilization=agg.get("avg_utilization", 0.0),
        ))
        yield
    return response.SerializeToString()


class EngineCompat:
    """GetLoads of the sglang and vLLM engine contracts, over loadagg's rounds."""

    def __init__(self, service: LoadAggregatorService, version: str) -> None:
        self.service = service
        self.version = version

    async def _answer(self, request, context, peer: str, module) -> bytes:
        try:
            dp_rank, sections = self.service.view_of(request)
            with self.service.tracked():
                result: RoundResult = await self.service.communicator.collect(wait_timeout=wait_budget(context))
        except LoadAggError as error:
            await abort_with(context, error)
            return b""
        return await shared_view_stepped(result, dp_rank, sections, False,
                                         functools.partial(compat_steps, module, self.version), peer)

    async def sglang_get_loads(self, request: sg.GetLoadsRequest, context: grpc.aio.ServicerContext) -> bytes:
        return await self._answer(request, context, "sglang", sg)

    async def vllm_get_loads(self, request: vl.GetLoadsRequest, context: grpc.aio.ServicerContext) -> bytes:
        return await self._answer(request, context, "vllm", vl)


def _unimplemented(service: str, method) -> grpc.RpcMethodHandler:
    error = NotServed(
        f"{service}/{method.name} is not served here: this is a loadagg aggregator, which answers only "
        f"GetLoads of {service} (every dp rank of the cluster); send {method.name} to an engine"
    )

    async def unary(request, context):
        await abort_with(context, error)

    async def streaming(request, context):
        await abort_with(context, error)
        yield b""  # never reached: makes this an async generator, as a streaming handler must be

    if method.client_streaming and method.server_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if method.client_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)


def _bytes(message) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def handlers(compat: EngineCompat, *, sglang: bool, vllm: bool,
             wrap: Callable[[str, Callable], Callable] = lambda api, h: h) -> tuple[list, list[str]]:
    """Generic handlers for the enabled peer services, and their names (for reflection and health)."""
    out: list[grpc.GenericRpcHandler] = []
    names: list[str] = []
    for enabled, module, name, get_loads, api in (
        (sglang, sg, "SglangScheduler", compat.sglang_get_loads, "sglang"),
        (vllm, vl, "VllmEngine", compat.vllm_get_loads, "vllm"),
    ):
        if not enabled:
            continue
        descriptor = module.DESCRIPTOR.services_by_name[name]
        methods = {m.name: _unimplemented(descriptor.full_name, m) for m in descriptor.methods}
        methods["GetLoads"] = grpc.unary_unary_rpc_method_handler(
            wrap(api, get_loads), request_deserializer=module.GetLoadsRequest.FromString, response_serializer=_bytes,
        )
        out.append(grpc.method_handlers_generic_handler(descriptor.full_name, methods))
        names.append(descriptor.full_name)
    return out, names
