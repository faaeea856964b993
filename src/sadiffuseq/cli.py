"""The ``sadiffuseq`` command: data | train | sample | eval | demo.

Settings come from a preset or YAML file (``--config``) and ``--section.key=value`` overrides; run
``sadiffuseq <command> --help`` for each command. Errors the user can fix are printed as one line (no
traceback) and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sadiffuseq import __version__
from sadiffuseq.errors import UserError

PRESETS = Path(__file__).parent / "presets"

OVERRIDES_HELP = """\
settings:
  --config NAME_OR_PATH   a preset ({presets}) or a YAML file
  --SECTION.KEY=VALUE     override one setting, e.g. --train.steps=500 --model.n_layers=6
                          (sections: model, diffusion, data, train, sample; see src/sadiffuseq/config.py)
"""


def preset_path(name: str) -> Path:
    """A preset name (``tiny``) or a path to a YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    candidate = PRESETS / f"{name}.yaml"
    if not candidate.is_file():
        names = ", ".join(sorted(x.stem for x in PRESETS.glob("*.yaml")))
        raise UserError(f"--config {name}: no such file or preset (presets: {names})")
    return candidate


def _tasks_help() -> str:
    from sadiffuseq.data.sources import describe_tasks

    lines = ["  jsonl" + " " * 26 + "a jsonl file of {src, trg} records (data.train_path, optional valid/test paths)"]
    lines += [f"  {name:<30} {text}" for name, text in sorted(describe_tasks().items())]
    return "\n".join(lines) + "\n"


def _presets() -> str:
    return ", ".join(sorted(x.stem for x in PRESETS.glob("*.yaml")))


def _split_overrides(extra: list[str], parser: argparse.ArgumentParser) -> list[str]:
    bad = [x for x in extra if not (x.startswith("--") and "=" in x and "." in x.split("=", 1)[0])]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)} (settings are written --section.key=value)")
    return extra


def _load(args, extra, parser):
    from sadiffuseq.config import load_config

    return load_config(preset_path(args.config) if args.config else None, _split_overrides(extra, parser))


# ---------------------------------------------------------------------------------------------------------
# Commands


DATA_ACTIONS = ("build", "stats")


def cmd_data(args, extra, parser) -> None:
    # The action may also come after the settings (`data --config tiny stats`): argparse then leaves it in extra.
    action = args.action
    for word in DATA_ACTIONS:
        if word in extra:
            if action is not None:
                parser.error(f"give one action (build or stats), not {action} and {word}")
            action = word
            extra = [x for x in extra if x != word]
    cfg = _load(args, extra, parser)
    if (action or "build") == "build":
        from sadiffuseq.data.dataset import describe, ensure_dataset

        meta = ensure_dataset(cfg.data, cfg.data_dir)
        print(describe(meta))
        print(f"vocabulary: {meta['vocab_size']} tokens; data folder: {cfg.data_dir}")
        return
    from sadiffuseq.data.dataset import data_stats, format_stats
    from sadiffuseq.utils import write_json

    stats = data_stats(cfg.data_dir, cfg.train.batch_size, cfg.data.packing, seed=cfg.train.seed)
    print(format_stats(stats))
    write_json(cfg.data_dir / "stats.json", stats)
    written = [cfg.data_dir / "stats.json"]
    try:
        from sadiffuseq.plots import plot_length_hist
    except ImportError:  # matplotlib missing: the numbers are in stats.json
        print("matplotlib is not installed: no length_hist.png")
    else:
        written.append(plot_length_hist(cfg.data_dir, cfg.data_dir / "length_hist.png", seq_len=stats["seq_len"]))
    print("written " + " and ".join(str(w) for w in written))


def cmd_train(args, extra, parser) -> None:
    from sadiffuseq.config import apply_override, config_from_dict, read_yaml
    from sadiffuseq.train import train

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume {run_dir}: not a run directory (no config.yaml); start it with `sadiffuseq train`")
        if args.config:
            parser.error("--resume takes the run's own config.yaml; drop --config (overrides are still allowed)")
        cfg = config_from_dict(read_yaml(run_dir / "config.yaml"), origin=str(run_dir / "config.yaml"))
        for item in _split_overrides(extra, parser):
            apply_override(cfg, item)
        cfg.train.out_dir = str(run_dir)
        cfg.validate()
    else:
        cfg = _load(args, extra, parser)
    run_dir = train(cfg, resume=bool(args.resume))
    print(f"run directory: {run_dir}  (metrics.jsonl, loss.png, checkpoints/)")


