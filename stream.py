"""Streaming text-to-video: prompt in, frames out, chunk after chunk (paper Sec. D.2, Tab. A3, A6).

    prompt --text encoder (once)--> e                     cross-attention K/V of e computed once
    for chunk i = 0, 1, 2, ...:
        noise (B, C, 3, h, w) --few-step denoise with the rolling window (state read-only)--> x0_i
        x0_i --re-encoded at the context noise level t_ctx--> caches: K/V (softmax / SSA groups),
                 LCHA states (sum phi(k) v^T, sum phi(k)) and conv tails; the window rolls (2 chunks)
        x0_i --streaming decoder (temporal cache)--> 9 frames (first chunk) or 12 frames --> yield

Memory and time per chunk are constant: every cache holds at most `window` chunks. The prompt can
change mid-stream (`--then 5:"a blue square moves up"`): the video continues from the caches.

CLI: `python stream.py --run runs/small --prompt "a red circle moves right" --chunks 8 --steps 2
--seed 0 --out out/red.mp4 --json` prints, as its last line, a JSON object with chunks, frames,
fps, chunk_ms, breakdown_ms (text encoder, DiT per step, commit, decoder) and peak_rss_mb.
A DMD student streams at the one step count it was distilled for (the pipeline's `dmd`: 2, the
default of --steps); `--stage dmd_1step` / `dmd_4step` stream the students reproduce.py distils.
Python / notebook: `for chunk in stream(load_models("runs/small"), "a red circle moves right", 8): ...`
`python stream.py --serve` starts the live page (serve.py): type a prompt, watch the chunks arrive with
their timings, switch the prompt mid-stream (gen.send, the mechanism of --then).
(load_models returns a runs.StreamingSystem: the models and the numbers that go with them)
"""
import contextlib
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field

import imageio
import torch
from tqdm import tqdm

import data
import dist
import dit
import flow
import runs
import safeio
import text as text_mod
from streaming import commit_chunk, denoise_chunk

MAX_SEED = 2 ** 63 - 1                   # torch.Generator.manual_seed takes a 64-bit integer


@dataclass
class Chunk:
    index: int                    # chunk number in the stream
    frames: torch.Tensor          # (3, F, H, W) in [-1, 1]; F = 9 for chunk 0, else 12
    latents: torch.Tensor         # (C, 3, h, w) the clean chunk
    prompt: str                   # the prompt in force for this chunk
    ms: dict = field(default_factory=dict)   # text_encoder (0 if no new prompt), dit_steps, commit, decoder, total


def load_models(run, stage=None, device="cpu"):
    """The streaming system of a trained run: text encoder, the best available S2DiT, the decoder,
    on `device` (dist.pick_device).

    Preference: the DMD student (S2DiT-AR, EMA weights), else S2DiT-KD, else S2DiT-Pretrained; the
    efficient decoder, else the VAE decoder. `stage` picks another student (e.g. dmd_4step)."""
    if not os.path.isdir(run):
        raise FileNotFoundError(f"run directory {run} not found; train one with `python train.py --out {run}` "
                                f"(or `python train.py --preset tiny --out {run}` for a minutes-long one)")
    return runs.load_streaming(run, stage, device)


def prompt_words(prompt, what="prompt"):
    """The words the tokenizer will see (text.normalize); none -> ValueError (emoji or punctuation only)."""
    words = text_mod.normalize(prompt) if isinstance(prompt, str) else []
    if not words:
        raise ValueError(f"empty {what} {prompt!r}: it has no words once punctuation and symbols are dropped; "
                         f"give a text such as \"a red circle moves right\"")
    return words


def unknown_words(tokenizer, prompt, what="prompt"):
    """Words of the prompt the model never saw in training (they all become <unk>). All unknown ->
    ValueError (the video would ignore the prompt); some -> the list, for a warning."""
    words = prompt_words(prompt, what)
    unknown = [w for w in words if w not in tokenizer.stoi]
    if len(unknown) == len(words):
        words = tokenizer.itos[2:]
        raise ValueError(f"the model knows none of the words of {what} {prompt!r}; it knows {len(words)} words "
                         f"({', '.join(words[:8])}, ...: the run's vocab.json lists them all)")
    return unknown


