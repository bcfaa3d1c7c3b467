from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Freshness(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FRESHNESS_UNSPECIFIED: _ClassVar[Freshness]
    FRESHNESS_JOIN: _ClassVar[Freshness]
    FRESHNESS_NEW_ROUND: _ClassVar[Freshness]
    FRESHNESS_CACHED: _ClassVar[Freshness]

class AnswerSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ANSWER_SOURCE_UNSPECIFIED: _ClassVar[AnswerSource]
    ANSWER_SOURCE_ROUND: _ClassVar[AnswerSource]
    ANSWER_SOURCE_CACHE: _ClassVar[AnswerSource]
    ANSWER_SOURCE_SNAPSHOTS: _ClassVar[AnswerSource]
FRESHNESS_UNSPECIFIED: Freshness
FRESHNESS_JOIN: Freshness
FRESHNESS_NEW_ROUND: Freshness
FRESHNESS_CACHED: Freshness
ANSWER_SOURCE_UNSPECIFIED: AnswerSource
ANSWER_SOURCE_ROUND: AnswerSource
ANSWER_SOURCE_CACHE: AnswerSource
ANSWER_SOURCE_SNAPSHOTS: AnswerSource

class MemoryMetrics(_message.Message):
    __slots__ = ("weight_gb", "kv_cache_gb", "graph_gb", "token_capacity")
    WEIGHT_GB_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_GB_FIELD_NUMBER: _ClassVar[int]
    GRAPH_GB_FIELD_NUMBER: _ClassVar[int]
    TOKEN_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    weight_gb: float
    kv_cache_gb: float
    graph_gb: float
    token_capacity: int
    def __init__(self, weight_gb: _Optional[float] = ..., kv_cache_gb: _Optional[float] = ..., graph_gb: _Optional[float] = ..., token_capacity: _Optional[int] = ...) -> None: ...

class GpuDevice(_message.Message):
    __slots__ = ("index", "name", "uuid", "memory_used_bytes", "memory_total_bytes", "utilization", "memory_utilization", "temperature_c", "power_w", "power_limit_w")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    uuid: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization: float
    memory_utilization: float
    temperature_c: float
    power_w: float
    power_limit_w: float
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., uuid: _Optional[str] = ..., memory_used_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., utilization: _Optional[float] = ..., memory_utilization: _Optional[float] = ..., temperature_c: _Optional[float] = ..., power_w: _Optional[float] = ..., power_limit_w: _Optional[float] = ...) -> None: ...