def cmd_sample(args, extra, parser) -> None:
    import torch

    from sadiffuseq.checkpoint import load_model
    from sadiffuseq.config import apply_override
    from sadiffuseq.evaluate import compute_metrics, format_table
    from sadiffuseq.generate import file_sources, generate_records, split_sources, write_jsonl
    from sadiffuseq.utils import resolve_device

    overrides = _split_overrides(extra, parser)
    weights = next((o.split("=", 1)[1] for o in overrides if o.startswith("--sample.weights=")), "ema")
    device = resolve_device(args.device)
    model, cfg, tokenizer = load_model(args.checkpoint, device, weights if weights in ("ema", "raw") else "ema")
    cfg.train.device = str(device)
    for item in overrides:
        apply_override(cfg, item)
    cfg.validate()
    if args.input:
        srcs, refs = file_sources(cfg, tokenizer, args.input, cfg.sample.num_examples)
    else:
        srcs, refs = split_sources(cfg, tokenizer, cfg.sample.split, cfg.sample.num_examples)
    if not srcs:
        raise UserError("nothing to generate: the input has no examples")
    torch.manual_seed(cfg.sample.seed)
    t0 = time.perf_counter()
    records = generate_records(model, cfg, tokenizer, srcs, refs, device)
    elapsed = time.perf_counter() - t0
    sc = cfg.sample
    suffix = ("_logsnr" if sc.spacing == "logsnr" else "") + (f"_mbr{sc.mbr}" if sc.mbr > 1 else "")
    out = Path(args.out) if args.out else Path(args.checkpoint) / f"samples_{sc.sampler}{sc.steps}{suffix}.jsonl"
    write_jsonl(records, out)
    print(f"{len(records)} generations in {elapsed:.1f} s ({elapsed / len(records):.3f} s each) -> {out}")
    print(format_table(compute_metrics([r["generated"] for r in records], [r["reference"] for r in records])))


def cmd_eval(args, extra, parser) -> None:
    from sadiffuseq.evaluate import evaluate_file, format_table

    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    metrics = evaluate_file(args.file, args.json)
    print(format_table(metrics))
    if args.json:
        print(f"written {args.json}")


def _bench_lengths(text: str | None, default: str) -> list[int]:
    text = text if text is not None else default
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise UserError(f"--lengths {text!r}: give comma-separated positive lengths, e.g. 2048,8192")
    return lengths


def cmd_bench(args, extra, parser) -> None:
    from sadiffuseq import bench

    if args.cuda_graph and args.what not in ("attention", "moe"):
        parser.error(f"--cuda-graph times bench attention and bench moe, not bench {args.what}")
    if args.what == "sample":
        if not args.checkpoint:
            raise UserError("bench sample needs a checkpoint: sadiffuseq bench sample RUN_DIR --samplers ddpm:200,...")
        samplers = bench.parse_samplers(args.samplers)  # syntax first; steps <= T once the checkpoint is loaded
        rows = bench.bench_sample(args.checkpoint, samplers, args.num_examples, args.length, args.split, args.input,
                                  args.spacing, args.device, args.out, _split_overrides(extra, parser))
        print(bench.format_rows(rows))
        print(f"written {args.out}/sample.csv and {args.out}/sample.png")
        return
    if args.checkpoint:
        parser.error(f"bench {args.what} takes no checkpoint (unrecognised argument {args.checkpoint!r})")
    if args.what == "attention":
        lengths = _bench_lengths(args.lengths, "2048,8192,32768,131072")
        if extra:
            parser.error(f"unrecognised arguments: {' '.join(extra)}")
        rows = bench.bench_attention(lengths, args.heads, args.head_dim, args.window, args.dilated_heads,
                                     args.dilation, args.globals, args.batch, not args.no_naive, args.reps, args.out,
                                     tuple(s.strip() for s in args.schedules.split(",") if s.strip()),
                                     args.flex_compile,
                                     tuple(s.strip() for s in args.backends.split(",") if s.strip()),
                                     args.flash_kernel, args.cuda_graph)
        print(bench.format_rows(rows))
        print(f"written {args.out}/attention.csv and {args.out}/attention.png")
    elif args.what == "moe":
        lengths = _bench_lengths(args.lengths, "8192,32768")
        if extra:
            parser.error(f"unrecognised arguments: {' '.join(extra)}")
        rows = bench.bench_moe(lengths, args.d_model, args.ffn_mult, args.experts, args.top_k, args.batch, args.reps,
                               args.out, args.device, args.impl, compile=args.compile,
                               cuda_graph=args.cuda_graph)
        print(bench.format_rows(rows))
        print(f"written {args.out}/moe.csv")
    else:
        lengths = _bench_lengths(args.lengths, "2048,8192,32768,131072")
        cfg = _load(args, extra, parser)
        for length in lengths:
            rows = bench.bench_model(cfg, length, args.vocab, args.batch, args.reps, args.out, args.compile)
            print(bench.format_rows(rows))
        print(f"written {args.out}/model_<length>.csv")


