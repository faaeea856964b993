"""``sadiffuseq bench``: the MoE and sampler benchmarks on the CPU, argument checking, the CUDA-only modes."""

from __future__ import annotations

import csv
import math
import time

import pytest
import torch

from sadiffuseq import bench
from sadiffuseq.cli import main
from sadiffuseq.config import load_config
from sadiffuseq.errors import UserError

from conftest import tiny_overrides


def test_bench_moe_on_cpu(tmp_path):
    rows = bench.bench_moe([64, 128], d_model=32, ffn_mult=4, experts=8, top_k=2, reps=2, warmup=1,
                           out_dir=tmp_path, device="cpu")
    assert [r["length"] for r in rows] == [64, 128]
    for r in rows:
        assert r["dense_ms"] > 0 and r["moe_ms"] > 0 and r["ratio"] == pytest.approx(r["moe_ms"] / r["dense_ms"])
        assert r["dense_queued_ms"] > 0 and r["moe_queued_ms"] > 0
        assert r["queued_ratio"] == pytest.approx(r["moe_queued_ms"] / r["dense_queued_ms"])
        assert r["impl"] in ("grouped", "loop") and r["dtype"] == "float32"
        assert r["dense_width"] == 128 and r["expert_width"] == 64  # equal active FLOPs: 128 = 2 × 64
        assert r["moe_tflops"] > 0 and r["dense_tflops"] > 0
    # By hand, L=128: 128 tokens × 2 experts × 32 × 64 × 2 FLOPs per projection, 2 projections, ×3 fwd+bwd.
    r = rows[1]
    assert r["moe_flops"] == 3 * 2 * (2 * 128 * 2 * 32 * 64) == 3_145_728 * 2
    assert r["dense_flops"] == r["moe_flops"]  # the same active FLOPs
    assert r["moe_tflops"] == pytest.approx(r["moe_flops"] / (r["moe_ms"] / 1e3) / 1e12)
    with open(tmp_path / "moe.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


def test_queued_time_is_per_call_of_calls_run_back_to_back():
    calls = []
    ms = bench.queued_time_ms(lambda: (calls.append(1), time.sleep(0.01)), reps=5)
    assert len(calls) == 5 and 9.5 <= ms < 200  # 10 ms per call, measured over the five


def test_bench_moe_cli(tmp_path, capsys):
    out = tmp_path / "b"
    rc = main(["bench", "moe", "--d-model", "32", "--lengths", "64", "--reps", "1", "--device", "cpu",
               "--impl", "loop", "--out", str(out)])
    assert rc == 0 and (out / "moe.csv").is_file()
    assert "loop" in capsys.readouterr().out
    assert main(["bench", "moe", "--top-k", "9", "--lengths", "64", "--device", "cpu", "--out", str(out)]) == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("ddpm", "no step count"),
        ("beam:10", "unknown sampler 'beam'.*ddpm, ddim, dpm\\+\\+2m"),
        ("ddpm:x", "positive integer"),
        ("ddpm:0", "positive integer"),
        ("ddpm:10,", "comma-separated"),
        ("", "comma-separated"),
        ("ddim:5,ddim:5", "listed twice"),
    ],
)
def test_parse_samplers_rejects_bad_input(text, message):
    with pytest.raises(UserError, match=message):
        bench.parse_samplers(text)


def test_parse_samplers():
    assert bench.parse_samplers(" ddpm:2000, dpm++2m:10 ") == [("ddpm", 2000), ("dpm++2m", 10)]
    with pytest.raises(UserError, match="exceeds the checkpoint's diffusion.steps=100"):
        bench.parse_samplers("ddim:50,ddpm:200", total_steps=100)


