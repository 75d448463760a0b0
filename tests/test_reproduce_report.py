"""reproduce.write_results: each table into its marked block of RESULTS.md, the report around it untouched.

A small synthetic `res` (the shape reproduce.compute stores in <run>/reproduce.json) stands for a run, so
these tests take well under a second."""
import os
import re
import shutil

import pytest

import reproduce
import safeio

MADE = {"cmd": "python reproduce.py --run runs/small", "date": "2026-12-03", "commit": "abc1234"}


def vbench(colour, total, n=12):
    """A row of reproduce.score: rates are fractions of n videos."""
    return {"n": n, "color_acc": colour, "shape_acc": 3 / n, "direction_acc": 0.0, "dynamic_degree": 8 / n,
            "subject_consistency": 0.64, "background_consistency": 0.87, "fvd": 0.18, "semantic": 0.31,
            "quality": 0.76, "total": total}


def ablation(loss, **scored):
    return {"params": 3_300_000, "train_loss_last": 0.38, "eval_loss": loss, "chunk_ms": 22.84, **scored}


@pytest.fixture
def res():
    return {
        "seed": 0, "preset": "small", "n_prompts": 12, "made": {t: MADE for t in reproduce.TABLES},
        "tab1": {"S2DiT-Pretrained": {"params": 3_301_234, "setting": "full-step Euler + CFG", **vbench(1.0, 0.72)},
                 "S2DiT-KD": {"params": 3_301_234, "setting": "full-step Euler + CFG", **vbench(1.0, 0.76)},
                 "S2DiT-AR": {"params": 3_301_234, "setting": "streaming, 2 steps", **vbench(8 / 12, 0.67)}},
        "taba1": {"1 step": {"student": "dmd_1step", **vbench(8 / 12, 0.68)},
                  "2 steps": {"student": "dmd", **vbench(8 / 12, 0.67)},
                  "4 steps": {"student": "dmd_4step", **vbench(8 / 12, 0.62)}},
        "taba7": {"with the teacher (S2DiT-AR, `dmd`)": {"student": "dmd", **vbench(8 / 12, 0.665)},
                  "without the teacher (`dmd_noteacher`)": {"student": "dmd_noteacher", **vbench(8 / 12, 0.656)}},
        "tab3": {"budget_ms": 14.93, "k": 1,
                 "layouts": {"searched": {"layout": "LSLL", "latency_ms": 14.93, "fits_budget": True, "eq10_loss": 0.2412},
                             "hourglass": {"layout": "LSLL", "latency_ms": 14.93, "fits_budget": True, "eq10_loss": 0.2412},
                             "all-LCHA": {"layout": "LLLL", "latency_ms": 17.8, "fits_budget": False, "eq10_loss": 0.32}},
                 "attention": {"lcha": ablation(0.3612), "local": ablation(0.401), "linear": ablation(0.46)}},
        "taba5": {"full attention": ablation(0.263, n=12, semantic=0.36, fvd=0.36),
                  "SANA-style linear attention": ablation(0.482, n=12, semantic=0.31, fvd=0.24),
                  "LCHA": ablation(0.339, n=12, semantic=0.39, fvd=0.39)},
        "bench": {"preset": "small", "tokens": [192, 3072], "frame_px": [64, 256], "threads": 2,
                  "latency_ms": {"attention": [19.1, 491.4], "s2dit": [19.2, 129.2], "sana": [21.9, 126.7]},
                  "loglog_slope": {"attention": 1.17, "s2dit": 0.69, "sana": 0.63},
                  "ratio_attention_over_s2dit": [0.99, 3.8]},
        "taba2": {"vae_decoder": {"params": 995_660, "latency_ms_per_chunk": 56.29, "psnr": 28.22, "ssim": 0.913},
                  "efficient_decoder": {"params": 253_612, "latency_ms_per_chunk": 24.46, "psnr": 24.48, "ssim": 0.880},
                  "clips": 8, "frames": 33},
        "decoder_updates": 2000,
        "taba3": {"2 steps": {"student": "dmd", "chunks": 8, "text_encoder_ms": 1.21, "dit_per_step_ms": 18.6,
                              "commit_ms": 18.1, "decoder_ms": 14.4, "chunk_ms": 69.96, "fps": 166.8}},
        "taba6": {"S2DiT-AR (2 steps)": {"streams": 4, "frames": 357, "subject_consistency": 0.231,
                                         "background_consistency": 0.86, "semantic": 0.25}},
    }


BEFORE = "# Results\n\nProse the report's author wrote, kept byte for byte.  \n\n## Tab. 1: the models of the chain\n\n"
CURVES = "<!-- curves.py curves: begin -->\nMade by `python curves.py --report x`.\n\n| a | b |\n|---|---|\n<!-- curves.py curves: end -->\n"
AFTER = "\n*Paper, Tab. 1* (VBench):\n\n| model | total |\n|---|---|\n| S2DiT-KD | 83.62 |\n\n" + CURVES


