# Augmenting declarations for fastgate/_core/_pure/plugins.py (compiled as fastgate._core.plugins):
# the plugin runtime and the built-in plugins' handlers become cdef classes with typed attributes.
cimport cython

# Typed access to the request's fields (C attribute reads instead of Python getattr: measured
# in bench/auth.py). The proxy does not import this module back, so there is no import cycle.
from fastgate._core.proxy cimport Exchange, ClientConnection
from fastgate._core.limiter cimport SharedCounters


cdef class Exit:
    cdef public int status
    cdef public object message
    cdef public object headers
    cdef public object body
    cdef public object content_type


cdef class ConsumerInfo:
    cdef public str id
    cdef public bytes id_bytes
    cdef public object username
    cdef public object custom_id
    cdef public tuple acl_groups
    cdef public tuple group_ids
    cdef public tuple group_names
    cdef public bytes identity_lines
    cdef public bytes groups_line
    cdef public bytes groups_with_consumer_groups_line


cdef class CredentialInfo:
    cdef public str id
    cdef public ConsumerInfo consumer
    cdef public double expires_at
    cdef public bytes lines


@cython.locals(headers=dict, name=bytes)
cdef _strip_identity(Exchange exchange)
@cython.locals(extra=list)
cdef _add_upstream(Exchange exchange, bytes lines)


cdef class PluginContext:
    cdef public dict consumers
    cdef public dict consumers_by_username
    cdef public object key_index
    cdef public object counters
    cdef public object plugin_id
    cdef public object route_id
    cdef public object service_id
    cdef public object consumer_group_id


cdef class KeyAuthHandler:
    cdef public tuple key_names
    cdef public tuple body_names
    cdef public bint key_in_header
    cdef public bint key_in_query
    cdef public bint key_in_body
    cdef public bint hide_credentials
    cdef public bint run_on_preflight
    cdef public object index
    cdef public object anonymous_reference
    cdef public ConsumerInfo anonymous
    cdef public tuple challenge
    cdef public tuple watched_headers

    @cython.locals(consumer=ConsumerInfo)
    cpdef access(self, Exchange exchange)
    @cython.locals(headers=dict, values=list, credential=CredentialInfo, name=bytes, position=Py_ssize_t, count=int)
    cdef authenticate(self, Exchange exchange, object body)
    @cython.locals(name=bytes)
    cdef hide(self, Exchange exchange, Py_ssize_t position, object body)


cdef class AclHandler:
    cdef public bint allow
    cdef public frozenset groups
    cdef public bint hide_groups_header
    cdef public bint always_use_authenticated_groups
    cdef public bint include_consumer_groups
    cdef public Exit forbidden
    cdef public Exit unauthorized
    cdef public tuple watched_headers

    @cython.locals(consumer=ConsumerInfo, groups=tuple, headers=dict, header_name=bytes)
    cpdef access(self, Exchange exchange)


cdef class RequestTerminationHandler:
    cdef public int status
    cdef public bint echo
    cdef public bytes trigger
    cdef public tuple watched_headers
    cdef public bytes exit_body
    cdef public bytes content_type

    @cython.locals(headers=dict)
    cpdef access(self, Exchange exchange)


cdef class CorrelationIdHandler:
    cdef public bytes name
    cdef public bytes canonical
    cdef public str generator
    cdef public bint echo_downstream
    cdef public tuple watched_headers
    cdef public bytes worker_uuid
    cdef public unsigned long long counter
    cdef public long pid

    @cython.locals(client=ClientConnection)
    cdef bytes generate(self, Exchange exchange)
    @cython.locals(headers=dict, values=list)
    cpdef access(self, Exchange exchange)
    cpdef response(self, Exchange exchange, int status, list parts)


cdef class CorsHandler:
    cdef public bint any_origin
    cdef public object single_origin
    cdef public set plain
    cdef public list patterns
    cdef public bytes headers
    cdef public bytes exposed
    cdef public bytes methods
    cdef public bytes max_age
    cdef public bint credentials
    cdef public bint private_network
    cdef public bint preflight_continue
    cdef public bint allow_origin_absent
    cdef public tuple watched_headers

    cdef tuple allowed_origin(self, bytes origin)
    @cython.locals(headers=dict, values=list)
    cdef bytes origin_of(self, Exchange exchange)
    @cython.locals(headers=dict, out=list)
    cpdef access(self, Exchange exchange)
    cpdef response(self, Exchange exchange, int status, list parts)


cdef class HeaderEdits:
    cdef public frozenset remove
    cdef public tuple rename
    cdef public tuple replace
    cdef public tuple add
    cdef public tuple append
    cdef public bint empty


