"""The live page: type a prompt, watch the chunks arrive, switch the prompt mid-stream (paper Sec. D.2).

    python stream.py --serve            # then open http://127.0.0.1:8000   (Ctrl-C stops the server)

The paper's point is streaming: each chunk of 12 frames (0.75 s of video at 16 FPS) is ready before
the previous one has finished playing, and the prompt can change while the video goes on. The page
(serve.html) plays the frames at the clip rate as they arrive and shows, per chunk, the generation FPS
against the playback FPS and where the chunk's time went (text encoder, DiT steps, commit, decoder).

HTTP, from the standard library only (http.server); a stream is one JSON object per line ("NDJSON"):
    GET  /          the page (serve.html: no external resources)
    GET  /info      the run: step counts with a student, clip FPS, vocabulary, example prompts, limits
    POST /stream    {"prompt", "steps"?, "seed"?} -> lines {"type": "start" | "chunk" | "heartbeat" |
                    "end" | "error", ...}; a chunk line holds its frames as PNG (base64) and its timings
    POST /switch    {"id", "prompt"} -> {"at_chunk": n}: chunks n, n+1, ... follow the new prompt
                    (stream.stream's gen.send, the mechanism of stream.py --then)
    POST /stop      {"id"} -> the stream ends after its current chunk

Why one stream at a time: a second generation would halve the speed of both, and neither would keep
up with playback (a second tab gets HTTP 409 "busy", after a short grace in which a reloaded tab's
old stream ends). Why pacing: generation may run ahead of playback by `lead_s` seconds at most, so a
switch of prompt shows on screen within about that time, and a page nobody watches costs little.
Why heartbeats: a closed tab is found when a write to it fails or its socket reads end-of-file,
checked between chunks and while pacing; its generation stops there.
"""
import base64
import http.server
import io
import itertools
import json
import os
import select
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import data
import runs
import stream
import text as text_mod

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html")


@dataclass
class Limits:
    max_body: int = 16 * 1024      # bytes of a request body: a prompt is a line of text, not a file
    max_chunks: int = 1000         # chunks per stream (12.5 minutes at 16 FPS): no stream runs forever
    lead_s: float = 1.5            # generation waits while more than this many seconds are unplayed
    grace_s: float = 3.0           # a new stream waits this long for the running one to end, then 409
    heartbeat_s: float = 0.5       # while pacing, a line this often: a closed page shows as a failed write
    timeout_s: float = 30.0        # a socket read or write that blocks this long ends the request


class RequestError(Exception):
    """Bad request: an HTTP status and a message for the page, in one line."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


class ClientGone(Exception):
    """The page closed its connection (tab closed or reloaded, Stop)."""


def find_students(run_dir):
    """{steps: stage} for each streaming DiT of the run. A DMD student denoises with the one step count
    it was distilled for (stream.check_request), so each count needs its own student (train.py's dmd,
    reproduce.py's dmd_1step / dmd_4step); a run without one streams its flow-matching stage (kd,
    pretrain) at any count."""
    run = runs.open_run(run_dir)
    done = [f[:-len(".done.json")] for f in os.listdir(run_dir) if f.endswith(".done.json")]
    extra = sorted(s for s in done if s.startswith("dmd_"))          # reproduce.py's students
    students = {}
    for stage in ["dmd"] + extra:                           # train.py's own student first: it wins a tie
        if run.done(stage):
            students.setdefault(run.metrics(stage)["config"]["n_steps"], stage)
    if not students:
        flow_stage = next((s for s in runs.DIT_STAGES if run.done(s)), None)
        if flow_stage is None:
            raise FileNotFoundError(f"{run_dir} has no trained S2DiT; run `python train.py --out {run_dir}`")
        students = {n: flow_stage for n in (1, 2, 4, 8)}
    return dict(sorted(students.items()))


def png_frames(frames):
    """(3, F, H, W) in [-1, 1] -> F base64 PNG strings, the form a page's <img> / createImageBitmap reads."""
    from PIL import Image
    out = []
    for f in data._to_uint8(frames):                             # (H, W, 3) uint8 each
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


class Session:
    """One stream: its id (for /switch and /stop), the prompt waiting for the next chunk, a stop flag."""

    def __init__(self, sid, prompt, steps):
        self.id, self.prompt, self.steps = sid, prompt, steps     # prompt: the latest asked for
        self.pending = None          # set by /switch, taken before the next chunk starts
        self.next_chunk = 1          # the first chunk whose prompt is not fixed yet (chunk 0: the request's)
        self.chunks = 0              # chunks generated
        self.stop = threading.Event()