def check_args(prompt, chunks, steps=None, seed=0, out=None, then=(), strip=None):
    """The checks that need no model: prompts have words, numbers in range, --out and --strip writable."""
    for i, p in enumerate([prompt] + [p for _, p in then]):
        prompt_words(p, "prompt" if i == 0 else "--then prompt")
    if chunks < 1:
        raise ValueError(f"--chunks must be >= 1, got {chunks}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps} (leave it out for the student's own count)")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed must be in 0..{MAX_SEED} (a 64-bit seed), got {seed}")
    for c, _ in then:
        if not 0 < c < chunks:
            raise ValueError(f"--then switches at chunk {c}, outside 1..{chunks - 1}")
    if out is not None:
        ext = os.path.splitext(out)[1].lower()
        if ext not in (".gif", ".mp4"):
            raise ValueError(f"--out must end in .gif or .mp4, got {out}")
        safeio.check_writable_file(out)                  # a folder of that name, an unwritable folder
    if strip is not None:
        if not strip.lower().endswith(".png"):
            raise ValueError(f"--strip must end in .png, got {strip}")
        safeio.check_writable_file(strip)


def check_request(models, prompt, chunks, steps, out=None, then=(), seed=0):
    """Every user error is raised here, before any work starts."""
    check_args(prompt, chunks, steps, seed, out, then)
    for i, p in enumerate([prompt] + [p for _, p in then]):
        unknown_words(models.tokenizer, p, "prompt" if i == 0 else "--then prompt")
    if models.steps is not None and steps != models.steps:
        # A DMD student learns to denoise from the times of ITS schedule only (Tab. A1 distils one
        # student per step count): off that schedule it is a model never trained for the task.
        n = models.steps
        raise ValueError(f"`{models.name}` was distilled for {n} denoising step{'s' * (n > 1)} only, not {steps}: "
                         f"run it with --steps {n} (or without --steps). Each step count has its own DMD student: "
                         f"train.py's `dmd` stage distils for 2 steps; `python reproduce.py --run RUN --tables tab1` "
                         f"adds dmd_1step and dmd_4step to a train.py run RUN (e.g. runs/small), streamed with "
                         f"--stage dmd_1step / dmd_4step")


def default_steps(models, steps):
    """None -> the count the student was distilled for (4 for the flow-matching stages); 0 stays 0 (an error)."""
    return models.default_steps if steps is None else steps


def encode_prompt(models, prompt):
    tokens, _, mask = text_mod.encode_text(models.text, models.tokenizer, [prompt])
    return tokens, mask                                                 # (1, L, Dt), (1, L)


def check_prompt(models, prompt, what="prompt"):
    """A prompt the model can follow: it has words and knows at least one of them. Returns the unknown
    words (ignored), for a warning; ValueError otherwise."""
    return unknown_words(models.tokenizer, prompt, what)


