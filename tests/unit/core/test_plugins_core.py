"""The plugin runtime's building blocks, compiled and pure (fastgate/_core/_pure/plugins.py)."""

from __future__ import annotations

import pytest


@pytest.fixture
def core(core_module):
    return core_module("plugins")


@pytest.fixture
def chain(core_module):
    """The plugin chain types live with the proxy that walks them."""
    return core_module("proxy")


class Marker:
    """A plugin instance that only has a name, to see which one a slot picks."""

    def __init__(self, label):
        self.label = label

    def access(self, exchange):
        return None


def run(chain, label):
    return chain.PluginRun("p", 10, Marker(label), ["http", "https"])


def consumer(core, consumer_id, group_ids=()):
    return core.ConsumerInfo(consumer_id, None, None, (), list(group_ids), [f"name-{g}" for g in group_ids])


def test_canonical_header_names(core):
    assert core.canonical_header(b"X_Api-KEY") == b"x-api-key"


def test_header_list_edits(core):
    parts = [b"A", b": ", b"1", b"\r\n", b"x_b", b": ", b"2", b"\r\n", b"X-B", b": ", b"3", b"\r\n"]
    assert core.header_values(parts, b"x-b") == [b"2", b"3"]
    assert core.without_headers(parts, frozenset({b"x-b"})) == parts[:4]


def test_query_args_decode_names_values_and_flags(core):
    assert core.query_args(b"/p?a=1&b&c=x%20y+z&&d%2De=") == [
        (b"a", b"1"), (b"b", None), (b"c", b"x y z"), (b"d-e", b""),
    ]
    assert core.query_args(b"/p") == []
    assert core.has_query_arg(b"/p?X_Stop", b"x-stop")
    assert not core.has_query_arg(b"/p?x=stop", b"stop")


def test_url_without_args_keeps_the_rest_verbatim(core):
    assert core.url_without_args(b"/p?a=1&key=s&b=%20&key=t", {b"key"}) == b"/p?a=1&b=%20"
    assert core.url_without_args(b"/p?k%65y=s", {b"key"}) == b"/p"
    assert core.url_without_args(b"/p", {b"key"}) == b"/p"


def test_slot_precedence(core, chain):
    static, by_consumer, by_group = run(chain, "route"), run(chain, "consumer"), run(chain, "group")
    alpha, beta = run(chain, "alpha"), run(chain, "beta")
    slot = chain.Slot(static, 10, {"c1": (8, by_consumer), "c3": (12, by_consumer)},
                     {"g-gold": (9, by_group), "g-a": (9, alpha), "g-b": (9, beta)})
    assert slot.dynamic
    assert slot.choose(None) is static  # before authentication
    assert slot.choose(consumer(core, "c1", ["g-gold"])) is by_consumer  # 8 beats 9 and 10
    assert slot.choose(consumer(core, "c2", ["g-gold"])) is by_group  # 9 beats 10
    assert slot.choose(consumer(core, "c3")) is static  # 12 does not beat 10
    # A tie at one level: the first group in the consumer's order (sorted by name) wins.
    assert slot.choose(consumer(core, "c4", ["g-a", "g-b"])) is alpha
    assert slot.choose(consumer(core, "c4", ["g-b", "g-a"])) is beta
    only_consumers = chain.Slot(None, 13, {"c1": (8, by_consumer)}, None)
    assert only_consumers.choose(consumer(core, "c9")) is None
    assert not chain.Slot(static, 12, None, None).dynamic


def test_plugin_run_binds_phases(chain):
    bound = run(chain, "x")
    assert bound.access is not None and bound.response is None and bound.log is None
    assert bound.protocols == frozenset({b"http", b"https"})

    class Broken:
        body = b"not a method"

    with pytest.raises(TypeError, match="phase name"):
        chain.PluginRun("broken", 1, Broken(), ["http"])


def test_consumer_and_credential_upstream_lines(core):
    info = core.ConsumerInfo("id-1", "alice", None, ("chat", "admin"), ["g-1"], ["gold"])
    assert info.identity_lines == b"X-Consumer-ID: id-1\r\nX-Consumer-Username: alice\r\n"
    assert info.groups_line == b"X-Consumer-Groups: chat, admin\r\n"
    assert info.groups_with_consumer_groups_line == b"X-Consumer-Groups: chat, admin, gold\r\n"
    credential = core.CredentialInfo("cred-1", info, 0.0)
    assert credential.lines == info.identity_lines + b"X-Credential-Identifier: cred-1\r\n"
    assert core.ConsumerInfo("id-2", None, "c-2", (), [], []).identity_lines == (
        b"X-Consumer-ID: id-2\r\nX-Consumer-Custom-ID: c-2\r\n"
    )


@pytest.mark.parametrize(
    ("template", "pieces"),
    [
        ("plain", (b"plain",)),
        ("$(headers.x-a)", (("headers", "x-a"),)),
        ('a-$(headers["X B"])-$(query_params.q)', (b"a-", ("headers", "X B"), b"-", ("query_params", "q"))),
        ("/v/$(uri_captures[1])/$(uri_captures['n'])", (b"/v/", ("uri_captures", 1), b"/", ("uri_captures", "n"))),
    ],
)
def test_templates_parse(core, template, pieces):
    assert core.parse_template(template) == pieces