class App:
    """What the request threads share: the run's models (loaded once per student) and the one stream."""

    def __init__(self, run, limits=None, prompt=None, seed=0, device="cpu"):
        self.run, self.limits, self.seed, self.device = run, limits or Limits(), seed, device
        self.students = find_students(run)                  # {steps: stage}
        self.loaded = {}                                    # stage -> stream.load_models(run, stage)
        default = self.models_for(None)
        self.default_steps = stream.default_steps(default, None)
        self.tokenizer, self.fps = default.tokenizer, default.fps   # the run's, shared by its students
        self.prompt = prompt or "a red circle moves right"
        stream.check_prompt(default, self.prompt)
        self.lock = threading.Condition()
        self.active = None                                  # the Session streaming now
        self.ids = itertools.count(1)
        self.closing = False                                # the server is shutting down

    def models_for(self, steps):
        """The streaming system for a step count (None: the run's default student); loaded once."""
        stage = None if steps is None else self.students[steps]
        if stage not in self.loaded:
            self.loaded[stage] = stream.load_models(self.run, stage, self.device)
        return self.loaded[stage]

    def info(self):
        words = self.tokenizer.itos[2:]                     # without <pad>, <unk>
        m = self.models_for(None)
        return {"run": self.run, "model": m.name, "steps": list(self.students), "default_steps": self.default_steps,
                "fps": self.fps, "size": m.latent_hw * 4, "vocabulary": len(words), "words": words,
                "prompt": self.prompt, "examples": ["a red circle moves right", "a blue square moves up",
                                                    "a yellow triangle moves left", "a green diamond moves down"],
                "max_chunks": self.limits.max_chunks, "lead_s": self.limits.lead_s}

    # ------------------------------------------------------------------------------------------
    # Requests: checked whole before any work
    # ------------------------------------------------------------------------------------------
    def check_prompt(self, body):
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise RequestError(400, 'give a prompt as text, e.g. {"prompt": "a red circle moves right"}')
        try:
            words = stream.prompt_words(prompt)
        except ValueError as e:                             # empty, or only symbols
            raise RequestError(400, stream.safeio.one_line(e)) from None
        unknown = [w for w in words if w not in self.tokenizer.stoi]
        if len(unknown) == len(words):                      # the video would ignore the prompt
            raise RequestError(400, f"the model knows none of these words: {', '.join(unknown)}. It knows "
                                    f"{len(self.tokenizer) - 2} words of the toy world (colours, shapes, motions: "
                                    f"see the list under the prompt), e.g. \"a red circle moves right\"")
        return prompt, unknown

    def check_stream(self, body):
        prompt, ignored = self.check_prompt(body)
        steps, seed = body.get("steps", self.default_steps), body.get("seed", self.seed)
        if type(steps) is not int or steps not in self.students:
            raise RequestError(400, f"steps {steps!r}: this run streams with {', '.join(map(str, self.students))} "
                                    f"step(s) (one DMD student per count)")
        if type(seed) is not int or not 0 <= seed <= stream.MAX_SEED:
            raise RequestError(400, f"seed {seed!r}: give a whole number in 0..{stream.MAX_SEED}")
        return prompt, ignored, steps, seed

    def claim(self, prompt, steps):
        """The stream slot, or 409 once `grace_s` has passed with another stream still running: a tab
        being reloaded frees it within the grace (its old connection closes)."""
        deadline = time.monotonic() + self.limits.grace_s
        with self.lock:
            if self.closing:
                raise RequestError(503, "the server is shutting down")
            while self.active is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    a = self.active
                    raise RequestError(409, f"busy: another page is streaming (\"{a.prompt}\", chunk {a.chunks}). "
                                            f"This machine streams one video at a time: press Stop in that page "
                                            f"or close it, then press Start here")
                self.lock.wait(left)
            self.active = Session(next(self.ids), prompt, steps)
            return self.active

    def close(self, seconds=30):
        """Stop the running stream and wait for it to finish its chunk: torch must not be in the middle of
        one when the interpreter exits (that aborts the process). New streams are refused from here on."""
        with self.lock:
            self.closing = True
            if self.active:
                self.active.stop.set()
            self.lock.wait_for(lambda: self.active is None, seconds)

    def release(self, session):
        with self.lock:
            if self.active is session:
                self.active = None
                self.lock.notify_all()

    def session(self, body):
        """The running stream a /switch or /stop names by its id."""
        with self.lock:
            s = self.active
        if s is None or body.get("id") != s.id:
            raise RequestError(409, "this stream has ended (or never started): press Start")
        return s

    def switch(self, body):
        s = self.session(body)
        prompt, ignored = self.check_prompt(body)
        with self.lock:
            s.pending, s.prompt, at = prompt, prompt, s.next_chunk
        return {"at_chunk": at, "prompt": prompt, "ignored": ignored}

    def stop(self, body):
        s = self.session(body)
        s.stop.set()
        return {"stopping": True, "chunks": s.chunks}

    # ------------------------------------------------------------------------------------------
    # The stream
    # ------------------------------------------------------------------------------------------
    def generate(self, session, models, seed, send, gone):
        """Stream chunks to `send` (one JSON object per call) until Stop, a closed page or max_chunks.
        Returns why it ended. Pacing: the page plays a chunk of F frames in F / fps seconds from the
        moment it arrives (or from the end of the previous one), so `play_end` is when the page will
        have played everything sent; the next chunk starts when that is at most lead_s away."""
        lim, fps = self.limits, models.fps
        gen = stream.stream(models, session.prompt, lim.max_chunks, session.steps, seed)
        play_end, frames_total, ms_total = time.monotonic(), 0, 0.0
        try:
            chunk = next(gen)                               # chunk 0: the request's prompt
            while True:
                n = chunk.frames.shape[1]
                frames_total, ms_total = frames_total + n, ms_total + chunk.ms["total"]
                play_end = max(play_end, time.monotonic()) + n / fps
                session.chunks = chunk.index + 1
                send({"type": "chunk", "index": chunk.index, "prompt": chunk.prompt, "frames": png_frames(chunk.frames),
                      "ms": {k: round(v, 1) for k, v in chunk.ms.items()},
                      "gen_fps": n / (chunk.ms["total"] / 1e3), "play_fps": fps,
                      "mean_gen_fps": frames_total / (ms_total / 1e3),
                      "video_ms": n / fps * 1e3, "ahead_s": play_end - time.monotonic()})
                if session.chunks >= lim.max_chunks:
                    return "limit"
                while play_end - time.monotonic() > lim.lead_s and not session.stop.is_set():
                    session.stop.wait(min(lim.heartbeat_s, play_end - time.monotonic() - lim.lead_s))
                    if gone():
                        raise ClientGone
                    send({"type": "heartbeat"})
                if session.stop.is_set():
                    return "server stopped" if self.closing else "stopped"
                if gone():
                    raise ClientGone
                with self.lock:                             # the switch, if any, from the next chunk on
                    new, session.pending = session.pending, None
                    session.next_chunk = chunk.index + 2
                chunk = gen.send(new)
        finally:
            gen.close()


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "S2DiT-live"

    def setup(self):
        super().setup()
        self.connection.settimeout(self.server.app.limits.timeout_s)

    def log_message(self, fmt, *args):      # quiet: the server prints one line per stream instead
        pass

    # -- responses --------------------------------------------------------------------------------
    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def send_line(self, obj):
        self.wfile.write(json.dumps(obj).encode() + b"\n")       # unbuffered: the page sees it now

    def client_gone(self):
        """The page closed the connection: its socket reads as end-of-file (it sends nothing more)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    # -- requests ---------------------------------------------------------------------------------
    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/":
            with open(PAGE, "rb") as f:
                body = f.read()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)
        elif path == "/info":
            self.send_json(200, self.server.app.info())
        elif path == "/favicon.ico":
            self.send_response(204)
            self.end_headers()
        else:
            self.send_json(404, {"error": f"no page {path}: open / for the live page"})

    def do_POST(self):
        app = self.server.app
        routes = {"/stream": None, "/switch": app.switch, "/stop": app.stop}
        path = self.path.split("?")[0]
        try:
            if path not in routes:
                raise RequestError(404, f"no endpoint {path}: POST /stream, /switch or /stop")
            body = self.read_body()
            if path == "/stream":
                return self.stream_video(body)
            self.send_json(200, routes[path](body))
        except RequestError as e:
            self.send_json(e.status, {"error": e.message})
        except (OSError, ClientGone):                          # the client left mid-request
            pass

    def read_body(self):
        """The JSON object of a POST, or RequestError: no length (411), too long (413), not a JSON
        object (400), not sent as JSON (415: a page of another site cannot send JSON here unasked)."""
        lim = self.server.app.limits
        if "json" not in (self.headers.get("Content-Type") or ""):
            raise RequestError(415, "send the body as JSON (Content-Type: application/json)")
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "a POST needs a Content-Length header")
        if not length.strip().isdigit():
            raise RequestError(400, f"Content-Length {length!r} is not a byte count")
        n = int(length)
        if n > lim.max_body:
            self.close_connection = True
            if n <= 64 * lim.max_body:       # read it away, so the client is not reset before it reads the answer
                self.rfile.read(n)
            raise RequestError(413, f"the request is {n} bytes; at most {lim.max_body} are accepted (a prompt "
                                    f"is one line of text)")
        try:
            body = json.loads(self.rfile.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise RequestError(400, 'the body must be a JSON object, e.g. {"prompt": "a red circle moves right"}')
        return body

    def stream_video(self, body):
        app = self.server.app
        prompt, ignored, steps, seed = app.check_stream(body)
        session = app.claim(prompt, steps)
        reason = "error"
        try:
            models = app.models_for(steps)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.send_line({"type": "start", "id": session.id, "prompt": prompt, "ignored": ignored, "steps": steps,
                            "model": models.name, "fps": models.fps, "max_chunks": app.limits.max_chunks})
            log(f"stream {session.id}: \"{prompt}\", {steps} step(s)")
            reason = app.generate(session, models, seed, self.send_line, self.client_gone)
            self.send_line({"type": "end", "reason": reason, "chunks": session.chunks})
        except (OSError, ClientGone):          # a failed write (BrokenPipe, reset, timeout): the page is gone
            reason = "page closed"
        except Exception as e:                 # a bug: the page hears of it, the server goes on
            traceback.print_exc()
            reason = f"error: {type(e).__name__}: {e}"
            try:
                self.send_line({"type": "error", "message": f"generation failed: {type(e).__name__}: {e}"})
            except OSError:
                pass
        finally:
            app.release(session)
            log(f"stream {session.id}: ended after {session.chunks} chunks ({reason})")
        self.close_connection = True


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True                  # Ctrl-C does not wait for open streams

    def handle_error(self, request, client_address):
        """An exception outside the handlers' own (never expected): one line, and the server goes on."""
        log(f"request from {client_address[0]} failed: {sys.exc_info()[1]!r}")