cdef class FieldEdits:
    cdef public frozenset remove
    cdef public tuple rename
    cdef public tuple replace
    cdef public tuple add
    cdef public tuple append
    cdef public bint empty


cdef class RequestTransformerHandler:
    cdef public bytes method
    cdef public object uri
    cdef public HeaderEdits headers
    cdef public object host
    cdef public FieldEdits query_edits
    cdef public FieldEdits body_edits
    cdef public bint method_to_query
    cdef public tuple watched_headers

    cpdef access(self, Exchange exchange)


cdef class ResponseTransformerHandler:
    cdef public HeaderEdits headers

    cpdef response(self, Exchange exchange, int status, list parts)


cdef class RateLimitBase:
    cdef public int limit_by
    cdef public bytes header_name
    cdef public bytes path
    cdef public bytes scope_group
    cdef public SharedCounters counters
    cdef public bint hide_client_headers
    cdef public int error_code
    cdef public str error_message
    cdef public tuple watched_headers
    cdef public object redis
    cdef public object redis_config
    cdef public bint fault_tolerant
    cdef public bytes redis_prefix
    cdef public bytes redis_suffix
    cdef public double sync_rate
    cdef public object synced
    cdef public str plugin_id
    cdef public tuple limits
    cdef public tuple windows
    cdef public tuple window_lines
    cdef public tuple summary_lines

    cdef init_identifier(self, object config, object context, str limit_by)
    cdef object synced_for(self, Exchange exchange)
    cdef object redis_check(self, Exchange exchange, bytes request, double now, object starts)
    cdef summary(self, list parts, Py_ssize_t lowest, long long remaining, long long reset, long long retry_after)
    cdef object redis_failed(self, Exchange exchange)
    cpdef redis_answered(self, double now, object starts, Exchange exchange, object future, object reply)
    @cython.locals(lines=list)
    cdef object decided(self, Exchange exchange, double now, object starts, Py_ssize_t denied, list values)
    cdef object local(self, Exchange exchange)
    cdef list headers(self, double now, object starts, list values, Py_ssize_t denied)
    @cython.locals(values=list, url=bytes, query_at=Py_ssize_t)
    cdef bytes identifier(self, Exchange exchange)




cdef class RateLimitingHandler(RateLimitBase):
    cdef public bytes scope
    cdef public tuple names
    cdef public tuple seconds

    @cython.locals(starts=list, seconds=long)
    cdef tuple window_starts(self, double now)
    @cython.locals(now=double, starts=tuple, request=bytes)
    cpdef access(self, Exchange exchange)
    @cython.locals(prefix=bytes, i=Py_ssize_t)
    cdef tuple keys(self, Exchange exchange, tuple starts)
    @cython.locals(now=double, starts=tuple, prefix=bytes, keys=tuple, denied=Py_ssize_t)
    cdef object local(self, Exchange exchange)
    @cython.locals(now=double, starts=tuple, keys=tuple, usages=list, denied=Py_ssize_t, i=Py_ssize_t)
    cdef object synced_check(self, Exchange exchange)
    @cython.locals(parts=list, lowest=Py_ssize_t, lowest_remaining=double, remaining=double, shown=double, i=Py_ssize_t,
                   reset=long)
    cdef list headers(self, double now, object starts, list values, Py_ssize_t denied)


cdef class RateLimitingAdvancedHandler(RateLimitBase):
    cdef public tuple sizes
    cdef public bint sliding
    cdef public bint penalty
    cdef public int jitter
    cdef public tuple suffixes
    cdef public bytes prefix

    @cython.locals(starts=list, weights=list, window=cython.longlong, now_ms=cython.longlong, start=cython.longlong,
                   i=Py_ssize_t)
    cdef tuple windows_now(self, double now)
    @cython.locals(prefix=bytes, keys=list, i=Py_ssize_t)
    cdef list redis_keys(self, Exchange exchange, list starts)
    @cython.locals(now=double, starts=list, weights=list, keys=list, denied=Py_ssize_t, rates=list, counted=Py_ssize_t,
                   i=Py_ssize_t, lifetime=long, expires_at=double, current=double, rate=double)
    cdef object synced_check(self, Exchange exchange)
    @cython.locals(now=double, starts=list, weights=list, keys=list, request=bytes)
    cpdef access(self, Exchange exchange)
    @cython.locals(now=double, starts=list, weights=list, prefix=bytes, keys=tuple, denied=Py_ssize_t, rate=double)
    cdef object local(self, Exchange exchange)
    @cython.locals(parts=list, rate=double, lowest=Py_ssize_t, lowest_remaining=double, lowest_rate=double,
                   remaining=double, size=long, reset=long, i=Py_ssize_t)
    cdef list headers(self, double now, object starts, list values, Py_ssize_t denied)
