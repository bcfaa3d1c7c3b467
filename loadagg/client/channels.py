"""How routers (LoadClient, `loadagg loads`) open a channel to the aggregator: TLS / mutual TLS and the
router token, sent as `authorization: Bearer <token>` on every call by a client interceptor (so it
works on plaintext and TLS channels alike, and on every RPC the stubs gain later)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from loadagg.common import AUTHORIZATION, TlsClient


@dataclass(frozen=True, slots=True)
class ChannelSecurity(TlsClient):
    """A router's channel to the aggregator: the router token and TLS (fields and checks: common.TlsClient)."""

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(**self.pem_files())

    def options(self) -> list[tuple[str, str]]:
        return self.name_options()


def _with_token(details, token: str):
    """aio ClientCallDetails is a namedtuple: a copy with the token appended to the call's metadata."""
    metadata = grpc.aio.Metadata(*(details.metadata or ()), (AUTHORIZATION, f"Bearer {token}"))
    return details._replace(metadata=metadata)


class _AioTokenUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    # grpc.aio files each interceptor under the FIRST call kind it subclasses: one class per kind.
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_token(details, self._token), request)


class _AioTokenUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_token(details, self._token), request)


class _AioTokenStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self._token), request_iterator)


class _AioTokenStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_token(details, self._token), request_iterator)


def _aio_token_interceptors(token: str) -> list:
    return [kind(token) for kind in (_AioTokenUnaryUnary, _AioTokenUnaryStream, _AioTokenStreamUnary,
                                     _AioTokenStreamStream)]


class _SyncToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_SyncDetails.of(details, self._token), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_SyncDetails.of(details, self._token), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(_SyncDetails.of(details, self._token), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(_SyncDetails.of(details, self._token), request_iterator)


class _SyncDetails(grpc.ClientCallDetails):
    """The sync ClientCallDetails is an abstract class, not a namedtuple: copy it with the token added."""

    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression

    @classmethod
    def of(cls, details, token: str) -> _SyncDetails:
        metadata = [*(details.metadata or ()), (AUTHORIZATION, f"Bearer {token}")]
        return cls(details.method, details.timeout, metadata, details.credentials,
                   getattr(details, "wait_for_ready", None), getattr(details, "compression", None))


def aio_channel(target: str, security: ChannelSecurity | None = None, options=()) -> grpc.aio.Channel:
    security = security or ChannelSecurity()
    options = [*options, *security.options()]
    interceptors = _aio_token_interceptors(security.token) if security.token else None
    if security.uses_tls:
        return grpc.aio.secure_channel(target, security.credentials(), options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


def sync_channel(target: str, security: ChannelSecurity | None = None, options=()) -> grpc.Channel:
    security = security or ChannelSecurity()
    options = [*options, *security.options()]
    if security.uses_tls:
        channel = grpc.secure_channel(target, security.credentials(), options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    return grpc.intercept_channel(channel, _SyncToken(security.token)) if security.token else channel
