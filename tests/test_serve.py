"""serve.py, the live page's server, over plain HTTP: a stream is the same video as stream.stream; a
switch acts from the chunk it names; one stream at a time (409 busy, a reloaded tab takes over); a
closed connection stops the generation; pacing keeps generation at most lead_s ahead of playback; bad
requests get a clear error and the server goes on. The server runs in a thread on a free port."""
import base64
import http.client
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

import serve
import stream
from data import _to_uint8
from test_stream import tiny_models

SHIPPED = stream.SHIPPED_RUN                                             # weights/ship, read only

PROMPT, OTHER = "a red circle moves right", "a blue square moves up"


def start_server(limits):
    srv = serve.make_server(SHIPPED, "127.0.0.1", 0, limits=limits)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def stop_server(srv):
    srv.app.close()
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def shipped():
    """The shipped weights/ship run behind the server, as `python stream.py --serve` starts it."""
    srv = start_server(serve.Limits(grace_s=1.0))
    yield srv
    stop_server(srv)


@pytest.fixture
def tiny():
    """The same server with a tiny random model (milliseconds per chunk, far ahead of playback)."""
    srv = start_server(serve.Limits(grace_s=1.0, lead_s=0.5, heartbeat_s=0.1))
    srv.app.loaded[srv.app.students[2]] = tiny_models()
    yield srv
    stop_server(srv)


# ----------------------------------------------------------------------------------------------
# Helpers: a client as the page is one
# ----------------------------------------------------------------------------------------------
def request(srv, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    return conn, conn.getresponse()


def post(srv, path, body, headers=None):
    """(status, JSON answer) of a short POST."""
    conn, res = request(srv, "POST", path, body, headers)
    out = json.loads(res.read() or b"null")
    conn.close()
    return res.status, out


class Stream:
    """POST /stream, read line by line: .lines() yields the JSON objects as they arrive."""

    def __init__(self, srv, **body):
        self.conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=60)
        self.conn.request("POST", "/stream", json.dumps({"prompt": PROMPT, **body}),
                          {"Content-Type": "application/json"})
        self.sock = self.conn.sock                          # http.client lets go of it for an HTTP/1.0 answer
        self.res = self.conn.getresponse()
        self.status = self.res.status

    def lines(self):
        for raw in self.res:
            yield json.loads(raw)

    def next(self, kind):
        """The next line of `kind`, skipping the others (an error line fails the test, unless awaited)."""
        for line in self.lines():
            if line["type"] == kind:
                return line
            assert line["type"] != "error", line
        raise AssertionError(f"the stream ended before a {kind} line")

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)                # as a closed tab: the connection goes
        self.res.close()
        self.conn.close()


def frames_of(line):
    """A chunk line's frames as (F, H, W, 3) uint8."""
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(f))).convert("RGB")) for f in line["frames"]])


def wait_idle(srv, seconds=20):
    deadline = time.time() + seconds
    while srv.app.active is not None and time.time() < deadline:
        time.sleep(0.05)
    return srv.app.active is None


# ----------------------------------------------------------------------------------------------
# The page and the run
# ----------------------------------------------------------------------------------------------
def test_page_and_info(shipped):
    conn, res = request(shipped, "GET", "/")
    page = res.read().decode()
    assert res.status == 200 and res.getheader("Content-Type").startswith("text/html")
    for needle in ("Start", "Stop", "Switch prompt", "/stream", "/switch", "/info"):
        assert needle in page
    assert "http://" not in page and "https://" not in page              # nothing from the network
    info = json.loads(request(shipped, "GET", "/info")[1].read())
    assert info["steps"] == [2] and info["default_steps"] == 2 and info["fps"] == 16 and info["size"] == 64
    assert info["vocabulary"] == len(info["words"]) == 61 and "circle" in info["words"]
    assert info["max_chunks"] == 1000 and info["model"] == "S2DiT-AR"
    assert request(shipped, "GET", "/nope")[1].status == 404