def cmd_demo(args, extra, parser) -> None:
    from sadiffuseq.demo import run_demo

    run_demo(_load_demo_config(args, extra, parser), num_examples=args.examples)


def _load_demo_config(args, extra, parser):
    from sadiffuseq.config import load_config

    stamp = time.strftime("%Y%m%d-%H%M%S")
    overrides = [f"--train.out_dir={Path(args.runs) / ('demo-' + stamp)}", f"--data.dir={Path(args.runs) / 'demo-data'}"]
    return load_config(preset_path(args.config or "tiny"), overrides + _split_overrides(extra, parser))


# ---------------------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    settings = OVERRIDES_HELP.format(presets=_presets())
    parser = argparse.ArgumentParser(
        prog="sadiffuseq",
        formatter_class=fmt,
        description="Diffusion language models for long documents: DiffuSeq, SA-DiffuSeq and MoE-DiffuSeq.",
        epilog="quick start:\n  sadiffuseq demo                     train and sample a tiny model on the CPU\n"
        "  sadiffuseq train --config tiny      the same model, step by step\n\n" + settings,
    )
    parser.add_argument("--version", action="version", version=f"sadiffuseq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "data",
        help="build the tokenised data folder of a task, or describe it (stats)",
        formatter_class=fmt,
        description="build (the default): read the task's examples, split them by document, train the BPE "
        "tokenizer on the training split and store token arrays in data.dir (default <train.out_dir>/data). Reuses "
        "a folder built with the same settings; reports how many examples were truncated, split or dropped to fit "
        "data.seq_len (data.overlong=truncate|drop|split).\n\n"
        "stats: describe a built folder: per split the example count, source/target/row length percentiles "
        "(p50/p90/p99/max), the truncated/split/dropped counts and the padding waste (fraction of row positions "
        "that are padding) of bucketed batches of train.batch_size rows and of rows packed to the folder's "
        "seq_len (data.packing says which one training uses). Writes stats.json and length_hist.png into the folder.",
        epilog="tasks (data.task; data.train_path overrides a task's default input, data.task_options its options):\n"
        + _tasks_help()
        + "\nexamples:\n  sadiffuseq data --config tiny\n  sadiffuseq data --data.task=jsonl "
        "--data.train_path=pairs.jsonl --data.dir=data_cache/pairs\n"
        "  sadiffuseq data --data.task=dialogue_next_turns --data.task_options='{history_words: 1000}' "
        "--data.seq_len=8192 --data.max_src_len=2048 --data.dir=data_cache/dialogue\n"
        "  sadiffuseq data --data.task=science_abstract_to_text --data.seq_len=8192 --data.max_src_len=512 "
        "--data.overlong=split --data.packing=true --data.dir=data_cache/science-8k\n"
        "  sadiffuseq data stats --data.dir=data_cache/science-8k --data.packing=true\n\n" + settings,
    )
    p.add_argument("action", nargs="?", choices=DATA_ACTIONS, help="build (default) or stats")
    p.add_argument("--config", help="preset name or YAML file")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser(
        "train",
        help="train a model (or resume a run)",
        formatter_class=fmt,
        description="Train a DiffuSeq-style model. Writes config.yaml, tokenizer.json, metrics.jsonl (one JSON "
        "record per log step), loss.png and checkpoints/ into train.out_dir. Builds the data folder first if needed.",
        epilog="examples:\n  sadiffuseq train --config tiny --train.steps=3000\n"
        "  sadiffuseq train --resume runs/tiny --train.steps=5000    continue (and extend) a run exactly\n\n" + settings,
    )
    p.add_argument("--config", help="preset name or YAML file")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "sample",
        help="generate targets with a trained model",
        formatter_class=fmt,
        description="Generate one target per source with a checkpoint (a run directory or one of its "
        "checkpoints/step_* folders). Sources come from a split of the run's data folder (sample.split) or from a "
        "jsonl file (--input, with the run's data.src_field/trg_field). Writes {source, reference, generated} jsonl "
        "and prints the metrics of `sadiffuseq eval`.",
        epilog="examples:\n  sadiffuseq sample runs/tiny --sample.steps=200 --sample.num_examples=100\n"
        "  sadiffuseq sample runs/tiny --sample.sampler=ddim --sample.clamp=true --out ddim.jsonl\n"
        "  sadiffuseq sample runs/tiny --sample.sampler=dpm++2m --sample.steps=10 --sample.spacing=logsnr\n"
        "  sadiffuseq sample runs/tiny --sample.sampler=dpm++2m --sample.steps=10 --sample.mbr=5    "
        "MBR: keep the best of 5\n\n"
        "sample settings: sampler (ddpm|ddim|dpm++2m), steps, spacing (time|logsnr: steps even in t or in log-SNR),\n"
        "  mbr (candidates per source, default 1; >1 writes them all as \"candidates\" and keeps the one with the\n"
        "  highest mean BLEU to the others), clamp, batch_size, num_examples, split, seed, weights (ema|raw)",
    )
    p.add_argument("checkpoint", help="run directory or checkpoint folder")
    p.add_argument(
        "--out", help="output jsonl (default: <checkpoint>/samples_<sampler><steps>[_logsnr][_mbr<K>].jsonl)"
    )
    p.add_argument("--input", help="jsonl file of sources (and references) instead of a data split")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "eval",
        help="score a generated jsonl file",
        formatter_class=fmt,
        description="Corpus BLEU (sacrebleu), DiffuSeq's sentence BLEU (NLTK, smoothing 4, averaged), ROUGE-1/2/L "
        "F1 (rouge-score), distinct-1/2 and mean lengths of a jsonl file with 'generated' and 'reference' fields.",
        epilog="example:\n  sadiffuseq eval runs/tiny/samples.jsonl --json runs/tiny/metrics_test.json",
    )
    p.add_argument("file", help="jsonl with 'generated' and 'reference' per line")
    p.add_argument("--json", help="also write the metrics as JSON to this path")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "bench",
        help="timings: sparse vs dense attention, training steps, MoE vs dense FFN, samplers' speed vs quality",
        formatter_class=fmt,
        description="attention: forward+backward (bf16) of dense SDPA, our sparse pattern (under each global-token "
        "schedule: inline, split) and the naive FlexAttention mask, with block density, ideal time (density × dense), "
        "efficiency (ideal / sparse) and speed-up, each call synchronised (latency), and the same calls queued back to "
        "back (*_queued_ms: the host hidden where the GPU is the bottleneck); CSV + "
        "log-log PNG (CUDA only). model: one training step (forward, backward, AdamW) of the model with dense and with "
        "sparse attention, side by side (model sizes and the sparse pattern come from --config and overrides; CUDA "
        "only).\n\n"
        "moe: forward+backward of one MoE feed-forward layer (--experts, --top-k; expert width = dense width / top-k) "
        "and of the dense FFN of the same active FLOPs (width --ffn-mult × --d-model) on (--batch, L, --d-model) "
        "inputs, in train mode; bf16 autocast on CUDA, fp32 on the CPU. Reports dense and MoE ms, their ratio (each "
        "call synchronised, and queued back to back: *_queued_ms, queued_ratio), the "
        "expert-matmul implementation (triton, grouped or loop) and TFLOP/s of the two projections (fwd+bwd) over the "
        "measured time (for MoE a lower bound: the time includes router and dispatch); moe.csv.\n\n"
        "sample: generate for the same sources with each --samplers sampler:steps pair of CHECKPOINT (a run "
        "directory or checkpoint folder); reports seconds per document, target tokens/s and, with references, BLEU "
        "and ROUGE-L; sample.csv + sample.png (quality vs seconds per document). --sample.key=value settings "
        "(batch_size, clamp, seed, weights, mbr) apply to every pair.",
        epilog="examples:\n  sadiffuseq bench attention --lengths 2048,8192,32768,131072\n"
        "  sadiffuseq bench model --config base --lengths 32768 --model.window=256 "
        "--model.dilations=[1,1,1,1,1,1,4,4,4,4,4,4]\n"
        "  sadiffuseq bench moe --lengths 8192,32768                    8 experts, top-2, d_model 768\n"
        "  sadiffuseq bench moe --lengths 256,1024 --d-model 256 --device cpu\n"
        "  sadiffuseq bench sample runs/base --samplers ddpm:2000,ddpm:200,ddim:50,dpm++2m:10,dpm++2m:20 "
        "--num-examples 8\n"
        "  sadiffuseq bench sample runs/long --samplers dpm++2m:10,dpm++2m:20 --length 8192 --num-examples 1 "
        "--spacing logsnr\n\n" + settings,
    )
    p.add_argument("what", choices=["attention", "model", "moe", "sample"], help="what to time")
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT",
                   help="sample only (required there): run directory or checkpoint folder")
    p.add_argument("--lengths", help="comma-separated sequence lengths (default 2048,8192,32768,131072; "
                   "moe: 8192,32768)")
    p.add_argument("--heads", type=int, default=16, help="attention: heads (default 16)")
    p.add_argument("--head-dim", type=int, default=64, help="attention: head width (default 64)")
    p.add_argument("--window", type=int, default=256, help="attention: half-width w (default 256)")
    p.add_argument("--dilated-heads", type=int, default=8, help="attention: heads with dilation (default 8)")
    p.add_argument("--dilation", type=int, default=4, help="attention: their dilation (default 4)")
    p.add_argument("--globals", type=int, default=16, help="attention: global tokens (default 16)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=10, help="timed repetitions (median reported)")
    p.add_argument("--no-naive", action="store_true", help="attention: skip the naive FlexAttention variant")
    p.add_argument("--flex-compile", default="auto", metavar="MODE",
                   help="attention: torch.compile mode of the sparse attention (model.flex_compile): auto "
                   "(autotuned kernels from 16k tokens), default, max-autotune-no-cudagraphs, reduce-overhead "
                   "(CUDA graphs) or max-autotune")
    p.add_argument("--backends", default="flex",
                   help="attention: sparse backends to time, flex and/or flash (default flex; the sparse_ms column "
                   "is flex when listed)")
    p.add_argument("--flash-kernel", default="auto", choices=("auto", "cudnn", "fa2"),
                   help="attention: the flash backend's band kernel (model.flash_kernel): auto (cudnn from 64k tokens "
                   "where NVIDIA's cudnn frontend is installed, else fa2), cudnn or fa2")
    p.add_argument("--schedules", default="inline,split",
                   help="attention: global-token schedules to time (default inline,split; the default "
                   "schedule, model.flex_globals resolved per length, is the sparse_ms column when listed, else the first one)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="attention, moe: also time every variant's forward+backward captured as one CUDA graph and "
                   "replayed (*_graph_ms columns): the GPU-bound cost with host dispatch removed for dense and sparse "
                   "alike, as a training step captured whole sees it")
    p.add_argument("--vocab", type=int, default=16000, help="model: vocabulary size (default 16000)")
    p.add_argument("--compile", nargs="?", const="default", default="", metavar="MODE",
                   help="model: compile the blocks of both models (Denoiser.compile_blocks); moe: compile both layers; "
                   "MODE is a torch.compile mode (default, reduce-overhead = CUDA graphs, max-autotune, ...)")
    p.add_argument("--config", help="model: preset name or YAML file (default: base)")
    p.add_argument("--experts", type=int, default=8, help="moe: experts E (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="moe: experts per token (default 2)")
    p.add_argument("--d-model", type=int, default=768, help="moe: model width (default 768)")
    p.add_argument("--ffn-mult", type=float, default=4.0, help="moe: dense FFN width / d-model (default 4)")
    p.add_argument("--impl", choices=["auto", "triton", "grouped", "loop"], default="auto",
                   help="moe: expert matmuls (default auto: the first of triton, grouped, loop that the device and "
                   "dtype support)")
    p.add_argument("--samplers", default="ddpm:2000,ddpm:200,ddim:50,dpm++2m:10,dpm++2m:20",
                   help="sample: comma-separated sampler:steps pairs (samplers ddpm, ddim, dpm++2m; "
                   "default %(default)s)")
    p.add_argument("--num-examples", type=int, default=8, help="sample: documents to generate (default 8)")
    p.add_argument("--length", type=int, help="sample: row length to generate (default: the run's data.seq_len)")
    p.add_argument("--split", default="test", help="sample: data split of the sources (default test)")
    p.add_argument("--input", help="sample: jsonl file of sources (and references) instead of a split")
    p.add_argument("--spacing", choices=["time", "logsnr"], default="time",
                   help="sample: which training steps every sampler visits (default time)")
    p.add_argument("--device", default="auto", help="moe, sample: auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--out", default="bench_out", help="folder for CSV and PNG (default bench_out)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the standard library, in minutes on a CPU",
        formatter_class=fmt,
        description="Builds the standard-library task (function signature + docstring -> body) from this "
        "machine's Python, samples with the untrained model, trains a tiny model, samples again and prints both "
        "sets of metrics side by side with a few examples.",
        epilog="example:\n  sadiffuseq demo --train.steps=500     a shorter run\n\n" + settings,
    )
    p.add_argument("--config", help="preset name or YAML file (default: tiny)")
    p.add_argument("--runs", default="runs", help="where the demo's run and data folders go (default: runs)")
    p.add_argument("--examples", type=int, default=32, help="held-out examples to generate (default 32)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]  # the subcommand's own parser, for errors
    try:
        args.func(args, extra, sub)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