def report(tab1_body):
    return BEFORE + reproduce.marker("tab1") + tab1_body + reproduce.marker("tab1", end=True) + AFTER


def test_a_block_is_replaced_and_the_text_around_it_kept_byte_for_byte(res, tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(report("\nold toy table\n"))
    reproduce.write_results(str(path), res)
    text = path.read_text()
    begin, end = reproduce.marker("tab1"), reproduce.marker("tab1", end=True)
    assert text.startswith(BEFORE + begin) and CURVES in text and "old toy table" not in text
    assert text[text.index(end):].startswith(end + AFTER)          # the paper's table and curves.py's block follow
    body = text[text.index(begin) + len(begin):text.index(end)]
    assert body.startswith("\nn = 12 held-out prompts") and body.endswith("(1/12 = 0.08).\n")
    assert max(len(line) for line in body.splitlines() if not line.startswith("|")) <= 100   # prose wrapped
    prose = " ".join(body.split())
    assert "n = 12 held-out prompts, one video each. Made by `python reproduce.py --run runs/small` on 2026-12-03, " \
           "commit abc1234." in prose
    assert "| S2DiT-AR | 3.30M | streaming, 2 steps | 0.67 [0.39, 0.86] | 0.25 [0.09, 0.53] | 0.00 [0.00, 0.24] | 0.31 |" in body
    assert "| S2DiT-KD | 0.64 | 0.87 | 0.67 [0.39, 0.86] | 0.18 | 0.76 | 0.76 |" in body
    assert "Toy: total 0.76 vs 0.72, a tie, within one video's change (1/12 = 0.08)." in prose
    reproduce.write_results(str(path), res)                          # again: nothing appended twice
    assert path.read_text() == text


def test_missing_blocks_are_appended_under_their_heading_and_a_second_run_changes_nothing(res, tmp_path):
    path = tmp_path / "RESULTS.md"
    assert reproduce.write_results(str(path), res) == list(reproduce.BLOCKS)   # a fresh file
    first = path.read_text()
    for name, (_, heading, _) in reproduce.BLOCKS.items():
        assert first.count(reproduce.marker(name)) == 1 and f"## {heading}\n\n{reproduce.marker(name)}\n" in first
    reproduce.write_results(str(path), res)
    assert path.read_text() == first
    path.write_text(report("\nold\n"))                               # a report with only the Tab. 1 block
    reproduce.write_results(str(path), res)
    text = path.read_text()
    assert text.startswith(BEFORE) and text.count("## Tab. 1: the models of the chain") == 1
    assert text.index(CURVES) < text.index("## Tab. A1: denoising steps")    # appended after everything


def test_a_table_not_yet_computed_leaves_its_block_as_it_is(res, tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(report("\nkept until tab1 is computed\n"))
    del res["tab1"], res["taba1"]
    assert "tab1" not in reproduce.write_results(str(path), res)
    assert path.read_text().startswith(report("\nkept until tab1 is computed\n"))


@pytest.mark.parametrize("broken", [
    BEFORE + reproduce.marker("tab1") + "\nno end marker\n" + AFTER,
    BEFORE + reproduce.marker("tab1", end=True) + "\nend before begin\n" + reproduce.marker("tab1") + AFTER,
    report("\none\n") + report("\ntwice\n"),
], ids=["no end marker", "end before begin", "the block twice"])
def test_broken_markers_are_refused_and_the_file_left_untouched(broken, res, tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_bytes(broken.encode())
    with pytest.raises(safeio.UsageError, match="block tab1 needs one `<!-- reproduce.py tab1: begin -->` followed by"):
        reproduce.write_results(str(path), res)
    assert path.read_bytes() == broken.encode() and [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]


def test_reproduce_refuses_a_broken_report_before_any_work(tmp_path, capsys):
    path = tmp_path / "RESULTS.md"
    path.write_text(BEFORE + reproduce.marker("taba7") + "\n")
    with pytest.raises(SystemExit) as e:                             # before it even opens the run
        reproduce.main(["--run", str(tmp_path / "no_run"), "--out", str(path)])
    assert e.value.code == 2 and "block taba7 needs one" in capsys.readouterr().err


def test_every_block_rounds_and_states_its_sample_count(res, tmp_path):
    path = tmp_path / "RESULTS.md"
    reproduce.write_results(str(path), res)
    text = path.read_text()
    prose = " ".join(text.split())
    for row in ("| 1 | `dmd_1step` | 0.67 [0.39, 0.86] | 0.25 [0.09, 0.53] | 0.00 [0.00, 0.24] | 0.67 [0.39, 0.86] |",
                "| searched = hourglass | `L S L L` | 14.9 | yes | **0.24** |", "| all-LCHA | `L L L L` | 17.8 | no | 0.32 |",
                "| LCHA | 3.30M | 0.38 | **0.361** | 22.8 |",
                "| SANA-style linear attention | 3.30M | 0.38 | 0.482 | 22.8 | 0.31 | 0.24 |",
                "| S2DiT (`L S S L`) | 19.2 | 129.2 | 0.69 |",
                "| this run's (`--preset small`) | 2000 | 0.25M vs 1.00M (3.9x fewer) | 56.3 / 24.5 (2.3x faster) | 28.2 / 24.5 | 0.91 / 0.88 |",
                "| 2 | `dmd` | 1.2 | 18.6 | 18.1 | 14.4 | 70.0 | 167 |",
                "| S2DiT-AR (2 steps) | 4 | 357 | 0.23 | 0.86 | 0.25 |"):
        assert row in text, row
    for line in ("n = 8 held-out clips of 33 frames. Made by", "n = 4 held-out prompts, one stream of 357 frames each.",
                 "8 chunks of the first held-out prompt, mean per chunk.", "Budget 14.9 ms, k = 1. Made by"):
        assert line in prose, line
    assert "Toy: total 0.68 / 0.67 / 0.62, a tie, within one video's change (1/12 = 0.08); dynamic degree " \
           "0.67 / 0.67 / 0.67, a tie (the 95% intervals overlap)." in prose
    assert "Toy: total 0.67 vs 0.66, a tie, within one video's change" in prose     # Tab. A7
    assert "holds: " not in prose                                    # the old "holds: ..." verdicts are gone


def test_reproduce_writes_the_blocks_of_the_tables_it_has(tmp_path):
    """main() on a run of which only JSON is read (Tab. A2 is the decoder stage's metrics: the shipped
    weights' files): the block comes with the command, today's date and the run's numbers, and the other
    blocks wait for their tables."""
    run = tmp_path / "run"
    run.mkdir()
    for f in ("pipeline.json", "decoder.done.json"):
        shutil.copy(os.path.join(os.path.dirname(reproduce.__file__), "weights", "ship", f), run / f)
    out = tmp_path / "RESULTS.md"
    out.write_text(report("\nold\n"))
    reproduce.main(["--run", str(run), "--tables", "taba2", "--out", str(out)])
    text = out.read_text()
    assert text.startswith(report("\nold\n").split(reproduce.marker("tab1", end=True))[0])   # Tab. 1 not computed
    block = text[text.index(reproduce.marker("taba2")):]
    assert "| this run's (`--preset ship`) | 6000 | 0.25M vs 1.00M (3.9x fewer) | 57.9 / 24.2 (2.4x faster) | " \
           "28.2 / 27.0 | 0.92 / 0.92 |" in block
    made = reproduce.stamp(["--run", str(run), "--tables", "taba2", "--out", str(out)])
    assert f"Made by `{made['cmd']}` on {made['date']}" in " ".join(block.split())
    assert re.fullmatch(r"[0-9a-f]{4,}|", made["commit"])


def test_the_report_has_every_block_and_keeps_its_prose(res, tmp_path):
    """RESULTS.md itself: every block is marked (a run appends nothing), and writing a run into a copy
    changes nothing outside the blocks, the paper's tables and curves.py's blocks included."""
    with open(os.path.join(os.path.dirname(reproduce.__file__), "RESULTS.md")) as f:
        before = f.read()
    path = tmp_path / "RESULTS.md"
    path.write_text(before)
    reproduce.write_results(str(path), res)
    after = path.read_text()
    blocks = re.compile(r"(<!-- reproduce.py (\w+): begin -->).*?(<!-- reproduce.py \2: end -->)", re.S)
    assert sorted(m[2] for m in blocks.finditer(before)) == sorted(reproduce.BLOCKS)
    assert blocks.sub(r"\1\3", after) == blocks.sub(r"\1\3", before) and after != before


def test_an_ordering_is_a_tie_inside_the_noise_only():
    n = 12
    assert reproduce.ordering([0.5, 0.56], n) == "a tie, within one video's change (1/12 = 0.08)"
    assert reproduce.ordering([0.5, 0.6], n, is_rate=True) == "a tie (the 95% intervals overlap)"
    assert reproduce.ordering([0.5, 0.6, 0.7], n) == "holds"                 # each step >= 1/n
    assert reproduce.ordering([0.7, 0.5], n) == "does not hold"
    assert reproduce.ordering([0.0, 1.0], n, is_rate=True) == "holds"        # [0.00, 0.24] vs [0.76, 1.00]
    assert reproduce.ordering([1.0, 0.0], n, is_rate=True) == "does not hold"
    assert reproduce.ordering([3 / n, 8 / n], n, is_rate=True).startswith("a tie")   # [0.09, 0.53] vs [0.39, 0.86]
