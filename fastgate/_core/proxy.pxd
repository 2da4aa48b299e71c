# Augmenting declarations for fastgate/_core/_pure/proxy.py (compiled as fastgate._core.proxy):
# the classes become cdef classes with typed attributes and the internal methods C calls.
# Measured in shared/perf-notes.md: cdef classes with declared attributes cut ~2 us of the
# ~17 us of CPU per proxied request (+17% req/s) over the same code interpreted.
cimport cython


# The plugin chain, typed here so that walking it per request reads C fields (callgrind: eight
# generic attribute lookups per request on a key-auth + acl route).
cdef class PluginRun:
    cdef public str name
    cdef public long priority
    cdef public object instance
    cdef public frozenset protocols
    cdef public object access
    cdef public object response
    cdef public object body
    cdef public object log


cdef class Slot:
    cdef public PluginRun static
    cdef public int static_level
    cdef public dict by_consumer
    cdef public dict by_group
    cdef public bint dynamic

    @cython.locals(best=PluginRun, level=int, hit=tuple)
    cpdef PluginRun choose(self, object consumer)


cdef bytes chunk_frame(bytes body)


cdef class Stats:
    cdef public unsigned long long connections_accepted
    cdef public unsigned long long total_requests


cdef class Gateway:
    cdef public object loop
    cdef public object snapshot
    cdef public dict pools
    cdef public set clients
    cdef public set upstreams
    cdef public set connecting
    cdef public Stats stats
    cdef public bint draining
    cdef public unsigned long long tick_count
    cdef public object ticker
    cdef public object ssl_context
    cdef public object error_template
    cdef public unsigned long long connection_serial
    cdef public bytes request_id_prefix
    cdef public unsigned long long request_counter
    cdef public double now

    cpdef bytes next_request_id(self)
    cpdef UpstreamPool pool_for(self, object service)


cdef class Exchange:
    cdef public object snapshot
    cdef public double started
    cdef public ClientConnection client
    cdef public bytes url
    cdef public bytes method
    cdef public str http_version
    cdef public bytes host
    cdef public bint has_host
    cdef public bytes forwarded_for
    cdef public bytes via
    cdef public bytes connection_tokens
    cdef public list header_parts
    cdef public dict headers
    cdef public frozenset watched
    cdef public unsigned long long dashed_lengths
    cdef public Py_ssize_t head_size
    cdef public Py_ssize_t header_lines
    cdef public bint keep_alive
    cdef public bint chunked
    cdef public bint announced_body
    cdef public bint has_body
    cdef public bint body_complete
    cdef public list held_body
    cdef public Py_ssize_t held_body_size
    cdef public bint held_paused
    cdef public object body
    cdef public bint body_wanted
    cdef public PluginRun waiting_run
    cdef public bytes request_id
    cdef public object match
    cdef public bytes upstream_head
    cdef public double head_written_at
    cdef public bint retried_stale
    cdef public int attempts_left
    cdef public bint response_started
    cdef public UpstreamConnection upstream
    cdef public int status
    cdef public tuple chain
    cdef public Py_ssize_t plugin_index
    cdef public object consumer
    cdef public object credential
    cdef public object authenticated_groups
    cdef public list upstream_extra
    cdef public bytes upstream_path
    cdef public bytes upstream_host
    cdef public list responders
    cdef public list response_headers
    cdef public list body_filters
    cdef public list loggers
    cdef public bytes correlation_id
    cdef public bint cors_preflight
    cdef public dict plugin_data

    cpdef object read_body(self)