@pytest.mark.parametrize("template", ["$(shared.x)", "$(headers.x or 'y')", "$(1+1)"])
def test_templates_refuse_other_expressions(core, template):
    with pytest.raises(ValueError):
        core.parse_template(template)


def test_origins_normalise(core):
    assert core.normalize_origin(b"HTTPS://App.Example.com:443/path") == b"https://app.example.com"
    assert core.normalize_origin(b"http://a.test:8080") == b"http://a.test:8080"
    assert core.normalize_origin(b"http://[::1]:80") == b"http://[::1]"


def test_json_dumps_is_compact_and_escaped(core):
    assert core.json_dumps({"a": [1, True, None, b"b\"", "\n"]}) == '{"a":[1,true,null,"b\\"","\\u000a"]}'


# -- request bodies (key-auth's key_in_body, request-transformer's body edits) ----------------


def multipart_body(*parts: bytes, preamble: bytes = b"", boundary: bytes = b"b0") -> bytes:
    return preamble + b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts) + b"--" + boundary + b"--\r\n"


def test_multipart_parts_split_on_delimiter_lines_only(core):
    # The boundary text inside a part (not after a CRLF) does not split it; a preamble and a
    # part without a name are kept; the name is read from Content-Disposition, quoted or not.
    body = multipart_body(
        b'Content-Disposition: form-data; name="a"\r\n\r\nsee --b0 inside',
        b'content-disposition: form-data; filename="f.txt"; name=b\r\nContent-Type: text/plain\r\n\r\nfile\r\nlines',
        b"X-Other: 1\r\n\r\nnameless",
        b"\r\nno headers at all",
        preamble=b"ignored preamble\r\n",
    )
    fields = core.multipart_fields(body, b"b0")
    assert [(name, content) for name, _, content in fields] == [
        (b"a", b"see --b0 inside"), (b"b", b"file\r\nlines"), (None, b"nameless"), (None, b"no headers at all"),
    ]
    parsed = core.RequestBody(core.BODY_MULTIPART, b"b0", body)
    parsed.rename(b"b", b"renamed")
    reparsed = core.multipart_fields(parsed.encode(), b"b0")
    # Renaming keeps the part's other headers (its filename and type).
    assert reparsed[1][1] == b'content-disposition: form-data; filename="f.txt"; name="renamed"\r\nContent-Type: text/plain'
    assert [(name, content) for name, _, content in reparsed] == [
        (b"a", b"see --b0 inside"), (b"renamed", b"file\r\nlines"), (None, b"nameless"), (None, b"no headers at all"),
    ]


@pytest.mark.parametrize(
    "body",
    [b"--b0\r\nContent-Disposition: form-data; name=a\r\n\r\nno end", b"--b0 junk\r\n\r\nx\r\n--b0--\r\n",
     b"--b0\r\nno blank line\r\n--b0--\r\n"],
    ids=["no-close", "bad-delimiter-line", "no-blank-line"],
)
def test_malformed_multipart_is_refused(core, body):
    with pytest.raises(ValueError):
        core.RequestBody(core.BODY_MULTIPART, b"b0", body)


def test_body_format_from_content_type(core):
    class Request:
        def __init__(self, content_type):
            self.headers = {b"content-type": [content_type]} if content_type else None

    assert core.body_format(Request(b"Application/JSON; charset=utf-8")) == (core.BODY_JSON, b"")
    assert core.body_format(Request(b"application/x-www-form-urlencoded")) == (core.BODY_FORM, b"")
    assert core.body_format(Request(b'multipart/form-data; boundary="a b"; x=1')) == (core.BODY_MULTIPART, b"a b")
    assert core.body_format(Request(b"multipart/form-data; BOUNDARY=xyz")) == (core.BODY_MULTIPART, b"xyz")
    assert core.body_format(Request(b"text/plain")) == (0, b"")
    assert core.body_format(Request(None)) == (0, b"")


def test_body_keys_and_edits_by_format(core):
    form = core.RequestBody(core.BODY_FORM, b"", b"k=1&flag&k2=a+b&dup=1&dup=2")
    assert [form.key(name) for name in (b"k", b"flag", b"k2", b"dup", b"none")] == [
        (1, b"1"), (0, None), (1, b"a b"), (2, None), (0, None),
    ]
    assert not form.changed
    form.remove(frozenset({b"absent"}))
    assert not form.changed  # nothing removed: the body would go upstream as it came
    form.append(b"k", b"x&y")
    assert form.changed and form.encode() == b"k=1&flag&k2=a%20b&dup=1&dup=2&k=x%26y"
    document = core.RequestBody(core.BODY_JSON, b"", b'{"a": 1, "b": "s", "c": [1]}')
    for name in (b"a", b"b", b"c"):
        document.append(name, b"t")
    document.add(b"a", b"never")
    document.replace(b"z", b"never")
    assert document.encode() == b'{"a":[1,"t"],"b":["s","t"],"c":[1,"t"]}'
    array = core.RequestBody(core.BODY_JSON, b"", b"[1, 2]")
    array.add(b"a", b"1")
    array.remove(frozenset({b"a"}))
    assert not array.changed  # only a JSON object has fields to edit
    with pytest.raises(ValueError):
        core.RequestBody(core.BODY_JSON, b"", b"{nope")