class Server6(Server):
    address_family = socket.AF_INET6


def make_server(run, host="127.0.0.1", port=8000, prompt=None, seed=0, limits=None, device="cpu"):
    """The server, bound and with its models loaded, not yet serving. Bad input raises ValueError or
    FileNotFoundError before the seconds of model loading: a missing run, a prompt without a known
    word, an address that cannot be listened on (a port in use)."""
    if not os.path.isdir(run):
        raise FileNotFoundError(f"run directory {run} not found; the shipped one is weights/ship, or train one "
                                f"with `python train.py --out {run}`")
    vocab = os.path.join(run, "vocab.json")
    if prompt is not None and os.path.isfile(vocab):
        stream.unknown_words(text_mod.Tokenizer.from_json(vocab), prompt)
    server_class = Server6 if ":" in host else Server      # "::1", "::": an IPv6 address
    try:
        server = server_class((host, port), Handler)    # requests wait in the listen queue until serve_forever
    except OSError as e:
        hint = f"choose another with --port {port + 1}" if "in use" in str(e) else "check --host and --port"
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}); {hint}") from None
    try:
        server.app = App(run, limits, prompt, seed, device)
    except BaseException:
        server.server_close()
        raise
    return server


def url(server):
    host, port = server.server_address[:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve_until_interrupted(server):
    app = server.app
    run = os.path.relpath(app.run) if not os.path.relpath(app.run).startswith("..") else app.run
    print(f"S2DiT live page: open {url(server)} in a browser   (run {run}: steps {list(app.students)}; "
          f"Ctrl-C stops)", flush=True)
    if server.server_address[0] not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {server.server_address[0]}: other machines of the network can open the page",
              file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopping…", file=sys.stderr, flush=True)
    finally:
        app.close()
        server.server_close()


if __name__ == "__main__":
    stream.main(["--serve"] + sys.argv[1:])