def stream(models, prompt, chunks, steps=None, seed=0, then=(), window=None, t_ctx=None):
    """Yield `Chunk`s as soon as each is decoded.

    Switching prompt: `gen.send("a blue square moves up")` makes the chunks after the current one
    follow the new prompt (send returns the next chunk, the first one of the new prompt); `then`:
    [(chunk_index, prompt), ...] does the same at fixed chunks (stream.py --then). Either way the
    caches go on: the video continues, only the text the DiT cross-attends to changes. A sent prompt
    without a known word raises ValueError and ends the stream (check it first with check_prompt)."""
    steps = default_steps(models, steps)
    check_request(models, prompt, chunks, steps, then=then, seed=seed)
    model, decoder, cfg = models.model, models.decoder, models.model.cfg
    ts = flow.few_step_schedule(steps, models.shift)
    t_ctx = models.t_ctx if t_ctx is None else t_ctx
    g = torch.Generator().manual_seed(seed)               # on the CPU: the same noise on every device
    device = next(model.parameters()).device
    switches = dict(then)
    state = dit.StreamState(window=window or cfg.window, sink=cfg.sink)
    dec_cache = None
    C, h, w = cfg.in_channels, models.latent_hw, models.latent_hw
    pending = prompt                      # a prompt to encode before the next chunk: the first, a switch
    with torch.no_grad():
        for i in range(chunks):
            pending = switches.get(i, pending)
            noise = torch.randn(1, C, cfg.chunk, h, w, generator=g).to(device)   # (1, C, 3, h, w)
            s = s0 = time.perf_counter()
            if pending is not None:                                     # new prompt, same caches
                prompt, pending = pending, None
                text, mask = encode_prompt(models, prompt)              # (1, L, Dt), (1, L)
                state.text_kv.clear()                                   # cross-attention K/V of the new prompt
                s0 = time.perf_counter()
            x0 = denoise_chunk(model, state, noise, text, mask, ts, generator=g)  # (1, C, 3, h, w)
            s1 = time.perf_counter()
            commit_chunk(model, state, x0, text, mask, t_ctx=t_ctx, generator=g)
            s2 = time.perf_counter()
            frames, dec_cache = decoder.decode_chunk(x0, dec_cache)     # (1, 3, 9 or 12, H, W)
            frames = frames.cpu()                                       # for the writer (waits for the device)
            s3 = time.perf_counter()
            sent = yield Chunk(i, frames[0].clamp(-1, 1), x0[0].cpu(), prompt,
                               {"text_encoder": (s0 - s) * 1e3, "dit_steps": (s1 - s0) * 1e3,
                                "dit_per_step": (s1 - s0) * 1e3 / steps, "commit": (s2 - s1) * 1e3,
                                "decoder": (s3 - s2) * 1e3, "total": (s3 - s) * 1e3})
            if sent is not None:                                        # gen.send(new_prompt)
                check_prompt(models, sent, "switched prompt")
                pending = sent


