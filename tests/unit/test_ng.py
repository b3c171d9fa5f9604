"""bench.ng: bencode codec, NG framing and the SDP helpers (no sockets but one fake peer)."""

from __future__ import annotations

import random
import socket
import threading

import pytest

from bench.ng import (
    MAX_DEPTH,
    NgClient,
    NgError,
    NgReplyError,
    NgTimeout,
    audio_sdp,
    decode,
    decode_message,
    encode,
    encode_message,
    parse_media,
)


@pytest.mark.parametrize("value, wire", [
    (b"spam", b"4:spam"),
    ("", b"0:"),
    (0, b"i0e"),
    (-42, b"i-42e"),
    (2 ** 63, b"i9223372036854775808e"),
    ([], b"le"),
    ({}, b"de"),
    (["a", 1, [b"x"]], b"l1:ai1el1:xee"),
    ({"b": 1, "a": "x"}, b"d1:a1:x1:bi1ee"),  # keys sorted on the wire
    ("é", b"2:\xc3\xa9"),
])
def test_encode_known_wire_forms(value, wire):
    assert encode(value) == wire


def test_round_trip_nested_message():
    message = {"command": "offer", "call-id": "c1@host", "sdp": audio_sdp("198.51.100.10", 4000),
               "flags": ["trust-address"], "replace": ["origin", "session-connection"],
               "n": -7, "nested": {"list": [1, [2, [3]], {"k": b"v"}]}}
    back = decode(encode(message))
    assert back == {**message, "nested": {"list": [1, [2, [3]], {"k": "v"}]}}


def test_decode_bytes_mode_and_non_utf8_round_trip():
    raw = b"\xff\xfe\x00binary"
    assert decode(encode(raw), text=False) == raw
    as_text = decode(encode(raw))  # surrogate escapes keep the bytes
    assert encode(as_text) == encode(raw)


def test_decoder_accepts_unsorted_keys_as_rtpengine_sends_them():
    assert decode(b"d6:result2:ok3:sdp3:v=0e") == {"result": "ok", "sdp": "v=0"}
    assert decode(b"d3:sdp3:v=06:result2:oke") == {"sdp": "v=0", "result": "ok"}


@pytest.mark.parametrize("wire, why", [
    (b"", "empty"),
    (b"4:spa", "truncated"),
    (b"i12", "truncated"),
    (b"ie", "bad integer"),
    (b"i-e", "bad integer"),
    (b"i1x2e", "bad integer"),
    (b"i-0e", "leading zero"),
    (b"i03e", "leading zero"),
    (b"03:abc", "leading zero"),
    (b"-3:abc", "unexpected byte"),
    (b"l1:a", "truncated list"),
    (b"d1:a", "truncated"),
    (b"d1:ai1e", "truncated dictionary"),
    (b"di1ei2ee", "not a string"),
    (b"d1:ai1e1:ai2ee", "repeated"),
    (b"i1ei2e", "trailing"),
    (b"4:spamX", "trailing"),
    (b"x", "unexpected byte"),
    (b"i" + b"9" * 5000 + b"e", "digits"),
    (b"99999999999:abc", "truncated string"),
])
def test_malformed_input_raises_ng_error(wire, why):
    with pytest.raises(NgError, match=why):
        decode(wire)


def test_depth_bound_on_both_sides():
    deep = b"l" * (MAX_DEPTH + 1) + b"e" * (MAX_DEPTH + 1)
    with pytest.raises(NgError, match="nests deeper"):
        decode(deep)
    assert decode(b"l" * 10 + b"e" * 10, max_depth=11) is not None
    value: list = []
    for _ in range(MAX_DEPTH + 1):
        value = [value]
    with pytest.raises(NgError, match="nests deeper"):
        encode(value)


@pytest.mark.parametrize("value", [True, 1.5, None, {1: "x"}, {"a": object()}])
def test_encode_rejects_what_bencode_cannot_carry(value):
    with pytest.raises(NgError):
        encode(value)


def test_random_garbage_never_crashes_the_decoder():
    rng = random.Random(5)
    good = encode_message("ck1", {"result": "ok", "sdp": audio_sdp("127.0.0.1", 5000),
                                  "list": [1, 2, {"x": "y"}]})
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            pos = rng.randrange(len(data) + 1)
            if op < 0.4 and pos < len(data):
                data[pos] = rng.randrange(256)
            elif op < 0.7:
                del data[pos:]
            else:
                data.insert(pos, rng.randrange(256))
        try:
            decode_message(bytes(data))
        except NgError:
            pass  # the only exception allowed