cdef class ClientConnection:
    cdef public Gateway gateway
    cdef public object loop
    cdef public int listen_port
    cdef public bytes forwarded_headers
    cdef public bytes scheme
    cdef public object transport
    cdef public object parser
    cdef public bytes peer
    cdef public bytes local_address
    cdef public unsigned long long serial
    cdef public unsigned long long requests
    cdef public Exchange parsing
    cdef public Exchange current
    cdef public list pending
    cdef public bint closed
    cdef public bint write_paused
    cdef public int read_pauses
    cdef public int reject_status
    cdef public bint broken
    cdef public bint lingering
    cdef public double deadline

    @cython.locals(match=object, chain=tuple)
    cdef dispatch(self, Exchange exchange)
    @cython.locals(chain=tuple, count=Py_ssize_t, run=PluginRun, slot=Slot)
    cdef bint run_access(self, Exchange exchange, Py_ssize_t index)
    cdef bint call_access(self, Exchange exchange, PluginRun run, Py_ssize_t index)
    @cython.locals(run=PluginRun)
    cdef body_arrived(self, Exchange exchange)
    @cython.locals(body=bytes)
    cdef replace_body(self, Exchange exchange)
    cdef collect(self, Exchange exchange, PluginRun run)
    @cython.locals(chain=tuple, position=Py_ssize_t, run=PluginRun, slot=Slot)
    cdef collect_rest(self, Exchange exchange, Py_ssize_t index)
    cdef respond_exit(self, Exchange exchange, object result)
    @cython.locals(upstream=UpstreamConnection, pool=UpstreamPool)
    cdef forward(self, Exchange exchange)
    @cython.locals(parts=list)
    cdef bytes upstream_head(self, Exchange exchange, object match)
    cdef _drop_connection_listed(self, Exchange exchange)
    @cython.locals(parts=list)
    cdef respond_error(self, Exchange exchange, int status, str message, object extra_headers=*)
    @cython.locals(parts=list, head=list)
    cdef respond(self, Exchange exchange, int status, bytes content_type, bytes body, object extra_headers)
    @cython.locals(exchange=Exchange)
    cdef reject_request(self)
    @cython.locals(following=Exchange)
    cpdef finish(self, Exchange exchange)
    cpdef upstream_failed(self, Exchange exchange, int status, str message)
    cpdef pause_reading(self)
    cpdef resume_reading(self)
    cpdef close(self)
    cpdef expire(self)


cdef class UpstreamPool:
    cdef public Gateway gateway
    cdef public str host
    cdef public int port
    cdef public bint tls
    cdef public list idle

    @cython.locals(upstream=UpstreamConnection)
    cpdef UpstreamConnection acquire(self)
    cpdef release(self, UpstreamConnection upstream)
    cpdef forget(self, UpstreamConnection upstream)
    cpdef connect(self, ClientConnection client, Exchange exchange)


cdef class ConnectAttempt:
    cdef public UpstreamPool pool
    cdef public ClientConnection client
    cdef public Exchange exchange
    cdef public object future
    cdef public double deadline
    cdef public bint timed_out

    cpdef start(self)
    cpdef expire(self)


cdef class UpstreamConnection:
    cdef public UpstreamPool pool
    cdef public Gateway gateway
    cdef public object loop
    cdef public object transport
    cdef public object parser
    cdef public ClientConnection client
    cdef public Exchange exchange
    cdef public bint closed
    cdef public bint reused
    cdef public double deadline
    cdef public double read_timeout
    cdef public double write_timeout
    cdef public bint reading_paused
    cdef public bint write_paused
    cdef public bytes reason
    cdef public list header_parts
    cdef public bint has_server
    cdef public bint has_length
    cdef public bint upstream_chunked
    cdef public bytes via
    cdef public bint head_done
    cdef public bint chunk_out
    cdef public bint until_eof
    cdef public bint complete
    cdef public bint keep_alive
    cdef public list out

    cdef _reset_response(self)
    cdef run_responders(self, Exchange exchange, int status)
    cpdef attach(self, ClientConnection client, Exchange exchange)
    cdef _arm_read_deadline(self)
    cpdef send_body(self, bytes body, bint chunked)
    cpdef send_body_end(self)
    cpdef request_sent(self)
    cpdef pause_reading(self)
    cpdef resume_reading(self)
    @cython.locals(client=ClientConnection)
    cdef ClientConnection _detach(self)
    @cython.locals(exchange=Exchange, client=ClientConnection)
    cpdef finish(self)
    @cython.locals(exchange=Exchange, client=ClientConnection)
    cpdef fail(self)
    @cython.locals(exchange=Exchange, client=ClientConnection)
    cpdef expire(self, double now)
    cpdef close(self)
    cpdef abort(self)