def reference_generation(model, text, mask, n_chunks, ts, latent_hw, seed=0):
    """The same generation WITHOUT caches: chunk i is denoised by a full block-causal forward over
    [clean chunks 0..i-1 at t = 0, noisy chunk i at t]. O(n^2) work, for tests only; random numbers
    are drawn in the same order as `stream` (chunk noise, then one re-noise draw per step), t_ctx = 0."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    done = []
    for _ in range(n_chunks):
        x_t = torch.randn(1, cfg.in_channels, cfg.chunk, latent_hw, latent_hw, generator=g)  # (1, C, 3, h, w)
        for j, t in enumerate(ts):
            ctx = torch.cat(done + [x_t], dim=2)                        # (1, C, 3(i+1), h, w)
            tt = torch.zeros(1, ctx.shape[2])
            tt[:, -cfg.chunk:] = t                                      # context clean, current chunk at t
            v = model(ctx, tt, text, mask, causal=True, window=n_chunks)[:, :, -cfg.chunk:]
            x0 = x_t - t * v
            if j + 1 < len(ts):
                x_t = (1 - ts[j + 1]) * x0 + ts[j + 1] * torch.randn(x0.shape, generator=g)
        done.append(x0)
    return torch.cat(done, dim=2)                                       # (1, C, 3 n_chunks, h, w)


@contextlib.contextmanager
def progressive_writer(path, fps=16):
    """with progressive_writer("a.mp4") as append: append(frames) as they arrive. They go to a unique
    temporary file next to `path` (safeio.atomic_path), renamed to `path` when the block ends: the file
    appears complete or not at all; two streams writing the same path never share a temporary file;
    an exception, Ctrl-C or SIGTERM removes it."""
    kw = {"fps": fps, "codec": "libx264", "macro_block_size": 1} if path.lower().endswith(".mp4") else \
        {"duration": 1000 / fps, "loop": 0}
    with safeio.atomic_path(path) as tmp:
        writer = imageio.get_writer(tmp, **kw)
        try:
            yield lambda frames: [writer.append_data(f) for f in data._to_uint8(frames)]
        finally:
            writer.close()


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(models, prompt, chunks, steps, seed=0, out=None, then=(), progress=True, strip=None):
    """Stream to a file (optional) and return the JSON summary. strip: also save a PNG of every
    4th frame in one row (data.save_strip), the picture a page shows instead of the video."""
    steps = default_steps(models, steps)
    check_request(models, prompt, chunks, steps, out, then, seed)
    per_chunk, frames, kept = [], 0, []
    with contextlib.ExitStack() as files:
        append = files.enter_context(progressive_writer(out, models.fps)) if out else None
        for c in tqdm(stream(models, prompt, chunks, steps, seed, then), total=chunks, desc="stream",
                      disable=not progress, file=sys.stderr):
            frames += c.frames.shape[1]
            per_chunk.append(c.ms)
            if append:
                append(c.frames)
            if strip:
                kept.append(c.frames)
    if strip:
        label = prompt + "".join(f"; from chunk {i}: {q}" for i, q in then)
        data.save_strip(strip, torch.cat(kept, 1)[None], [label], every=4)
    mean = lambda k: sum(m[k] for m in per_chunk) / len(per_chunk)
    total_s = sum(m["total"] for m in per_chunk) / 1e3
    return {"run_model": models.name, "prompt": prompt, "then": list(then), "chunks": chunks, "frames": frames,
            "steps": steps, "seed": seed, "fps": frames / total_s, "chunk_ms": mean("total"),
            "breakdown_ms": {"text_encoder": per_chunk[0]["text_encoder"], "dit_per_step": mean("dit_per_step"),
                             "dit_total": mean("dit_steps"), "commit": mean("commit"), "decoder": mean("decoder")},
            "chunk_ms_first_last": [per_chunk[0]["total"], per_chunk[-1]["total"]],
            "playback_fps": models.fps, "peak_rss_mb": peak_rss_mb(), "out": out, "strip": strip}


def parse_then(items):
    out = []
    for item in items or []:
        idx, sep, prompt = item.partition(":")
        if not sep or not idx.strip().isdigit():
            raise ValueError(f"--then expects CHUNK:PROMPT such as 5:\"a blue square moves up\", got {item!r}")
        out.append((int(idx), prompt.strip().strip('"')))
    return out


SHIPPED_RUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "ship")

# Flags of a stream to a file that the live page replaces with its own controls, and what to do instead.
NOT_WITH_SERVE = {"chunks": "the page streams until Stop", "then": "switch prompt in the page",
                  "out": "the page shows the video; run stream.py without --serve to save one",
                  "strip": "run stream.py without --serve to save a strip", "json": "the page shows the timings live",
                  "steps": "choose the steps in the page",
                  "stage": "the page offers each student of the run by its steps"}


def check_mode(args):
    """--serve or a stream to the terminal / a file: each has flags the other does not take."""
    given = lambda name: getattr(args, name) not in (None, [], False)
    if args.serve:
        for name, instead in NOT_WITH_SERVE.items():
            if given(name):
                raise ValueError(f"--{name} does not apply to --serve ({instead}); drop --{name}")
        if args.port is not None and not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be in 0..65535 (0: any free port), got {args.port}")
        return
    for name in ("host", "port"):
        if given(name):
            raise ValueError(f"--{name} needs --serve (it is where the live page listens)")
    for name in ("run", "prompt"):
        if not given(name):
            raise ValueError(f"--{name} is required (or --serve for the live page)")


def serve(p, args):
    """stream.py --serve: the live page of serve.py, until Ctrl-C. Bad input (a run that is missing,
    a prompt without a known word, a port in use) is reported before the server starts."""
    import serve as serve_mod
    try:
        server = serve_mod.make_server(args.run or SHIPPED_RUN, args.host or "127.0.0.1",
                                       8000 if args.port is None else args.port, args.prompt, args.seed,
                                       device=dist.pick_device(args.device))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        p.error(str(e))
    serve_mod.serve_until_interrupted(server)


def main(argv=None):
    p = safeio.Parser(prog="stream.py", description="Stream a text-to-video from a trained S2DiT run, chunk by chunk.")
    p.add_argument("--run", default=None, help="run directory written by train.py (e.g. runs/small; "
                   "with --serve the default is the shipped weights/ship)")
    p.add_argument("--prompt", default=None, help="what to generate, e.g. \"a red circle moves right\" "
                   "(with --serve: optional, the page's first prompt)")
    p.add_argument("--chunks", type=int, default=None, help="chunks of 3 latent frames (12 video frames) to stream "
                   "(default 8)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per chunk (default: the count the student "
                   "was distilled for; only that count is accepted)")
    p.add_argument("--stage", default=None, help="the run's DiT stage to stream (default: dmd, else kd, else pretrain; "
                   "dmd_1step / dmd_4step once reproduce.py has distilled them)")
    p.add_argument("--seed", type=int, default=0, help="noise seed: same seed, same video")
    p.add_argument("--out", default=None, help="output .mp4 or .gif, written progressively")
    p.add_argument("--then", action="append", default=[], help="switch prompt at a chunk: 5:\"a blue square moves up\"")
    p.add_argument("--strip", default=None, help="also save every 4th frame side by side as a .png picture")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line (last line)")
    p.add_argument("--serve", action="store_true", help="start the live page (http://127.0.0.1:8000): type a prompt, "
                   "watch the chunks arrive with their timings, switch the prompt mid-stream")
    p.add_argument("--host", default=None, help="with --serve: the address to listen on (default 127.0.0.1, this "
                   "machine only; 0.0.0.0 lets every machine of the network in)")
    p.add_argument("--port", type=int, default=None, help="with --serve: the port to listen on (default 8000)")
    dist.add_device_arg(p)
    args = p.parse_args(argv)
    try:
        check_mode(args)
        if not 0 <= args.seed <= MAX_SEED:
            raise ValueError(f"--seed must be in 0..{MAX_SEED} (a 64-bit seed), got {args.seed}")
    except ValueError as e:
        p.error(str(e))
    if args.serve:
        return serve(p, args)
    args.chunks = 8 if args.chunks is None else args.chunks
    try:   # everything that can be checked without the models first, then with them: no work is wasted
        then = parse_then(args.then)
        check_args(args.prompt, args.chunks, args.steps, args.seed, args.out, then, args.strip)
        runs.check_dit_stage(args.stage)
        vocab = os.path.join(args.run, "vocab.json")
        if os.path.isfile(vocab):                 # the unknown-word check before seconds of model loading
            tokenizer = text_mod.Tokenizer.from_json(vocab)
            for i, q in enumerate([args.prompt] + [q for _, q in then]):
                unknown_words(tokenizer, q, "prompt" if i == 0 else "--then prompt")
        models = load_models(args.run, args.stage, dist.pick_device(args.device))
        check_request(models, args.prompt, args.chunks, default_steps(models, args.steps), args.out, then, args.seed)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        p.error(str(e))
    for q in [args.prompt] + [q for _, q in then]:       # known words drive the video; say which are ignored
        unknown = unknown_words(models.tokenizer, q)
        if unknown:
            print(f"warning: the model does not know the words {unknown} of {q!r}; they are ignored", file=sys.stderr)
    try:
        res = run(models, args.prompt, args.chunks, args.steps, args.seed, args.out, then, progress=not args.json,
                  strip=args.strip)
    except KeyboardInterrupt:                            # Ctrl-C: the temporary video is already removed
        print(f"\nstream.py: interrupted; {args.out or 'nothing'} not written", file=sys.stderr)
        raise SystemExit(130) from None
    if not args.json:
        print(f"{res['frames']} frames in {res['chunks']} chunks: {res['fps']:.1f} FPS "
              f"({res['chunk_ms']:.1f} ms per chunk; playback needs {res['playback_fps']} FPS)"
              + (f" -> {args.out}" if args.out else ""))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