def test_each_student_is_offered_by_its_step_count(tmp_path):
    """A run with reproduce.py's dmd_4step beside train.py's dmd: /info offers 2 and 4 steps, and a
    stream at 4 steps is streamed by that student (here a copy of dmd's weights, declared for 4)."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(SHIPPED, run)
    marker = json.loads((run / "dmd.done.json").read_text())
    marker["metrics"]["config"]["n_steps"] = 4
    (run / "dmd_4step.done.json").write_text(json.dumps(marker))
    shutil.copy(run / "dmd.pt", run / "dmd_4step.pt")
    assert serve.find_students(str(run)) == {2: "dmd", 4: "dmd_4step"}
    srv = serve.make_server(str(run), "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert json.loads(request(srv, "GET", "/info")[1].read())["steps"] == [2, 4]
        s = Stream(srv, steps=4)
        assert s.next("start")["steps"] == 4
        c = s.next("chunk")
        assert c["ms"]["dit_per_step"] == pytest.approx(c["ms"]["dit_steps"] / 4, abs=0.1)
        s.close()
        assert wait_idle(srv) and srv.app.loaded[None].stage == "dmd"
        assert srv.app.loaded["dmd_4step"].steps == 4
    finally:
        srv.app.close()
        srv.shutdown()
        srv.server_close()


# ----------------------------------------------------------------------------------------------
# Streaming, switching, stopping
# ----------------------------------------------------------------------------------------------
def test_stream_is_the_video_of_stream_stream_with_its_timings(shipped):
    s = Stream(shipped, seed=5)
    assert s.status == 200 and s.res.getheader("Content-Type") == "application/x-ndjson"
    start = s.next("start")
    assert (start["prompt"], start["steps"], start["fps"], start["ignored"]) == (PROMPT, 2, 16, [])
    chunks = [s.next("chunk") for _ in range(2)]
    status, out = post(shipped, "/stop", {"id": start["id"]})
    assert status == 200 and out["stopping"] and out["chunks"] >= 2
    end = s.next("end")
    assert end["reason"] == "stopped" and wait_idle(shipped)
    assert [c["index"] for c in chunks] == [0, 1] and [len(c["frames"]) for c in chunks] == [9, 12]
    for c in chunks:
        assert set(c["ms"]) >= {"text_encoder", "dit_steps", "commit", "decoder", "total"}
        assert c["play_fps"] == 16 and c["gen_fps"] == pytest.approx(len(c["frames"]) / c["ms"]["total"] * 1e3, rel=0.01)
        assert c["video_ms"] == pytest.approx(len(c["frames"]) / 16 * 1e3)
    assert chunks[0]["ms"]["text_encoder"] > 0                            # the prompt is encoded for chunk 0
    ref = [_to_uint8(c.frames) for c in stream.stream(shipped.app.models_for(2), PROMPT, 2, seed=5)]
    for c, r in zip(chunks, ref):
        assert np.array_equal(frames_of(c), r)                           # PNG is lossless: the same pixels


def test_switch_acts_from_the_chunk_it_names_as_then_does(shipped):
    s = Stream(shipped, seed=2)
    sid = s.next("start")["id"]
    first = s.next("chunk")
    assert post(shipped, "/switch", {"id": sid, "prompt": "zebra giraffe"})[0] == 400     # the stream goes on
    assert post(shipped, "/switch", {"id": sid + 1, "prompt": OTHER})[0] == 409           # not this stream
    status, sw = post(shipped, "/switch", {"id": sid, "prompt": OTHER})
    assert status == 200 and sw["at_chunk"] >= 1 and sw["prompt"] == OTHER
    chunks = [first]
    while chunks[-1]["index"] < sw["at_chunk"]:
        chunks.append(s.next("chunk"))
    post(shipped, "/stop", {"id": sid})
    s.next("end")
    assert [c["prompt"] for c in chunks] == [PROMPT] * sw["at_chunk"] + [OTHER]
    assert chunks[-1]["ms"]["text_encoder"] > 0                          # the new prompt, encoded once
    # the same frames as stream.py --then at that chunk: one mechanism
    ref = list(stream.stream(shipped.app.models_for(2), PROMPT, sw["at_chunk"] + 1, seed=2, then=[(sw["at_chunk"], OTHER)]))
    assert np.array_equal(frames_of(chunks[-1]), _to_uint8(ref[-1].frames))
    assert wait_idle(shipped)


def test_second_stream_is_busy_until_the_first_stops(shipped):
    a = Stream(shipped)
    sid = a.next("start")["id"]
    t = time.time()
    status, err = post(shipped, "/stream", {"prompt": OTHER})
    assert status == 409 and "busy" in err["error"] and "Stop" in err["error"]
    assert time.time() - t >= shipped.app.limits.grace_s * 0.9            # it waited for a reload first
    assert post(shipped, "/stop", {"id": sid})[0] == 200
    assert a.next("end")["reason"] == "stopped" and wait_idle(shipped)
    b = Stream(shipped, prompt=OTHER)                                      # free again
    assert b.status == 200 and b.next("start")["prompt"] == OTHER
    b.close()
    assert wait_idle(shipped)


def test_closed_connection_stops_generation_and_a_reload_takes_over(shipped):
    a = Stream(shipped)
    a.next("start")
    a.next("chunk")
    session = shipped.app.active
    a.close()                                                              # the tab is reloaded
    b = Stream(shipped, prompt=OTHER)                                      # within the grace: it gets the stream
    assert b.status == 200 and b.next("start")["prompt"] == OTHER
    assert shipped.app.active is not session
    sent = session.chunks
    b.close()
    assert wait_idle(shipped)
    time.sleep(1.0)
    assert session.chunks == sent                                          # nothing generated for a closed page


# ----------------------------------------------------------------------------------------------
# Pacing, limits, failures (a tiny model, far faster than playback)
# ----------------------------------------------------------------------------------------------
def test_generation_is_paced_to_playback(tiny):
    s = Stream(tiny)
    s.next("start")
    arrivals, frames, beats = [], [], 0
    for line in s.lines():
        if line["type"] == "heartbeat":
            beats += 1
            continue
        arrivals.append(time.monotonic())
        frames.append(len(line["frames"]))
        assert line["ahead_s"] <= tiny.app.limits.lead_s + 12 / 16 + 0.05
        if len(arrivals) == 6:
            break
    s.close()
    assert wait_idle(tiny)
    lead = tiny.app.limits.lead_s
    for k in range(1, 6):            # chunk k starts once the page holds at most lead_s unplayed
        played_before = sum(frames[:k]) / 16
        assert arrivals[k] - arrivals[0] >= played_before - lead - 0.1, (k, arrivals[k] - arrivals[0], played_before)
    assert beats > 0                                                       # waits are heard, a closed page found


def test_a_stream_ends_at_max_chunks(tiny):
    tiny.app.limits.max_chunks, tiny.app.limits.lead_s = 3, 100.0
    s = Stream(tiny)
    s.next("start")
    assert [s.next("chunk")["index"] for _ in range(3)] == [0, 1, 2]
    assert s.next("end") == {"type": "end", "reason": "limit", "chunks": 3}
    assert wait_idle(tiny)


def test_a_failing_generation_is_an_error_line_and_the_server_goes_on(tiny, monkeypatch):
    dec = tiny.app.loaded[tiny.app.students[2]].decoder

    def broken(*a, **k):
        raise RuntimeError("decoder exploded")
    monkeypatch.setattr(dec, "decode_chunk", broken)
    s = Stream(tiny)
    s.next("start")
    err = s.next("error")
    assert "decoder exploded" in err["message"]
    assert wait_idle(tiny)
    monkeypatch.undo()
    s = Stream(tiny)
    s.next("start")
    assert s.next("chunk")["index"] == 0
    s.close()
    assert wait_idle(tiny)


def test_ctrl_c_ends_the_stream_cleanly():
    """`python stream.py --serve`, Ctrl-C while it streams: the page hears "server stopped", the process
    exits 0 (torch is not left in the middle of a chunk while the interpreter exits: that aborts)."""
    import os
    import re
    import signal
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(SHIPPED), "..", "stream.py"), "--serve",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # as in a shell
    try:
        first = proc.stdout.readline().decode()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", first).group(1))
        srv = type("Address", (), {"server_address": ("127.0.0.1", port)})
        s = Stream(srv)
        s.next("chunk")
        proc.send_signal(signal.SIGINT)
        assert s.next("end")["reason"] == "server stopped"
        assert proc.wait(timeout=60) == 0
        err = proc.stderr.read().decode()
        assert "Traceback" not in err and "terminate called" not in err, err
    finally:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------------------------
# Bad requests: a clear error, never a crash
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body, headers, status, needles", [
    ("/stream", {"prompt": ""}, None, 400, ["empty prompt"]),
    ("/stream", {"prompt": "?! \U0001F600"}, None, 400, ["empty prompt"]),
    ("/stream", {"prompt": "zebra giraffe"}, None, 400, ["knows none of these words: zebra, giraffe"]),
    ("/stream", {"prompt": 7}, None, 400, ["prompt as text"]),
    ("/stream", {}, None, 400, ["prompt as text"]),
    ("/stream", {"prompt": PROMPT, "steps": 4}, None, 400, ["steps 4", "2 step"]),
    ("/stream", {"prompt": PROMPT, "steps": "2"}, None, 400, ["steps '2'"]),
    ("/stream", {"prompt": PROMPT, "steps": True}, None, 400, ["steps True"]),
    ("/stream", {"prompt": PROMPT, "seed": -1}, None, 400, ["seed -1"]),
    ("/stream", b"{\"prompt\": ", None, 400, ["not valid JSON"]),
    ("/stream", b"\xff\xfe", None, 400, ["not valid JSON"]),
    ("/stream", [PROMPT], None, 400, ["JSON object"]),
    ("/stream", {"prompt": PROMPT}, {"Content-Type": "text/plain"}, 415, ["Content-Type: application/json"]),
    ("/stream", {"prompt": "a " * 20000}, None, 413, ["at most 16384"]),
    ("/switch", {"id": 12345, "prompt": PROMPT}, None, 409, ["has ended"]),
    ("/stop", {"id": "x"}, None, 409, ["has ended"]),
    ("/nope", {}, None, 404, ["POST /stream"]),
])
def test_bad_requests_get_a_clear_error(shipped, path, body, headers, status, needles):
    got, out = post(shipped, path, body, headers)
    assert got == status, out
    for n in needles:
        assert n in out["error"], (n, out)
    assert shipped.app.active is None


def raw(srv, data):
    """Send raw bytes, return the whole answer (for requests http.client would not send)."""
    with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=30) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_malformed_http_does_not_crash_the_server(shipped):
    answer = raw(shipped, b"POST /stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n")
    assert b" 411 " in answer.split(b"\r\n")[0] and b"Content-Length" in answer
    answer = raw(shipped, b"POST /stream HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: -5\r\n\r\n")
    assert b" 400 " in answer.split(b"\r\n")[0]
    huge = b"x" * (64 * 16384 + 1)                                          # past what is read away: closed
    answer = raw(shipped, b"POST /stream HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(huge))
    assert b" 413 " in answer.split(b"\r\n")[0]
    assert b"Error code: 400" in raw(shipped, b"HELLO THERE MY SERVER\r\n\r\n")   # not HTTP: an error page
    assert raw(shipped, b"DELETE /stream HTTP/1.1\r\n\r\n").split(b"\r\n")[0].split(b" ")[1] == b"501"
    with socket.create_connection(("127.0.0.1", shipped.server_address[1])):
        pass                                                               # connect, say nothing, leave
    assert json.loads(request(shipped, "GET", "/info")[1].read())["fps"] == 16   # still serving