def test_message_framing_round_trip_and_errors():
    data = encode_message("a1b2", {"command": "ping"})
    assert data == b"a1b2 d7:command4:pinge"
    assert decode_message(data) == ("a1b2", {"command": "ping"})
    for bad in (b"d7:command4:pinge", b" d7:command4:pinge", b"ck le", b"ck i1e",
                b"ck d7:command4:pingee", b"\xff d1:ai1ee"):
        with pytest.raises(NgError):
            decode_message(bad)
    with pytest.raises(NgError, match="cookie"):
        encode_message("has space", {})
    with pytest.raises(NgError, match="dictionary"):
        encode_message("ck", ["not", "a", "dict"])  # type: ignore[arg-type]


def test_audio_sdp_and_parse_media():
    sdp = audio_sdp("198.51.100.10", 4000)
    assert "m=audio 4000 RTP/AVP 0 8\r\n" in sdp and "c=IN IP4 198.51.100.10\r\n" in sdp
    assert "a=rtpmap:0 PCMU/8000\r\n" in sdp and "a=rtpmap:8 PCMA/8000\r\n" in sdp
    assert "m=audio 4000 RTP/AVP 0\r\n" in audio_sdp("198.51.100.10", 4000, payload_types=[0])
    with pytest.raises(ValueError):
        audio_sdp("198.51.100.10", 4000, payload_types=[96])
    assert parse_media(sdp) == ("198.51.100.10", 4000)
    assert parse_media(audio_sdp("2001:db8::1", 4002)) == ("2001:db8::1", 4002)
    # media-level c= wins over the session-level one; the first audio stream counts
    rewritten = ("v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nc=IN IP4 198.51.100.1\r\n"
                 "t=0 0\r\nm=video 5000 RTP/AVP 96\r\nm=audio 30000 RTP/AVP 0\r\n"
                 "c=IN IP4 198.51.100.65\r\na=rtcp:30001\r\nm=audio 31000 RTP/AVP 0\r\n")
    assert parse_media(rewritten) == ("198.51.100.65", 30000)
    with pytest.raises(NgError, match="no audio"):
        parse_media("v=0\r\nc=IN IP4 198.51.100.1\r\n")
    with pytest.raises(NgError, match="bad port"):
        parse_media("v=0\r\nc=IN IP4 198.51.100.1\r\nm=audio x RTP/AVP 0\r\n")


class FakeRtpengine:
    """A UDP peer on loopback that drops the first `drop` requests, then answers from
    `replies` (callables of the decoded request); records every datagram it got."""

    def __init__(self, reply, drop: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.address = self.sock.getsockname()
        self.reply = reply
        self.drop = drop
        self.got: list = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            self.got.append(data)
            if len(self.got) <= self.drop:
                continue
            cookie, request = decode_message(data)
            answer = self.reply(request)
            if answer is not None:
                self.sock.sendto(encode_message(cookie, answer), peer)

    def close(self) -> None:
        """Stop serving; what arrived meanwhile is recorded too (a client that gave up
        may have sent its last try a moment before)."""
        if self.sock.fileno() < 0:
            return
        self._stop.set()
        self.thread.join(5)
        self.sock.setblocking(False)
        try:
            while True:
                self.got.append(self.sock.recv(65535))
        except BlockingIOError:
            pass
        self.sock.close()


def test_client_retries_with_the_same_cookie():
    fake = FakeRtpengine(lambda req: {"result": "pong"}, drop=2)
    try:
        with NgClient(fake.address, timeout=0.5, retries=2) as client:
            assert client.ping() is True
        fake.close()
        assert len(fake.got) == 3
        assert len({d.split(b" ", 1)[0] for d in fake.got}) == 1  # one cookie, three tries
        assert len(set(fake.got)) == 1
    finally:
        fake.close()


def test_client_times_out_with_a_typed_error():
    fake = FakeRtpengine(lambda req: None)
    try:
        with NgClient(fake.address, timeout=0.1, retries=1) as client, \
                pytest.raises(NgTimeout, match="after 2 tries"):
            client.ping()
        fake.close()
        assert len(fake.got) == 2
    finally:
        fake.close()


def test_client_error_reply_and_request_keys():
    def reply(request):
        if request["command"] == "delete":
            return {"result": "error", "error-reason": "Unknown call-id"}
        return {"result": "ok", "sdp": request.get("sdp", "")}

    fake = FakeRtpengine(reply)
    try:
        with NgClient(fake.address, timeout=0.5) as client:
            client.offer("c1", "ft", "v=0", direction=["internal", "external"], ICE="remove",
                         transport_protocol="RTP/AVP")
            with pytest.raises(NgReplyError, match="Unknown call-id") as info:
                client.delete("c1", "ft")
            assert info.value.reason == "Unknown call-id"
        offer = decode_message(fake.got[0])[1]
        assert offer == {"command": "offer", "call-id": "c1", "from-tag": "ft", "sdp": "v=0",
                         "direction": ["internal", "external"], "ICE": "remove",
                         "transport-protocol": "RTP/AVP"}
        assert decode_message(fake.got[1])[1] == {"command": "delete", "call-id": "c1",
                                                  "from-tag": "ft"}
    finally:
        fake.close()