def test_bench_sample_cli_errors(tmp_path, capsys):
    assert main(["bench", "sample", "--samplers", "ddpm:10"]) == 2
    assert "needs a checkpoint" in capsys.readouterr().err
    assert main(["bench", "sample", str(tmp_path), "--samplers", "foo:3"]) == 2
    assert "unknown sampler 'foo'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_bench_attention_needs_cuda(tmp_path, capsys):
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        bench.bench_attention([128], out_dir=tmp_path)
    assert main(["bench", "attention", "--lengths", "128", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_attention_rejects_unknown_schedules(tmp_path, capsys):
    with pytest.raises(UserError, match="unknown global-token schedule"):
        bench.bench_attention([128], out_dir=tmp_path, schedules=("inline", "diagonal"))
    assert main(["bench", "attention", "--schedules", "split,foo", "--out", str(tmp_path)]) == 2
    assert "'foo'" in capsys.readouterr().err
    assert main(["bench", "attention", "--flex-compile", "fastest", "--out", str(tmp_path)]) == 2
    assert "flex_compile='fastest' is not one of" in capsys.readouterr().err


def test_bench_sample_end_to_end(tmp_path, capsys, monkeypatch):
    import sadiffuseq.generate
    from sadiffuseq.train import train

    cfg = load_config(None, tiny_overrides(tmp_path))
    run_dir = train(cfg, progress=False, log=lambda *_: None)
    out = tmp_path / "bench"
    calls = []  # (number of sources, steps) of every generation, warm-up included
    real = sadiffuseq.generate.generate_records

    def spy(model, cfg, tokenizer, srcs, *args, **kwargs):
        calls.append((len(srcs), cfg.sample.steps))
        return real(model, cfg, tokenizer, srcs, *args, **kwargs)

    monkeypatch.setattr(sadiffuseq.generate, "generate_records", spy)
    rc = main(["bench", "sample", str(run_dir), "--samplers", "ddpm:10,dpm++2m:5", "--num-examples", "4",
               "--length", "40", "--device", "cpu", "--out", str(out), "--sample.batch_size=3"])
    assert rc == 0, capsys.readouterr().err
    # untimed warm-ups with both batch shapes of the timed runs (3 + 1 sources), then one run per sampler
    assert calls == [(1, 2), (3, 2), (4, 10), (4, 5)]
    with open(out / "sample.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["ddpm:10", "dpm++2m:5"]
    for r in rows:
        assert int(r["documents"]) == 4 and int(r["seq_len"]) == 40
        for key in ("seconds_per_doc", "target_tokens_per_s", "bleu", "rougeL"):
            assert math.isfinite(float(r[key]))
        assert float(r["seconds_per_doc"]) > 0 and float(r["target_tokens_per_s"]) > 0
    assert (out / "sample.png").stat().st_size > 0
    # steps > T is caught once the checkpoint says T
    assert main(["bench", "sample", str(run_dir), "--samplers", "ddim:500", "--device", "cpu",
                 "--out", str(out)]) == 2
    assert "diffusion.steps=100" in capsys.readouterr().err


def test_bench_attention_rejects_unknown_backends(tmp_path, capsys):
    with pytest.raises(UserError, match="unknown sparse backend"):
        bench.bench_attention([128], out_dir=tmp_path, backends=("flex", "triton"))
    assert main(["bench", "attention", "--backends", "dense", "--out", str(tmp_path)]) == 2
    assert "choose from flash, flex" in capsys.readouterr().err


def test_cuda_graph_option_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "model", "--cuda-graph", "--out", str(tmp_path)])
    assert "--cuda-graph times bench attention and bench moe" in capsys.readouterr().err
    with pytest.raises(UserError, match="needs --device cuda"):
        bench.bench_moe([64], d_model=32, device="cpu", out_dir=tmp_path, cuda_graph=True)
    with pytest.raises(UserError, match="reduce-overhead would capture graphs inside it"):
        bench.bench_attention([128], out_dir=tmp_path, compile_mode="reduce-overhead", cuda_graph=True)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs a CUDA GPU"):
            bench.graphed(lambda: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend, schedule, kernel", [("flex", "inline", "auto"), ("flex", "split", "auto"),
                                                       ("flash", "split", "fa2"), ("flash", "split", "cudnn")])
def test_gpu_graph_replay_gives_the_eager_gradients(backend, schedule, kernel):
    """What ``--cuda-graph`` times is the same computation: the sparse attention's forward + backward captured once
    and replayed on new inputs copied into the captured buffers gives the gradients of an eager call."""
    from sadiffuseq.attention import cudnn_band
    from sadiffuseq.attention.layer import SparseSelfAttention

    if kernel == "cudnn" and not cudnn_band.available():
        pytest.skip("NVIDIA's cudnn frontend is not installed")
    layer = SparseSelfAttention(bench.pattern_config(4, 64, 64, 2, 4, 8, backend=backend,
                                                     compile_mode="default")).cuda()
    layer.global_schedule, layer.flash_kernel = schedule, kernel
    L = 1000
    q, k, v = (torch.randn(1, 4, L, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    grads = {}

    def step():
        layer.attend(q, k, v).backward(grad)
        grads["now"] = [t.grad.clone() for t in (q, k, v)]
        q.grad = k.grad = v.grad = None

    replay = bench.graphed(step)
    torch.manual_seed(1)
    new = [torch.randn_like(q) for _ in range(4)]
    with torch.no_grad():
        for t, n in zip((q, k, v, grad), new):
            t.copy_(n)
    replay()
    torch.cuda.synchronize()
    replayed = [g.clone() for g in grads["now"]]
    step()  # eager, same inputs
    for a, b in zip(replayed, grads["now"]):
        assert torch.equal(a, b) or (a.float() - b.float()).abs().max() < 1e-2 * b.float().abs().max()
    assert not torch.equal(replayed[0], torch.zeros_like(replayed[0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_gpu_bench_attention_reports_every_variant_replayed(tmp_path):
    """``--cuda-graph`` gives every timed variant its replay time and efficiency (density × dense replay / its
    replay), next to the default variant's ``sparse_graph_ms`` and ``graph_efficiency``."""
    rows = bench.bench_attention([2048], heads=4, dilated_heads=2, naive=False, reps=2, out_dir=tmp_path,
                                 backends=("flex", "flash"), schedules=("inline", "split"), flash_kernel="fa2",
                                 cuda_graph=True)
    row = rows[0]
    for variant in ("flash", "inline", "split"):
        assert row[f"{variant}_graph_ms"] > 0
        assert row[f"{variant}_graph_efficiency"] == pytest.approx(
            row["density"] * row["dense_graph_ms"] / row[f"{variant}_graph_ms"])
    assert row["sparse_graph_ms"] == row[f"{row['schedule']}_graph_ms"]
    assert (tmp_path / "attention.csv").exists() and (tmp_path / "attention.png").exists()