class GpuMetrics(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[GpuDevice]
    def __init__(self, devices: _Optional[_Iterable[_Union[GpuDevice, _Mapping]]] = ...) -> None: ...

class SpeculativeMetrics(_message.Message):
    __slots__ = ("accept_length", "accept_rate")
    ACCEPT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_RATE_FIELD_NUMBER: _ClassVar[int]
    accept_length: float
    accept_rate: float
    def __init__(self, accept_length: _Optional[float] = ..., accept_rate: _Optional[float] = ...) -> None: ...

class LoraMetrics(_message.Message):
    __slots__ = ("slots_used", "slots_total", "utilization")
    SLOTS_USED_FIELD_NUMBER: _ClassVar[int]
    SLOTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    slots_used: int
    slots_total: int
    utilization: float
    def __init__(self, slots_used: _Optional[int] = ..., slots_total: _Optional[int] = ..., utilization: _Optional[float] = ...) -> None: ...

class DisaggMetrics(_message.Message):
    __slots__ = ("mode", "prefill_prealloc_queue_reqs", "prefill_inflight_queue_reqs", "decode_prealloc_queue_reqs", "decode_transfer_queue_reqs", "decode_retracted_queue_reqs", "kv_transfer_speed_gb_s", "kv_transfer_latency_ms")
    MODE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_PREALLOC_QUEUE_REQS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_INFLIGHT_QUEUE_REQS_FIELD_NUMBER: _ClassVar[int]
    DECODE_PREALLOC_QUEUE_REQS_FIELD_NUMBER: _ClassVar[int]
    DECODE_TRANSFER_QUEUE_REQS_FIELD_NUMBER: _ClassVar[int]
    DECODE_RETRACTED_QUEUE_REQS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_SPEED_GB_S_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    mode: str
    prefill_prealloc_queue_reqs: int
    prefill_inflight_queue_reqs: int
    decode_prealloc_queue_reqs: int
    decode_transfer_queue_reqs: int
    decode_retracted_queue_reqs: int
    kv_transfer_speed_gb_s: float
    kv_transfer_latency_ms: float
    def __init__(self, mode: _Optional[str] = ..., prefill_prealloc_queue_reqs: _Optional[int] = ..., prefill_inflight_queue_reqs: _Optional[int] = ..., decode_prealloc_queue_reqs: _Optional[int] = ..., decode_transfer_queue_reqs: _Optional[int] = ..., decode_retracted_queue_reqs: _Optional[int] = ..., kv_transfer_speed_gb_s: _Optional[float] = ..., kv_transfer_latency_ms: _Optional[float] = ...) -> None: ...

class QueueMetrics(_message.Message):
    __slots__ = ("waiting", "grammar", "paused", "retracted", "prealloc_ready")
    WAITING_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    RETRACTED_FIELD_NUMBER: _ClassVar[int]
    PREALLOC_READY_FIELD_NUMBER: _ClassVar[int]
    waiting: int
    grammar: int
    paused: int
    retracted: int
    prealloc_ready: int
    def __init__(self, waiting: _Optional[int] = ..., grammar: _Optional[int] = ..., paused: _Optional[int] = ..., retracted: _Optional[int] = ..., prealloc_ready: _Optional[int] = ...) -> None: ...

class RankLoad(_message.Message):
    __slots__ = ("dp_rank", "timestamp_ms", "num_running_reqs", "num_waiting_reqs", "num_total_reqs", "num_used_tokens", "num_total_tokens", "max_total_num_tokens", "num_waiting_uncached_tokens", "token_usage", "gen_throughput", "cache_hit_rate", "utilization", "max_running_requests", "memory", "gpu", "spec", "lora", "disagg", "queues", "stale", "age_ms", "detail_age_ms", "num_active_tokens", "num_prealloc_ready_tokens", "total_prefill_uncached_tokens", "total_prefill_busy_us", "prefill_throughput", "active_token_usage", "engine_silence_ms", "accelerator", "num_accelerators")
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_REQS_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_REQS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOTAL_REQS_FIELD_NUMBER: _ClassVar[int]
    NUM_USED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOTAL_NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_UNCACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_USAGE_FIELD_NUMBER: _ClassVar[int]
    GEN_THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    DISAGG_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    AGE_MS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_ACTIVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREALLOC_READY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PREFILL_UNCACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PREFILL_BUSY_US_FIELD_NUMBER: _ClassVar[int]
    PREFILL_THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_TOKEN_USAGE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_SILENCE_MS_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCELERATORS_FIELD_NUMBER: _ClassVar[int]
    dp_rank: int
    timestamp_ms: int
    num_running_reqs: int
    num_waiting_reqs: int
    num_total_reqs: int
    num_used_tokens: int
    num_total_tokens: int
    max_total_num_tokens: int
    num_waiting_uncached_tokens: int
    token_usage: float
    gen_throughput: float
    cache_hit_rate: float
    utilization: float
    max_running_requests: int
    memory: MemoryMetrics
    gpu: GpuMetrics
    spec: SpeculativeMetrics
    lora: LoraMetrics
    disagg: DisaggMetrics
    queues: QueueMetrics
    stale: bool
    age_ms: int
    detail_age_ms: int
    num_active_tokens: int
    num_prealloc_ready_tokens: int
    total_prefill_uncached_tokens: int
    total_prefill_busy_us: int
    prefill_throughput: float
    active_token_usage: float
    engine_silence_ms: int
    accelerator: str
    num_accelerators: int
    def __init__(self, dp_rank: _Optional[int] = ..., timestamp_ms: _Optional[int] = ..., num_running_reqs: _Optional[int] = ..., num_waiting_reqs: _Optional[int] = ..., num_total_reqs: _Optional[int] = ..., num_used_tokens: _Optional[int] = ..., num_total_tokens: _Optional[int] = ..., max_total_num_tokens: _Optional[int] = ..., num_waiting_uncached_tokens: _Optional[int] = ..., token_usage: _Optional[float] = ..., gen_throughput: _Optional[float] = ..., cache_hit_rate: _Optional[float] = ..., utilization: _Optional[float] = ..., max_running_requests: _Optional[int] = ..., memory: _Optional[_Union[MemoryMetrics, _Mapping]] = ..., gpu: _Optional[_Union[GpuMetrics, _Mapping]] = ..., spec: _Optional[_Union[SpeculativeMetrics, _Mapping]] = ..., lora: _Optional[_Union[LoraMetrics, _Mapping]] = ..., disagg: _Optional[_Union[DisaggMetrics, _Mapping]] = ..., queues: _Optional[_Union[QueueMetrics, _Mapping]] = ..., stale: _Optional[bool] = ..., age_ms: _Optional[int] = ..., detail_age_ms: _Optional[int] = ..., num_active_tokens: _Optional[int] = ..., num_prealloc_ready_tokens: _Optional[int] = ..., total_prefill_uncached_tokens: _Optional[int] = ..., total_prefill_busy_us: _Optional[int] = ..., prefill_throughput: _Optional[float] = ..., active_token_usage: _Optional[float] = ..., engine_silence_ms: _Optional[int] = ..., accelerator: _Optional[str] = ..., num_accelerators: _Optional[int] = ...) -> None: ...

class LoadSummary(_message.Message):
    __slots__ = ("num_ranks", "total_running_reqs", "total_waiting_reqs", "total_reqs", "total_used_tokens", "total_max_tokens", "avg_token_usage", "total_gen_throughput", "avg_throughput", "avg_utilization")
    NUM_RANKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_RUNNING_REQS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_WAITING_REQS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_REQS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_USED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    AVG_TOKEN_USAGE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_GEN_THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    AVG_THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    AVG_UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    num_ranks: int
    total_running_reqs: int
    total_waiting_reqs: int
    total_reqs: int
    total_used_tokens: int
    total_max_tokens: int
    avg_token_usage: float
    total_gen_throughput: float
    avg_throughput: float
    avg_utilization: float
    def __init__(self, num_ranks: _Optional[int] = ..., total_running_reqs: _Optional[int] = ..., total_waiting_reqs: _Optional[int] = ..., total_reqs: _Optional[int] = ..., total_used_tokens: _Optional[int] = ..., total_max_tokens: _Optional[int] = ..., avg_token_usage: _Optional[float] = ..., total_gen_throughput: _Optional[float] = ..., avg_throughput: _Optional[float] = ..., avg_utilization: _Optional[float] = ...) -> None: ...

class GetLoadsRequest(_message.Message):
    __slots__ = ("dp_rank", "include", "freshness", "max_staleness_ms", "allow_stale")
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FIELD_NUMBER: _ClassVar[int]
    FRESHNESS_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_MS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_STALE_FIELD_NUMBER: _ClassVar[int]
    dp_rank: int
    include: _containers.RepeatedScalarFieldContainer[str]
    freshness: Freshness
    max_staleness_ms: int
    allow_stale: bool
    def __init__(self, dp_rank: _Optional[int] = ..., include: _Optional[_Iterable[str]] = ..., freshness: _Optional[_Union[Freshness, str]] = ..., max_staleness_ms: _Optional[int] = ..., allow_stale: _Optional[bool] = ...) -> None: ...

class GetLoadsResponse(_message.Message):
    __slots__ = ("round_id", "timestamp_ms", "dp_size", "loads", "missing_ranks", "summary", "source", "round_duration_ms", "round_callers", "partial", "aggregator_id")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    DP_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    MISSING_RANKS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ROUND_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    ROUND_CALLERS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    timestamp_ms: int
    dp_size: int
    loads: _containers.RepeatedCompositeFieldContainer[RankLoad]
    missing_ranks: _containers.RepeatedScalarFieldContainer[int]
    summary: LoadSummary
    source: AnswerSource
    round_duration_ms: int
    round_callers: int
    partial: bool
    aggregator_id: str
    def __init__(self, round_id: _Optional[int] = ..., timestamp_ms: _Optional[int] = ..., dp_size: _Optional[int] = ..., loads: _Optional[_Iterable[_Union[RankLoad, _Mapping]]] = ..., missing_ranks: _Optional[_Iterable[int]] = ..., summary: _Optional[_Union[LoadSummary, _Mapping]] = ..., source: _Optional[_Union[AnswerSource, str]] = ..., round_duration_ms: _Optional[int] = ..., round_callers: _Optional[int] = ..., partial: _Optional[bool] = ..., aggregator_id: _Optional[str] = ...) -> None: ...

class WatchLoadsRequest(_message.Message):
    __slots__ = ("dp_rank", "include", "interval_ms", "allow_stale", "on_change", "min_interval_ms", "heartbeat_ms")
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_STALE_FIELD_NUMBER: _ClassVar[int]
    ON_CHANGE_FIELD_NUMBER: _ClassVar[int]
    MIN_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    dp_rank: int
    include: _containers.RepeatedScalarFieldContainer[str]
    interval_ms: int
    allow_stale: bool
    on_change: bool
    min_interval_ms: int
    heartbeat_ms: int
    def __init__(self, dp_rank: _Optional[int] = ..., include: _Optional[_Iterable[str]] = ..., interval_ms: _Optional[int] = ..., allow_stale: _Optional[bool] = ..., on_change: _Optional[bool] = ..., min_interval_ms: _Optional[int] = ..., heartbeat_ms: _Optional[int] = ...) -> None: ...

class AgentHello(_message.Message):
    __slots__ = ("instance_id", "dp_ranks", "dp_size", "model", "version", "source")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DP_RANKS_FIELD_NUMBER: _ClassVar[int]
    DP_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    dp_ranks: _containers.RepeatedScalarFieldContainer[int]
    dp_size: int
    model: str
    version: str
    source: str
    def __init__(self, instance_id: _Optional[str] = ..., dp_ranks: _Optional[_Iterable[int]] = ..., dp_size: _Optional[int] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("round_id", "loads", "failed_ranks", "error")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    FAILED_RANKS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    loads: _containers.RepeatedCompositeFieldContainer[RankLoad]
    failed_ranks: _containers.RepeatedScalarFieldContainer[int]
    error: str
    def __init__(self, round_id: _Optional[int] = ..., loads: _Optional[_Iterable[_Union[RankLoad, _Mapping]]] = ..., failed_ranks: _Optional[_Iterable[int]] = ..., error: _Optional[str] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "report")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    hello: AgentHello
    report: LoadReport
    def __init__(self, hello: _Optional[_Union[AgentHello, _Mapping]] = ..., report: _Optional[_Union[LoadReport, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("aggregator_id", "dp_size", "round_timeout_ms")
    AGGREGATOR_ID_FIELD_NUMBER: _ClassVar[int]
    DP_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROUND_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    aggregator_id: str
    dp_size: int
    round_timeout_ms: int
    def __init__(self, aggregator_id: _Optional[str] = ..., dp_size: _Optional[int] = ..., round_timeout_ms: _Optional[int] = ...) -> None: ...

class CollectRequest(_message.Message):
    __slots__ = ("round_id", "include")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    include: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, round_id: _Optional[int] = ..., include: _Optional[_Iterable[str]] = ...) -> None: ...

class ReportRejected(_message.Message):
    __slots__ = ("round_id", "dp_rank", "reason")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    dp_rank: int
    reason: str
    def __init__(self, round_id: _Optional[int] = ..., dp_rank: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class AggregatorMessage(_message.Message):
    __slots__ = ("welcome", "collect", "rejected")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    COLLECT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    collect: CollectRequest
    rejected: ReportRejected
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., collect: _Optional[_Union[CollectRequest, _Mapping]] = ..., rejected: _Optional[_Union[ReportRejected, _Mapping]] = ...) -> None: ...
